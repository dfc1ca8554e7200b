"""Anti-outlier smoothing of DeepSeek-V3/R1 layers (smooth_mla): the MLA chain and the MoE input
fold are exact float equivalences, routing bit for bit; then end to end on a tiny FP8 checkpoint
with the repo's W8A8 recipe and anti_method = "m4": the output verifies, reconstructs the source,
evaluates close to it, and a killed run resumes to the same bytes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from streamq.arch.deepseek_v3 import DeepseekArch
from streamq.checkpoint import CheckpointReader
from streamq.cli import main as streamq_main
from streamq.errors import StreamqError
from streamq.evaluate import evaluate
from streamq.recipe import SUBGRAPH_TYPES, parse_recipe
from streamq.smooth import smoothquant_scale
from streamq.smooth_mla import MOE_READERS, fold_ov, power_of_two, scale_routed_expert, smooth_deepseek_base, stat_inputs
from streamq.smoothing import watched_stats
from streamq.synth import deepseek_v3_config, write_deepseek_v3

from conftest import REPO, SMALL_CAL, load_all, output_bytes, write_recipe

EXPERTS, SEQ = 8, 12


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- 1. exactness on layer bases, with random weights -------------------------------------------

def random_layer(q_lora_rank, i, seed=0):
    """(arch, step, tensors) of layer i (0: dense MLP, 1: MoE) with random weights: norms away
    from 1 so that their folds show, linears ~ 1/sqrt(in)."""
    arch = DeepseekArch(deepseek_v3_config(layers=2, first_k_dense=1, experts=EXPERTS, q_lora_rank=q_lora_rank),
                        has_lm_head=True)
    step = arch.layer_step(i)
    g = gen(seed)
    tensors = {}
    for name, shape in step.shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = 1 + 0.5 * torch.rand(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.3 * torch.randn(shape, generator=g)
        else:
            tensors[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return arch, step, tensors


def hidden_with_outliers(hidden, seed=1):
    h = torch.randn(2, SEQ, hidden, generator=gen(seed))
    h[..., [3, 17, 40]] = h[..., [3, 17, 40]] * 30 + 4
    return h


def build(arch, step, tensors):
    base = arch.build_base(step, tensors, "cpu", torch.float32)
    experts = {e: arch.build_expert(step.index, e, tensors, "cpu", torch.float32)
               for e in range(EXPERTS)} if arch.is_moe(step.index) else {}
    return base, experts


def base_stats(arch, base, h):
    """The statistics pass as the pipeline runs it: the base up to (not including) routed experts."""
    rotary = arch.rotary(SEQ, "cpu", torch.float32)

    def run():
        x = arch.mlp_input(base, arch.attn_block(base, h, rotary))
        (arch.shared if arch.is_moe(base.self_attn.layer_idx) else arch.dense_mlp)(base, x)
    return watched_stats(base, run, h.shape[0] * SEQ, stat_inputs(base))


def routed_wmax(tensors, i):
    return torch.stack([tensors[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"].abs().amax(0)
                        for e in range(EXPERTS) for p in ("gate_proj", "up_proj")]).amax(0)


def layer_out(arch, base, experts, h):
    """The layer's output and its routing (None for a dense layer)."""
    rotary = arch.rotary(SEQ, "cpu", torch.float32)
    with torch.no_grad():
        routing = arch.route(base, arch.mlp_input(base, arch.attn_block(base, h, rotary))) if experts else None
        return arch.layer_forward(base, experts, h, rotary), routing


def smooth_layer(arch, step, tensors, base, h, method="m4", subgraphs=SUBGRAPH_TYPES):
    """Smooth the base in place and rebuild the routed experts with their gate/up rescaled."""
    i = step.index
    wmax = routed_wmax(tensors, i) if arch.is_moe(i) else None
    done = smooth_deepseek_base(base, base_stats(arch, base, h), method, None, subgraphs, wmax)
    tensors = dict(tensors)
    if done.routed is not None:
        for e in range(EXPERTS):
            scale_routed_expert(tensors, arch.expert_prefix(i, e), done.routed)
    experts = {e: arch.build_expert(i, e, tensors, "cpu", torch.float32)
               for e in range(EXPERTS)} if arch.is_moe(i) else {}
    return done, experts


