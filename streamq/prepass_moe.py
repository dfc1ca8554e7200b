"""disable_level's float pre-pass through DeepSeek-V3/R1 layers, streamed as the quantization run
streams them: a layer's base (attention, norms, router, shared experts or dense MLP) is loaded
alone and run over every calibration row with its candidate linears observed; then the routed
experts, as many per chunk as `expert_budget_gb` holds, add their outputs to give the next
layer's input. Routed experts are not candidates, so nothing observes them.

The MTP layer is included, its input built as the run builds it (moe.step_mtp): the main model's
final-normed states at t and the embedding of token t+1. Its output feeds only its own
shared_head.head, so its routed experts run only when that head is a candidate.
"""
from __future__ import annotations

import math

import torch

from .arch.base import Step
from .moe import base_names, expert_chunks
from .moe_float import Side, add_expert, base_pass, expert_sources, routed
from .prepass import PASSES, Pass, observed


def layer(p: Pass, step: Step, H: torch.Tensor) -> torch.Tensor:
    """Observes a decoder layer; returns its float output, the next layer's input."""
    return _block(p, step, lambda base: lambda i, j: H[i:j].to(p.device, p.cdt), tuple(H.shape))


def mtp(p: Pass, step: Step, H: torch.Tensor) -> torch.Tensor:
    """Observes the MTP layer; the main model's states H pass through unchanged."""
    if not p.candidates.intersection(step.linears):
        return H
    own = f"model.layers.{step.index}.embed_tokens.weight"   # R1 stores a copy of the embedding there
    embed = own if own in p.reader else "model.embed_tokens.weight"
    src = p.reader.load_float(["model.norm.weight", embed], p.dt)
    next_embeds = src[embed][p.ids[:, 1:]].float()
    with torch.no_grad():
        h_main = p.arch.final_norm(src["model.norm.weight"].float())(H[:, :-1])

    def make_inputs(base):
        return lambda i, j: p.arch.mtp_input(base, h_main[i:j].to(p.device, p.cdt),
                                             next_embeds[i:j].to(p.device, p.cdt))
    _block(p, step, make_inputs, tuple(h_main.shape))
    return H


def _block(p: Pass, step: Step, make_inputs, shape: tuple) -> torch.Tensor:
    """The layer's float output over calibration rows of `shape`; `make_inputs(base)` gives
    `inputs(i, j)`, the base's input for rows i:j on the device."""
    prefix, moe = f"model.layers.{step.index}", p.arch.is_moe(step.index)
    watched = p.watch(step)
    head = watched.pop(f"{prefix}.shared_head.head", None)   # the MTP head reads the layer's output
    base = p.arch.build_base(step, p.reader.load_float(base_names(step), p.dt), p.device, p.cdt)
    rotary = p.arch.rotary(shape[1], p.device, p.cdt)
    with observed(base, prefix, watched):
        side = base_pass(p.arch, base, make_inputs(base), shape, rotary, p.batch, moe)
    norm = base.shared_head.norm if head else None
    del base
    if moe and (step.kind == "layer" or head):
        _routed_experts(p, step, side)
    if head:
        with torch.no_grad():
            for i in range(0, shape[0], p.batch):
                head.update(norm(side.out[i:i + p.batch].to(p.device, p.cdt)))
    return side.out


def _routed_experts(p: Pass, step: Step, side: Side) -> None:
    """side.out += each routed expert's weighted output, read a chunk at a time (host bytes in the
    model dtype, FP8 dequantized as the run reads it); one chunk is resident at a time."""
    sources = expert_sources(step, p.arch.config.n_routed_experts)
    per_expert = sum(math.prod(step.shapes[n]) for n in sources[0]) * p.dt.itemsize
    tokens_per_batch = p.batch * side.out.shape[1]
    for chunk in expert_chunks(len(sources), per_expert, p.budget_gb):
        raw = p.reader.load_float([n for e in chunk for n in sources[e]], p.dt)
        for e in chunk:
            if routed(side, e):
                expert = p.arch.build_expert(step.index, e, raw, p.device, p.cdt)
                add_expert(p.arch, side, expert, e, tokens_per_batch, p.device, p.cdt)
        del raw   # before the next chunk is read


MOE_PASSES = {**PASSES, "layer": layer, "mtp": mtp}
