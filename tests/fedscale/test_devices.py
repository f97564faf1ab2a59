"""Device profiles: availability windows, trace files (good and bad rows), built-in mixes."""

import json
import math

import numpy as np
import pytest

from fedscale.devices import (
    BUILTIN_MIXES,
    DAY_S,
    Availability,
    DeviceProfile,
    FixedDevices,
    builtin_mix,
    churn_interruptions,
    device_source,
    load_trace,
)
from fedscale.exceptions import ConfigError

# ------------------------------------------------------------------ availability


def test_always_online_without_windows():
    a = Availability()
    assert a.always_online and a.is_online(0.0) and a.is_online(1e9)
    assert a.online_until(123.0) == math.inf


def test_periodic_windows_by_hand():
    a = Availability(((0.0, 100.0), (200.0, 300.0)), period_s=400.0)
    assert a.online_until(50.0) == 100.0
    assert a.online_until(150.0) == 150.0 and not a.is_online(150.0)
    assert a.online_until(450.0) == 500.0  # second period, first window
    assert a.online_until(1_000.0) == 1_100.0  # 1000 = 2 * 400 + 200
    assert not a.is_online(100.0)  # windows are [start, end)
    assert a.is_online(200.0)


def test_windows_touching_across_the_period_boundary_are_one_session():
    a = Availability(((0.0, 50.0), (350.0, 400.0)), period_s=400.0)
    assert a.online_until(360.0) == 450.0
    assert a.online_until(760.0) == 850.0
    b = Availability(((0.0, 200.0), (200.0, 400.0)), period_s=400.0)
    assert b.online_until(10.0) == math.inf  # covers the whole period


def test_absolute_windows_end_for_good():
    a = Availability(((10.0, 20.0), (30.0, 40.0)))
    assert a.online_until(15.0) == 20.0 and a.online_until(35.0) == 40.0
    assert not a.is_online(5.0) and not a.is_online(1_000.0)


@pytest.mark.parametrize(
    ("windows", "period", "message"),
    [
        (((5.0, 3.0),), None, r"0 <= start < end, got 5.0-3.0"),
        (((-1.0, 3.0),), None, r"0 <= start < end"),
        (((0.0, 10.0), (5.0, 20.0)), None, r"sorted, non-overlapping windows"),
        (((0.0, 500.0),), 400.0, r"within the period \[0, 400.0\], got 0.0-500.0"),
        ((), 0.0, r"period_s > 0, got 0.0"),
    ],
)
def test_bad_availability(windows, period, message):
    with pytest.raises(ConfigError, match=message):
        Availability(windows, period)


# ------------------------------------------------------------------ trace files

CSV_GOOD = """client_id,compute_speed,download_kbps,upload_kbps,availability,period_s,churn_per_hour
0,50,20000,5000,,,
1,12.5,3000,800,0-3600;7200-10800,86400,0.1

2, 100 ,1e4,2.5e3,100-200,,
"""


def test_csv_trace_good_rows(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text(CSV_GOOD)
    trace = load_trace(path)
    assert len(trace) == 3 and trace.client_ids == (0, 1, 2)
    assert trace.profile(0) == DeviceProfile(50.0, 20000.0, 5000.0, Availability(), 0.0)
    assert trace.profile(1) == DeviceProfile(
        12.5, 3000.0, 800.0, Availability(((0.0, 3600.0), (7200.0, 10800.0)), 86400.0), 0.1
    )
    assert trace.profile(2) == DeviceProfile(
        100.0, 10000.0, 2500.0, Availability(((100.0, 200.0),))
    )
    # ids the file lacks wrap around in file order
    assert trace.profile(4) == trace.profile(1)
    online = trace.online(np.array([0, 1, 2, 5]), 150.0)
    assert online.tolist() == [True, True, True, True]
    assert trace.online(np.array([1, 2]), 5_000.0).tolist() == [False, False]
    assert device_source(str(path)).profile(1) == trace.profile(1)
    assert trace.profiles(np.array([2, 0, 4])) == [trace.rows[2], trace.rows[0], trace.rows[1]]


def test_json_trace_matches_the_csv(tmp_path):
    doc = {
        "clients": [
            {"client_id": 0, "compute_speed": 50, "download_kbps": 20000, "upload_kbps": 5000},
            {
                "client_id": 1,
                "compute_speed": 12.5,
                "download_kbps": 3000,
                "upload_kbps": 800,
                "availability": [[0, 3600], [7200, 10800]],
                "period_s": 86400,
                "churn_per_hour": 0.1,
            },
            {
                "client_id": 2,
                "compute_speed": 100,
                "download_kbps": 1e4,
                "upload_kbps": 2.5e3,
                "availability": [[100, 200]],
                "period_s": None,
            },
        ]
    }
    (tmp_path / "d.json").write_text(json.dumps(doc))
    (tmp_path / "d.csv").write_text(CSV_GOOD)
    from_json, from_csv = load_trace(tmp_path / "d.json"), load_trace(tmp_path / "d.csv")
    assert from_json.rows == from_csv.rows
    (tmp_path / "list.json").write_text(json.dumps(doc["clients"]))
    assert load_trace(tmp_path / "list.json").rows == from_csv.rows


def test_wrap_false_makes_a_missing_client_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV_GOOD)
    with pytest.raises(ConfigError, match=r"expected a row for client 7, the file has 3 rows"):
        load_trace(path, wrap=False).profile(7)