MLA = {"input_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
       "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"}
LORA = {"self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"}
DENSE_MLP = {"post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
MOE_BASE = {"post_attention_layernorm.weight", "mlp.gate.weight", "mlp.shared_experts.gate_proj.weight",
            "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"}


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("method", ["m1", "m4"])
def test_chain_keeps_the_float_layer(q_lora_rank, i, method):
    arch, step, tensors = random_layer(q_lora_rank, i)
    base, experts = build(arch, step, tensors)
    h = hidden_with_outliers(arch.config.hidden_size)
    ref, routing = layer_out(arch, base, experts, h)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    done, experts = smooth_layer(arch, step, tensors, base, h, method)
    changed = {n for n, p in base.state_dict().items() if not torch.equal(p, before[n])}
    expected = MLA | (LORA if q_lora_rank else {"self_attn.q_proj.weight"}) | (MOE_BASE if i else DENSE_MLP)
    assert changed == expected                      # every fold happened, so the check below is not vacuous
    assert {f"{m}.weight" for m in done.modules} == expected
    got, routing_after = layer_out(arch, base, experts, h)
    # Power-of-two scales make every fold exact in float: not just close, the same bits.
    assert torch.equal(got, ref)
    if i:
        # the router reads the smoothed norm through its rescaled columns: the same experts and weights
        assert torch.equal(routing_after[0], routing[0]) and torch.equal(routing_after[1], routing[1])
        assert torch.equal(done.routed, power_of_two(done.routed)) and not torch.all(done.routed == 1)
    else:
        assert done.routed is None


def test_moe_input_scale_covers_every_reader():
    """s of the MoE input: the rule over the router, the shared experts' gate/up and every routed
    expert's gate/up, rounded to a power of two. One routed expert's large column sets it."""
    arch, step, tensors = random_layer(32, 1)
    tensors["model.layers.1.mlp.experts.5.gate_proj.weight"][:, 9] *= 100
    base, _ = build(arch, step, tensors)
    h = hidden_with_outliers(arch.config.hidden_size)
    stats = base_stats(arch, base, h)
    readers = [base.get_submodule(n).weight.clone() for n in MOE_READERS]
    experts = [tensors[f"model.layers.1.mlp.experts.{e}.{p}.weight"] for e in range(EXPERTS) for p in ("gate_proj", "up_proj")]
    done = smooth_deepseek_base(base, stats, "m1", None, ("norm-linear",), routed_wmax(tensors, 1))
    expect = smoothquant_scale(stats["mlp_in"].absmax, readers + experts, 0.5)
    torch.testing.assert_close(done.routed, torch.exp2(torch.round(torch.log2(expect))))
    without = smoothquant_scale(stats["mlp_in"].absmax, readers, 0.5)
    assert done.routed[9] < power_of_two(without)[9]        # the expert's column mattered


def test_ov_fold_matches_an_independent_attention():
    """o_proj(Σ_s P[h,t,s] V_h[s]) for random attention weights P, with V from kv_b_proj's rows as
    MLA lays them out ([k_nope | v] per head): unchanged after the fold, K rows untouched."""
    heads, nope, v, rank, hidden, T = 3, 4, 5, 6, 7, 9
    kv_b, o_proj = nn.Linear(rank, heads * (nope + v), bias=False), nn.Linear(heads * v, hidden, bias=False)
    c = torch.randn(T, rank, generator=gen(2))
    P = torch.softmax(torch.randn(heads, T, T, generator=gen(3)), -1)
    s = torch.rand(heads * v, generator=gen(4)) * 5 + 0.1

    def attention(Wkv, Wo):
        kv = (c @ Wkv.T).view(T, heads, nope + v)
        out = torch.zeros(T, hidden)
        for hd in range(heads):                       # head by head, the way the formula reads
            ctx = P[hd] @ kv[:, hd, nope:]            # [T, v]
            out += ctx @ Wo[:, hd * v:(hd + 1) * v].T
        return out, kv[..., :nope]
    Wkv0, Wo0 = kv_b.weight.detach().clone(), o_proj.weight.detach().clone()
    ref, k_ref = attention(Wkv0, Wo0)
    fold_ov(kv_b, o_proj, s, heads, nope, v)
    got, k_got = attention(kv_b.weight.detach(), o_proj.weight.detach())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_got, k_ref, rtol=0, atol=0)
    for hd in range(heads):
        r = hd * (nope + v)
        torch.testing.assert_close(kv_b.weight[r + nope:r + nope + v], Wkv0[r + nope:r + nope + v] / s[hd * v:(hd + 1) * v, None])
    torch.testing.assert_close(o_proj.weight, Wo0 * s)
    with pytest.raises(ValueError):
        fold_ov(kv_b, o_proj, s[:-1], heads, nope, v)


