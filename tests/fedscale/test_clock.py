"""The virtual clock against rounds computed by hand.

Every round below moves a 1,000,000-byte model down (8,000 kbit) and a
500,000-byte update up (4,000 kbit), with 2 local epochs. Per client, by hand:

    id samples speed down  up    download compute         upload total availability
    1  300     100   8000  4000  1.0      300*2/100 = 6   1.0    8.0   always
    2  100     50    4000  1000  2.0      100*2/50  = 4   4.0    10.0  always
    3  200     20    16000 2000  0.5      200*2/20  = 20  2.0    22.5  always
    4  100     10    8000  8000  1.0      100*2/10  = 20  0.5    21.5  [900, 1003) per 3600 s
    5  100     100   8000  4000  1.0      100*2/100 = 2   1.0    4.0   [2000, 3000) per 3600 s
    6  200     400   16000 8000  0.5      200*2/400 = 1   0.5    2.0   always; churns at 1.5 s
    7  400     100   8000  4000  1.0      400*2/100 = 8   1.0    10.0  always

The round starts at t = 1000 with a 15 s deadline, so: client 4 goes offline at
1003 (3 s in, before its 21.5 s), client 5 is offline at the start, client 6
churns at 1.5 s, client 3 would need 22.5 s > 15 s; clients 1, 2 and 7 finish at
8, 10 and 10 s (2 before 7 on the tie, by id).
"""

import math

import numpy as np
import pytest

from fedscale.clock import (
    ClientTask,
    ClientTime,
    Dropped,
    RoundCost,
    client_time,
    overcommit_count,
    simulate_round,
    time_to_accuracy,
)
from fedscale.devices import Availability, DeviceProfile, FixedDevices
from fedscale.exceptions import ConfigError
from fedscale.population import Population
from fedscale.synthetic import Synthetic

COST = RoundCost(model_bytes=1_000_000, update_bytes=500_000, local_epochs=2)
HOUR = 3600.0


def _task(cid, samples, speed, down, up, windows=(), period=None, interrupt=math.inf):
    profile = DeviceProfile(speed, down, up, Availability(windows, period))
    return ClientTask(cid, samples, profile, interrupt)


TASKS = [
    _task(1, 300, 100, 8000, 4000),
    _task(2, 100, 50, 4000, 1000),
    _task(3, 200, 20, 16000, 2000),
    _task(4, 100, 10, 8000, 8000, ((900.0, 1003.0),), HOUR),
    _task(5, 100, 100, 8000, 4000, ((2000.0, 3000.0),), HOUR),
    _task(6, 200, 400, 16000, 8000, interrupt=1.5),
    _task(7, 400, 100, 8000, 4000),
]


def test_client_times_by_hand():
    times = {t.client_id: client_time(t, COST) for t in TASKS}
    assert times[1] == ClientTime(1.0, 6.0, 1.0) and times[1].total_s == 8.0
    assert times[2] == ClientTime(2.0, 4.0, 4.0)
    assert times[3].total_s == 22.5
    assert times[4].total_s == 21.5
    assert times[6].total_s == 2.0
    scaled = client_time(TASKS[0], RoundCost(1_000_000, 500_000, 2, compute_scale=2.5))
    assert scaled == ClientTime(1.0, 15.0, 1.0)


def test_round_with_deadline_keeps_the_first_three():
    timing = simulate_round(TASKS, start=1000.0, k=3, cost=COST, deadline_s=15.0)
    assert timing.accepted == (1, 2, 7)
    assert timing.duration == 10.0 and timing.end == 1010.0
    assert timing.dropped == (
        Dropped(5, "offline", 0.0),
        Dropped(6, "churn", 1.5),
        Dropped(4, "went-offline", 3.0),
        Dropped(3, "deadline", 15.0),
    )
    assert set(timing.times) == {1, 2, 3, 4, 6, 7}  # not the client offline at the start
    assert timing.dropped_by_reason() == {
        "offline": [5],
        "churn": [6],
        "went-offline": [4],
        "deadline": [3],
    }


def test_over_commitment_discards_the_late_finisher():
    # k = 2 of the 7 offered: 7 finishes (at 10 s, tied with 2) but is not needed.
    timing = simulate_round(TASKS, start=1000.0, k=2, cost=COST, deadline_s=15.0)
    assert timing.accepted == (1, 2)
    assert timing.duration == 10.0
    assert Dropped(7, "over-commit", 10.0) in timing.dropped


def test_too_few_finishers_wait_for_the_deadline():
    # k = 4 but only 3 make it: the server waits until client 3 times out at 15 s.
    timing = simulate_round(TASKS, start=1000.0, k=4, cost=COST, deadline_s=15.0)
    assert timing.accepted == (1, 2, 7)
    assert timing.duration == 15.0 and timing.end == 1015.0


