"""The edge client: fedscale's ClientApp and the launcher of a SuperNode.

Installed as ``fedscale.edge_client``.
"""
