"""Flower app metadata: the ``pyproject.toml`` that makes fedscale a Flower app.

``fedscale server`` and the Ray engine hand Flower an app directory holding only
this file. Its ``[tool.flwr.app.config]`` is the run config every node's
``Context`` receives; its components name the ServerApp and ClientApp, which
Flower imports from the installed fedscale package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CLIENT_APP_REF", "SERVER_APP_REF", "app_pyproject", "write_app_dir"]

SERVER_APP_REF = "fedscale.server.app:app"
CLIENT_APP_REF = "fedscale.edge_client.app:app"


def app_pyproject(
    run_config: Mapping[str, Any],
    *,
    name: str = "fedscale-run",
    server_app: str = SERVER_APP_REF,
    client_app: str = CLIENT_APP_REF,
) -> dict[str, Any]:
    """Return the ``pyproject.toml`` content of a Flower app as a dict."""
    from fedscale import __version__

    return {
        "project": {"name": name, "version": __version__, "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedscale",
                    "components": {"serverapp": server_app, "clientapp": client_app},
                    "config": dict(run_config),
                }
            }
        },
    }


def write_app_dir(directory: str | Path, run_config: Mapping[str, Any], **kwargs: Any) -> Path:
    """Write a Flower app directory holding only ``pyproject.toml``; return its path."""
    import tomli_w

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    content = app_pyproject(run_config, **kwargs)
    (path / "pyproject.toml").write_text(tomli_w.dumps(content), encoding="utf-8")
    return path
