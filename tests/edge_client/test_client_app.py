"""fedscale's ClientApp, called directly as Flower calls it: app(message, context)."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedscale.edge_client.app import app
from fedscale.edge_client.supernode import (
    EdgeClientOptions,
    node_config_arg,
    supernode_argv,
)
from fedscale.exceptions import ConfigError, DataError
from fedscale.models import build_model
from fedscale.records import arrays_to_state_dict, state_dict_to_arrays
from fedscale.settings import RunSettings

from .messages import incoming_message

SETTINGS = RunSettings(local_epochs=1)


def _context(node_config, settings=SETTINGS) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )


def _global(shape=(1, 8, 8), classes=10) -> tuple[torch.nn.Module, RecordDict]:
    model = build_model("mlp", shape, classes, seed=0)
    config = ConfigRecord(
        {
            "lr": 0.1,
            "local-epochs": 1,
            "batch-size": 16,
            "num-classes": classes,
            "server-round": 1,
        }
    )
    return model, RecordDict({"arrays": state_dict_to_arrays(model.state_dict()), "config": config})


def test_train_on_a_partition_replies_with_new_arrays_and_num_examples():
    model, content = _global()
    reply = app(incoming_message(content), _context({"partition-id": 3, "num-partitions": 10}))
    assert reply.metadata.reply_to_message_id == "m-1" and not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] in (143, 144)
    assert metrics["train-loss"] > 0
    new = arrays_to_state_dict(reply.content["arrays"])
    assert list(new) == list(model.state_dict())
    assert not torch.equal(new["net.1.weight"], model.state_dict()["net.1.weight"])


def test_same_round_and_partition_train_identically():
    _, content = _global()
    a = app(incoming_message(content), _context({"partition-id": 1, "num-partitions": 5}))
    b = app(incoming_message(content), _context({"partition-id": 1, "num-partitions": 5}))
    for key, value in a.content["arrays"].items():
        assert value.data == b.content["arrays"][key].data


def test_train_on_the_devices_own_data_file(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.random((40, 1, 8, 8)), y=rng.integers(0, 10, 40))
    _, content = _global()
    reply = app(
        incoming_message(content),
        _context({"data-path": str(tmp_path / "mine.npz"), "device": "cpu"}),
    )
    assert reply.content["metrics"]["num-examples"] == 40


def test_evaluate_reports_loss_and_accuracy():
    _, content = _global()
    reply = app(
        incoming_message(content, "evaluate"),
        _context({"partition-id": 0, "num-partitions": 4}),
    )
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0 and metrics["eval-loss"] > 0
    assert metrics["num-examples"] == 90


@pytest.mark.parametrize(
    ("node_config", "error", "message"),
    [
        (
            {},
            ConfigError,
            r"expected data-path, or both partition-id and num-partitions; got nothing",
        ),
        (
            {"partition-id": 5, "num-partitions": 5},
            ConfigError,
            r"0 <= partition-id < num-partitions",
        ),
        (
            {"data-path": "/nonexistent/x.npz"},
            DataError,
            r"expected a file at /nonexistent/x.npz",
        ),
    ],
)
def test_bad_node_config_is_a_clear_error(node_config, error, message):
    _, content = _global()
    with pytest.raises(error, match=message):
        app(incoming_message(content), _context(node_config))


def test_device_data_that_does_not_fit_the_global_model_is_refused(tmp_path):
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 3)), y=np.array([0, 1, 2, 11]))
    _, content = _global()
    with pytest.raises(DataError, match=r"expected labels below 10 .* got label 11"):
        app(incoming_message(content), _context({"data-path": str(tmp_path / "wide.npz")}))


def test_an_incomplete_run_config_is_refused():
    _, content = _global()
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ConfigError, match="expected all of fedscale's keys"):
        app(incoming_message(content), context)


def test_supernode_command_line(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 2)), y=np.zeros(2))
    options = EdgeClientOptions(
        server="127.0.0.1:9092",
        clientappio_port=9999,
        data_path=str(data),
        device="cpu",
    )
    argv = supernode_argv(options)
    assert argv[1:6] == [
        "--insecure",
        "--superlink",
        "127.0.0.1:9092",
        "--port",
        "9999",
    ]
    assert argv[-1] == f'data-path="{data}" device="cpu"'
    assert (
        node_config_arg({"partition-id": 2, "num-partitions": 3})
        == "partition-id=2 num-partitions=3"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"server": "10.0.0.5:9092", "partition_id": 0, "num_partitions": 2},
            r"loopback .*pass --insecure",
        ),
        (
            {"server": "127.0.0.1:9092"},
            r"either --data-path FILE or both --partition-id and --num-partitions, got neither",
        ),
        (
            {"server": "127.0.0.1:9092", "partition_id": 0},
            r"expected both --partition-id and --num-partitions",
        ),
        (
            {"server": "127.0.0.1:9092", "partition_id": 3, "num_partitions": 3},
            r"0 <= id < --num-partitions \(3\), got 3",
        ),
        ({"server": "127.0.0.1", "partition_id": 0, "num_partitions": 2}, r"HOST:PORT"),
        (
            {
                "server": "127.0.0.1:1",
                "partition_id": 0,
                "num_partitions": 2,
                "device": "tpu",
            },
            r"device: expected",
        ),
    ],
)
def test_bad_edge_client_options_are_clear_errors(kwargs, message):
    from fedscale.exceptions import FedscaleError

    with pytest.raises(FedscaleError, match=message):
        EdgeClientOptions(clientappio_port=1, **kwargs)
