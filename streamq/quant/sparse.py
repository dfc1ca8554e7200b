"""The outlier-protected weight fit of W8A8S (msModelSlim's low-bit sparse quantization).

Conventions: W is [n, k] fp32; one symmetric scale s per row; Ŵ = q·s with q int8 in [−127, 127].

msModelSlim's sparse quantization is asked for with w_bit = 4, a_bit = 8, is_lowbit = true, yet
its checkpoint holds int8 weights with W8A8's tensors: the bulk of each row lies on a 4-bit grid,
and the few outliers that `open_outlier` sets apart keep 8 bits. streamq reads that as one grid
per row, fitted on the inliers:

    s = max|W_inlier| / 7          inliers quantize into [−7, 7] (4 bits: what W8A8SC packs densely)
    q = clamp(round(W / s), −127, 127)    outliers use the rest of the int8 range, up to 127·s ≈ 18·max|W_inlier|

so outliers are protected (they neither stretch the inliers' scale nor get clipped to it). A row
whose largest outlier exceeds 127·s widens its scale to max|W| / 127 instead of clipping it:
a clipped super-weight costs more than coarser inliers in that one row.

Outliers of a row (when `open_outlier`): with `use_sigma`, the weights with |W − μ| > σ_factor·σ
(μ, σ the row's mean and population standard deviation); otherwise the `fraction` of the row
with the largest |W|. The more outliers, the finer the inliers' grid and the less there is to compress.
"""
from __future__ import annotations

import torch

from ..recipe import Outliers

INLIER_QMAX = 7   # symmetric 4-bit grid of the inliers
QMAX = 127        # symmetric int8 grid that outliers may use


def outlier_mask(W: torch.Tensor, o: Outliers) -> torch.Tensor:
    """bool [n, k]: True where a weight is an outlier of its row."""
    W = W.float()
    n, k = W.shape
    if not o.open_outlier:
        return torch.zeros(n, k, dtype=torch.bool, device=W.device)
    if o.use_sigma:
        mu = W.mean(dim=1, keepdim=True)
        sigma = W.std(dim=1, keepdim=True, correction=0)
        return (W - mu).abs() > o.sigma_factor * sigma
    # At least one outlier per row, and never the whole row: the inliers must define a scale.
    m = min(max(round(o.fraction * k), 1), k - 1)
    mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
    return mask.scatter_(1, W.abs().topk(m, dim=1).indices, True) if m > 0 else mask


def inlier_scale(W: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """s [n, 1] fp32: max|W_inlier| / 7, or max|W| / 127 where that is larger (no clipping);
    an all-zero row gets 1."""
    a = W.float().abs()
    s_in = a.masked_fill(outliers, 0).amax(dim=1, keepdim=True) / INLIER_QMAX
    s = torch.maximum(s_in, a.amax(dim=1, keepdim=True) / QMAX)
    return torch.where(s > 0, s, torch.ones_like(s))


def sparse_scale(W: torch.Tensor, o: Outliers) -> tuple[torch.Tensor, float]:
    """The row scales of W8A8S and the share of weights kept as outliers (for the run report)."""
    mask = outlier_mask(W, o)
    return inlier_scale(W, mask), float(mask.float().mean()) if mask.numel() else 0.0
