"""KV cache C8 for dense attention: per-channel int8 scale/offset of the k_proj and v_proj
outputs (FORMAT.md §3), from a calibration pass over the float layer.

Convention as everywhere: q = clamp(round(x / s + o), −128, 127) with the offset in the signed
domain, o = round(−min / s) − 128. The propagated pass round-trips K and V through these
parameters, as the consumer's int8 cache does.
"""
from __future__ import annotations

import torch
from torch import nn

from .smoothing import channel_stats

KV = ("self_attn.k_proj", "self_attn.v_proj")
SUFFIXES = ("kv_cache_scale", "kv_cache_offset")


def planned_tensors(prefix: str, shapes: dict, dt: torch.dtype) -> list[tuple]:
    """(name, dtype, shape) of one layer's C8 tensors."""
    return [(f"{prefix}.{sub}.{suffix}", dt, (shapes[f"{prefix}.{sub}.weight"][0],))
            for sub in KV for suffix in SUFFIXES]


def kv_params(lo: torch.Tensor, hi: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s, o) in the model dtype; the range always contains 0."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-8).to(dt)
    o = (torch.round(-lo / s.float()) - 128).to(dt)
    return s, o


def calibrate(layer: nn.Module, forward, H, batch: int, device, cdt, prefix: str, dt) -> dict[str, torch.Tensor]:
    """Observe the K/V projection outputs, install their int8 round trip, return the tensors."""
    stats = channel_stats(layer, forward, H, batch, device, cdt, inputs={}, outputs={sub: sub for sub in KV})
    out = {}
    for sub, st in stats.items():
        s, o = kv_params(st.min.cpu(), st.max.cpu(), dt)
        out[f"{prefix}.{sub}.kv_cache_scale"], out[f"{prefix}.{sub}.kv_cache_offset"] = s, o
        sf, of = s.float().to(device), o.float().to(device)
        layer.get_submodule(sub).register_forward_hook(
            lambda m, a, y, sf=sf, of=of: ((torch.clamp(torch.round(y / sf + of), -128, 127) - of) * sf).to(y.dtype))
    return out
