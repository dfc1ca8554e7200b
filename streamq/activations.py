"""Hidden states of the calibration set between layers, made durable at each commit.

The states of step k are saved as `acts-k.safetensors` (temp, fsync, rename) before step k's
journal line, so a resumed run restarts from exactly the bytes the interrupted run would have
used. Only the newest file is kept: disk use is one copy of the calibration states.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .shards import fsync_dir


class ActivationStore:
    def __init__(self, work: Path):
        self.dir = work

    def path(self, step: int) -> Path:
        return self.dir / f"acts-{step:05d}.safetensors"

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        final, tmp = self.path(step), self.path(step).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.dir)

    def load(self, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(step)))

    def prune(self, keep: int) -> None:
        """Remove every state file but `keep`'s (older ones are no longer needed once it committed)."""
        for p in self.dir.glob("acts-*"):
            if p.name != self.path(keep).name:
                p.unlink(missing_ok=True)
