"""Federation spec: frozen, validated dataclasses.

A spec has six sections (federation, model, data, strategy, privacy, train) and the [sweep] grid.
Every field has one default and one check, here; fedpeft.spec_io reads specs from TOML, from the
flat form (``{"federation.rounds": 5, ...}``, what ``--set`` and Flower's run-config speak) and
writes them back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError", "FederationConfig", "ModelConfig", "DataConfig", "StrategyConfig", "PrivacyConfig",
    "TrainConfig", "SweepConfig", "Spec", "SECTIONS", "OPTIMIZERS", "SCHEDULES", "client_rank",
]  # fmt: skip

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # train.optimizer (fedpeft.optim)
SCHEDULES = ("constant", "linear", "cosine")  # train.schedule


class ConfigError(ValueError):
    """A spec value is invalid; the message says what to change."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = field(default=5, metadata=_help("number of federated rounds"))
    clients: int = field(default=4, metadata=_help("number of clients (data partitions)"))
    clients_per_round: int = field(default=4, metadata=_help("clients sampled each round"))
    min_clients: int = field(default=1, metadata=_help("fewest valid updates to aggregate; fewer: round skipped"))
    seed: int = field(default=0, metadata=_help("seed for everything: same spec + seed, same result"))
    executor: str = field(default="sequential", metadata=_help("who trains the clients: sequential (reference) | cohort (batched)"))  # fmt: skip
    cohort_chunk: int = field(default=0, metadata=_help("cohort executor: clients trained at once; 0 = all sampled"))
    device: str = field(default="auto", metadata=_help("auto (cuda if available, else cpu) | cpu | cuda | cuda:N"))
    timeout: float = field(default=math.inf, metadata=_help(
        "Flower: seconds the server waits for a round's updates; late nodes count as failed. "
        "inf waits for every node (one that goes offline still answers, with an error)"
    ))  # fmt: skip
    secagg: bool = field(default=False, metadata=_help("Flower: SecAgg+ (the server learns only the sum of the updates); sum-only strategies"))  # fmt: skip
    eval_every: int = field(default=1, metadata=_help("score every N rounds and the last round; others log null"))
    eval_subset: int = field(default=0, metadata=_help(
        "score rounds before the last on N seeded test examples (0: the whole split); the last on the whole split"
    ))  # fmt: skip
    update_bound: float = field(default=0.0, metadata=_help(
        "largest accepted norm of a client's change (its upload - what it was sent); larger ones are "
        "dropped. 0 = auto: under DP the most an honest DP-SGD client can move, without DP none; inf = off"
    ))  # fmt: skip
    outlier_norm: float = field(default=0.0, metadata=_help(
        "drop an update whose change norm per unit of its DP noise (sigma sqrt(numbers sent)) is above N x the "
        "round's median (3+ updates, not under secagg); 0 = auto: 1.5 under DP, off without; inf = off"
    ))  # fmt: skip
    continues: int = field(default=0, metadata=_help(
        "Flower: the run id whose node-side state (ledgers, kept tensors) this run continues; 0: its own. "
        "The ServerApp sets it: its run id, or on resume the run's first"
    ))  # fmt: skip
    node_ids: tuple[int, ...] = field(default=(), metadata={"item": int, "help": (
        "Flower: the node id bound to each partition-id k (the operator's map, [id of node 0, ...]); "
        "a node claiming a partition bound to another id is refused. Empty: any node, one per partition"
    )})  # fmt: skip
    public_sizes: tuple[int, ...] = field(default=(), metadata={"item": int, "help": (
        "Flower under DP: the public-size each client k's node declares for its data-file (0 or absent: its "
        "bundled partition's size). The server derives sigma, weight and bounds from these, never from a reply"
    )})  # fmt: skip

    def __post_init__(self) -> None:
        _require(all(n >= 0 for n in self.public_sizes), f"federation.public_sizes must be >= 0 (got {self.public_sizes})")  # fmt: skip
        _require(len(set(self.node_ids)) == len(self.node_ids), f"federation.node_ids names a node twice ({self.node_ids}): one node, one partition")  # fmt: skip
        _require(self.eval_every >= 1, f"federation.eval_every must be >= 1 (got {self.eval_every})")
        _require(self.eval_subset >= 0, f"federation.eval_subset must be >= 0 (got {self.eval_subset})")
        _require(self.update_bound >= 0, f"federation.update_bound must be >= 0 (got {self.update_bound})")
        _require(self.outlier_norm == 0 or self.outlier_norm > 1, f"federation.outlier_norm must be 0 or > 1 (got {self.outlier_norm})")  # fmt: skip
        _require(self.timeout > 0, f"federation.timeout must be > 0 seconds (got {self.timeout})")
        _require(self.rounds >= 1, f"federation.rounds must be >= 1 (got {self.rounds})")
        _require(self.clients >= 1, f"federation.clients must be >= 1 (got {self.clients})")
        _require(
            1 <= self.clients_per_round <= self.clients,
            f"federation.clients_per_round must be between 1 and federation.clients={self.clients} "
            f"(got {self.clients_per_round}); lower it or raise federation.clients",
        )
        _require(1 <= self.min_clients <= self.clients_per_round, f"federation.min_clients must be between 1 and "
                 f"clients_per_round={self.clients_per_round} (got {self.min_clients})")  # fmt: skip
        _require(self.seed >= 0, f"federation.seed must be >= 0 (got {self.seed})")
        _require(self.continues >= 0, f"federation.continues must be >= 0 (got {self.continues})")
        _require(self.cohort_chunk >= 0, f"federation.cohort_chunk must be >= 0 (got {self.cohort_chunk})")
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"federation.device must be auto, cpu, cuda or cuda:N (got {self.device!r})",
        )


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="minilm", metadata=_help(
        "a registered model (`fedpeft list`), a local directory or a Hugging Face id (transformers' Auto classes)"))  # fmt: skip
    rank: int = field(default=8, metadata=_help("LoRA rank r"))
    alpha: float = field(default=8.0, metadata=_help("LoRA alpha; scale = alpha / rank"))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout"))
    targets: tuple[str, ...] = field(
        default=(), metadata=_help("module names LoRA adapts; empty = the model's default")
    )
    train_head: bool = field(default=True, metadata=_help("train the classifier head (else frozen, shared seeded init)"))  # fmt: skip
    head_init: str = field(default="random", metadata=_help(
        "the head before training: random (seeded), label-names (rows = the base encoder's centred, "
        "unit-norm embeddings of the label names) or public (logistic regression on the base encoder's "
        "features of the server's data.public_size examples); all three use no client's data"
    ))  # fmt: skip
    adapter: str = field(default="lora", metadata=_help("adapter family: lora, or svd | core | paca (`fedpeft list`)"))
    client_ranks: tuple[int, ...] = field(default=(), metadata={"item": int, "help": (
        "per-client LoRA ranks <= rank, cycled over clients (e.g. [2, 4, 8]); empty = all rank"
    )})  # fmt: skip
    layers: int = field(default=0, metadata=_help("keep only the first N encoder layers; 0 = all"))
    max_length: int = field(default=64, metadata=_help("tokens per example (longer are truncated)"))

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"model.rank must be >= 1 (got {self.rank})")
        _require(self.alpha > 0, f"model.alpha must be > 0 (got {self.alpha})")
        _require(0 <= self.dropout < 1, f"model.dropout must be in [0, 1) (got {self.dropout})")
        _require(self.layers >= 0, f"model.layers must be >= 0, 0 meaning all (got {self.layers})")
        _require(
            all(1 <= r <= self.rank for r in self.client_ranks),
            f"model.client_ranks must each be between 1 and model.rank={self.rank} (got {list(self.client_ranks)}); "
            "model.rank is the largest rank, the one every factor is padded to",
        )
        _require(self.max_length >= 4, f"model.max_length must be >= 4 (got {self.max_length})")
        _require(
            self.head_init in ("random", "label-names", "public"),
            f"model.head_init must be random, label-names or public (got {self.head_init!r})",
        )


