"""streamq benchmarks: host memory against depth, throughput, per-layer cost, cold reads, a real model.

The machine is shared and its timings drift from minute to minute, so every figure that matters
is a ratio of two measurements taken in the same run of this script.

    .venv/bin/python bench/run.py                    # every row → bench/results.md
    .venv/bin/python bench/run.py --only rss_depth   # one row → bench/work/run/results-rss_depth.md
    .venv/bin/python bench/run.py --only layer_cost --only cold_read   # the two speed ratios
    .venv/bin/python bench/run.py --quick            # smaller models and calibration

Rows are functions registered in ROWS; each returns a Row (measurements plus the commands that
reproduce them). Scratch data lives in bench/work/run/; checkpoints and outputs are deleted at
the end unless --keep is given.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
WORK = BENCH / "work" / "run"  # bench/work is shared scratch; this script touches only its own folder
SMOLLM2 = REPO / ".cache" / "smollm2"
MiB = 2**20
MB = 10**6
RSS_DEPTH_TARGET = 1.10
LAYER_COST_TARGET = 1.5   # a step's time per layer / a plain float forward of the layer
COLD_READ_TARGET = 1.2    # a run from a cold cache / max(cold copy of the input, the run hot)


# ---------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    """Synthetic Llama widths and the calibration set every synthetic run uses."""
    shallow: int          # layers of the small checkpoint
    deep: int             # layers of the large one (same widths)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    samples: int
    seq_len: int
    batch: int
    shard_mb: int         # several shards, as real checkpoints have
    smollm2_samples: int | None  # None: the repo recipes' own calibration size
    ds_layers: int        # DeepSeek-R1-width checkpoint of cold_read: layers (the first dense)
    ds_experts: int       # routed experts per MoE layer


FULL = Sizes(shallow=4, deep=32, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=8192,
             samples=16, seq_len=128, batch=4, shard_mb=200, smollm2_samples=None, ds_layers=3, ds_experts=4)
QUICK = Sizes(shallow=2, deep=8, hidden=512, intermediate=1408, heads=8, kv_heads=2, vocab=4096,
              samples=8, seq_len=64, batch=4, shard_mb=50, smollm2_samples=8, ds_layers=2, ds_experts=2)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    name: str
    measurements: list[tuple[str, str, str]] = field(default_factory=list)  # (what, value, note)
    commands: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, what: str, value: str, note: str = "") -> None:
        self.measurements.append((what, value, note))


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def shown(path: Path | str) -> str:
    """Paths as a reader in the repo root would type them."""
    # abspath, not resolve: .venv/bin/python is a symlink that should stay as typed.
    p = Path(os.path.abspath(path))
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def command_line(argv: list) -> str:
    return shlex.join(shown(a) if isinstance(a, Path) or str(a).startswith(str(REPO)) else str(a)
                      for a in argv)


PYTHON = Path(sys.executable)
PYTHON_SHOWN = shown(PYTHON)


# ---------------------------------------------------------------------------------------------
# Inputs: synthetic checkpoints and recipes


def synth_command(sizes: Sizes, layers: int) -> str:
    """What synthetic_checkpoint does, as a shell line."""
    code = (f"from streamq.synth import write_dense; write_dense({shown(checkpoint_dir(sizes, layers))!r}, "
            f"'llama', layers={layers}, hidden={sizes.hidden}, intermediate={sizes.intermediate}, "
            f"heads={sizes.heads}, kv_heads={sizes.kv_heads}, vocab={sizes.vocab}, shard_mb={sizes.shard_mb})")
    return f'{PYTHON_SHOWN} -c "{code}"'  # no $, backquote, backslash or " inside


def checkpoint_dir(sizes: Sizes, layers: int) -> Path:
    return WORK / f"llama-{layers}L-h{sizes.hidden}"


@functools.cache
def synthetic_checkpoint(sizes: Sizes, layers: int) -> Path:
    """A random bf16 Llama checkpoint, written once per bench run (rows share it)."""
    from streamq.synth import write_dense
    out = checkpoint_dir(sizes, layers)
    print(f"  writing {shown(out)}", flush=True)
    return write_dense(out, "llama", layers=layers, hidden=sizes.hidden, intermediate=sizes.intermediate,
                       heads=sizes.heads, kv_heads=sizes.kv_heads, vocab=sizes.vocab, dtype=torch.bfloat16,
                       shard_mb=sizes.shard_mb)


def synthetic_recipe(sizes: Sizes, scheme: str = "W8A8_DYNAMIC", propagate: str = "quantized",
                     samples: int | None = None) -> Path:
    """As recipes/w8a8_dynamic.toml (or W8A8 static, min-max ranges), with the bench's calibration
    size (or `samples`) and batch, propagating the quantized or the float layer outputs."""
    tag = "" if propagate == "quantized" else f"-{propagate}"
    samples = samples or sizes.samples
    path = WORK / f"{scheme.lower()}{tag}-{samples}x{sizes.seq_len}.toml"
    path.write_text(f"""\
