"""The plan's own estimate of peak host RSS: its arithmetic by hand, and against a measured run."""
import json

import pytest

from streamq import budget
from streamq.pipeline import prepare
from streamq.recipe import load_recipe
from streamq.synth import write_deepseek_v3, write_dense

from conftest import SMALL_CAL, run_cli, write_recipe

# SMALL_CAL: 4 samples × 16 tokens, batch_size 2, device cpu; compute dtype float32 by default.
W8A8D = SMALL_CAL + '[quant]\nscheme = "W8A8_DYNAMIC"\n'


def _moments(tmp_path, model, body: str) -> dict[str, dict]:
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", body))
    p = prepare(recipe, model)
    return dict(budget.moments(recipe, p.plan, p.reader, p.arch, on_host=True))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # hidden 64, intermediate 128, 4 heads and 2 KV heads of 16: q, o 64×64; k, v 32×64;
    # gate, up 128×64; down 64×128; two norms of 64. bf16.
    return write_dense(tmp_path_factory.mktemp("llama") / "m", "llama", layers=2, vocab=128)


LINEARS = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192     # 36,864 weights
LAYER = LINEARS + 2 * 64                                     # 36,992 tensor elements
OUTPUTS = LINEARS + 512 * 2 * 2      # int8 weights + bf16 scale and offset per row (512 rows)
HIDDEN = 4 * 16 * 64 * 4             # one fp32 copy of the calibration states
TOKENS = 2 * 16                      # one batch


def test_dense_layer_by_hand(tmp_path, llama):
    m = _moments(tmp_path, llama, W8A8D)
    held = {"weights": LAYER * 2, "hidden": 2 * HIDDEN, "read_ahead": LAYER * 2}  # layer.1 read ahead
    # fp32 compute over a bf16 model: the module is a full fp32 copy, and Ŵ replaces its weights.
    # layer.1 being read: its mapped pages, and a third copy of its largest tensor.
    assert m["layer.0 read"] == {**held, "module": LAYER * 4, "work": LAYER * 2 + 8192 * 2}
    # down_proj is quantized last: the largest linear (8192 weights × (fp32 W/s, rounding, int8 q);
    # its fp32 W is the module's own) with the other linears' outputs already made.
    assert m["layer.0 quantize"] == {**held, "module": LAYER * 4, "outputs": OUTPUTS - (8192 + 64 * 2 * 2),
                                     "work": 8192 * 9}
    batch = TOKENS * 4 * (4 * 128 + 10 * 64)
    assert m["layer.0 forward"] == {**held, "module": LAYER * 4, "outputs": OUTPUTS, "work": batch}
    assert m["layer.1 forward"]["read_ahead"] == 64 * 2 + 128 * 64 * 2   # the final norm and lm_head


def test_compute_in_the_model_dtype_shares_the_source_tensors(tmp_path, llama):
    m = _moments(tmp_path, llama, W8A8D.replace("[run]", '[run]\ncompute_dtype = "bfloat16"'))
    assert m["layer.0 read"]["module"] == 0                       # .to(bf16) of bf16 is the same tensor
    assert m["layer.0 forward"]["module"] == LINEARS * 2          # the Ŵ installed
    assert m["layer.0 quantize"]["work"] == 8192 * 13             # W.float() is now a copy


def test_without_read_ahead_a_layer_reads_its_own_tensors(tmp_path, llama):
    m = _moments(tmp_path, llama, W8A8D.replace("[run]", "[run]\nread_ahead = false"))
    assert m["layer.0 forward"]["read_ahead"] == 0
    assert m["layer.0 read"]["work"] == LAYER * 2 + 8192 * 2


