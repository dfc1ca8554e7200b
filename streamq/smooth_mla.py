"""Anti-outlier smoothing of a DeepSeek-V3/R1 layer: the fused MLA chain and the MoE input.

Conventions as in smooth.py: W is [out, in]; s [in] divides a linear's input channels and
multiplies its weight columns, the division folded into whatever produces the input. Every fold
is an exact equivalence of the float layer.

MLA reads the normed hidden state twice (q_a_proj or q_proj, and kv_a_proj_with_mqa), normalises
both low-rank latents (q_a_layernorm, kv_a_layernorm) and expands the KV latent per head into
[k_nope | v] with kv_b_proj. The subgraphs, by msModelSlim's type names, in its order:
  up-down        up→down of the dense MLP (first_k_dense_replace layers) or of the shared experts.
  ov             o_proj → kv_b_proj: o_proj's input is, per head, a softmax-weighted sum of that
                 head's V, so s_o over [num_heads · v_head_dim] divides the V rows of kv_b_proj
                 (head h: rows h·(nope+v)+nope … (h+1)·(nope+v)−1). Every head has its own V rows
                 (no GQA sharing), so s_o needs no reduction.
  norm-linear    input_layernorm → [q_a_proj or q_proj, kv_a_proj_with_mqa];
                 q_a_layernorm → q_b_proj (with q_lora_rank);
                 post_attention_layernorm → gate/up of the dense MLP, or in a MoE layer every
                 reader of the MoE input: the router, the shared experts' gate/up and every routed
                 expert's gate/up.
  linear-linear  kv_a_layernorm → kv_b_proj, the link after "ov" in the o_proj → kv_b_proj →
                 kv_a_layernorm chain: its max|W| is kv_b_proj's as "ov" left it. "ov" rescales
                 kv_b_proj's rows, not its input, so the statistics of the one calibration pass
                 (taken before any fold) are still those of kv_b_proj's input.
Routed experts' own up→down is not smoothed: its statistics would need each expert's routed
tokens, which only exist once the experts are streamed, after the base is quantized.

The MoE input: routed experts are streamed, so the caller gives their column max|W| (one bounded
read) and multiplies each expert's gate/up columns by the returned s when it loads the expert.

Every s (the m1 / m4 rule of smooth.py) is rounded to the nearest power of two. Multiplying by a
power of two is exact in any float dtype, so every fold survives bf16 storage exactly: the
smoothed float layer computes bit for bit what the source does, the router included. That
matters because routing is a discrete choice: a rounding-level change in the router, or in the
FLOAT kv_b_proj before it, could flip a near tie and change a token's experts. The rule's balance
moves by at most a factor √2 per channel, small beside the outliers it removes.

Symmetric m1 and m4 only: m6 would search on every routed expert's tokens, and the asymmetric
shift would give the router a bias, which DeepSeek's router does not have.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .recipe import SUBGRAPH_TYPES
from .smooth import RULES, ChannelStats, Rule, apply_linear_linear, apply_norm_linears, no_fold, scale_columns

METHODS = ("m1", "m4")


@dataclass
class Smoothed:
    """What one layer's smoothing changed."""
    modules: list[str] = field(default_factory=list)   # submodules rescaled, names relative to the base
    routed: torch.Tensor | None = None   # MoE layers: s for every routed expert's gate/up columns


# ---- the layer's shape ------------------------------------------------------------------------

def _q_in(base: nn.Module) -> str:
    return "self_attn.q_proj" if base.self_attn.q_lora_rank is None else "self_attn.q_a_proj"


def _ffn(base: nn.Module) -> str:
    """The gated MLP smoothed like a dense one: the layer's MLP, or its shared experts."""
    return "mlp.shared_experts" if hasattr(base.mlp, "shared_experts") else "mlp"


def stat_inputs(base: nn.Module) -> dict[str, str]:
    """Statistics key → the first submodule reading that input (keys as arch.deepseek_v3's
    INPUT_GROUPS; "mlp_in" and "down_in" name the shared experts' in a MoE layer)."""
    ffn = _ffn(base)
    keys = {"attn_in": _q_in(base), "kv_b_in": "self_attn.kv_b_proj", "o_in": "self_attn.o_proj",
            "mlp_in": f"{ffn}.gate_proj", "down_in": f"{ffn}.down_proj"}
    if base.self_attn.q_lora_rank is not None:
        keys["q_b_in"] = "self_attn.q_b_proj"
    return keys