@pytest.mark.parametrize("kind,touched", [
    ("ov", {"self_attn.kv_b_proj", "self_attn.o_proj"}),
    ("linear-linear", {"self_attn.kv_a_layernorm", "self_attn.kv_b_proj"}),
    ("up-down", {"mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"}),
])
def test_subgraph_selection_restricts_the_chain(kind, touched):
    arch, step, tensors = random_layer(32, 1)
    base, experts = build(arch, step, tensors)
    h = hidden_with_outliers(arch.config.hidden_size)
    ref, _ = layer_out(arch, base, experts, h)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    done, experts = smooth_layer(arch, step, tensors, base, h, subgraphs=(kind,))
    assert {n.rsplit(".", 1)[0] for n, p in base.state_dict().items() if not torch.equal(p, before[n])} == touched
    assert done.routed is None                            # the MoE input is "norm-linear"
    got, _ = layer_out(arch, base, experts, h)
    assert torch.equal(got, ref)


# ---- 2. recipes ---------------------------------------------------------------------------------

P = Path("r.toml")


def test_subgraph_key_parses_in_order_of_application():
    r = parse_recipe('[quant]\nanti_method = "m4"\nenable_subgraph_type = ["norm-linear", "ov"]\n', P)
    assert r.enable_subgraph_type == ("ov", "norm-linear")
    assert r.semantic()["quant"]["enable_subgraph_type"] == ["ov", "norm-linear"]
    same = parse_recipe('[quant]\nanti_method = "m4"\nenable_subgraph_type = ["ov", "norm-linear"]\n', P)
    assert same.semantic_hash() == r.semantic_hash() != parse_recipe('[quant]\nanti_method = "m4"\n', P).semantic_hash()
    assert parse_recipe('[quant]\nanti_method = "m4"\n', P).enable_subgraph_type == SUBGRAPH_TYPES


@pytest.mark.parametrize("value,needle", [
    ('["o-v"]', "did you mean 'ov'"),
    ('["norm-linear", "qkv"]', '(?s)unknown subgraph type .qkv.*valid values: "up-down", "ov", "norm-linear", "linear-linear"'),
    ('"ov"', "must be a non-empty list"),
    ("[]", "must be a non-empty list"),
    ("[1]", "must be a non-empty list"),
])
def test_bad_subgraph_values_name_the_key(value, needle):
    with pytest.raises(StreamqError, match=needle) as e:
        parse_recipe(f'[quant]\nanti_method = "m4"\nenable_subgraph_type = {value}\n', P)
    assert "quant.enable_subgraph_type" in str(e.value)


def test_subgraph_key_needs_anti_method():
    with pytest.raises(StreamqError, match="quant.enable_subgraph_type.*anti_method is not set"):
        parse_recipe('[quant]\nenable_subgraph_type = ["ov"]\n', P)


# ---- 3. end to end ------------------------------------------------------------------------------

# The repo's W8A8 recipe, shrunk; 30 kB of expert budget streams the 8 experts in 4 chunks.
EDITS = {"samples = 128": "samples = 4", "seq_len = 2048": "seq_len = 16", 'device = "auto"': 'device = "cpu"',
         "batch_size = 4": "batch_size = 2", "expert_budget_gb = 8.0": "expert_budget_gb = 0.00003"}


