"""The aggregation server: fedscale's ServerApp and the launcher of a SuperLink.

Installed as ``fedscale.server``.
"""
