"""Peak host memory of a run, estimated from the plan before any weight is read.

    peak RSS ≈ floor + the largest of the moments below, over every step

A step computes in units: a layer (a MoE layer: its base, then each routed expert). A unit holds
throughout: its source tensors as read (`weights`; FP8 dequantized to the model dtype), the
calibration hidden states (`hidden`: fp32 [samples, seq_len, hidden] × the copies its step
function keeps, HIDDEN_COPIES), what the read-ahead thread has read for later (`read_ahead`) and
output bytes queued for the shard writer beyond its own (`write_behind`). On top of that, at
three moments:
  read      reads under way: the mapped shard pages and copies of a read (`work`, see
            _read_peak), and the module built in the compute dtype
  quantize  one linear at a time on the host (`work`: its fp32 W, two fp32 temporaries, q; GPTQ's
            Hessians), with the Ŵ and quantized tensors of the linears before it
  forward   the quantized pass: every Ŵ and quantized tensor, and one calibration batch through the
            layer (`work`)
The module lives in host memory only on device "cpu"; `.to()` of a tensor already in the compute
dtype is the tensor itself, so the module then costs only the Ŵ installed in quantized linears.
All terms are bytes; `Estimate.parts` names them for the moment that sets the peak.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .arch.base import Step
from .plan import Plan
from .recipe import Recipe

# Peak RSS of `streamq run` on a tiny model (2 layers, hidden 64): the interpreter, everything a run
# imports (torch, transformers), torch's first-use allocations and the worker threads. Measured on
# x86_64 Linux, Python 3.11, torch 2.13 CPU: 367.2-367.7 MB on five runs, less the 0.7 MB this
# estimate gives the tiny model's own terms:
#   .venv/bin/python -m streamq synth llama --out /tmp/tiny --layers 2 --hidden 64 --vocab 128
#   .venv/bin/python -m streamq run recipes/w8a8_dynamic.toml --model /tmp/tiny --output /tmp/tiny-q \
#       --device cpu --samples 4 --seq-len 16        # then peak_rss_bytes in streamq_report.json
# The imports alone (`python -c "import streamq.cli, streamq.pipeline"`) peak at 334 MiB.
FLOOR_BYTES = 366_500_000

# fp32 [S, L, h] copies of the calibration states a unit keeps: dense layer H and Y_float
# (layerquant.process_layer); DeepSeek base H, F.out, Q.out, and for a MoE layer F.x and Q.x
# (moe._run_base); the MTP layer adds h_main and next_embeds; embed H0 and its gather; final H,
# and norm(H) when lm_head is quantized.
HIDDEN_COPIES = {"embed": 2, "layer": 2, "dense_base": 3, "moe_base": 5, "mtp": 7, "final": 1, "final_q": 2}
# One batch through a decoder layer holds about tokens × 4 B × (4·widest + 10·hidden): measured on a
# Llama layer (hidden 1024, intermediate 2816): 41 MiB for 4×128 tokens, 10.5 MiB for 1×128.
BATCH_WIDEST, BATCH_HIDDEN = 4, 10
EXPERT_TAG = ".mlp.experts."


@dataclass(frozen=True)
class Knobs:
    """What the estimate needs from the recipe, the device and the model."""
    dt: torch.dtype          # model dtype (what FP8 is dequantized to)
    cdt: torch.dtype         # compute dtype
    on_host: bool            # the device is the CPU: modules live in host memory
    hidden: int              # hidden size
    hidden_bytes: int        # one fp32 copy of the calibration states
    batch_tokens: int        # tokens per forward batch
    read_ahead: bool
    write_behind: int        # bytes
    expert_budget: int       # bytes of compute-dtype expert weights per chunk
    smooth_experts: bool = False   # DeepSeek smoothing of the MoE input reads the experts' gate/up first


@dataclass(frozen=True)
class Estimate:
    moment: str              # e.g. "layer.3 quantize" or "layer.3 experts forward"
    parts: dict[str, int]    # floor and the terms of that moment, bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {"bytes": self.total, "moment": self.moment, "parts": dict(self.parts)}


def _numel(reader, n: str) -> int:
    return math.prod(reader.info(n).shape)


def _fp8(reader, n: str) -> bool:
    return reader.info(n).dtype == torch.float8_e4m3fn


def _loaded(reader, names, k: Knobs) -> int:
    """Bytes of source tensors once read: FP8 weights dequantized to the model dtype."""
    return sum(_numel(reader, n) * (k.dt.itemsize if _fp8(reader, n) else reader.info(n).dtype.itemsize)
               for n in names)


def _read_peak(reader, names, k: Knobs) -> int:
    """Bytes held at the peak of CheckpointReader.load_float(names): the shard's pages stay mapped
    (resident) until it closes, beside the copies kept, and the largest tensor is briefly there a
    third time (safe_open's own copy, before the clone that outlives the file); then each FP8
    weight, in order, is dequantized through fp32 (w.float(), the expanded scale, their product:
    12 B per element) beside its FP8 copy, and replaces it in the model dtype."""
    sizes = [_numel(reader, n) * reader.info(n).dtype.itemsize for n in names]
    held = sum(sizes)
    peak = 2 * held + max(sizes, default=0)
    for n in names:
        if _fp8(reader, n):
            peak = max(peak, held + 12 * _numel(reader, n))
            held += _numel(reader, n) * (k.dt.itemsize - 1)
    return peak


def _moments(unit: str, held: dict, read_work: int, linears: list[tuple], module0: int, batch: int) -> list:
    """read / quantize / forward of one unit. `linears`: per quantized linear, in quantization
    order, (its scratch, the module bytes its Ŵ adds, its output bytes)."""
    moments = [(f"{unit} read", {**held, "module": module0, "work": read_work})]
    module, outputs, worst = module0, 0, None
    for scratch, added, out in linears:
        at = {**held, "module": module, "outputs": outputs, "work": scratch}
        worst = at if worst is None or sum(at.values()) > sum(worst.values()) else worst
        module, outputs = module + added, outputs + out
    if worst is not None:
        moments.append((f"{unit} quantize", worst))
    moments.append((f"{unit} forward", {**held, "module": module, "outputs": outputs, "work": batch}))
    return moments


def _linears(plan: Plan, step: Step, reader, names: list[str], k: Knobs) -> list[tuple]:
    """(scratch, Ŵ bytes added, output bytes) of each quantized linear among `names`."""
    wanted = [n for n in step.linears
              if n + ".weight" in names and n in plan.args and plan.args[n].scheme != "FLOAT"]
    gptq = {step.groups.get(n, n): reader.info(n + ".weight").shape[1] for n in wanted
            if plan.args[n].w_method == "gptq"}
    hessians = sum(4 * d * d for d in gptq.values())
    copy = 0 if (k.on_host and k.cdt == torch.float32) else 4  # W.float(): a copy unless fp32 already
    out = []
    for n in wanted:
        numel, d = _numel(reader, n + ".weight"), reader.info(n + ".weight").shape[1]
        scratch = numel * (copy + 4 + 4 + 1) + hessians + (8 * d * d if plan.args[n].w_method == "gptq" else 0)
        added = numel * k.cdt.itemsize if (k.on_host and k.cdt == k.dt) else 0
        outputs = sum(t.nbytes for t in plan.outputs[step.key] if t.suffix and t.source == n + ".weight")
        out.append((scratch, added, outputs))
    return out


def _unit(plan, reader, step: Step, names: list[str], k: Knobs, unit: str, held: dict, read_work: int) -> list:
    module0 = sum(_numel(reader, n) for n in names) * k.cdt.itemsize if (k.on_host and k.cdt != k.dt) else 0
    widest = max((reader.info(n).shape[0] for n in names if n.endswith(".weight") and n[:-7] in step.linears),
                 default=0)
    batch = k.batch_tokens * 4 * (BATCH_WIDEST * widest + BATCH_HIDDEN * k.hidden) if widest else 0
    return _moments(unit, held, read_work, _linears(plan, step, reader, names, k), module0, batch)


def _layer(plan, reader, step: Step, names: list[str], k: Knobs, copies: int, nxt: list[str], extra: int = 0):
    """A layer, or a MoE layer's base: its tensors were read ahead (unless read_ahead is off), and
    it reads the next step's while it computes."""
    own, ahead = _loaded(reader, names, k), _loaded(reader, nxt, k) if k.read_ahead else 0
    held = {"weights": own + extra, "hidden": copies * k.hidden_bytes, "read_ahead": ahead}
    reading = _read_peak(reader, nxt, k) - ahead if k.read_ahead else _read_peak(reader, names, k) - own
    return _unit(plan, reader, step, names, k, step.key, held, reading)


def _chunking(reader, arch, step: Step, k: Knobs) -> tuple[int, list[str], int]:
    """(experts, expert 0's tensors, experts per chunk) as moe._expert_chunks: as many experts as
    expert_budget_gb holds in the compute dtype."""
    E, prefix = arch.config.n_routed_experts, arch.expert_prefix(step.index, 0) + "."
    own = [n for n in step.shapes if n.startswith(prefix)]
    return E, own, min(E, max(1, k.expert_budget // (sum(_numel(reader, n) for n in own) * k.cdt.itemsize)))


def _experts(plan, reader, arch, step: Step, k: Knobs, nxt: list[str]) -> list:
    """One routed expert, its chunk held (chunks as moe._expert_chunks: as many experts as
    expert_budget_gb holds in the compute dtype) and the next chunk being read."""
    E, own, chunk = _chunking(reader, arch, step, k)
    first = [n for n in step.shapes if EXPERT_TAG in n and int(n.split(EXPERT_TAG)[1].split(".")[0]) < chunk]
    loaded, reading = _loaded(reader, first, k), _read_peak(reader, first, k)
    # At most every other expert's outputs wait in the writer's queue.
    first_expert = arch.expert_prefix(step.index, 0) + "."
    queued = sum(t.nbytes for t in plan.outputs[step.key]
                 if t.suffix and EXPERT_TAG in t.source and not t.source.startswith(first_expert))
    held = {"weights": loaded, "hidden": HIDDEN_COPIES["moe_base"] * k.hidden_bytes,
            "read_ahead": (_loaded(reader, nxt, k) + (reading if chunk < E else 0)) if k.read_ahead else 0,
            "write_behind": min(k.write_behind, queued)}
    return _unit(plan, reader, step, own, k, step.key + " experts", held, reading - loaded)


def _edge(plan, reader, step: Step, k: Knobs, nxt: list[str]) -> list:
    """The embedding (read in the step itself, the first one) and the final norm + lm_head, which
    runs in fp32 on the host when lm_head is quantized (steps.step_final)."""
    names = list(step.shapes)
    if step.kind == "embed":
        held = {"weights": _read_peak(reader, names, k), "hidden": HIDDEN_COPIES["embed"] * k.hidden_bytes,
                "read_ahead": _read_peak(reader, nxt, k) if k.read_ahead else 0}
        return [("embed read", held)]
    if not any(n in plan.args and plan.args[n].scheme != "FLOAT" for n in step.linears):
        own = _loaded(reader, names, k) if k.read_ahead else _read_peak(reader, names, k)
        return [("final read", {"weights": own, "hidden": HIDDEN_COPIES["final"] * k.hidden_bytes})]
    host = dataclasses.replace(k, cdt=torch.float32, on_host=True)
    return _layer(plan, reader, step, names, host, HIDDEN_COPIES["final_q"], [])


def _base(step: Step) -> list[str]:
    return [n for n in step.shapes if EXPERT_TAG not in n]


def _step_moments(plan: Plan, reader, arch, i: int, k: Knobs) -> list:
    step = plan.steps[i]
    nxt = _base(plan.steps[i + 1]) if i + 1 < len(plan.steps) else []
    if step.kind in ("embed", "final"):
        return _edge(plan, reader, step, k, nxt)
    moe = getattr(arch, "is_moe", None)
    if moe is None:
        return _layer(plan, reader, step, list(step.shapes), k, HIDDEN_COPIES["layer"], nxt)
    kind = "mtp" if step.kind == "mtp" else "moe_base" if moe(step.index) else "dense_base"
    # moe._mtp_sources reads the main embedding and makes it fp32.
    extra = _loaded(reader, ["model.embed_tokens.weight"], k) * (1 + 4 // k.dt.itemsize) if kind == "mtp" else 0
    moments = _layer(plan, reader, step, _base(step), k, HIDDEN_COPIES[kind], nxt, extra)
    if moe(step.index) and k.smooth_experts:
        moments.append(_smoothing_read(reader, arch, step, k, nxt))
    return moments + (_experts(plan, reader, arch, step, k, nxt) if moe(step.index) else [])


def _smoothing_read(reader, arch, step: Step, k: Knobs, nxt: list[str]) -> tuple[str, dict]:
    """moe._routed_wmax: before the base is quantized, the routed experts' gate/up are read a chunk
    at a time (chunks as moe._expert_chunks) for their column maxima, beside the base."""
    _, _, chunk = _chunking(reader, arch, step, k)
    gate_up = [f"{arch.expert_prefix(step.index, e)}.{p}.weight"
               for e in range(chunk) for p in ("gate_proj", "up_proj")]
    held = {"weights": _loaded(reader, _base(step), k), "hidden": HIDDEN_COPIES["moe_base"] * k.hidden_bytes,
            "read_ahead": _loaded(reader, nxt, k) if k.read_ahead else 0,
            "smoothing_read": _read_peak(reader, gate_up, k)}
    return (step.key + " smoothing read", held)


def knobs(recipe: Recipe, plan: Plan, hidden: int, on_host: bool) -> Knobs:
    cal, run = recipe.calibration, recipe.run
    cdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[run.compute_dtype]
    return Knobs(dt=plan.model_dtype, cdt=cdt, on_host=on_host, hidden=hidden,
                 hidden_bytes=cal.samples * cal.seq_len * hidden * 4,
                 batch_tokens=min(run.batch_size, cal.samples) * cal.seq_len, read_ahead=run.read_ahead,
                 write_behind=int(run.write_behind_gb * 1e9), expert_budget=int(run.expert_budget_gb * 1e9),
                 smooth_experts=bool(recipe.anti_method) and "norm-linear" in recipe.enable_subgraph_type)


def moments(recipe: Recipe, plan: Plan, reader, arch, on_host: bool) -> list[tuple[str, dict]]:
    """Every moment of the run, in order, as (name, its terms in bytes) without the floor."""
    k = knobs(recipe, plan, arch.config.hidden_size, on_host)
    return [m for i in range(len(plan.steps)) for m in _step_moments(plan, reader, arch, i, k)]


def estimate_peak_rss(recipe: Recipe, plan: Plan, reader, arch, on_host: bool) -> Estimate:
    """The floor plus the largest moment of the run."""
    name, parts = max(moments(recipe, plan, reader, arch, on_host), key=lambda m: sum(m[1].values()))
    return Estimate(name, {"floor": FLOOR_BYTES, **parts})
