"""`streamq verify`: check an output folder against the ascendV1 contract (FORMAT.md).

The consumers (vLLM-Ascend, MindIE) check almost nothing: a missing scale loads as
uninitialised memory, a wrong dtype is cast silently, an extra tensor raises KeyError deep in a
model loader. So every tensor's presence, dtype, shape and, for scales and offsets, values is
checked here, and each violation names the file and the tensor or key at fault.

Shard headers are read through safe_open (memory-mapped; no tensor data is read). Values are
loaded one tensor at a time, and only for tensors whose values carry a rule.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

SINGLE_SHARD = "quant_model_weights.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
CONFIG = "config.json"
SHARD_NAME = "quant_model_weights-{:05d}-of-{:05d}.safetensors"
SHARD_RE = re.compile(r"quant_model_weights-(\d{5})-of-(\d{5})\.safetensors")
# vLLM loads only the shards a `model.safetensors.index.json` names, so a copied source index
# hides the quantized shards; without one it loads every *.safetensors, so stray shards load too.
SOURCE_INDEX = "model.safetensors.index.json"

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"BF16", "F16", "F32"}
# config.json dtype spellings -> safetensors dtype names
MODEL_DTYPES = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
                "float32": "F32", "fp32": "F32", "float": "F32"}

TYPES = {"FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC", "W8A8S", "C8"}
GLOBAL_KEYS = ("version", "model_quant_type", "group_size", "metadata")
KV_KEYS = ("kv_cache_type", "kv_quant_type")
# model_quant_type is the highest-ranked type present (FORMAT §2); types of equal rank are
# interchangeable there. W4A8_DYNAMIC is reported as W8A8_DYNAMIC (MindIE requires it), and C8
# is a KV-cache type, so it takes no part.
RANK = {"FLOAT": 0, "W8A16": 1, "W4A16": 1, "W8A8_DYNAMIC": 2, "W8A8_MIX": 3, "W8A8": 4, "W8A8S": 4}
REPORTED_AS = {"W4A8_DYNAMIC": "W8A8_DYNAMIC"}

# --- value rules: each returns what is wrong with a tensor, or None ------------------------------

Rule = Callable[[torch.Tensor], "str | None"]


def finite(t: torch.Tensor) -> str | None:
    return None if torch.isfinite(t.float()).all() else "holds non-finite values"


def positive(t: torch.Tensor) -> str | None:
    return finite(t) or (None if (t.float() > 0).all() else "holds values <= 0; scales must be > 0")


def zeros(t: torch.Tensor) -> str | None:
    # Weights are symmetric: consumers ignore weight offsets, so non-zero ones mean a wrong Ŵ.
    return None if (t == 0).all() else "holds non-zero values; weight offsets must be zeros"


def int8_offset(t: torch.Tensor) -> str | None:
    t = t.float()
    bad = finite(t) or (None if (t == t.round()).all() else "is not integer-valued")
    return bad or (None if ((t >= -128) & (t <= 127)).all() else "lies outside [-128, 127]")


def integer_scale(t: torch.Tensor) -> str | None:
    # q4 · s2 must be an exact int8, hence integer s2 >= 1.
    t = t.float()
    bad = finite(t) or (None if (t == t.round()).all() else "is not integer-valued")
    return bad or (None if (t >= 1).all() else "holds values < 1")


def deq_scale(t: torch.Tensor) -> str | None:
    # fp16 models store the fp32 bit pattern widened to int64 (FORMAT §3): decode before checking.
    return positive(t.to(torch.int32).view(torch.float32) if t.dtype == torch.int64 else t)


def int8_symmetric(t: torch.Tensor) -> str | None:
    return None if (t >= -127).all() else "holds -128; int8 weights are symmetric in [-127, 127]"


def int4_within_7(t: torch.Tensor) -> str | None:
    # A nibble 0b1000 is -8, outside the two-level range [-7, 7].
    eight = ((t & 0xF) == 8) | (((t >> 4) & 0xF) == 8)
    return "holds the int4 value -8; two-level weights lie in [-7, 7]" if eight.any() else None


# Rules that read whole weights (most of the checkpoint): skipped when scan_weights is False.
WEIGHT_RULES = {int8_symmetric, int4_within_7}

# --- tensor tables (FORMAT §3) -------------------------------------------------------------------
# (suffix, dtype, shape, value rule). dtype is a safetensors name, or MODEL (the model dtype) or
# DEQ (float32 for bf16 models, int64 for fp16). Shape symbols: n, k of the float weight [n, k];
# n/2 for int4 rows packed in pairs; g = k / G; sb = scale_bias columns (16 for down/o, else 1).
MODEL, DEQ = "model dtype", "deq dtype"
DEQ_DTYPES = {"BF16": "F32", "F16": "I64", "F32": "F32"}

_INT8 = (("weight", "I8", ("n", "k"), int8_symmetric),
         ("weight_scale", MODEL, ("n", 1), positive),
         ("weight_offset", MODEL, ("n", 1), zeros))
_STATIC = (("input_scale", MODEL, (1,), positive),
           ("input_offset", MODEL, (1,), int8_offset),
           ("deq_scale", DEQ, ("n",), deq_scale),
           ("quant_bias", "I32", ("n",), None))

SCHEMES = {
    "W8A16": _INT8,
    "W8A8_DYNAMIC": _INT8,
    "W8A8": _INT8 + _STATIC,
    "W8A8S": _INT8 + _STATIC,
    "W8A8_MIX": _INT8 + _STATIC,
    "W4A16": (("weight", "I8", ("n/2", "k"), None),
              ("weight_scale", "F32", ("n", "g"), positive),
              ("weight_offset", "F32", ("n", "g"), finite)),  # asymmetric allowed here
    "W4A8_DYNAMIC/per-channel": (("weight", "I8", ("n/2", "k"), None),   # q4 in [-8, 7]: any nibble
                                 ("weight_scale", "F32", ("n", 1), positive),
                                 ("weight_offset", "F32", ("n", 1), zeros),
                                 ("scale_bias", "F32", ("n", "sb"), finite)),
    "W4A8_DYNAMIC/two-level": (("weight", "I8", ("n/2", "k"), int4_within_7),
                               ("weight_scale", "F32", ("n", 1), positive),
                               ("weight_offset", "F32", ("n", 1), zeros),
                               ("weight_scale_second", "F32", ("n", "g"), integer_scale),
                               ("weight_offset_second", "I64", ("n", "g"), zeros),
                               ("scale_bias", "F32", ("n", "sb"), finite)),
}
KV_CACHE = (("kv_cache_scale", MODEL, ("n",), positive), ("kv_cache_offset", MODEL, ("n",), finite))

LINEAR_SUFFIXES = {spec[0] for specs in SCHEMES.values() for spec in specs} | {"bias"}
PACKED_TYPES = {key.split("/")[0] for key, specs in SCHEMES.items()
                if ("weight", "I8", ("n/2", "k")) in [spec[:3] for spec in specs]}
ROW_PARALLEL = ("down_proj", "o_proj")
# Linears that consumers fuse into one module: they must carry one type and, when static, share
# one activation (scale, offset) since they read the same input.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
EXPERT_RE = re.compile(r"(.*\.experts)\.\d+\.[^.]+")


@dataclass(frozen=True)
class Dims:
    n: int
    k: int
    group_size: int      # the description's; 0 = per channel
    row_parallel: bool   # down_proj / o_proj

    @property
    def G(self) -> int:
        return self.group_size or self.k

    def shape(self, symbols: tuple) -> tuple[int, ...]:
        values = {"n": self.n, "k": self.k, "n/2": self.n // 2, "g": self.k // max(self.G, 1),
                  "sb": 16 if self.row_parallel else 1}
        return tuple(values.get(s, s) for s in symbols)


# Requirements on a linear's dimensions beyond its tensor shapes (FORMAT §3).
_N8 = (lambda d: d.n % 8 == 0, "an output dimension divisible by 8 (the consumer views int4 pairs as int32)")
_K16 = (lambda d: not d.row_parallel or d.k % 16 == 0, "an input dimension divisible by 16 (down_proj/o_proj)")
REQUIRES = {
    "W4A16": ((lambda d: d.k % d.G == 0, "group_size to divide the input dimension"),),
    "W4A8_DYNAMIC/two-level": ((lambda d: d.group_size > 0, "a description group_size > 0"),
                               (lambda d: d.k % d.G == 0, "group_size to divide the input dimension"),
                               _N8, _K16),
    "W4A8_DYNAMIC/per-channel": ((lambda d: d.group_size == 0, "group_size 0 in the description"), _N8, _K16),
}


def scheme_key(qtype: str, suffixes) -> str:
    """The SCHEMES key of a linear: W4A8_DYNAMIC comes in two forms, told apart by `*_second`."""
    if qtype != "W4A8_DYNAMIC":
        return qtype
    two_level = "weight_scale_second" in suffixes or "weight_offset_second" in suffixes
    return "W4A8_DYNAMIC/two-level" if two_level else "W4A8_DYNAMIC/per-channel"


# --- reading the folder --------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorMeta:
    file: str
    dtype: str                # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class Output:
    dir: Path
    shards: list[str]
    tensors: dict[str, TensorMeta]
    description: dict
    types: dict[str, str]     # the description's per-tensor entries
    config: dict
    dtype: str                # model dtype, safetensors name

    def where(self, name: str) -> str:
        meta = self.tensors.get(name)
        return f"{meta.file}: {name}" if meta else name


def read_json(path: Path, problems: list[str]):
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: not readable JSON ({exc})")
        return None


def shard_files(out_dir: Path, problems: list[str]) -> list[str]:
    """The weight shards, in order; the layout and stray weight files are checked on the way."""
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    numbered = {name: m for name in names if (m := SHARD_RE.fullmatch(name))}
    single = SINGLE_SHARD in names
    for name in names:
        ours = name in numbered or name == SINGLE_SHARD
        if (name.endswith(".safetensors") and not ours) or name == SOURCE_INDEX:
            problems.append(f"{name}: stray weight file in the output folder; consumers would load it, remove it")
    if single and numbered:
        problems.append(f"{SINGLE_SHARD}: present next to numbered shards; keep one layout")
    if not single and not numbered:
        problems.append(f"{out_dir}: no {SINGLE_SHARD} or {SHARD_NAME.format(1, 1)}-style shards")
    counts = {int(m[2]) for m in numbered.values()}
    if len(counts) > 1:
        problems.append(f"numbered shards disagree on their count: -of-{sorted(counts)}")
    elif counts:
        total = counts.pop()
        for i in range(1, total + 1):
            if SHARD_NAME.format(i, total) not in numbered:
                problems.append(f"{SHARD_NAME.format(i, total)}: missing")
        for name, m in numbered.items():
            if not 1 <= int(m[1]) <= total:
                problems.append(f"{name}: shard number outside 1..{total}")
    return ([SINGLE_SHARD] if single else []) + sorted(numbered)


def read_headers(out_dir: Path, shards: list[str], problems: list[str]) -> tuple[dict[str, TensorMeta], bool]:
    """Every tensor's file, dtype and shape; False when a shard cannot be read."""
    tensors: dict[str, TensorMeta] = {}
    readable = True
    for shard in shards:
        try:
            with safe_open(out_dir / shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in tensors:
                        problems.append(f"{shard}: {name}: also in {tensors[name].file}; a tensor lives in one shard")
                    tensors[name] = TensorMeta(shard, sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own error type for damaged files
            problems.append(f"{shard}: not a readable safetensors file ({exc}); the shard is damaged or "
                            "truncated, rerun the quantization")
            readable = False
    return tensors, readable


def model_dtype(config) -> str:
    """The model dtype from config.json (`torch_dtype` or `dtype`, also inside `text_config`); bf16 if unset."""
    configs = [config, config.get("text_config")] if isinstance(config, dict) else []
    for c in configs:
        for key in ("torch_dtype", "dtype"):
            if isinstance(c, dict) and isinstance(c.get(key), str):
                name = c[key].replace("torch.", "")
                if name in MODEL_DTYPES:
                    return MODEL_DTYPES[name]
    return "BF16"


# --- checks --------------------------------------------------------------------------------------

def check_config(config, problems: list[str]) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        problems.append(f"{CONFIG}: not a JSON object")
        return
    # A leftover quantization_config makes vLLM pick the source's quantization method, not `ascend`.
    if "quantization_config" in config:
        problems.append(f"{CONFIG}: quantization_config present at top level; remove it")
    if isinstance(config.get("text_config"), dict) and "quantization_config" in config["text_config"]:
        problems.append(f"{CONFIG}: quantization_config present inside text_config; remove it")


def check_globals(description: dict, problems: list[str]) -> None:
    if description.get("version") != "1.0.0":
        problems.append(f"{DESCRIPTION}: version is {description.get('version')!r}, expected '1.0.0'")
    if "model_quant_type" not in description:
        problems.append(f"{DESCRIPTION}: model_quant_type missing")
    group = description.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        problems.append(f"{DESCRIPTION}: group_size is {group!r}, expected an integer >= 0 (0 = per channel)")
    if not isinstance(description.get("metadata"), dict):
        problems.append(f"{DESCRIPTION}: metadata is {description.get('metadata')!r}, expected an object")


def check_index(out: Output, problems: list[str]) -> None:
    present = (out.dir / INDEX).is_file()
    if out.shards == [SINGLE_SHARD]:
        if present:
            problems.append(f"{INDEX}: present with the single-shard layout {SINGLE_SHARD}; remove it")
        return
    index = read_json(out.dir / INDEX, problems) if out.shards else None
    if index is None:
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        problems.append(f"{INDEX}: weight_map missing or not an object")
        return
    for name, file in weight_map.items():
        if name not in out.tensors:
            problems.append(f"{INDEX}: weight_map names {name} in {file}, but no shard holds it")
        elif out.tensors[name].file != file:
            problems.append(f"{INDEX}: weight_map puts {name} in {file}, but it is in {out.tensors[name].file}")
    for name in out.tensors:
        if name not in weight_map:
            problems.append(f"{INDEX}: weight_map lacks {name} (in {out.tensors[name].file})")
    total = sum(t.nbytes for t in out.tensors.values())
    metadata = index.get("metadata")
    stated = metadata.get("total_size") if isinstance(metadata, dict) else None
    if stated != total:
        problems.append(f"{INDEX}: metadata.total_size is {stated!r}, the shards hold {total} tensor bytes")


def check_coverage(out: Output, problems: list[str]) -> None:
    """One description entry per tensor, one tensor per entry, and only known types."""
    for name in out.tensors:
        if name not in out.types:
            problems.append(f"{out.where(name)}: no entry in {DESCRIPTION}; consumers pick schemes from it")
    for key, qtype in out.types.items():
        if key not in out.tensors:
            problems.append(f"{DESCRIPTION}: entry {key} names no tensor in the shards")
        if qtype not in TYPES:
            problems.append(f"{DESCRIPTION}: {key} has type {qtype}, expected one of {sorted(TYPES)}")


def check_model_quant_type(out: Output, problems: list[str]) -> None:
    present = {REPORTED_AS.get(t, t) for t in out.types.values() if t in RANK or t in REPORTED_AS}
    if not present or "model_quant_type" not in out.description:
        return
    top = max(RANK[t] for t in present)
    allowed = sorted(t for t in present if RANK[t] == top)
    if "W4A8_DYNAMIC" in out.types.values():
        allowed = ["W8A8_DYNAMIC"]  # the DeepSeek W4A8 mix: MindIE requires W8A8_DYNAMIC (FORMAT §2, §5)
    got = out.description.get("model_quant_type")
    if got not in allowed:
        problems.append(f"{DESCRIPTION}: model_quant_type is {got!r}; the types present make it "
                        + " or ".join(repr(a) for a in allowed))


def group_linears(tensors) -> dict[str, dict[str, str]]:
    """prefix -> {suffix: tensor name}, for every tensor named `<prefix>.<linear suffix>`."""
    groups: dict[str, dict[str, str]] = {}
    for name in tensors:
        prefix, _, suffix = name.rpartition(".")
        if suffix in LINEAR_SUFFIXES:
            groups.setdefault(prefix, {})[suffix] = name
    return groups


def out_features(out: Output, prefix: str) -> int | None:
    """n of the float weight [n, k], undoing int4 row packing."""
    weight = out.tensors.get(f"{prefix}.weight")
    if weight is None or len(weight.shape) != 2:
        return None
    return weight.shape[0] * (2 if out.types.get(f"{prefix}.weight") in PACKED_TYPES else 1)


def check_tensor(out: Output, name: str, dtype: str, shape: tuple, dims: Dims, why: str,
                 problems: list[str]) -> bool:
    """Dtype and shape of one tensor against its table row; True when both match."""
    meta = out.tensors[name]
    want_dtype = {MODEL: out.dtype, DEQ: DEQ_DTYPES[out.dtype]}.get(dtype, dtype)
    want_shape = dims.shape(shape)
    ok = True
    if meta.dtype != want_dtype:
        problems.append(f"{out.where(name)}: dtype {meta.dtype}, expected {want_dtype} ({why}, model dtype "
                        f"{out.dtype}); consumers cast silently")
        ok = False
    if meta.shape != want_shape:
        problems.append(f"{out.where(name)}: shape {list(meta.shape)}, expected {list(want_shape)} ({why})")
        ok = False
    return ok


def linear_scheme(out: Output, prefix: str, members: dict[str, str], problems: list[str]) -> str | None:
    """The SCHEMES key of a quantized linear; None for FLOAT ones (and for types reported elsewhere)."""
    quant = sorted(set(members) - {"weight", "bias"})
    qtype = out.types.get(members.get("weight", ""))
    if "weight" not in members or qtype in (None, "FLOAT"):
        if quant:
            problems.append(f"{prefix}: quantization tensors {quant} without a quantized {prefix}.weight; "
                            "remove them or type the weight")
        return None
    key = scheme_key(qtype, members)
    return key if key in SCHEMES else None  # C8 or unknown types: check_kv_cache / check_coverage


def check_linear_set(out: Output, prefix: str, members: dict[str, str], key: str, problems: list[str]) -> None:
    """One type for the whole linear (a bias is FLOAT), and exactly the tensors of its scheme."""
    qtype = out.types[members["weight"]]
    for suffix, name in members.items():
        want = "FLOAT" if suffix == "bias" else qtype
        if out.types.get(name, want) != want:
            problems.append(f"{out.where(name)}: type {out.types[name]}, expected {want}: all tensors of "
                            f"{prefix} carry its type (a bias is FLOAT)")
    expected = {spec[0] for spec in SCHEMES[key]}
    for suffix in sorted(set(members) - expected - {"bias"}):
        problems.append(f"{out.where(members[suffix])}: unexpected for a {key} linear; consumers fail on extra tensors")
    for suffix in sorted(expected - set(members)):
        problems.append(f"{prefix}.{suffix}: missing ({key} linear {prefix} needs it; it would load as "
                        "uninitialised memory)")


def check_linear_shapes(out: Output, prefix: str, members: dict[str, str], key: str,
                        problems: list[str]) -> dict[str, Rule]:
    """Dimensions, dtypes and shapes; returns the value rules of the tensors that match."""
    weight = out.tensors[members["weight"]]
    if len(weight.shape) != 2:
        problems.append(f"{out.where(members['weight'])}: shape {list(weight.shape)}, expected 2-D")
        return {}
    group = out.description.get("group_size")
    dims = Dims(out_features(out, prefix), weight.shape[1], group if isinstance(group, int) else 0,
                prefix.endswith(ROW_PARALLEL))
    for holds, need in REQUIRES.get(key, ()):
        if not holds(dims):
            problems.append(f"{prefix}: {key} needs {need} (n={dims.n}, k={dims.k}, group_size={dims.group_size})")
    rules = {}
    for suffix, dtype, shape, rule in SCHEMES[key]:
        name = members.get(suffix)
        if name and check_tensor(out, name, dtype, shape, dims, key, problems) and rule:
            rules[name] = rule
    bias = out.tensors.get(f"{prefix}.bias")
    if bias and bias.shape != (dims.n,):
        problems.append(f"{out.where(prefix + '.bias')}: shape {list(bias.shape)}, expected [{dims.n}]")
    return rules


def check_linear(out: Output, prefix: str, members: dict[str, str], problems: list[str]) -> dict[str, Rule]:
    """Type, tensor set, dtypes and shapes of one linear; returns the value rules of its tensors."""
    key = linear_scheme(out, prefix, members, problems)
    if key is None:
        return {}
    check_linear_set(out, prefix, members, key, problems)
    return check_linear_shapes(out, prefix, members, key, problems)


def check_fused(out: Output, groups: dict, problems: list[str]) -> dict[str, list[str]]:
    """Fused shards carry one type; returns parent -> member prefixes, for the activation check."""
    fused: dict[tuple[str, int], list[str]] = {}
    for prefix in sorted(groups):
        parent, _, leaf = prefix.rpartition(".")
        for i, members in enumerate(FUSED):
            if leaf in members and f"{prefix}.weight" in out.tensors:
                fused.setdefault((parent, i), []).append(prefix)
    for (parent, _), prefixes in fused.items():
        types = {p: out.types.get(f"{p}.weight") for p in prefixes}
        if len(set(types.values())) > 1:
            shown = ", ".join(f"{p.rpartition('.')[2]}={t}" for p, t in types.items())
            problems.append(f"{parent}: fused shards carry different types ({shown}); consumers need one type")
    return {f"{parent} ({'/'.join(FUSED[i])})": ps for (parent, i), ps in fused.items() if len(ps) > 1}


def check_experts(out: Output, groups: dict, problems: list[str]) -> None:
    layers: dict[str, dict[str, list[str]]] = {}
    for prefix in groups:
        m = EXPERT_RE.fullmatch(prefix)
        if m and f"{prefix}.weight" in out.tensors:
            qtype = str(out.types.get(f"{prefix}.weight"))
            layers.setdefault(m[1], {}).setdefault(qtype, []).append(prefix)
    for experts, by_type in sorted(layers.items()):
        if len(by_type) > 1:
            shown = "; ".join(f"{t}: {len(ps)} linears (e.g. {sorted(ps)[0]})" for t, ps in sorted(by_type.items()))
            problems.append(f"{experts}: routed experts carry different types ({shown}); consumers need one")


def check_kv_cache(out: Output, problems: list[str]) -> dict[str, Rule]:
    """C8 tensors: per attention, k/v kv_cache_scale/offset, 1-D over the projection outputs."""
    specs = {spec[0]: spec for spec in KV_CACHE}
    kv = [name for name in out.tensors if name.rpartition(".")[2] in specs]
    for name, qtype in out.types.items():
        if qtype == "C8" and name.rpartition(".")[2] not in specs:
            problems.append(f"{out.where(name)}: type C8 belongs to kv_cache_scale/kv_cache_offset tensors only")
    rules, attentions = {}, set()
    for name in kv:
        proj, _, suffix = name.rpartition(".")
        parent, _, leaf = proj.rpartition(".")
        if leaf not in ("k_proj", "v_proj"):
            problems.append(f"{out.where(name)}: KV-cache tensors belong to k_proj or v_proj")
            continue
        attentions.add(parent)
        if out.types.get(name, "C8") != "C8":
            problems.append(f"{out.where(name)}: type {out.types[name]}, expected C8")
        have = out.tensors[name].shape
        n = out_features(out, proj) or (have[0] if have else 0)
        dims = Dims(n, 0, 0, False)
        _, dtype, shape, rule = specs[suffix]
        if check_tensor(out, name, dtype, shape, dims, "C8 KV cache", problems):
            rules[name] = rule
    for parent in sorted(attentions):
        for proj in ("k_proj", "v_proj"):
            for suffix in specs:
                if f"{parent}.{proj}.{suffix}" not in out.tensors:
                    problems.append(f"{parent}.{proj}.{suffix}: missing (C8 needs k and v scale and offset)")
    for key in KV_KEYS:
        if kv and out.description.get(key) != "C8":
            problems.append(f"{DESCRIPTION}: {key} is {out.description.get(key)!r}; KV-cache tensors exist, expected 'C8'")
        if not kv and key in out.description:
            problems.append(f"{DESCRIPTION}: {key} is set but no kv_cache_scale/kv_cache_offset tensor exists")
    return rules


def check_float_tensors(out: Output, problems: list[str]) -> None:
    for name, meta in out.tensors.items():
        qtype = out.types.get(name)
        if qtype == "FLOAT" and meta.dtype not in FLOAT_DTYPES:
            problems.append(f"{out.where(name)}: FLOAT tensor of dtype {meta.dtype}, expected BF16, F16 or F32")
        if "norm.bias" in name and (qtype != "FLOAT" or len(meta.shape) != 1):
            problems.append(f"{out.where(name)}: a norm bias is FLOAT and 1-D (has {qtype}, {list(meta.shape)})")
        if name.endswith("_scale_inv"):
            problems.append(f"{out.where(name)}: an FP8 source scale; the output never holds one")


def check_values(out: Output, rules: dict[str, Rule], scan_weights: bool,
                 problems: list[str]) -> dict[str, torch.Tensor]:
    """Apply the value rules, one tensor in memory at a time; returns the activation scales/offsets."""
    by_shard: dict[str, list[str]] = {}
    for name, rule in rules.items():
        if scan_weights or rule not in WEIGHT_RULES:
            by_shard.setdefault(out.tensors[name].file, []).append(name)
    activations = {}
    for shard, names in sorted(by_shard.items()):
        try:
            with safe_open(out.dir / shard, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    wrong = rules[name](t)
                    if wrong:
                        problems.append(f"{shard}: {name}: {wrong}")
                    if name.endswith((".input_scale", ".input_offset")):
                        activations[name] = t
        except Exception as exc:  # a shard whose data cannot be read is a violation, not a crash
            problems.append(f"{shard}: tensor data not readable ({exc})")
    return activations


def check_shared_activation(fused: dict[str, list[str]], activations: dict, problems: list[str]) -> None:
    """Static fused shards read one input, so they share one (input_scale, input_offset)."""
    for group, prefixes in sorted(fused.items()):
        for suffix in ("input_scale", "input_offset"):
            values = [activations.get(f"{p}.{suffix}") for p in prefixes]
            if all(v is not None for v in values) and any(not torch.equal(values[0], v) for v in values[1:]):
                shown = ", ".join(f"{p.rpartition('.')[2]}={v.float().tolist()}" for p, v in zip(prefixes, values))
                problems.append(f"{group}: {suffix} differs across fused shards ({shown}); they must share one")


# --- entry points --------------------------------------------------------------------------------

def _check(out_dir: Path, scan_weights: bool = True) -> tuple[list[str], Output | None]:
    problems: list[str] = []
    if not out_dir.is_dir():
        return [f"{out_dir}: output folder does not exist"], None
    shards = shard_files(out_dir, problems)
    tensors, readable = read_headers(out_dir, shards, problems)
    config = read_json(out_dir / CONFIG, problems)
    check_config(config, problems)
    description = read_json(out_dir / DESCRIPTION, problems)
    if description is not None and not isinstance(description, dict):
        problems.append(f"{DESCRIPTION}: not a JSON object")
        description = None
    if description is not None:
        check_globals(description, problems)
    if not readable or description is None:
        return problems, None  # the remaining checks need every tensor and type
    # Non-string entries are kept as their repr, so that every check may treat types as strings.
    types = {k: v if isinstance(v, str) else repr(v) for k, v in description.items()
             if k not in GLOBAL_KEYS + KV_KEYS}
    out = Output(out_dir, shards, tensors, description, types, config if isinstance(config, dict) else {},
                 model_dtype(config))
    check_index(out, problems)
    check_coverage(out, problems)
    check_model_quant_type(out, problems)
    groups = group_linears(tensors)
    rules: dict[str, Rule] = {}
    for prefix, members in sorted(groups.items()):
        rules.update(check_linear(out, prefix, members, problems))
    rules.update(check_kv_cache(out, problems))
    fused = check_fused(out, groups, problems)
    check_experts(out, groups, problems)
    check_float_tensors(out, problems)
    activations = check_values(out, rules, scan_weights, problems)
    check_shared_activation(fused, activations, problems)
    return problems, out


def verify(out_dir: Path, *, scan_weights: bool = True) -> list[str]:
    """Every violation of the output contract in out_dir (empty = valid).

    scan_weights=False skips the range checks that read whole int8/int4 weights, leaving a check
    that reads headers and the small scale/offset tensors only.
    """
    return _check(Path(out_dir), scan_weights)[0]


MAX_PRINTED = 200


def main_verify(out_dir, *, scan_weights: bool = True) -> int:
    problems, out = _check(Path(out_dir), scan_weights)
    if not problems:
        print(f"OK: {len(out.tensors)} tensors, {len(out.shards)} shards, "
              f"model_quant_type={out.description.get('model_quant_type')}")
        return 0
    for p in problems[:MAX_PRINTED]:
        print(p)
    if len(problems) > MAX_PRINTED:
        print(f"... and {len(problems) - MAX_PRINTED} more")
    print(f"{len(problems)} violation{'s' if len(problems) != 1 else ''} in {out_dir}")
    return 1
