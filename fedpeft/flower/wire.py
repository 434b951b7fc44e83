"""Everything that crosses the wire between the server and a Flower node: every key and record
layout, written and read here and nowhere else (the grid executor and the ClientApp both use it).

One RecordDict per message:

  server -> node  query     {}
  node -> server  query     config: partition-id, num-partitions
  server -> node  train     adapter (ArrayRecord: the global adapter without what clients keep)
                            config (ConfigRecord: round, clients, spec JSON; seeds only with privacy
                            off: under DP a node draws its clients' batches and noise in secret)
  node -> server  train     update.<c> (ArrayRecord) and metrics.<c> (MetricRecord) per client that
                            trained; status (ConfigRecord: refused = JSON {client: category})
  server -> node  evaluate  adapter, config (spec JSON)
  node -> server  evaluate  metrics.<c> (MetricRecord) per client with a personalised model

Under secure aggregation (fedpeft.flower.secagg) a round is SecAgg+'s four train messages; the one
that trains carries a legacy FitIns (the adapter; round, clients, spec, names, shares, max_weight)
and the node's FitRes parameters are masked and removed by the secaggplus mod before it leaves.

What may leave a node is written once, in REPLY_FIELDS: every value of a node's replies (train
replies unprefixed, the others as "query:" and "evaluate:"), whether it is DP output or a function
of public values, and why. Under DP, `train_reply` sends nothing else (tests/test_privacy.py walks
real replies of every kind against the table).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedpeft.config import Spec
from fedpeft.executors.base import ClientFailure, ClientResult
from fedpeft.flower.policy import refusal_category
from fedpeft.flower.untrusted import Shapes, array_size_error, node_text
from fedpeft.state import ClientUpdate

__all__ = [
    "NUM_PARTITIONS", "PARTITION_ID", "TrainRequest", "from_record", "node_clients", "query_reply", "read_evaluate",
    "read_evaluate_reply", "read_query_reply", "read_train", "read_train_reply", "spec_from_json", "spec_to_json",
    "to_record", "evaluate_message", "evaluate_reply", "train_message", "train_reply", "SecureTrain", "secure_fitins",
    "is_secure_train", "read_secure_train", "secure_reply", "read_secure_metrics",
]  # fmt: skip

# node config keys (set by Flower's simulation, or --node-config on a SuperNode)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

# record names in a message
ADAPTER = "adapter"
CONFIG = "config"
STATUS = "status"
# keys of the server's config record
ROUND, CLIENTS, SEEDS, SPEC = "round", "clients", "seeds", "spec"
# keys of a node's records
REFUSED = "refused"
NUM_EXAMPLES = "num_examples"
RANK = "rank"


# What each value of a node's train reply is, and why it may leave the node (docs/privacy.md).
DP_OUTPUT = "DP output"
PUBLIC = "public"
NON_PRIVATE = "privacy off only"
INDEPENDENT = "independent of the data"  # secure aggregation's key material: fresh randomness
_PROTOCOL = {"pk1": "public key", "pk2": "public key", "dsts": "share destinations", "ctxts": "encrypted key shares"}
_PROTOCOL |= {"nids": "owners of key shares", "shares": "key shares"}
# fmt: off
REPLY_FIELDS: dict[str, tuple[str, str]] = {
    "update.<c>": (DP_OUTPUT, "the uploaded adapter tensors after DP-SGD: clipped, noised, post-processed"),
    "metrics.<c>.steps": (PUBLIC, "train.local_steps: every step is taken, an empty Poisson sample too"),
    "metrics.<c>.epsilon": (PUBLIC, "the ledger's epsilon: a function of (sigma, q, steps), all public"),
    "metrics.<c>.sigma": (PUBLIC, "calibrated from the spec and the client's public size"),
    "metrics.<c>.num_examples": (PUBLIC, "the aggregation weight q * public size * steps"),
    "metrics.<c>.rank": (PUBLIC, "the client's LoRA rank, from the spec's model.client_ranks"),
    "status.refused": (PUBLIC, "clients that did not train and why: a fixed category (policy.REFUSALS), never a number"),
    "metrics.<c>.train_loss": (NON_PRIVATE, "mean loss on the sampled batches: a statistic of the private data"),
    "metrics.<c>.examples_seen": (NON_PRIVATE, "how many examples the Poisson samples drew: private"),
    "metrics.<c>.seconds": (NON_PRIVATE, "the client's training time: a timing channel"),
    **{f"secure:fitres.metrics.metrics.<c>.{key}": (PUBLIC, f"as metrics.<c>.{key}, in the clear beside the sum")
       for key in ("epsilon", "sigma", "steps", "num_examples")},
    "secure:fitres.metrics.refused": (PUBLIC, "as status.refused"),
    "secure:fitres.num_examples.num_examples": (PUBLIC, "the node's weight: the sum of its clients' public weights"),
    **{f"secure:fitres.status.{key}": (PUBLIC, "the legacy FitRes status: always OK") for key in ("code", "message")},
    **{f"secure:secaggplus_configs.{key}": (INDEPENDENT, f"SecAgg+ {what}: fresh key material, no function of data")
       for key, what in _PROTOCOL.items()},
    "secure:secaggplus_configs.masked_params": (DP_OUTPUT, "the node's weighted mean change (of DP-SGD output; "
        "under distributed client-level DP clipped and noised too), quantised and masked: uniform without the masks"),
    "query:config.partition-id": (PUBLIC, "the node's partition: its node config, which the operator sets"),
    "query:config.num-partitions": (PUBLIC, "how many partitions: node config"),
    "evaluate:metrics.<c>.accuracy": (DP_OUTPUT, "the personalised model (global adapter + the client's kept "
        "tensors, trained by DP-SGD) on the server's public test split: post-processing of DP output"),
    **{f"evaluate:metrics.<c>.{key}": (DP_OUTPUT, "as evaluate:metrics.<c>.accuracy") for key in ("loss", "f1_macro", "mcc")},
}
# fmt: on
_TRAIN_METRICS = {k.removeprefix("metrics.<c>."): v[0] for k, v in REPLY_FIELDS.items() if k.startswith("metrics.")}
_METRICS_UNDER_DP = frozenset(k for k, kind in _TRAIN_METRICS.items() if kind == PUBLIC)


def update_key(cid: int) -> str:
    return f"update.{cid}"


def metrics_key(cid: int) -> str:
    return f"metrics.{cid}"


def node_clients(partition_id: int, num_partitions: int, num_clients: int) -> list[int]:
    """The clients node `partition_id` of `num_partitions` holds: every c with c % N == k."""
    return list(range(partition_id, num_clients, num_partitions))


# -- tensors and specs ---------------------------------------------------------------------------
def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # copy: the numpy buffer behind a received array is read-only
    return {name: t.clone() for name, t in record.to_torch_state_dict().items()}


def spec_to_json(spec: Spec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, default=str)


def spec_from_json(text: str) -> Spec:
    return Spec.from_dict(json.loads(text))


# -- query: which partition is a node ------------------------------------------------------------
def query_reply(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})})


def read_query_reply(content: RecordDict) -> tuple[int, int]:
    """(partition-id, num-partitions) of a query reply; ValueError saying what is wrong otherwise."""
    config = content.get(CONFIG)
    if not isinstance(config, ConfigRecord) or PARTITION_ID not in config or NUM_PARTITIONS not in config:
        raise ValueError(f"no {CONFIG} with {PARTITION_ID} and {NUM_PARTITIONS}")
    k, n = config[PARTITION_ID], config[NUM_PARTITIONS]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, n)):
        raise ValueError(f"{PARTITION_ID} = {k!r}, {NUM_PARTITIONS} = {n!r} are not integers")
    return k, n


# -- train -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainRequest:
    round: int
    clients: list[int]
    seeds: dict[int, int]  # empty under DP
    spec_json: str
    adapter: dict[str, torch.Tensor]


def train_message(
    round_num: int, clients: list[int], spec_json: str, adapter: ArrayRecord, seeds: list[int] | None = None
) -> RecordDict:
    """`seeds`: only with privacy off (reproducible batches); under DP the node draws its own."""
    config = ConfigRecord({ROUND: round_num, CLIENTS: clients, SPEC: spec_json})
    if seeds is not None:
        config[SEEDS] = seeds
    return RecordDict({ADAPTER: adapter, CONFIG: config})


def read_train(content: RecordDict) -> TrainRequest:
    config = content[CONFIG]
    cids = [int(c) for c in config[CLIENTS]]
    seeds = dict(zip(cids, (int(s) for s in config[SEEDS]), strict=True)) if SEEDS in config else {}
    return TrainRequest(int(config[ROUND]), cids, seeds, str(config[SPEC]), from_record(content[ADAPTER]))


def _leaving_metrics(result: ClientUpdate, private: bool) -> dict[str, float | int]:
    """What of `result`'s metrics may leave the node (under DP: REPLY_FIELDS' public ones), and its weight."""
    kept = {k: float(v) for k, v in result.metrics.items() if not private or k in _METRICS_UNDER_DP}
    return {**kept, NUM_EXAMPLES: result.num_examples}


def train_reply(results: list[ClientResult], private: bool) -> RecordDict:
    """A node's reply: every update with its metrics, and why the others sent none. `private`
    (privacy on): only the values REPLY_FIELDS marks DP output or public leave the node."""
    content = RecordDict()
    refused: dict[str, str] = {}
    for result in results:
        cid = result.client_id
        if isinstance(result, ClientFailure):
            refused[str(cid)] = refusal_category(result.reason) if result.refused else result.reason
            continue
        metrics = _leaving_metrics(result, private)
        if result.rank is not None:
            metrics[RANK] = result.rank
        content[update_key(cid)] = to_record(dict(result.tensors))
        content[metrics_key(cid)] = MetricRecord(metrics)
    content[STATUS] = ConfigRecord({REFUSED: json.dumps(refused)})
    return content


def read_train_reply(content: RecordDict, cid: int, nid: int, shapes: Shapes | None = None) -> ClientResult:
    """Client `cid`'s result in node `nid`'s reply; a ClientFailure saying what is wrong with a reply
    that is not what `train_reply` writes (`shapes`: the expected uploads, checked before decoding)."""
    try:
        return _read_train_reply(content, cid, nid, shapes)
    except _Malformed as exc:
        return ClientFailure(cid, f"node {nid} sent a malformed reply: {exc}")
    except Exception as exc:  # a record Flower itself cannot decode
        return ClientFailure(cid, f"node {nid} sent a malformed reply: {type(exc).__name__}: {node_text(exc, 200)}")


class _Malformed(ValueError):
    pass


def _read_train_reply(content: RecordDict, cid: int, nid: int, shapes: Shapes | None) -> ClientResult:
    if STATUS not in content or not isinstance(content[STATUS], ConfigRecord) or REFUSED not in content[STATUS]:
        raise _Malformed(f"no {STATUS}.{REFUSED}")
    try:
        refused = json.loads(str(content[STATUS][REFUSED]))
    except json.JSONDecodeError:
        raise _Malformed(f"{STATUS}.{REFUSED} is not JSON") from None
    if not isinstance(refused, dict) or not all(isinstance(v, str) for v in refused.values()):
        raise _Malformed(f"{STATUS}.{REFUSED} is not an object of reasons")
    if str(cid) in refused:
        return ClientFailure(cid, node_text(refused[str(cid)]), refused=True)
    if update_key(cid) not in content:
        return ClientFailure(cid, f"node {nid} sent no update for client {cid}")
    if not isinstance(content[update_key(cid)], ArrayRecord):
        raise _Malformed(f"{update_key(cid)} is not an ArrayRecord")
    if not isinstance(content.get(metrics_key(cid)), MetricRecord):
        raise _Malformed(f"no {metrics_key(cid)}")
    metrics = dict(content[metrics_key(cid)].items())
    if unknown := sorted(set(metrics) - set(_TRAIN_METRICS)):  # a key is the node's text: escaped, capped
        raise _Malformed(f"{metrics_key(cid)}: {node_text(unknown[0], 40)!r} is no key a reply carries")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Malformed(f"{metrics_key(cid)}.{key} = {node_text(repr(value), 60)} is not a finite number")
    num_examples = metrics.pop(NUM_EXAMPLES, None)
    if not isinstance(num_examples, int):
        raise _Malformed(f"{metrics_key(cid)}.{NUM_EXAMPLES} = {node_text(repr(num_examples), 60)} is not an integer")
    rank = metrics.pop(RANK, None)
    if rank is not None and not isinstance(rank, int):
        raise _Malformed(f"{metrics_key(cid)}.{RANK} = {node_text(repr(rank), 60)} is not an integer")
    if shapes is not None and (why := array_size_error(content[update_key(cid)], shapes)):
        raise _Malformed(why)
    return ClientUpdate(cid, num_examples, from_record(content[update_key(cid)]), metrics, rank)


# -- secure aggregation: a legacy FitIns in, a legacy FitRes out (fedpeft.flower.secagg) -----------
NAMES, SHARES, MAX_WEIGHT = "names", "shares", "max_weight"


@dataclass(frozen=True)
class SecureTrain:
    request: TrainRequest
    names: list[str]  # the uploaded tensors, in the order of the masked vector
    shares: int  # clients asked to add a share of client-level noise (0: no client-level DP)
    max_weight: float  # the largest weight a node may send (SecAgg+ quantises weight / max_weight)


def secure_fitins(
    round_num: int, clients: list[int], spec_json: str, adapter: dict[str, torch.Tensor], names: list[str],
    shares: int, max_weight: float, seeds: list[int] | None = None,
) -> FitIns:  # fmt: skip
    order = sorted(adapter)
    config = {ROUND: round_num, CLIENTS: json.dumps(clients), SPEC: spec_json, NAMES: json.dumps(names),
              SHARES: shares, MAX_WEIGHT: float(max_weight), ADAPTER: json.dumps(order)}  # fmt: skip
    if seeds is not None:
        config[SEEDS] = json.dumps(seeds)
    return FitIns(ndarrays_to_parameters([adapter[n].detach().cpu().numpy() for n in order]), config)


def is_secure_train(content: RecordDict) -> bool:
    return any(key.startswith("fitins.") for key in content)


def read_secure_train(content: RecordDict) -> SecureTrain:
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    arrays = parameters_to_ndarrays(fitins.parameters)
    adapter = {n: torch.from_numpy(a.copy()) for n, a in zip(json.loads(str(config[ADAPTER])), arrays, strict=True)}
    cids = [int(c) for c in json.loads(str(config[CLIENTS]))]
    seeds = dict(zip(cids, (int(x) for x in json.loads(str(config[SEEDS]))), strict=True)) if SEEDS in config else {}
    request = TrainRequest(int(config[ROUND]), cids, seeds, str(config[SPEC]), adapter)
    return SecureTrain(request, json.loads(str(config[NAMES])), int(config[SHARES]), float(config[MAX_WEIGHT]))


def secure_reply(mean: list[torch.Tensor], weight: int, results: list[ClientResult], private: bool) -> RecordDict:
    """A node's FitRes: its weighted mean change (masked by the secaggplus mod before it leaves),
    its weight, each trained client's public metrics and why the others did not train."""
    metrics: dict[str, int | float | str] = {}
    refused = {}
    for result in results:
        if isinstance(result, ClientFailure):
            refused[str(result.client_id)] = refusal_category(result.reason) if result.refused else result.reason
            continue
        values = _leaving_metrics(result, private)
        metrics.update({f"{metrics_key(result.client_id)}.{k}": v for k, v in values.items()})
    metrics[REFUSED] = json.dumps(refused)
    parameters = ndarrays_to_parameters([t.detach().cpu().double().numpy() for t in mean])
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), parameters, weight, metrics), keep_input=True)


