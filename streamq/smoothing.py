"""Anti-outlier smoothing inside the layer loop (dense layers).

A calibration pass collects per-channel statistics of each shared input, `smooth.smooth_dense_layer`
rescales the layer in place (an exact equivalence of the float layer), and the quantization that
follows sees the smoothed layer. Asymmetric smoothing (m4, `anti_symmetric = false`) adds a bias
after each RMSNorm (`<norm>.bias`, fp32) and a compensating bias to the linears it feeds; both are
new output tensors, which `planned_tensors` adds to the plan.
"""
from __future__ import annotations

import torch
from torch import nn

from .layerquant import run_batches
from .recipe import Recipe
from .smooth import ChannelObserver, smooth_dense_layer

NORM_FEEDS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
# The first linear reading each input the smoothing needs statistics of.
STAT_INPUTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
               "down_in": "mlp.down_proj"}


def planned_tensors(recipe: Recipe, prefix: str, shapes: dict, hidden: int, dt: torch.dtype) -> list[tuple]:
    """(name, dtype, shape) of the tensors asymmetric smoothing creates in one layer."""
    if not recipe.anti_method or recipe.anti_symmetric:
        return []
    out = [(f"{prefix}.{norm}.bias", torch.float32, (hidden,)) for norm in NORM_FEEDS]
    for linears in NORM_FEEDS.values():
        for sub in linears:
            name = f"{prefix}.{sub}"
            if f"{name}.bias" not in shapes:
                out.append((f"{name}.bias", dt, (shapes[f"{name}.weight"][0],)))
    return out


def channel_stats(layer: nn.Module, forward, H: torch.Tensor, batch: int, device, cdt,
                  inputs: dict[str, str] = STAT_INPUTS, outputs: dict[str, str] | None = None) -> dict:
    """Per-channel statistics (one calibration pass) of the inputs and/or outputs of submodules,
    by key: `inputs`/`outputs` map key → submodule name."""
    observers = {key: ChannelObserver() for key in [*inputs, *(outputs or {})]}
    layer_sub = layer.get_submodule
    handles = [layer_sub(sub).register_forward_pre_hook(lambda m, a, o=observers[key]: o.update(a[0]))
               for key, sub in inputs.items()]
    handles += [layer_sub(sub).register_forward_hook(lambda m, a, y, o=observers[key]: o.update(y))
                for key, sub in (outputs or {}).items()]
    try:
        with torch.no_grad():
            run_batches(forward, H, batch, device, cdt, None)
    finally:
        for h in handles:
            h.remove()
    return {key: o.stats() for key, o in observers.items()}


def smooth_layer(recipe: Recipe, layer: nn.Module, forward, H, batch: int, device, cdt) -> dict[str, torch.Tensor]:
    """Smooth in place; returns the new norm biases by norm name (and installs them)."""
    stats = channel_stats(layer, forward, H, batch, device, cdt)
    with torch.no_grad():
        biases = smooth_dense_layer(layer, stats, recipe.anti_method, recipe.alpha, recipe.anti_symmetric)
    for norm, b in biases.items():
        layer.get_submodule(norm).register_forward_hook(lambda m, a, y, b=b: y + b.to(y.dtype))
    return biases


def refreshed(raw: dict, layer: nn.Module, prefix: str, biases: dict) -> dict:
    """The source tensors as the smoothed layer now holds them (in their stored dtypes), plus the
    tensors smoothing created."""
    out = dict(raw)
    for name, p in layer.state_dict().items():
        full = f"{prefix}.{name}"
        out[full] = p.detach().cpu().to(raw[full].dtype if full in raw else raw[f"{prefix}.{name[:-5]}.weight"].dtype)
    out.update({f"{prefix}.{norm}.bias": b.float().cpu() for norm, b in biases.items()})
    return out
