"""Scenario files: a simulated federation's settings in one TOML file.

A scenario is a flat TOML table whose keys are the run-config keys of
:class:`fedscale.settings.RunSettings` (``num-clients``, ``clients-per-round``,
``dataset``, ``device-mix``, ...), so the same file is also a valid
``flwr run --run-config FILE`` override for fedscale's app. Keys it leaves out
keep their defaults. The scenarios shipped with fedscale live beside this module
(``simulations/*.toml``) and can be named without their folder and suffix::

    fedscale simulate simulations/cross-device-100k.toml --rounds 5
    fedscale simulate cross-device-100k --rounds 5      # the same file

Options given on the command line win over the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedscale.exceptions import ConfigError
from fedscale.settings import RunSettings

__all__ = [
    "SCENARIO_DIR",
    "load_scenario",
    "read_scenario",
    "resolve_scenario",
    "shipped_scenarios",
]

SCENARIO_DIR = Path(__file__).resolve().parent


def shipped_scenarios() -> list[str]:
    """Return the names of the scenarios shipped with fedscale."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def resolve_scenario(name_or_path: str | Path) -> Path:
    """Return the file a scenario argument names: a path, or a shipped scenario's name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SCENARIO_DIR / f"{path.name}.toml"
    if path.suffix == "" and path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(
        f"scenario: expected a .toml file or one of the shipped scenarios "
        f"({', '.join(shipped_scenarios())}), got {str(name_or_path)!r} (no such file)"
    )


def read_scenario(name_or_path: str | Path) -> dict[str, Any]:
    """Read and check a scenario file; return its run-config mapping (kebab-case keys)."""
    path = resolve_scenario(name_or_path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"scenario {path}: expected a readable UTF-8 file, got: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"scenario {path}: expected valid TOML, got: {err}") from err
    allowed = sorted(f.name.replace("_", "-") for f in fields(RunSettings))
    tables = sorted(k for k, v in doc.items() if isinstance(v, dict))
    if tables:
        raise ConfigError(
            f"scenario {path}: expected top-level `key = value` settings only, got the "
            f"table(s) {', '.join(tables)}; allowed keys are: {', '.join(allowed)}"
        )
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ConfigError(
            f"scenario {path}: unknown key(s) {', '.join(unknown)}; "
            f"allowed keys are: {', '.join(allowed)}"
        )
    return doc


def load_scenario(name_or_path: str | Path, **overrides: Any) -> RunSettings:
    """Return the settings a scenario file describes, with ``overrides`` (field names) applied."""
    doc = read_scenario(name_or_path)
    try:
        settings = RunSettings.from_run_config(doc)
    except ConfigError as err:
        raise ConfigError(f"scenario {resolve_scenario(name_or_path)}: {err}") from None
    return settings.replace(**overrides) if overrides else settings