[calibration]
source = "builtin"
samples = {samples}
seq_len = {sizes.seq_len}

[quant]
scheme = "{scheme}"
w_method = "MinMax"
disable_last_linear = true

[run]
device = "cpu"
batch_size = {sizes.batch}
propagate = "{propagate}"
""")
    return path


def recipe_command(recipe: Path) -> str:
    """The shell lines that recreate a recipe the bench wrote."""
    return f"cat > {shown(recipe)} <<'EOF'\n{recipe.read_text().rstrip()}\nEOF"


def with_samples(recipe: Path, samples: int) -> Path:
    """A copy of a repo recipe with fewer calibration samples (for --quick)."""
    from streamq.recipe import load_recipe
    text, count = re.subn(r"(?m)^samples\s*=\s*\d+", f"samples = {samples}", recipe.read_text())
    path = WORK / f"{recipe.stem}-{samples}samples.toml"
    path.write_text(text)
    # The substitution is textual: make sure it changed what the parser sees, and only that.
    if count != 1 or load_recipe(path).calibration.samples != samples:
        raise RuntimeError(f"could not set calibration.samples in {recipe}")
    return path


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Measuring a streamq run


# Runs its arguments as a child process and prints the child's peak RSS, wall and CPU time as JSON.
# A fresh wrapper per measurement matters: RUSAGE_CHILDREN is a maximum over every child a process
# has ever waited for, so one long-lived parent would report the largest run for all of them.
WRAPPER = """
import json, resource, subprocess, sys, time
with open(sys.argv[1], "w") as log:
    t0 = time.perf_counter()
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": u.ru_utime + u.ru_stime,
                  "peak_rss_bytes": u.ru_maxrss * 1024}))
"""


def drop_page_cache() -> bool:
    """Cold reads need root; False means the run read from a warm cache."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


@dataclass
class Measured:
    command: str
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    cold: bool
    report: dict

    def layer_seconds(self) -> list[float]:
        return [s["seconds"] for s in self.report["steps"] if s["step"].startswith("layer.")]

    def layer_cpu_seconds(self) -> list[float]:
        """CPU time of each layer step, all threads (the read-ahead of the next step included)."""
        return [s["cpu_seconds"] for s in self.report["steps"] if s["step"].startswith("layer.")]

    def mean_rel_error(self) -> float:
        return statistics.mean(s["rel_error"] for s in self.report["steps"] if "rel_error" in s)


