"""The plan: every output tensor (name, dtype, shape, type) and the shard it lands in, decided
before any weight is read. Shard headers can then be written up front and tensors streamed
into them as layers finish; resumption truncates a shard back to a planned offset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .arch.base import Step
from .checkpoint import FP8_SCALE_SUFFIX, CheckpointReader
from .errors import StreamqError
from .quant.schemes import SCHEMES, specs_for
from .recipe import QuantArgs, Recipe
from .kvcache import planned_tensors as kv_tensors
from .smoothing import planned_tensors as smoothing_tensors

ROUTED_EXPERT = ".mlp.experts."
STATIC_SCHEMES = ("W8A8", "W8A8_MIX", "W8A8S")
SHARD_NAME = "quant_model_weights-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "quant_model_weights.safetensors.index.json"
DESCRIPTION_NAME = "quant_model_description.json"

# model_quant_type is the highest-priority type present (FORMAT.md §2). W4A8_DYNAMIC is never
# reported: it counts as W8A8_DYNAMIC, which MindIE requires for the DeepSeek W4A8 mix.
# W8A8S is not in FORMAT.md's list: it is W8A8 with other weight values, so it ranks with W8A8
# (verify.RANK accepts either). Placed last, it wins the tie: an output with W8A8S linears reports
# "W8A8S", as msModelSlim's sparse checkpoints do.
TYPE_PRIORITY = ["FLOAT", "W8A16", "W4A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "W8A8S"]
REPORTED_AS = {"W4A8_DYNAMIC": "W8A8_DYNAMIC", "C8": "FLOAT"}


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    qtype: str          # description type
    source: str         # source tensor it derives from
    suffix: str = ""    # scheme tensor suffix ("" = the source tensor written as is)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    outputs: dict[str, tuple[OutTensor, ...]]          # step key → its output tensors, in write order
    shards: tuple[tuple[OutTensor, ...], ...]           # tensors of each shard, in write order
    args: dict[str, QuantArgs]                          # linear → its quantization
    model_dtype: torch.dtype
    dropped_mtp: bool = False                           # the source has an MTP layer the recipe drops

    def shard_names(self) -> list[str]:
        return [SHARD_NAME.format(i + 1, len(self.shards)) for i in range(len(self.shards))]

    def description(self) -> dict:
        types = {t.name: t.qtype for ts in self.outputs.values() for t in ts}
        present = {REPORTED_AS.get(t, t) for t in types.values()}
        # A DeepSeek W4A8 mix reports W8A8_DYNAMIC even beside static W8A8 MLA (MindIE requires it).
        top = "W8A8_DYNAMIC" if "W4A8_DYNAMIC" in types.values() else max(present, key=TYPE_PRIORITY.index)
        kv = {"kv_cache_type": "C8", "kv_quant_type": "C8"} if "C8" in types.values() else {}
        return {"version": "1.0.0", "model_quant_type": top, "group_size": self.group_size(), **kv,
                "metadata": {}, **types}

    def config_extra(self, recipe: Recipe) -> dict:
        """Keys the output config.json gains: the recipe's, made true to what was written."""
        extra = dict(recipe.config_extra)
        mtp = [s for s in self.steps if s.kind == "mtp"]
        if not mtp:
            extra.pop("mtp_quantize", None)
            if self.dropped_mtp:
                extra["num_nextn_predict_layers"] = 0
        elif all(self.args.get(n, QuantArgs("FLOAT")).scheme == "FLOAT" for n in mtp[0].linears):
            extra.pop("mtp_quantize", None)
        return extra

    def group_size(self) -> int:
        sizes = {a.group_size for a in self.args.values() if a.scheme in ("W4A16", "W4A8_DYNAMIC")}
        return sizes.pop() if sizes else 0


def model_dtype(config, reader: CheckpointReader) -> torch.dtype:
    name = str(getattr(config, "dtype", None) or "").replace("torch.", "")
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name in table:
        return table[name]
    embed = reader.info("model.embed_tokens.weight").dtype
    return embed if embed in table.values() else torch.bfloat16


