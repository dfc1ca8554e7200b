"""m6, flexible smooth: the smoothing rule s = A^α / max|W|^β with (α, β) searched per subgraph.

A is the activation extent of m4 (max|X|, or the half range after the midpoint shift). (α, β) is
chosen on a grid by the error of the quantized matmul Q_a(X/s) Q_w(W·s)ᵀ against the float X Wᵀ,
on a token sample of the subgraph's calibration input. Q_w is per-channel symmetric int8; Q_a is
what the consumer does (per-tensor static with the calibration range, per-token dynamic, or none).
The chosen s is folded by smooth.py exactly like m4's, shift included.
"""
from __future__ import annotations

import logging
from itertools import product
from typing import Sequence

import torch

from .smooth import ChannelStats, act_extent, asym_shift, no_fold, power_scale, weight_absmax

log = logging.getLogger("streamq")
FLEX_GRID = tuple(round(0.1 * i, 1) for i in range(11))     # 0, 0.1, …, 1: 121 (α, β) per subgraph
FLEX_TOKENS = 1024   # tokens of each input the m6 search measures on: bounds its memory and time
FLEX_ROWS = 256      # output rows it measures on (seeded sample; max|W| still spans every row)


def flex_scale(act: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """m6: s = A^α / max|W|^β."""
    return power_scale(act, weight_absmax(weights), alpha, beta)


FLOAT_ACT = "float"   # the consumer stays float: nothing is quantized, so there is nothing to smooth


def fake_quant_int8_sym(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Symmetric int8 round trip, one scale per slice along `dim` (per tensor if dim is None)."""
    m = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    step = m.clamp(min=1e-12) / 127
    return torch.clamp(torch.round(x / step), -127, 127) * step


def fake_quant_static(x: torch.Tensor, lo, hi) -> torch.Tensor:
    """Per-tensor asymmetric int8 round trip over the range [lo, hi] widened to hold 0 (the static
    W8A8 input of FORMAT.md §3): step = (hi − lo)/255, offset = round(−lo/step) − 128. lo and hi
    may be tensors broadcasting against x (one range per candidate of a batch)."""
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device).clamp(min=0)
    step = (hi - lo).clamp(min=1e-8) / 255
    o = torch.round(-lo / step) - 128
    return (torch.clamp(torch.round(x / step + o), -128, 127) - o) * step


# The consumer's activation round trip of X' = X/s for a batch of candidates S [k, in] (X' is
# [k, tokens, in]), by quant.schemes' `act`. The per-tensor range is that of the whole calibration
# set: per channel [lo, hi] of X divided by s, then the extremes.
ACT_ROUND_TRIP = {
    "per_tensor": lambda Xs, S, lo, hi: fake_quant_static(Xs, (lo / S).amin(-1)[:, None, None],
                                                          (hi / S).amax(-1)[:, None, None]),
    "per_token": lambda Xs, S, lo, hi: fake_quant_int8_sym(Xs),
    "none": lambda Xs, S, lo, hi: Xs,
}
FLEX_CHUNK = 1 << 24   # elements of one candidate batch's [k, tokens, in]: bounds the search's memory


def matmul_quant_errors(X: torch.Tensor, W: torch.Tensor, S: torch.Tensor, act: str = "per_token",
                        lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                        ref: torch.Tensor | None = None) -> torch.Tensor:
    """‖X Wᵀ − Q_a(X/s) Q_w(W·s)ᵀ‖ / ‖X Wᵀ‖ for each row s of S [k, in], as a tensor [k]: Q_w
    per-channel symmetric int8, Q_a by `act` (ACT_ROUND_TRIP; lo/hi: per-channel calibration range
    of X, for per_tensor). ref = X Wᵀ. Candidates go in one batch: a few large ops, not many small."""
    ref = X @ W.T if ref is None else ref
    Xq = ACT_ROUND_TRIP[act](X / S[:, None, :], S, lo, hi)
    got = Xq @ fake_quant_int8_sym(W * S[:, None, :]).transpose(1, 2)
    return (got - ref).flatten(1).norm(dim=1) / ref.norm().clamp(min=1e-12)


def matmul_quant_error(X: torch.Tensor, W: torch.Tensor, s: torch.Tensor, act: str = "per_token",
                       lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> float:
    """matmul_quant_errors for one s [in]."""
    return float(matmul_quant_errors(X, W, s[None], act, lo, hi)[0])


@torch.no_grad()
def flex_smooth_search(X: torch.Tensor, weights: Sequence[torch.Tensor], A: torch.Tensor, act: str = "per_token",
                       lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, fold=no_fold,
                       alphas: Sequence[float] = FLEX_GRID, betas: Sequence[float] = FLEX_GRID,
                       rows: int | None = FLEX_ROWS) -> tuple[float, float, float]:
    """m6: the (α, β) on the grid minimising matmul_quant_error(X, W_r, fold(s)), s = A^α / max|W|^β,
    and that error. X [tokens, in] is a calibration sample, W the row-wise concatenation of the
    weights reading it, W_r a seeded sample of at most `rows` of its rows (all when None: each row
    is quantized on its own, so a row sample estimates the error without bias), A [in] the
    activation extent of the whole calibration set. Every grid point is evaluated; on ties the
    first in (α, β) order wins, so a flat error keeps (0, 0): s = 1."""
    W = torch.cat([w.detach().float() for w in weights])
    X = X.detach().float().to(W.device)
    A, w_max = A.float().to(W.device), W.abs().amax(0)
    lo, hi = (None, None) if lo is None else (lo.float().to(W.device), hi.float().to(W.device))
    if rows is not None and W.shape[0] > rows:
        W = W[torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[:rows].sort().values]
    ref = X @ W.T
    grid = list(product(alphas, betas))
    chunk = max(1, FLEX_CHUNK // (X.numel() + W.numel()))
    errs = torch.cat([matmul_quant_errors(X, W, torch.stack([fold(power_scale(A, w_max, a, b)) for a, b in part]),
                                          act, lo, hi, ref)
                      for part in (grid[i:i + chunk] for i in range(0, len(grid), chunk))])
    best = int(torch.argmin(errs))      # the first minimum
    return grid[best][0], grid[best][1], float(errs[best])


def flex_subgraph_scale(stats: ChannelStats, X: torch.Tensor, weights: Sequence[torch.Tensor], symmetric: bool,
                        act: str, fold=no_fold) -> torch.Tensor:
    """m6's s for one subgraph. Shifted (symmetric=False), the consumer sees X − δ and its bias
    restores W δ exactly, so the search measures the error on X − δ with the shifted range."""
    A = act_extent(stats, symmetric)
    if act == FLOAT_ACT:
        return torch.ones_like(A)
    shift = torch.zeros_like(A) if symmetric else asym_shift(stats)
    alpha, beta, err = flex_smooth_search(X - shift, weights, A, act, stats.min - shift, stats.max - shift, fold)
    log.debug("m6: %d tokens × %d channels → α=%.2f β=%.2f (matmul error %.3e)", X.shape[0], X.shape[1],
              alpha, beta, err)
    return flex_scale(A, weights, alpha, beta)
