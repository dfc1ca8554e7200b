"""DeepSeek-V3/R1: MLA attention, sigmoid-routed MoE with shared experts, and the MTP layer.

Attention (MLA, with or without q_lora_rank), RMSNorm, the YaRN rotary embedding and the gated
MLP are transformers' own classes, so the float forward is the reference model's. The MoE block
is not: transformers fuses the routed experts into 3-D tensors, while streamq builds, observes and
quantizes each expert under its checkpoint name, a chunk at a time. So a layer is split into a
"base" (everything but the routed experts) and one small module per expert, and the router is
written here (DeepSeek-V3's noaux_tc selection, checked against transformers in the tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention, DeepseekV3MLP, DeepseekV3RMSNorm, DeepseekV3RotaryEmbedding)

from ..errors import StreamqError
from .base import Step, embed_and_final, expected_shapes, linear_names, load_into

# Linears that read the same tensor share one input observer (and one static activation scale):
# the consumer fuses q_a_proj (or q_proj) with kv_a_proj_with_mqa, and gate with up.
INPUT_GROUPS = {
    "self_attn.q_a_proj": "attn_in", "self_attn.q_proj": "attn_in",
    "self_attn.kv_a_proj_with_mqa": "attn_in", "self_attn.q_b_proj": "q_b_in",
    "self_attn.kv_b_proj": "kv_b_in", "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in",
    "mlp.shared_experts.gate_proj": "shared_in", "mlp.shared_experts.up_proj": "shared_in",
    "mlp.shared_experts.down_proj": "shared_down_in",
}
EXPERT_GROUPS = {"gate_proj": "expert{e}_in", "up_proj": "expert{e}_in", "down_proj": "expert{e}_down_in"}
EXPERT_LINEARS = ("down_proj", "gate_proj", "up_proj")  # write order within one expert

# The router decides which experts run: keep it in fp32 whatever the compute dtype, as
# transformers does (the checkpoint stores the bias in fp32, the weight in bf16, exact in fp32).
FP32_TENSORS = {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}

# Routing variants of config.json that this router implements (DeepSeek-V3/R1 use these).
ROUTING = {"scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",)}


def tokens_for(idx: torch.Tensor, w: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened tokens routed to expert `e` and their routing weights. A token selects each
    expert at most once, so a token appears here at most once."""
    token, slot = (idx == e).nonzero(as_tuple=True)
    return token, w[token, slot]


class Router(nn.Module):
    """DeepSeek-V3 expert selection: sigmoid scores; the correction bias steers which experts are
    chosen (load balancing) but not how much they weigh; only the best `topk_group` of `n_group`
    groups, each scored by the sum of its two best biased scores, may be chosen."""

    def __init__(self, config):
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.empty(E))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1]).float()
        scores = F.linear(x, self.weight.float()).sigmoid()                     # [T, E]
        biased = scores + self.e_score_correction_bias.float()
        grouped = biased.view(x.shape[0], self.n_group, -1)                     # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1)                    # [T, G]
        kept = group_score.topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        biased = grouped.masked_fill(~allowed[..., None], float("-inf")).flatten(1)
        idx = biased.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scaling


class MoeBase(nn.Module):
    """The MoE block without its routed experts (those are built one by one)."""

    def __init__(self, config):
        super().__init__()
        self.gate = Router(config)
        self.shared_experts = DeepseekV3MLP(config, config.moe_intermediate_size * config.n_shared_experts)


