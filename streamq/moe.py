"""Step functions for DeepSeek-V3/R1 layers: the layer "base" (attention, norms, router, shared
experts or dense MLP) once per layer, then the routed experts streamed in chunks.

A layer runs in two phases over the calibration states:
  base:    float pass (observing the base linears' inputs) → quantize base → quantized pass.
           Each pass keeps its MoE input x, the routing, and h1 + shared (the residual sum so far).
  experts: per chunk of experts (sized by a memory budget, read ahead as a unit): for each
           expert, add its float contribution to the float sum and its quantized contribution to
           the quantized sum, write its tensors and free them.
The attention of a batch is computed once per pass, never once per chunk. As in dense layers
(layerquant.plan_passes), a pass covers every calibration row only when it is propagated or
feeds statistics (the base's static ranges and Hessians come from the float pass, the experts'
Hessians from the quantized one); otherwise it covers the first batch, which rel_error compares.
With anti-outlier smoothing, a float pass over every row first collects the base's input
statistics and the base is smoothed in place (smoothing.smooth_deepseek); in a MoE layer the
routed experts' gate/up weights are read once beforehand, a chunk at a time, for their column
maxima, and each expert's gate/up columns are rescaled as it is loaded for the experts phase.
"""
from __future__ import annotations

import torch

from . import faults
from .arch.base import Step
from .layerquant import (needs_hessian, needs_statistics, observe_inputs, plan_passes, quantize_linears,
                         rel_error, static_inputs)
from .moe_float import EXPERT_TAG, add_expert, base_pass
from .moe_float import Side as BasePass
from .smooth_mla import Smoothed, scale_routed_expert
from .smoothing import refreshed_modules, smooth_deepseek
from .steps import Context, load_float, prefetch_float, read_float, write_outputs


def _is_expert(name: str) -> bool:
    return EXPERT_TAG in name


def _run_base(ctx: Context, base, inputs, shape, moe: bool, S: int) -> BasePass:
    """One pass of the base over calibration rows 0:S in batches; `inputs(i, j)` gives rows i:j."""
    _, L, h = shape
    return base_pass(ctx.arch, base, inputs, (S, L, h), ctx.rotary_for(L), ctx.recipe.run.batch_size, moe)


def _expert_chunks(ctx: Context, step: Step) -> list[list[int]]:
    """Experts per chunk, the unit read (and read ahead) from disk: as many as the budget holds
    in the compute dtype. Each expert then goes to the device alone."""
    c = ctx.arch.config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * torch.finfo(ctx.cdt).bits // 8
    return expert_chunks(c.n_routed_experts, per_expert, ctx.recipe.run.expert_budget_gb)


