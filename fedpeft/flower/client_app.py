"""Flower ClientApp: a node trains its client(s) with the same executors as `fedpeft simulate`.

Thin wiring: messages are decoded and encoded by fedpeft.flower.wire; what a node holds and does
(its partition, its clients' ledgers and kept tensors, the worker that trains them) is in
fedpeft.flower.node. `make_app()` builds a ClientApp with a runtime of its own.

Flower runs every message in a new process that imports this module, and three of a SecAgg+
round's four messages only exchange keys, shares and masks (Flower's secaggplus_mod answers them
without calling `train`): so this module imports torch and the node's machinery (fedpeft.flower.
wire, .node, .secagg) only when a handler needs them, and those messages cost a Python start and
flwr's import instead of torch's too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpeft.config import ConfigError

if TYPE_CHECKING:
    from fedpeft.flower.node import Node

__all__ = ["app", "make_app"]

log = logging.getLogger("fedpeft")


def _errors_name_no_data(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Flower sends an exception's text to the server: let through fedpeft's own configuration
    errors (they name keys, files and rows), and only the type of anything else (whose text might
    quote private data); the whole traceback stays in the node's log."""

    @functools.wraps(handler)
    def guarded(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except ConfigError:
            raise
        except Exception as exc:
            log.exception("node %s: %s failed", context.node_id, handler.__name__)
            raise RuntimeError(f"{type(exc).__name__} on the node (details in the node's log)") from None

    return guarded


def when_asked(message: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Flower's secaggplus_mod for the messages of a SecAgg+ round (fedpeft.flower.secagg); any
    other passes untouched (a node serves plain and secure federations alike)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def make_app(node: Node | None = None) -> ClientApp:
    """A ClientApp over `node` (by default a new one, built at the first message that needs it):
    query, train, evaluate."""

    def the_node() -> Node:
        nonlocal node
        if node is None:
            from fedpeft.flower.node import Node

            node = Node()
        return node

    client_app = ClientApp()

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        """Which partition this node is."""
        from fedpeft.flower import wire
        from fedpeft.flower.node import partition_id

        parts = int(context.node_config.get(wire.NUM_PARTITIONS, -1))
        return Message(wire.query_reply(partition_id(context), parts), reply_to=message)

    @client_app.train(mods=[when_asked])
    @_errors_name_no_data
    def train(message: Message, context: Context) -> Message:
        """One round of this node's sampled clients; the reply carries every upload (under
        secure aggregation, their weighted mean, which Flower's secaggplus mod masks)."""
        from fedpeft.flower import secagg, wire
        from fedpeft.plugins import PLUGINS, load_plugins

        load_plugins(str(context.node_config.get(PLUGINS, "")))  # the node operator's, never the server's
        node = the_node()
        if wire.is_secure_train(message.content):
            return Message(secagg.node_reply(node, message.content, context), reply_to=message)
        request = wire.read_train(message.content)
        results = node.train(request, context)
        private = node.worker(request.spec_json).spec.privacy.enabled
        return Message(wire.train_reply(results, private), reply_to=message)

    @client_app.evaluate()
    @_errors_name_no_data
    def evaluate(message: Message, context: Context) -> Message:
        """This node's personalised models (FedSA) on the federation's test split."""
        from fedpeft.flower import wire
        from fedpeft.plugins import PLUGINS, load_plugins

        load_plugins(str(context.node_config.get(PLUGINS, "")))
        spec_json, adapter = wire.read_evaluate(message.content)
        return Message(wire.evaluate_reply(the_node().evaluate(spec_json, adapter, context)), reply_to=message)

    return client_app


app = make_app()