def test_without_a_deadline_the_slowest_client_sets_the_pace():
    timing = simulate_round(TASKS, start=1000.0, k=4, cost=COST)
    assert timing.accepted == (1, 2, 7, 3)
    assert timing.duration == 22.5
    # k = 5: only four can finish; the round ends when the last one resolves
    five = simulate_round(TASKS, start=1000.0, k=5, cost=COST)
    assert five.accepted == (1, 2, 7, 3) and five.duration == 22.5


def test_periodic_windows_reopen_in_a_later_period():
    # At t = 9200 (9200 mod 3600 = 2000) client 5's window [2000, 3000) is open,
    # so it runs its 4 s; client 4's window [900, 1003) is closed. k = 2: clients
    # 5 (4 s) and 1 (8 s) are accepted, 2 and 7 (10 s) are surplus.
    timing = simulate_round(TASKS, start=9200.0, k=2, cost=COST, deadline_s=15.0)
    assert timing.accepted == (5, 1)
    assert timing.duration == 8.0 and timing.end == 9208.0
    assert timing.dropped == (
        Dropped(4, "offline", 0.0),
        Dropped(6, "churn", 1.5),
        Dropped(2, "over-commit", 10.0),
        Dropped(7, "over-commit", 10.0),
        Dropped(3, "deadline", 15.0),
    )


def test_ties_with_the_window_end_and_the_deadline_go_to_finishing():
    # Client 8 finishes exactly when its window closes (1004 = start + 4 s);
    # client 9 finishes exactly at the deadline.
    tasks = [
        _task(8, 100, 100, 8000, 4000, ((1000.0, 1004.0),), HOUR),  # 1 + 2 + 1 = 4 s
        _task(9, 300, 100, 8000, 4000),  # 8 s
    ]
    timing = simulate_round(tasks, start=1000.0, k=2, cost=COST, deadline_s=8.0)
    assert timing.accepted == (8, 9)
    assert timing.duration == 8.0 and timing.dropped == ()


def test_overcommit_count():
    assert overcommit_count(10, 0.3) == 13  # not 14, despite 10 * 1.3 = 13.000000000000002
    assert overcommit_count(3, 1.3) == 7
    assert overcommit_count(100, 0.0) == 100
    assert overcommit_count(7, 0.1) == 8
    with pytest.raises(ConfigError, match=r"fraction >= 0.*got -0.1"):
        overcommit_count(10, -0.1)


def test_rounds_chain_on_the_clock_with_a_population():
    # Five identical always-on devices: 10 samples/s, 80 kbit/s both ways; a
    # 1,000-byte model and update each take 0.1 s; compute = samples / 10 s.
    device = DeviceProfile(10.0, 80.0, 80.0)
    syn = Synthetic(1.0, 1.0, seed=0, max_samples=200)
    population = Population(5, syn, FixedDevices(device), seed=1)
    cost = RoundCost(1_000, 1_000, 1)
    clock = 0.0
    for rnd in range(3):
        ids = population.sample(rnd, 2, available_at=clock)
        timing = simulate_round(population.tasks(ids, rnd), start=clock, k=2, cost=cost)
        slowest = max(syn.num_train_samples(int(c)) for c in ids)
        assert timing.duration == pytest.approx(0.2 + slowest / 10.0)
        assert timing.start == clock
        clock = timing.end
    assert clock > 0


def test_time_to_accuracy():
    points = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.65), (40.0, 0.8)]
    assert time_to_accuracy(points, 0.7) == 20.0
    assert time_to_accuracy(points, 0.8) == 40.0
    assert time_to_accuracy(points, 0.9) is None
    assert time_to_accuracy([], 0.1) is None
    with pytest.raises(ConfigError, match=r"finite \(time, accuracy\) pairs"):
        time_to_accuracy([(1.0, float("nan"))], 0.5)


def test_bad_round_inputs():
    with pytest.raises(ConfigError, match=r"distinct client ids"):
        simulate_round([TASKS[0], TASKS[0]], start=0.0, k=1, cost=COST)
    with pytest.raises(ConfigError, match=r"deadline: expected seconds > 0, got 0"):
        simulate_round(TASKS, start=0.0, k=1, cost=COST, deadline_s=0)
    with pytest.raises(ConfigError, match=r"model_bytes and update_bytes >= 0"):
        RoundCost(-1, 0)
    with pytest.raises(ConfigError, match=r"num_samples >= 0, got -3"):
        ClientTask(1, -3, TASKS[0].profile)
    empty = simulate_round([], start=5.0, k=3, cost=COST)
    assert empty.accepted == () and empty.duration == 0.0 and empty.end == 5.0
    assert np.isfinite(empty.end)
