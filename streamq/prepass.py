"""disable_level: a float statistics pre-pass that picks the linears to keep FLOAT.

msModelSlim's `disable_level = "L<n>"` keeps float the n quantizable linears whose input has the
largest outlier ratio max|x| / std(x) over the calibration set. A streaming quantizer must know
every layer's ratio before it quantizes the first layer, so this pass runs the calibration tokens
through the float model once beforehand, reading each layer's weights once and keeping only
running sums per input (constant memory). Linears that read one input (q/k/v, gate/up) share its
ratio, and are also the fused modules whose shards must share one type (FORMAT.md §2): the choice
is therefore made in whole input groups, and may exceed n to complete the last group.

DeepSeek-V3/R1 layers run as the quantization run runs them (prepass_moe.py): one layer base
resident, the routed experts a chunk at a time. Routed experts are never chosen (candidates).

The choice enters the plan as extra disable_names, and the run state records it: a resumed run
(or a rerun of a finished one) adopts the recorded choice instead of repeating the pass, so a
resumption never depends on the pass giving bit-identical ratios twice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch.base import Step
from .arch.llama import DenseArch
from .checkpoint import CheckpointReader
from .layerquant import run_batches
from .outdir import REPORT, WORK
from .plan import ROUTED_EXPERT, Plan
from .recipe import Recipe

log = logging.getLogger("streamq")
IDENTITY = ("recipe", "input", "calibration")   # the state keys a recorded choice must match


class OutlierRatio:
    """max|x| / std(x) of one input over every calibration batch, streamed in float64: the count,
    Σx, Σx² and max|x| are all it keeps. std is the population deviation over all elements."""

    def __init__(self):
        self.n, self.s1, self.s2, self.amax = 0, 0.0, 0.0, 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.n += x.numel()
        self.s1 += float(x.sum(dtype=torch.float64))
        self.s2 += float(x.square().sum(dtype=torch.float64))
        self.amax = max(self.amax, float(x.abs().max()))

    def ratio(self) -> float:
        mean = self.s1 / self.n
        std = math.sqrt(max(self.s2 / self.n - mean * mean, 0.0))
        # a constant input quantizes exactly per tensor: nothing outlies
        return self.amax / std if std > 0 else 0.0


@dataclass
class Pass:
    """What the pre-pass needs, and the observers it fills: input id → (its linears, ratio)."""
    reader: CheckpointReader
    arch: object
    ids: torch.Tensor
    candidates: set[str]
    device: torch.device
    cdt: torch.dtype
    batch: int
    dt: torch.dtype
    budget_gb: float             # routed experts read per chunk (the run's expert_budget_gb)
    inputs: dict[str, tuple[list[str], OutlierRatio]] = dataclasses.field(default_factory=dict)

    def watch(self, step: Step) -> dict[str, OutlierRatio]:
        """One observer per input of the step's candidate linears, by the first linear reading it."""
        first = {}
        for name in step.linears:
            if name not in self.candidates:
                continue
            key = f"{step.key}:{step.groups.get(name, name)}"
            if key not in self.inputs:
                self.inputs[key] = ([], OutlierRatio())
                first[name] = self.inputs[key][1]
            self.inputs[key][0].append(name)
        return first


