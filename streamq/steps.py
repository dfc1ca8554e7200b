"""Step functions for dense models: the embedding, a decoder layer, the final norm and lm_head.

Each loads its source tensors, computes, and writes its output tensors in planned order; the
pipeline commits after it returns. `Context` is what a step may touch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import faults, kvcache
from .arch.base import Step
from .checkpoint import CheckpointReader
from .errors import StreamqError
from .layerquant import observe_and_quantize, process_layer
from .plan import Plan
from .prefetch import Prefetcher
from .recipe import Recipe
from .shards import ShardWriter
from .smoothing import refreshed, smooth_layer


@dataclass
class Context:
    recipe: Recipe
    reader: CheckpointReader
    arch: object
    plan: Plan
    writer: ShardWriter
    device: torch.device
    cdt: torch.dtype
    ids: torch.Tensor
    prefetch: Prefetcher = field(default_factory=lambda: Prefetcher(False))
    rotaries: dict = field(default_factory=dict)

    def rotary_for(self, seq_len: int):
        """Position embeddings for a sequence length, computed once per run."""
        if seq_len not in self.rotaries:
            self.rotaries[seq_len] = self.arch.rotary(seq_len, self.device, self.cdt)
        return self.rotaries[seq_len]


def load_float(ctx: Context, step: Step, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Source tensors of the step (all, or `names`) as stored, FP8 dequantized, checked finite;
    taken from the read-ahead when it already loaded them."""
    names = list(step.shapes) if names is None else names
    return ctx.prefetch.take((step.key, tuple(names)), lambda: read_float(ctx, names))


def prefetch_float(ctx: Context, step: Step, names: list[str]) -> None:
    """Start reading what a later `load_float(ctx, step, names)` will ask for."""
    ctx.prefetch.submit((step.key, tuple(names)), lambda: read_float(ctx, names))


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() without its full-size boolean temporary: NaN and ±inf reach the
    extremes (aminmax propagates NaN), so the two extremes decide."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def read_float(ctx: Context, names: list[str]) -> dict[str, torch.Tensor]:
    r = ctx.reader
    tensors = r.load_float(names, ctx.plan.model_dtype)
    for n, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise StreamqError(f"tensor '{n}' in {r.info(n).file} contains NaN or Inf values",
                               "the checkpoint is damaged or was saved after a diverged training run")
    return tensors


def write_outputs(ctx: Context, step: Step, raw: dict[str, torch.Tensor], quantized: dict,
                  sources: list[str] | None = None) -> None:
    """The step's output tensors (those derived from `sources`, or all) in planned order."""
    wanted = None if sources is None else set(sources)
    for t in ctx.plan.outputs[step.key]:
        if wanted is not None and t.source not in wanted:
            continue
        if t.suffix:
            value = quantized[t.source.rsplit(".", 1)[0]].tensors[t.suffix]
        else:
            value = raw[t.source].to(t.dtype)
        ctx.writer.write(t.name, value)


def step_embed(ctx: Context, step: Step, H):
    raw = load_float(ctx, step)
    write_outputs(ctx, step, raw, {})
    return raw["model.embed_tokens.weight"][ctx.ids].float(), {}


def step_layer(ctx: Context, step: Step, H):
    raw = load_float(ctx, step)
    layer = ctx.arch.build_layer(step, raw, ctx.device, ctx.cdt)
    rotary = ctx.rotary_for(H.shape[1])
    prefix = f"model.layers.{step.index}"
    forward = lambda x: ctx.arch.layer_forward(layer, x, rotary)  # noqa: E731
    if ctx.recipe.anti_method:
        schemes = {n[len(prefix) + 1:]: ctx.plan.args[n].scheme for n in step.linears}
        biases = smooth_layer(ctx.recipe, layer, forward, H, ctx.recipe.run.batch_size, ctx.device, ctx.cdt,
                              schemes)
        raw = refreshed(raw, layer, prefix, biases)
    if ctx.recipe.use_kvcache_quant:
        raw = {**raw, **kvcache.calibrate(layer, forward, H, ctx.recipe.run.batch_size, ctx.device, ctx.cdt, prefix,
                                          ctx.plan.model_dtype)}
    args = {n: ctx.plan.args[n] for n in step.linears}
    res = process_layer(layer, prefix, forward, H, args, step.groups, ctx.plan.model_dtype,
                        ctx.recipe.run.batch_size, ctx.device, ctx.cdt, ctx.recipe.run.propagate,
                        ctx.recipe.make_range)
    faults.point("layer-computed")
    write_outputs(ctx, step, raw, res.quantized)
    return H, {"rel_error": res.rel_error}  # measured on the first calibration batch


def step_final(ctx: Context, step: Step, H):
    raw = load_float(ctx, step)
    quantized = {}
    if "lm_head" in step.linears and ctx.plan.args["lm_head"].scheme != "FLOAT":
        norm = ctx.arch.final_norm(raw["model.norm.weight"].float())
        head = torch.nn.Linear(H.shape[-1], raw["lm_head.weight"].shape[0], bias=False)
        head.weight.data = raw["lm_head.weight"].float()
        with torch.no_grad():
            X = norm(H)
        # lm_head's input is the final norm's output; the logits themselves are not kept.
        quantized = observe_and_quantize(torch.nn.ModuleDict({"lm_head": head}), "", head, X,
                                         {"lm_head": ctx.plan.args["lm_head"]}, {}, ctx.plan.model_dtype,
                                         ctx.recipe.run.batch_size, "cpu", torch.float32,
                                         make_range=ctx.recipe.make_range)
    write_outputs(ctx, step, raw, quantized)
    return H, {}


STEP_FNS = {"embed": step_embed, "layer": step_layer, "final": step_final}
