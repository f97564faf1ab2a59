"""fedscale's in-process engine runs a plain Flower app with Flower's semantics."""

import numpy as np
import pytest
from flwr.common.constant import ErrorCode

from fedscale.simulations.engine import run_in_process
from tests.simulations import plain_flower_app as plain

NODES = 4
CONFIG = {"num-rounds": 3, "fail-partition": 1, "fail-round": 2}


@pytest.fixture(scope="module")
def observed():
    plain.OBSERVED["lifespan"] = 0
    run = run_in_process(plain.server_app, plain.client_app, num_nodes=NODES, run_config=CONFIG)
    return {**plain.OBSERVED, "stats": run.stats}


def _ok(replies):
    return [r for r in replies if not r.has_error()]


def test_message_ids_are_unique_and_replies_point_to_them(observed):
    all_ids = [i for r in observed["rounds"] for i in r["ids"]]
    assert len(all_ids) == len(set(all_ids)) == NODES * 3
    for rnd in observed["rounds"]:
        assert {m.metadata.reply_to_message_id for m in rnd["replies"]} == set(rnd["ids"])
        reply_ids = [m.metadata.message_id for m in rnd["replies"]]
        assert all(reply_ids) and len(set(reply_ids)) == NODES
        assert not set(reply_ids) & set(all_ids)


def test_aggregate_equals_numpy_weighted_mean_in_float64(observed):
    for server_round, rnd in enumerate(observed["rounds"], start=1):
        ok = _ok(rnd["replies"])
        pids = [int(m.content["metrics"]["partition"]) for m in ok]
        weights = np.array([p + 1 for p in pids], dtype=np.float64)
        for key in ("w", "b"):
            stacked = np.stack(
                [plain.client_values(p, server_round)[key].astype(np.float64) for p in pids]
            )
            expected = np.average(stacked, axis=0, weights=weights)
            got = rnd["aggregate"][key]
            assert got.dtype == plain.client_values(0, 1)[key].dtype
            np.testing.assert_allclose(got, expected, rtol=1e-6 if key == "b" else 1e-12)


def test_a_raising_client_app_yields_an_error_reply_and_the_rest_aggregate(observed):
    second = observed["rounds"][1]
    errors = [m for m in second["replies"] if m.has_error()]
    assert len(errors) == 1
    assert errors[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION == 2
    assert "planned failure" in errors[0].error.reason
    assert len(_ok(second["replies"])) == NODES - 1
    assert second["aggregate"] is not None
    assert observed["stats"].errors == 1


def test_context_state_carries_across_rounds_and_a_failed_call_is_discarded(observed):
    for server_round, rnd in enumerate(observed["rounds"], start=1):
        for m in _ok(rnd["replies"]):
            pid = int(m.content["metrics"]["partition"])
            failed_before = pid == 1 and server_round > 2
            assert m.content["metrics"]["calls"] == server_round - failed_before


def test_mods_and_lifespan_run_for_every_message(observed):
    for rnd in observed["rounds"]:
        assert all(m.content["metrics"]["via-mod"] == 1 for m in _ok(rnd["replies"]))
    assert observed["lifespan"] == NODES * 3


def test_one_nodes_in_place_edit_never_reaches_another(observed):
    for rnd in observed["rounds"]:
        assert {m.content["metrics"]["received-w0"] for m in _ok(rnd["replies"])} == {
            rnd["global_w0"]
        }


def test_the_cli_runs_a_third_party_app(tmp_path):
    from typer.testing import CliRunner

    from fedscale.cli.main import app

    plain.OBSERVED["rounds"] = []
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--server-app",
            "tests.simulations.plain_flower_app:server_app",
            "--client-app",
            "tests.simulations.plain_flower_app:client_app",
            "--clients",
            "3",
            "--run-config",
            "num-rounds=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(plain.OBSERVED["rounds"]) == 2
    assert all(len(_ok(r["replies"])) == 3 for r in plain.OBSERVED["rounds"])


def test_the_runs_thread_cap_covers_torch_and_native_pools_and_is_undone():
    import torch
    from threadpoolctl import threadpool_info

    from fedscale.simulations.engine import _torch_threads

    def pools() -> dict[str, int]:
        return {p["internal_api"]: p["num_threads"] for p in threadpool_info()}

    before_torch, before_pools = torch.get_num_threads(), pools()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
        assert pools() and all(n == 1 for n in pools().values()), pools()
    assert torch.get_num_threads() == before_torch
    assert pools() == before_pools
    # A cap never adds threads: BLAS already at one stays at one under a larger cap
    # (OpenMP is torch's own pool: torch_threads sets it).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), _torch_threads(64):
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(n == 1 for n in blas), blas
    assert pools() == before_pools
    with pytest.raises(ValueError, match="expected an integer >= 1 or None, got 0"):
        with _torch_threads(0):
            pass
