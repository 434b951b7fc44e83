"""Flower ClientApp: a node trains its client(s) with the same executors as `fedpeft simulate`.

Thin wiring: messages are decoded and encoded by fedpeft.flower.wire; what a node holds and does
(its partition, its clients' ledgers and kept tensors, the worker that trains them) is in
fedpeft.flower.node. `make_app()` builds a ClientApp with a runtime of its own.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.flower import wire
from fedpeft.flower.node import Node, partition_id

__all__ = ["app", "make_app"]


def make_app(node: Node | None = None) -> ClientApp:
    """A ClientApp over `node` (a new one by default): query, train, evaluate."""
    node = node or Node()
    client_app = ClientApp()

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        """Which partition this node is."""
        parts = int(context.node_config.get(wire.NUM_PARTITIONS, -1))
        return Message(wire.query_reply(partition_id(context), parts), reply_to=message)

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        """One round of this node's sampled clients; the reply carries every upload."""
        results = node.train(wire.read_train(message.content), context)
        return Message(wire.train_reply(results), reply_to=message)

    @client_app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """This node's personalised models (FedSA) on the federation's test split."""
        spec_json, adapter = wire.read_evaluate(message.content)
        return Message(wire.evaluate_reply(node.evaluate(spec_json, adapter, context)), reply_to=message)

    return client_app


app = make_app()
