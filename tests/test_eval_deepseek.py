"""streamq eval of DeepSeek-V3/R1 outputs: the consumer's math from the stored tensors, each model
routing its own hidden states, routed experts read a chunk at a time.

The checkpoint is FP8 with an MTP layer (hidden and expert width 256, so that the 256-wide int4
groups of the W4A8 recipe fit); the recipes are the repo's, with calibration and memory shrunk.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from streamq import calibration, evaluate_moe
from streamq.checkpoint import CheckpointReader
from streamq.cli import main as streamq_main
from streamq.evaluate import evaluate
from streamq.synth import (OUTLIER_GAIN, dequant_fp8_reference, outlier_columns, quantize_fp8_blocks,
                           write_deepseek_v3)

from conftest import REPO, SMALL_CAL, corrupt, write_recipe

LAYERS, EXPERTS, WIDTH = 3, 8, 256
SAMPLES, SEQ_LEN, BATCH = 4, 32, 2
# The repo recipe with calibration and memory shrunk; each edit must hit exactly once.
RECIPE_EDITS = {"samples = 128": "samples = 4", "seq_len = 2048": "seq_len = 16", 'device = "auto"': 'device = "cpu"',
                "batch_size = 4": "batch_size = 2", "expert_budget_gb = 8.0": "expert_budget_gb = 0.001"}


def shrunk(recipe: str, dst: Path) -> Path:
    text = (REPO / "recipes" / recipe).read_text()
    for old, new in RECIPE_EDITS.items():
        assert text.count(old) == 1, f"recipes/{recipe} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    dst.write_text(text)
    return dst


def ev(model: Path, out: Path, budget: float = 8.0) -> dict:
    return evaluate(model, out, samples=SAMPLES, seq_len=SEQ_LEN, batch=BATCH, expert_budget_gb=budget)


def tame_routed_experts(model: Path, seed: int = 0) -> None:
    """Scale the synthetic outlier input columns of every routed expert back to the bulk. Those
    columns set each row's int4 range, so with them W4A8 rounds most other weights to zero, and
    that clean error would hide the damage the corruption tests plant."""
    for shard in model.glob("*.safetensors"):
        t = load_file(shard)
        for n in [n for n in t if ".mlp.experts." in n and n.endswith(".weight")]:
            W = dequant_fp8_reference(t[n], t[n + "_scale_inv"])
            W[:, outlier_columns(seed, W.shape[1])] /= OUTLIER_GAIN
            t[n], t[n + "_scale_inv"] = quantize_fp8_blocks(W)
        save_file(t, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-ds")
    model = write_deepseek_v3(tmp / "model", layers=LAYERS, first_k_dense=1, experts=EXPERTS, hidden=WIDTH,
                              moe_intermediate=WIDTH, vocab=128, fp8=True, mtp=True, seed=0)
    tame_routed_experts(model)
    w4a8, flt = tmp / "w4a8", tmp / "float"
    assert streamq_main(["run", str(shrunk("deepseek_r1_w4a8.toml", tmp / "w4a8.toml")), "--model", str(model),
                         "--output", str(w4a8)]) == 0
    float_recipe = write_recipe(tmp / "f.toml", SMALL_CAL + '[quant]\nscheme = "FLOAT"\n')
    assert streamq_main(["run", str(float_recipe), "--model", str(model), "--output", str(flt)]) == 0
    return SimpleNamespace(tmp=tmp, model=model, w4a8=w4a8, flt=flt, clean=ev(model, w4a8))


# (a) an all-FLOAT output is the reference


def test_all_float_output_has_no_divergence(ds):
    r = ev(ds.model, ds.flt)
    assert r["kl_mean"] < 1e-6 and r["ppl_quantized"] == pytest.approx(r["ppl_reference"], rel=1e-9)
    assert r["top1_agreement"] == 1.0
    assert [e["step"] for e in r["layers"]] == ["layer.0", "layer.1", "layer.2"]   # the MTP layer is skipped
    assert all(e["rel_error"] < 1e-6 for e in r["layers"])


# (b) the W4A8 output, and the reference side against transformers


def test_w4a8_output_is_plausible(ds):
    r = ds.clean
    assert set(r) == {"tokens", "phase", "ppl_reference", "ppl_quantized", "kl_mean", "kl_max", "top1_agreement", "layers"}
    assert r["tokens"] == SAMPLES * (SEQ_LEN - 1)
    assert 0 < r["kl_mean"] < 0.2 and math.isfinite(r["kl_max"])
    assert r["ppl_quantized"] == pytest.approx(r["ppl_reference"], rel=0.1)
    assert r["layers"][0]["rel_error"] > 0   # the dense layer's W8A8 attention and W8A8_DYNAMIC MLP


def transformers_model(model: Path) -> DeepseekV3ForCausalLM:
    """transformers' DeepSeek-V3 with the FP8 checkpoint dequantized to bf16 (as streamq reads it),
    computing in fp32; routed experts fused into its 3-D tensors; the MTP layer left out."""
    config = DeepseekV3Config.from_pretrained(model)
    config._attn_implementation = "eager"
    reader = CheckpointReader(model)
    names = [n for n in reader.tensors if not n.endswith("_scale_inv") and not n.startswith(f"model.layers.{LAYERS}.")]
    src = {n: t.float() for n, t in reader.load_float(names, torch.bfloat16).items()}
    state = {n: t for n, t in src.items() if ".mlp.experts." not in n}
    for i in range(config.first_k_dense_replace, LAYERS):
        e = f"model.layers.{i}.mlp.experts"
        state[f"{e}.gate_up_proj"] = torch.stack(
            [torch.cat([src[f"{e}.{x}.gate_proj.weight"], src[f"{e}.{x}.up_proj.weight"]]) for x in range(EXPERTS)])
        state[f"{e}.down_proj"] = torch.stack([src[f"{e}.{x}.down_proj.weight"] for x in range(EXPERTS)])
    hf = DeepseekV3ForCausalLM(config).float().eval()
    hf.load_state_dict(state, strict=True)
    return hf


def test_reference_side_matches_transformers(ds):
    ids = calibration.token_ids([], None, 128, SAMPLES, SEQ_LEN, seed=1)   # the ids eval uses without a tokenizer
    with torch.no_grad():
        logits = transformers_model(ds.model)(ids).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().item()
    assert ds.clean["ppl_reference"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert abs(math.exp(nll) - 128) > 1   # a real distribution, not a uniform one


# (c) a corrupted stored tensor shows up


def _favour(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[3] += 10.0   # expert 3 is now chosen for every token of the quantized model
    return t


CORRUPTIONS = {
    "expert_scale_second": ("model.layers.1.mlp.experts.2.up_proj.weight_scale_second", lambda t: t * 3),
    "attention_deq_scale": ("model.layers.1.self_attn.o_proj.deq_scale", lambda t: t * 2),
    "router_bias": ("model.layers.1.mlp.gate.e_score_correction_bias", _favour),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corrupted_tensor_is_detected(ds, kind):
    name, fn = CORRUPTIONS[kind]
    bad = ev(ds.model, corrupt(ds.w4a8, ds.tmp / f"bad-{kind}", name, fn))
    good = ds.clean
    assert bad["kl_mean"] > 2 * good["kl_mean"], (kind, good["kl_mean"], bad["kl_mean"])
    layer = int(name.split(".")[2])
    assert bad["layers"][layer]["rel_error"] > 1.2 * good["layers"][layer]["rel_error"]
    assert bad["layers"][layer - 1] == good["layers"][layer - 1]   # nothing earlier changed
    assert bad["ppl_reference"] == good["ppl_reference"]


# (d) routed experts are read a chunk at a time


def test_expert_chunks():
    assert evaluate_moe.expert_chunks(8, 500_000, 0.0011) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert evaluate_moe.expert_chunks(5, 500_000, 0.0011) == [[0, 1], [2, 3], [4]]
    assert evaluate_moe.expert_chunks(3, 10**9, 0.001) == [[0], [1], [2]]   # one expert over budget: one at a time
    assert evaluate_moe.expert_chunks(3, 1, 8.0) == [[0, 1, 2]]


def experts_per_read(monkeypatch, ds, budget: float) -> tuple[dict, list[int]]:
    """Evaluate with `budget`, recording how many routed experts each checkpoint read holds."""
    counts = []
    load = CheckpointReader.load

    def counting(self, names):
        experts = {n.split(".mlp.experts.")[0] + "/" + n.split(".mlp.experts.")[1].split(".")[0]
                   for n in names if ".mlp.experts." in n}
        if experts:
            counts.append(len(experts))
        return load(self, names)
    with monkeypatch.context() as m:
        m.setattr(CheckpointReader, "load", counting)
        return ev(ds.model, ds.w4a8, budget), counts


def test_experts_are_read_in_budgeted_chunks(monkeypatch, ds):
    # One W4A8 expert of this model is ~0.53 MB (bf16 source 0.39 MB + stored 0.13 MB): 0.0011 GB holds 2.
    chunked, counts = experts_per_read(monkeypatch, ds, 0.0011)
    moe_layers = LAYERS - 1
    assert counts == [2] * (2 * 4 * moe_layers)   # reference and output, 4 chunks, each MoE layer
    whole, counts = experts_per_read(monkeypatch, ds, 8.0)
    assert counts == [EXPERTS] * (2 * moe_layers)
    assert chunked == whole   # chunking changes what is resident, not the result


def test_eval_cli_skips_mtp_and_prints_a_table(ds, capsys, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    assert streamq_main(["eval", "--reference", str(ds.model), "--quantized", str(ds.w4a8), "--samples", "2",
                         "--seq-len", "16", "--expert-budget-gb", "0.002", "--json", str(tmp_path / "r.json")]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert "model.layers.3 (the MTP layer) is not part of the main model's forward" in caplog.text
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["tokens"] == 2 * 15 and [e["step"] for e in r["layers"]] == ["layer.0", "layer.1", "layer.2"]


def test_norm_bias_of_the_output_is_applied(ds):
    """A `<norm>.bias` (what asymmetric smoothing writes) is added after the norm, as the consumer does."""
    dst = ds.tmp / "norm-bias"
    shutil.copytree(ds.flt, dst)
    name = "model.layers.1.input_layernorm.bias"
    index_path = dst / "quant_model_weights.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = dst / index["weight_map"]["model.layers.1.input_layernorm.weight"]
    tensors = load_file(shard)
    tensors[name] = torch.full((WIDTH,), 0.5)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][name] = shard.name
    index_path.write_text(json.dumps(index))
    desc_path = dst / "quant_model_description.json"
    desc_path.write_text(json.dumps({**json.loads(desc_path.read_text()), name: "FLOAT"}))
    r = ev(ds.model, dst)
    assert r["layers"][0]["rel_error"] == 0 and r["layers"][1]["rel_error"] > 0.01
