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
- m6, flexible smooth: s = max|X|^α / max|W|^β with (α, β) chosen by grid search on the
  quantized-matmul error.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Callable, Sequence

import torch
from torch import nn

SCALE_MIN = 1e-5     # lower bound of s (and of max|W|): keeps 1/s finite
M1_ALPHA = 0.5       # SmoothQuant's default migration strength
M4_ALPHA = 0.9       # msModelSlim iter_smooth's default
FLEX_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # 0, 0.05, …, 1


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


def asym_shift(stats: ChannelStats) -> torch.Tensor:
    """δ = (max + min) / 2: centres every channel, so max|X − δ| = (max − min) / 2."""
    return (stats.max + stats.min) / 2


# ---- scales -----------------------------------------------------------------------------------

def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max|W| per input channel, over the output rows of all weights reading the same X."""
    return torch.stack([W.detach().float().abs().amax(0) for W in weights]).amax(0)


def _power_scale(a: torch.Tensor, w: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """s = a^α / w^β, clamped ≥ SCALE_MIN; s = 1 on channels that are zero in both X and W."""
    a = a.float()
    w = w.float().to(a.device)
    s = a.pow(alpha) / w.clamp(min=SCALE_MIN).pow(beta)
    s = s.clamp(min=SCALE_MIN)
    # a dead channel (no activation, no weight) has nothing to balance: leave it alone
    return torch.where((a == 0) & (w == 0), torch.ones_like(s), s)


def smoothquant_scale(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = M1_ALPHA) -> torch.Tensor:
    """m1: s = max|X|^α / max|W|^(1−α) per input channel."""
    return _power_scale(act_absmax, weight_absmax(weights), alpha, 1 - alpha)


def iter_smooth_scale(stats: ChannelStats, weights: Sequence[torch.Tensor], alpha: float = M4_ALPHA,
                      symmetric: bool = True) -> torch.Tensor:
    """m4: s = A^α / max|W|^(1−α), A = max|X| (symmetric) or max|X − δ| = (max − min)/2 (asymmetric).

    The asymmetric A is what remains after the midpoint shift; it follows from the running
    min/max, so one calibration pass serves both variants.
    """
    a = stats.absmax if symmetric else (stats.max - stats.min) / 2
    return _power_scale(a, weight_absmax(weights), alpha, 1 - alpha)


def flex_scale(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """m6: s = max|X|^α / max|W|^β."""
    return _power_scale(act_absmax, weight_absmax(weights), alpha, beta)


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
def _scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
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
        _scale_columns(lin, s)
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
    _scale_columns(nxt, s_nxt)
    return s_nxt


# ---- a dense decoder layer --------------------------------------------------------------------

@torch.no_grad()
def smooth_dense_layer(layer: nn.Module, stats: dict[str, ChannelStats], method: str = "m1",
                       alpha: float | None = None, symmetric: bool = True) -> dict[str, torch.Tensor]:
    """Smooth a Llama / Qwen2 / Qwen3 decoder layer in place, subgraphs in msModelSlim's order.

    stats holds the input statistics of the unsmoothed layer, keyed like arch.llama.INPUT_GROUPS:
    "attn_in" (q/k/v), "o_in", "mlp_in" (gate/up), "down_in". Order: up→down, v→o, then the two
    norm→linears subgraphs, whose weight maxima therefore include the rows just rescaled. The
    shift (symmetric=False, m4 only) applies to norm→linears alone: up→down cannot carry one (the
    gate multiplies after up) and v→o is left symmetric as in msModelSlim. Returns the norm biases
    created, by norm name ({} when symmetric).
    """
    if method not in ("m1", "m4"):
        raise ValueError(f"unknown smoothing method {method!r}")
    if method == "m1" and not symmetric:
        raise ValueError("m1 (SmoothQuant) is symmetric; use m4 for the shifted variant")
    alpha = (M1_ALPHA if method == "m1" else M4_ALPHA) if alpha is None else alpha

    def scale(key, weights, sym=True):
        if method == "m1":
            return smoothquant_scale(stats[key].absmax, weights, alpha)
        return iter_smooth_scale(stats[key], weights, alpha, symmetric=sym)

    attn, mlp = layer.self_attn, layer.mlp
    heads = (attn.config.num_attention_heads, attn.config.num_key_value_heads)
    apply_linear_linear(mlp.up_proj, mlp.down_proj, scale("down_in", [mlp.down_proj.weight]))
    apply_linear_linear(attn.v_proj, attn.o_proj, scale("o_in", [attn.o_proj.weight]), heads=heads)

    biases = {}
    for norm_name, key, linears in (("input_layernorm", "attn_in", [attn.q_proj, attn.k_proj, attn.v_proj]),
                                    ("post_attention_layernorm", "mlp_in", [mlp.gate_proj, mlp.up_proj])):
        s = scale(key, [lin.weight for lin in linears], sym=symmetric)
        shift = None if symmetric else asym_shift(stats[key])
        b = apply_norm_linears(getattr(layer, norm_name).weight, linears, s, shift)
        if b is not None:
            biases[norm_name] = b
    return biases


# ---- m6: (α, β) search ------------------------------------------------------------------------

def fake_quant_int8_sym(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Symmetric int8 round trip, one scale per slice along `dim` (per tensor if dim is None)."""
    m = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    step = m.clamp(min=1e-12) / 127
    return torch.clamp(torch.round(x / step), -127, 127) * step


def matmul_quant_error(X: torch.Tensor, W: torch.Tensor, s: torch.Tensor) -> float:
    """‖X Wᵀ − Q(X/s) Q(W·s)ᵀ‖ / ‖X Wᵀ‖, Q per-token int8 for X and per-channel int8 for W
    (the W8A8_DYNAMIC arithmetic)."""
    ref = X @ W.T
    got = fake_quant_int8_sym(X / s) @ fake_quant_int8_sym(W * s).T
    return float((ref - got).norm() / ref.norm().clamp(min=1e-12))


@torch.no_grad()
def flex_smooth_search(x_sample: torch.Tensor, weights: Sequence[torch.Tensor],
                       alphas: Sequence[float] = FLEX_GRID, betas: Sequence[float] = FLEX_GRID,
                       quant_error_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float] = matmul_quant_error,
                       ) -> tuple[float, float]:
    """m6: the (α, β) on the grid minimising quant_error_fn(X, W, s), s = max|X|^α / max|W|^β.

    X is a calibration sample [tokens, in] and W the row-wise concatenation of the weights that
    read it. Every grid point is evaluated; on ties the first in (α, β) order wins.
    """
    X = x_sample.detach().reshape(-1, x_sample.shape[-1]).float()
    W = torch.cat([w.detach().float() for w in weights]).to(X.device)
    a = X.abs().amax(0)
    best, best_err = None, float("inf")
    for alpha, beta in product(alphas, betas):
        err = quant_error_fn(X, W, flex_scale(a, [W], alpha, beta))
        if best is None or err < best_err:
            best, best_err = (alpha, beta), err
    return best