def expert_chunks(n_experts: int, expert_bytes: int, budget_gb: float) -> list[list[int]]:
    """Consecutive experts, as many per chunk as the budget holds (at least one)."""
    per = max(1, int(budget_gb * 1e9) // max(1, expert_bytes))
    return [list(range(a, min(a + per, n_experts))) for a in range(0, n_experts, per)]


def _add_expert(expert, p: BasePass, e: int, ctx: Context, accumulate: bool = True) -> int:
    """p.out += w · expert(x) for the tokens routed to e, in batches of the base pass's tokens
    (accumulate=False: just run them, for the observers); returns their count."""
    return add_expert(ctx.arch, p, expert, e, ctx.recipe.run.batch_size * ctx.ids.shape[1], ctx.device, ctx.cdt,
                      accumulate)


def _quantize_expert(ctx: Context, step: Step, expert, prefix: str, Q: BasePass, e: int) -> dict:
    """Routed experts are never static, so only GPTQ needs their inputs: the tokens the
    quantized model routes to this expert, run through it once more with observers."""
    args = {n: a for n, a in ctx.plan.args.items() if n.startswith(prefix + ".")}
    hessian = needs_hessian(args)
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    with observe_inputs(expert, prefix, step.groups, quantizable if hessian else [], hessian) as obs:
        if hessian:
            _add_expert(expert, Q, e, ctx, accumulate=False)
    return quantize_linears(expert, prefix, args, step.groups, obs, ctx.plan.model_dtype)


def _experts_phase(ctx: Context, step: Step, F: BasePass, Q: BasePass, rows: int,
                   routed: torch.Tensor | None) -> dict:
    """`rows`: the calibration rows; experts without tokens are counted on a pass over all of
    them, the float one when it covers them. `routed`: the smoothing scale of every expert's
    gate/up columns (None: not smoothed)."""
    i = step.index
    counted = F if F.out.shape[0] == rows else Q
    unrouted = []
    chunks = _expert_chunks(ctx, step)
    names_of = [[n for e in chunk for n in step.shapes if n.startswith(ctx.arch.expert_prefix(i, e) + ".")]
                for chunk in chunks]
    for c, chunk in enumerate(chunks):
        names = names_of[c]
        if c + 1 < len(chunks):
            prefetch_float(ctx, step, names_of[c + 1])
        raw = load_float(ctx, step, names)
        for e in chunk:
            prefix = ctx.arch.expert_prefix(i, e)
            if routed is not None:
                scale_routed_expert(raw, prefix, routed)
            own = [n for n in names if n.startswith(prefix + ".")]
            expert = ctx.arch.build_expert(i, e, raw, ctx.device, ctx.cdt)
            n_float = _add_expert(expert, F, e, ctx)
            quantized = _quantize_expert(ctx, step, expert, prefix, Q, e)
            n_quant = _add_expert(expert, Q, e, ctx)
            if (n_float if counted is F else n_quant) == 0:
                unrouted.append(e)
            # Written (in plan order: expert by expert) and released at once, so the host holds
            # one expert's quantized tensors, not a chunk's.
            write_outputs(ctx, step, raw, quantized, own)
            for n in own:
                del raw[n]
        faults.point("expert-chunk-written")
    return {"experts_without_tokens": unrouted}


def base_names(step: Step) -> list[str]:
    """The tensors of a layer other than its routed experts (all of them for a dense layer)."""
    return [n for n in step.shapes if not _is_expert(n)]


def _base_phase(ctx: Context, step: Step, make_inputs, shape, propagate: str):
    """`make_inputs(base)` returns `inputs(i, j)`: the base's input for calibration rows i:j.
    The pass named by `propagate` covers every row; the other too when it feeds statistics.
    Returns the float and quantized passes and the routed experts' smoothing scale (or None)."""
    names = base_names(step)
    raw = load_float(ctx, step, names)
    base = ctx.arch.build_base(step, raw, ctx.device, ctx.cdt)
    inputs = make_inputs(base)
    moe = ctx.arch.is_moe(step.index)
    prefix = f"model.layers.{step.index}"
    smoothed = _smooth_base(ctx, step, base, inputs, shape, moe) if ctx.recipe.anti_method else Smoothed()
    raw = refreshed_modules(raw, base, prefix, smoothed.modules)
    args = {n: a for n, a in ctx.plan.args.items() if n in step.linears and not _is_expert(n)
            and n in _submodules(base, prefix)}
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    experts = {n: a for n, a in ctx.plan.args.items() if n in step.linears and _is_expert(n)}
    p = plan_passes(shape[0], ctx.recipe.run.batch_size, propagate, needs_statistics(args),
                    bool(needs_hessian(experts)))
    # Without quantized base linears the quantized base is the float one: one pass serves both.
    f_rows = p.float_rows if quantizable else max(p.float_rows, p.quant_rows)
    with observe_inputs(base, prefix, step.groups, quantizable, needs_hessian(args), ctx.recipe.make_range,
                        static_inputs(args)) as obs:
        F = _run_base(ctx, base, inputs, shape, moe, f_rows)
    quantized = quantize_linears(base, prefix, args, step.groups, obs, ctx.plan.model_dtype)
    Q = _run_base(ctx, base, inputs, shape, moe, p.quant_rows) if quantized \
        else BasePass(F.out.clone(), F.x, F.idx, F.w)
    head = _mtp_head(ctx, step, raw)
    write_outputs(ctx, step, raw, {**quantized, **head}, names)
    return F, Q, smoothed.routed


def _smooth_base(ctx: Context, step: Step, base, inputs, shape, moe: bool) -> Smoothed:
    """Smooth the base in place from a float pass over every calibration row. The pass stops
    before the routed experts: the statistics it needs are all inputs of the base."""
    arch, (S, L, _), b = ctx.arch, shape, ctx.recipe.run.batch_size
    rotary = ctx.rotary_for(L)

    def run():
        for i in range(0, S, b):
            x = arch.mlp_input(base, arch.attn_block(base, inputs(i, min(i + b, S)), rotary))
            (arch.shared if moe else arch.dense_mlp)(base, x)
    wmax = _routed_wmax(ctx, step) if moe and "norm-linear" in ctx.recipe.enable_subgraph_type else None
    return smooth_deepseek(ctx.recipe, base, run, S * L, wmax)


def _routed_wmax(ctx: Context, step: Step) -> torch.Tensor:
    """max|W| per input channel over every routed expert's gate/up, read a chunk at a time. The
    MoE input's scale must cover them before the base is quantized, while the experts phase comes
    after it: this reads two thirds of the experts' weights once more."""
    wmax = None
    for chunk in _expert_chunks(ctx, step):
        names = [f"{ctx.arch.expert_prefix(step.index, e)}.{proj}.weight" for e in chunk
                 for proj in ("gate_proj", "up_proj")]
        for W in read_float(ctx, names).values():
            m = W.abs().amax(0).float()
            wmax = m if wmax is None else torch.maximum(wmax, m)
    return wmax


def _submodules(base, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n, _ in base.named_modules() if n}


def _mtp_head(ctx: Context, step: Step, raw: dict) -> dict:
    """The MTP shared_head.head, quantized data-free when a rule asks for it (it is written with
    the base, before the experts that feed it have run)."""
    name = f"model.layers.{step.index}.shared_head.head"
    a = ctx.plan.args.get(name)
    if step.kind != "mtp" or a is None or a.scheme == "FLOAT":
        return {}
    head = torch.nn.Linear(1, 1, bias=False)
    head.weight = torch.nn.Parameter(raw[name + ".weight"].float(), requires_grad=False)
    q = quantize_linears(torch.nn.ModuleDict({"head": head}), "", {"head": a}, {}, {}, ctx.plan.model_dtype)
    return {name: q["head"]}


def _finish(ctx: Context, F: BasePass, Q: BasePass, propagate: str):
    """The propagated states, and rel_error over the first calibration batch."""
    b = ctx.recipe.run.batch_size
    return (F.out if propagate == "float" else Q.out), rel_error(Q.out[:b], F.out[:b])


def step_deepseek_layer(ctx: Context, step: Step, H):
    propagate = ctx.recipe.run.propagate
    F, Q, routed = _base_phase(ctx, step, lambda base: lambda i, j: H[i:j].to(ctx.device, ctx.cdt),
                               tuple(H.shape), propagate)
    stats = _experts_phase(ctx, step, F, Q, H.shape[0], routed) if ctx.arch.is_moe(step.index) else {}
    H_next, err = _finish(ctx, F, Q, propagate)
    return H_next, {**stats, "rel_error": err}


def _mtp_sources(ctx: Context, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model's final-normed states at t (t < L-1) and the embeddings of token t+1."""
    own_embed = f"model.layers.{step.index}.embed_tokens.weight"
    names = [n for n in ("model.norm.weight", "model.embed_tokens.weight", own_embed) if n in ctx.reader]
    src = ctx.reader.load(names)
    embed = src.get(own_embed, src["model.embed_tokens.weight"]).float()
    norm = ctx.arch.final_norm(src["model.norm.weight"].float())
    return norm, embed


def step_mtp(ctx: Context, step: Step, H):
    """The MTP layer's output feeds nothing else here, so the main states H pass through unchanged."""
    norm, embed = _mtp_sources(ctx, step)
    with torch.no_grad():
        h_main = norm(H[:, :-1])
    next_embeds = embed[ctx.ids[:, 1:]]

    def make_inputs(base):
        return lambda i, j: ctx.arch.mtp_input(base, h_main[i:j].to(ctx.device, ctx.cdt),
                                               next_embeds[i:j].to(ctx.device, ctx.cdt))
    # Nothing is propagated, but the float pass still covers every row so that the report's
    # experts_without_tokens counts all calibration tokens.
    F, Q, routed = _base_phase(ctx, step, make_inputs, tuple(h_main.shape), "float")
    stats = _experts_phase(ctx, step, F, Q, h_main.shape[0], routed)
    _, err = _finish(ctx, F, Q, "float")
    return H, {**stats, "rel_error": err}


MOE_STEP_FNS = {"layer": step_deepseek_layer, "mtp": step_mtp}