def read_secure_metrics(metrics: dict, clients: list[int]) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """(each trained client's metrics, why the others did not train) from a node's FitRes metrics;
    ValueError when they are not what `secure_reply` writes."""
    refused = json.loads(str(metrics.get(REFUSED, "{}")))
    trained: dict[int, dict[str, float]] = {}
    for cid in clients:
        prefix = f"{metrics_key(cid)}."
        values = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()
        ):
            raise ValueError(f"client {cid}'s metrics are not finite numbers")
        if values:
            trained[cid] = {k: float(v) for k, v in values.items() if k != NUM_EXAMPLES}
    return trained, {int(c): node_text(r) for c, r in refused.items() if int(c) in clients}


# -- evaluate (personalised models, on the nodes that hold them) -----------------------------------
def evaluate_message(spec_json: str, adapter: ArrayRecord) -> RecordDict:
    return RecordDict({ADAPTER: adapter, CONFIG: ConfigRecord({SPEC: spec_json})})


def read_evaluate(content: RecordDict) -> tuple[str, dict[str, torch.Tensor]]:
    return str(content[CONFIG][SPEC]), from_record(content[ADAPTER])


def evaluate_reply(scores: dict[int, dict[str, float]]) -> RecordDict:
    return RecordDict({metrics_key(cid): MetricRecord(s) for cid, s in scores.items()})


def read_evaluate_reply(content: RecordDict, held: set[int]) -> list[dict[str, float]]:
    """The personalised scores in an evaluate reply, one per client the node holds (`held`): an accuracy
    in [0, 1], a finite loss >= 0, and a macro-F1 in [0, 1] and an MCC in [-1, 1] where given. Any other
    record (a client the node does not hold, another key, an impossible score) is left out."""
    scores, bounds = [], {"accuracy": (0.0, 1.0), "loss": (0.0, math.inf), "f1_macro": (0.0, 1.0), "mcc": (-1.0, 1.0)}
    for cid in sorted(held):
        record = content.metric_records.get(metrics_key(cid))
        values = dict(record.items()) if record is not None else {}
        ok = {"accuracy", "loss"} <= set(values) <= set(bounds) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())  # fmt: skip
        if ok and all(bounds[k][0] <= v <= bounds[k][1] and v < math.inf for k, v in values.items()):
            scores.append({k: float(v) for k, v in values.items()})
    return scores
