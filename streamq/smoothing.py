"""Anti-outlier smoothing inside the layer loop.

A calibration pass collects per-channel statistics of each shared input, `smooth.smooth_dense_layer`
rescales the layer in place (an exact equivalence of the float layer), and the quantization that
follows sees the smoothed layer. Asymmetric smoothing (m4, `anti_symmetric = false`) adds a bias
after each RMSNorm (`<norm>.bias`, fp32) and a compensating bias to the linears it feeds; both are
new output tensors, which `planned_tensors` adds to the plan. m6 (flex-smooth) searches its
scales on a fixed random sample of FLEX_TOKENS tokens of each input, taken in the same pass, and
measures the error with the activation quantization of the scheme the plan gives the consumer.
DeepSeek layers are smoothed by smooth_mla (symmetric m1 / m4) from the same kind of pass over
their base; moe.py streams the routed experts' share of it.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import StreamqError
from .flex import FLEX_TOKENS, FLOAT_ACT
from .layerquant import run_batches
from .quant.schemes import SCHEMES
from .recipe import Recipe
from .smooth import ChannelObserver, TokenSample, smooth_dense_layer
from .smooth_mla import METHODS as MLA_METHODS, Smoothed, smooth_deepseek_base, stat_inputs

NORM_FEEDS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
# The first linear reading each input the smoothing needs statistics of.
STAT_INPUTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
               "down_in": "mlp.down_proj"}


def planned_tensors(recipe: Recipe, prefix: str, shapes: dict, hidden: int, dt: torch.dtype) -> list[tuple]:
    """(name, dtype, shape) of the tensors asymmetric smoothing creates in one layer (the shift
    belongs to the norm→linears subgraphs)."""
    if not recipe.anti_method or recipe.anti_symmetric or "norm-linear" not in recipe.enable_subgraph_type:
        return []
    out = [(f"{prefix}.{norm}.bias", torch.float32, (hidden,)) for norm in NORM_FEEDS]
    for linears in NORM_FEEDS.values():
        for sub in linears:
            name = f"{prefix}.{sub}"
            if f"{name}.bias" not in shapes:
                out.append((f"{name}.bias", dt, (shapes[f"{name}.weight"][0],)))
    return out


def channel_stats(layer: nn.Module, forward, H: torch.Tensor, batch: int, device, cdt,
                  inputs: dict[str, str] = STAT_INPUTS, outputs: dict[str, str] | None = None,
                  sample: int = 0) -> dict:
    """Per-channel statistics (one calibration pass over H) of the inputs and/or outputs of
    submodules, by key: `inputs`/`outputs` map key → submodule name. With sample > 0, also a
    TokenSample of at most that many tokens of each input, under "<key>/sample"."""
    return watched_stats(layer, lambda: run_batches(forward, H, batch, device, cdt, None), H.shape[0] * H.shape[1],
                         inputs, outputs, sample)


def watched_stats(layer: nn.Module, run, tokens: int, inputs: dict[str, str], outputs: dict[str, str] | None = None,
                  sample: int = 0) -> dict:
    """channel_stats while `run()` drives the calibration pass (`tokens` tokens in all)."""
    observers = {key: ChannelObserver() for key in [*inputs, *(outputs or {})]}
    samplers = {key: TokenSample(tokens, sample) for key in inputs} if sample else {}
    layer_sub = layer.get_submodule

    def on_input(key):
        watchers = [observers[key], *([samplers[key]] if key in samplers else [])]

        def hook(module, args):
            for w in watchers:
                w.update(args[0])
        return hook

    handles = [layer_sub(sub).register_forward_pre_hook(on_input(key)) for key, sub in inputs.items()]
    handles += [layer_sub(sub).register_forward_hook(lambda m, a, y, o=observers[key]: o.update(y))
                for key, sub in (outputs or {}).items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {**{key: o.stats() for key, o in observers.items()},
            **{f"{key}/sample": s.tensor() for key, s in samplers.items()}}


def consumer_acts(schemes: dict[str, str]) -> dict[str, str]:
    """Statistics key → how the linears reading that input quantize it (quant.schemes' `act`, or
    FLOAT_ACT); schemes maps submodule name → scheme."""
    return {key: SCHEMES[schemes[sub]].act if schemes[sub] in SCHEMES else FLOAT_ACT
            for key, sub in STAT_INPUTS.items()}


def smooth_layer(recipe: Recipe, layer: nn.Module, forward, H, batch: int, device, cdt,
                 schemes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Smooth in place; returns the new norm biases by norm name (and installs them). schemes:
    submodule name → the scheme the plan gives it (m6 measures its error with it; default: the
    recipe's default scheme everywhere)."""
    flex = recipe.anti_method == "m6"
    found = channel_stats(layer, forward, H, batch, device, cdt, sample=FLEX_TOKENS if flex else 0)
    stats = {key: found[key] for key in STAT_INPUTS}
    samples = {key: found[f"{key}/sample"] for key in STAT_INPUTS} if flex else None
    acts = consumer_acts(schemes or {sub: recipe.default.scheme for sub in STAT_INPUTS.values()})
    with torch.no_grad():
        biases = smooth_dense_layer(layer, stats, recipe.anti_method, recipe.alpha, recipe.anti_symmetric,
                                    samples, acts, recipe.enable_subgraph_type)
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


def check_deepseek(recipe: Recipe) -> None:
    """The smoothing options DeepSeek layers implement (smooth_mla: symmetric m1 and m4)."""
    if recipe.anti_method and recipe.anti_method not in MLA_METHODS:
        raise StreamqError(f"quant.anti_method = \"{recipe.anti_method}\" is not implemented for DeepSeek models",
                           "use anti_method = \"m4\" (iter-smooth) or \"m1\" (SmoothQuant)")
    if recipe.anti_method and not recipe.anti_symmetric:
        raise StreamqError("quant.anti_symmetric = false is not implemented for DeepSeek models (the shift would "
                           "give the MoE router a bias it does not have)", "remove anti_symmetric or set it to true")


def smooth_deepseek(recipe: Recipe, base: nn.Module, run, tokens: int,
                    routed_wmax: torch.Tensor | None) -> Smoothed:
    """One float pass of the base (`run()` drives it over every calibration row) for its input
    statistics, then the MLA chain and the MoE input fold, in place."""
    keys = stat_inputs(base)
    stats = watched_stats(base, run, tokens, keys)
    return smooth_deepseek_base(base, stats, recipe.anti_method, recipe.alpha, recipe.enable_subgraph_type,
                                routed_wmax)


def refreshed_modules(raw: dict, module: nn.Module, prefix: str, modules: list[str]) -> dict:
    """raw with the tensors of the given submodules as `module` now holds them (stored dtypes)."""
    out = dict(raw)
    for sub in dict.fromkeys(modules):
        for name, p in module.get_submodule(sub).state_dict().items():
            full = f"{prefix}.{sub}.{name}"
            out[full] = p.detach().cpu().to(raw[full].dtype)
    return out
