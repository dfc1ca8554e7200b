"""`streamq inspect`: what an output folder holds, per description type, and how much it saves.

Only shard headers are read (names, dtypes, shapes), so inspecting a checkpoint of any size takes
a moment. The float-equivalent size counts each quantized linear as its float weight [n, k] in the
model dtype, and every FLOAT tensor as it is; scales, offsets and KV-cache tensors have no float
counterpart.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import StreamqError
from .verify import (CONFIG, DESCRIPTION, DTYPE_BYTES, PACKED_TYPES, RANK, REPORTED_AS, TensorMeta,
                     model_dtype, read_headers, read_json, shard_files)

NO_ENTRY = "(no entry)"
# Tensors typed like this are stored as they are: in the float model they are the same bytes.
AS_IS = {"FLOAT", NO_ENTRY}


@dataclass
class Row:
    linears: int = 0   # 2-D `.weight` tensors of this type
    tensors: int = 0
    bytes: int = 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _is_weight(name: str, meta: TensorMeta) -> bool:
    return name.endswith(".weight") and len(meta.shape) == 2


def rows_by_type(tensors: dict[str, TensorMeta], types: dict[str, str]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name, meta in tensors.items():
        row = rows.setdefault(types[name], Row())
        row.tensors += 1
        row.bytes += meta.nbytes
        row.linears += _is_weight(name, meta)
    return rows


def float_equivalent_bytes(tensors: dict[str, TensorMeta], types: dict[str, str], dtype: str) -> int:
    total = 0
    for name, meta in tensors.items():
        qtype = types[name]
        if qtype in AS_IS:
            total += meta.nbytes
        elif qtype != "C8" and _is_weight(name, meta):
            n = meta.shape[0] * (2 if qtype in PACKED_TYPES else 1)  # int4 rows are packed in pairs
            total += n * meta.shape[1] * DTYPE_BYTES[dtype]
    return total


def inspect_summary(out_dir: Path) -> str:
    """A table of linears, tensors and bytes per description type, with the compression ratio."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise StreamqError(f"{out_dir}: output folder does not exist", "pass the folder streamq wrote")
    ignored: list[str] = []  # layout problems are `streamq verify`'s business
    shards = shard_files(out_dir, ignored)
    tensors, readable = read_headers(out_dir, shards, ignored)
    if not shards or not readable:
        raise StreamqError(f"{out_dir}: no readable quant_model_weights shards",
                           f"run `streamq verify {out_dir}` to see what is wrong")
    description = read_json(out_dir / DESCRIPTION, ignored)
    description = description if isinstance(description, dict) else {}
    dtype = model_dtype(read_json(out_dir / CONFIG, ignored))
    types = {name: str(description.get(name, NO_ENTRY)) for name in tensors}

    rows = rows_by_type(tensors, types)
    out_bytes = sum(r.bytes for r in rows.values())
    float_bytes = float_equivalent_bytes(tensors, types, dtype)
    order = sorted(rows, key=lambda t: (RANK.get(REPORTED_AS.get(t, t), len(RANK)), t))
    lines = [f"output: {out_dir}",
             f"model_quant_type {description.get('model_quant_type', '?')}, group_size "
             f"{description.get('group_size', '?')}, model dtype {dtype}, {len(shards)} shard(s)", "",
             f"{'type':<14}{'linears':>9}{'tensors':>9}{'bytes':>18}{'':>12}"]
    for t in order:
        r = rows[t]
        lines.append(f"{t:<14}{r.linears:>9}{r.tensors:>9}{r.bytes:>18,}{_size(r.bytes):>12}")
    lines.append(f"{'total':<14}{sum(r.linears for r in rows.values()):>9}{len(tensors):>9}"
                 f"{out_bytes:>18,}{_size(out_bytes):>12}")
    lines += ["", f"float-equivalent bytes ({dtype} weights): {float_bytes:,} ({_size(float_bytes)})",
              f"compression ratio: {float_bytes / out_bytes:.2f}x" if out_bytes else "compression ratio: n/a",
              "(linears = 2-D .weight tensors; for FLOAT these include embeddings, lm_head and router gates)"]
    return "\n".join(lines)


def main_inspect(out_dir) -> int:
    try:
        print(inspect_summary(Path(out_dir)))
    except StreamqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
