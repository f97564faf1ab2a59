"""``fedscale edge-client``: a Flower SuperNode that trains with fedscale's ClientApp.

The SuperNode connects to the server's SuperLink, receives each run's app bundle
and runs fedscale's ClientApp (from the fedscale installed on this device) in a
subprocess for every message. What the node trains on is its ``node_config``:
a demo partition (``--partition-id``/``--num-partitions``) or the device's own
data (``--data-path``), plus the device to train on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedscale.exceptions import ConfigError
from fedscale.processes import flower_executable, is_loopback, split_address
from fedscale.settings import parse_device_name

__all__ = ["EdgeClientOptions", "node_config_arg", "supernode_argv"]


@dataclass(frozen=True)
class EdgeClientOptions:
    """One edge device's SuperNode."""

    server: str
    clientappio_port: int
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    device: str | None = None
    insecure: bool = False
    max_wait_time: float | None = None

    def __post_init__(self) -> None:
        host, _ = split_address(self.server)
        if not is_loopback(host) and not self.insecure:
            raise ConfigError(
                f"server: expected a loopback address for a plaintext connection, got "
                f"{self.server!r}; pass --insecure to connect without TLS"
            )
        has_partition = self.partition_id is not None or self.num_partitions is not None
        if has_partition == (self.data_path is not None):
            raise ConfigError(
                "edge client data: expected either --data-path FILE or both "
                "--partition-id and --num-partitions, got "
                + ("both" if has_partition else "neither")
            )
        if has_partition:
            if self.partition_id is None or self.num_partitions is None:
                raise ConfigError(
                    "edge client data: expected both --partition-id and --num-partitions"
                )
            if not 0 <= self.partition_id < self.num_partitions:
                raise ConfigError(
                    f"--partition-id: expected 0 <= id < --num-partitions "
                    f"({self.num_partitions}), got {self.partition_id}"
                )
        if self.data_path is not None and not Path(self.data_path).is_file():
            raise ConfigError(f"--data-path: expected a file, found nothing at {self.data_path}")
        if self.device is not None:
            parse_device_name(self.device)

    @property
    def node_config(self) -> dict[str, str | int]:
        """The SuperNode's ``node_config`` (read by fedscale.node_data)."""
        config: dict[str, str | int] = {}
        if self.data_path is not None:
            config["data-path"] = str(Path(self.data_path).absolute())
        else:
            assert self.partition_id is not None and self.num_partitions is not None
            config["partition-id"] = self.partition_id
            config["num-partitions"] = self.num_partitions
        if self.device is not None:
            config["device"] = self.device
        return config


def node_config_arg(config: Mapping[str, str | int | float]) -> str:
    """Format ``--node-config`` as Flower parses it: ``k=v`` pairs, TOML values."""
    # json.dumps of a str is a valid TOML basic string (quotes and escapes).
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in config.items())


def supernode_argv(options: EdgeClientOptions) -> list[str]:
    """Return the ``flower-supernode`` command line for ``options``."""
    argv = [
        flower_executable("flower-supernode"),
        "--insecure",
        "--superlink",
        options.server,
        "--port",
        str(options.clientappio_port),
        "--node-config",
        node_config_arg(options.node_config),
    ]
    if options.max_wait_time is not None:
        argv += ["--max-wait-time", str(options.max_wait_time)]
    return argv
