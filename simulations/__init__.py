"""Simulating federations: fedscale's in-process engine and the Ray adapter.

Installed as ``fedscale.simulations``. ``simulate(...)`` runs fedscale's apps;
``run_apps(...)`` runs any Flower ServerApp and ClientApp pair.
"""

from .api import SimulationResult, run_apps, simulate

__all__ = ["SimulationResult", "run_apps", "simulate"]
