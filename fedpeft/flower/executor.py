"""The Flower grid executor: the sampled clients train on Flower nodes (SuperNodes).

Node k of N (node config `partition-id = k`, `num-partitions = N`; Flower's simulation sets both, a
real SuperNode gets `--node-config "partition-id=k num-partitions=N"`) holds the clients c with
c % N == k. With one node per client (N = federation.clients) node k is client k; with fewer nodes
(one per GPU), each node trains its share of a round's clients together, with the spec's executor
(the cohort executor batches them). A client always lives on the same node, so its privacy ledger
does too. The server asks every new node which partition it is (a `query` message) and keeps the
map; a node that disappears and comes back under a new id is found again on the next round.

What a client keeps between rounds (its privacy ledger, FedSA's local B) lives on its node, not
here: the server never sees a client's ledger, only the epsilon it reports with each update.

Message layouts are in fedpeft.flower.wire.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.client import LocalTraining
from fedpeft.config import ConfigError, Spec
from fedpeft.executors.base import ClientFailure, ClientResult, Scores, SecureSum
from fedpeft.flower import secagg, wire
from fedpeft.flower.untrusted import Shapes, node_text
from fedpeft.privacy.client_level import AGGREGATE_ID
from fedpeft.state import AdapterState

__all__ = ["FlowerExecutor"]

log = logging.getLogger("fedpeft")

DISCOVERY_POLL = 1.0  # seconds between looks for nodes that have not connected yet


class FlowerExecutor:
    """Sends each sampled client's round to its node through a Flower Grid and waits for the replies.

    A node that fails, sends an error, or is still silent after `federation.timeout` seconds gives
    a ClientFailure with the reason; the round loop goes on with the updates that arrived. Under
    DP the loop's seeds are not sent: every node draws its clients' batches and noise from secret
    randomness of its own (fedpeft.privacy.randomness).
    """

    noise = "secret"  # under DP; with privacy off there is no noise and batches follow the seeds

    def __init__(self, grid: Grid, spec: Spec, connect_timeout: float = 120.0) -> None:
        self.grid = grid
        self.spec = spec
        self.spec_json = wire.spec_to_json(spec)
        self.timeout = spec.federation.timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id (partition) -> node id
        self._asked: set[int] = set()  # node ids already asked for their partition
        self._first = True
        self._ignored: list[str] = []  # why nodes were left out, for the error when none is usable
        self._partitions: int | None = None  # the num-partitions of the accepted claims (one for all)

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
            if not self.nodes:
                raise ConfigError(
                    f"no connected node holds any of the {len(wanted)} clients after {self.connect_timeout:g} s "
                    f"({len(connected)} node(s) connected; each needs partition-id < num-partitions <= "
                    "federation.clients; in simulation set num-supernodes <= federation.clients). "
                    + "; ".join(self._ignored[-3:])
                )
            missing = sorted(wanted - set(self.nodes))
            if missing:
                log.warning("no node holds client(s) %s yet; they count as failed until one connects", missing)
            self._first = False

    def _query(self, node_ids: list[int]) -> None:
        messages = [Message(RecordDict(), nid, MessageType.QUERY) for nid in node_ids]
        self._asked.update(node_ids)  # asked once: a node that does not answer is not waited for again
        for nid, reply in self._exchange(messages, timeout=min(self.timeout, 60.0)):
            if reply.has_error():
                why = f"node {nid} did not say which partition it holds: {node_text(reply.error.reason)}"
                log.warning("%s", why)
                self._ignored.append(why)
                continue
            try:
                k, parts = wire.read_query_reply(reply.content)
            except ValueError as exc:
                why = f"node {nid} sent a malformed partition reply ({exc})"
                log.warning("%s; ignored", why)
                self._ignored.append(why)
                continue
            clients, bound = self.spec.federation.clients, self.spec.federation.node_ids
            if not 0 <= k < parts <= clients:
                why = f"node {nid} is partition {k} of {parts}, but the federation has {clients} clients"
                log.warning("%s; ignored", why)
                self._ignored.append(why)
                continue
            expected = len(bound) if bound else self._partitions
            if expected is not None and parts != expected:
                source = "federation.node_ids" if bound else "the nodes that claimed first"
                why = f"node {nid} claims to be partition {k} of {parts}, but {source} make(s) {expected} partitions"
                log.warning("%s; refused", why)
                self._ignored.append(why)
                continue
            if bound and (k >= len(bound) or bound[k] != nid):
                owner = bound[k] if k < len(bound) else "no node"
                why = f"node {nid} claims partition {k}, which federation.node_ids binds to {owner}"
                log.warning("%s; refused", why)
                self._ignored.append(why)
                continue
            claimed = {self.nodes[c] for c in wire.node_clients(k, parts, clients) if self.nodes.get(c, nid) != nid}
            if claimed:  # a partition is held by one node at a time: the first that claimed it
                why = f"node {nid} claims partition {k}, already held by node(s) {sorted(claimed)}"
                log.warning("%s; refused (the first claim stands while its node is connected)", why)
                self._ignored.append(why)
                self._asked.discard(nid)  # asked again next round: it may take the partition once free
                continue
            for cid in wire.node_clients(k, parts, clients):
                self.nodes[cid] = nid
            self._partitions = parts  # every later claim must divide the clients the same way

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
        adapter = wire.to_record({name: t for name, t in global_state.tensors.items() if name not in plan.keeps})
        results: dict[int, ClientResult] = {}
        groups: dict[int, list[int]] = {}  # node -> its sampled clients
        for cid in client_ids:
            if (nid := self.nodes.get(cid)) is None:
                results[cid] = ClientFailure(cid, f"no connected node holds client {cid}")
            else:
                groups.setdefault(nid, []).append(cid)
        if self.spec.federation.secagg:
            return self._secure(round_num, global_state, plan, seeds, groups, results, on_client)
        messages = []
        for nid, cids in groups.items():
            # under DP no seeds: every node draws its clients' batches and noise in secret
            sent = [seeds[c] for c in cids] if not self.spec.privacy.enabled else None
            content = wire.train_message(round_num, cids, self.spec_json, adapter, sent)
            messages.append(Message(content, nid, MessageType.TRAIN, group_id=str(round_num)))
        shapes = {name: tuple(global_state.tensors[name].shape) for name in plan.uploads}
        for nid, reply in self._exchange(messages):
            for cid in groups.get(nid, []):
                if cid not in results:
                    results[cid] = self._result(cid, nid, reply, shapes)
                    if on_client is not None:
                        on_client(cid)
        waited = "forever" if math.isinf(self.timeout) else f"{self.timeout:g} s"
        for nid, cids in groups.items():
            for cid in cids:
                if cid not in results:
                    results[cid] = ClientFailure(cid, f"node {nid} sent no reply (waited {waited})")
        return [results[cid] for cid in client_ids]

    def _secure(
        self, round_num: int, global_state: AdapterState, plan: LocalTraining, seeds: dict[int, int],
        groups: dict[int, list[int]], failed: dict[int, ClientResult], on_client: Callable[[int], None] | None,
    ) -> list[ClientResult]:  # fmt: skip
        """A SecAgg+ round (fedpeft.flower.secagg): one SecureSum of the nodes that stayed, and a
        ClientFailure for every client outside it; no single node's update is ever held here."""
        results: list[ClientResult] = list(failed.values())
        asked = [c for cids in groups.values() for c in cids]

        def fail(cids: list[int], why: str) -> list[ClientResult]:
            return results + [ClientFailure(c, why) for c in cids]

        if not 2 <= len(groups) < secagg.MAX_NODES:
            return fail(
                asked,
                f"secure aggregation needs 2 to {secagg.MAX_NODES - 1} nodes in a round; {len(groups)} had clients",
            )
        adapter = {name: t for name, t in global_state.tensors.items() if name not in plan.keeps}
        names = list(plan.uploads)
        shares = len(asked) if self.spec.privacy.client_enabled else 0
        per_client = 1 if shares else plan.batch_size * plan.steps  # the largest honest aggregation weight
        max_weight = per_client * max(len(cids) for cids in groups.values())
        instructions = {
            nid: wire.secure_fitins(round_num, cids, self.spec_json, adapter, names, shares, max_weight,
                                    [seeds[c] for c in cids] if not self.spec.privacy.enabled else None)
            for nid, cids in groups.items()
        }  # fmt: skip
        replies = secagg.secure_round(self.grid, round_num, instructions, max_weight, self.timeout)
        if not replies:
            return fail(asked, "secure aggregation halted: too few nodes stayed to unmask the sum (log: SecAgg+)")
        members: dict[int, dict[str, float]] = {}
        for nid, fitres in replies:
            try:
                trained, refused = wire.read_secure_metrics(fitres.metrics, groups[nid])
            except (ValueError, KeyError) as exc:  # its vector is in the sum already: the round cannot use it
                return fail(asked, f"node {nid} sent malformed metrics inside the secure sum ({exc}); round dropped")
            members.update(trained)
            results += [ClientFailure(c, why, refused=True) for c, why in refused.items()]
        inside = {nid for nid, _ in replies}
        for nid, cids in groups.items():
            if nid not in inside:
                results = fail(cids, f"node {nid} dropped out of secure aggregation")
        weight = sum(fitres.num_examples for _, fitres in replies)
        if not members or weight <= 0:
            return results
        mean = secagg.aggregate_mean(replies)
        tensors = {
            n: (adapter[n].double() + m.reshape(adapter[n].shape)).to(adapter[n].dtype)
            for n, m in zip(names, mean, strict=True)
        }
        if on_client is not None:
            for cid in members:
                on_client(cid)
        return [SecureSum(AGGREGATE_ID, int(weight), tensors, members=members, noise_shares=shares), *results]

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[tuple[int, Message]]:
        """Send, wait (up to `timeout`, default federation.timeout) and pair each reply with the node
        its message went to. Replies are matched by message id (the grid sets the ids when it
        pushes): an error the SuperLink makes for an unreachable node comes from the SuperLink."""
        if not messages:
            return []
        timeout = self.timeout if timeout is None else timeout
        replies = list(self.grid.send_and_receive(messages, timeout=None if math.isinf(timeout) else timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return [(node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]

    def _result(self, cid: int, nid: int, reply: Message, shapes: Shapes) -> ClientResult:
        if reply.has_error():
            return ClientFailure(cid, f"node {nid} failed: {node_text(reply.error.reason)}")
        return wire.read_train_reply(reply.content, cid, nid, shapes)

    # -- evaluation of personalised models (FedSA): on the nodes, which hold the personal parts --
    def evaluate_personal(
        self, state: AdapterState, plan: LocalTraining, evaluate: Callable[[AdapterState], Scores]
    ) -> list[Scores]:
        """Each node that has trained evaluates the global adapter with its own kept tensors on the
        server's test split (which it derives from the spec); the nodes that answer are returned.
        (`evaluate` is not used: the kept tensors never leave the nodes.)"""
        self._discover()
        adapter = wire.to_record({n: t for n, t in state.tensors.items() if n not in plan.keeps})
        messages = [
            Message(wire.evaluate_message(self.spec_json, adapter), nid, MessageType.EVALUATE)
            for nid in sorted(set(self.nodes.values()))
        ]
        scores = []
        for nid, reply in self._exchange(messages):
            if reply.has_error():
                log.warning("node %d could not evaluate: %s", nid, node_text(reply.error.reason))
                continue
            scores += wire.read_evaluate_reply(reply.content, {c for c, n in self.nodes.items() if n == nid})
        return scores

    # -- the executor contract: client state lives on the nodes -----------------------------
    def client_states(self) -> dict:
        return {}

    def load_client_states(self, states: dict) -> None:
        pass
