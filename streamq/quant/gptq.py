"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022): quantize W column by column, folding each
column's rounding error into the not-yet-quantized columns through the inverse Hessian.

Conventions: W is [n, k] = [out, in] in fp32; X is [N, k] (tokens × in) and H = 2/N · XᵀX is the
Hessian of the layer loss ‖XWᵀ − XŴᵀ‖² with respect to each row of W. Groups of G columns share
one affine (s, z): q = clamp(round(W / s + z), qmin, qmax), Ŵ = (q − z)·s, s and z are [n, k/G].
The (s, z) are static: computed from the original W before GPTQ runs, so the stored format is the
one round-to-nearest writes; GPTQ only chooses q.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.affine import dequantize_groups, quantize_groups

MAX_RETRIES = 5          # damping ×10 per retry: λ reaches 10⁵ · percdamp · mean(diag H)


class HessianAccumulator:
    """Streaming H = 2/N · Σₜ xₜᵀxₜ over the N tokens seen so far, in fp32.

    Holds one [k, k] sum and a token count, so memory does not grow with the number of tokens;
    the 2/N factor is applied on read, which keeps the running sum free of repeated rescaling.
    """

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.k = k
        self.N = 0
        # Without a device the sum is allocated on the first batch's device.
        self._S = None if device is None else torch.zeros(k, k, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of x [..., k]."""
        x = x.detach().reshape(-1, self.k).float()
        if self._S is None:
            self._S = torch.zeros(self.k, self.k, dtype=torch.float32, device=x.device)
        x = x.to(self._S.device)
        self._S.addmm_(x.T, x)
        self.N += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.N == 0:
            device = self._S.device if self._S is not None else None
            return torch.zeros(self.k, self.k, dtype=torch.float32, device=device)
        return self._S * (2.0 / self.N)


@dataclass
class GPTQResult:
    q: torch.Tensor                      # int8 [n, k], original column order
    W_hat: torch.Tensor                  # fp32 [n, k] = (q − z)·s
    info: dict = field(default_factory=dict)   # damp (λ used), retries, fallback, dead


def _quant_col(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    # Same arithmetic as kernels.affine.quantize_groups, so that GPTQ with no error feedback is RTN bit for bit.
    return torch.clamp(torch.round(w / s + z), qmin, qmax)


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.int8 if -128 <= qmin and qmax <= 127 else torch.int32


def _rtn(W: torch.Tensor, s, z, G, qmin, qmax, info: dict) -> GPTQResult:
    q = quantize_groups(W, s, z, G, qmin, qmax).to(_int_dtype(qmin, qmax))
    info["fallback"] = True
    return GPTQResult(q, dequantize_groups(q, s.float(), z.float(), G), info)


def _hinv_chol(H: torch.Tensor, lam: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + λI)⁻¹, or None when H + λI is not (numerically) positive definite.

    Factorised in float64: the chain Cholesky → inverse → Cholesky squares the condition number.
    """
    H64 = H.double()
    H64.diagonal().add_(lam)
    L, fail = torch.linalg.cholesky_ex(H64)
    if fail.item() != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    U, fail = torch.linalg.cholesky_ex(Hinv, upper=True)
    if fail.item() != 0 or not torch.isfinite(U).all():
        return None
    return U.float()


def gptq(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int, qmin: int, qmax: int,
         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False) -> GPTQResult:
    """GPTQ with static groups. W [n, k], H [k, k] = 2XᵀX/N, s and z [n, k/G].

    act_order processes columns by decreasing diag(H) (the most active inputs first, while the
    most columns are left to absorb their error); each column keeps its own group's (s, z).
    If H + λI cannot be factorised after MAX_RETRIES ×10 increases of λ, q falls back to
    round-to-nearest with the same (s, z) and info["fallback"] is True.
    """
    n, k = W.shape
    if k % G or tuple(s.shape) != (n, k // G) or tuple(z.shape) != (n, k // G):
        raise ValueError(f"gptq: W {n}x{k} with G={G} needs s and z of shape ({n}, {k // G}), "
                         f"got {tuple(s.shape)} and {tuple(z.shape)}")
    W0 = W.detach().float()
    s, z = s.float(), z.float()
    info = dict(damp=0.0, retries=0, fallback=False, dead=0)

    H = H.detach().to(W0.device, torch.float32).clone()
    if not torch.isfinite(H).all():          # no damping repairs NaN or inf entries
        return _rtn(W0, s, z, G, qmin, qmax, info)

    W = W0.clone()
    # Dead inputs (never non-zero in calibration) carry no information: any value of W there gives
    # the same output, so zero them and put 1 on the diagonal to keep H invertible.
    dead = torch.diagonal(H) == 0
    info["dead"] = int(dead.sum())
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Static group mapping: the column processed i-th is original column perm[i], and it always uses
    # that column's group perm[i] // G, whatever order it is processed in.
    group = (perm if act_order else torch.arange(k)).div(G, rounding_mode="floor").tolist()

    lam = percdamp * torch.diagonal(H).mean().item()
    Hinv = _hinv_chol(H, lam)
    while Hinv is None and info["retries"] < MAX_RETRIES:
        info["retries"] += 1
        lam *= 10
        Hinv = _hinv_chol(H, lam)
    info["damp"] = lam
    if Hinv is None:
        return _rtn(W0, s, z, G, qmin, qmax, info)

    qdtype = _int_dtype(qmin, qmax)
    Q = torch.zeros(n, k, dtype=qdtype, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            sj, zj = s[:, group[i1 + i]], z[:, group[i1 + i]]
            q = _quant_col(w, sj, zj, qmin, qmax)
            Q1[:, i] = q
            err1 = (w - (q - zj) * sj) / d
            # Inside the block the update is applied column by column ...
            W1[:, i:] -= torch.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1.to(qdtype)
        # ... and to the columns after it once per block (the lazy batch update).
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    q = Q[:, torch.argsort(perm)] if act_order else Q
    return GPTQResult(q, dequantize_groups(q, s, z, G), info)
