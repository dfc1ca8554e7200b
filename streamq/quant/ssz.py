"""Per-channel symmetric scale search by iterated least squares.

Conventions: W is [n, k] = [out, in] in fp32; one scale per output row, z = 0:
q = clamp(round(W / s), qmin, qmax), Ŵ = s·q, s is [n, 1].

Each step alternates the two exact sub-problems of min over (s, q) of ‖W − s·q‖²: for fixed s the
best q is round-to-nearest; for fixed q the best s is ⟨W, q⟩ / ⟨q, q⟩. The row error therefore never
increases along one run, but the run stops in a local minimum that depends on the starting scale,
so it is started from several shrunken copies of the min-max scale and the best row is kept.
"""
from __future__ import annotations

import torch

# Starting fractions of the min-max scale. The L2-best int4 scale clips: about 0.75 of max|W| / qmax
# for a Gaussian row of a few thousand weights and lower for heavy tails, so the grid reaches 0.5.
SHRINK = (1.00, 0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50)


def _round(W: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(W / s), qmin, qmax)


def _row_err(W: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return ((W - s * q) ** 2).sum(dim=1, keepdim=True)


def ssz(W: torch.Tensor, qmin: int = -8, qmax: int = 7, iters: int = 10,
        shrink: tuple[float, ...] = SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns q (int8 [n, k]) and s (fp32 [n, 1]); every row's error is at most min-max's."""
    W = W.detach().float()
    s0 = W.abs().amax(dim=1, keepdim=True) / qmax
    s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))      # an all-zero row: any scale is exact

    # The first candidate is min-max itself (shrink 1.00, before any step), hence the guarantee.
    best_q = _round(W, s0, qmin, qmax)
    best_s = s0.clone()
    best_e = _row_err(W, best_s, best_q)
    for f in shrink:
        s = s0 * f
        for _ in range(iters):
            q = _round(W, s, qmin, qmax)
            e = _row_err(W, s, q)
            better = e < best_e
            best_q = torch.where(better, q, best_q)
            best_s = torch.where(better, s, best_s)
            best_e = torch.where(better, e, best_e)
            qq = (q * q).sum(dim=1, keepdim=True)
            s_ls = (W * q).sum(dim=1, keepdim=True) / qq.clamp_min(1)
            # A row that rounded to all zeros has no least-squares scale: keep the one it had.
            s = torch.where((qq > 0) & (s_ls > 0), s_ls, s)
    return best_q.to(torch.int8), best_s
