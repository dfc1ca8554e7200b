"""DeepSeek-V3/R1 end to end: the repo's W4A8 recipe on a tiny FP8 checkpoint with an MTP layer.

The checkpoint is small (hidden 256, expert width 256 so that the 256-wide int4 groups fit, 3
layers of which the first is dense, 8 routed experts) but has every feature of R1: FP8 weights
with 128×128 block scales, the MTP layer, routed and shared experts. The recipe is the one users
run, with only the calibration size, device and memory budgets shrunk; the expert budget is
small enough that each MoE layer streams its experts in several chunks.

Expected values are computed here from the source checkpoint, following FORMAT.md, without
calling streamq's quantization code.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamq.cli import main as streamq_main
from streamq.synth import write_deepseek_v3

from conftest import REPO, load_all, output_bytes

LAYERS, FIRST_K_DENSE, EXPERTS = 3, 1, 8
MTP = LAYERS                     # the MTP layer is stored as model.layers.{num_hidden_layers}
HIDDEN = MOE_WIDTH = 256         # both multiples of the 256-wide int4 groups of the routed experts
G = 256
FP8_BLOCK = 128
# Layer 2's router never picks this expert (its correction bias is pushed far down), so the run
# must quantize an expert that sees no calibration token.
UNROUTED_LAYER, UNROUTED_EXPERT = 2, 6

# The repo recipe as users run it, with calibration and memory shrunk for a test. 0.001 GB of
# expert budget holds two 256×256 experts, so each MoE layer streams its 8 experts in 4 chunks;
# 1 MB shards split the ~5 MB output so that kills land in unfinished shards too.
RECIPE_EDITS = {
    "samples = 128": "samples = 4",
    "seq_len = 2048": "seq_len = 16",
    'device = "auto"': 'device = "cpu"',
    "batch_size = 4": "batch_size = 2",
    "expert_budget_gb = 8.0": "expert_budget_gb = 0.001",
    "shard_size_gb = 4.0": "shard_size_gb = 0.001",
}
DEEPSEEK_CONFIG_KEYS = {"quantize": "w8a8_dynamic", "mla_quantize": "w8a8", "moe_quantize": "w4a8_dynamic",
                        "mtp_quantize": "w8a8_dynamic"}


# --- helpers -----------------------------------------------------------------------------------


def streamq(*args) -> int:
    """The command line in this process. A run of a tiny model is dominated by interpreter and
    import start-up, so only the runs that must die (the kill tests) get a process of their own."""
    return streamq_main([str(a) for a in args])


def deepseek_recipe(path: Path, mtp: str = "quantize") -> Path:
    """The repo recipe with RECIPE_EDITS applied and [model] mtp set. Each edit must hit exactly
    once, so that a changed recipe fails here instead of silently calibrating on 128×2048 tokens."""
    text = (REPO / "recipes" / "deepseek_r1_w4a8.toml").read_text()
    for old, new in {**RECIPE_EDITS, 'mtp = "quantize"': f'mtp = "{mtp}"'}.items():
        assert text.count(old) == 1, f"recipes/deepseek_r1_w4a8.toml no longer has exactly one {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def write_model(folder: Path, layers: int = LAYERS, experts: int = EXPERTS, **kw) -> Path:
    return write_deepseek_v3(folder, layers=layers, first_k_dense=FIRST_K_DENSE, experts=experts, hidden=HIDDEN,
                             fp8=True, vocab=128, moe_intermediate=MOE_WIDTH, seed=0, **kw)


def starve_expert(model: Path, layer: int, expert: int) -> None:
    """Push one expert's router correction bias far below the others. The bias only decides which
    experts are chosen (sigmoid scores lie in [0, 1]), so this expert is never routed a token."""
    name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            if name not in f.keys():
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[name][expert] = -100.0
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return
    raise AssertionError(f"{name} not found in {model}")


def read_json(path: Path):
    return json.loads(path.read_text())


def write_order(folder: Path) -> list[str]:
    """Output tensor names in the order they were written: shard by shard, by data offset."""
    names = []
    for shard in sorted(folder.glob("quant_model_weights*.safetensors")):
        raw = shard.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return names


def dequant_fp8(src: dict, name: str) -> torch.Tensor:
    """A source weight as the model-dtype (bf16) tensor the quantizer starts from: each 128×128
    block of the FP8 weight times its scale; edge blocks are cut to the weight's shape."""
    w, s = src[name + ".weight"], src[name + ".weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn, f"{name}: the source weight is not FP8"
    rows = torch.arange(w.shape[0]) // FP8_BLOCK
    cols = torch.arange(w.shape[1]) // FP8_BLOCK
    return (w.float() * s.float()[rows][:, cols]).to(torch.bfloat16).float()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """FORMAT §4: byte j of a column holds row 2j in its low nibble and row 2j+1 in its high one."""
    b = packed.to(torch.int16)
    lo = b & 0x0F
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = b >> 4
    return torch.stack([lo, hi], dim=1).reshape(2 * packed.shape[0], packed.shape[1])


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


LINEAR_SUFFIXES = ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second",
                   "scale_bias", "input_scale", "input_offset", "deq_scale", "quant_bias")
