"""The ``fedscale`` command line. Installed as ``fedscale.cli``."""
