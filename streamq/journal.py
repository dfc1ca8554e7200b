"""Append-only journal of committed steps, one JSON line each with its own checksum.

A line is the commit point of a step: it is appended only after the step's shard bytes and
propagated activations are durable. A torn or damaged last line (a kill mid-append) is ignored
on replay, which is exactly "that step did not commit".
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path


def _crc(body: bytes) -> bytes:
    return b"%08x" % zlib.crc32(body)


class Journal:
    def __init__(self, path: Path):
        self.path = path

    def _replay(self) -> tuple[list[dict], int]:
        """The valid records and the byte length they span."""
        if not self.path.exists():
            return [], 0
        out, valid = [], 0
        for line in self.path.read_bytes().splitlines(keepends=True):
            body, _, crc = line.rstrip(b"\n").rpartition(b" ")
            if not line.endswith(b"\n") or not body or _crc(body) != crc:
                break  # everything after a damaged line is untrusted
            out.append(json.loads(body))
            valid += len(line)
        return out, valid

    def records(self) -> list[dict]:
        return self._replay()[0]

    def append(self, record: dict) -> None:
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        _, valid = self._replay()
        with open(self.path, "ab") as f:
            f.truncate(valid)  # drop a torn tail left by a kill mid-append
            f.write(body + b" " + _crc(body) + b"\n")
            f.flush()
            os.fsync(f.fileno())
