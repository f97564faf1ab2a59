"""``python -m fedscale.cli``: the same as the ``fedscale`` command."""

from .main import run

run()
