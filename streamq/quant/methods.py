"""Weight methods (`w_method`): how a scheme's integer weights and scales are chosen.

Every scheme reduces to "integers q in [qmin, qmax] with per-group (s, z) over groups of G
along k" (G = k: per channel). A method picks (s, z) — min-max, HQQ's half-quadratic solver,
or the least-squares scale search — and then q: round-to-nearest, or GPTQ's error-compensating
rounding with the layer's Hessian. The stored tensors keep the scheme's form either way.
"""
from __future__ import annotations

import logging

import torch

from ..kernels.affine import absmax_scale, minmax_affine_groups, quantize_groups
from ..recipe import QuantArgs
from .gptq import gptq
from .hqq import hqq
from .ssz import ssz

log = logging.getLogger("streamq")


def _symmetric_qmax(qmin: int, qmax: int) -> int:
    """int4 symmetric grids use max|W|/7 (the +7 side), int8 ones max|W|/127."""
    return min(qmax, -qmin)


def _minmax_scales(W, G, qmin, qmax, sym, args):
    n, k = W.shape
    if sym:
        s = absmax_scale(W.reshape(-1, G), _symmetric_qmax(qmin, qmax)).reshape(n, k // G)
        return s, torch.zeros_like(s)
    # Asymmetric groups exist only in W4A16, whose offset is a float tensor: a real-valued z fits the
    # grid to the group's range exactly (22-27% less ‖W − Ŵ‖² than an integral z on SmolLM2).
    return minmax_affine_groups(W, G, qmin, qmax)


def _hqq_scales(W, G, qmin, qmax, sym, args):
    # Asymmetric groups: HQQ as published, a real-valued zero point refined with the min-max scale
    # kept. Refitting the scale as well gives less ‖W − Ŵ‖² but shrinks the grid onto the bulk of
    # each group, and the weights it then clips are the ones some inputs with massive activations
    # read (SmolLM2 layer 11's down_proj: 3.6x the output error of min-max at group 192; perplexity
    # +89.7% vs +71.9%). Symmetric groups have no zero point: there HQQ refits the scale, its only
    # freedom.
    _, s, z = hqq(W, G, qmin, qmax, optimize_scale=False, symmetric=sym, real_zero=True)
    return s, z


def _ssz_scales(W, G, qmin, qmax, sym, args):
    n, k = W.shape
    if G != k or not sym:
        # The scale search is per channel and symmetric: fall back where it does not apply.
        return _minmax_scales(W, G, qmin, qmax, sym, args)
    _, s = ssz(W, qmin, qmax)
    return s, torch.zeros_like(s)


SCALES = {"minmax": _minmax_scales, "gptq": _minmax_scales, "hqq": _hqq_scales, "ssz": _ssz_scales}


def choose(W: torch.Tensor, G: int, qmin: int, qmax: int, sym: bool, args: QuantArgs,
           H: torch.Tensor | None = None, round_scale=None, name: str = "",
           held_as: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """(q int8 [n,k], s, z [n, k/G] fp32) for W [n, k]. `round_scale` maps s to what is stored
    (e.g. rounded to bf16) before q is chosen, so q matches the scale the consumer loads.
    `held_as` is the dtype the consumer casts stored fp32 s and z to (the model dtype): both are
    rounded to it before q is chosen, so the stored values survive that cast unchanged."""
    W = W.float()
    s, z = SCALES[args.w_method](W, G, qmin, qmax, sym, args)
    if round_scale is not None:
        s = round_scale(s)
    if held_as is not None:
        s, z = s.to(held_as).float(), z.to(held_as).float()
    info = {}
    if args.w_method == "gptq":
        if H is None:
            log.warning("%s: no calibration tokens reached this linear; GPTQ falls back to round-to-nearest", name)
            info["fallback"] = "no tokens"
        else:
            res = gptq(W, H, s, z, G, qmin, qmax, percdamp=args.percdamp, act_order=args.act_order)
            if res.info.get("fallback"):
                log.warning("%s: H could not be factorised; GPTQ fell back to round-to-nearest", name)
            return res.q.to(torch.int8), s, z, res.info
    return quantize_groups(W, s, z, G, qmin, qmax), s, z, info
