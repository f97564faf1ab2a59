"""Simulating federations: fedscale's in-process engine and the Ray adapter.

Installed as ``fedscale.simulations``. ``simulate(...)`` runs fedscale's apps;
``run_apps(...)`` runs any Flower ServerApp and ClientApp pair;
``load_scenario(...)`` reads a scenario file (``simulations/*.toml``) into settings.
"""

from .api import SimulationResult, run_apps, simulate
from .scenarios import load_scenario

__all__ = ["SimulationResult", "load_scenario", "run_apps", "simulate"]
