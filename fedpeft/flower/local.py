"""A Flower grid in this process: the server's messages go straight to a ClientApp, one Flower
Context per node (what a SuperNode keeps between messages). The same message encoding, node state
and failure handling as a deployment, in seconds: for tests, fault drills and debugging a strategy
or a node without starting Flower's runtime."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.flower import client_app, wire

__all__ = ["LocalGrid", "outside_a_supernode", "pushed"]


def outside_a_supernode(run_id: int) -> None:
    """Let Flower build messages in a process that is no SuperLink or SuperNode."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1


def pushed(message: Message) -> Message:
    """`message` as a grid leaves it on push: with its message id set (replies refer to it)."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


class LocalGrid(Grid):
    """Nodes 100+k hold partition k of n. Asked to train, `crash` nodes answer with an error and
    `silent` ones never answer (both answer the server's first question, which partition they
    hold: a round that asks a silent node returns after the finite timeout it was given, as a real
    grid does, and at once when none was given); `tamper[nid](request, reply)` replaces a node's
    train reply and `tamper_evaluate[nid]` its evaluate reply (fault drills)."""

    def __init__(
        self, n: int, state_dir: Path | None = None, run_id: int = 7, node_config: dict | None = None,
        app: ClientApp | None = None,
    ) -> None:  # fmt: skip
        outside_a_supernode(run_id)
        self.run_id, self.state_dir, self.n = run_id, state_dir, n
        self.app = app or client_app.app
        self.contexts = {100 + k: self._context(100 + k, k, n, node_config) for k in range(n)}
        self.crash: set[int] = set()
        self.silent: set[int] = set()
        self.tamper: dict[int, Callable[[Message, Message], Message]] = {}
        self.tamper_evaluate: dict[int, Callable[[Message, Message], Message]] = {}
        self.calls: list[tuple[int, str]] = []

    def add_node(
        self, nid: int, partition_id: int, node_config: dict | None = None, num_partitions: int | None = None
    ) -> None:
        """One more node, claiming `partition_id` of `num_partitions` (default: the grid's n; a
        duplicate identity when another holds it). The server asks nodes in id order: an id below
        100 connects before the others."""
        self.contexts[nid] = self._context(nid, partition_id, num_partitions or self.n, node_config)

    def _context(self, nid: int, k: int, n: int, extra: dict | None = None) -> Context:
        config = {wire.PARTITION_ID: k, wire.NUM_PARTITIONS: n, **(extra or {})}
        if self.state_dir is not None:
            config["state-dir"] = str(self.state_dir)
        return Context(run_id=self.run_id, node_id=nid, node_config=config, state=RecordDict(), run_config={})

    def restart(self, nid: int) -> None:
        """The node process restarts: its Flower context (in memory) is gone, its disk is not."""
        old = self.contexts[nid]
        self.contexts[nid] = Context(self.run_id, nid, old.node_config, RecordDict(), {})

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies, waits = [], False
        for message in messages:
            nid = message.metadata.dst_node_id
            pushed(message)
            self.calls.append((nid, message.metadata.message_type))
            training = message.metadata.message_type == "train"
            if training and nid in self.silent:
                waits = True
                continue
            if training and nid in self.crash:  # the SuperLink answers for a dead node, as itself
                reply = Message(Error(code=1, reason="node crashed"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 1
                replies.append(reply)
                continue
            try:  # a copy, as a real grid delivers a deserialised one (SecAgg+ shares one content)
                reply = self.app(message_from_proto(message_to_proto(message)), self.contexts[nid])
            except Exception as exc:  # what a SuperNode does with a ClientApp exception
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            if training and nid in self.tamper:
                reply = self.tamper[nid](message, reply)
            elif message.metadata.message_type == "evaluate" and nid in self.tamper_evaluate:
                reply = self.tamper_evaluate[nid](message, reply)
            replies.append(reply)
        if waits and timeout is not None and math.isfinite(timeout):
            time.sleep(timeout)
        return replies

    def get_node_ids(self):  # noqa: ANN201
        return list(self.contexts)

    def set_run(self, run):  # noqa: ANN001, ANN201
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError
