"""Shared fixtures: tiny checkpoints made in tmp_path, recipes written inline, a CLI runner."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamq.synth import write_dense

REPO = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


SMALL_CAL = """
[calibration]
samples = 4
seq_len = 16
[run]
device = "cpu"
batch_size = 2
"""


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return write_dense(tmp_path / "llama", "llama", layers=2, hidden=64, intermediate=128, vocab=128)


@pytest.fixture
def recipe_w8a8_dynamic(tmp_path) -> Path:
    return write_recipe(tmp_path / "w8a8d.toml", SMALL_CAL + '[quant]\nscheme = "W8A8_DYNAMIC"\n')


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "streamq", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"streamq {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_all(folder: Path) -> dict:
    """Every tensor of every *.safetensors in a folder (tests use tiny models only)."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def corrupt(out: Path, dst: Path, name: str, fn) -> Path:
    """Copy an output folder with one tensor changed by fn."""
    shutil.copytree(out, dst)
    index = json.loads((dst / "quant_model_weights.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def output_bytes(folder: Path) -> dict[str, bytes]:
    """The checkpoint files of an output (the run report holds timings, so it is left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith("streamq_report")}