MLA_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")


def expected_type(name: str) -> str:
    """FORMAT §5's W4A8 mix, restated for one output tensor."""
    layer = layer_of(name)
    module, _, suffix = name.rpartition(".")
    if layer is None or suffix not in LINEAR_SUFFIXES:
        return "FLOAT"
    last = module.rsplit(".", 1)[-1]
    if ".mlp.experts." in name:
        return "W8A8_DYNAMIC" if layer == MTP else "W4A8_DYNAMIC"
    if ".self_attn." in name:
        return "W8A8" if last in MLA_LINEARS else "FLOAT"   # kv_b_proj and the norms stay FLOAT
    if ".mlp.shared_experts." in name:
        return "W8A8_DYNAMIC"
    if layer < FIRST_K_DENSE and last in ("gate_proj", "up_proj", "down_proj"):
        return "W8A8_DYNAMIC"
    return "FLOAT"   # router gate, norms, eh_proj, shared_head, embed_tokens


def assert_w8a8_dynamic(out: dict, src: dict, linear: str) -> None:
    W = dequant_fp8(src, linear)
    # The weight is rounded against the stored bf16 scale: that is the scale the consumer uses.
    s_w = (W.abs().amax(dim=1, keepdim=True) / 127).to(torch.bfloat16)
    q = torch.clamp(torch.round(W / s_w.float()), -127, 127).to(torch.int8)
    assert out[f"{linear}.weight"].dtype == torch.int8
    torch.testing.assert_close(out[f"{linear}.weight_scale"], s_w, rtol=0, atol=0)
    torch.testing.assert_close(out[f"{linear}.weight"], q, rtol=0, atol=0)
    torch.testing.assert_close(out[f"{linear}.weight_offset"], torch.zeros_like(s_w), rtol=0, atol=0)