def client_rank(cfg: ModelConfig, client_id: int) -> int | None:
    """The LoRA rank of a client, or None when every client has the model's rank."""
    return cfg.client_ranks[client_id % len(cfg.client_ranks)] if cfg.client_ranks else None


@dataclass(frozen=True)
class DataConfig:
    name: str = field(default="rotten-tomatoes", metadata=_help(
        "a registered dataset, a local file (.csv, .jsonl, .json, .parquet) or save_to_disk directory, or a "
        "Hugging Face id (ID:CONFIG)"))  # fmt: skip
    columns: tuple[str, ...] = field(default=(), metadata={"item": str, "help": (
        "ROLE=COLUMN for a file or hub dataset: text, text_pair, label, group, prompt, answer (fedpeft.data.files)")})  # fmt: skip
    partition: str = field(default="natural", metadata=_help("iid | dirichlet | natural"))
    dirichlet_alpha: float = field(default=0.5, metadata=_help("label-skew concentration (dirichlet)"))
    test_size: int = field(default=1000, metadata=_help("examples held out on the server for evaluation"))
    max_examples: int = field(default=0, metadata=_help("use at most this many training examples; 0 = all"))
    public_size: int = field(default=0, metadata=_help(
        "examples the server holds beside its test split, no client's: model.head_init = public fits the "
        "head on them"
    ))  # fmt: skip

    def __post_init__(self) -> None:
        valid = ("iid", "dirichlet", "natural")
        _require(self.partition in valid, f"data.partition must be one of {', '.join(valid)} (got {self.partition!r})")
        _require(self.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0 (got {self.dirichlet_alpha})")
        _require(self.test_size >= 1, f"data.test_size must be >= 1 (got {self.test_size})")
        _require(self.max_examples >= 0, f"data.max_examples must be >= 0 (got {self.max_examples})")
        _require(self.public_size >= 0, f"data.public_size must be >= 0 (got {self.public_size})")


@dataclass(frozen=True)
class StrategyConfig:
    """Strategy name plus its own options (any other key of the [strategy] table)."""

    name: str = field(default="fedsvd", metadata=_help("server strategy registry name"))
    options: tuple[tuple[str, Any], ...] = field(
        default=(), metadata=_help("strategy-specific options, e.g. refactor_period for fedsvd")
    )

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class PrivacyConfig:
    epsilon: float = field(default=8.0, metadata=_help("sample-level target epsilon per client; inf = off"))
    delta: float = field(default=1e-5, metadata=_help("target delta (sample- and client-level)"))
    client_epsilon: float = field(
        default=math.inf, metadata=_help("client-level (DP-FedAvg) target epsilon of the run; inf = off")
    )
    client_clip: float = field(default=1.0, metadata=_help("client-level: clip norm S of each client's update"))
    clip: float = field(default=2.0, metadata=_help("per-example gradient clipping norm C"))
    accountant: str = field(default="prv", metadata=_help("prv (tighter) | rdp"))
    noise: str = field(default="seeded", metadata=_help(
        "where in-process clients draw batches and DP noise: seeded (reproducible; the simulator is "
        "both parties) | secret (OS randomness, Opacus secure_mode). Flower nodes always use secret"
    ))  # fmt: skip

    def __post_init__(self) -> None:
        _require(
            self.epsilon > 0,
            f"privacy.epsilon must be > 0 (got {self.epsilon}); use inf to turn privacy off",
        )
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1) (got {self.delta})")
        _require(self.clip > 0, f"privacy.clip must be > 0 (got {self.clip})")
        _require(self.client_epsilon > 0, f"privacy.client_epsilon must be > 0 or inf (got {self.client_epsilon})")
        _require(self.client_clip > 0, f"privacy.client_clip must be > 0 (got {self.client_clip})")
        _require(self.accountant in ("prv", "rdp"), f"privacy.accountant must be prv or rdp (got {self.accountant!r})")
        _require(self.noise in ("seeded", "secret"), f"privacy.noise must be seeded or secret (got {self.noise!r})")

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def client_enabled(self) -> bool:
        return math.isfinite(self.client_epsilon)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = field(default=10, metadata=_help("optimizer steps per client per round"))
    batch_size: int = field(
        default=32, metadata=_help("expected batch size; Poisson sampling rate q = batch_size / n_k")
    )
    lr: float = field(default=0.5, metadata=_help("local learning rate (the peak, under a schedule)"))
    optimizer: str = field(default="sgd", metadata=_help(
        "sgd | momentum | adam | adamw (torch's rules; under DP it steps on Opacus's noised gradient: no privacy cost)"
    ))  # fmt: skip
    momentum: float = field(default=0.9, metadata=_help("momentum of train.optimizer = momentum"))
    betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata={"help": "Adam's (beta1, beta2)", "item": float})
    weight_decay: float = field(default=0.0, metadata=_help("weight decay (L2 in the gradient; decoupled for adamw)"))
    schedule: str = field(default="constant", metadata=_help("after warm-up: constant | linear | cosine (to 0)"))
    warmup: int = field(default=0, metadata=_help("linear warm-up steps at the start of the schedule"))
    schedule_over: str = field(
        default="round", metadata=_help("the schedule spans each round (round) or the run (run)")
    )
    optimizer_state: str = field(default="reset", metadata=_help(
        "reset: fresh every round (stateless clients, as in the papers) | keep: each client keeps its momentum or "
        "moments between its rounds, on its node, never sent"
    ))  # fmt: skip
    eval_batch_size: int = field(default=64, metadata=_help("server evaluation's batch size (of similar lengths)"))

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, f"train.local_steps must be >= 1 (got {self.local_steps})")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1 (got {self.batch_size})")
        _require(self.lr > 0, f"train.lr must be > 0 (got {self.lr})")
        _require(self.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        for key, valid in (
            ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("schedule_over", ("round", "run")),
            ("optimizer_state", ("reset", "keep")),
        ):  # fmt: skip
            value = getattr(self, key)
            _require(value in valid, f"train.{key} must be one of {', '.join(valid)} (got {value!r})")
        _require(0 <= self.momentum < 1, f"train.momentum must be in [0, 1) (got {self.momentum})")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999] (got {list(self.betas)})",
        )
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {self.weight_decay})")
        _require(self.warmup >= 0, f"train.warmup must be >= 0 steps (got {self.warmup})")


