"""What the strategy comparison measures with (issue 15): a head set from public information and
frozen, so accuracy moves only with the adapters, and how far the adapters moved the weights."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import AdaptedModel
from fedpeft.build import build_parts
from fedpeft.classifier import label_name_rows
from fedpeft.client import evaluate
from fedpeft.config import ConfigError, ModelConfig
from fedpeft.federation import Federation
from fedpeft.models import build_model
from fedpeft.state import base_name
from tests.conftest import tiny_spec


def test_a_label_name_head_is_public_centred_unit_rows_and_stays_frozen(tmp_path):
    spec = tiny_spec(model__head_init="label-names", model__train_head=False, federation__rounds=2)
    parts = build_parts(spec)
    head = parts.model.state().tensors
    w, b = head["head.weight"], head["head.bias"]
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
    assert torch.equal(b, torch.zeros_like(b)) and float(w.sum(0).abs().max()) < 1e-5  # centred (2 labels)
    base, tok = build_model("tiny-bert", 2, 0, seed=spec.federation.seed)  # the shared base, nothing else
    assert torch.equal(label_name_rows(base.eval(), tok, parts.data.label_names), w)
    result = Federation.build(spec).run(tmp_path / "run")
    assert torch.equal(result.state.tensors["head.weight"], w) and result.summary["adapter_change"] > 0
    with pytest.raises(ConfigError, match="model.head_init must be random, label-names or public"):
        tiny_spec(model__head_init="names")


def test_relative_change_is_the_dense_norm_ratio():
    model = AdaptedModel(ModelConfig(name="tiny-bert", max_length=24, alpha=16.0), num_labels=2, seed=0)
    state = model.state()
    g = torch.Generator().manual_seed(0)
    layers = state.layers
    tensors = {f"{la}.lora_B.weight": torch.randn(state.B(la).shape, generator=g) for la in layers}
    state = state.with_tensors(tensors)
    delta = torch.randn(model._w0[layers[0]].shape, generator=g) * 0.1  # a base change on one layer
    with_base = state.with_tensors({base_name(layers[0]): delta}, new=True)
    for st in (state, with_base):
        dense = []
        for la in layers:
            change = st.scale * st.B(la).double() @ st.A(la).double()
            if base_name(la) in st.tensors:
                change = change + st.tensors[base_name(la)].double()
            dense.append(float(change.norm() / model._w0[la].double().norm()))
        assert model.relative_change(st) == pytest.approx(sum(dense) / len(dense), rel=1e-6)
    assert model.relative_change(model.state()) == 0.0  # B = 0: no change yet


def test_a_public_head_is_fitted_on_server_data_no_client_holds(tmp_path):
    spec = tiny_spec(model__head_init="public", model__train_head=False, data__public_size=300, federation__rounds=1)
    parts = build_parts(spec)
    public, test = parts.data.public, parts.data.test
    assert len(public) == 300
    rows = {tuple(r) for r in public.input_ids.tolist()}
    assert not rows & {tuple(r) for c in parts.data.clients for r in c.input_ids.tolist()}  # no client's
    head = parts.model.state().tensors
    assert float(head["head.weight"].abs().max()) > 0
    fitted = evaluate(parts.model, parts.model.state(), public, 256)["accuracy"]
    chance = parts.data.public.labels.bincount().max().item() / len(public)
    assert fitted > chance + 0.05, "the fitted head does not fit its own data"
    assert torch.equal(build_parts(spec).model.state().tensors["head.weight"], head["head.weight"])  # repeatable
    baseline = build_parts(tiny_spec()).data  # public_size 0 keeps the split it always had
    same = build_parts(tiny_spec(data__public_size=0)).data
    assert torch.equal(baseline.test.input_ids, same.test.input_ids) and len(test) == len(baseline.test)
    with pytest.raises(ConfigError, match="set data.public_size"):
        build_parts(tiny_spec(model__head_init="public"))


def test_gap_closed_measures_each_budget_against_the_ceiling_at_that_budget():
    from tests.runtime_helpers import load_script

    gap_closed = load_script("gap_closed")
    inf = float("inf")

    def run(arm, target, seed, last3):
        return {"strategy": arm, "target": target, "seed": seed, "accuracy": last3, "accuracy_last3": last3}

    grid = [
        run("fedavg", 8.0, 0, 0.70),
        run("fedavg", 8.0, 1, 0.65),
        run("fedavg", 3.0, 0, 0.6),
        run("ffa", inf, 0, 0.8),
    ]
    floor = {0: 0.5, 1: 0.5}
    ceiling = {(8.0, 0): 0.75, (8.0, 1): 0.75, (inf, 0): 0.9}  # no ceiling at epsilon 3
    text = gap_closed.table(grid, floor, ceiling, ceiling)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.70 ± " in rows["fedavg", "ε = 8"]  # (0.70 - 0.5) / 0.25 = 0.8 and (0.65 - 0.5) / 0.25 = 0.6
    assert rows["ffa", "no DP"].endswith("| 0.75 |")  # (0.8 - 0.5) / (0.9 - 0.5), one seed
    assert ("fedavg", "ε = 3") not in rows and "ε = 3: no ceiling run at this budget, left out." in text
