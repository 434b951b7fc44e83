"""A node's privacy policy (its node config) and the fixed words a refusal may carry to the server.

Two sets of defaults (docs/privacy.md, "A node's policy"):
- a node training on its own data (`data-file` in its node config: a real SuperNode) refuses to train
  without DP and stops at a lifetime epsilon of 10 at delta <= min(1e-5, 1/(10 public-size)), unless its operator sets
  otherwise (`max-epsilon`, `max-delta`, `allow-no-dp`). 10 is above the budgets the papers
  compared here report (3-8), so their specs run, and finite, so a node whose operator took no extra
  step is never unlimited; delta well below 1/n, since at 1/n releasing one random record qualifies;
- a node of Flower's simulation on the bundled demo data keeps the permissive defaults (no limit,
  privacy off allowed): that data is public, and the quickstart must run without node config.
The node logs its policy at its first message. A refusal tells the server one of REFUSALS, never a
number from the node's data, ledger or policy: the details stay in the node's own log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Context

from fedpeft.config import Spec

__all__ = ["BUDGET", "POLICY", "REAL_MAX_EPSILON", "REFUSALS", "Policy", "refusal_category"]

DATA_FILE = "data-file"
PUBLIC_SIZE = "public-size"
REAL_MAX_EPSILON = 10.0  # a data-file node's lifetime max-epsilon when its operator sets none
POLICY = "policy"  # the node's policy refuses this spec (or its ledger cannot take it)
BUDGET = "budget exhausted"  # this round would spend past the run's or the data's lifetime budget
REFUSALS = (POLICY, BUDGET)
DATA_FILE_PROBLEM = "this node's data-file cannot be used (the reason is in the node's log)"  # all the server sees
NO_STATE_DIR = (
    f"a node with a {DATA_FILE} needs state-dir=DIR in its node config: where its privacy ledgers live (a default "
    "directory would give the same data a fresh budget in a container or as another user)"
)


def refusal_category(reason: str) -> str:
    """What the server may read of a refusal: `reason` if it is a category, else the budget's (the
    executors refuse only when a ledger cannot take the round)."""
    return reason if reason in REFUSALS else BUDGET


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@dataclass(frozen=True)
class Policy:
    """The node's own privacy floor (node config): the server can ask, it cannot go below this.
    max_epsilon bounds the lifetime epsilon of each of the node's data (fedpeft.flower.lifetime)."""

    max_epsilon: float = math.inf
    max_delta: float = 1.0
    allow_no_dp: bool = True
    own_data: bool = False  # trains on its data-file: the secure defaults apply

    @classmethod
    def of(cls, context: Context) -> Policy:
        config = context.node_config
        own = DATA_FILE in config
        size = config.get(PUBLIC_SIZE)
        # min(1e-5, 1/(10 n)): at delta 1/n "publish one random record" is (0, 1/n)-DP, and a larger
        # allowed delta lets a server buy less noise per run (docs/privacy.md)
        delta = min(1e-5, 0.1 / int(size)) if own and size and int(size) > 0 else (1e-5 if own else 1.0)
        return cls(
            float(config.get("max-epsilon", REAL_MAX_EPSILON if own else math.inf)),
            float(config.get("max-delta", delta)),
            _flag(config.get("allow-no-dp", not own)),
            own,
        )

    def describe(self) -> str:
        origin = "defaults for a node with its own data-file" if self.own_data else "simulation defaults"
        return (
            f"node policy: max-epsilon {self.max_epsilon:g} over each data's lifetime, max-delta {self.max_delta:g}, "
            f"allow-no-dp {str(self.allow_no_dp).lower()} (node config over {origin})"
        )

    def violation(self, spec: Spec) -> str | None:
        """Why this node refuses `spec` (for its own log; the server is told POLICY), or None."""
        priv = spec.privacy
        if not priv.enabled:
            return None if self.allow_no_dp else "node policy: refuses to train without DP (allow-no-dp=false)"
        if priv.epsilon > self.max_epsilon:
            return f"node policy: spec asks epsilon {priv.epsilon:g} > this node's max-epsilon {self.max_epsilon:g}"
        if priv.delta > self.max_delta:
            return f"node policy: spec asks delta {priv.delta:g} > this node's max-delta {self.max_delta:g}"
        return None