@dataclass(frozen=True)
class SweepConfig:
    """The grid of `fedpeft sweep`: every strategy x epsilon x seed. Empty = the spec's own value."""

    strategies: tuple[str, ...] = field(default=(), metadata=_help("strategy names to compare"))
    adapters: tuple[str, ...] = field(
        default=(), metadata=_help("adapter families to compare; a linear one pairs only with fedavg")
    )
    epsilons: tuple[float, ...] = field(
        default=(), metadata={"help": "target epsilons; inf = privacy off", "item": float}
    )
    client_epsilons: tuple[float, ...] = field(
        default=(), metadata={"help": "client-level target epsilons (privacy.client_epsilon); inf = off", "item": float}
    )
    seeds: tuple[int, ...] = field(default=(), metadata={"help": "seeds (federation.seed)", "item": int})
    lrs: tuple[str, ...] = field(default=(), metadata=_help("per-arm learning rates: ARM=LR or ARM@EPSILON=LR (ARM: a strategy, or strategy+family), else train.lr"))  # fmt: skip
    clips: tuple[str, ...] = field(default=(), metadata=_help("per-arm DP clip bounds, as lrs, else privacy.clip"))

    def __post_init__(self) -> None:
        for name, eps in (("epsilons", self.epsilons), ("client_epsilons", self.client_epsilons)):
            _require(all(e > 0 for e in eps), f"sweep.{name} must be > 0 or inf (got {list(eps)})")
        _require(all(s >= 0 for s in self.seeds), f"sweep.seeds must be >= 0 (got {list(self.seeds)})")
        for name, values in (
            ("strategies", self.strategies), ("adapters", self.adapters), ("epsilons", self.epsilons),
            ("client_epsilons", self.client_epsilons), ("seeds", self.seeds), ("lrs", self.lrs), ("clips", self.clips),
        ):  # fmt: skip
            _require(len(set(values)) == len(values), f"sweep.{name} has duplicates: {list(values)}")


SECTIONS: dict[str, type] = {
    "federation": FederationConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "strategy": StrategyConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "sweep": SweepConfig,
}


@dataclass(frozen=True)
class Spec:
    """A whole federation: what to run, on what, how privately. Immutable; derive with `replace`."""

    name: str = "quickstart"
    federation: FederationConfig = FederationConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    strategy: StrategyConfig = StrategyConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            if section == "strategy":
                values = {"name": values["name"], **dict(self.strategy.options)}
            else:
                values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            out[section] = values
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spec:
        """A validated spec from its nested dict form (see fedpeft.spec_io, which parses it)."""
        from fedpeft.spec_io import spec_from_dict

        return spec_from_dict(data)

    def to_flat(self) -> dict[str, Any]:
        """Flat ``section.key -> scalar`` mapping; tuples become comma-joined strings."""
        from fedpeft.spec_io import spec_to_flat

        return spec_to_flat(self)

    def with_flat(self, flat: Mapping[str, Any]) -> Spec:
        """Return a copy with dotted keys (``federation.rounds``) overridden."""
        from fedpeft.spec_io import spec_with_flat

        return spec_with_flat(self, flat)
