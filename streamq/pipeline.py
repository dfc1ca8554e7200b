"""The layer loop, the only place that orders side effects.

for each step (embed, layer 0..L-1, final):
    load → observe → quantize → write → propagate → commit
commit = shard bytes fsynced → hidden states fsynced and renamed → one journal line.
A rerun replays the journal, truncates the partial shard to the last committed position and
continues; the output bytes are those of an uninterrupted run. With disable_level, a float
statistics pre-pass (prepass.py) runs before the plan is final; the state records its choice.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from . import calibration, device as dev, faults, prepass
from .activations import ActivationStore
from .arch import arch_for
from .arch.base import Step, check_shapes
from .budget import estimate_peak_rss
from .checkpoint import CheckpointReader
from .errors import StreamqError
from .journal import Journal
from .outdir import REPORT, OutputFolder
from .plan import DESCRIPTION_NAME, INDEX_NAME, build_plan, model_dtype
from .recipe import Recipe
from .report import finalize_outputs, small_files
from .shards import ShardWriter
from .smoothing import check_deepseek
from .arch.deepseek_v3 import DeepseekArch
from .arch.llama import DenseArch
from .moe import MOE_STEP_FNS, base_names
from .prefetch import Prefetcher
from .steps import STEP_FNS, Context, prefetch_float

log = logging.getLogger("streamq")
CDTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_TABLES = {DenseArch: STEP_FNS, DeepseekArch: {**STEP_FNS, **MOE_STEP_FNS}}


def calibration_ids(recipe: Recipe, model_dir: Path, config) -> torch.Tensor:
    cal = recipe.calibration
    tok_dir = model_dir if calibration.has_tokenizer(model_dir) else None
    if tok_dir is None and cal.source != "builtin":
        raise StreamqError(f"{model_dir} has no tokenizer, so calibration.source {cal.source} cannot be tokenized",
                           "copy the tokenizer files into the model folder, or use source = \"builtin\" "
                           "(random token ids for a model without a tokenizer)")
    texts = calibration.load_texts(cal.source, cal.text_field) if tok_dir else []
    return calibration.token_ids(texts, tok_dir, config.vocab_size, cal.samples, cal.seq_len, cal.seed)


def _log_step(bar, step: Step, stats: dict) -> None:
    err = f" rel_err={stats['rel_error']:.2e}" if "rel_error" in stats else ""
    dev_peak = f" dev_peak={stats['peak_device'] / 2**20:.0f}MiB" if stats.get("peak_device") else ""
    bar.write(f"{step.key:>10}: {stats['seconds']:.2f}s peak_rss={stats['peak_rss'] / 2**20:.0f}MiB{dev_peak}{err}")


@dataclass(frozen=True)
class Prepared:
    """Everything a run decides before touching the output folder."""
    reader: CheckpointReader
    config: object
    arch: object
    plan: object
    ids: torch.Tensor
    state: dict
    recipe: Recipe   # the recipe the plan follows: the given one plus disable_level's choice


def prepare(recipe: Recipe, model_dir: Path, recorded: list[dict] = (), device_name: str | None = None) -> Prepared:
    """Read headers and config, plan every output tensor, tokenize the calibration set; with
    disable_level, adopt the choice of a `recorded` state of the same run or make it (pre-pass)."""
    reader = CheckpointReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    arch = arch_for(config, reader)
    if recipe.use_kvcache_quant and not isinstance(arch, DenseArch):
        raise StreamqError(f"KV cache C8 is implemented for dense models, not {config.model_type}",
                           "remove quant.use_kvcache_quant")
    if not isinstance(arch, DenseArch):
        check_deepseek(recipe)
    steps = arch.steps()
    for s in steps:
        check_shapes(s, reader.info)
    plan = build_plan(recipe, steps, reader, model_dtype(config, reader))
    ids = calibration_ids(recipe, model_dir, config)
    state = {"recipe": recipe.semantic(), "input": reader.fingerprint(), "calibration": calibration.fingerprint(ids)}
    if recipe.disable_level:
        state["disable_level"] = prepass.select(recipe, reader, arch, plan, ids,
                                                dev.resolve(device_name or recipe.run.device),
                                                CDTYPES[recipe.run.compute_dtype], list(recorded), state)
        recipe = prepass.applied(recipe, state["disable_level"])
        plan = build_plan(recipe, steps, reader, plan.model_dtype)
    return Prepared(reader, config, arch, plan, ids, state, recipe)


def run(recipe: Recipe, model_dir: Path, out_dir: Path, device_name: str, restart: bool = False) -> Path:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    p = prepare(recipe, model_dir, [] if restart else prepass.recorded_states(out_dir), device_name)
    recipe = p.recipe
    planned = p.plan.shard_names() + [INDEX_NAME, DESCRIPTION_NAME, REPORT, "streamq_report.md", "config.json"] \
        + [f.name for f in small_files(model_dir)]
    folder = OutputFolder(out_dir, planned)
    if not restart and not (folder.work / "state.json").exists() and folder.complete_state() == p.state:
        log.info("%s already holds the completed output of this recipe; nothing to do", out_dir)
        return out_dir
    resuming = folder.prepare(p.state, restart)
    journal, store = Journal(folder.work / "journal.jsonl"), ActivationStore(folder.work)
    records = [r for r in journal.records() if r.get("kind") == "step"]
    writer = ShardWriter(folder.work, p.plan.shard_names(), p.plan.shards, int(recipe.run.write_behind_gb * 1e9))
    device = dev.resolve(device_name)
    estimate = estimate_peak_rss(recipe, p.plan, p.reader, p.arch, on_host=device.type == "cpu")
    log.info("estimated peak host RSS: %.0f MiB (at %s)", estimate.total / 2**20, estimate.moment)
    dev.release_host_memory()  # what tokenizing left on the heap (tens of MB), before the first step
    dev.steady_host_memory()
    ctx = Context(recipe, p.reader, p.arch, p.plan, writer, device, CDTYPES[recipe.run.compute_dtype], p.ids,
                  Prefetcher(recipe.run.read_ahead))
    H = None
    if records:
        writer.resume(records[-1]["position"])
        H = store.load(records[-1]["index"])["h"]
    elif resuming:
        writer.resume({"shard": 0, "tensor": 0, "offset": 0})
    try:
        _loop(ctx, journal, store, records, H)
    except BaseException:
        writer.close(discard=True)  # bytes after the last journal line are truncated on resume anyway
        raise
    finally:
        ctx.prefetch.close()
    writer.close()
    finalize_outputs(folder, p.plan, p.reader, p.config, records, p.state, p.plan.config_extra(recipe),
                     estimate.as_dict())
    shutil.rmtree(folder.work, ignore_errors=True)
    return out_dir


def _loop(ctx: Context, journal: Journal, store: ActivationStore, records: list[dict], H) -> None:
    """The steps not committed yet, each read ahead while the one before computes."""
    steps = ctx.plan.steps
    with tqdm(total=len(steps), initial=len(records), desc="streamq", unit="step") as bar:
        for k in range(len(records), len(steps)):
            if k + 1 < len(steps):
                prefetch_float(ctx, steps[k + 1], base_names(steps[k + 1]))
            H, stats = _run_step(ctx, steps[k], H)
            records.append(_commit(ctx, journal, store, k, steps[k], H, stats))
            _log_step(bar, steps[k], stats)
            bar.update(1)


def _run_step(ctx: Context, step: Step, H):
    t0, cpu0 = time.perf_counter(), time.process_time()
    dev.reset_peak(ctx.device)
    H, stats = STEP_TABLES[type(ctx.arch)][step.kind](ctx, step, H)
    dev.empty_cache(ctx.device)
    dev.release_host_memory()
    return H, {**stats, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
               "peak_rss": dev.peak_rss_bytes(), "rss": dev.rss_bytes(), "peak_device": dev.peak_bytes(ctx.device)}


def _commit(ctx: Context, journal: Journal, store: ActivationStore, k: int, step: Step, H, stats) -> dict:
    position = ctx.writer.sync()
    faults.point("shard-synced")
    store.save(k, {"h": H})
    faults.point("acts-saved")
    record = {"kind": "step", "index": k, "step": step.key, "position": position, "stats": stats}
    journal.append(record)
    store.prune(k)
    return record