def _outputs_of(step: Step, recipe: Recipe, reader: CheckpointReader, dt: torch.dtype, args: dict) -> list[OutTensor]:
    out = []
    linears = set(step.linears)
    for name in step.shapes:
        module = name.rsplit(".", 1)[0]
        stored = reader.info(name).dtype
        float_dtype = dt if stored == torch.float8_e4m3fn else stored
        if not (name.endswith(".weight") and module in linears):
            out.append(OutTensor(name, float_dtype, step.shapes[name], "FLOAT", name))
            continue
        a = recipe.args_for(module, is_last_linear=(module == "lm_head"),
                            mtp_index=step.index if step.kind == "mtp" else None)
        if step.kind == "mtp" and recipe.mtp == "float":
            a = dataclasses.replace(a, scheme="FLOAT")
        if ROUTED_EXPERT in module and a.scheme in STATIC_SCHEMES:
            raise StreamqError(f"{module}: routed experts cannot use static {a.scheme} (tokens reach an expert "
                               "unevenly, so there is no per-tensor range to calibrate)",
                               "use W8A8_DYNAMIC or W4A8_DYNAMIC for experts")
        args[module] = a
        if a.scheme == "FLOAT":
            out.append(OutTensor(name, float_dtype, step.shapes[name], "FLOAT", name))
            continue
        if a.scheme not in SCHEMES:
            raise StreamqError(f"scheme {a.scheme} (for {module}) is not implemented in this version",
                               "choose another scheme for this module in the recipe")
        n, k = step.shapes[name]
        SCHEMES[a.scheme].check(module, n, k, a)
        out += [OutTensor(f"{module}.{suffix}", sdt, shape, a.scheme, name, suffix)
                for suffix, sdt, shape in specs_for(module, n, k, a, dt)]
    return out


def _created_outputs(step: Step, recipe: Recipe, dt: torch.dtype) -> list[OutTensor]:
    """Tensors a dense layer gains that the source does not have: smoothing biases, C8 params."""
    if step.kind != "layer" or f"model.layers.{step.index}.input_layernorm.weight" not in step.shapes:
        return []
    prefix = f"model.layers.{step.index}"
    hidden = step.shapes[f"{prefix}.input_layernorm.weight"][0]
    out = [OutTensor(name, sdt, shape, "FLOAT", name)
           for name, sdt, shape in smoothing_tensors(recipe, prefix, step.shapes, hidden, dt)]
    if recipe.use_kvcache_quant:
        out += [OutTensor(name, sdt, shape, "C8", name) for name, sdt, shape in kv_tensors(prefix, step.shapes, dt)]
    return out


def _check_groups(args: dict[str, QuantArgs]) -> None:
    sizes = {a.group_size for a in args.values() if a.scheme in ("W4A16", "W4A8_DYNAMIC")}
    if len(sizes) > 1:
        raise StreamqError(f"the recipe mixes group sizes {sorted(sizes)}; the description holds one group_size",
                           "use one group_size for all per-group linears")


def _assign_shards(tensors: list[OutTensor], max_bytes: int) -> list[tuple[OutTensor, ...]]:
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_bytes:
            shards.append(tuple(current))
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(tuple(current))
    return shards


def build_plan(recipe: Recipe, steps: list[Step], reader: CheckpointReader, dt: torch.dtype) -> Plan:
    args: dict[str, QuantArgs] = {}
    _check_unclaimed(steps, reader)
    kept = [s for s in steps if not (s.kind == "mtp" and recipe.mtp == "drop")]
    dropped, steps = len(kept) < len(steps), kept
    outputs = {s.key: tuple(_outputs_of(s, recipe, reader, dt, args) + _created_outputs(s, recipe, dt))
               for s in steps}
    _check_groups(args)
    ordered = [t for s in steps for t in outputs[s.key]]
    shards = _assign_shards(ordered, int(recipe.shard_size_gb * 1e9))
    return Plan(tuple(steps), outputs, tuple(shards), args, dt, dropped)


IGNORED_SUFFIXES = (FP8_SCALE_SUFFIX, "rotary_emb.inv_freq")


def _check_unclaimed(steps: list[Step], reader: CheckpointReader) -> None:
    claimed = {n for s in steps for n in s.shapes}
    extra = sorted(n for n in reader.tensors if n not in claimed and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise StreamqError(f"the checkpoint holds tensors this architecture does not use: {shown}",
                           "check that config.json matches the shards (e.g. num_hidden_layers)")
