"""fedscale's in-process ``Grid``: a whole federation in one process, no sockets.

A ServerApp talks to its clients only through a Flower ``Grid``. This one hands
each message to the ClientApp directly, in this process, with the semantics
Flower's runtimes give:

- every pushed message gets a unique id, and a reply made with
  ``Message(..., reply_to=msg)`` carries it back;
- each node gets its own copy of a message's content (Flower serialises per
  destination), so one node's in-place edit never reaches another;
- each node has its own ``Context`` whose ``state`` persists across rounds, with
  ``node_config`` holding ``partition-id`` and ``num-partitions`` as Flower's
  simulation sets them;
- a ClientApp that raises becomes a reply carrying an ``Error`` (code 2, as in
  Flower's simulation), and its edits to the context are discarded;
- ClientApp mods and lifespan run, since the ClientApp is called as Flower calls
  it: ``client_app(message, context)``.

Virtual nodes cost nothing until they receive a message; a node's context is
kept only once its ``state`` holds something.

With a :class:`~fedscale.simulations.system.SimulatedSystem` (``system=``, exposed
as :attr:`InProcessGrid.system`), ``get_node_ids`` returns only the nodes online
at the system's virtual time, and a message to a node offline then gets an
error reply (``NODE_UNAVAILABLE``) instead of reaching the ClientApp.

With a ``fast_path`` (see :mod:`.cohort_delivery`), the messages of one
``pull_messages`` call are first offered to it as a batch; it answers those it
can (a cohort of train messages for fedscale's own ClientApp, trained at once)
and every other message is delivered one by one as above.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from ._flower import (
    CLIENT_APP_RAISED_EXCEPTION,
    FIRST_CLIENT_NODE_ID,
    NODE_UNAVAILABLE,
    copy_message_for_delivery,
    copy_record_dict,
    error_reply,
    make_run,
    set_message_id,
)

if TYPE_CHECKING:
    from .system import SimulatedSystem

__all__ = ["GridStats", "InProcessGrid", "call_client_app"]

log = logging.getLogger(__name__)

NodeConfigFn = Callable[[int], Mapping[str, Any]]
# Answers what it can of a batch of pushed messages: replies (ids set) by message id.
BatchDelivery = Callable[["InProcessGrid", list[Message]], dict[str, Message]]


@dataclass
class GridStats:
    """Counters of what the grid delivered."""

    messages: int = 0
    errors: int = 0
    client_seconds: float = 0.0
    unavailable: int = 0


class InProcessGrid(Grid):
    """Deliver a ServerApp's messages to a ClientApp in this process.

    Parameters
    ----------
    client_app
        The ClientApp every virtual node runs.
    num_nodes
        Number of virtual nodes; node ``i`` (0-based) is partition ``i``.
    run_id
        The run these messages belong to.
    run_config
        The run config every node's ``Context`` holds.
    node_config
        Optional extra ``node_config`` entries for partition ``i``.
    system
        Optional simulated devices and virtual clock over the same ``num_nodes``
        clients: only the nodes online at its current time are offered.
    fast_path
        Optional batch delivery offered each ``pull_messages`` batch first.

    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_id: int,
        run_config: Mapping[str, Any],
        node_config: NodeConfigFn | None = None,
        system: SimulatedSystem | None = None,
        fast_path: BatchDelivery | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes: expected an integer >= 1, got {num_nodes}")
        if system is not None and (
            system.num_clients != num_nodes or system.first_node_id != FIRST_CLIENT_NODE_ID
        ):
            raise ValueError(
                f"system: expected one over this grid's {num_nodes} nodes from node "
                f"{FIRST_CLIENT_NODE_ID}, got {system.num_clients} clients from node "
                f"{system.first_node_id}"
            )
        self.system = system
        self._client_app = client_app
        self._num_nodes = num_nodes
        self._run_config = dict(run_config)
        self._run = make_run(run_id, self._run_config)
        self._extra_node_config = node_config
        self._fast_path = fast_path
        self._contexts: dict[int, Context] = {}
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self.stats = GridStats()

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        """Set the run this grid serves."""
        if not isinstance(run, Run):
            raise TypeError(f"run: expected a flwr Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves (a copy)."""
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message (deprecated in Flower; kept for old apps)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """All virtual nodes at once, or with a system those online now."""
        if self.system is not None:
            return self.system.online_node_ids()
        return list(range(FIRST_CLIENT_NODE_ID, FIRST_CLIENT_NODE_ID + self._num_nodes))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Accept instruction messages and return their new ids."""
        ids = []
        for message in messages:
            meta = message.metadata
            if meta.message_id or meta.reply_to_message_id or meta.ttl <= 0:
                raise ValueError(
                    "push_messages: expected new instruction messages (no id, not a "
                    f"reply, ttl > 0), got message_id={meta.message_id!r}, "
                    f"reply_to={meta.reply_to_message_id!r}, ttl={meta.ttl}"
                )
            message_id = uuid.uuid4().hex
            set_message_id(message, message_id)
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Deliver the pending messages among ``message_ids`` and return their replies."""
        wanted = list(message_ids)
        batch = [m for i in wanted if (m := self._pending.pop(i, None)) is not None]
        if self._fast_path is not None and batch:
            self._replies.update(self._fast_path(self, batch))
        for message in batch:
            if message.metadata.message_id not in self._replies:
                self._replies[message.metadata.message_id] = self.deliver_here(message)
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages`` and return all replies (delivery here never times out)."""
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------ delivery

    @property
    def client_app(self) -> ClientApp:
        """The ClientApp every virtual node runs."""
        return self._client_app

    @property
    def run_config(self) -> dict[str, Any]:
        """The run config every node's ``Context`` holds (a copy)."""
        return dict(self._run_config)

    def node_config(self, node_id: int) -> dict[str, Any]:
        """Return the ``node_config`` of node ``node_id``'s ``Context``."""
        partition_id = node_id - FIRST_CLIENT_NODE_ID
        node_config: dict[str, Any] = {
            "partition-id": partition_id,
            "num-partitions": self._num_nodes,
        }
        if self._extra_node_config is not None:
            node_config.update(self._extra_node_config(partition_id))
        return node_config

    def unavailable_reply(self, message: Message) -> Message | None:
        """Return the error reply (id set) for a node that does not exist or is offline.

        ``None`` when the node can take the message; counted in :attr:`stats`.
        """
        node_id = message.metadata.dst_node_id
        if not FIRST_CLIENT_NODE_ID <= node_id < FIRST_CLIENT_NODE_ID + self._num_nodes:
            reason = f"node {node_id} does not exist"
        elif self.system is not None and not self.system.is_online(node_id):
            self.stats.unavailable += 1
            reason = f"node {node_id} is offline at {self.system.now:g} s of virtual time"
        else:
            return None
        self.stats.errors += 1
        reply = error_reply(message, NODE_UNAVAILABLE, reason)
        set_message_id(reply, uuid.uuid4().hex)
        return reply

    def node_context(self, node_id: int) -> Context:
        """Return the ``Context`` node ``node_id`` gets for one call (its state a copy)."""
        stored = self._contexts.get(node_id)
        state = copy_record_dict(stored.state) if stored is not None else RecordDict()
        return Context(
            run_id=self._run.run_id,
            node_id=node_id,
            node_config=self.node_config(node_id),
            state=state,
            run_config=dict(self._run_config),
        )

    def commit_context(self, node_id: int, context: Context) -> None:
        """Keep ``context`` as node ``node_id``'s after a successful call, as Flower does."""
        if len(context.state) > 0:
            self._contexts[node_id] = context
        else:
            self._contexts.pop(node_id, None)

    def deliver_here(self, message: Message) -> Message:
        """Call the ClientApp for ``message`` in this process: the general path."""
        node_id = message.metadata.dst_node_id
        self.stats.messages += 1
        unavailable = self.unavailable_reply(message)
        if unavailable is not None:
            return unavailable
        delivered = copy_message_for_delivery(message)
        context = self.node_context(node_id)
        started = time.perf_counter()
        reply, ok = call_client_app(self._client_app, delivered, context)
        self.stats.client_seconds += time.perf_counter() - started
        if ok:
            self.commit_context(node_id, context)
        else:
            self.stats.errors += 1
        set_message_id(reply, uuid.uuid4().hex)
        return reply


def call_client_app(
    client_app: ClientApp, message: Message, context: Context
) -> tuple[Message, bool]:
    """Call ``client_app`` as Flower does; return its reply and whether it succeeded.

    A ClientApp that raises, returns something other than a Message, or answers
    another message gets an error reply (code 2, as in Flower's simulation)
    instead: the app's failure is the reply, never the run's. On failure the
    caller must discard the context's edits.
    """
    try:
        reply = client_app(message, context)
        if not isinstance(reply, Message):
            raise TypeError(f"ClientApp returned {type(reply).__name__}, expected a Message")
        if reply.metadata.reply_to_message_id != message.metadata.message_id:
            raise ValueError(
                "ClientApp reply does not answer the message it received: build it "
                "with Message(content, reply_to=message)"
            )
    except Exception as ex:
        node_id = message.metadata.dst_node_id
        log.error("ClientApp on node %d raised %s: %s", node_id, type(ex).__name__, ex)
        return error_reply(message, CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"), False
    return reply, True
