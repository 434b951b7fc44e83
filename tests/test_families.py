"""Linear adapter families (fedpeft.families) against references: the adapted layer against the
dense W0 + delta W, delta W's linearity and isometry in theta, Opacus per-example gradients against
a batch-of-one loop, DP-SGD, exact averaging, export and reload, the Flower path, and the clear
errors for the strategies and executors that cannot run them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fedpeft.strategies import make_strategy

from fedpeft.adapters import AdaptedModel, load_exported
from fedpeft.catalog import check_names
from fedpeft.cli import main
from fedpeft.client import DPSGD, LocalTraining, train_client
from fedpeft.config import ConfigError, ModelConfig
from fedpeft.data import prepare
from fedpeft.families import FAMILIES, FamilyLinear, top_singular_frames
from fedpeft.federation import Federation
from fedpeft.flower.executor import FlowerExecutor
from fedpeft.flower.local import LocalGrid
from fedpeft.state import HEAD, THETA, ClientUpdate, kind_of, theta_name
from tests.conftest import tiny_spec

LINEAR = [n for n in FAMILIES.names() if FAMILIES.get(n).linear]


def _model(family: str, rank: int = 4, dropout: float = 0.0) -> AdaptedModel:
    cfg = ModelConfig(name="tiny-bert", max_length=24, adapter=family, rank=rank, alpha=2.0 * rank, dropout=dropout)
    return AdaptedModel(cfg, num_labels=2, seed=0)


def _random_state(model: AdaptedModel, seed: int, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    state = model.state()
    return state.with_tensors(
        {n: torch.randn(t.shape, generator=g) * scale for n, t in state.tensors.items() if kind_of(n) == THETA}
    )


def _layers(model: AdaptedModel) -> dict[str, FamilyLinear]:
    return {n: m for n, m in model.module.named_modules() if isinstance(m, FamilyLinear)}


def test_linear_families_are_registered_and_listed(capsys):
    assert set(LINEAR) >= {"svd", "core", "paca"} and not FAMILIES.get("lora").linear
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("lora", *LINEAR))


@pytest.mark.parametrize("family", LINEAR)
def test_adapted_layer_equals_dense_w0_plus_delta(family):
    """The layer's output is x (W0 + s L(theta))^T + b, with L(theta) written out densely from the
    family's definition; L is linear and an isometry; theta = 0 is the base layer."""
    model = _model(family)
    state = _random_state(model, 1)
    model.load(state)
    layers = _layers(model)
    assert len(layers) == 4  # query and value of both tiny-bert layers
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    for name, layer in layers.items():
        theta = state.tensors[theta_name(name)]
        w0 = layer.base_layer.weight.detach()
        if family == "svd":
            u, v = top_singular_frames(w0, 4)
            dense = sum(theta[i] * torch.outer(u[:, i], v[:, i]) for i in range(4))
            s = torch.linalg.svdvals(w0.double())
            torch.testing.assert_close(torch.diagonal(u.T.double() @ w0.double() @ v.double()), s[:4])
        elif family == "core":
            u, v = top_singular_frames(w0, 4)
            dense = sum(theta[i, j] * torch.outer(u[:, i], v[:, j]) for i in range(4) for j in range(4))
        else:
            dense = torch.zeros_like(w0)
            dense[:, layer.columns] = theta
            assert len(set(layer.columns.tolist())) == 4
        torch.testing.assert_close(layer.delta(), dense, atol=1e-6, rtol=1e-5)
        expected = x @ (w0 + layer.scale * dense).T + layer.base_layer.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        # isometry: ||L(theta)||_F = ||theta||
        assert float(layer.delta().norm()) == pytest.approx(float(theta.norm()), rel=1e-5)
    # the reported weight change is the dense one: mean over layers of ||s delta W|| / ||W0||
    dense_change = sum(float((m.scale * m.delta()).norm() / m.base_layer.weight.norm()) for m in layers.values())
    assert model.relative_change(state) == pytest.approx(dense_change / len(layers), rel=1e-5)
    # PaCA's columns differ between layers (each layer's own public seed)
    if family == "paca":
        assert len({tuple(m.columns.tolist()) for m in layers.values()}) > 1