def measure(argv: list, log: Path, env: dict | None = None) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([PYTHON, "-c", WRAPPER, log, *argv], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`{command_line(argv)}` exited {result['rc']}:\n{tail}")
    return result


@functools.cache
def streamq_run(recipe: Path, model: Path, device: str | None, cold: bool = True, threads: int | None = None
                ) -> Measured:
    """One streamq run, measured from outside; cached so that rows measuring the same run
    (rss_depth and throughput) share it. `cold`: the input comes from a dropped page cache, while
    the interpreter's own files are read back first, so only the input is read cold; otherwise
    the input is read once beforehand, so the run finds it in the cache. `threads`: torch's
    intra-op threads (default: torch's own choice)."""
    out = WORK / "out" / f"{model.name}-{recipe.stem}"
    argv = [PYTHON, "-m", "streamq", "run", recipe, "--model", model, "--output", out, "--restart"]
    if device:
        argv += ["--device", device]
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    shell_env = "".join(f"{k}={v} " for k, v in env.items())
    print(f"  $ {shell_env}{command_line(argv)}{'' if cold else '   # hot cache'}", flush=True)
    log = WORK / "logs" / f"{out.name}{'' if cold else '-hot'}.log"
    if cold:
        cold = drop_page_cache()
        subprocess.run([PYTHON, "-c", "import streamq.cli, streamq.pipeline"], check=True)
    else:
        read_all(model)
    result = measure(argv, log, env)
    report = json.loads((out / "streamq_report.json").read_text())
    shutil.rmtree(out)  # outputs are as large as the checkpoint; only the report is needed
    return Measured(shell_env + command_line(argv), result["wall_s"], result["cpu_s"], result["peak_rss_bytes"],
                    cold, report)


# ---------------------------------------------------------------------------------------------
# Plain baselines: a sequential read and a float forward


def read_all(folder: Path) -> None:
    """`cat` of every shard to /dev/null."""
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *sorted(folder.glob("*.safetensors"))], stdout=null, check=True)


def sequential_read_seconds(folder: Path) -> tuple[float, bool]:
    """`cat` of every shard from a cold cache: the floor for a pass that must read all input bytes."""
    cold = drop_page_cache()
    t0 = time.perf_counter()
    read_all(folder)
    return time.perf_counter() - t0, cold


