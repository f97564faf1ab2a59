"""Byzantine clients: who they are, and what fedscale's ClientApp sends when it is one."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedscale.attacks import Attack, byzantine_count, is_byzantine
from fedscale.edge_client.app import app
from fedscale.exceptions import ConfigError
from fedscale.models import build_model
from fedscale.records import arrays_to_state_dict, state_dict_to_arrays
from fedscale.settings import RunSettings
from fedscale.simulations import simulate

from .messages import incoming_message

NUM = 10


def _byzantine_set(seed: int, n: int, fraction: float) -> set[int]:
    return {p for p in range(n) if is_byzantine(seed, p, n, fraction)}


@pytest.mark.parametrize("n", [1, 3, 10, 101, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_the_byzantine_set_has_the_rounded_fraction_of_clients(n, fraction):
    chosen = _byzantine_set(11, n, fraction)
    assert len(chosen) == byzantine_count(fraction, n) == int(np.floor(fraction * n + 0.5))


def test_the_byzantine_set_is_a_function_of_seed_and_partition_only():
    first = _byzantine_set(4, 200, 0.2)
    assert _byzantine_set(4, 200, 0.2) == first
    assert _byzantine_set(5, 200, 0.2) != first  # another run, other attackers
    # A larger fraction keeps the attackers of a smaller one (a prefix of one permutation).
    assert first <= _byzantine_set(4, 200, 0.3)
    with pytest.raises(ConfigError, match=r"partition-id: expected an id in 0..199"):
        is_byzantine(4, 200, 200, 0.2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("flip", r"attack: expected '' \(none\) or one of sign-flip, scale:<factor>"),
        ("scale:", r"attack: expected"),
        ("scale:1", r"a finite factor other than 1"),
        ("noise:0", r"noise:<std> with a finite std > 0"),
        ("noise:-1", r"noise:<std> with a finite std > 0"),
    ],
)
def test_bad_attacks_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings(attack=spec, attack_fraction=0.2)


def test_attack_and_fraction_come_together():
    with pytest.raises(ConfigError, match=r"attack-fraction: expected a fraction > 0"):
        RunSettings(attack="sign-flip")
    with pytest.raises(ConfigError, match=r"attack-fraction: expected 0 unless attack is set"):
        RunSettings(attack_fraction=0.2)
    with pytest.raises(ConfigError, match=r"attack-fraction: expected a fraction of the clients"):
        RunSettings(attack="sign-flip", attack_fraction=1.5)
    assert Attack.parse("scale:-4") == Attack("scale", -4.0)
    assert Attack.parse("noise:1e-2") == Attack("noise", 0.01)


# ------------------------------------------------------------------ the ClientApp


def _reply(
    settings: RunSettings,
    partition_id: int | None,
    server_round: int = 3,
    node_config: dict[str, object] | None = None,
):
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    config = ConfigRecord(
        {
            "lr": 0.1,
            "local-epochs": 1,
            "batch-size": 16,
            "num-classes": 10,
            "server-round": server_round,
        }
    )
    arrays = state_dict_to_arrays(model.state_dict())
    if node_config is None:
        node_config = {"partition-id": partition_id, "num-partitions": NUM}
    context = Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    reply = app(incoming_message(RecordDict({"arrays": arrays, "config": config})), context)
    received = {k: v.numpy() for k, v in arrays_to_state_dict(arrays).items()}
    sent = {k: v.numpy() for k, v in arrays_to_state_dict(reply.content["arrays"]).items()}
    return received, sent


HONEST = RunSettings(num_clients=NUM, local_epochs=1, seed=2)


def _attacked(spec: str) -> tuple[RunSettings, int, int]:
    settings = HONEST.replace(attack=spec, attack_fraction=0.3)
    byzantine = sorted(_byzantine_set(settings.seed, NUM, 0.3))
    honest = sorted(set(range(NUM)) - set(byzantine))
    assert len(byzantine) == 3
    return settings, byzantine[0], honest[0]


@pytest.mark.parametrize(
    ("spec", "factor"), [("sign-flip", -1.0), ("scale:-4", -4.0), ("scale:3.5", 3.5)]
)
def test_a_byzantine_clients_update_is_exactly_the_honest_one_flipped_or_scaled(spec, factor):
    settings, bad, good = _attacked(spec)
    received, honest = _reply(HONEST, bad)
    _, attacked = _reply(settings, bad)
    for key, g in received.items():
        delta = honest[key] - g
        assert np.any(delta != 0)
        expected = g + delta * np.float32(factor) if factor != -1.0 else g + -delta
        assert attacked[key].dtype == g.dtype
        np.testing.assert_array_equal(attacked[key], expected)
    # An honest client of the same attacked run sends its honest update, bit for bit.
    _, honest_good = _reply(HONEST, good)
    _, attacked_run_good = _reply(settings, good)
    for key in received:
        np.testing.assert_array_equal(attacked_run_good[key], honest_good[key])


def test_noise_replaces_the_update_with_seeded_gaussian_noise():
    settings, bad, _ = _attacked("noise:0.5")
    received, honest = _reply(HONEST, bad)
    _, first = _reply(settings, bad)
    _, again = _reply(settings, bad)
    _, next_round = _reply(settings, bad, server_round=4)
    noise = np.concatenate([(first[k] - received[k]).ravel() for k in received])
    assert abs(noise.std() - 0.5) < 0.02 and abs(noise.mean()) < 0.02
    for key in received:
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], next_round[key])
        assert not np.allclose(first[key], honest[key])


def test_an_attack_needs_a_partition_id(tmp_path):
    """A device with its own data has no place in the Byzantine set: a clear error."""
    settings, _, _ = _attacked("sign-flip")
    rng = np.random.default_rng(0)
    data = tmp_path / "device.npz"
    np.savez(data, x=rng.random((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    with pytest.raises(ConfigError, match=r"expected a node with an integer partition-id"):
        _reply(settings, None, node_config={"data-path": str(data)})
    _reply(HONEST, None, node_config={"data-path": str(data)})  # no attack: it trains


# ------------------------------------------------------------------ whole runs


def test_attacked_and_fedprox_runs_leave_the_cohort_fast_path(tmp_path):
    """Both train one by one whatever fast_path says.

    The cohort path knows nothing of attacks or proximal terms: had it trained
    these runs, they would match the plain run, not the one-by-one run.
    """
    common = {
        "clients": 8,
        "clients_per_round": 4,
        "num_rounds": 2,
        "local_epochs": 1,
        "export_onnx": False,
        "device": "cpu",
    }
    plain = simulate(out=str(tmp_path / "plain"), **common).rounds
    for name, extra in (
        ("attack", {"attack": "scale:-3", "attack_fraction": 0.25}),
        ("fedprox", {"strategy": "fedprox", "strategy_args": "proximal-mu=0.5"}),
    ):
        runs = [
            simulate(out=str(tmp_path / f"{name}-{fast}"), fast_path=fast, **common, **extra)
            for fast in (True, False)
        ]
        fast_rows, slow_rows = (r.rounds for r in runs)
        assert [r["loss"] for r in fast_rows] == [r["loss"] for r in slow_rows], name
        assert [r["train_loss"] for r in fast_rows] == [r["train_loss"] for r in slow_rows], name
        assert [r["loss"] for r in fast_rows][1:] != [r["loss"] for r in plain][1:], name
