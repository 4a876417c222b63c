"""Run a Flower ``ServerApp`` and N ``ClientApp``s in one process, without Ray or a SuperLink.

:class:`InProcessGrid` implements Flower's abstract ``flwr.serverapp.Grid`` (flwr >= 1.41):
``push_messages`` hands each instruction message to the destination node's ``ClientApp`` at
once, in the calling thread, and keeps the reply until ``pull_messages`` collects it. Clients
therefore run **sequentially in the calling thread**; the wall time of a round is the sum of
all client work plus the server's work, with no polling interval and no network.

What is kept from a real deployment, because apps and mods depend on it:

* each node has **one persistent** ``Context`` (``flwr.app.Context``) for the whole run; its
  ``state`` (a ``RecordDict``) carries over between messages and rounds. Flower's
  ``secaggplus_mod`` keeps its protocol state there (``ctxt.state.config_records``);
* ``node_config`` holds ``partition-id`` and ``num-partitions``, as Flower's simulation
  engine sets them, so an app can pick its data partition;
* every message crosses the grid as a **deep copy**, as if serialised: the SecAgg+ mod pops
  keys from the content it receives, and ``SecAggPlusWorkflow`` sends one ``RecordDict`` to
  all nodes, so sharing the objects would let one node's edits reach another. ``Array``
  payloads are immutable ``bytes``, so the copy does not duplicate array data;
* message ids are fresh UUIDs, replies carry ``reply_to_message_id`` of their instruction,
  and a ``ClientApp`` that raises produces an ``Error`` reply (code
  ``CLIENT_APP_RAISED_EXCEPTION``), as in Flower's simulation engine.

What is not modelled: TTLs are not enforced (a reply is ready as soon as ``push_messages``
returns, so ``timeout`` never expires), nodes never drop out, and nothing is serialised.

Node ids are ``NODE_ID_OFFSET + partition id`` (deterministic, distinct from the server's
``SUPERLINK_NODE_ID`` = 1).

This module imports ``flwr`` at the top; import it only where Flower is wanted (the
``flower``/``bench`` extras install it). ``mpc_agg.integrations`` itself does not import it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import cast

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import ServerApp
from flwr.serverapp.grid import Grid
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from mpc_agg.errors import UsageError

__all__ = ["NODE_ID_OFFSET", "InProcessGrid", "run_inprocess", "run_server_app"]

logger = logging.getLogger(__name__)

NODE_ID_OFFSET = 1000
"""Node ``i`` (partition id ``i``) has node id ``NODE_ID_OFFSET + i``."""

DEFAULT_RUN_ID = 1
"""Run id used when none is given (Flower draws a random one; any int works in-process)."""

NodeConfigFn = Callable[[int], UserConfig]
"""Maps a partition id in ``[0, num_nodes)`` to extra ``node_config`` entries."""


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    ``push_messages`` runs the destination node's ``client_app`` on a deep copy of each
    message, sequentially, in the calling thread, and stores the reply (a deep copy too);
    ``pull_messages`` returns and forgets the replies to the given message ids. A lock
    serialises pushes, so Flower's legacy thread-pool strategies may call in from several
    threads. ``client_seconds`` adds up the wall time spent inside ``client_app`` calls, so
    a caller can split a round's time into client work and server work.

    Parameters
    ----------
    client_app:
        The ``ClientApp`` every node runs (its mods included).
    num_nodes:
        Number of nodes, >= 1. Node ``i`` has partition id ``i`` and node id
        ``NODE_ID_OFFSET + i``.
    run_config:
        The run config every node's context receives (a copy each); default empty.
    node_config:
        Called once per partition id; its entries are added to (and may override) the
        default ``{"partition-id": i, "num-partitions": num_nodes}``.
    run_id:
        The run id in every context and message.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: UserConfig | None = None,
        node_config: NodeConfigFn | None = None,
        run_id: int = DEFAULT_RUN_ID,
    ) -> None:
        if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
            raise UsageError(f"num_nodes must be an int >= 1, got {num_nodes!r}")
        self._client_app = client_app
        run_config = dict(run_config or {})
        run = Run.create_empty(run_id)
        run.override_config = dict(run_config)
        self._run = run
        self._contexts: dict[int, Context] = {}
        for partition_id in range(num_nodes):
            config: UserConfig = {
                PARTITION_ID_KEY: partition_id,
                NUM_PARTITIONS_KEY: num_nodes,
            }
            if node_config is not None:
                config.update(node_config(partition_id))
            node_id = NODE_ID_OFFSET + partition_id
            self._contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self._replies: dict[str, Message] = {}  # instruction message id -> reply
        self._lock = threading.Lock()
        self.client_seconds = 0.0
        """Wall time spent inside ``client_app`` calls so far, in seconds (perf_counter)."""

    # ------------------------------------------------------------------ run

    def set_run(self, run: Run) -> None:
        """Replace the run description; its ``run_id`` must be this grid's."""
        if not isinstance(run, Run):
            raise TypeError(f"run must be a flwr Run, got {type(run).__name__}")
        if run.run_id != self._run.run_id:
            raise UsageError(
                f"run.run_id must be {self._run.run_id} (the nodes' contexts are bound to it), "
                f"got {run.run_id}"
            )
        self._run = run

    @property
    def run(self) -> Run:
        """A copy of the run description."""
        return Run(**vars(self._run))

    @property
    def node_contexts(self) -> Mapping[int, Context]:
        """Each node's persistent ``Context``, by node id (read-only view, live objects)."""
        return MappingProxyType(self._contexts)

    # ------------------------------------------------------------------ Grid API

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build an instruction message (deprecated in Flower; same as ``Message(...)``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The node ids, in partition order."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each instruction message to its node now; return the message ids.

        Each message gets a fresh id (written into its metadata, as Flower's grids do). The
        node's ``ClientApp`` runs before this returns; its reply waits for ``pull_messages``.

        Raises
        ------
        UsageError
            A message is a reply, has a non-positive TTL, comes from another run or source
            than this grid's server, or names an unknown node.
        """
        ids: list[str] = []
        with self._lock:
            for message in messages:
                self._check_instruction(message)
                message_id = uuid.uuid4().hex
                message.metadata.__dict__["_message_id"] = message_id
                self._replies[message_id] = self._deliver(message)
                ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Return (and forget) the replies to those of ``message_ids`` that have one."""
        with self._lock:
            return [
                self._replies.pop(message_id)
                for message_id in dict.fromkeys(message_ids)
                if message_id in self._replies
            ]

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> list[Message]:
        """Push ``messages`` and return their replies, in push order.

        ``timeout`` (seconds) is accepted for compatibility and has no effect: every reply
        exists once ``push_messages`` returns.
        """
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------ delivery

    def _check_instruction(self, message: Message) -> None:
        """Refuse what Flower's link state refuses (it logs and drops; we raise)."""
        metadata = message.metadata
        if metadata.reply_to_message_id != "":
            raise UsageError(
                f"push_messages takes instruction messages, got a reply to "
                f"{metadata.reply_to_message_id!r}"
            )
        if not metadata.ttl > 0:
            raise UsageError(f"message ttl must be > 0 s, got {metadata.ttl!r}")
        if metadata.run_id != self._run.run_id:
            raise UsageError(
                f"message run_id must be {self._run.run_id}, got {metadata.run_id} "
                "(was the Message built outside run_server_app?)"
            )
        if metadata.src_node_id != SUPERLINK_NODE_ID:
            raise UsageError(
                f"message src_node_id must be {SUPERLINK_NODE_ID}, got {metadata.src_node_id}"
            )
        if metadata.dst_node_id not in self._contexts:
            raise UsageError(
                f"message dst_node_id {metadata.dst_node_id} is not a node of this grid "
                f"(node ids {NODE_ID_OFFSET}..{NODE_ID_OFFSET + len(self._contexts) - 1})"
            )

    def _deliver(self, message: Message) -> Message:
        """Run the destination node's ClientApp on a copy of ``message``; return the reply."""
        node_id = message.metadata.dst_node_id
        delivered = copy.deepcopy(message)
        delivered.metadata.delivered_at = now().isoformat()
        started = time.perf_counter()
        try:
            returned: object = self._client_app(delivered, self._contexts[node_id])
        except Exception as exc:  # an app's failure becomes an Error reply, as in Flower
            logger.exception("ClientApp of node %d raised", node_id)
            reason = f"{type(exc)}:<'{exc}'>"  # the format of Flower's simulation engine
            error: Error | None = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        else:
            problem = _reply_problem(returned, delivered)
            if problem is None:
                error = None
            else:
                logger.error("ClientApp of node %d: %s", node_id, problem)
                error = Error(code=ErrorCode.UNKNOWN, reason=problem)
        finally:
            self.client_seconds += time.perf_counter() - started
        if error is not None:
            reply = Message(error, reply_to=delivered)
        else:
            reply = copy.deepcopy(cast(Message, returned))
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def _reply_problem(reply: object, instruction: Message) -> str | None:
    """Why ``reply`` is not a valid reply to ``instruction``, or None if it is."""
    if not isinstance(reply, Message):
        return f"ClientApp returned {type(reply).__name__}, not a Message"
    metadata = reply.metadata
    if metadata.reply_to_message_id != instruction.metadata.message_id:
        return (
            "ClientApp returned a message that is not a reply to the one it received "
            "(build it with Message(content, reply_to=message))"
        )
    if metadata.src_node_id != instruction.metadata.dst_node_id:
        return f"reply src_node_id is {metadata.src_node_id}, not the node's id"
    return None


def run_server_app(
    server_app: ServerApp,
    grid: InProcessGrid,
    *,
    run_config: UserConfig | None = None,
) -> Context:
    """Run ``server_app`` to completion against ``grid``; return the server's ``Context``.

    The server context has node id ``SUPERLINK_NODE_ID``, the grid's run id, an empty
    ``state`` and ``run_config`` (default: the grid's run config). Flower's process-wide
    ``TaskIdentity`` (which ``Message(...)`` reads for ``run_id`` and ``src_node_id``) is
    set to the server for the call and restored afterwards. Exceptions from the app
    propagate.

    A ``main`` that wraps the context (``LegacyContext(context, ...)`` for
    ``DefaultWorkflow``) shares its ``state``, so the records the workflow leaves in the
    wrapper's ``state`` are visible in the returned context.
    """
    run = grid.run
    context = Context(
        run_id=run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run.override_config if run_config is None else run_config),
    )
    # TaskIdentity's getters raise when unset, so save and restore its raw class attributes.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return context


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    run_config: UserConfig | None = None,
    node_config: NodeConfigFn | None = None,
) -> Context:
    """Run a Flower app with ``num_nodes`` in-process nodes; return the server's ``Context``.

    Builds an :class:`InProcessGrid` (clients run sequentially in the calling thread, each
    node with its own persistent context) and runs ``server_app`` on it to completion; see
    :func:`run_server_app`. Use the two directly to inspect the nodes' contexts afterwards.
    """
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config, node_config=node_config)
    return run_server_app(server_app, grid)
