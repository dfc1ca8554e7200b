"""Input reader: a Hugging Face checkpoint folder, read lazily one tensor set at a time.

Headers are parsed by hand first so that every byte from disk is checked (bounded header size,
offsets inside the file, size = shape × dtype) and errors name the shard; tensors are then read
through safe_open's memory map, opened per step and closed again, so host memory holds one
layer, never the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import StreamqError
from .kernels.affine import dequant_fp8_blocks

MAX_HEADER_BYTES = 100 * 2**20

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8_SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict:
    """Parse and validate one safetensors header; errors name the file."""
    hint = f"the shard {path.name} is damaged: download or copy it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise StreamqError(f"{path}: truncated safetensors file ({size} bytes)", hint)
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise StreamqError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})", hint)
            header = json.loads(f.read(n))
    except OSError as exc:
        raise StreamqError(f"cannot read {path}: {exc.strerror}", "check the file permissions") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamqError(f"{path}: corrupt safetensors header (not JSON: {exc})", hint) from exc
    if not isinstance(header, dict):
        raise StreamqError(f"{path}: corrupt safetensors header (not an object)", hint)
    data_len = size - 8 - n
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_len, hint)
    return header


def _check_entry(path: Path, name: str, entry, data_len: int, hint: str) -> None:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        start, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StreamqError(f"{path}: tensor '{name}' has an unreadable or unsupported header entry", hint) from exc
    expected = math.prod(shape) * dtype.itemsize
    if end - start != expected or start < 0:
        raise StreamqError(f"{path}: tensor '{name}' spans {end - start} bytes, its shape {shape} needs {expected}", hint)
    if end > data_len:
        raise StreamqError(f"{path}: truncated: tensor '{name}' ends at byte {end} of a {data_len}-byte data section", hint)


class CheckpointReader:
    """Where every tensor of a checkpoint lives, and lazy loading of a set of them."""

    def __init__(self, model_dir: Path, index_name: str = "model.safetensors.index.json",
                 shard_prefix: str = ""):
        """A source checkpoint by default; index_name/shard_prefix select a streamq output instead."""
        self.dir = Path(model_dir)
        self.index_name, self.shard_prefix = index_name, shard_prefix
        if not (self.dir / "config.json").is_file():
            raise StreamqError(f"{self.dir}: no config.json", "point --model at a Hugging Face checkpoint folder")
        self.tensors: dict[str, TensorInfo] = {}
        self.files = self._shard_files()
        for path in self.files:
            for name, entry in read_header(path).items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise StreamqError(f"tensor '{name}' appears in both {self.tensors[name].file.name} and {path.name}",
                                       "remove the duplicate shard")
                self.tensors[name] = TensorInfo(name, path, DTYPES[entry["dtype"]], tuple(entry["shape"]))
        self._check_index()

    def _shard_files(self) -> list[Path]:
        index = self.dir / self.index_name
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise StreamqError(f"{index}: not a valid index (no weight_map)", "repair or delete the index") from exc
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise StreamqError(f"{index} names shard(s) that are missing: {', '.join(missing)}",
                                   "copy the missing shard(s) into the model folder")
            return [self.dir / n for n in names]
        self.weight_map = None
        files = sorted(p for p in self.dir.glob(self.shard_prefix + "*.safetensors")
                       if self.shard_prefix or not p.name.startswith("quant_model_weights"))
        if not files:
            raise StreamqError(f"{self.dir}: no *.safetensors shards", "point --model at a safetensors checkpoint")
        return files

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, file in self.weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise StreamqError(f"{self.index_name} maps '{name}' to {file}, which does not hold it",
                                   "regenerate the index or fix the shards")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise StreamqError(f"{self.dir}: tensor '{name}' is missing from the checkpoint",
                               "the checkpoint is incomplete or of another architecture")
        return self.tensors[name]

    def is_fp8(self, name: str) -> bool:
        return self.tensors[name].dtype == torch.float8_e4m3fn

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Raw tensors as stored (FP8 stays FP8), one file opened at a time."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.info(name).file, []).append(name)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in group:
                        out[name] = f.get_tensor(name).clone()
            except StreamqError:
                raise
            except Exception as exc:  # safetensors raises its own types; name the file either way
                raise StreamqError(f"{path}: cannot read tensors: {exc}", "the shard is damaged: copy it again") from exc
        return out

    def load_weight(self, name: str, out_dtype: torch.dtype) -> torch.Tensor:
        """One weight in a float dtype (FP8 dequantized with its 128×128 block scales)."""
        return self.load_float([name], out_dtype)[name]

    def load_float(self, names: list[str], out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors as stored, except FP8 weights, dequantized to out_dtype; every shard is opened
        once for the whole set (weights and their scales together)."""
        fp8 = [n for n in names if self.is_fp8(n)]
        for n in fp8:
            if n + FP8_SCALE_SUFFIX not in self.tensors:
                raise StreamqError(f"FP8 tensor '{n}' has no '{n + FP8_SCALE_SUFFIX}'",
                                   "the FP8 checkpoint is incomplete")
        raw = self.load(names + [n + FP8_SCALE_SUFFIX for n in fp8])
        for n in fp8:
            raw[n] = dequant_fp8_blocks(raw[n], raw.pop(n + FP8_SCALE_SUFFIX)).to(out_dtype)
        return raw

    def fingerprint(self) -> dict:
        """What identifies the input: config bytes, shard names, sizes and header hashes."""
        def header_hash(p: Path) -> str:
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                return hashlib.sha256(f.read(n)).hexdigest()[:16]
        return {
            "config.json": hashlib.sha256((self.dir / "config.json").read_bytes()).hexdigest()[:16],
            **{p.name: f"{p.stat().st_size}:{header_hash(p)}" for p in self.files},
        }
