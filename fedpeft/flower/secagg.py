"""Secure aggregation with Flower's SecAgg+ (`federation.secagg`): the server learns only the sum.

A round is Flower's own SecAggPlusWorkflow (server) and secaggplus_mod (nodes: client_app.when_asked)
in the installed flwr: setup (public keys), share keys (encrypted Shamir shares), collect masked
vectors (the nodes train and upload their update quantised and masked), unmask (shares of the masks
of the nodes that stayed, and of the keys of those that dropped out, so their masks cancel). The
workflow hands the unmasked aggregate to a legacy Strategy; here that strategy only collects it
(`_Collect`), and the grid executor turns it into one `SecureSum`: the server-side code never
holds one node's update.

What each node puts into the sum is its clients' change from what they were sent, weighted: the
weighted mean over its trained clients of (upload - sent), with the sum of their weights (their
public aggregation weights) as the node's weight, so the protocol's weighted mean is the plain
example-weighted mean over every client. Under client-level DP (privacy.client_epsilon) the noise
is distributed: each client clips its change to S and adds its share N(0, (z S)^2 / m) of the noise
(fedpeft.privacy.client_level), weights are uniform, and the server only rescales the sum.

The protocol's numbers: every node shares its keys with every other (SHARE_FRACTION) and fewer than
half of a round's nodes may drop out (THRESHOLD); values are quantised over [-RANGE, RANGE] to
2^22 levels with stochastic rounding (unbiased; error below 2 RANGE / 2^22 * max_weight / weight
per coordinate), masks are mod 2^32, which bounds a round to fewer than MAX_NODES nodes. A node
whose change leaves the range saturates into it (logged on the node only): failing would tell the
server one bit of the update. Under sample-level DP that is post-processing of the node's DP output.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpeft.config import ConfigError
from fedpeft.executors.base import ClientFailure, ClientResult
from fedpeft.flower import wire
from fedpeft.privacy.client_level import ClientLevelDP

__all__ = ["MAX_NODES", "RANGE", "node_reply", "secure_round"]

SHARE_FRACTION = 1.0  # SecAgg+ num_shares as a fraction of the round's nodes: all of them
THRESHOLD = 0.5  # shares needed to rebuild a dropped node's key: fewer than half may drop out
RANGE = 8.0  # SecAgg+ clipping range of every coordinate of a node's weighted change
MAX_NODES = 1024  # n quantised vectors (< 2^22 each) must sum below the 2^32 modulus

log = logging.getLogger("fedpeft")


class _Collect:
    """The legacy Strategy SecAggPlusWorkflow drives: it hands out this round's instructions and
    keeps what `aggregate_fit` receives (the unmasked aggregate in every FitRes, with each node's
    weight and clear-text metrics)."""

    def __init__(self, instructions: dict[int, FitIns]) -> None:
        self.instructions = instructions
        self.results: list[tuple[int, FitRes]] | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201, ARG002
        return [(SimpleNamespace(node_id=nid), ins) for nid, ins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201, ARG002
        self.results = [(proxy.node_id, fitres) for proxy, fitres in results]
        return None, {}


def secure_round(
    grid: Grid, round_num: int, instructions: dict[int, FitIns], max_weight: float, timeout: float
) -> list[tuple[int, FitRes]] | None:
    """One SecAgg+ round over the nodes in `instructions`: [(node, FitRes)] of the nodes inside
    the aggregate (every FitRes carries the same aggregate: the weighted mean of their vectors),
    or None when the protocol halted (too few nodes stayed)."""
    collect = _Collect(instructions)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=collect)  # type: ignore[arg-type]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_num})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        SHARE_FRACTION, THRESHOLD, max_weight=max_weight, clipping_range=RANGE,
        timeout=None if math.isinf(timeout) else timeout,
    )  # fmt: skip
    workflow(grid, context)
    return collect.results


def aggregate_mean(results: list[tuple[int, FitRes]]) -> list[torch.Tensor]:
    """The unmasked weighted mean the protocol put into every FitRes."""
    return [torch.from_numpy(a.copy()) for a in parameters_to_ndarrays(results[0][1].parameters)]


# -- node side ---------------------------------------------------------------------------------------
def node_reply(node, content: RecordDict, context: Context) -> RecordDict:  # noqa: ANN001
    """Train this node's clients as a plain round does, then answer with their weighted mean
    change (clipped and noised per client under client-level DP) for the mod to mask."""
    secure = wire.read_secure_train(content)
    request = secure.request
    results: list[ClientResult] = node.train(request, context)
    worker = node.worker(request.spec_json)
    spec = worker.spec
    sent = worker.template.with_tensors(request.adapter)
    client_dp = ClientLevelDP.from_spec(spec) if secure.shares else None
    total = {n: torch.zeros_like(request.adapter[n], dtype=torch.float64) for n in secure.names}
    weight = 0
    for result in results:
        if isinstance(result, ClientFailure):
            continue
        if client_dp is not None:  # distributed client-level DP: clipped, noised, weight 1
            change, w = client_dp.noise_share(result, sent, secure.shares), 1
        else:
            change, w = (
                {n: result.tensors[n].double() - sent.tensors[n].double() for n in secure.names},
                result.num_examples,
            )
        weight += w
        for n in secure.names:
            total[n] += w * change[n]
    mean = [total[n] / max(weight, 1) for n in secure.names]
    if weight > secure.max_weight:
        raise ConfigError(f"this node's weight {weight} exceeds the round's max_weight {secure.max_weight:g}")
    # saturate into SecAgg+'s range instead of failing: a failure would tell the server one bit of this
    # node's update; how many coordinates saturated is a statistic of the data, logged here only
    limit = RANGE * secure.max_weight / max(weight, 1)
    saturated = sum(int((t.abs() > limit).sum()) for t in mean)
    if saturated:
        log.warning("node %s: %d coordinate(s) saturated at SecAgg+'s range +-%g", context.node_id, saturated, RANGE)
        mean = [t.clamp(-limit, limit) for t in mean]
    return wire.secure_reply(mean, weight, results, spec.privacy.enabled)