def assert_w4a8_two_level(out: dict, src: dict, linear: str) -> None:
    W = dequant_fp8(src, linear)
    n, k = W.shape
    s1 = W.abs().amax(dim=1, keepdim=True) / 119
    w8 = torch.clamp(torch.round(W / s1), -119, 119)
    groups = w8.reshape(n, k // G, G)
    s2 = torch.clamp(torch.round(groups.abs().amax(dim=2) / 7), min=1)
    q4 = torch.clamp(torch.round(groups / s2[..., None]), -7, 7).reshape(n, k)

    t = {s: out[f"{linear}.{s}"] for s in ("weight", "weight_scale", "weight_offset", "weight_scale_second",
                                           "weight_offset_second", "scale_bias")}
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (n // 2, k), f"{linear}.weight packing"
    torch.testing.assert_close(unpack_int4(t["weight"]).float(), q4, rtol=0, atol=0)
    torch.testing.assert_close(t["weight_scale"], s1, rtol=0, atol=0)
    torch.testing.assert_close(t["weight_offset"], torch.zeros(n, 1), rtol=0, atol=0)
    torch.testing.assert_close(t["weight_scale_second"], s2, rtol=0, atol=0)
    torch.testing.assert_close(t["weight_offset_second"], torch.zeros(n, k // G, dtype=torch.int64), rtol=0, atol=0)

    # scale_bias uses s1 and s2 as the consumer holds them (bf16), products and sums in fp32.
    W_hat = (q4.reshape(n, k // G, G) * s2.to(torch.bfloat16).float()[..., None]).reshape(n, k) \
        * s1.to(torch.bfloat16).float()
    chunks = 16 if linear.endswith(("down_proj", "o_proj")) else 1
    parts = W_hat.reshape(n, chunks, k // chunks)
    expected = 8 * parts.sum(dim=2)
    assert t["scale_bias"].dtype == torch.float32 and t["scale_bias"].shape == (n, chunks)
    # Summation order may differ: allow fp32 rounding relative to the magnitudes summed.
    slack = 1e-5 * 8 * parts.abs().sum(dim=2) + 1e-12
    assert ((t["scale_bias"] - expected).abs() <= slack).all(), f"{linear}.scale_bias != 8·ΣŴ"


# --- the main run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepseek")
    model = write_model(tmp / "model", mtp=True)
    starve_expert(model, UNROUTED_LAYER, UNROUTED_EXPERT)
    recipe = deepseek_recipe(tmp / "w4a8.toml")
    out = tmp / "out"
    assert streamq("run", recipe, "--model", model, "--output", out) == 0
    return SimpleNamespace(tmp=tmp, model=model, recipe=recipe, out=out, tensors=load_all(out),
                           source=load_all(model), description=read_json(out / "quant_model_description.json"),
                           config=read_json(out / "config.json"), report=read_json(out / "streamq_report.json"))


# 1. layout and types


def test_output_verifies(ds):
    assert streamq("verify", ds.out) == 0


def test_description_globals_and_config(ds):
    assert ds.description["model_quant_type"] == "W8A8_DYNAMIC"
    assert ds.description["group_size"] == G
    for key, value in DEEPSEEK_CONFIG_KEYS.items():
        assert ds.config.get(key) == value, f"config.json {key}"
    assert "quantization_config" not in ds.config
    assert "quantization_config" not in ds.config.get("text_config", {})


def test_no_fp8_scales_written(ds):
    assert not [n for n in ds.tensors if n.endswith("weight_scale_inv")]
    assert not [n for n in ds.description if n.endswith("weight_scale_inv")]
    assert not [n for n, t in ds.tensors.items() if t.dtype == torch.float8_e4m3fn]


def test_every_tensor_has_the_w4a8_mix_type(ds):
    described = {k for k in ds.description if k not in ("version", "model_quant_type", "group_size", "metadata")}
    assert described == set(ds.tensors)
    wrong = {n: (ds.description[n], expected_type(n)) for n in sorted(ds.tensors) if ds.description[n] != expected_type(n)}
    assert not wrong, f"{len(wrong)} tensors typed wrongly (got, expected), e.g. {dict(list(wrong.items())[:8])}"


def test_named_modules_of_the_mix(ds):
    d = ds.description
    mtp = f"model.layers.{MTP}"
    for name in ("eh_proj.weight", "shared_head.head.weight", "enorm.weight", "hnorm.weight",
                 "shared_head.norm.weight"):
        assert d[f"{mtp}.{name}"] == "FLOAT", f"{mtp}.{name} must stay FLOAT (the consumer builds it unquantized)"
    for e in range(EXPERTS):
        assert d[f"{mtp}.mlp.experts.{e}.down_proj.weight"] == "W8A8_DYNAMIC"
    assert d[f"{mtp}.mlp.shared_experts.up_proj.weight"] == "W8A8_DYNAMIC"
    for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert d[f"{mtp}.self_attn.{proj}.weight"] == "W8A8"
    for i in range(LAYERS + 1):
        assert d[f"model.layers.{i}.self_attn.kv_b_proj.weight"] == "FLOAT"
        assert f"model.layers.{i}.self_attn.kv_b_proj.weight_scale" not in ds.tensors
        if i >= FIRST_K_DENSE:
            assert d[f"model.layers.{i}.mlp.gate.weight"] == "FLOAT"
    for i in range(FIRST_K_DENSE, LAYERS):
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert d[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] == "W4A8_DYNAMIC"
        assert d[f"model.layers.{i}.mlp.shared_experts.gate_proj.weight"] == "W8A8_DYNAMIC"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert d[f"model.layers.0.mlp.{proj}.weight"] == "W8A8_DYNAMIC"


# 2. values, from the FP8 source


@pytest.mark.parametrize("expert", [5, UNROUTED_EXPERT])
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_routed_expert_two_level_w4a8(ds, expert, proj):
    assert_w4a8_two_level(ds.tensors, ds.source, f"model.layers.2.mlp.experts.{expert}.{proj}")


def test_shared_expert_w8a8_dynamic(ds):
    linear = "model.layers.1.mlp.shared_experts.down_proj"
    assert ds.tensors[f"{linear}.weight_scale"].dtype == torch.bfloat16
    assert ds.tensors[f"{linear}.weight_scale"].shape == (HIDDEN, 1)
    assert_w8a8_dynamic(ds.tensors, ds.source, linear)


def test_mla_linear_w8a8_static(ds):
    t, linear = ds.tensors, "model.layers.1.self_attn.q_a_proj"
    assert_w8a8_dynamic(t, ds.source, linear)   # weight, weight_scale, weight_offset are the same as there
    s_x, o_x = t[f"{linear}.input_scale"], t[f"{linear}.input_offset"]
    assert s_x.dtype == o_x.dtype == torch.bfloat16 and s_x.shape == o_x.shape == (1,)
    assert s_x.item() > 0
    assert o_x.item() == round(o_x.item()) and -128 <= o_x.item() <= 127
    # deq_scale and quant_bias come from the stored (bf16) scales and offset, in fp32
    s_w = t[f"{linear}.weight_scale"].float()[:, 0]
    deq = t[f"{linear}.deq_scale"]
    assert deq.dtype == torch.float32 and deq.shape == s_w.shape
    torch.testing.assert_close(deq, s_x.float() * s_w, rtol=0, atol=0)
    bias = t[f"{linear}.quant_bias"]
    assert bias.dtype == torch.int32
    expected = torch.round(-o_x.float() * t[f"{linear}.weight"].float().sum(dim=1)).to(torch.int32)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_fused_mla_input_shares_activation_parameters(ds):
    # q_a_proj and kv_a_proj_with_mqa read the same normed hidden states and are fused by the consumer
    for i in (*range(LAYERS), MTP):
        p = f"model.layers.{i}.self_attn"
        for s in ("input_scale", "input_offset"):
            assert torch.equal(ds.tensors[f"{p}.q_a_proj.{s}"], ds.tensors[f"{p}.kv_a_proj_with_mqa.{s}"]), f"{p} {s}"


def test_float_linears_are_the_dequantized_source(ds):
    for name in ("model.layers.1.self_attn.kv_b_proj", f"model.layers.{MTP}.eh_proj"):
        got = ds.tensors[f"{name}.weight"]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), dequant_fp8(ds.source, name), rtol=0, atol=0)


# 3. kill and resume inside the MoE layers

# Each MoE layer streams its experts in 4 chunks (see RECIPE_EDITS), so the second chunk written
# is in layer 1; the tensor below lies inside layer 1's second chunk, before its last tensor; and
# the third activation save comes right after layer 1 (embed, layer 0, layer 1).
MID_CHUNK_TENSOR = "model.layers.1.mlp.experts.3.up_proj.weight_scale_second"
KILLS = ["expert-chunk-written:2", f"tensor-written:{MID_CHUNK_TENSOR}", "acts-saved:3"]


@pytest.fixture(scope="module")
def killed(ds):
    """Every kill run, started at once: each is mostly interpreter start-up, which overlaps well.
    Returns kill → (output folder, run arguments, return code, stderr)."""
    order = write_order(ds.out)
    procs = {}
    for kill in KILLS:
        point, where = kill.split(":", 1)
        n = where if where.isdigit() else str(order.index(where) + 1)
        out = ds.tmp / f"killed-{point}"
        args = ("run", ds.recipe, "--model", ds.model, "--output", out)
        env = {**os.environ, "STREAMQ_KILL_AT": f"{point}:{n}"}
        procs[kill] = (out, args, subprocess.Popen([sys.executable, "-m", "streamq", *map(str, args)], cwd=REPO,
                                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                   text=True))
    results = {}
    for kill, (out, args, p) in procs.items():
        _, stderr = p.communicate()
        results[kill] = (out, args, p.returncode, stderr)
    return results


@pytest.mark.parametrize("kill", KILLS)
def test_kill_and_resume_is_byte_identical(ds, killed, kill):
    out, args, returncode, stderr = killed[kill]
    assert returncode == -9, f"the run was not killed at {kill}:\n{stderr[-2000:]}"
    assert not (out / "quant_model_description.json").exists()
    assert (out / ".streamq").is_dir(), "the killed run left no work folder to resume from"
    assert streamq(*args) == 0   # the same command again resumes
    assert output_bytes(out) == output_bytes(ds.out)
    assert not (out / ".streamq").exists()


# 4. the MTP layer dropped or kept in float


def run_mtp_mode(ds, mode):
    """A verified run with [model] mtp = mode: (tensors, config, description)."""
    out = ds.tmp / f"mtp-{mode}"
    assert streamq("run", deepseek_recipe(ds.tmp / f"{mode}.toml", mtp=mode), "--model", ds.model, "--output", out) == 0
    assert streamq("verify", out) == 0
    return load_all(out), read_json(out / "config.json"), read_json(out / "quant_model_description.json")


def test_mtp_dropped(ds):
    tensors, config, description = run_mtp_mode(ds, "drop")
    assert not [n for n in (*tensors, *description) if n.startswith(f"model.layers.{MTP}.")]
    assert config["num_nextn_predict_layers"] == 0
    assert "mtp_quantize" not in config
    # The MTP layer feeds nothing else, so every other tensor is unchanged.
    for name, t in tensors.items():
        assert torch.equal(t, ds.tensors[name]), name


def test_mtp_kept_in_float(ds):
    tensors, config, description = run_mtp_mode(ds, "float")
    mtp = {n: description[n] for n in tensors if n.startswith(f"model.layers.{MTP}.")}
    assert mtp and set(mtp.values()) == {"FLOAT"}
    # FP8 source linears come out dequantized to the model dtype (the router bias is fp32 already)
    assert {tensors[n].dtype for n in mtp} <= {torch.bfloat16, torch.float32}
    assert f"model.layers.{MTP}.mlp.experts.0.gate_proj.weight" in mtp
    assert "mtp_quantize" not in config
    assert config["num_nextn_predict_layers"] == 1
    for name, t in tensors.items():
        if name not in mtp:
            assert torch.equal(t, ds.tensors[name]), name


# 5. V2-Lite-style attention (a plain q_proj, no q LoRA)


def test_v2_lite_attention(tmp_path):
    # one dense and one MoE layer are enough here, and keep this extra run short
    layers = FIRST_K_DENSE + 1
    model = write_model(tmp_path / "model", layers=layers, experts=4, mtp=False, q_lora_rank=None)
    out = tmp_path / "out"
    assert streamq("run", deepseek_recipe(tmp_path / "w4a8.toml"), "--model", model, "--output", out) == 0
    assert streamq("verify", out) == 0
    tensors, description = load_all(out), read_json(out / "quant_model_description.json")
    assert "mtp_quantize" not in read_json(out / "config.json")
    for i in range(layers):
        p = f"model.layers.{i}.self_attn"
        assert f"{p}.q_a_proj.weight" not in tensors
        for proj in ("q_proj", "kv_a_proj_with_mqa"):
            assert description[f"{p}.{proj}.weight"] == "W8A8"
        for s in ("input_scale", "input_offset"):
            assert torch.equal(tensors[f"{p}.q_proj.{s}"], tensors[f"{p}.kv_a_proj_with_mqa.{s}"]), f"{p} {s}"
        assert description[f"{p}.kv_b_proj.weight"] == "FLOAT"


# 6. experts that receive no calibration token


def test_report_lists_experts_without_tokens(ds):
    steps = {s["step"]: s for s in ds.report["steps"]}
    moe_steps = [f"layer.{i}" for i in range(FIRST_K_DENSE, LAYERS)] + ["mtp"]
    for key in moe_steps:
        unrouted = steps[key].get("experts_without_tokens")
        assert isinstance(unrouted, list), f"{key}: experts_without_tokens missing"
        assert all(isinstance(e, int) and 0 <= e < EXPERTS for e in unrouted), f"{key}: {unrouted}"
    assert UNROUTED_EXPERT in steps[f"layer.{UNROUTED_LAYER}"]["experts_without_tokens"]


def test_every_expert_is_quantized_routed_or_not(ds):
    for i in (*range(FIRST_K_DENSE, LAYERS), MTP):
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                p = f"model.layers.{i}.mlp.experts.{e}.{proj}"
                assert ds.tensors[f"{p}.weight"].dtype == torch.int8, p
                assert (ds.tensors[f"{p}.weight_scale"].float() > 0).all(), p
                assert ds.tensors[f"{p}.weight"].any(), f"{p}: all-zero weight"
