"""``fedscale certs``: a development CA and server certificate, or SuperNode key pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["certs", "register"]


def register(app: typer.Typer) -> None:
    """Add ``fedscale certs`` to ``app``."""
    app.command("certs")(certs)


def certs(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder to write the files to (created if missing).", show_default=False
        ),
    ],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A name or IP address clients reach the server by (repeatable); "
            "127.0.0.1, ::1 and localhost are always in the certificate.",
            show_default=False,
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days the certificates are valid.")] = 365,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="Make only this SuperNode's authentication key pair, NAME.key and NAME.pub "
            "(repeatable).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace files that exist (by default nothing is overwritten).")
    ] = False,
) -> None:
    """Make a development CA and server certificate for TLS, or SuperNode key pairs.

    Without --node: ca.crt, ca.key, server.pem and server.key, for
    `fedscale server --certificates DIR` and `fedscale edge-client
    --root-certificates DIR/ca.crt`. With --node NAME: NAME.key (for
    `fedscale edge-client --auth-key`) and NAME.pub (for `fedscale server --auth-keys`).
    """
    from fedscale.certs import create_certificates, create_node_keys
    from fedscale.exceptions import ConfigError

    from .main import _errors, stdout

    with _errors():
        if node:
            if host:
                raise ConfigError(
                    "--host: expected no --host with --node (a node key pair names no host), "
                    f"got --host {' '.join(host)}"
                )
            # All names are checked (and existing files refused) before any key is written.
            if len(set(node)) != len(node):
                raise ConfigError(f"--node: expected distinct names, got {', '.join(node)}")
            for name in node:
                _check_free(directory, name, force)
            for name in node:
                keys = create_node_keys(directory, name, force=force)
                stdout.print(
                    f"node {name}: private key {keys.private_key} (edge-client --auth-key), "
                    f"public key {keys.public_key} (server --auth-keys)",
                    soft_wrap=True,
                    highlight=False,
                )
            return
        files = create_certificates(directory, hosts=host or (), days=days, force=force)
        stdout.print(
            f"CA certificate {files.ca_cert} (edge-client --root-certificates); server "
            f"certificate {files.server_cert} and key {files.server_key} "
            f"(server --certificates {directory})",
            soft_wrap=True,
            highlight=False,
        )


def _check_free(directory: Path, name: str, force: bool) -> None:
    from fedscale.certs import node_key_files

    node_key_files(directory, name, force=force)
