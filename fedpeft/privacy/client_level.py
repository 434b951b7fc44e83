"""Client-level DP: DP-FedAvg with central or distributed noise (McMahan et al., ICLR 2018; REFERENCE.md section 4).

The unit of privacy is a whole client: the run's output changes little when one client's data are
added or removed. Each round:

1. clients are sampled by Poisson sampling, each independently with rate q_c = clients_per_round /
   clients (the sampling the subsampled-Gaussian accountant analyses; the fixed-size sampling of
   other runs is not covered by it);
2. each sampled client's update u_k (its uploaded tensors minus what it was sent, all of them as
   one vector) is clipped to norm S (`privacy.client_clip`);
3. the server adds N(0, (z S)^2) to every coordinate of the sum and divides by the expected number
   of clients q_c N, a fixed denominator that does not depend on who was sampled (weights are
   uniform: an example count would leak);
4. the strategy takes the global adapter plus that noised mean as the round's one update, which
   is exact for the sum-only strategies (fedavg, ffa, fedsvd, fedsa), the only ones allowed.

An empty sample still adds the noise.

Distributed noise (under secure aggregation, `federation.secagg`): the server never sees one update,
so it cannot clip or noise them. Each of the m clients asked to train clips its own change to S and
adds N(0, (z S)^2 / m) (`noise_share`, from the node's secret randomness); the sum of the n <= m
that arrive carries N(0, (z S)^2 n / m), and the server only divides by q_c N (`finish`). A client
that drops out takes its share with it: the round's realised multiplier is z sqrt(n / m)
(`realised`), and the run's epsilon composes the realised multipliers (never the planned z), so a
dropout raises the epsilon reported instead of hiding an overrun. z is calibrated before round 1 so that `rounds` compositions
of the subsampled Gaussian (rate q_c, noise multiplier z) stay within `privacy.client_epsilon` at
`privacy.delta`, with the same Opacus accountants and calibration as sample-level DP-SGD
(fedpeft.privacy.accounting).

Trust: the server is the trusted curator (central DP). What the guarantee covers is what leaves
it: the global adapter after every round (what clients download, the export). Its own log
(rounds.jsonl: who was sampled, each update's statistics) is the curator's and is not covered, and
the amplification by sampling needs the sample to stay secret: with `privacy.noise = "secret"`,
and always under Flower (every node holds the spec), both the sample and the noise come from the
server's secret randomness (fedpeft.privacy.randomness); with "seeded" (the in-process default)
they follow from the spec, so, as for sample-level DP, the run is reproducible and the guarantee
is the simulator's own.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from fedpeft.config import Spec
from fedpeft.privacy.accounting import calibrate_sigma, epsilon
from fedpeft.privacy.randomness import SecretKey, Source, as_source, source_for
from fedpeft.state import AdapterState, ClientUpdate

__all__ = ["ClientLevelDP", "clip_update", "poisson_clients", "randomness"]

AGGREGATE_ID = -1  # the client id of the one noised update the strategy aggregates


def poisson_clients(source: Source | torch.Generator, num_clients: int, rate: float) -> list[int]:
    """Each client joins independently with probability `rate` (may be none, may be all)."""
    return torch.nonzero(as_source(source).rand(num_clients) < rate).squeeze(1).tolist()


def clip_update(update: ClientUpdate, sent: AdapterState, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """The client's change (upload - what it was sent) scaled to norm at most `clip`, in float64,
    and its norm before clipping."""
    delta = {n: t.double() - sent.tensors[n].double() for n, t in update.tensors.items()}
    norm = float(torch.sqrt(sum(d.pow(2).sum() for d in delta.values()))) if delta else 0.0
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: d * factor for n, d in delta.items()}, norm


@dataclass(frozen=True)
class ClientLevelDP:
    """The spec's client-level mechanism: sampling rate q_c, noise multiplier z, clip S."""

    rate: float
    noise_multiplier: float
    clip: float
    num_clients: int
    delta: float
    accountant: str
    secret: bool

    @classmethod
    def from_spec(cls, spec: Spec, secret: bool = False) -> ClientLevelDP | None:
        """The spec's mechanism; `secret` forces secret sampling and noise whatever privacy.noise says
        (the ServerApp: under Flower every node holds the spec, so seeded draws would be theirs too)."""
        priv, fed = spec.privacy, spec.federation
        if not priv.client_enabled:
            return None
        rate = fed.clients_per_round / fed.clients
        z = calibrate_sigma(priv.client_epsilon, priv.delta, rate, fed.rounds, priv.accountant)
        return cls(
            rate, z, priv.client_clip, fed.clients, priv.delta, priv.accountant, secret or priv.noise == "secret"
        )

    def sample(self, seed: int) -> list[int]:
        """This round's clients: from the round's seed, or from secret randomness (`secret`)."""
        return poisson_clients(self._source(seed, "client-sampling"), self.num_clients, self.rate)

    def _source(self, seed: int, purpose: str) -> Source:
        """A fresh secret key's stream (`secret`), or the round's seeded generator."""
        return source_for(SecretKey.draw() if self.secret else seed, purpose)

    def epsilon(self, rounds: int, realised: list[float] | None = None) -> float:
        """Client-level epsilon after `rounds` rounds (every round counts, a client sampled or not);
        `realised`: each round's noise multiplier when it differs from z (distributed noise)."""
        noise = realised if realised is not None else [self.noise_multiplier] * rounds
        counts = Counter(noise)
        return (
            epsilon(tuple((z, self.rate, k) for z, k in sorted(counts.items())), self.delta, self.accountant)
            if noise
            else 0.0
        )

    def realised(self, members: int, shares: int) -> float:
        """The noise multiplier of a distributed round where `members` of `shares` noised clients
        arrived (z when none did: nothing was released)."""
        return self.noise_multiplier * math.sqrt(members / shares) if members else self.noise_multiplier

    def noise_share(self, update: ClientUpdate, sent: AdapterState, shares: int) -> dict[str, torch.Tensor]:
        """One client's part of a distributed round: its change clipped to S plus its share
        N(0, (z S)^2 / shares) of the noise, drawn from secret randomness (on the client's node)."""
        clipped, _ = clip_update(update, sent, self.clip)
        source = SecretKey.draw().stream("client-noise-share")
        std = self.noise_multiplier * self.clip / math.sqrt(shares)
        return {n: d + source.normal(std, d.shape, True, "cpu").double() for n, d in clipped.items()}

    def finish(self, total: ClientUpdate, sent: AdapterState, members: int) -> ClientUpdate:
        """A distributed round's update from the securely aggregated mean of the members' noised
        changes (`total.tensors` = sent + that mean): sent + (their sum) / (q_c N)."""
        scale = members / (self.rate * self.num_clients)
        tensors = {
            n: (sent.tensors[n].double() + (t.double() - sent.tensors[n].double()) * scale).float()
            for n, t in total.tensors.items()
        }
        return ClientUpdate(AGGREGATE_ID, 1, tensors)

    def aggregate(
        self, updates: list[ClientUpdate], sent: AdapterState, names: list[str], seed: int
    ) -> tuple[ClientUpdate, list[float]]:
        """One update carrying sent + (sum_k clip(u_k) + N(0, (z S)^2 I)) / (q_c N) on `names`, and
        the norms of the updates before clipping (for the curator's log, to choose S)."""
        source = self._source(seed, "client-noise")
        total = {n: torch.zeros_like(sent.tensors[n], dtype=torch.float64) for n in names}
        norms = []
        for update in updates:
            clipped, norm = clip_update(update, sent, self.clip)
            norms.append(norm)
            for n in names:
                total[n] += clipped[n]
        expected = self.rate * self.num_clients
        std = self.noise_multiplier * self.clip
        tensors = {
            n: (
                sent.tensors[n].double() + (t + source.normal(std, t.shape, self.secret, "cpu").double()) / expected
            ).float()
            for n, t in total.items()
        }
        return ClientUpdate(AGGREGATE_ID, 1, tensors), norms


def randomness(sample_level: str | None, client_dp: ClientLevelDP | None, spec: Spec) -> dict[str, str]:
    """Where each mechanism's randomness came from (summary.json): "seeded" (reproducible from the
    spec: the simulator's own guarantee) or "secret" (a key drawn where it runs, never sent).
    `sample_level`: the executor's noise under DP-SGD (None: off). Under secure aggregation every
    node draws its own share of the client-level noise."""
    where = {"sample_level": sample_level} if sample_level is not None else {}
    if client_dp is not None:
        server = "secret" if client_dp.secret else "seeded"
        where |= {"client_sampling": server, "client_noise": "secret" if spec.federation.secagg else server}
    return where
