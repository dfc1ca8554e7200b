"""Half-Quadratic Quantization (Badri & Shaji 2023): data-free refinement of (s, z) per group.

Conventions: W is [n, k] = [out, in] in fp32; groups of G run along k;
q = clamp(round(W / s + z), qmin, qmax), Ŵ = (q − z)·s, s and z are [n, k/G].

HQQ minimises the sparsity-promoting loss ‖W − Ŵ‖_p^p (p < 1) by half-quadratic splitting: an
extra variable E ≈ W − Ŵ takes the outliers of the error (a generalised soft-threshold of the
residual), and (s, z) are then fitted in closed form to the rest, W − E, with β (the weight of the
quadratic coupling) growing by κ each step. With `real_zero` z stays real-valued, as published (the W4A16
offset is a float tensor); otherwise the closed-form z is rounded and clamped into [qmin, qmax] at
every step, which leaves z alone unless the residual is off-centre by more than half a step, so
the gain then comes from the scale alone. Per group the iterate with the smallest ‖W − Ŵ‖ is kept, the min-max
start included, so no group gets worse.
"""
from __future__ import annotations

import torch

from ..kernels.affine import group_view, minmax_affine_groups, minmax_asym_groups


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """sign(x)·relu(|x| − |x|^(p−1)/β): the generalised soft-thresholding step of HQQ for the lp loss."""
    ax = x.abs()
    # |x|^(p−1) is infinite at 0 for p < 1; the clamp keeps it finite, and such entries shrink to 0 anyway.
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-30).pow(p - 1) / beta)


def _init(Wg: torch.Tensor, W: torch.Tensor, G: int, qmin: int, qmax: int, symmetric: bool, real_zero: bool):
    if symmetric:
        s = Wg.abs().amax(dim=2) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s)
    return (minmax_affine_groups if real_zero else minmax_asym_groups)(W, G, qmin, qmax)


def _quant(Wg, s, z, qmin, qmax):
    return torch.clamp(torch.round(Wg / s.unsqueeze(2) + z.unsqueeze(2)), qmin, qmax)


def _group_err(Wg, q, s, z):
    return ((Wg - (q - z.unsqueeze(2)) * s.unsqueeze(2)) ** 2).sum(dim=2)


def _ls_scale(T: torch.Tensor, qz: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """argmin over s of ‖T − qz·s‖ per group, qz = q − z; groups where it is undefined keep s."""
    den = (qz * qz).sum(dim=2)
    s_ls = (T * qz).sum(dim=2) / den.clamp_min(1e-30)
    return torch.where((den > 0) & (s_ls > 0) & torch.isfinite(s_ls), s_ls, s)


def hqq(W: torch.Tensor, G: int, qmin: int, qmax: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, optimize_scale: bool = False, symmetric: bool = False,
        real_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns q (int8 [n, k]), s and z (fp32 [n, k/G]).

    Asymmetric: z is updated in closed form each step, and s too when optimize_scale is set;
    z is real-valued with real_zero (the algorithm as published), else rounded into [qmin, qmax].
    Symmetric: z stays 0, so the scale is what gets optimised.
    """
    n, k = W.shape
    W = W.detach().float()
    Wg = group_view(W, G)
    s, z = _init(Wg, W, G, qmin, qmax, symmetric, real_zero)

    q = _quant(Wg, s, z, qmin, qmax)
    best_q, best_s, best_z = q, s, z
    best_e = _group_err(Wg, q, s, z)
    for _ in range(iters):
        W_hat = (q - z.unsqueeze(2)) * s.unsqueeze(2)
        E = shrink_lp(Wg - W_hat, beta, p)
        T = Wg - E                                    # the part of W that (s, z) should reproduce
        if symmetric or optimize_scale:
            s = _ls_scale(T, q - z.unsqueeze(2), s)
        if not symmetric:
            z = (q - T / s.unsqueeze(2)).mean(dim=2)
            if not real_zero:
                z = torch.clamp(torch.round(z), qmin, qmax)
        q = _quant(Wg, s, z, qmin, qmax)
        beta *= kappa

        e = _group_err(Wg, q, s, z)
        better = e < best_e
        best_q = torch.where(better.unsqueeze(2), q, best_q)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_e = torch.where(better, e, best_e)
    return best_q.reshape(n, k).to(torch.int8), best_s, best_z