@pytest.mark.parametrize("family", LINEAR)
def test_opacus_per_sample_grads_match_batch_of_one(family):
    """All thetas of both layers and the head, a padded batch of different lengths."""
    from opacus import GradSampleModule

    model = _model(family)
    spec = tiny_spec()
    data = prepare(spec.data, 4, model.tokenizer, 24, seed=0).clients[0]
    state = _random_state(model, 3)
    model.load(state)
    names = model.set_trainable({THETA, HEAD})
    assert sum(kind_of(n) == THETA for n in names) == 4
    index = torch.arange(6)
    ids, mask, labels = data.batch(index)
    assert mask.sum(1).unique().numel() > 1, "want examples of different lengths (padding in the batch)"
    gsm = GradSampleModule(model.module, batch_first=True, loss_reduction="mean")
    try:
        model.module.train()
        F.cross_entropy(gsm(input_ids=ids, attention_mask=mask), labels).backward()
        per_sample = {n: model._params[n].grad_sample.detach().clone() for n in names}
    finally:
        gsm.to_standard_module()
    model.module.eval()
    for i in index.tolist():
        for n in names:
            model._params[n].grad = None
        one_ids, one_mask, one_label = data.batch(torch.tensor([i]))
        F.cross_entropy(model.forward(one_ids, one_mask), one_label).backward()
        for n in names:
            torch.testing.assert_close(per_sample[n][i], model._params[n].grad, rtol=1e-4, atol=1e-6, msg=n)
            assert float(per_sample[n][i].abs().max()) > 0, f"{n}: zero gradient"
    model.set_trainable(set())