@contextmanager
def observed(module: torch.nn.Module, prefix: str, watched: dict[str, OutlierRatio]):
    """While inside, each watched linear (named `prefix.<submodule>`) feeds its input to its observer."""
    hooks = [module.get_submodule(name[len(prefix) + 1:]).register_forward_pre_hook(
        lambda m, a, o=obs: o.update(a[0])) for name, obs in watched.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _embed(p: Pass, step: Step, H):
    W = p.reader.load_float(["model.embed_tokens.weight"], p.dt)["model.embed_tokens.weight"]
    return W[p.ids].float()


def _layer(p: Pass, step: Step, H):
    layer = p.arch.build_layer(step, p.reader.load_float(list(step.shapes), p.dt), p.device, p.cdt)
    rotary = p.arch.rotary(H.shape[1], p.device, p.cdt)
    with observed(layer, f"model.layers.{step.index}", p.watch(step)), torch.no_grad():
        run_batches(lambda x: p.arch.layer_forward(layer, x, rotary), H, p.batch, p.device, p.cdt, H)
    return H


def _final(p: Pass, step: Step, H):
    watched = p.watch(step)
    if watched:   # lm_head reads the final norm's output
        norm = p.arch.final_norm(p.reader.load_float(["model.norm.weight"], p.dt)["model.norm.weight"].float())
        with torch.no_grad():
            for i in range(0, H.shape[0], p.batch):
                watched["lm_head"].update(norm(H[i:i + p.batch]))
    return H


PASSES = {"embed": _embed, "layer": _layer, "final": _final}


def candidates(plan: Plan) -> set[str]:
    """The linears disable_level may choose: quantized ones, except routed experts (all experts of
    a layer must share one type, and no single expert's input describes the others')."""
    return {n for n, a in plan.args.items() if a.scheme != "FLOAT" and ROUTED_EXPERT not in n}


def input_ratios(recipe: Recipe, reader: CheckpointReader, arch, plan: Plan, ids: torch.Tensor, device,
                 cdt: torch.dtype) -> list[tuple[float, list[str]]]:
    """The float pre-pass: (ratio, linears reading the input) for every input of a candidate."""
    p = Pass(reader, arch, ids, candidates(plan), device, cdt, recipe.run.batch_size, plan.model_dtype,
             recipe.run.expert_budget_gb)
    from .prepass_moe import MOE_PASSES   # here: that module builds on this one
    passes = PASSES if isinstance(arch, DenseArch) else MOE_PASSES
    H = None
    for step in plan.steps:
        H = passes[step.kind](p, step, H)
    return [(obs.ratio(), names) for names, obs in p.inputs.values()]


def choose(inputs: list[tuple[float, list[str]]], n: int) -> dict[str, float]:
    """Linear → ratio for the n linears of largest ratio, in whole input groups: inputs are taken
    in decreasing ratio (ties by name) until at least n linears are chosen."""
    chosen: dict[str, float] = {}
    for ratio, names in sorted(inputs, key=lambda t: (-t[0], t[1])):
        if len(chosen) >= n:
            break
        chosen.update({name: ratio for name in names})
    return chosen


def recorded_states(out_dir: Path) -> list[dict]:
    """The states an output folder records: an interrupted run's, then a finished run's."""
    found = []
    for path, key in ((Path(out_dir) / WORK / "state.json", None), (Path(out_dir) / REPORT, "state")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        doc = doc.get(key) if key and isinstance(doc, dict) else doc
        if isinstance(doc, dict):
            found.append(doc)
    return found


def adopt(recorded: list[dict], state: dict) -> dict | None:
    """The choice of a recorded run of the same recipe, input and calibration, if there is one."""
    for old in recorded:
        if all(old.get(k) == state[k] for k in IDENTITY) and isinstance(old.get("disable_level"), dict):
            return old["disable_level"]
    return None


def select(recipe: Recipe, reader: CheckpointReader, arch, plan: Plan, ids: torch.Tensor, device,
           cdt: torch.dtype, recorded: list[dict], state: dict) -> dict:
    """The recorded choice, else a fresh one: {"level": n, "linears": {name: ratio}}."""
    choice = adopt(recorded, state)
    if choice is None:
        chosen = choose(input_ratios(recipe, reader, arch, plan, ids, device, cdt), recipe.disable_level)
        choice = {"level": recipe.disable_level, "linears": chosen}
    for name, ratio in choice["linears"].items():
        log.info("disable_level L%d: %s stays FLOAT (input max|x|/std = %.1f)", choice["level"], name, ratio)
    return choice


def applied(recipe: Recipe, choice: dict) -> Recipe:
    """The recipe the plan is built from: the choice added to disable_names."""
    extra = tuple(n for n in choice["linears"] if n not in recipe.disable_names)
    return dataclasses.replace(recipe, disable_names=recipe.disable_names + extra)
