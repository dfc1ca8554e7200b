"""Affine quantization references. Convention: q = clamp(round(x / s + z), qmin, qmax), x ≈ (q − z) · s.

W is [out, in] (n, k); groups run along `in`. All statistics are computed in fp32.
"""
import torch

FP8_BLOCK = 128


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along dim (kept), exactly, from two reductions: no full-size |x| temporary."""
    return torch.maximum(-x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True))


def absmax_scale(W: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row symmetric scale max|W| / qmax, [n, 1] fp32; an all-zero row gets scale 1 (not 0)."""
    s = _absmax(W.float(), dim=1) / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_sym(W: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """round(W / s) clamped; s broadcasts against W. Returns int8."""
    return torch.clamp(torch.round(W.float() / s), qmin, qmax).to(torch.int8)


def group_view(W: torch.Tensor, G: int) -> torch.Tensor:
    """[n, k] → [n, k/G, G]."""
    n, k = W.shape
    return W.reshape(n, k // G, G)


def minmax_asym_groups(W: torch.Tensor, G: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric (s, z), each [n, k/G] fp32, with z integral in [qmin, qmax].

    The range always includes 0 so that zero weights stay exact.
    """
    Wg = group_view(W.float(), G)
    lo = Wg.amin(dim=2).clamp(max=0)
    hi = Wg.amax(dim=2).clamp(min=0)
    s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
    return s, z


def minmax_affine_groups(W: torch.Tensor, G: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric (s, z), each [n, k/G] fp32, with a real-valued z: the group's min maps
    to qmin and its max to qmax exactly, so no part of the grid is spent outside the group's range
    (an integral z has to widen the range by up to a step, and its range has to include 0).

    A constant group gets s = |value| (or 1 for zeros), which still reproduces it exactly.
    """
    Wg = group_view(W.float(), G)
    lo, hi = Wg.amin(dim=2), Wg.amax(dim=2)
    s = (hi - lo) / (qmax - qmin)
    flat = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))
    s = torch.where(s > 0, s, flat)
    return s, qmin - lo / s


def quantize_groups(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-group affine quantization: q = clamp(round(W / s + z)), int8 [n, k]."""
    Wg = group_view(W.float(), G)
    # In place after the division: one full-size temporary instead of four (each a fresh
    # zero-filled mapping for a layer-sized W).
    q = (Wg / s.unsqueeze(2)).add_(z.unsqueeze(2)).round_().clamp_(qmin, qmax)
    return q.reshape(W.shape).to(torch.int8)


def dequantize_groups(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int) -> torch.Tensor:
    qg = group_view(q.float(), G)
    return ((qg - z.unsqueeze(2)) * s.unsqueeze(2)).reshape(q.shape)


def fake_quant_per_token(x: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-token symmetric int8 round trip (the dynamic-activation path of the consumer)."""
    s = _absmax(x, dim=-1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (x / s).round_().clamp_(-qmax, qmax).mul_(s)  # in place: one temporary, not three


def dequant_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 weight × per-(block×block) scale → fp32. Edges that are not multiples of `block` are cropped."""
    n, k = w.shape
    bn, bk = -(-n // block), -(-k // block)
    if tuple(scale_inv.shape) != (bn, bk):
        raise ValueError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {n}x{k} in {block}-blocks")
    s = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return w.float() * s
