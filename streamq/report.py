"""The last steps of a run: shards into place, index, config, copied files, report, description.

Every file is written atomically, and the description goes last: a folder without
`quant_model_description.json` is never mistaken for a finished checkpoint. Each write is
idempotent, so a run killed here simply does it all again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import faults
from .errors import StreamqError
from .outdir import REPORT, OutputFolder, write_json, atomic_write
from .plan import DESCRIPTION_NAME, INDEX_NAME, Plan

# Weight files of any format are never copied: consumers load every *.safetensors in the folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json"}


def small_files(model_dir: Path) -> list[Path]:
    """Tokenizer, generation config, code and templates: every non-weight file of the source folder."""
    return sorted(p for p in Path(model_dir).iterdir()
                  if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith("."))


def output_config(model_dir: Path, extra: dict) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    return {**config, **extra}


def _move_shards(folder: OutputFolder, plan: Plan) -> None:
    for name in plan.shard_names():
        src, dst = folder.work / name, folder.out / name
        if src.exists():
            os.replace(src, dst)
        if not dst.exists():
            raise StreamqError(f"shard {name} is missing after the last layer", "rerun with --restart")


def _index(plan: Plan) -> dict:
    names = plan.shard_names()
    weight_map = {t.name: names[i] for i, shard in enumerate(plan.shards) for t in shard}
    total = sum(t.nbytes for shard in plan.shards for t in shard)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def build_report(plan: Plan, records: list[dict], state: dict, files: list[str], estimate: dict | None = None) -> dict:
    out_bytes = sum(t.nbytes for s in plan.shards for t in s)
    schemes: dict[str, int] = {}
    for a in plan.args.values():
        schemes[a.scheme] = schemes.get(a.scheme, 0) + 1
    return {
        "state": state,
        "files": files,
        "output_bytes": out_bytes,
        "linears_by_scheme": schemes,
        # disable_level's choice: linear → the outlier ratio max|x|/std of its input
        "disabled_by_level": state.get("disable_level", {}).get("linears", {}),
        "peak_rss_bytes": max((r["stats"]["peak_rss"] for r in records), default=0),
        "estimated_peak_rss_bytes": estimate["bytes"] if estimate else None,
        "estimated_peak_rss": estimate,  # the phase that sets it and its terms (streamq/budget.py)
        "peak_device_bytes": max((r["stats"].get("peak_device") or 0 for r in records), default=0),
        "total_seconds": sum(r["stats"]["seconds"] for r in records),
        "steps": [{"step": r["step"], **r["stats"]} for r in records],
    }


def markdown(report: dict) -> str:
    mib = 2**20
    lines = ["# streamq run report", "",
             f"- output bytes: {report['output_bytes']:,}",
             f"- linears by scheme: {report['linears_by_scheme']}",
             f"- peak host RSS: {report['peak_rss_bytes'] / mib:.0f} MiB"
             + (f" (estimated before the run: {report['estimated_peak_rss_bytes'] / mib:.0f} MiB)"
                if report.get("estimated_peak_rss_bytes") else ""),
             f"- peak device memory: {report['peak_device_bytes'] / mib:.0f} MiB",
             f"- compute time: {report['total_seconds']:.1f} s", ""]
    if report.get("disabled_by_level"):
        lines += ["| kept FLOAT by disable_level | input max\\|x\\|/std |", "|---|---|"]
        lines += [f"| {name} | {ratio:.1f} |" for name, ratio in report["disabled_by_level"].items()] + [""]
    lines += ["| step | seconds | peak RSS (MiB) | relative output error (first batch) |", "|---|---|---|---|"]
    for s in report["steps"]:
        err = f"{s['rel_error']:.3e}" if "rel_error" in s else ""
        lines.append(f"| {s['step']} | {s['seconds']:.2f} | {s['peak_rss'] / mib:.0f} | {err} |")
    return "\n".join(lines) + "\n"


def finalize_outputs(folder: OutputFolder, plan: Plan, reader, config, records: list[dict], state: dict,
                     config_extra: dict | None = None, estimate: dict | None = None) -> None:
    out = folder.out
    _move_shards(folder, plan)
    write_json(out / INDEX_NAME, _index(plan))
    faults.point("finalize")
    write_json(out / "config.json", output_config(reader.dir, config_extra or {}))
    copied = small_files(reader.dir)
    for src in copied:
        tmp = out / (src.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / src.name)
    files = plan.shard_names() + [INDEX_NAME, "config.json", *(p.name for p in copied), REPORT,
                                  "streamq_report.md", DESCRIPTION_NAME]
    report = build_report(plan, records, state, files, estimate)
    atomic_write(out / "streamq_report.md", markdown(report).encode())
    write_json(out / REPORT, report)
    write_json(out / DESCRIPTION_NAME, plan.description())