class SharedHead(nn.Module):
    """The MTP layer's output norm; its `head` is an lm_head-sized matrix left to the writer."""

    def __init__(self, config):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LayerBase(nn.Module):
    """One decoder layer (or the MTP layer) minus the routed experts, under checkpoint names."""

    def __init__(self, config, i: int, moe: bool, mtp: bool):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = DeepseekV3RMSNorm(h, eps=eps)
        self.self_attn = DeepseekV3Attention(config, i)
        self.post_attention_layernorm = DeepseekV3RMSNorm(h, eps=eps)
        self.mlp = MoeBase(config) if moe else DeepseekV3MLP(config)
        if mtp:
            self.enorm = DeepseekV3RMSNorm(h, eps=eps)
            self.hnorm = DeepseekV3RMSNorm(h, eps=eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
            self.shared_head = SharedHead(config)


def load_base(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """Materialise a meta-device base from the tensors it owns; the step's other tensors (experts,
    the MTP head and embedding) are ignored here."""
    wanted = list(module.state_dict())
    missing = [f"{prefix}.{k}" for k in wanted if f"{prefix}.{k}" not in tensors]
    if missing:
        raise StreamqError(f"layer tensors missing: {', '.join(missing[:5])}",
                           "the checkpoint is incomplete for this config")
    state = {k: tensors[f"{prefix}.{k}"].to(device=device, dtype=torch.float32 if k in FP32_TENSORS else dtype)
             for k in wanted}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


class DeepseekArch:
    def __init__(self, config, has_lm_head: bool, names: set[str] | None = None):
        self.config = config
        self.config._attn_implementation = "sdpa"  # causal without an explicit mask
        self.has_lm_head = has_lm_head
        self.L = config.num_hidden_layers
        self.has_mtp = f"model.layers.{self.L}.eh_proj.weight" in (names or set())
        self.mtp_has_embed = f"model.layers.{self.L}.embed_tokens.weight" in (names or set())
        for key, supported in ROUTING.items():
            if getattr(config, key, supported[0]) not in supported:
                raise StreamqError(f"config.json has {key}={getattr(config, key)!r}; DeepSeek-V3 routing uses "
                                   f"{' or '.join(supported)}", "this router implements DeepSeek-V3/R1 only")
        if not has_lm_head and not getattr(config, "tie_word_embeddings", False):
            raise StreamqError("the checkpoint has no lm_head.weight and config.json does not tie embeddings",
                               "the checkpoint is incomplete: add lm_head.weight or set tie_word_embeddings")

    # -- what each step owns ------------------------------------------------------------------

    def is_moe(self, i: int) -> bool:
        return i >= self.config.first_k_dense_replace or i >= self.L  # the MTP layer is always MoE

    def expert_prefix(self, i: int, e: int) -> str:
        return f"model.layers.{i}.mlp.experts.{e}"

    def steps(self) -> list[Step]:
        embed, final = embed_and_final(self.config, self.has_lm_head)
        mtp = [self.layer_step(self.L, mtp=True)] if self.has_mtp else []
        return [embed, *(self.layer_step(i) for i in range(self.L)), *mtp, final]

    def layer_step(self, i: int, mtp: bool = False) -> Step:
        c, prefix = self.config, f"model.layers.{i}"
        with torch.device("meta"):
            base = LayerBase(c, i, self.is_moe(i), mtp)
        shapes = expected_shapes(base, prefix)
        linears = [f"{prefix}.{n}" for n in linear_names(base)]
        if mtp:
            shapes[f"{prefix}.shared_head.head.weight"] = (c.vocab_size, c.hidden_size)
            linears.append(f"{prefix}.shared_head.head")
            if self.mtp_has_embed:
                shapes[f"{prefix}.embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
        groups = {f"{prefix}.{sub}": key for sub, key in INPUT_GROUPS.items() if f"{prefix}.{sub}" in linears}
        shapes = dict(sorted(shapes.items()))
        if self.is_moe(i):
            self._add_experts(i, shapes, linears, groups)
        return Step("mtp" if mtp else f"layer.{i}", "mtp" if mtp else "layer", i, shapes, tuple(linears), groups)

    def _add_experts(self, i: int, shapes: dict, linears: list, groups: dict) -> None:
        """Routed experts go last, expert by expert, so they can be written a chunk at a time."""
        c = self.config
        h, inter = c.hidden_size, c.moe_intermediate_size
        expert_shapes = {"down_proj": (h, inter), "gate_proj": (inter, h), "up_proj": (inter, h)}
        for e in range(c.n_routed_experts):
            p = self.expert_prefix(i, e)
            for lin in EXPERT_LINEARS:
                shapes[f"{p}.{lin}.weight"] = expert_shapes[lin]
                linears.append(f"{p}.{lin}")
                groups[f"{p}.{lin}"] = EXPERT_GROUPS[lin].format(e=e)

    # -- building modules ---------------------------------------------------------------------

    def build_base(self, step: Step, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
        i = step.index
        with torch.device("meta"):
            base = LayerBase(self.config, i, self.is_moe(i), step.kind == "mtp")
        return load_base(base, f"model.layers.{i}", tensors, device, dtype)

    def build_expert(self, i: int, e: int, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
        with torch.device("meta"):
            expert = DeepseekV3MLP(self.config, self.config.moe_intermediate_size)
        return load_into(expert, self.expert_prefix(i, e), tensors, device, dtype)

    def rotary(self, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [1, seq_len, qk_rope_head_dim], YaRN-scaled; the attention broadcasts
        them over batch and heads (and de-interleaves the rope dims itself)."""
        rope = DeepseekV3RotaryEmbedding(self.config).to(device)
        pos = torch.arange(seq_len, device=device)[None]
        x = torch.empty(1, seq_len, 1, device=device, dtype=dtype)
        return rope(x, pos)

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        norm = DeepseekV3RMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = weight
        return norm

    # -- the forward, piece by piece ------------------------------------------------------------

    def attn_block(self, base: nn.Module, h: torch.Tensor, rotary) -> torch.Tensor:
        out, _ = base.self_attn(base.input_layernorm(h), position_embeddings=rotary, attention_mask=None)
        return h + out

    def mlp_input(self, base: nn.Module, h1: torch.Tensor) -> torch.Tensor:
        return base.post_attention_layernorm(h1)

    def dense_mlp(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base.mlp(x)

    def route(self, base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return base.mlp.gate(x)

    def shared(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base.mlp.shared_experts(x)

    tokens_for = staticmethod(tokens_for)

    def combine(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: dict) -> torch.Tensor:
        """Σ_e w·expert_e(x) over the given experts (e → module), shaped like x. Accumulates in
        fp32 so that the order in which expert chunks arrive does not change the sum."""
        flat = x.reshape(-1, x.shape[-1])
        y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e, expert in experts.items():
            token, weight = tokens_for(idx, w, e)
            if token.numel():
                y.index_add_(0, token, expert(flat[token]).float() * weight[:, None])
        return y.to(x.dtype).view(x.shape)

    def layer_forward(self, base: nn.Module, experts: dict, h: torch.Tensor, rotary) -> torch.Tensor:
        """The whole layer in float, with every routed expert in memory (reference and tests)."""
        h1 = self.attn_block(base, h, rotary)
        x = self.mlp_input(base, h1)
        if not isinstance(base.mlp, MoeBase):
            return h1 + self.dense_mlp(base, x)
        idx, w = self.route(base, x)
        return h1 + self.combine(x, idx, w, experts) + self.shared(base, x)

    def mtp_input(self, base: nn.Module, h_main_normed: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """The MTP layer's input at position t: the main model's final-normed hidden state at t and
        the embedding of token t+1, each normed, concatenated embedding first (DeepSeek's MTP
        module and vLLM's deepseek_mtp), projected back to the hidden size."""
        return base.eh_proj(torch.cat([base.enorm(next_embeds), base.hnorm(h_main_normed)], dim=-1))


REGISTRY_ENTRY = {"deepseek_v3": DeepseekArch}
