"""A server's message as a ClientApp receives it, built outside a running Flower task.

Flower builds a message with an id only inside its runtime; tests that call a
ClientApp directly (``client_app(message, context)``) need one with explicit
``Metadata``.
"""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict


def incoming_message(content: RecordDict, message_type: str = "train") -> Message:
    """Return ``content`` as the server's message ``m-1`` to node 7."""
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)
