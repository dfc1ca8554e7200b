"""The verifier against small hand-built outputs: one valid model, then one defect per test."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from streamq.inspect_out import inspect_summary
from streamq.verify import main_verify, verify

H, I, KV, E, V, G = 32, 32, 16, 2, 64, 16   # hidden, intermediate, k/v width, experts, vocab, group
ATTN = "model.layers.0.self_attn"
Q, K, O = f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.o_proj"
MLP0 = "model.layers.0.mlp"
EXPERTS = "model.layers.1.mlp.experts"
DEQ = {torch.bfloat16: torch.float32, torch.float16: torch.int64}


# --- fixture: tensors per scheme, as FORMAT.md §3 lays them out -----------------------------------

def _scale(*shape, dtype=torch.float32):
    return (torch.rand(*shape) + 0.01).to(dtype)


def _add(T, D, prefix, qtype, tensors):
    for suffix, t in tensors.items():
        T[f"{prefix}.{suffix}"] = t
        D[f"{prefix}.{suffix}"] = "FLOAT" if suffix == "bias" else qtype


def _int8(n, k, dt):
    return {"weight": torch.randint(-127, 128, (n, k), dtype=torch.int8),
            "weight_scale": _scale(n, 1, dtype=dt), "weight_offset": torch.zeros(n, 1, dtype=dt)}


def _static(n, k, dt):
    t = _int8(n, k, dt)
    s_x = torch.tensor([0.05], dtype=dt)
    deq = t["weight_scale"].float()[:, 0] * s_x.float()
    return {**t, "input_scale": s_x, "input_offset": torch.tensor([-3.0], dtype=dt),
            "deq_scale": deq if dt == torch.bfloat16 else deq.view(torch.int32).to(torch.int64),
            "quant_bias": torch.zeros(n, dtype=torch.int32)}


def _w4a16(n, k):
    return {"weight": torch.randint(-128, 128, (n // 2, k), dtype=torch.int8),
            "weight_scale": _scale(n, k // G), "weight_offset": torch.zeros(n, k // G)}


def _pack(q):
    return (q[1::2] << 4) | (q[0::2] & 0x0F)


def _w4a8_two_level(n, k, row_parallel):
    return {"weight": _pack(torch.randint(-7, 8, (n, k), dtype=torch.int8)),
            "weight_scale": _scale(n, 1), "weight_offset": torch.zeros(n, 1),
            "weight_scale_second": torch.randint(1, 5, (n, k // G)).float(),
            "weight_offset_second": torch.zeros(n, k // G, dtype=torch.int64),
            "scale_bias": torch.randn(n, 16 if row_parallel else 1)}


def valid_model(dt=torch.bfloat16):
    """Layer 0: static W8A8 q/k/v with C8, dynamic o_proj, W4A16 gate/up, dynamic down with bias.
    Layer 1: MoE with W4A8_DYNAMIC two-level routed experts and W8A8_DYNAMIC shared experts."""
    torch.manual_seed(0)
    T, D = {}, {}
    _add(T, D, "model.embed_tokens", "FLOAT", {"weight": torch.randn(V, H).to(dt)})
    _add(T, D, "model.layers.0.input_layernorm", "FLOAT", {"weight": torch.ones(H, dtype=dt), "bias": torch.zeros(H)})
    for proj, n in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
        _add(T, D, f"{ATTN}.{proj}", "W8A8", _static(n, H, dt))
    for proj in ("k_proj", "v_proj"):
        _add(T, D, f"{ATTN}.{proj}", "C8", {"kv_cache_scale": _scale(KV, dtype=dt),
                                            "kv_cache_offset": torch.zeros(KV, dtype=dt)})
    _add(T, D, O, "W8A8_DYNAMIC", _int8(H, H, dt))
    _add(T, D, "model.layers.0.post_attention_layernorm", "FLOAT", {"weight": torch.ones(H, dtype=dt)})
    for proj in ("gate_proj", "up_proj"):
        _add(T, D, f"{MLP0}.{proj}", "W4A16", _w4a16(I, H))
    _add(T, D, f"{MLP0}.down_proj", "W8A8_DYNAMIC", {**_int8(H, I, dt), "bias": torch.zeros(H, dtype=dt)})
    _add(T, D, "model.layers.1.mlp.gate", "FLOAT", {"weight": torch.randn(E, H).to(dt)})
    for e in range(E):
        for proj, n, k in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            _add(T, D, f"{EXPERTS}.{e}.{proj}", "W4A8_DYNAMIC", _w4a8_two_level(n, k, proj == "down_proj"))
    for proj, n, k in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
        _add(T, D, f"model.layers.1.mlp.shared_experts.{proj}", "W8A8_DYNAMIC", _int8(n, k, dt))
    _add(T, D, "model.norm", "FLOAT", {"weight": torch.ones(H, dtype=dt)})
    _add(T, D, "lm_head", "FLOAT", {"weight": torch.randn(V, H).to(dt)})
    return T, D


def write(out, T, D, dt=torch.bfloat16, shards=2, config=None, description=None):
    """Write T (tensors) and D (types) as an output folder: shards, index, description, config."""
    out.mkdir()
    names = sorted(T)
    if shards == 1:
        files = {"quant_model_weights.safetensors": names}
    else:
        files = {f"quant_model_weights-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards]
                 for i in range(shards)}
        weight_map = {n: f for f, ns in files.items() for n in ns}
        total = sum(t.numel() * t.element_size() for t in T.values())
        (out / "quant_model_weights.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for f, ns in files.items():
        save_file({n: T[n].contiguous() for n in ns}, str(out / f))
    (out / "quant_model_description.json").write_text(json.dumps(
        # a W4A8 mix reports W8A8_DYNAMIC even beside static W8A8 (FORMAT §2, §5)
        {"version": "1.0.0", "model_quant_type": "W8A8_DYNAMIC", "group_size": G, "metadata": {},
         "kv_cache_type": "C8", "kv_quant_type": "C8", **D, **(description or {})}))
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": dtype_name,
                                                 **(config or {})}))
    return out


def build(tmp_path, edit=None, dt=torch.bfloat16, **kw):
    """A valid output, after edit(T, D) changed its tensors or types."""
    T, D = valid_model(dt)
    if edit:
        edit(T, D)
    return write(tmp_path / "out", T, D, dt, **kw)


def drop(T, D, name):
    del T[name], D[name]


def assert_violation(out, *needles):
    problems = verify(out)
    assert any(all(n in p for n in needles) for p in problems), problems


# --- the valid output ----------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [1, 3])
def test_valid_output_has_no_violation(tmp_path, dt, shards):
    out = build(tmp_path, dt=dt, shards=shards)
    assert verify(out) == []
    assert main_verify(out) == 0


def test_main_verify_reports_ok_and_violations(tmp_path, capsys):
    out = build(tmp_path)
    assert main_verify(out) == 0
    text = capsys.readouterr().out
    assert text.startswith("OK: ") and "model_quant_type=W8A8_DYNAMIC" in text
    (out / "config.json").unlink()
    assert main_verify(out) == 1
    text = capsys.readouterr().out
    assert "config.json: missing" in text and "1 violation" in text


def test_inspect_summary(tmp_path):
    text = inspect_summary(build(tmp_path))
    for needle in ("W8A8 ", "W4A16", "W4A8_DYNAMIC", "W8A8_DYNAMIC", "C8", "FLOAT", "total", "compression ratio"):
        assert needle in text, text
    ratio = float(text.split("compression ratio: ")[1].split("x")[0])
    assert 1.0 < ratio < 4.0


# --- one defect per test -------------------------------------------------------------------------

def test_missing_deq_scale(tmp_path):
    out = build(tmp_path, lambda T, D: drop(T, D, f"{Q}.deq_scale"))
    assert_violation(out, f"{Q}.deq_scale", "missing")


@pytest.mark.parametrize("dt, suffix, wrong", [
    (torch.bfloat16, "deq_scale", torch.int64),      # the fp16 form in a bf16 model
    (torch.float16, "deq_scale", torch.float32),     # the bf16 form in an fp16 model
    (torch.bfloat16, "weight_scale", torch.float32),
])
def test_wrong_dtype(tmp_path, dt, suffix, wrong):
    def edit(T, D):
        T[f"{Q}.{suffix}"] = T[f"{Q}.{suffix}"].to(wrong)
    assert_violation(build(tmp_path, edit, dt=dt), f"{Q}.{suffix}", "dtype")


def test_extra_tensor(tmp_path):
    def edit(T, D):
        T[f"{O}.input_scale"], D[f"{O}.input_scale"] = torch.tensor([0.1], dtype=torch.bfloat16), "W8A8_DYNAMIC"
    assert_violation(build(tmp_path, edit), f"{O}.input_scale", "unexpected")


def test_fused_type_mismatch(tmp_path):
    def edit(T, D):  # v_proj becomes dynamic: drop its static tensors, retype the rest
        for suffix in ("input_scale", "input_offset", "deq_scale", "quant_bias"):
            drop(T, D, f"{ATTN}.v_proj.{suffix}")
        for suffix in ("weight", "weight_scale", "weight_offset"):
            D[f"{ATTN}.v_proj.{suffix}"] = "W8A8_DYNAMIC"
    assert_violation(build(tmp_path, edit), ATTN, "v_proj=W8A8_DYNAMIC", "q_proj=W8A8")


def test_expert_type_mismatch(tmp_path):
    def edit(T, D):
        prefix = f"{EXPERTS}.1.down_proj"
        for suffix in list(_w4a8_two_level(H, I, True)):
            drop(T, D, f"{prefix}.{suffix}")
        _add(T, D, prefix, "W8A8_DYNAMIC", _int8(H, I, torch.bfloat16))
    assert_violation(build(tmp_path, edit), EXPERTS, "W8A8_DYNAMIC")


def test_linear_with_mixed_types(tmp_path):
    assert_violation(build(tmp_path, lambda T, D: D.update({f"{O}.weight_scale": "W8A8"})),
                     f"{O}.weight_scale", "type W8A8")


def test_description_entry_without_tensor(tmp_path):
    out = build(tmp_path, description={"model.layers.0.mlp.ghost.weight": "FLOAT"})
    assert_violation(out, "model.layers.0.mlp.ghost.weight", "no tensor")


def test_tensor_without_description_entry(tmp_path):
    assert_violation(build(tmp_path, lambda T, D: D.pop("model.norm.weight")), "model.norm.weight", "no entry")


def test_index_mismatch(tmp_path):
    out = build(tmp_path)
    path = out / "quant_model_weights.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    wm[f"{Q}.weight"] = next(f for f in set(wm.values()) if f != wm[f"{Q}.weight"])
    del wm["lm_head.weight"]
    index["metadata"]["total_size"] += 1
    path.write_text(json.dumps(index))
    problems = verify(out)
    for needle in (f"{Q}.weight", "lacks lm_head.weight", "total_size"):
        assert any(needle in p for p in problems), (needle, problems)


@pytest.mark.parametrize("config", [{"quantization_config": {"quant_method": "fp8"}},
                                    {"text_config": {"quantization_config": {"quant_method": "fp8"}}}])
def test_quantization_config_present(tmp_path, config):
    assert_violation(build(tmp_path, config=config), "config.json", "quantization_config")


def test_zero_dim_input_scale(tmp_path):
    def edit(T, D):
        T[f"{Q}.input_scale"] = T[f"{Q}.input_scale"].reshape(())
    assert_violation(build(tmp_path, edit), f"{Q}.input_scale", "shape []")


def test_nonfinite_scale(tmp_path):
    def edit(T, D):
        T[f"{O}.weight_scale"][3, 0] = float("inf")
    assert_violation(build(tmp_path, edit), f"{O}.weight_scale", "non-finite")


def test_truncated_shard(tmp_path):
    out = build(tmp_path)
    shard = out / "quant_model_weights-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 10)
    assert_violation(out, shard.name, "truncated")


def test_wrong_model_quant_type(tmp_path):
    assert_violation(build(tmp_path, description={"model_quant_type": "W8A8"}),
                     "model_quant_type", "'W8A8_DYNAMIC'")


# --- further rules ------------------------------------------------------------------------------

def test_stray_source_files(tmp_path):
    out = build(tmp_path)
    save_file({"x": torch.zeros(1)}, str(out / "model-00001-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text("{}")
    problems = verify(out)
    assert any("model-00001-of-00002.safetensors" in p for p in problems), problems
    assert any("model.safetensors.index.json" in p for p in problems), problems


def test_missing_numbered_shard(tmp_path):
    out = build(tmp_path, shards=3)
    (out / "quant_model_weights-00002-of-00003.safetensors").unlink()
    assert_violation(out, "quant_model_weights-00002-of-00003.safetensors", "missing")


def test_int4_minus_eight_in_two_level_expert(tmp_path):
    def edit(T, D):
        T[f"{EXPERTS}.0.gate_proj.weight"][0, 0] = 0x08   # low nibble 0b1000 = -8
    assert_violation(build(tmp_path, edit), f"{EXPERTS}.0.gate_proj.weight", "-8")


def test_down_proj_scale_bias_needs_16_columns(tmp_path):
    def edit(T, D):
        T[f"{EXPERTS}.0.down_proj.scale_bias"] = torch.randn(H, 1)
    assert_violation(build(tmp_path, edit), f"{EXPERTS}.0.down_proj.scale_bias", f"expected [{H}, 16]")


def test_non_integer_second_scale(tmp_path):
    def edit(T, D):
        T[f"{EXPERTS}.1.up_proj.weight_scale_second"][0, 0] = 1.5
    assert_violation(build(tmp_path, edit), f"{EXPERTS}.1.up_proj.weight_scale_second", "integer")


def test_fused_static_shards_share_activation_scale(tmp_path):
    def edit(T, D):
        T[f"{K}.input_scale"] = torch.tensor([0.07], dtype=torch.bfloat16)
    assert_violation(build(tmp_path, edit), ATTN, "input_scale differs")


def test_nonzero_weight_offset(tmp_path):
    def edit(T, D):
        T[f"{O}.weight_offset"][0, 0] = 1
    assert_violation(build(tmp_path, edit), f"{O}.weight_offset", "non-zero")


def test_c8_needs_description_keys(tmp_path):
    out = build(tmp_path, description={"kv_cache_type": None})
    assert_violation(out, "kv_cache_type", "expected 'C8'")


def test_norm_bias_must_be_float(tmp_path):
    name = "model.layers.0.input_layernorm.bias"
    assert_violation(build(tmp_path, lambda T, D: D.update({name: "W8A8"})), name, "norm bias")
