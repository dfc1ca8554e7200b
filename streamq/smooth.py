"""Anti-outlier smoothing: move activation outliers into the weights by an exact rescaling.

Conventions (used throughout this module):
- A linear's weight is W [out, in]; its input X [tokens, in]; the layer computes X Wᵀ (+ b).
- A smoothing vector s [in] divides the activation channels and multiplies the weight columns:
  X' = X / s, W' = W · diag(s), so X' W'ᵀ = X Wᵀ exactly. The division is folded into the producer
  of X: an RMSNorm's weight, or the rows (and bias) of a preceding linear.
- An asymmetric shift δ [in] recentres the channels first: X' = (X − δ) / s. The RMSNorm then
  carries a bias −δ / s added after the norm (y = RMSNorm(x) · w' + b'), and each following
  linear's bias gains W δ so that its output is unchanged.
- All scale arithmetic is fp32; weights are written back in their own dtype.

Methods:
- m1, SmoothQuant: s = max|X|^α / max|W|^(1−α).
- m4, iterative smooth (msModelSlim `iter_smooth`): the same rule with α = 0.9 by default, applied
  to the subgraphs of a decoder layer one after another (up→down, v→o, then norm→linears), so each
  later subgraph sees the weights the earlier ones already rescaled. Its asymmetric variant
  recentres norm→linear inputs by the channel midpoint and measures the half range instead of
  max|X|. Within one subgraph there is nothing to iterate: applying the rule again to the smoothed
  statistics (max|X|/s, max|W|·s) gives s = 1 wherever no clamp was active.
- m6, flexible smooth: s = A^α / max|W|^β with (α, β) searched per subgraph (flex.py); the
  chosen s is then folded exactly like m4's, shift included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .recipe import SUBGRAPH_TYPES

SCALE_MIN = 1e-5     # lower bound of s (and of max|W|): keeps 1/s finite
M1_ALPHA = 0.5       # SmoothQuant's default migration strength
M4_ALPHA = 0.9       # msModelSlim iter_smooth's default


# ---- statistics -------------------------------------------------------------------------------

@dataclass
class ChannelStats:
    absmax: torch.Tensor   # [in] max |x| per channel
    min: torch.Tensor      # [in]
    max: torch.Tensor      # [in]


class ChannelObserver:
    """Running per-channel min / max of a linear's input; memory is O(in) whatever the data seen."""

    def __init__(self):
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(0), x.amax(0)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo.to(self.lo.device)), torch.maximum(self.hi, hi.to(self.hi.device))

    def stats(self) -> ChannelStats:
        if self.lo is None:
            raise ValueError("the observer has seen no data")
        return ChannelStats(absmax=torch.maximum(self.lo.abs(), self.hi.abs()), min=self.lo.clone(), max=self.hi.clone())


class TokenSample:
    """A fixed random subset of an input's tokens: at most `budget` of the `total` the calibration
    pass will show, chosen up front (seeded), so memory is O(budget · in). Random rather than
    strided: a stride that divides the sequence length would over-represent fixed positions (the
    first token of every sequence carries the largest outliers)."""

    def __init__(self, total: int, budget: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.keep = torch.randperm(total, generator=g)[:budget].sort().values
        self.seen = 0
        self.parts: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        lo, hi = self.seen, self.seen + flat.shape[0]
        idx = self.keep[(self.keep >= lo) & (self.keep < hi)] - lo
        self.parts.append(flat[idx.to(flat.device)].float().cpu())
        self.seen = hi

    def tensor(self) -> torch.Tensor:
        if not self.parts:
            raise ValueError("the sampler has seen no data")
        return torch.cat(self.parts)


def asym_shift(stats: ChannelStats) -> torch.Tensor:
    """δ = (max + min) / 2: centres every channel, so max|X − δ| = (max − min) / 2."""
    return (stats.max + stats.min) / 2


# ---- scales -----------------------------------------------------------------------------------

def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max|W| per input channel, over the output rows of all weights reading the same X, on the
    first weight's device (a caller may add maxima read on the host, e.g. streamed experts')."""
    device = weights[0].device
    return torch.stack([W.detach().float().abs().amax(0).to(device) for W in weights]).amax(0)


def power_scale(a: torch.Tensor, w: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = a^α / w^β, clamped ≥ SCALE_MIN; s = 1 on channels that are zero in both X and W."""
    a = a.float()
    w = w.float().to(a.device)
    s = a.pow(alpha) / w.clamp(min=SCALE_MIN).pow(beta)
    s = s.clamp(min=SCALE_MIN)
    # a dead channel (no activation, no weight) has nothing to balance: leave it alone
    return torch.where((a == 0) & (w == 0), torch.ones_like(s), s)


def smoothquant_scale(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = M1_ALPHA) -> torch.Tensor:
    """m1: s = max|X|^α / max|W|^(1−α) per input channel."""
    return power_scale(act_absmax, weight_absmax(weights), alpha, 1 - alpha)


