"""The planned passes of a step (layerquant.plan_passes) against the plain two full passes.

A pass whose outputs are not propagated and whose statistics nothing reads runs over the first
calibration batch only. That must not change a byte of the output, nor the propagated states,
nor rel_error (measured on the first batch both ways), and it must actually skip the work.
Also here: the in-place activation round trips and the finite check of every tensor read,
each against its plain formula.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig

from streamq import cli, layerquant, moe, steps
from streamq.arch.llama import INPUT_GROUPS, DenseArch
from streamq.layerquant import (Passes, RoundTrip, observe_and_quantize, plan_passes, process_layer,
                                process_layer_reference)
from streamq.quant.schemes import SCHEMES
from streamq.recipe import QuantArgs
from streamq.synth import write_deepseek_v3

from conftest import load_all, output_bytes, write_recipe

PREFIX = "model.layers.0"
S, L, BATCH = 5, 8, 2          # three batches, the last one partial

RECIPES = {
    "dynamic": {"": QuantArgs("W8A8_DYNAMIC")},
    "static": {"": QuantArgs("W8A8")},
    "mix": {"": QuantArgs("W8A8_MIX")},
    "gptq": {"": QuantArgs("W4A16", group_size=16, w_method="gptq")},
    "hqq": {"": QuantArgs("W4A16", group_size=16, w_method="hqq")},
    "float": {"": QuantArgs("FLOAT")},
    # data-free except one static linear: the float pass must then cover every row
    "one-static": {"": QuantArgs("W8A8_DYNAMIC"), "mlp.down_proj": QuantArgs("W8A8")},
    "some-float": {"": QuantArgs("W8A8_DYNAMIC"), "self_attn.o_proj": QuantArgs("FLOAT")},
}


def dense_layer():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=16)
    arch = DenseArch(config, has_lm_head=True)
    torch.manual_seed(0)
    layer = arch.layer_cls(config, 0).eval()
    for p in layer.parameters():      # norms away from 1, so every input differs
        p.data.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return arch, layer


def layer_args(recipe: dict) -> dict[str, QuantArgs]:
    return {f"{PREFIX}.{sub}": recipe.get(sub, recipe[""]) for sub in INPUT_GROUPS}


def run_step(fn, recipe: dict, propagate: str):
    """One step of `fn` (process_layer or its reference) on a fresh copy of the layer; returns
    the result, the propagated states and how many rows the layer's forward saw."""
    arch, layer = dense_layer()
    layer = copy.deepcopy(layer)
    rotary = arch.rotary(L, "cpu", torch.float32)
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return arch.layer_forward(layer, x, rotary)
    H = torch.randn(S, L, 32, generator=torch.Generator().manual_seed(1))
    groups = {f"{PREFIX}.{sub}": key for sub, key in INPUT_GROUPS.items()}
    res = fn(layer, PREFIX, forward, H, layer_args(recipe), groups, torch.bfloat16, BATCH, "cpu",
             torch.float32, propagate)
    return res, H, sum(seen)