def w8a8_recipe(path: Path, quant: str) -> Path:
    text = (REPO / "recipes" / "deepseek_r1_w8a8.toml").read_text()
    for old, new in {**EDITS, "[quant]\n": f"[quant]\n{quant}"}.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smooth-ds")
    model = write_deepseek_v3(tmp / "model", layers=3, first_k_dense=1, experts=EXPERTS, fp8=True, mtp=True, seed=0)
    recipe = w8a8_recipe(tmp / "m4.toml", 'anti_method = "m4"\n')
    out = tmp / "out"
    assert streamq_main(["run", str(recipe), "--model", str(model), "--output", str(out)]) == 0
    reader = CheckpointReader(model)
    source = reader.load_float([n for n in reader.tensors if not n.endswith("_scale_inv")], torch.bfloat16)
    return SimpleNamespace(tmp=tmp, model=model, recipe=recipe, out=out, tensors=load_all(out),
                           source={n: t.float() for n, t in source.items()})


def dequant(t: dict, linear: str) -> torch.Tensor:
    return t[f"{linear}.weight"].float() * t[f"{linear}.weight_scale"].float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def power_scale(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The s of a fold read back from a norm weight (before / after): a power of two, not all 1."""
    s = before / after
    assert torch.equal(s, power_of_two(s)) and not torch.all(s == 1)
    return s


def test_smoothed_output_verifies_and_reconstructs_the_source(ds):
    """The written tensors are the source's folded by power-of-two scales: FLOAT ones exactly,
    quantized ones up to their int8 rounding."""
    assert streamq_main(["verify", str(ds.out)]) == 0
    t, src, c = ds.tensors, ds.source, deepseek_v3_config(experts=EXPERTS)
    heads, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim

    def close_to(linear, expect):     # int8 weights of the rescaled linear, and far from the unscaled
        assert rel(dequant(t, linear), expect) < 0.03 < 0.3 < rel(dequant(t, linear), src[f"{linear}.weight"])
    for i in (0, 1, 2, 3):                       # layer 3: the MTP layer
        p = f"model.layers.{i}"
        s_c = power_scale(src[f"{p}.input_layernorm.weight"], t[f"{p}.input_layernorm.weight"].float())
        close_to(f"{p}.self_attn.q_a_proj", src[f"{p}.self_attn.q_a_proj.weight"] * s_c)
        close_to(f"{p}.self_attn.kv_a_proj_with_mqa", src[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] * s_c)
        # linear-linear, then ov: kv_b_proj (FLOAT) is the source times s_b per column, its V rows
        # divided by s_o, exactly; o_proj's columns carry s_o
        s_b = power_scale(src[f"{p}.self_attn.kv_a_layernorm.weight"], t[f"{p}.self_attn.kv_a_layernorm.weight"].float())
        kvb_out = t[f"{p}.self_attn.kv_b_proj.weight"].float().view(heads, nope + v, -1)
        kvb_src = src[f"{p}.self_attn.kv_b_proj.weight"].view(heads, nope + v, -1) * s_b
        assert torch.equal(kvb_out[:, :nope], kvb_src[:, :nope])
        s_o = kvb_src[:, nope:].abs().amax(-1) / kvb_out[:, nope:].abs().amax(-1)      # [heads, v]
        assert torch.equal(kvb_out[:, nope:], kvb_src[:, nope:] / s_o[..., None])
        assert torch.equal(s_o, power_of_two(s_o)) and not torch.all(s_o == 1)
        close_to(f"{p}.self_attn.o_proj", src[f"{p}.self_attn.o_proj.weight"] * s_o.reshape(-1))
    for i in (1, 2, 3):
        p = f"model.layers.{i}"
        s = power_scale(src[f"{p}.post_attention_layernorm.weight"], t[f"{p}.post_attention_layernorm.weight"].float())
        # the router is FLOAT: exactly the source times s, so the output routes like the source
        assert torch.equal(t[f"{p}.mlp.gate.weight"].float(), src[f"{p}.mlp.gate.weight"] * s)
        for e in (0, 7):
            close_to(f"{p}.mlp.experts.{e}.gate_proj", src[f"{p}.mlp.experts.{e}.gate_proj.weight"] * s)


def test_eval_of_the_smoothed_output(ds):
    r = evaluate(ds.model, ds.out, samples=2, seq_len=16, batch=2)
    assert 0 < r["kl_mean"] < 1e-3 and r["kl_max"] < float("inf")
    # the dense layer (later ones add routing flips, which a tiny random MoE has many of)
    assert 0 < r["layers"][0]["rel_error"] < 0.05


def test_float_smoothed_output_is_the_source_model(ds):
    """All linears FLOAT, smoothed: with power-of-two scales every fold is exact in bf16, so the
    written model computes bit for bit what the source does."""
    out = ds.tmp / "float-m4"
    recipe = write_recipe(ds.tmp / "float.toml", SMALL_CAL + 'expert_budget_gb = 0.00003\n[quant]\nscheme = "FLOAT"\n'
                          'anti_method = "m4"\n')
    assert streamq_main(["run", str(recipe), "--model", str(ds.model), "--output", str(out)]) == 0
    assert not torch.equal(load_all(out)["model.layers.1.input_layernorm.weight"],
                           ds.source["model.layers.1.input_layernorm.weight"].bfloat16())
    r = evaluate(ds.model, out, samples=2, seq_len=16, batch=2)
    assert r["kl_mean"] == 0 and [e["rel_error"] for e in r["layers"]] == [0, 0, 0]


@pytest.mark.parametrize("quant,needle", [
    ('anti_method = "m6"\n', 'quant.anti_method = "m6" is not implemented for DeepSeek'),
    ('anti_method = "m4"\nanti_symmetric = false\n', "quant.anti_symmetric = false is not implemented for DeepSeek"),
])
def test_refused_for_deepseek(ds, capsys, quant, needle):
    recipe = w8a8_recipe(ds.tmp / "refused.toml", quant)
    assert streamq_main(["run", str(recipe), "--model", str(ds.model), "--output", str(ds.tmp / "refused")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "hint:" in err


def test_kill_and_resume_is_byte_identical(ds):
    """Killed after layer 1's second expert chunk: the rerun smooths layer 1 again from the same
    states, and the output is that of the uninterrupted run."""
    out = ds.tmp / "killed"
    args = ["run", str(ds.recipe), "--model", str(ds.model), "--output", str(out)]
    env = {**os.environ, "STREAMQ_KILL_AT": "expert-chunk-written:2"}
    p = subprocess.run([sys.executable, "-m", "streamq", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert streamq_main(args) == 0
    assert output_bytes(out) == output_bytes(ds.out)


def test_weight_maxima_from_the_host_join_device_weights():
    """Routed experts' column maxima are read on the host while the base sits on the device: the
    maxima must meet on one device (meta stands in for an accelerator here)."""
    from streamq.smooth import weight_absmax
    m = weight_absmax([torch.ones(2, 3, device="meta"), torch.ones(1, 3)])
    assert m.device.type == "meta" and m.shape == (3,)


def test_routed_maxima_cover_every_chunk(monkeypatch):
    """The MoE input's max|W| is taken over every routed expert, whichever chunk holds it."""
    from streamq import moe
    g = gen(5)
    experts = {f"e{e}.{p}.weight": torch.randn(4, 6, generator=g) for e in range(5) for p in ("gate_proj", "up_proj")}
    experts["e4.up_proj.weight"][2, 3] = 100.0            # the last expert of the last chunk
    reads = []
    monkeypatch.setattr(moe, "_expert_chunks", lambda ctx, step: [[0, 1], [2, 3], [4]])
    monkeypatch.setattr(moe, "read_float", lambda ctx, names: reads.append(names) or {n: experts[n] for n in names})
    ctx = SimpleNamespace(arch=SimpleNamespace(expert_prefix=lambda i, e: f"e{e}"))
    wmax = moe._routed_wmax(ctx, SimpleNamespace(index=1))
    assert len(reads) == 3 and sorted(n for r in reads for n in r) == sorted(experts)
    assert torch.equal(wmax, torch.stack([W.abs().amax(0) for W in experts.values()]).amax(0))
    assert wmax[3] == 100.0
