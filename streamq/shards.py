"""Streaming safetensors writer.

Each shard's header is known from the plan, so a shard file is created with its header and the
tensors are appended in planned order as layers finish: every output byte is written once, and no
shard is ever assembled from pieces. A shard being filled is `<name>.partial` in the work folder;
when its last tensor lands it is fsynced and renamed to `<name>`. A position (shard, tensor,
byte offset) is what the journal records; resuming truncates the partial shard to it.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import faults

from .checkpoint import DTYPE_NAMES
from .errors import StreamqError
from .plan import OutTensor


def header_bytes(tensors: tuple[OutTensor, ...]) -> bytes:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


@dataclass
class Position:
    shard: int = 0
    tensor: int = 0
    offset: int = 0

    def as_dict(self) -> dict:
        return {"shard": self.shard, "tensor": self.tensor, "offset": self.offset}


class ShardWriter:
    def __init__(self, work: Path, names: list[str], shards: tuple[tuple[OutTensor, ...], ...]):
        self.work, self.names, self.shards = work, names, shards
        self.pos = Position()
        self.file = None

    def _partial(self, i: int) -> Path:
        return self.work / (self.names[i] + ".partial")

    def done(self, i: int) -> Path:
        return self.work / self.names[i]

    def resume(self, pos: dict) -> None:
        """Continue from a committed position: truncate the partial shard to its offset."""
        self.pos = Position(**pos)
        if self.pos.shard >= len(self.shards) or self.pos.tensor == 0:
            self._partial(min(self.pos.shard, len(self.shards) - 1)).unlink(missing_ok=True)
            return
        partial, done = self._partial(self.pos.shard), self.done(self.pos.shard)
        if not partial.exists() and done.exists():
            os.replace(done, partial)  # renamed after the last journal line: undo, it is re-appended
        if not partial.exists() or partial.stat().st_size < self.pos.offset:
            raise StreamqError(f"{partial} is shorter than the journal says; the work folder is damaged",
                               "rerun with --restart")
        self.file = open(partial, "r+b")
        self.file.truncate(self.pos.offset)
        self.file.seek(self.pos.offset)

    def write(self, name: str, t: torch.Tensor) -> None:
        spec = self.shards[self.pos.shard][self.pos.tensor]
        if spec.name != name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise StreamqError(f"internal error: wrote {name} {t.dtype} {list(t.shape)} where the plan has "
                               f"{spec.name} {spec.dtype} {list(spec.shape)}", "please report this as a bug")
        if self.file is None:
            self.file = open(self._partial(self.pos.shard), "wb")
            self._io(self.file.write, header_bytes(self.shards[self.pos.shard]))
        self._io(self.file.write, tensor_bytes(t))
        faults.point("tensor-written")
        self.pos.tensor += 1
        self.pos.offset = self.file.tell()
        if self.pos.tensor == len(self.shards[self.pos.shard]):
            self._close_shard()

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            where = self._partial(self.pos.shard)
            hint = ("free disk space, then rerun the same command to resume" if exc.errno == errno.ENOSPC
                    else "check the output folder, then rerun the same command to resume")
            raise StreamqError(f"cannot write {where}: {exc.strerror}", hint) from exc

    def _close_shard(self) -> None:
        self._io(self.file.flush)
        self._io(os.fsync, self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self._partial(self.pos.shard), self.done(self.pos.shard))
        self.pos = Position(self.pos.shard + 1, 0, 0)

    def sync(self) -> dict:
        """Make everything written so far durable; return the position to journal."""
        if self.file is not None:
            self._io(self.file.flush)
            self._io(os.fsync, self.file.fileno())
        fsync_dir(self.work)
        return self.pos.as_dict()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