def iter_smooth_scale(stats: ChannelStats, weights: Sequence[torch.Tensor], alpha: float = M4_ALPHA,
                      symmetric: bool = True) -> torch.Tensor:
    """m4: s = A^α / max|W|^(1−α), A = max|X| (symmetric) or max|X − δ| = (max − min)/2 (asymmetric).

    The asymmetric A is what remains after the midpoint shift; it follows from the running
    min/max, so one calibration pass serves both variants.
    """
    return power_scale(act_extent(stats, symmetric), weight_absmax(weights), alpha, 1 - alpha)


def act_extent(stats: ChannelStats, symmetric: bool) -> torch.Tensor:
    """A per channel: max|X| (symmetric), or max|X − δ| = (max − min)/2 after the midpoint shift."""
    return stats.absmax if symmetric else (stats.max - stats.min) / 2


def gqa_group_scale(s: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make s over o_proj's inputs [num_heads · head_dim] foldable into v_proj's rows.

    Query head h reads kv head h // (num_heads / num_kv_heads), so every o_proj input channel
    (h, d) is a copy of v channel (h // groups, d) and must share its scale. The group takes the
    largest s of its members (the most outlier-heavy head sets the divisor). Returns
    (s_v [num_kv_heads · head_dim], s_o [num_heads · head_dim]) with s_o the repeat of s_v.
    """
    if num_heads % num_kv_heads or s.numel() % num_heads:
        raise ValueError(f"s of {s.numel()} channels does not split into {num_heads} heads over {num_kv_heads} kv heads")
    groups, head_dim = num_heads // num_kv_heads, s.numel() // num_heads
    s_v = s.reshape(num_kv_heads, groups, head_dim).amax(1)
    s_o = s_v[:, None, :].expand(num_kv_heads, groups, head_dim).reshape(-1)
    return s_v.reshape(-1), s_o


# ---- folding ----------------------------------------------------------------------------------

@torch.no_grad()
def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    W = linear.weight
    W.copy_(W.float() * s.to(W.device))


@torch.no_grad()
def apply_norm_linears(norm_weight: torch.Tensor, linears: Sequence[nn.Linear], s: torch.Tensor,
                       shift: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fold s (and δ) into an RMSNorm → linears subgraph, in place.

    norm.weight /= s; every W[:, j] *= s[j]. With δ, each linear's bias gains W δ (computed from
    the unscaled W, since the linear now sees X − δ) and the norm gets the bias −δ / s. An existing
    norm bias b (y = RMSNorm(x)·w + b) is divided by s like the weight. Returns the norm's new
    bias (fp32 [hidden]), or None when the norm has none.
    """
    s = s.float()
    if shift is not None:
        shift = shift.float()
        for lin in linears:
            W = lin.weight
            comp = W.float() @ shift.to(W.device)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))
            lin.bias.copy_(lin.bias.float() + comp)
    for lin in linears:
        scale_columns(lin, s)
    norm_weight.copy_(norm_weight.float() / s.to(norm_weight.device))
    if shift is None and norm_bias is None:
        return None
    b = torch.zeros_like(s) if norm_bias is None else norm_bias.float().to(s.device) / s
    if shift is not None:
        b = b - shift.to(s.device) / s
    return b


@torch.no_grad()
def apply_linear_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor,
                        heads: tuple[int, int] | None = None) -> torch.Tensor:
    """Fold s over nxt's inputs into prev's rows: prev.weight[j, :] /= s[j], prev.bias[j] /= s[j],
    nxt.weight[:, j] *= s[j]. Exact because nxt's input is linear in each of prev's output channels
    (up→down: act(gate)·up; v→o: softmax-weighted sums of v).

    heads = (num_heads, num_kv_heads) for v→o: s is given over o_proj's inputs and reduced to one
    scale per kv channel (gqa_group_scale), since a kv channel feeds several query heads. Returns
    the scale applied to nxt's columns.
    """
    s = s.float()
    s_prev, s_nxt = gqa_group_scale(s, *heads) if heads is not None else (s, s)
    if prev.weight.shape[0] != s_prev.numel() or nxt.weight.shape[1] != s_nxt.numel():
        raise ValueError(f"s does not match {tuple(prev.weight.shape)} → {tuple(nxt.weight.shape)}")
    Wp = prev.weight
    Wp.copy_(Wp.float() / s_prev.to(Wp.device)[:, None])
    if prev.bias is not None:
        prev.bias.copy_(prev.bias.float() / s_prev.to(prev.bias.device))
    scale_columns(nxt, s_nxt)
    return s_nxt


# ---- a dense decoder layer --------------------------------------------------------------------