HEADER = "client_id,compute_speed,download_kbps,upload_kbps,availability,period_s\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"expected a header row, the file is empty"),
        (HEADER, r"expected at least one client row, got none"),
        ("client_id,compute_speed,download_kbps\n0,1,2\n", r"missing upload_kbps"),
        (HEADER.replace("period_s", "period") + "0,1,1,1,,\n", r"unknown period"),
        (HEADER + "0,fast,1,1,,\n", r"line 2: expected a number for compute_speed, got 'fast'"),
        (HEADER + "0,1,1,1,,\n1,0,1,1,,\n", r"line 3: expected compute_speed > 0, got '0'"),
        (HEADER + "0,1,-5,1,,\n", r"line 2: expected download_kbps > 0, got '-5'"),
        (HEADER + "0,1,1,nan,,\n", r"expected a finite number for upload_kbps"),
        (HEADER + "0,1,1,1,5-3,\n", r"line 2: availability: expected windows with 0 <= start"),
        (HEADER + "0,1,1,1,0-10;5-20,\n", r"line 2: availability: expected sorted"),
        (HEADER + "0,1,1,1,0-500,400\n", r"line 2: availability: expected windows within"),
        (HEADER + "0,1,1,1,0:10,\n", r"line 2: expected availability as start-end windows"),
        (HEADER + "0,1,1,1,,\n0,2,2,2,,\n", r"line 3: expected unique client ids.*line 2"),
        (HEADER + "0,1,1,1\n", r"line 2: expected 6 values .*got 4"),
        (HEADER + "-1,1,1,1,,\n", r"expected client_id to be an integer >= 0, got '-1'"),
        (HEADER + "1.5,1,1,1,,\n", r"expected client_id to be an integer >= 0, got '1.5'"),
        (HEADER + "0,1,1,1,,-3\n", r"expected period_s > 0, got '-3'"),
    ],
)
def test_bad_csv_rows_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "devices.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_trace(path)


def _client(**fields):
    row = {"client_id": 0, "compute_speed": 1, "download_kbps": 1, "upload_kbps": 1}
    row.update(fields)
    return row


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", r"expected valid JSON"),
        ('{"devices": []}', r'expected \{"clients": \[...\]\} or a list'),
        ('{"clients": [1]}', r"clients\[0\]: expected an object, got int"),
        (json.dumps([_client(compute_speed=True)]), r"expected a number for compute_speed"),
        (json.dumps([_client(availability=[[0, 1, 2]])]), r"got the window \[0, 1, 2\]"),
        (json.dumps([_client(availability=5)]), r"or a list of \[start, end\], got 5"),
        (json.dumps([_client(client_id="a")]), r"client_id to be an integer >= 0, got 'a'"),
        (json.dumps([_client(churn_per_hour=-1)]), r"churn_per_hour >= 0"),
        (json.dumps([_client(), _client(speed=3)]), r"clients\[1\].*unknown speed"),
    ],
)
def test_bad_json_rows_are_clear_errors(tmp_path, doc, message):
    path = tmp_path / "devices.json"
    path.write_text(doc)
    with pytest.raises(ConfigError, match=message):
        load_trace(path)