def test_routed_experts_by_hand(tmp_path):
    # tiny DeepSeek widths: hidden 64, experts of 3 × 64×32; layer 0 dense, layer 1 with 8 experts.
    model = write_deepseek_v3(tmp_path / "ds", layers=2, experts=8)
    body = W8A8D.replace("[run]", "[run]\nexpert_budget_gb = 0.00005")  # 50,000 // (6144 × 4 B) = 2
    m = _moments(tmp_path, model, body)["layer.1 experts forward"]
    expert = 3 * 64 * 32
    per_expert_out = expert + (32 + 32 + 64) * 2 * 2
    final = 64 * 2 + 256 * 64 * 2                     # the next step: final norm and lm_head
    assert m == {"weights": 2 * expert * 2,           # the chunk of 2, bf16
                 "hidden": 5 * HIDDEN,                # H, F.out, F.x, Q.out, Q.x
                 # and the next chunk: pages, copies, and its largest tensor once more
                 "read_ahead": final + 2 * (2 * expert * 2) + 2048 * 2,
                 "write_behind": 7 * per_expert_out,  # every other expert's outputs fit the 0.5 GB queue
                 "module": expert * 4, "outputs": per_expert_out,
                 "work": TOKENS * 4 * (4 * 64 + 10 * 64)}


def test_fp8_reads_peak_at_the_dequantization(tmp_path):
    model = write_deepseek_v3(tmp_path / "ds", layers=2, experts=8, fp8=True)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", W8A8D))
    p = prepare(recipe, model)
    reader, k = p.reader, budget.knobs(recipe, p.plan, 64, True)
    names = ["model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight"]
    stored = 2 * 2048                                  # fp8, one byte each (scales are read with them)
    # down_proj's dequantization: gate_proj already bf16 (one byte more per element), down_proj's
    # fp8 copy beside its fp32 w, expanded scale and product.
    assert budget._read_peak(reader, names, k) == stored + 2048 * (2 - 1) + 12 * 2048
    assert budget._read_peak(reader, names[:1], k) == 13 * 2048  # alone: its fp8 copy + 12 B


def _peak_and_estimate(tmp_path, model, recipe) -> tuple[int, int, str]:
    proc = run_cli("run", recipe, "--model", model, "--output", tmp_path / f"{model.name}-out", check=True)
    report = json.loads((tmp_path / f"{model.name}-out" / "streamq_report.json").read_text())
    assert report["estimated_peak_rss_bytes"] == report["estimated_peak_rss"]["bytes"]
    assert "estimated peak host RSS" in proc.stderr
    return report["peak_rss_bytes"], report["estimated_peak_rss_bytes"], json.dumps(report["estimated_peak_rss"])


def test_estimate_above_the_floor_matches_the_measured_run(tmp_path):
    """RSS is noisy, so the bound is loose. It compares what lies above the floor, with the floor
    measured here (a tiny run) rather than the constant, which holds for one machine and torch
    build; the wide model's terms are large enough that a missing or doubled module fails."""
    recipe = write_recipe(tmp_path / "r.toml", W8A8D)
    tiny, _, _ = _peak_and_estimate(tmp_path, write_dense(tmp_path / "tiny", "llama", layers=2, vocab=128), recipe)
    wide = write_dense(tmp_path / "wide", "llama", layers=2, hidden=1536, intermediate=6144, heads=12, kv_heads=12,
                       vocab=256)
    measured, estimate, parts = _peak_and_estimate(tmp_path, wide, recipe)
    assert estimate - budget.FLOOR_BYTES > 300e6, parts
    assert 0.75 < (estimate - budget.FLOOR_BYTES) / (measured - tiny) < 1.3, parts


def test_moe_input_smoothing_read_is_a_moment(tmp_path):
    """DeepSeek smoothing reads the routed experts' gate/up a chunk at a time beside the base."""
    model = write_deepseek_v3(tmp_path / "ds", layers=2, experts=8)
    body = W8A8D.replace("[run]", "[run]\nexpert_budget_gb = 0.00005") + 'anti_method = "m4"\n'  # chunks of 2
    found = _moments(tmp_path, model, body)
    assert "layer.0 smoothing read" not in found                  # the dense layer reads no experts
    gate_up = 2 * 2 * 64 * 32 * 2                                   # 2 experts × gate, up, bf16
    m = found["layer.1 smoothing read"]
    assert m["smoothing_read"] == 2 * gate_up + 64 * 32 * 2 and m["hidden"] == 5 * HIDDEN
    only_ov = body.replace('anti_method = "m4"\n', 'anti_method = "m4"\nenable_subgraph_type = ["ov"]\n')
    assert "layer.1 smoothing read" not in _moments(tmp_path, model, only_ov)
