"""streamq eval: the consumer's math from the stored tensors, and detection of corrupted tensors."""
import json

import pytest
import torch

from streamq.evaluate import evaluate
from streamq.synth import write_dense

from conftest import SMALL_CAL, corrupt, run_cli, write_recipe

RECIPE = SMALL_CAL + """
[quant]
scheme = "W8A8_DYNAMIC"
[[quant.rules]]
match = "*.self_attn.o_proj"
scheme = "W8A8"
[[quant.rules]]
match = "*.mlp.down_proj"
scheme = "W4A16"
group_size = 32
w_sym = false
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = write_dense(tmp / "m", "qwen2", layers=2, hidden=128, intermediate=256, vocab=128)
    out = tmp / "out"
    run_cli("run", write_recipe(tmp / "r.toml", RECIPE), "--model", model, "--output", out, check=True)
    flt = tmp / "float"
    run_cli("run", write_recipe(tmp / "f.toml", SMALL_CAL + '[quant]\nscheme = "FLOAT"\n'), "--model", model,
            "--output", flt, check=True)
    return tmp, model, out, flt


def ev(model, out):
    return evaluate(model, out, samples=4, seq_len=32, batch=2)


def test_all_float_output_has_no_divergence(runs):
    _, model, _, flt = runs
    r = ev(model, flt)
    assert r["kl_mean"] < 1e-6 and r["ppl_quantized"] == pytest.approx(r["ppl_reference"], rel=1e-9)
    assert r["top1_agreement"] == 1.0


def test_quantized_output_is_close(runs):
    _, model, out, _ = runs
    r = ev(model, out)
    assert 0 < r["kl_mean"] < 0.05 and r["top1_agreement"] > 0.8
    assert len(r["layers"]) == 2 and all(e["rel_error"] < 0.2 for e in r["layers"])


def swap_nibbles(t):
    u = t.view(torch.uint8)
    return ((u >> 4) | (u << 4)).view(torch.int8)


CORRUPTIONS = {
    "weight_scale": ("model.layers.1.mlp.up_proj.weight_scale", lambda t: t * 1.5),
    "nibble_order": ("model.layers.0.mlp.down_proj.weight", swap_nibbles),
    "quant_bias": ("model.layers.1.self_attn.o_proj.quant_bias", torch.zeros_like),
    "deq_scale": ("model.layers.0.self_attn.o_proj.deq_scale", lambda t: t * 2),
    "group_offset": ("model.layers.1.mlp.down_proj.weight_offset", lambda t: t + 1),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corrupted_tensor_is_detected(runs, kind):
    tmp, model, out, _ = runs
    good = ev(model, out)
    name, fn = CORRUPTIONS[kind]
    bad = ev(model, corrupt(out, tmp / f"bad-{kind}", name, fn))
    assert bad["kl_mean"] > 2 * good["kl_mean"], (kind, good["kl_mean"], bad["kl_mean"])
    layer = int(name.split(".")[2])
    assert bad["layers"][layer]["rel_error"] > 1.5 * good["layers"][layer]["rel_error"]


def test_eval_cli_prints_a_table(runs, tmp_path):
    _, model, out, _ = runs
    proc = run_cli("eval", "--reference", model, "--quantized", out, "--samples", "2", "--seq-len", "16",
                   "--json", tmp_path / "r.json", check=True)
    assert "top-1 agreement" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == 2 * 15