def layer_tensors(model: Path, i: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors, keyed as inside the layer module, in fp32."""
    from safetensors import safe_open
    prefix = f"model.layers.{i}."
    index = model / "model.safetensors.index.json"
    if index.exists():
        files = {f for name, f in json.loads(index.read_text())["weight_map"].items() if name.startswith(prefix)}
    else:
        files = {p.name for p in model.glob("*.safetensors")}
    tensors = {}
    for name in sorted(files):
        with safe_open(str(model / name), framework="pt") as f:
            tensors |= {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    return tensors


def calibration_hidden(recipe: Path, model: Path, config) -> torch.Tensor:
    """The embedded calibration tokens streamq itself feeds the first layer."""
    from safetensors import safe_open
    from streamq.pipeline import calibration_ids
    from streamq.recipe import load_recipe
    ids = calibration_ids(load_recipe(recipe), model, config)
    for p in model.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                return f.get_tensor("model.embed_tokens.weight")[ids].float()
    raise RuntimeError(f"{model} has no model.embed_tokens.weight")


@dataclass
class Timings:
    wall: list[float]
    cpu: list[float]  # all threads of this process: steadier than wall time when others load the machine


def float_forward_timings(recipe: Path, model: Path, batch: int, threads: int | None = None) -> Timings:
    """Per-layer time of a plain fp32 forward (transformers' LlamaDecoderLayer) over the
    calibration tokens, in streamq's batch size, each layer fed the previous one's output, on
    `threads` intra-op threads (default: as configured). Loading the weights is not timed: this
    is the least compute a layer can cost."""
    configured = torch.get_num_threads()
    torch.set_num_threads(threads or configured)
    try:
        return _float_forward_timings(recipe, model, batch)
    finally:
        torch.set_num_threads(configured)


def _float_forward_timings(recipe: Path, model: Path, batch: int) -> Timings:
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    config._attn_implementation = "sdpa"  # causal without an explicit mask, as streamq runs it
    H = calibration_hidden(recipe, model, config)
    rotary = LlamaRotaryEmbedding(config)(H[:1], torch.arange(H.shape[1])[None])
    timings = Timings([], [])
    for i in range(config.num_hidden_layers):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, i)
        layer.load_state_dict(layer_tensors(model, i), strict=True, assign=True)
        layer.eval()
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for b in range(0, H.shape[0], batch):
                out = layer(H[b:b + batch], attention_mask=None, position_embeddings=rotary)
                H[b:b + batch] = out[0] if isinstance(out, tuple) else out
        timings.wall.append(time.perf_counter() - wall)
        timings.cpu.append(time.process_time() - cpu)
    return timings


# ---------------------------------------------------------------------------------------------
# Rows


def rss_depth(sizes: Sizes) -> Row:
    """Peak host RSS must not grow with depth: streamq holds one layer at a time."""
    row = Row("rss_depth")
    recipe = synthetic_recipe(sizes)
    row.commands.append(recipe_command(recipe))
    runs = {}
    for layers in (sizes.shallow, sizes.deep):
        model = synthetic_checkpoint(sizes, layers)
        runs[layers] = run = streamq_run(recipe, model, "cpu")
        row.commands += [synth_command(sizes, layers), run.command]
        row.add(f"peak RSS, {layers} layers ({safetensors_bytes(model) / MB:.0f} MB bf16)",
                mib(run.peak_rss_bytes), f"streamq's own report: {mib(run.report['peak_rss_bytes'])}")
    shallow, deep = runs[sizes.shallow].peak_rss_bytes, runs[sizes.deep].peak_rss_bytes
    verdict = "met" if deep / shallow <= RSS_DEPTH_TARGET else "MISSED"
    row.add(f"peak RSS ratio {sizes.deep}/{sizes.shallow} layers", f"{deep / shallow:.3f}",
            f"target ≤ {RSS_DEPTH_TARGET:.2f}: {verdict}")
    # Most of the peak is the interpreter with torch and transformers loaded; against that floor
    # a growth with depth shows up far more clearly than in the ratio of totals.
    base = import_floor()["peak_rss_bytes"]
    row.add("peak RSS above the import floor, shallow → deep",
            f"{(shallow - base) / MiB:.0f} → {(deep - base) / MiB:.0f} MiB",
            f"floor: {mib(base)}, a process that only imports streamq's run path")
    # Within the deep run: where the high-water mark was set, and what stays resident between
    # layers. Run-to-run variation does not enter these.
    steps = {s["step"]: s for s in runs[sizes.deep].report["steps"]}
    first, at_shallow, last = (steps[f"layer.{i}"] for i in (0, sizes.shallow - 1, sizes.deep - 1))
    row.add(f"{sizes.deep} layers: peak RSS reached by layer {sizes.shallow - 1} → by layer {sizes.deep - 1}",
            f"{at_shallow['peak_rss'] / MiB:.0f} → {last['peak_rss'] / MiB:.0f} MiB",
            "the report's per-step peak_rss (the process high-water mark so far)")
    row.add(f"{sizes.deep} layers: RSS after layer 0 → after layer {sizes.deep - 1}",
            f"{first['rss'] / MiB:.0f} → {last['rss'] / MiB:.0f} MiB",
            "the report's per-step rss: what stays resident between layers")
    return row


@functools.cache
def import_floor() -> dict:
    """Peak RSS and CPU time of a process that only imports what a streamq run imports."""
    return measure([PYTHON, "-c", "import streamq.cli, streamq.pipeline"], WORK / "logs" / "import.log")


def throughput(sizes: Sizes) -> Row:
    """How far a run is from the two floors: reading the input once, and one float forward."""
    row = Row("throughput")
    recipe = synthetic_recipe(sizes)
    model = synthetic_checkpoint(sizes, sizes.deep)
    size = safetensors_bytes(model)
    copy_s, copy_cold = sequential_read_seconds(model)
    run = streamq_run(recipe, model, "cpu")
    row.commands += [recipe_command(recipe), synth_command(sizes, sizes.deep),
                     f"sync; echo 3 > /proc/sys/vm/drop_caches; time cat {shown(model)}/*.safetensors > /dev/null",
                     run.command]
    cache = "cold cache" if copy_cold and run.cold else "warm cache (page cache could not be dropped)"
    row.add(f"sequential read of the input ({size / MB:.0f} MB)", f"{copy_s:.2f} s",
            f"{size / MB / copy_s:.0f} MB/s, {cache}")
    row.add(f"streamq run, {sizes.deep} layers, wall", f"{run.wall_s:.1f} s",
            f"includes interpreter start; {run.report['total_seconds']:.1f} s inside steps, "
            f"{run.cpu_s:.0f} s CPU")
    row.add("ratio streamq / sequential read", f"{run.wall_s / copy_s:.0f}×",
            "near 1 would mean the run is bound by reading its input")
    float_t = float_forward_timings(recipe, model, sizes.batch)
    layer_s = run.layer_seconds()
    tokens = f"{sizes.samples}×{sizes.seq_len} tokens, batch {sizes.batch}, fp32"
    row.add("per layer: streamq step, median wall", f"{statistics.median(layer_s):.3f} s",
            f"min {min(layer_s):.3f} s over {len(layer_s)} layers")
    row.add("per layer: float forward, median wall", f"{statistics.median(float_t.wall):.3f} s",
            f"LlamaDecoderLayer, {tokens}; min {min(float_t.wall):.3f} s")
    row.add("ratio streamq / float forward per layer, wall",
            f"{statistics.median(layer_s) / statistics.median(float_t.wall):.2f}",
            f"ratio of minima {min(layer_s) / min(float_t.wall):.2f}; this data-free step runs the quantized "
            "layer, the float layer on the first batch, and loads, quantizes and writes the layer")
    streamq_cpu = statistics.mean(run.layer_cpu_seconds())
    row.add("ratio streamq / float forward per layer, CPU time",
            f"{streamq_cpu / statistics.mean(float_t.cpu):.2f}",
            f"{streamq_cpu:.3f} s vs {statistics.mean(float_t.cpu):.3f} s; on two threads a loaded machine "
            "inflates CPU time with spin-waits: layer_cost measures this ratio on one")
    row.commands.append("# the float forward baseline is float_forward_timings() in bench/run.py")
    return row


LAYER_COST_RECIPES = [("data-free", "W8A8_DYNAMIC"), ("calibrated", "W8A8")]


def layer_cost(sizes: Sizes) -> Row:
    """A step's time per layer against a plain float forward of the same layer over the same
    tokens, for a data-free and a calibrated recipe, each propagating quantized or float outputs,
    at the bench's calibration size and at 4× as many samples: a step's fixed costs (read,
    quantize, write) and its first-batch pass shrink against the forward as tokens grow."""
    row = Row("layer_cost")
    model = synthetic_checkpoint(sizes, sizes.shallow)
    row.commands.append(synth_command(sizes, sizes.shallow))
    for samples in (sizes.samples, 4 * sizes.samples):
        layer_cost_at(row, sizes, model, samples)
    row.commands.append("# the float forward baseline is float_forward_timings() in bench/run.py")
    return row


def layer_cost_at(row: Row, sizes: Sizes, model: Path, samples: int) -> None:
    # One compute thread on both sides: CPU time is then the work done. With two, a thread that
    # waits at a barrier for its descheduled sibling spins, and a loaded machine inflates CPU
    # time by as much as the work. Other load still slows memory-bound work, and only ever adds:
    # the verdict compares the least CPU time over equal layers (the forward timed before and
    # after the runs), with the means beside it.
    base = synthetic_recipe(sizes, samples=samples)
    forward = [float_forward_timings(base, model, sizes.batch, threads=1)]
    runs = {}
    for label, scheme in LAYER_COST_RECIPES:
        for propagate in ("quantized", "float"):
            recipe = synthetic_recipe(sizes, scheme, propagate, samples)
            runs[label, scheme, propagate] = run = streamq_run(recipe, model, "cpu", threads=1)
            row.commands += [recipe_command(recipe), run.command]
    forward.append(float_forward_timings(base, model, sizes.batch, threads=1))
    f_min = min(c for t in forward for c in t.cpu)
    f_mean = statistics.mean(c for t in forward for c in t.cpu)
    f_wall = statistics.median(w for t in forward for w in t.wall)
    tokens = f"{samples}×{sizes.seq_len} tokens"
    row.add(f"{tokens}: float forward per layer", f"{f_min:.3f} s CPU",
            f"least over {sizes.shallow} layers × 2; mean {f_mean:.3f} s, before / after the runs "
            f"{' / '.join(f'{statistics.mean(t.cpu):.3f}' for t in forward)} s; median wall {f_wall:.3f} s; "
            f"LlamaDecoderLayer, batch {sizes.batch}, fp32, 1 thread")
    for (label, scheme, propagate), run in runs.items():
        cpu = min(run.layer_cpu_seconds()) / f_min
        verdict = "met" if cpu <= LAYER_COST_TARGET else "MISSED"
        row.add(f"{tokens}: {label} {scheme}, propagate {propagate}: step / float forward", f"{cpu:.2f}",
                f"target ≤ {LAYER_COST_TARGET}: {verdict}; means "
                f"{statistics.mean(run.layer_cpu_seconds()) / f_mean:.2f} CPU, "
                f"medians {statistics.median(run.layer_seconds()) / f_wall:.2f} wall; "
                f"{passes_run(scheme, propagate)}")


def passes_run(scheme: str, propagate: str) -> str:
    """What a dense step computes for these (layerquant.plan_passes), in words."""
    stats = scheme != "W8A8_DYNAMIC"
    float_pass = "observed float pass" if stats else "float pass"
    return {
        (False, "quantized"): "quantized pass + float pass on the first batch",
        (False, "float"): "float pass + quantized pass on the first batch",
        (True, "quantized"): f"{float_pass} + quantized pass",
        (True, "float"): f"{float_pass} + quantized pass on the first batch",
    }[stats, propagate] + ", load, quantize, write"


# ---------------------------------------------------------------------------------------------
# cold_read: a DeepSeek-R1-width checkpoint read from a cold cache


def deepseek_dir(sizes: Sizes) -> Path:
    return WORK / f"deepseek-rw-{sizes.ds_layers}L-{sizes.ds_experts}e"


def deepseek_synth_argv(sizes: Sizes) -> list:
    return [PYTHON, "-m", "streamq", "synth", "deepseek-v3", "--out", deepseek_dir(sizes), "--layers",
            str(sizes.ds_layers), "--experts", str(sizes.ds_experts), "--real-widths", "--vocab", "1024"]


def deepseek_checkpoint(sizes: Sizes) -> Path:
    """DeepSeek-R1 tensor widths in bf16 (hidden 7168, expert width 2048, 128 heads); only the
    layer and expert counts and the vocabulary are small. Reused when --keep left it."""
    out = deepseek_dir(sizes)
    if not (out / "model.safetensors.index.json").exists():
        print(f"  writing {shown(out)}", flush=True)
        subprocess.run(deepseek_synth_argv(sizes), check=True, capture_output=True)
    return out


def deepseek_recipe(sizes: Sizes) -> Path:
    """Data-free W8A8_DYNAMIC with a small calibration set: the run is bound by weights, not tokens."""
    path = WORK / "deepseek-w8a8_dynamic.toml"
    path.write_text("""\
[calibration]
source = "builtin"
samples = 4
seq_len = 64

[quant]
scheme = "W8A8_DYNAMIC"
w_method = "MinMax"
disable_last_linear = true

[run]
device = "cpu"
batch_size = 4
compute_dtype = "bfloat16"
""")
    return path


def cold_read(sizes: Sizes) -> Row:
    """A run from a cold page cache against the larger of its two floors: copying the input from
    a cold cache, and the same run with the input already cached."""
    row = Row("cold_read")
    model, recipe = deepseek_checkpoint(sizes), deepseek_recipe(sizes)
    size = safetensors_bytes(model)
    copy_s, copy_cold = sequential_read_seconds(model)
    cold = streamq_run(recipe, model, "cpu", cold=True)
    hot = streamq_run(recipe, model, "cpu", cold=False)
    row.commands += [command_line(deepseek_synth_argv(sizes)), recipe_command(recipe),
                     f"sync; echo 3 > /proc/sys/vm/drop_caches; time cat {shown(model)}/*.safetensors > /dev/null",
                     f"sync; echo 3 > /proc/sys/vm/drop_caches; {PYTHON_SHOWN} -c 'import streamq.cli, "
                     f"streamq.pipeline'; time {cold.command}",
                     f"cat {shown(model)}/*.safetensors > /dev/null; time {hot.command}"]
    cache = "cold cache" if copy_cold and cold.cold else "warm cache (page cache could not be dropped)"
    layers = f"{sizes.ds_layers} layers, {sizes.ds_experts} routed experts"
    row.add(f"copy of the input ({size / MB:.0f} MB bf16, {layers})", f"{copy_s:.1f} s",
            f"`cat` to /dev/null, {size / MB / copy_s:.0f} MB/s, {cache}")
    for name, run in (("cold", cold), ("hot", hot)):
        row.add(f"streamq run, {name} cache", f"{run.wall_s:.1f} s",
                f"{run.cpu_s:.0f} s CPU, peak RSS {mib(run.peak_rss_bytes)}; data-free W8A8_DYNAMIC, bf16 compute")
    floor = max(copy_s, hot.wall_s)
    ratio = cold.wall_s / floor
    row.add("ratio cold run / max(cold copy, hot run)", f"{ratio:.2f}",
            f"target ≤ {COLD_READ_TARGET}: {'met' if ratio <= COLD_READ_TARGET else 'MISSED'}; "
            f"the floor is the {'hot run' if hot.wall_s >= copy_s else 'copy'}; hot/cold CPU "
            f"{hot.cpu_s:.0f}/{cold.cpu_s:.0f} s shows how far other load moved between them")
    return row


def smollm2(sizes: Sizes) -> Row:
    """The repo recipes on a real 135M model: time, memory, compression, error."""
    row = Row("smollm2")
    if not (SMOLLM2 / "config.json").exists():
        row.add("skipped", "–", f"{shown(SMOLLM2)}/config.json is missing: run `make demo` "
                f"(or `{PYTHON_SHOWN} -m streamq.smollm2 {shown(SMOLLM2)}`) first")
        return row
    size = safetensors_bytes(SMOLLM2)
    for name in ("w8a8_dynamic", "w4a16_g64"):
        recipe = REPO / "recipes" / f"{name}.toml"
        if sizes.smollm2_samples:
            recipe = with_samples(recipe, sizes.smollm2_samples)
            row.commands.append(recipe_command(recipe))
        run = streamq_run(recipe, SMOLLM2, None)
        row.commands.append(run.command)
        out = run.report["output_bytes"]
        calib = f" (calibration cut to {sizes.smollm2_samples} samples)" if sizes.smollm2_samples else ""
        row.add(f"{name}: wall", f"{run.wall_s:.1f} s", f"{run.report['total_seconds']:.1f} s inside steps{calib}")
        row.add(f"{name}: peak RSS", mib(run.peak_rss_bytes),
                f"streamq's own report: {mib(run.report['peak_rss_bytes'])}")
        row.add(f"{name}: output / input bytes", f"{out / MB:.0f} / {size / MB:.0f} MB",
                f"{size / out:.2f}× smaller; {run.report['linears_by_scheme']}")
        row.add(f"{name}: mean per-layer rel_error", f"{run.mean_rel_error():.2e}",
                f"over {len(run.layer_seconds())} layers")
    return row


def eval_rss(sizes: Sizes) -> Row:
    """`streamq eval` keeps one layer of each model resident: its peak RSS must not grow with depth."""
    row = Row("eval_rss")
    recipe = synthetic_recipe(sizes)
    peaks = {}
    for layers in (sizes.shallow, sizes.deep):
        model = synthetic_checkpoint(sizes, layers)
        out = WORK / "out" / f"{model.name}-eval"
        quantize = [PYTHON, "-m", "streamq", "run", recipe, "--model", model, "--output", out, "--restart",
                    "--device", "cpu"]
        measure(quantize, WORK / "logs" / f"{out.name}-run.log")
        argv = [PYTHON, "-m", "streamq", "eval", "--reference", model, "--quantized", out,
                "--samples", str(sizes.samples), "--seq-len", str(sizes.seq_len)]
        print(f"  $ {command_line(argv)}", flush=True)
        peaks[layers] = measure(argv, WORK / "logs" / f"{out.name}.log")["peak_rss_bytes"]
        row.commands += [command_line(quantize), command_line(argv)]
        row.add(f"eval peak RSS, {layers} layers", mib(peaks[layers]))
        shutil.rmtree(out)
    ratio = peaks[sizes.deep] / peaks[sizes.shallow]
    row.add(f"eval peak RSS ratio {sizes.deep}/{sizes.shallow} layers", f"{ratio:.3f}",
            f"target ≤ {RSS_DEPTH_TARGET:.2f}: {'met' if ratio <= RSS_DEPTH_TARGET else 'MISSED'}")
    return row


ROWS = {"rss_depth": rss_depth, "throughput": throughput, "layer_cost": layer_cost, "cold_read": cold_read,
        "smollm2": smollm2, "eval_rss": eval_rss}


# ---------------------------------------------------------------------------------------------
# Report


def machine_facts() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"machine: {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, {gpu}",
            f"software: Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"]


def markdown(rows: list[Row], sizes: Sizes, argv: list[str]) -> str:
    mode = "quick (`--quick`: smaller models and calibration)" if sizes is QUICK else "full sizes"
    lines = ["# streamq benchmarks", "", *(f"- {fact}" for fact in machine_facts()), f"- mode: {mode}",
             f"- command: `{' '.join([PYTHON_SHOWN, 'bench/run.py', *argv])}`", "",
             "Timings come from a shared machine; compare the ratios, which are measured within this run.", "",
             "| row | measurement | value | note |", "|---|---|---|---|"]
    for row in rows:
        for what, value, note in row.measurements:
            lines.append(f"| {row.name} | {what} | {value} | {note} |")
    lines += ["", "## Reproducing a row", ""]
    for row in rows:
        quick = " --quick" if sizes is QUICK else ""
        by_hand = ["# or by hand:", *row.commands] if row.commands else []
        lines += [f"`{row.name}`:", "", "```sh", f"{PYTHON_SHOWN} bench/run.py --only {row.name}{quick}",
                  *by_hand, "```", ""]
    return "\n".join(lines)


def run_row(name: str, sizes: Sizes) -> Row:
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    try:
        row = ROWS[name](sizes)
    except Exception as exc:  # one failing row must not lose the others' measurements
        row = Row(name, failed=True)
        row.add("error", "–", str(exc).replace("\n", " ").replace("|", "/")[:400])
    for what, value, note in row.measurements:
        print(f"  {what}: {value}  ({note})" if note else f"  {what}: {value}", flush=True)
    print("  reproduce:", flush=True)
    for command in row.commands:
        print(textwrap.indent(command, "    "), flush=True)
    print(f"  [{name} took {time.perf_counter() - t0:.0f} s]", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(ROWS), action="append",
                    help="run this row (repeatable; writes bench/work/run/results-NAME.md)")
    ap.add_argument("--quick", action="store_true", help="smaller models and calibration")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in bench/work/run")
    ap.add_argument("--out", type=Path, help="where to write the Markdown table")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    sizes = QUICK if args.quick else FULL
    names = args.only or list(ROWS)
    # A partial run must not replace the full table.
    out = args.out or (WORK / f"results-{'-'.join(args.only)}.md" if args.only else BENCH / "results.md")
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_row(name, sizes) for name in names]
    finally:
        if not args.keep:
            for path in [*WORK.glob("llama-*"), *WORK.glob("deepseek-rw-*"), WORK / "out"]:
                shutil.rmtree(path, ignore_errors=True)
    text = markdown(rows, sizes, argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    print(f"wrote {shown(out)}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