@pytest.mark.parametrize("family", LINEAR)
def test_theta_moves_under_dp_and_sigma_zero_equals_plain(family):
    model = _model(family)
    data = prepare(tiny_spec().data, 4, model.tokenizer, 24, seed=0).clients[0]
    state = model.state()
    uploads = tuple(n for n in model.names if kind_of(n) == THETA)
    plan = LocalTraining(steps=3, batch_size=8, lr=0.5, trains=frozenset({THETA}), uploads=uploads)
    noisy = train_client(model, state, data, plan, client_id=0, seed=1, dp=DPSGD(0.8, 1.0))
    plain = train_client(model, state, data, plan, client_id=0, seed=1, dp=None)
    unclipped = train_client(model, state, data, plan, client_id=0, seed=1, dp=DPSGD(0.0, 1e30))
    for n in uploads:
        assert not torch.equal(noisy.tensors[n], state.tensors[n]), f"{n} unchanged under DP"
        assert not torch.equal(noisy.tensors[n], plain.tensors[n])
        torch.testing.assert_close(unclipped.tensors[n], plain.tensors[n], rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") for p in model.module.parameters())


@pytest.mark.parametrize("family", LINEAR)
def test_fedavg_of_thetas_is_the_mean_weight_change(family):
    """Plain averaging is exact: L(sum_k p_k theta_k) = sum_k p_k L(theta_k)."""
    model = _model(family)
    states = [_random_state(model, s) for s in (10, 11, 12)]
    uploads = [n for n in model.names if kind_of(n) == THETA]
    updates = [
        ClientUpdate(k, n, {u: s.tensors[u] for u in uploads})
        for k, (s, n) in enumerate(zip(states, (5, 1, 2), strict=True))
    ]
    new, _, _ = make_strategy("fedavg").aggregate(model.state(), updates, 1, {})
    deltas = []
    for s in [*states, new]:
        model.load(s)
        deltas.append({name: layer.delta().detach().clone() for name, layer in _layers(model).items()})
    for name in deltas[0]:
        mean = (5 * deltas[0][name] + deltas[1][name] + 2 * deltas[2][name]) / 8
        torch.testing.assert_close(deltas[3][name], mean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", LINEAR)
def test_a_private_run_exports_and_reloads_exactly(tmp_path, family):
    spec = tiny_spec(model__adapter=family, federation__rounds=2, privacy__epsilon=8.0, model__rank=4)
    result = Federation.build(spec).run(tmp_path)
    assert result.summary["epsilon"] == pytest.approx(8.0, abs=0.01)
    thetas = [t for n, t in result.state.tensors.items() if kind_of(n) == THETA]
    assert thetas and all(float(t.abs().max()) > 0 for t in thetas)
    loaded, tokenizer = load_exported(tmp_path)
    reference = AdaptedModel(spec.model, num_labels=2, seed=spec.federation.seed)
    reference.load(result.state)
    reference.module.eval()
    ids, mask = tokenizer.encode_batch(["a gripping film", "dull and far too long"], 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask), reference.forward(ids, mask))
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_flower_path_equals_in_process_for_a_family(tmp_path):
    spec = tiny_spec(
        model__adapter="core", federation__rounds=2, federation__clients=3, federation__clients_per_round=2
    )
    reference = Federation.build(spec).run(tmp_path / "in-process")
    flower = Federation.build(spec, executor=FlowerExecutor(LocalGrid(3), spec, connect_timeout=0)).run(tmp_path / "f")
    for name, tensor in reference.state.tensors.items():
        torch.testing.assert_close(flower.state.tensors[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert [r["bytes_up"] for r in flower.history] == [r["bytes_up"] for r in reference.history]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy__name": "fedsvd"}, "works on LoRA's factors.*use fedavg"),
        ({"strategy__name": "ffa"}, "works on LoRA's factors"),
        ({"model__client_ranks": (2, 4)}, "client_ranks are LoRA ranks"),
        ({"model__adapter": "dora"}, "unknown adapter family 'dora'; valid: core, lora, paca, svd"),
    ],
)
def test_what_cannot_run_a_family_says_why(overrides, message):
    spec = tiny_spec(**{"model__adapter": "svd", **overrides})
    with pytest.raises((ConfigError, ValueError), match=message):
        check_names(spec)


@pytest.mark.parametrize("family", LINEAR)
@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sigma0"])
def test_cohort_equals_sequential_for_a_family(family, private):
    """The cohort executor's per-example thetas (`FamilyLinear.batched`) against the reference path,
    clipping active under DP (sigma 0)."""
    from fedpeft.executors import SequentialExecutor
    from fedpeft.executors.cohort import CohortExecutor
    from fedpeft.privacy.accounting import ClientBudget

    spec = tiny_spec(model__adapter=family, model__rank=4, federation__clients=4)
    federation = Federation.build(spec)
    state = _random_state(federation.model, 4, scale=0.1)
    uploads = tuple(n for n in state.tensors if kind_of(n) in (THETA, HEAD))
    plan = LocalTraining(steps=3, batch_size=8, lr=0.5, trains=frozenset({THETA, HEAD}), uploads=uploads)
    budgets = [[ClientBudget(c, 0.0, 0.0, 1e9, 1e-5, "rdp") for c in range(4)] for _ in range(2)]
    clip = 0.05 if private else 1.0
    clients = federation.data.clients
    seq = SequentialExecutor(federation.model, clients, budgets[0] if private else None, clip)
    coh = CohortExecutor(spec.model, 2, spec.federation.seed, clients, budgets[1] if private else None, clip)
    seeds = {c: 50 + c for c in range(4)}
    expected = seq.run_round(1, [0, 1, 2, 3], state, plan, seeds)
    got = coh.run_round(1, [0, 1, 2, 3], state, plan, seeds)
    for e, g in zip(expected, got, strict=True):
        for name in uploads:
            assert not torch.equal(e.tensors[name], state.tensors[name]), f"{name} did not train"
            torch.testing.assert_close(g.tensors[name], e.tensors[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_sweep_over_families_pairs_them_with_fedavg_and_reports_them(tmp_path, capsys):
    from fedpeft.report import collect
    from fedpeft.sweep import cells, run_sweep

    spec = tiny_spec(
        sweep__strategies=["fedavg", "ffa"], sweep__adapters=["lora", "svd"], sweep__seeds=[0],
        federation__rounds=1, train__local_steps=2, model__rank=4,
    )  # fmt: skip
    grid = cells(spec, tmp_path / "sweep")
    assert [(c.spec.strategy.name, c.spec.model.adapter) for c in grid] == [
        ("fedavg", "lora"),
        ("ffa", "lora"),
        ("fedavg", "svd"),
    ]
    assert grid[2].path == tmp_path / "sweep" / "fedavg+svd" / "eps-inf" / "seed-0"
    with pytest.raises(ConfigError, match="runs the adapter families"):
        cells(spec.with_flat({"sweep.strategies": ["ffa"], "sweep.adapters": ["svd"]}), tmp_path / "none")
    run_sweep(spec, tmp_path / "sweep")
    runs = {r["strategy"]: r for r in collect(tmp_path / "sweep")}
    assert list(runs) == ["fedavg", "ffa", "fedavg+svd"]
    head = 32 * 2 + 2  # tiny-bert's head trains too
    assert runs["fedavg+svd"]["trained_parameters"] == 4 * FAMILIES.get("svd").size(32, 32, 4) + head
    assert runs["fedavg"]["trained_parameters"] == 4 * FAMILIES.get("lora").size(32, 32, 4) + head
    # one table from two directories: `fedpeft report A B --out C`
    single = tiny_spec(model__adapter="paca", federation__rounds=1, train__local_steps=2, model__rank=4)
    Federation.build(single).run(tmp_path / "extra" / "paca-run")
    assert main(["report", str(tmp_path / "sweep"), str(tmp_path / "extra"), "--out", str(tmp_path / "both")]) == 0
    table = (tmp_path / "both" / "results.md").read_text()
    for label in ("| fedavg |", "| ffa |", "| fedavg+svd |", "| fedavg+paca |"):
        assert label in table
    assert f"| {4 * 4 * 32 + head:,} |" in table  # paca's trained count, in the detailed table
