"""The Flower grid executor: the sampled clients train on Flower nodes (SuperNodes), one message each.

Client `k` is the node whose node config says `partition-id = k` (Flower's simulation sets it; a
real SuperNode is started with `--node-config "partition-id=k num-partitions=N"`). The server asks
every new node which partition it holds (a `query` message) and keeps the map; a node that
disappears and comes back under a new id is found again on the next round.

What a client keeps between rounds (its privacy ledger, FedSA's local B) lives on its node, not
here: the server never sees a client's ledger, only the epsilon it reports with each update.

Wire format (shared with `fedpeft.client_app`), a RecordDict per message:
  server -> node  "train":    adapter (ArrayRecord), config (ConfigRecord: round, seed, client, spec JSON)
  node -> server  "train":    update (ArrayRecord), metrics (MetricRecord), status (ConfigRecord:
                              refused = "" or the client's reason)
  server -> node  "evaluate": adapter, config (spec)  -> metrics (the client's personalised model)
  server -> node  "query":    {}                      -> config (partition-id, num-partitions)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.client import LocalTraining
from fedpeft.config import Spec
from fedpeft.executors.base import ClientFailure, ClientResult
from fedpeft.state import AdapterState, ClientUpdate

__all__ = ["FlowerExecutor", "to_record", "from_record", "spec_to_json", "spec_from_json"]

log = logging.getLogger("fedpeft")

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DISCOVERY_POLL = 1.0  # seconds between looks for nodes that have not connected yet


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # copy: the numpy buffer behind a received array is read-only
    return {name: t.clone() for name, t in record.to_torch_state_dict().items()}


def spec_to_json(spec: Spec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, default=str)


def spec_from_json(text: str) -> Spec:
    return Spec.from_dict(json.loads(text))


class FlowerExecutor:
    """Sends each sampled client's round to its node through a Flower Grid and waits for the replies.

    A node that fails, sends an error, or is still silent after `federation.timeout` seconds gives
    a ClientFailure with the reason; the round loop goes on with the updates that arrived.
    """

    def __init__(self, grid: Grid, spec: Spec, connect_timeout: float = 120.0) -> None:
        self.grid = grid
        self.spec = spec
        self.spec_json = spec_to_json(spec)
        self.timeout = spec.federation.timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id (partition) -> node id
        self._asked: set[int] = set()  # node ids already asked for their partition
        self._first = True

    # -- node discovery ---------------------------------------------------------------------
    def _discover(self) -> None:
        """Map partitions to the nodes connected now; before round 1 wait (up to connect_timeout)
        until every client's node is there."""
        wanted = set(range(self.spec.federation.clients))
        deadline = time.monotonic() + (self.connect_timeout if self._first else 0.0)
        while True:
            connected = set(self.grid.get_node_ids())
            self.nodes = {cid: nid for cid, nid in self.nodes.items() if nid in connected}
            self._asked &= connected
            new = sorted(connected - self._asked)
            if new:
                self._query(new)
            if wanted <= set(self.nodes) or time.monotonic() >= deadline:
                break
            time.sleep(DISCOVERY_POLL)
        if self._first:
            missing = sorted(wanted - set(self.nodes))
            if missing:
                log.warning("no node holds client(s) %s yet; they count as failed until one connects", missing)
            self._first = False

    def _query(self, node_ids: list[int]) -> None:
        messages = [Message(RecordDict(), nid, MessageType.QUERY) for nid in node_ids]
        self._asked.update(node_ids)  # asked once: a node that does not answer is not waited for again
        replies = list(self.grid.send_and_receive(messages, timeout=min(self.timeout, 60.0)))
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            nid = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("node %d did not say which partition it holds: %s", nid, reply.error.reason)
                continue
            config = reply.content["config"]
            cid, parts = int(config[PARTITION_ID]), int(config[NUM_PARTITIONS])
            if parts != self.spec.federation.clients or not 0 <= cid < parts:
                log.warning(
                    "node %d holds partition %d of %d, but the federation has %d clients; ignored",
                    nid, cid, parts, self.spec.federation.clients,
                )  # fmt: skip
            elif cid in self.nodes and self.nodes[cid] != nid:
                log.warning("nodes %d and %d both hold partition %d; using %d", self.nodes[cid], nid, cid, nid)
                self.nodes[cid] = nid
            else:
                self.nodes[cid] = nid

    # -- one round --------------------------------------------------------------------------
    def run_round(
        self,
        round_num: int,
        client_ids: list[int],
        global_state: AdapterState,
        plan: LocalTraining,
        seeds: dict[int, int],
        on_client: Callable[[int], None] | None = None,
    ) -> list[ClientResult]:
        self._discover()
        sent = {name: t for name, t in global_state.tensors.items() if name not in plan.keeps}
        adapter = to_record(sent)
        results: dict[int, ClientResult] = {}
        messages, owner = [], {}
        for cid in client_ids:
            nid = self.nodes.get(cid)
            if nid is None:
                results[cid] = ClientFailure(cid, f"no connected node holds partition {cid}")
                continue
            config = ConfigRecord({"round": round_num, "seed": seeds[cid], "client": cid, "spec": self.spec_json})
            content = RecordDict({"adapter": adapter, "config": config})
            messages.append(Message(content, nid, MessageType.TRAIN, group_id=str(round_num)))
            owner[nid] = cid
        replies = list(self._send(messages))
        # an error the SuperLink makes for an unreachable node comes from the SuperLink, not the
        # node: match replies to messages by id (the grid sets the ids when it pushes)
        by_id = {m.metadata.message_id: owner[m.metadata.dst_node_id] for m in messages}
        for reply in replies:
            cid = by_id.get(reply.metadata.reply_to_message_id, owner.get(reply.metadata.src_node_id))
            if cid is None or cid in results:
                continue
            results[cid] = self._result(cid, self.nodes.get(cid, -1), reply)
            if on_client is not None:
                on_client(cid)
        for nid, cid in owner.items():
            if cid not in results:
                waited = "forever" if math.isinf(self.timeout) else f"{self.timeout:g} s"
                results[cid] = ClientFailure(cid, f"node {nid} sent no reply (waited {waited})")
        return [results[cid] for cid in client_ids]

    def _send(self, messages: list[Message]) -> Iterable[Message]:
        if not messages:
            return []
        timeout = None if math.isinf(self.timeout) else self.timeout
        return self.grid.send_and_receive(messages, timeout=timeout)

    def _result(self, cid: int, nid: int, reply: Message) -> ClientResult:
        if reply.has_error():
            return ClientFailure(cid, f"node {nid} failed: {reply.error.reason}")
        content = reply.content
        refused = str(content["status"].get("refused", ""))
        if refused:
            return ClientFailure(cid, refused, refused=True)
        metrics = {k: v for k, v in content["metrics"].items()}
        num_examples = int(metrics.pop("num_examples"))
        rank = int(metrics.pop("rank")) if "rank" in metrics else None
        return ClientUpdate(cid, num_examples, from_record(content["update"]), metrics, rank)

    # -- evaluation of personalised models (FedSA): on the nodes, which hold the personal parts --
    def evaluate_personal(self, state: AdapterState, plan: LocalTraining) -> list[dict[str, float]]:
        """Each node that has trained evaluates the global adapter with its own kept tensors on the
        server's test split (which it derives from the spec); the nodes that answer are returned."""
        self._discover()
        adapter = to_record({n: t for n, t in state.tensors.items() if n not in plan.keeps})
        config = ConfigRecord({"spec": self.spec_json})
        messages = [
            Message(RecordDict({"adapter": adapter, "config": config}), nid, MessageType.EVALUATE)
            for nid in self.nodes.values()
        ]
        scores = []
        for reply in self._send(messages):
            if reply.has_error():
                log.warning("node %d could not evaluate: %s", reply.metadata.src_node_id, reply.error.reason)
            elif "metrics" in reply.content:
                scores.append({k: float(v) for k, v in reply.content["metrics"].items()})
        return scores

    # -- the executor contract: client state lives on the nodes -----------------------------
    def client_states(self) -> dict:
        return {}

    def load_client_states(self, states: dict) -> None:
        pass

    def personal_states(self) -> dict:
        return {}
