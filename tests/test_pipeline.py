"""End-to-end runs on tiny dense checkpoints: output files, formulas, float equivalence."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from streamq.arch import arch_for
from streamq.checkpoint import CheckpointReader
from streamq.synth import write_dense

from conftest import SMALL_CAL, load_all, run_cli, write_recipe


def test_w8a8_dynamic_output_matches_format(tiny_llama, recipe_w8a8_dynamic, tmp_path):
    out = tmp_path / "out"
    run_cli("run", recipe_w8a8_dynamic, "--model", tiny_llama, "--output", out, check=True)
    names = sorted(p.name for p in out.iterdir())
    assert "quant_model_weights-00001-of-00001.safetensors" in names
    assert "model.safetensors" not in names and "model.safetensors.index.json" not in names
    assert not (out / ".streamq").exists()
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC" and desc["group_size"] == 0 and desc["version"] == "1.0.0"
    assert desc["model.layers.1.mlp.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc["lm_head.weight"] == "FLOAT"  # disable_last_linear
    src, got = load_all(tiny_llama), load_all(out)
    assert set(desc) - {"version", "model_quant_type", "group_size", "metadata"} == set(got)
    W = src["model.layers.1.self_attn.k_proj.weight"].float()
    s = (W.abs().amax(1, keepdim=True) / 127).to(torch.bfloat16)
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight_scale"], s)
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"],
                       torch.clamp(torch.round(W / s.float()), -127, 127).to(torch.int8))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert run_cli("verify", out).returncode == 0


def test_all_float_is_bit_identical(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path / "f.toml", SMALL_CAL + '[quant]\nscheme = "FLOAT"\n')
    out = tmp_path / "out"
    run_cli("run", recipe, "--model", tiny_llama, "--output", out, check=True)
    src, got = load_all(tiny_llama), load_all(out)
    assert src.keys() == got.keys()
    for k in src:
        assert src[k].dtype == got[k].dtype and torch.equal(src[k].view(torch.uint8), got[k].view(torch.uint8)), k


def test_tied_embeddings_write_no_lm_head(tmp_path):
    model = write_dense(tmp_path / "tied", "llama", layers=1, vocab=128, tied=True)
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nscheme = "W4A16"\ngroup_size = 32\n')
    run_cli("run", recipe, "--model", model, "--output", tmp_path / "out", check=True)
    assert "lm_head.weight" not in load_all(tmp_path / "out")
    desc = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    assert desc["group_size"] == 32 and desc["model_quant_type"] == "W4A16"
    assert run_cli("verify", tmp_path / "out").returncode == 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_families_run_and_verify(family, tmp_path):
    model = write_dense(tmp_path / family, family, layers=2, vocab=128)
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nscheme = "W8A8_DYNAMIC"\n')
    run_cli("run", recipe, "--model", model, "--output", tmp_path / "out", check=True)
    got = load_all(tmp_path / "out")
    if family == "qwen2":
        assert got["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in got
    assert run_cli("verify", tmp_path / "out").returncode == 0


def layerwise_logits(model_dir, ids):
    """streamq's float forward, one layer at a time, from the checkpoint on disk."""
    reader = CheckpointReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch = arch_for(config, reader)
    steps = arch.steps()
    embed = reader.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"].float()
    h = embed[ids]
    rotary = arch.rotary(ids.shape[1], "cpu", torch.float32)
    for step in steps[1:-1]:
        layer = arch.build_layer(step, reader.load(list(step.shapes)), "cpu", torch.float32)
        with torch.no_grad():
            h = arch.layer_forward(layer, h, rotary)
    final = reader.load(list(steps[-1].shapes))
    h = arch.final_norm(final["model.norm.weight"].float())(h)
    head = final.get("lm_head.weight", embed).float()
    return h @ head.T


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float_forward_matches_transformers(family, tmp_path):
    model_dir = write_dense(tmp_path / family, family, layers=3, vocab=128, tied=(family == "llama"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = ref(ids).logits
    got = layerwise_logits(model_dir, ids)
    assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4), (got - expect).abs().max()
