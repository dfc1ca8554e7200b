"""Streaming safetensors writer.

Each shard's header is known from the plan, so a shard file is created with its header and the
tensors are appended in planned order as layers finish: every output byte is written once, and no
shard is ever assembled from pieces. A shard being filled is `<name>.partial` in the work folder;
when its last tensor lands it is fsynced and renamed to `<name>`. A position (shard, tensor,
byte offset) is what the journal records; resuming truncates the partial shard to it.

Write-behind: `write` checks a tensor against the plan and queues its bytes; one worker thread
appends them in order while the caller computes the next tensors. The queue is bounded in bytes,
so a slow disk holds the caller back instead of filling host memory. `sync` drains the queue
before it fsyncs, so a journaled position never runs ahead of the file.
"""
from __future__ import annotations

import errno
import json
import os
import threading
from collections import deque
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
    """The tensor's bytes; a view of its storage when it is already contiguous on the host."""
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


@dataclass
class Position:
    shard: int = 0
    tensor: int = 0
    offset: int = 0

    def as_dict(self) -> dict:
        return {"shard": self.shard, "tensor": self.tensor, "offset": self.offset}


class ShardWriter:
    """`buffer_bytes` bounds the bytes queued for the worker; 0 writes in the caller's thread."""

    def __init__(self, work: Path, names: list[str], shards: tuple[tuple[OutTensor, ...], ...],
                 buffer_bytes: int = 0):
        self.work, self.names, self.shards = work, names, shards
        self.pos = Position()            # of the bytes in the file: advanced by whoever appends
        self.next = Position()           # the planned tensor the caller writes next (offset unused)
        self.file = None
        self.buffer_bytes = buffer_bytes
        self._queue: deque[memoryview] = deque()
        self._queued = 0                 # bytes in the queue, the one being written included
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._stopping = self._discard = False
        self._worker: threading.Thread | None = None

    def _partial(self, i: int) -> Path:
        return self.work / (self.names[i] + ".partial")

    def done(self, i: int) -> Path:
        return self.work / self.names[i]

    def resume(self, pos: dict) -> None:
        """Continue from a committed position: truncate the partial shard to its offset."""
        self.pos = Position(**pos)
        self.next = Position(self.pos.shard, self.pos.tensor)
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

    # -- caller side ------------------------------------------------------------------------------

    def write(self, name: str, t: torch.Tensor) -> None:
        """Queue the next planned tensor. Its bytes may be a view of `t`, written later: the
        caller must not modify `t` in place afterwards."""
        self._raise_pending()
        self._check_planned(name, t)
        data = tensor_bytes(t)
        if self.buffer_bytes <= 0:
            self._append(data)
            return
        self._start_worker()
        with self._cv:
            # One tensor larger than the whole buffer still goes, alone.
            self._cv.wait_for(lambda: self._error is not None or not self._queue
                              or self._queued + data.nbytes <= self.buffer_bytes)
            if self._error is None:
                self._queue.append(data)
                self._queued += data.nbytes
                self._cv.notify_all()
        self._raise_pending()

    def _check_planned(self, name: str, t: torch.Tensor) -> None:
        shard = self.shards[self.next.shard] if self.next.shard < len(self.shards) else ()
        spec = shard[self.next.tensor] if self.next.tensor < len(shard) else None
        if spec is None or spec.name != name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            planned = "nothing more" if spec is None else f"{spec.name} {spec.dtype} {list(spec.shape)}"
            raise StreamqError(f"internal error: wrote {name} {t.dtype} {list(t.shape)} where the plan has "
                               f"{planned}", "please report this as a bug")
        self.next.tensor += 1
        if self.next.tensor == len(shard):
            self.next = Position(self.next.shard + 1, 0)

    def _drain(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._queue)
        self._raise_pending()

    def _raise_pending(self) -> None:
        """A write that failed on the worker fails the caller at its next call."""
        if self._error is not None:
            raise self._error

    def sync(self) -> dict:
        """Make everything written so far durable; return the position to journal."""
        self._drain()
        if self.file is not None:
            self._io(self.file.flush)
            self._io(os.fsync, self.file.fileno())
        fsync_dir(self.work)
        return self.pos.as_dict()

    def close(self, discard: bool = False) -> None:
        """Stop the worker and close the file. `discard` drops queued bytes and swallows a worker
        error (a run already failing: what follows the last journal line is truncated on resume)."""
        if self._worker is not None:
            with self._cv:
                self._stopping, self._discard = True, discard
                self._cv.notify_all()
            self._worker.join()
            self._worker = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if not discard:
            self._raise_pending()

    # -- file side (the worker, or the caller when there is no buffer) ----------------------------

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="streamq-write", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if not self._queue or self._discard:
                    self._queue.clear()
                    self._queued = 0
                    self._cv.notify_all()
                    return
                data = self._queue[0]
            try:
                if self._error is None:
                    self._append(data)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
                self._error = self._named(exc)
            del data  # not held until the next item arrives: it may be a whole embedding
            with self._cv:
                self._queued -= self._queue.popleft().nbytes
                self._cv.notify_all()

    def _named(self, exc: BaseException) -> BaseException:
        if isinstance(exc, StreamqError):
            return exc
        where = self._partial(min(self.pos.shard, len(self.shards) - 1))
        err = StreamqError(f"cannot write {where}: {exc!r}", "rerun the same command to resume")
        err.__cause__ = exc
        return err

    def _append(self, data: memoryview) -> None:
        if self.file is None:
            self.file = open(self._partial(self.pos.shard), "wb")
            self._io(self.file.write, header_bytes(self.shards[self.pos.shard]))
        self._io(self.file.write, data)
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
