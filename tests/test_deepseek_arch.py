"""DeepSeek-V3: streamq's layer-by-layer float forward equals transformers' full model.

transformers stores the routed experts fused ([E, 2I, H] gate_up, [E, H, I] down); the hub
checkpoint, and streamq, name each expert separately, so the reference state dict is un-fused
into hub names before streamq sees it.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from streamq.arch.deepseek_v3 import REGISTRY_ENTRY, DeepseekArch
from streamq.synth import write_deepseek_v3

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}


def tiny_config(q_lora_rank: int | None) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, rope_parameters=dict(YARN),
        max_position_embeddings=2560, tie_word_embeddings=False)


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights large enough that routing, norms and the correction bias all matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors → one gate/up/down weight per expert (hub names)."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        else:
            out[name] = t
    return out


def reference(q_lora_rank):
    """A random transformers model (eager attention, explicit causal mask) and its hub state dict."""
    config = tiny_config(q_lora_rank)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    randomise(model, torch.Generator().manual_seed(1))
    return model, unfuse_experts(model.state_dict())


def streamq_logits(arch: DeepseekArch, state: dict, ids: torch.Tensor) -> torch.Tensor:
    steps = arch.steps()
    h = torch.nn.functional.embedding(ids, state["model.embed_tokens.weight"])
    rotary = arch.rotary(ids.shape[1], "cpu", torch.float32)
    for step in steps:
        if step.kind != "layer":
            continue
        i = step.index
        base = arch.build_base(step, state, "cpu", torch.float32)
        experts = {e: arch.build_expert(i, e, state, "cpu", torch.float32)
                   for e in range(arch.config.n_routed_experts)} if arch.is_moe(i) else {}
        h = arch.layer_forward(base, experts, h, rotary)
    h = arch.final_norm(state["model.norm.weight"])(h)
    return h @ state["lm_head.weight"].T


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_layer_by_layer_forward_matches_transformers(q_lora_rank):
    model, state = reference(q_lora_rank)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        arch = DeepseekArch(tiny_config(q_lora_rank), has_lm_head=True, names=set(state))
        got = streamq_logits(arch, state, ids)
    assert want.abs().max() > 1.0  # a real signal, not a near-zero one
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_router_matches_transformers():
    config = tiny_config(32)
    gen = torch.Generator().manual_seed(3)
    ref = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=gen))
        ref.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=gen))
    arch = DeepseekArch(config, has_lm_head=True)
    step = arch.layer_step(1)
    tensors = {n: torch.randn(s, generator=gen) for n, s in step.shapes.items()}
    tensors["model.layers.1.mlp.gate.weight"] = ref.weight.detach()
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = ref.e_score_correction_bias
    base = arch.build_base(step, tensors, "cpu", torch.bfloat16)  # the router stays fp32 anyway
    x = torch.randn(4, 16, 64, generator=gen)
    _, w_ref, idx_ref = ref(x)
    idx, w = arch.route(base, x)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == (64, 2)
    order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
    assert torch.equal(idx.gather(1, order), idx_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6, rtol=0)
    # The bias must steer the choice for some token, or the comparison above proves little.
    with torch.no_grad():
        base.mlp.gate.e_score_correction_bias.zero_()
    assert not torch.equal(arch.route(base, x)[0].sort(-1).values, idx.sort(-1).values)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_steps_cover_the_state_dict(q_lora_rank):
    _, state = reference(q_lora_rank)
    arch = DeepseekArch(tiny_config(q_lora_rank), has_lm_head=True, names=set(state))
    steps = arch.steps()
    assert [s.key for s in steps] == ["embed", "layer.0", "layer.1", "layer.2", "final"]
    shapes = {n: s for step in steps for n, s in step.shapes.items()}
    assert shapes == {n: tuple(t.shape) for n, t in state.items()}
    attn_in = "q_a_proj" if q_lora_rank else "q_proj"
    groups = steps[2].groups
    assert groups[f"model.layers.1.self_attn.{attn_in}"] == groups["model.layers.1.self_attn.kv_a_proj_with_mqa"]
    assert set(groups) == set(steps[2].linears)
    assert "model.layers.1.mlp.gate" not in steps[2].linears
    assert steps[1].groups["model.layers.0.mlp.gate_proj"] == "mlp_in"


def _checkpoint_shapes(folder) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            shapes |= {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    return shapes


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    folder = write_deepseek_v3(tmp_path_factory.mktemp("ds") / "m", mtp=True)
    return DeepseekV3Config.from_pretrained(folder), _checkpoint_shapes(folder)


def test_mtp_steps_match_the_synthetic_checkpoint(mtp_checkpoint):
    config, shapes = mtp_checkpoint
    arch = REGISTRY_ENTRY["deepseek_v3"](config, has_lm_head=True, names=set(shapes))
    steps = arch.steps()
    assert arch.has_mtp and [s.key for s in steps][-2:] == ["mtp", "final"]
    assert {n: s for step in steps for n, s in step.shapes.items()} == shapes
    mtp = steps[-2]
    assert mtp.kind == "mtp" and mtp.index == 3 and arch.is_moe(3)
    for step in steps[2:-1]:  # MoE layers and MTP: experts last, in expert order
        p = f"model.layers.{step.index}.mlp.experts."
        tail = [n for n in step.shapes if n.startswith(p)]
        assert list(step.shapes)[-len(tail):] == tail
        assert tail[:3] == [f"{p}0.down_proj.weight", f"{p}0.gate_proj.weight", f"{p}0.up_proj.weight"]
        assert tail[-1] == f"{p}7.up_proj.weight"
        assert step.groups[f"{p}5.gate_proj"] == step.groups[f"{p}5.up_proj"] == "expert5_in"
    assert {"model.layers.3.eh_proj", "model.layers.3.shared_head.head"} <= set(mtp.linears)


def test_mtp_input_formula(mtp_checkpoint):
    config, shapes = mtp_checkpoint
    arch = DeepseekArch(config, has_lm_head=True, names=set(shapes))
    mtp = arch.steps()[-2]
    gen = torch.Generator().manual_seed(4)
    tensors = {n: torch.randn(s, generator=gen) for n, s in mtp.shapes.items()}
    base = arch.build_base(mtp, tensors, "cpu", torch.float32)
    h, emb = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    p = "model.layers.3."
    cat = torch.cat([rms(emb, tensors[p + "enorm.weight"]), rms(h, tensors[p + "hnorm.weight"])], dim=-1)
    want = cat @ tensors[p + "eh_proj.weight"].T
    got = arch.mtp_input(base, h, emb)
    assert got.shape == (2, 5, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
