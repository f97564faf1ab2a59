"""fedscale: federated and edge learning on Flower.

The library layer: datasets, partitioners, models, training, records, run
folders and settings. The apps live in ``fedscale.server`` (ServerApp),
``fedscale.edge_client`` (ClientApp) and ``fedscale.simulations`` (the engines);
``fedscale.simulations.simulate`` is the Python entry point for notebooks.
This package imports none of them, and imports torch and flwr only in the
modules that train.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
