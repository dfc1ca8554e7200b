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


def relabel(src, dst, old: str, new: str):
    """A copy of an output whose description says `new` wherever it said `old` (same tensors)."""
    import shutil
    shutil.copytree(src, dst)
    path = dst / "quant_model_description.json"
    desc = json.loads(path.read_text())
    path.write_text(json.dumps({k: new if v == old else v for k, v in desc.items()}))
    return dst


def test_w8a8_mix_phases_run_the_dynamic_and_the_static_path(runs):
    tmp, model, _, _ = runs
    mix = tmp / "mix"
    run_cli("run", write_recipe(tmp / "mix.toml", SMALL_CAL + '[quant]\nscheme = "W8A8_MIX"\n'), "--model", model,
            "--output", mix, check=True)
    prefill, decode = (evaluate(model, mix, samples=4, seq_len=32, batch=2, phase=p) for p in ("prefill", "decode"))
    assert prefill["phase"] == "prefill" and decode["phase"] == "decode"
    # PDMIX holds both tensor sets: each phase must equal the scheme it borrows its math from.
    as_dynamic = ev(model, relabel(mix, tmp / "mix-dyn", "W8A8_MIX", "W8A8_DYNAMIC"))
    as_static = ev(model, relabel(mix, tmp / "mix-static", "W8A8_MIX", "W8A8"))
    assert prefill["kl_mean"] == as_dynamic["kl_mean"] and decode["kl_mean"] == as_static["kl_mean"]
    assert prefill["kl_mean"] != decode["kl_mean"]


def test_eval_refuses_an_unknown_phase(runs):
    from streamq.errors import StreamqError
    _, model, out, _ = runs
    with pytest.raises(StreamqError, match="phase 'both'"):
        evaluate(model, out, samples=4, seq_len=32, batch=2, phase="both")


def test_decode_phase_needs_a_pdmix_output(runs):
    from streamq.errors import StreamqError
    _, model, out, _ = runs
    with pytest.raises(StreamqError, match="no linear of this output is W8A8_MIX"):
        evaluate(model, out, samples=4, seq_len=32, batch=2, phase="decode")