# A rule gives the s of one subgraph: rule(key, weights, symmetric, fold), where key names the
# input statistics, weights are those reading the input (as they are now), and fold maps s to the
# scale the consumer's columns really get (GQA reduces it per kv group).
Rule = Callable[[str, Sequence[torch.Tensor], bool, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _m1_rule(stats: dict, alpha: float | None, samples: dict | None, acts: dict | None) -> Rule:
    alpha = M1_ALPHA if alpha is None else alpha
    return lambda key, weights, sym, fold: smoothquant_scale(stats[key].absmax, weights, alpha)


def _m4_rule(stats: dict, alpha: float | None, samples: dict | None, acts: dict | None) -> Rule:
    alpha = M4_ALPHA if alpha is None else alpha
    return lambda key, weights, sym, fold: iter_smooth_scale(stats[key], weights, alpha, symmetric=sym)


def _m6_rule(stats: dict, alpha: float | None, samples: dict | None, acts: dict | None) -> Rule:
    from .flex import flex_subgraph_scale   # flex.py builds on this module's scales
    if samples is None:
        raise ValueError("m6 searches on calibration samples: pass samples (key → tokens [T, in])")
    acts = acts or {}
    return lambda key, weights, sym, fold: flex_subgraph_scale(stats[key], samples[key], weights, sym,
                                                                acts.get(key, "per_tensor"), fold)


RULES = {"m1": _m1_rule, "m4": _m4_rule, "m6": _m6_rule}
SHIFTABLE = ("m4", "m6")   # the methods with an asymmetric (midpoint-shift) variant


def check_method(method: str, symmetric: bool) -> None:
    if method not in RULES:
        raise ValueError(f"unknown smoothing method {method!r}")
    if method not in SHIFTABLE and not symmetric:
        raise ValueError(f"{method} is symmetric; use m4 or m6 for the shifted variant")


@torch.no_grad()
def smooth_dense_layer(layer: nn.Module, stats: dict[str, ChannelStats], method: str = "m1",
                       alpha: float | None = None, symmetric: bool = True, samples: dict | None = None,
                       acts: dict[str, str] | None = None,
                       subgraphs: Sequence[str] = SUBGRAPH_TYPES) -> dict[str, torch.Tensor]:
    """Smooth a Llama / Qwen2 / Qwen3 decoder layer in place, subgraphs in msModelSlim's order.

    stats holds the input statistics of the unsmoothed layer, keyed like arch.llama.INPUT_GROUPS:
    "attn_in" (q/k/v), "o_in", "mlp_in" (gate/up), "down_in". Order: up→down, v→o, then the two
    norm→linears subgraphs, whose weight maxima therefore include the rows just rescaled. The
    shift (symmetric=False, m4 and m6) applies to norm→linears alone: up→down cannot carry one (the
    gate multiplies after up) and v→o is left symmetric as in msModelSlim. m6 also needs `samples`
    (the same keys: tokens of each input) and `acts` (key → the consumer's activation quantization,
    FLOAT_ACT for a float consumer). `subgraphs` selects by msModelSlim's type names (a dense layer
    has no "linear-linear" subgraph). Returns the norm biases created, by norm name ({} when
    symmetric).
    """
    check_method(method, symmetric)
    scale = RULES[method](stats, alpha, samples, acts)
    biases = {}
    for kind, step in DENSE_SUBGRAPHS:
        if kind in subgraphs:
            biases.update(step(layer, scale, stats, symmetric))
    return biases


def _dense_up_down(layer: nn.Module, scale: Rule, stats: dict, symmetric: bool) -> dict:
    mlp = layer.mlp
    apply_linear_linear(mlp.up_proj, mlp.down_proj, scale("down_in", [mlp.down_proj.weight], True, no_fold))
    return {}


def _dense_ov(layer: nn.Module, scale: Rule, stats: dict, symmetric: bool) -> dict:
    attn = layer.self_attn
    heads = (attn.config.num_attention_heads, attn.config.num_key_value_heads)
    s_o = scale("o_in", [attn.o_proj.weight], True, lambda s: gqa_group_scale(s, *heads)[1])
    apply_linear_linear(attn.v_proj, attn.o_proj, s_o, heads=heads)
    return {}


def _dense_norm_linears(layer: nn.Module, scale: Rule, stats: dict, symmetric: bool) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    biases = {}
    for norm_name, key, linears in (("input_layernorm", "attn_in", [attn.q_proj, attn.k_proj, attn.v_proj]),
                                    ("post_attention_layernorm", "mlp_in", [mlp.gate_proj, mlp.up_proj])):
        s = scale(key, [lin.weight for lin in linears], symmetric, no_fold)
        shift = None if symmetric else asym_shift(stats[key])
        b = apply_norm_linears(getattr(layer, norm_name).weight, linears, s, shift)
        if b is not None:
            biases[norm_name] = b
    return biases


# msModelSlim's subgraph types in its order of application (each returns the norm biases it made)
DENSE_SUBGRAPHS = (("up-down", _dense_up_down), ("ov", _dense_ov), ("norm-linear", _dense_norm_linears))


def no_fold(s: torch.Tensor) -> torch.Tensor:
    return s