# The base's readers of the MoE input (the routed experts' gate/up read it too).
MOE_READERS = ("mlp.gate", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")


# ---- folds ------------------------------------------------------------------------------------

@torch.no_grad()
def fold_ov(kv_b: nn.Linear, o_proj: nn.Linear, s: torch.Tensor, heads: int, nope: int, v: int) -> None:
    """Divide the V rows of kv_b_proj by s per head, multiply o_proj's columns by s [heads · v]."""
    W = kv_b.weight
    if s.numel() != heads * v or W.shape[0] != heads * (nope + v) or o_proj.weight.shape[1] != heads * v:
        raise ValueError(f"s of {s.numel()} channels does not match kv_b_proj {tuple(W.shape)} → "
                         f"o_proj {tuple(o_proj.weight.shape)} with {heads} heads of {nope} + {v}")
    rows = W.float().view(heads, nope + v, W.shape[1])
    rows[:, nope:] /= s.float().to(W.device).view(heads, v, 1)
    W.copy_(rows.view_as(W))
    scale_columns(o_proj, s.float())


def power_of_two(s: torch.Tensor) -> torch.Tensor:
    """The nearest power of two (in log scale): multiplying by it is exact in any float dtype."""
    return torch.exp2(torch.round(torch.log2(s.float())))


def _fold_norm(base: nn.Module, out: Smoothed, norm: str, linears: Sequence[str], s: torch.Tensor) -> None:
    apply_norm_linears(base.get_submodule(norm).weight, [base.get_submodule(n) for n in linears], s)
    out.modules += [norm, *linears]


def _weights(base: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    return [base.get_submodule(n).weight for n in names]


# ---- the subgraphs ----------------------------------------------------------------------------

def _up_down(base: nn.Module, scale: Rule, routed_wmax, out: Smoothed) -> None:
    up, down = f"{_ffn(base)}.up_proj", f"{_ffn(base)}.down_proj"
    s = scale("down_in", _weights(base, [down]), True, no_fold)
    apply_linear_linear(base.get_submodule(up), base.get_submodule(down), s)
    out.modules += [up, down]


def _ov(base: nn.Module, scale: Rule, routed_wmax, out: Smoothed) -> None:
    attn, c = base.self_attn, base.self_attn.config
    s = scale("o_in", [attn.o_proj.weight], True, no_fold)
    fold_ov(attn.kv_b_proj, attn.o_proj, s, c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim)
    out.modules += ["self_attn.kv_b_proj", "self_attn.o_proj"]


def _norm_linear(base: nn.Module, scale: Rule, routed_wmax, out: Smoothed) -> None:
    attn_in = [_q_in(base), "self_attn.kv_a_proj_with_mqa"]
    _fold_norm(base, out, "input_layernorm", attn_in, scale("attn_in", _weights(base, attn_in), True, no_fold))
    if base.self_attn.q_lora_rank is not None:
        q_b = ["self_attn.q_b_proj"]
        _fold_norm(base, out, "self_attn.q_a_layernorm", q_b, scale("q_b_in", _weights(base, q_b), True, no_fold))
    if _ffn(base) == "mlp":
        mlp_in = ["mlp.gate_proj", "mlp.up_proj"]
        s = scale("mlp_in", _weights(base, mlp_in), True, no_fold)
        _fold_norm(base, out, "post_attention_layernorm", mlp_in, s)
        return
    readers = list(MOE_READERS)
    extra = [] if routed_wmax is None else [routed_wmax[None]]    # one row holding the experts' maxima
    out.routed = scale("mlp_in", _weights(base, readers) + extra, True, no_fold)
    _fold_norm(base, out, "post_attention_layernorm", readers, out.routed)


def _linear_linear(base: nn.Module, scale: Rule, routed_wmax, out: Smoothed) -> None:
    kv_b = ["self_attn.kv_b_proj"]
    _fold_norm(base, out, "self_attn.kv_a_layernorm", kv_b, scale("kv_b_in", _weights(base, kv_b), True, no_fold))


MLA_SUBGRAPHS = {"up-down": _up_down, "ov": _ov, "norm-linear": _norm_linear, "linear-linear": _linear_linear}


@torch.no_grad()
def smooth_deepseek_base(base: nn.Module, stats: dict[str, ChannelStats], method: str = "m1",
                         alpha: float | None = None, subgraphs: Sequence[str] = SUBGRAPH_TYPES,
                         routed_wmax: torch.Tensor | None = None) -> Smoothed:
    """Smooth a DeepSeek layer base (arch.deepseek_v3.LayerBase) in place.

    stats: the input statistics of the unsmoothed base, keyed as `stat_inputs(base)`. routed_wmax:
    max|W| per input channel over every routed expert's gate/up (None: the MoE input's max|W|
    covers the base's readers only). In a MoE layer with "norm-linear", the returned `routed`
    scale must multiply every routed expert's gate/up columns, or the layer is no longer the same.
    Every scale is a power of two (see the module notes).
    """
    if method not in METHODS:
        raise ValueError(f"DeepSeek smoothing implements {', '.join(METHODS)}, not {method!r}")
    rule = RULES[method](stats, alpha, None, None)

    def scale(key, weights, symmetric, fold):
        return power_of_two(rule(key, weights, symmetric, fold))
    out = Smoothed()
    for kind in SUBGRAPH_TYPES:           # the order of application, whatever the order asked
        if kind in subgraphs:
            MLA_SUBGRAPHS[kind](base, scale, routed_wmax, out)
    return out


@torch.no_grad()
def scale_routed_expert(tensors: dict[str, torch.Tensor], prefix: str, s: torch.Tensor) -> None:
    """Multiply one routed expert's gate/up columns by s, in place in a name → tensor dict (each
    tensor keeps its dtype; with a power-of-two s the product is exact)."""
    for proj in ("gate_proj", "up_proj"):
        name = f"{prefix}.{proj}.weight"
        W = tensors[name]
        tensors[name] = (W.float() * s.to(W.device)).to(W.dtype)
