"""Weight methods, activation observers and smoothing inside real runs (tiny checkpoints)."""
import json

import pytest
import torch

from streamq import cli
from streamq.evaluate import evaluate
from streamq.synth import write_dense, write_deepseek_v3

from conftest import REPO, SMALL_CAL, load_all, write_recipe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_dense(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", layers=2, hidden=128, intermediate=256,
                       vocab=128)


def run(tmp_path, model, name, quant, cal=SMALL_CAL):
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.toml", cal + quant)
    assert cli.main(["run", str(recipe), "--model", str(model), "--output", str(out)]) == 0
    assert cli.main(["verify", str(out)]) == 0
    return out


def mean_layer_error(out):
    steps = json.loads((out / "streamq_report.json").read_text())["steps"]
    errs = [s["rel_error"] for s in steps if "rel_error" in s]
    return sum(errs) / len(errs)


def test_gptq_beats_minmax_on_its_calibration_data(tmp_path, model):
    cal = SMALL_CAL.replace("samples = 4", "samples = 8").replace("seq_len = 16", "seq_len = 64")
    q = '[quant]\nscheme = "W4A16"\ngroup_size = 32\nw_sym = false\nw_method = "{}"\n'
    minmax = mean_layer_error(run(tmp_path, model, "minmax", q.format("MinMax"), cal))
    gptq = mean_layer_error(run(tmp_path, model, "gptq", q.format("GPTQ") + "act_order = false\n", cal))
    gptq_ao = mean_layer_error(run(tmp_path, model, "gptq-ao", q.format("GPTQ"), cal))   # act_order is the default
    assert gptq < 0.9 * minmax and gptq_ao < 0.9 * minmax, (minmax, gptq, gptq_ao)


def test_hqq_and_ssz_run_and_verify(tmp_path, model):
    run(tmp_path, model, "hqq", '[quant]\nscheme = "W4A16"\ngroup_size = 32\nw_method = "HQQ"\n')
    out = run(tmp_path, model, "ssz", '[quant]\nscheme = "W4A8_DYNAMIC"\ngroup_size = 0\nw_method = "ssz"\n')
    assert json.loads((out / "quant_model_description.json").read_text())["group_size"] == 0


def test_histogram_observer_changes_static_ranges(tmp_path, model):
    name = "model.layers.1.mlp.down_proj.input_scale"
    scales = {m: load_all(run(tmp_path, model, f"act{m}", f'[quant]\nscheme = "W8A8"\nact_method = {m}\n'))[name]
              for m in (1, 2)}
    assert scales[2].item() < scales[1].item()  # the histogram clips the tails min-max keeps


def test_asymmetric_smoothing_is_equivalent_through_the_checkpoint(tmp_path, model):
    out = run(tmp_path, model, "smooth", '[quant]\nscheme = "FLOAT"\nanti_method = "m4"\nanti_symmetric = false\n')
    got = load_all(out)
    assert got["model.layers.0.input_layernorm.bias"].dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.bias" in got  # Qwen3 has none: smoothing created it
    r = evaluate(model, out, samples=4, seq_len=32, batch=2)
    assert r["kl_mean"] < 1e-5 and r["top1_agreement"] == 1.0


@pytest.mark.parametrize("quant", ['scheme = "W8A8"\nanti_method = "m1"\n',
                                   'scheme = "W8A8_DYNAMIC"\nanti_method = "m4"\nanti_symmetric = false\n'])
def test_smoothed_quantized_runs_verify_and_stay_close(tmp_path, model, quant):
    out = run(tmp_path, model, "sq", "[quant]\n" + quant)
    r = evaluate(model, out, samples=4, seq_len=32, batch=2)
    assert r["kl_mean"] < 0.01


def test_gptq_on_deepseek_experts(tmp_path):
    src = write_deepseek_v3(tmp_path / "ds", layers=2, experts=4, hidden=256, moe_intermediate=256, fp8=True)
    text = (REPO / "recipes" / "deepseek_r1_w4a8.toml").read_text().replace('w_method = "MinMax"', 'w_method = "GPTQ"')
    recipe = write_recipe(tmp_path / "r.toml", text)
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--model", str(src), "--output", str(out), "--device", "cpu",
                     "--samples", "4", "--seq-len", "16"]) == 0
    assert cli.main(["verify", str(out)]) == 0


def test_kv_cache_c8_parameters(tmp_path, model):
    from streamq.calibration import token_ids
    from streamq.checkpoint import CheckpointReader
    out = run(tmp_path, model, "c8", '[quant]\nscheme = "W8A8_DYNAMIC"\nuse_kvcache_quant = true\n')
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["kv_cache_type"] == desc["kv_quant_type"] == "C8"
    got = load_all(out)
    # layer 0 sees the embeddings of the calibration ids: recompute its K range independently
    src = CheckpointReader(model).load(["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                        "model.layers.0.self_attn.k_proj.weight"])
    ids = token_ids([], None, 128, 4, 16, 0)
    h = src["model.embed_tokens.weight"].float()[ids]
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * src["model.layers.0.input_layernorm.weight"].float()
    k = x @ src["model.layers.0.self_attn.k_proj.weight"].float().T
    lo, hi = k.amin((0, 1)).clamp(max=0), k.amax((0, 1)).clamp(min=0)
    s = ((hi - lo) / 255).to(torch.bfloat16)
    assert desc["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"
    assert torch.allclose(got["model.layers.0.self_attn.k_proj.kv_cache_scale"].float(), s.float(), rtol=1e-2)
    o = got["model.layers.0.self_attn.k_proj.kv_cache_offset"].float()
    assert torch.equal(o, torch.round(o)) and o.min() >= -128 and o.max() <= 127