def test_bad_trace_paths_and_specs(tmp_path):
    with pytest.raises(ConfigError, match=r"expected a file at .*missing.csv"):
        load_trace(tmp_path / "missing.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"expected a .csv or .json file, got 'd.txt'"):
        load_trace(tmp_path / "d.txt")
    with pytest.raises(ConfigError, match=r"expected one of uniform, mobile-always-on, mobile"):
        device_source("laptops")


# ------------------------------------------------------------------ built-in mixes


def test_mix_draws_are_per_client_and_the_vectorised_path_agrees():
    mix = builtin_mix("mobile", seed=4)
    ids = np.array([0, 5, 17, 123_456, 999_999])
    batch = mix.profiles(ids)
    assert batch == [builtin_mix("mobile", seed=4).profile(int(c)) for c in ids]
    assert mix.profile(5) != mix.profile(6)
    assert mix.profile(5) != builtin_mix("mobile", seed=5).profile(5)
    rng = np.random.default_rng(0)
    many = np.arange(2_000)
    profiles = mix.profiles(many)
    for t in rng.uniform(0, 3 * DAY_S, size=5):
        expected = [p.availability.is_online(float(t)) for p in profiles]
        assert mix.online(many, float(t)).tolist() == expected


def test_mobile_mix_follows_its_documented_laws():
    mix = builtin_mix("mobile", seed=0)
    table = mix.table(np.arange(20_000))
    speed = table["samples_per_second"]
    assert np.median(speed) == pytest.approx(1 / (0.005 * math.e), rel=0.03)
    assert np.std(np.log(speed)) == pytest.approx(0.6, rel=0.04)
    assert np.median(table["download_kbps"]) == pytest.approx(10_000, rel=0.04)
    assert np.std(np.log(table["download_kbps"])) == pytest.approx(1.0, rel=0.04)
    ratio = table["upload_kbps"] / table["download_kbps"]
    assert np.median(ratio) == pytest.approx(0.3, rel=0.04)
    hours = table["window_length"] / 3600
    assert hours.min() >= 0.25 and hours.max() <= 24
    assert np.median(hours) == pytest.approx(4.0, rel=0.05)
    # a uniform phase: the online fraction at any time is the mean window share
    share = float(np.mean(table["window_length"] / DAY_S))
    for t in (0.0, 7 * 3600.0, 19 * 3600.0):
        assert np.mean(mix.online(np.arange(20_000), t)) == pytest.approx(share, abs=0.015)
    assert 0.15 < share < 0.3


def test_always_on_and_uniform_mixes():
    always = builtin_mix("mobile-always-on")
    assert always.online(np.arange(1000), 12345.0).all()
    assert always.profile(3).availability.always_online
    uniform = builtin_mix("uniform")
    assert len({uniform.profile(c) for c in range(50)}) == 1
    assert set(BUILTIN_MIXES) == {"uniform", "mobile-always-on", "mobile"}


def test_fixed_devices():
    device = DeviceProfile(10.0, 100.0, 50.0, Availability(((0.0, 10.0),), 100.0))
    fixed = FixedDevices(device)
    assert fixed.profile(9) is device
    assert fixed.online(np.arange(3), 5.0).tolist() == [True] * 3
    assert fixed.online(np.arange(3), 50.0).tolist() == [False] * 3
    with pytest.raises(ConfigError, match=r"client id: expected an integer >= 0, got -2"):
        fixed.profile(-2)


def test_churn_is_exponential_per_client_and_round():
    ids = np.arange(50_000)
    first = churn_interruptions(0, ids, 1, 2.0)
    assert np.array_equal(first, churn_interruptions(0, ids, 1, 2.0))
    assert not np.array_equal(first, churn_interruptions(0, ids, 2, 2.0))
    # rate 2 per hour: mean 1,800 s, and P(T > 1 h) = e^-2
    assert np.mean(first) == pytest.approx(1_800, rel=0.02)
    assert np.mean(first > 3_600) == pytest.approx(math.exp(-2), abs=0.01)
    assert np.all(np.isinf(churn_interruptions(0, ids[:10], 1, 0.0)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DeviceProfile(0.0, 1.0, 1.0), r"samples_per_second > 0, got 0.0"),
        (lambda: DeviceProfile(1.0, math.inf, 1.0), r"download_kbps > 0, got inf"),
        (lambda: DeviceProfile(1.0, 1.0, 1.0, churn_per_hour=-1), r"churn_per_hour >= 0"),
    ],
)
def test_bad_profiles(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