@pytest.mark.parametrize("propagate", ["quantized", "float"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_process_layer_matches_the_two_full_passes(name, propagate):
    fast, H_fast, rows_fast = run_step(process_layer, RECIPES[name], propagate)
    ref, H_ref, rows_ref = run_step(process_layer_reference, RECIPES[name], propagate)
    assert torch.equal(H_fast, H_ref)
    assert fast.rel_error == ref.rel_error
    assert fast.quantized.keys() == ref.quantized.keys()
    for lin, q in ref.quantized.items():
        for suffix, t in q.tensors.items():
            assert torch.equal(fast.quantized[lin].tensors[suffix], t), f"{lin}.{suffix}"
    # the work skipped: rows of the pass that is neither propagated nor observed
    if name == "float":
        expected = S
    else:
        stats = name in ("static", "mix", "gptq", "one-static")
        float_rows = S if stats or propagate == "float" else BATCH
        expected = float_rows + (S if propagate == "quantized" else BATCH)
    assert (rows_ref, rows_fast) == (2 * S, expected)


def test_rel_error_is_measured_on_the_first_batch():
    res, H, _ = run_step(process_layer, RECIPES["dynamic"], "float")
    assert res.rel_error > 0
    # a copy of the step that only sees the first batch reports the same error
    arch, layer = dense_layer()
    rotary = arch.rotary(L, "cpu", torch.float32)
    H0 = torch.randn(S, L, 32, generator=torch.Generator().manual_seed(1))[:BATCH].clone()
    groups = {f"{PREFIX}.{sub}": key for sub, key in INPUT_GROUPS.items()}
    first = process_layer(layer, PREFIX, lambda x: arch.layer_forward(layer, x, rotary), H0,
                          layer_args(RECIPES["dynamic"]), groups, torch.bfloat16, BATCH, "cpu", torch.float32,
                          "float")
    assert first.rel_error == res.rel_error


def test_plan_passes():
    assert plan_passes(10, 4, "quantized") == Passes(4, 10)
    assert plan_passes(10, 4, "float") == Passes(10, 4)
    assert plan_passes(10, 4, "quantized", float_stats=True) == Passes(10, 10)
    assert plan_passes(10, 4, "float", quant_stats=True) == Passes(10, 10)
    assert plan_passes(10, 4, None) == Passes(4, 4)
    assert plan_passes(3, 4, None) == Passes(3, 3)


def test_round_trip_runs_once_per_input_tensor():
    calls = []
    rt = RoundTrip(lambda x: calls.append(1) or x * 2)
    x = torch.ones(3)
    assert torch.equal(rt(x), rt(x)) and len(calls) == 1       # q, k, v read the same tensor
    x.add_(1)                                                   # written in place: computed again
    assert torch.equal(rt(x), torch.full((3,), 4.0)) and len(calls) == 2
    assert torch.equal(rt(torch.ones(3)), torch.full((3,), 2.0)) and len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trips_match_their_formulas(dtype):
    """The in-place round trips against the formulas written out, bit for bit."""
    x = (torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    x[0, 0] = 0  # an all-zero token keeps scale 1
    s = x.abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    assert torch.equal(layerquant.fake_quant_per_token(x), torch.clamp(torch.round(x / s), -127, 127) * s)
    s_x, o_x = 0.021, -7.0
    expected = (torch.clamp(torch.round(x / s_x + o_x), -128, 127) - o_x) * s_x
    assert torch.equal(layerquant.static_fake_quant(x, s_x, o_x), expected)


def test_data_free_lm_head_runs_no_pass():
    head = torch.nn.Linear(16, 24, bias=False)
    calls = []
    X = torch.randn(4, 3, 16)
    args = {"lm_head": QuantArgs("W8A8_DYNAMIC")}
    W = head.weight.detach().clone()
    q = observe_and_quantize(torch.nn.ModuleDict({"lm_head": head}), "", lambda x: calls.append(x) or head(x), X,
                             args, {}, torch.bfloat16, 2, "cpu", torch.float32)
    assert calls == []
    expected = SCHEMES["W8A8_DYNAMIC"].quantize("lm_head", W, None, args["lm_head"], torch.bfloat16, None)
    for suffix, t in expected.tensors.items():
        assert torch.equal(q["lm_head"].tensors[suffix], t), suffix


# --- whole runs: the planned passes against the full ones, byte for byte ------------------------


def full_passes(rows, batch, propagate, float_stats=False, quant_stats=False):
    return Passes(rows, rows)


def run(tmp_path, model, name: str, recipe_text: str) -> tuple[dict, dict]:
    recipe = write_recipe(tmp_path / f"{name}.toml", recipe_text)
    out = tmp_path / name
    assert cli.main(["run", str(recipe), "--model", str(model), "--output", str(out)]) == 0
    steps_ = {s["step"]: s for s in json.loads((out / "streamq_report.json").read_text())["steps"]}
    return output_bytes(out), steps_


DENSE_RECIPE = """
[calibration]
samples = 5
seq_len = 8
[quant]
scheme = "W8A8_DYNAMIC"
disable_last_linear = false
[run]
device = "cpu"
batch_size = 2
propagate = "{propagate}"
"""


@pytest.mark.parametrize("propagate", ["quantized", "float"])
def test_dense_run_matches_full_passes(tmp_path, tiny_llama, monkeypatch, propagate):
    fast, fast_steps = run(tmp_path, tiny_llama, "fast", DENSE_RECIPE.format(propagate=propagate))
    monkeypatch.setattr(steps, "process_layer", process_layer_reference)
    monkeypatch.setattr(layerquant, "needs_statistics", lambda args: True)  # the lm_head pass too
    ref, ref_steps = run(tmp_path, tiny_llama, "ref", DENSE_RECIPE.format(propagate=propagate))
    assert fast == ref
    for key, s in ref_steps.items():
        assert fast_steps[key].get("rel_error") == s.get("rel_error"), key


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return write_deepseek_v3(tmp_path_factory.mktemp("ds") / "model", layers=3, first_k_dense=1, experts=4,
                             hidden=256, moe_intermediate=128, vocab=128, mtp=True, seed=0)


DEEPSEEK_RECIPE = """
[model]
mtp = "quantize"
[calibration]
samples = 5
seq_len = 8
[quant]
scheme = "W8A8_DYNAMIC"
{rules}
[run]
device = "cpu"
batch_size = 2
expert_budget_gb = 0.0005
propagate = "{propagate}"
"""
EXPERT_GPTQ = '[[quant.rules]]\nmatch = "*.mlp.experts.*"\nscheme = "W8A8_DYNAMIC"\nw_method = "GPTQ"\n'


@pytest.mark.parametrize("propagate", ["quantized", "float"])
@pytest.mark.parametrize("rules", ["", EXPERT_GPTQ], ids=["data-free", "experts-gptq"])
def test_deepseek_run_matches_full_passes(tmp_path, deepseek, monkeypatch, propagate, rules):
    rows = []
    run_base = moe._run_base
    monkeypatch.setattr(moe, "_run_base", lambda *a: rows.append(a[-1]) or run_base(*a))
    fast, fast_steps = run(tmp_path, deepseek, "fast", DEEPSEEK_RECIPE.format(propagate=propagate, rules=rules))
    # rows of the float and the quantized base pass of layer 0 (dense), 1 and 2 (MoE) and the
    # MTP layer (its float pass covers every row for the report, nothing is propagated)
    f, q = (S if propagate == "float" else BATCH), (S if propagate == "quantized" else BATCH)
    moe_q = S if rules else q     # the experts' Hessians come from the quantized pass
    assert rows == [f, q, f, moe_q, f, moe_q, S, S if rules else BATCH]
    monkeypatch.setattr(moe, "plan_passes", full_passes)
    ref, ref_steps = run(tmp_path, deepseek, "ref", DEEPSEEK_RECIPE.format(propagate=propagate, rules=rules))
    assert fast == ref
    # An expert runs its routed tokens in batches drawn from the rows its pass covers, so a
    # first-batch pass groups them differently: the matmuls round differently in the last bits.
    for key, s in ref_steps.items():
        if "rel_error" in s:
            assert fast_steps[key]["rel_error"] == pytest.approx(s["rel_error"], rel=1e-5), key
    tensors = load_all(tmp_path / "fast")
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.int8


# --- the finite check on every tensor read -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    assert steps.all_finite(torch.randn(64, 48, generator=g).to(dtype))
    assert steps.all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 1234, 64 * 48 - 1):
            t = torch.randn(64, 48, generator=g).to(dtype)
            t.view(-1)[pos] = bad
            assert not steps.all_finite(t) and not torch.isfinite(t).all(), (bad, pos)
