"""The output folder and its work folder: who owns which file, and whether a run may resume.

The work folder (`OUT/.streamq`) holds the frozen recipe, the state a resume must match
(semantic recipe keys, input fingerprint, calibration fingerprint), the journal, partial shards
and the calibration states. A completed output lists every file streamq wrote in its report, so
streamq can tell its own files from a user's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import StreamqError
from .shards import fsync_dir

WORK = ".streamq"
REPORT = "streamq_report.json"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


class OutputFolder:
    def __init__(self, out: Path, planned: list[str]):
        self.out = Path(out)
        self.work = self.out / WORK
        self.planned = planned  # every file name a completed run of this plan writes

    def _owned(self) -> set[str]:
        owned = set()
        report = _read_json(self.out / REPORT)
        if isinstance(report, dict) and isinstance(report.get("files"), list):
            owned |= set(report["files"])
        if (self.work / "state.json").exists():
            owned |= set(self.planned)
        return owned

    def _foreign(self) -> list[str]:
        owned = self._owned()
        return sorted(p.name for p in self.out.iterdir() if p.name != WORK and p.name not in owned)

    def complete_state(self) -> dict | None:
        """The state of a finished run in this folder, if there is one."""
        report = _read_json(self.out / REPORT)
        done = isinstance(report, dict) and not self.work.exists() and (self.out / "quant_model_description.json").exists()
        return report.get("state") if done else None

    def prepare(self, state: dict, restart: bool) -> bool:
        """Create or adopt the folder. Returns True when resuming an interrupted run."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".streamq-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StreamqError(f"cannot write to output folder {self.out}: {exc.strerror}",
                               "choose a writable --output folder") from exc
        foreign = self._foreign()
        if foreign and not restart:
            shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
            raise StreamqError(f"output folder {self.out} holds files streamq did not write: {shown}",
                               "choose an empty --output folder, or pass --restart (only streamq's own files are removed)")
        if restart:
            self.clean()
        elif (self.work / "state.json").exists():
            self._check_resume(state)
            return True
        elif self._owned():
            raise StreamqError(f"output folder {self.out} holds the output of a different run",
                               "pass --restart to replace it, or choose another --output folder")
        self.work.mkdir(exist_ok=True)
        write_json(self.work / "state.json", state)
        return False

    def _check_resume(self, state: dict) -> None:
        old = _read_json(self.work / "state.json") or {}
        changed = _diff(old, state)
        if changed:
            raise StreamqError(f"cannot resume the interrupted run in {self.out}: changed since it started: "
                               + ", ".join(changed),
                               "rerun with the original recipe and model, or pass --restart to start over")

    def clean(self) -> None:
        """Remove streamq's own files (and the work folder); leave everything else."""
        for name in self._owned():
            (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
