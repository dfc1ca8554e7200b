"""DeepSeek-R1 memory/time benchmark: host RSS against routed-expert count, and a projection for
the full DeepSeek-R1 671B on one 64 GB accelerator card.

Every checkpoint is synthetic, written by `streamq synth deepseek-v3 --real-widths`: each tensor has
DeepSeek-R1's real shape (hidden 7168, expert width 2048, MLA ranks 1536/512/64/128/128, 128
heads), FP8 with 128x128 block scales; only the layer count, the expert count and the vocabulary
are small. The recipe is recipes/deepseek_r1_w4a8.toml with the calibration set and the run
options shrunk, and the expert budget set so that one chunk holds exactly 4 experts.

Runs (each `streamq run` is a child of this script; its peak RSS is read twice, independently of
streamq's own counters: ru_maxrss of the child from wait4, and psutil polled every 20 ms, the
samples attributed to the step that was running):

    E8         3 layers (1 dense + 2 MoE), 8 routed experts, calibration S x L, chunks of 4
    E8-tok     the same checkpoint, 4x the calibration tokens            (token scaling)
    E32        3 layers, 32 routed experts, chunks of 4
    narrow-cN  a narrow FP8 checkpoint (hidden = expert width = 2048, 32 experts), chunks of 4, 8, 16:
               host bytes per expert parameter held (scale-free, so cheap to measure)

The machine is shared: absolute times are indicative, ratios are taken within one invocation, and
per-step costs are also read as CPU seconds. About 16 min on 2 busy cores; --extras none skips the
token and chunk runs (about 11 min). Each run records a hash of streamq's sources.

    .venv/bin/python bench/deepseek.py                   # everything -> bench/deepseek.md
    .venv/bin/python bench/deepseek.py --large 16        # 16 experts instead of 32
    .venv/bin/python bench/deepseek.py --mtp             # checkpoints with the MTP layer
    .venv/bin/python bench/deepseek.py --project-only    # the projection from a saved run (work/deepseek/runs.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("DS_WORK", REPO / "bench" / "work" / "deepseek"))
RECIPE = REPO / "recipes" / "deepseek_r1_w4a8.toml"
MD = REPO / "bench" / "deepseek.md"
PY = sys.executable
GiB, MiB, GB = 2**30, 2**20, 10**9
RSS_TARGET = 1.10
CHUNK = 4                      # experts per chunk in the main runs
STEP_LINE = re.compile(r"^\s*(embed|final|mtp|layer\.\d+): ([0-9.]+)s peak_rss=")
CDTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

sys.path.insert(0, str(REPO))
from streamq.arch.deepseek_v3 import DeepseekArch  # noqa: E402
from streamq.checkpoint import FP8_SCALE_SUFFIX, TensorInfo  # noqa: E402
from streamq.plan import build_plan  # noqa: E402
from streamq.quant.schemes import specs_for  # noqa: E402
from streamq.recipe import load_recipe  # noqa: E402
from streamq.synth import deepseek_v3_config, deepseek_v3_specs, scale_inv_shape  # noqa: E402


def source_fingerprint() -> str:
    """What was measured: a hash of streamq's sources and the recipe (the package changes often)."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted([*(REPO / "streamq").rglob("*.py"), RECIPE]):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def rel(p: Path) -> str:
    return os.path.relpath(p, REPO)


def cmdline(cmd: list[str]) -> str:
    return shlex.join([".venv/bin/python" if c == PY else rel(Path(c)) if c.startswith(str(REPO)) else c
                       for c in cmd])


# ---------------------------------------------------------------------------------------------
# Running a child and measuring it


@dataclass
class Measured:
    cmd: str
    wall: float
    rc: int
    ru_maxrss: int                 # bytes, from wait4
    poll_peak: int                 # bytes, psutil every 20 ms
    step_peak: dict                # step -> peak polled RSS while it ran (bytes)
    step_file: dict                # step -> RssFile (mapped file pages) at that peak
    step_cpu: dict                 # step -> CPU seconds (user + system, all threads) it used
    cpu: float                     # CPU seconds of the whole child (wait4)
    samples: int


def measure(cmd: list[str], log: Path) -> Measured:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = psutil.Process(p.pid)
    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []
    done = threading.Event()

    status, stat = Path(f"/proc/{p.pid}/status"), Path(f"/proc/{p.pid}/stat")
    tick = os.sysconf("SC_CLK_TCK")

    def poll():
        # /proc/PID/status: VmRSS and its file-backed part (safetensors' memory maps) in one read
        while not done.is_set():
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                rss, rss_file = (int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssFile"))
                ticks = stat.read_text().rsplit(")", 1)[1].split()
                cpu = (int(ticks[11]) + int(ticks[12])) / tick      # utime + stime
            except (OSError, KeyError, ValueError, IndexError):
                break
            if rss:
                samples.append((time.monotonic() - t0, rss, rss_file, cpu))
            done.wait(0.02)

    def read():
        buf = b""
        with open(log, "wb") as f:
            while chunk := p.stdout.read1(65536):
                f.write(chunk)
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for line in lines:
                    m = STEP_LINE.match(line.decode(errors="replace"))
                    if m:
                        marks.append((time.monotonic() - t0, m.group(1)))

    threads = [threading.Thread(target=poll, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    done.set()
    for t in threads:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    # A step's samples: after the previous step's line, up to its own (load, compute, commit).
    step_peak, step_file, step_cpu, start, cpu0 = {}, {}, {}, 0.0, 0.0
    for t_end, step in marks:
        inside = [(r, f, c) for t, r, f, c in samples if start < t <= t_end]
        step_peak[step], step_file[step], _ = max(inside, default=(0, 0, 0))
        cpu1 = max((c for _, _, c in inside), default=cpu0)
        step_cpu[step], start, cpu0 = cpu1 - cpu0, t_end, cpu1
    return Measured(cmdline(cmd), wall, p.returncode, usage.ru_maxrss * 1024,
                    max((r for _, r, _, _ in samples), default=0), step_peak, step_file, step_cpu,
                    usage.ru_utime + usage.ru_stime, len(samples))


def synth_cmd(out: Path, experts: int, layers: int, vocab: int, mtp: bool) -> list[str]:
    return [PY, "-m", "streamq", "synth", "deepseek-v3", "--out", str(out), "--layers", str(layers),
            "--experts", str(experts), "--fp8", "--real-widths", "--vocab", str(vocab)] + (["--mtp"] if mtp else [])


def reusable(ckpt: Path, experts: int, a) -> bool:
    """A checkpoint left by an earlier `--keep` / interrupted invocation with the same shape."""
    try:
        c = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (c.get("n_routed_experts"), c.get("num_hidden_layers"), c.get("vocab_size"),
            c.get("num_nextn_predict_layers", 0), c.get("hidden_size")) == (experts, 3, a.vocab, int(a.mtp), 7168)


def synth(out: Path, experts: int, layers: int, vocab: int, mtp: bool, log: Path) -> tuple[str, float, int]:
    cmd = synth_cmd(out, experts, layers, vocab, mtp)
    t0 = time.monotonic()
    with open(log, "wb") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"synth failed ({r.returncode}); see {rel(log)}")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return cmdline(cmd), time.monotonic() - t0, size


# ---------------------------------------------------------------------------------------------
# Recipe


def per_expert_bytes(hidden: int, moe_inter: int, cdt: str) -> int:
    """What moe._expert_chunks counts per expert: 3 weights in the compute dtype."""
    return 3 * hidden * moe_inter * torch.finfo(CDTYPES[cdt]).bits // 8


def budget_for(chunk: int, per_expert: int) -> float:
    """An expert_budget_gb whose chunk (int(budget·1e9) // per_expert) is exactly `chunk`."""
    budget = round((chunk + 0.5) * per_expert / 1e9, 6)
    assert int(budget * 1e9) // per_expert == chunk, (budget, per_expert, chunk)
    return budget


def write_recipe(path: Path, samples: int, seq_len: int, batch: int, cdt: str, budget: float) -> dict:
    """recipes/deepseek_r1_w4a8.toml with only the calibration size and [run] changed."""
    text = RECIPE.read_text()
    text, n1 = re.subn(r"(?m)^samples = \d+", f"samples = {samples}", text)
    text, n2 = re.subn(r"(?m)^seq_len = \d+", f"seq_len = {seq_len}", text)
    head, sep, run = text.partition("\n[run]\n")
    if (n1, n2, bool(sep)) != (1, 1, True) or "\n[" in run:
        sys.exit(f"{rel(RECIPE)} changed shape: cannot shrink its calibration / [run] table")
    for key, value in (("device", '"cpu"'), ("batch_size", batch), ("compute_dtype", f'"{cdt}"'),
                       ("expert_budget_gb", budget)):
        run, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", run)
        if not n:
            run = run.rstrip("\n") + f"\n{key} = {value}\n"
    text = head + sep + run
    path.write_text(text)
    doc = tomllib.loads(text)
    assert doc["calibration"]["samples"] == samples and doc["run"]["expert_budget_gb"] == budget
    return doc["run"]


# ---------------------------------------------------------------------------------------------
# The benchmark runs


def run_quant(tag: str, ckpt: Path, recipe: Path, experts: int) -> dict:
    out = WORK / f"out-{tag}"
    cmd = [PY, "-m", "streamq", "run", str(recipe), "--model", str(ckpt), "--output", str(out), "--restart"]
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: {cmdline(cmd)}", flush=True)
    source = source_fingerprint()
    m = measure(cmd, WORK / f"{tag}.log")
    if m.rc:
        sys.exit(f"{tag}: streamq run failed ({m.rc}); see {rel(WORK / f'{tag}.log')}")
    report = json.loads((out / "streamq_report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    moe = [k for k in steps if k.startswith("layer.") and k != "layer.0"]
    res = {
        "tag": tag, "experts": experts, "cmd": m.cmd, "wall": m.wall, "ru_maxrss": m.ru_maxrss,
        "poll_peak": m.poll_peak, "samples": m.samples, "step_peak": m.step_peak, "step_file": m.step_file,
        "step_cpu": m.step_cpu, "cpu": m.cpu, "source": source,
        "steps": report["steps"], "output_bytes": report["output_bytes"],
        "dense_s": steps["layer.0"]["seconds"],
        "moe_s": sum(steps[k]["seconds"] for k in moe) / len(moe),
        "dense_cpu": m.step_cpu.get("layer.0", 0.0),
        "moe_cpu": sum(m.step_cpu.get(k, 0.0) for k in moe) / len(moe),
        "mtp_s": steps["mtp"]["seconds"] if "mtp" in steps else None,
        "moe_peak": max(m.step_peak.get(k, 0) for k in moe),
        "dense_peak": m.step_peak.get("layer.0", 0),
    }
    if source_fingerprint() != source:
        res["source_changed"] = True
    print(f"    wall {m.wall:.0f}s  cpu {m.cpu:.0f}s  ru_maxrss {m.ru_maxrss / MiB:.0f} MiB  MoE-step peak {res['moe_peak'] / MiB:.0f} MiB"
          f"  dense {res['dense_s']:.1f}s  MoE {res['moe_s']:.1f}s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


NARROW = 2048
NARROW_EXPERTS = 32


def chunk_check(a) -> dict:
    """Host bytes per expert parameter that a chunk holds: the MoE-step peak RSS of one narrow
    checkpoint quantized with chunks of 4, 8 and 16 experts, fitted linearly."""
    ckpt, experts = WORK / "ckpt-narrow", NARROW_EXPERTS
    cmd = [PY, "-m", "streamq", "synth", "deepseek-v3", "--out", str(ckpt), "--layers", "2", "--experts",
           str(experts), "--hidden", str(NARROW), "--moe-intermediate", str(NARROW), "--fp8", "--vocab", str(a.vocab)]
    print(f"[{time.strftime('%H:%M:%S')}] synth narrow", flush=True)
    with open(WORK / "synth-narrow.log", "wb") as f:
        if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit("narrow synth failed; see bench/work/deepseek/synth-narrow.log")
    per_expert = per_expert_bytes(NARROW, NARROW, a.dtype)
    out = {"synth_cmd": cmdline(cmd), "params_per_expert": 3 * NARROW * NARROW, "runs": {}, "experts": experts}
    for chunk in (4, 8, 16):
        path = WORK / f"recipe-narrow-c{chunk}.toml"
        write_recipe(path, a.samples, a.seq_len, a.batch, a.dtype, budget_for(chunk, per_expert))
        out["read_ahead"] = bool(getattr(load_recipe(path).run, "read_ahead", False))
        r = run_quant(f"narrow-c{chunk}", ckpt, path, experts)
        out["runs"][chunk] = {"cmd": r["cmd"], "moe_peak": r["moe_peak"], "moe_s": r["moe_s"],
                              "ru_maxrss": r["ru_maxrss"], "source": r["source"],
                              "source_changed": r.get("source_changed", False)}
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def held(chunk: int, experts: int, read_ahead: bool) -> int:
    """Experts whose source a MoE step holds at once: its chunk, and the next one when read ahead."""
    return min(experts, 2 * chunk if read_ahead else chunk)


def chunk_fit(ch: dict) -> dict:
    """Least-squares slope of the MoE-step peak RSS against the experts held."""
    E, ra = ch.get("experts", 16), ch.get("read_ahead", True)
    pts = [(held(int(c), E, ra), r["moe_peak"]) for c, r in ch["runs"].items()]
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / var if var else float("nan")
    return {"slope": slope, "bytes_per_param": slope / ch["params_per_expert"], "points": pts,
            "experts": E, "read_ahead": ra}


def matmul_gflops(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """GFLOP per CPU second of a matmul at an expert's shape (for the attention term only). Per CPU
    second, like the step costs, so that other jobs on the machine do not lower it."""
    a, b = torch.randn(1024, 7168, dtype=dtype), torch.randn(7168, 2048, dtype=dtype)
    a @ b
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 7168 * 2048 * n / (time.process_time() - c0) / 1e9


def benchmark(a) -> dict:
    usage = shutil.disk_usage(REPO / "bench")
    need = 20 * GB if a.large > 16 else 12 * GB
    if usage.free < need:
        sys.exit(f"only {usage.free / GB:.0f} GB free on the bench disk; this benchmark needs about {need / GB:.0f} GB")
    WORK.mkdir(parents=True, exist_ok=True)
    cfg = deepseek_v3_config(real_widths=True)
    per_expert = per_expert_bytes(cfg.hidden_size, cfg.moe_intermediate_size, a.dtype)
    recipes = {}
    for name, (s, l, chunk) in {"base": (a.samples, a.seq_len, CHUNK),
                                "tok": (a.samples * 2, a.seq_len * 2, CHUNK)}.items():
        path = WORK / f"recipe-{name}.toml"
        write_recipe(path, s, l, a.batch, a.dtype, budget_for(chunk, per_expert))
        recipes[name] = (path, s, l, chunk)
    load0, t_start = os.getloadavg(), time.monotonic()
    res = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": load0,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
           "per_expert_bytes": per_expert, "runs": {}, "synth": {},
           "recipes": {k: [rel(v[0]), v[1], v[2], v[3]] for k, v in recipes.items()}}
    json.dumps(res)  # fail now, not after the runs
    try:
        if "chunk" in a.extras:
            res["chunk"] = chunk_check(a)
        for experts, variants in ((a.small, ("base", "tok")), (a.large, ("base",))):
            ckpt = WORK / f"ckpt-e{experts}"
            if a.reuse and reusable(ckpt, experts, a):
                print(f"[{time.strftime('%H:%M:%S')}] reusing {rel(ckpt)}", flush=True)
                cmd = synth_cmd(ckpt, experts, 3, a.vocab, a.mtp)
                secs, size = None, sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
            else:
                print(f"[{time.strftime('%H:%M:%S')}] synth {experts} experts", flush=True)
                cmd, secs, size = synth(ckpt, experts, 3, a.vocab, a.mtp, WORK / f"synth-e{experts}.log")
            res["synth"][str(experts)] = {"cmd": cmd, "seconds": secs, "bytes": size}
            for v in variants:
                if v != "base" and v not in a.extras:
                    continue
                tag = f"e{experts}" + ("" if v == "base" else f"-{v}")
                path, s, l, chunk = recipes[v]
                r = run_quant(tag, ckpt, path, experts)
                r.update(variant=v, calib_samples=s, calib_seq_len=l, chunk=chunk)
                res["runs"][tag] = r
                (WORK / "runs.partial.json").write_text(json.dumps(res, indent=1))
            if not a.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not a.keep:
            for p in [*WORK.glob("ckpt-e*"), WORK / "ckpt-narrow"]:
                shutil.rmtree(p, ignore_errors=True)
            for p in [*WORK.glob("out-e*"), *WORK.glob("out-narrow*")]:
                shutil.rmtree(p, ignore_errors=True)
    res["matmul_gflops_cpu"] = matmul_gflops(CDTYPES[a.dtype])
    res["load_after"], res["total_s"] = os.getloadavg(), time.monotonic() - t_start
    (WORK / "runs.json").write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------
# DeepSeek-R1 671B: sizes from the real config, through streamq's own plan


class SpecReader:
    """The reader interface build_plan needs, for a checkpoint that exists only as a tensor list
    (the one `streamq synth --fp8` would write for the config)."""

    def __init__(self, config):
        self.tensors, self.input_bytes = {}, 0
        for s in deepseek_v3_specs(config):
            dtype = torch.float8_e4m3fn if s.init == "linear" else (s.dtype or torch.bfloat16)
            self.tensors[s.name] = TensorInfo(s.name, Path("spec"), dtype, s.shape)
            self.input_bytes += math.prod(s.shape) * dtype.itemsize
            if s.init == "linear":
                shape = scale_inv_shape(s.shape)
                self.tensors[s.name + FP8_SCALE_SUFFIX] = TensorInfo(s.name + FP8_SCALE_SUFFIX, Path("spec"),
                                                                     torch.float32, shape)
                self.input_bytes += math.prod(shape) * 4

    def info(self, name):
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors


def plan_bytes(config) -> tuple[int, int]:
    """(input FP8 checkpoint bytes, output bytes) for `config` under the R1 W4A8 recipe."""
    reader = SpecReader(config)
    arch = DeepseekArch(config, has_lm_head=True, names=set(reader.tensors))
    plan = build_plan(load_recipe(RECIPE), arch.steps(), reader, torch.bfloat16)
    return reader.input_bytes, sum(t.nbytes for s in plan.shards for t in s)


@dataclass
class R1:
    """DeepSeek-R1's widths (streamq.synth's "real" table, which is R1's config.json)."""
    c: object

    @property
    def h(self):
        return self.c.hidden_size

    def mla(self) -> int:
        c = self.c
        H, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        return (c.q_lora_rank * c.hidden_size + H * qk * c.q_lora_rank
                + (c.kv_lora_rank + c.qk_rope_head_dim) * c.hidden_size
                + H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank + c.hidden_size * H * c.v_head_dim)

    def expert(self) -> int:
        return 3 * self.h * self.c.moe_intermediate_size

    def shared(self) -> int:
        return self.expert() * self.c.n_shared_experts

    def router(self) -> int:
        return self.c.n_routed_experts * self.h

    def dense_mlp(self) -> int:
        return 3 * self.h * self.c.intermediate_size

    def attn_core_flops(self, L: int) -> float:
        """QK^T and AV per token per pass, causal (a query sees L/2 keys on average)."""
        c = self.c
        return 2 * c.num_attention_heads * (L / 2) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)

    def live_act_width(self) -> int:
        """Elements per token alive at the MLA's peak (inside the attention call): the layer input
        and its norm, q_b's output and the concatenated query, kv_b's output, the key, the
        attention output."""
        c = self.c
        H, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        return 2 * self.h + 2 * H * qk + H * (c.qk_nope_head_dim + c.v_head_dim) + H * qk + H * c.v_head_dim


def project(res: dict, a) -> tuple[list, dict]:
    """The DeepSeek-R1 671B projection: rows of (quantity, value, formula / assumption)."""
    c = deepseek_v3_config(layers=61, first_k_dense=3, experts=256, mtp=True, real_widths=True)
    r = R1(c)
    E, k, h = c.n_routed_experts, c.num_experts_per_tok, c.hidden_size
    n_dense, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
    S, L, B = 128, 2048, 4                      # calibration samples, tokens, the recipe's batch_size
    T = S * L
    card, disk_bw = 64 * GB, 3 * GB
    acc_tflops, host_cores, pcie = 100.0, 32, 25 * GB
    rows = []

    def row(q, v, how):
        rows.append((q, v, how))

    # -- sizes ---------------------------------------------------------------------------------
    in_bytes, out_bytes = plan_bytes(c)
    row("config", f"{c.num_hidden_layers} layers ({n_dense} dense + {n_moe} MoE) + 1 MTP, {E} routed experts "
        f"(top-{k}) + {c.n_shared_experts} shared, hidden {h}, expert width {c.moe_intermediate_size}, dense MLP "
        f"{c.intermediate_size}, vocab {c.vocab_size}", "DeepSeek-R1 config.json (= streamq.synth real widths)")
    row("calibration", f"{S} samples x {L} tokens = {T:,} tokens, batch_size {B}", "recipe deepseek_r1_w4a8.toml")
    row("input checkpoint (FP8)", f"{in_bytes / GB:.0f} GB", "streamq's tensor list for R1: linears 1 B/param + "
        "fp32 128x128 block scales, embeddings / norms / router bf16 (the round figure usually quoted: 671 GB)")
    row("output checkpoint", f"{out_bytes / GB:.0f} GB", "streamq.plan.build_plan on R1's tensor list with the "
        "W4A8 recipe (round estimate: ~370 GB)")

    # -- device --------------------------------------------------------------------------------
    cdt = 2
    base_moe = cdt * (r.mla() + r.shared()) + 4 * r.router()
    base_dense = cdt * (r.mla() + r.dense_mlp())
    base_mtp = base_moe + cdt * 2 * h * h
    base_max = max(base_moe, base_mtp, base_dense)
    budget = float(tomllib.loads(RECIPE.read_text())["run"]["expert_budget_gb"])
    pe = per_expert_bytes(h, c.moe_intermediate_size, "bfloat16")
    chunk_n = min(E, int(budget * 1e9) // pe)
    chunk = chunk_n * pe
    act = B * L * cdt * r.live_act_width()
    scores = B * c.num_attention_heads * L * L * 4
    expert_act = B * L * (cdt * h + 3 * cdt * c.moe_intermediate_size + 4 * h)
    dev_sum = base_max + chunk + act
    dev_real = max(base_max + act, 2 * pe + expert_act)
    row("device: one layer's non-expert weights (bf16)",
        f"MoE {base_moe / GB:.2f} GB, MTP {base_mtp / GB:.2f} GB, dense {base_dense / GB:.2f} GB",
        f"2 B x (MLA {r.mla() / 1e6:.1f}M + shared expert {r.shared() / 1e6:.1f}M) + router {r.router() / 1e6:.2f}M "
        f"in fp32; MTP adds eh_proj 2h x h; dense layers: MLA + dense MLP {r.dense_mlp() / 1e6:.0f}M")
    row("device: one chunk of experts (formula)", f"{chunk_n} experts = {chunk / GB:.2f} GB",
        f"chunk = floor(expert_budget_gb {budget:g} GB / (3 x {h} x {c.moe_intermediate_size} x 2 B = "
        f"{pe / 1e6:.1f} MB)) experts (moe._expert_chunks)")
    row("device: one calibration batch's activations", f"{act / GB:.2f} GB (+{scores / GB:.1f} GB if the "
        f"attention is not a fused kernel)",
        f"B x L x 2 B x {r.live_act_width():,} elements/token alive inside the MLA (2h input+norm, q_b out and "
        f"query H x 192 each, kv_b out H x 256, key H x 192, attention out H x 128); unfused: B x H x L^2 x 4 B "
        f"scores; an expert's token batch needs only {expert_act / GB:.2f} GB")
    row("**peak device memory**", f"**{dev_sum / GB:.1f} GB** by the formula; {dev_real / GB:.1f} GB as "
        f"moe.py schedules it; {card // GB} GB card: fits either way",
        "formula: largest non-expert weights + one chunk + one batch's activations. The measured moe.py builds "
        "each expert on the device alone (the chunk is the unit read from disk, kept on the host) and drops "
        "the base before the experts, so its peak is max(base + activations, ~2 experts + an expert batch)")
    # -- host ----------------------------------------------------------------------------------
    hid = T * h * 4
    e_params = r.expert()
    chunk_bpp = 2                                       # bf16 dequantized source per expert parameter held
    measured_bpp = chunk_fit(res["chunk"])["bytes_per_param"] if "chunk" in res else None
    ra = bool(getattr(load_recipe(RECIPE).run, "read_ahead", False))
    bpp = max(chunk_bpp, measured_bpp or 0)
    chunk_host = held(chunk_n, E, ra) * e_params * bpp
    emb32 = c.vocab_size * h * 4
    mtp_base_host = base_mtp + 2 * 2 * c.vocab_size * h    # its base plus its own embed_tokens and head (bf16)
    moe_host = 5 * hid + chunk_host + mtp_base_host      # the last MoE layer reads the MTP base ahead
    finish_host = 6 * hid
    mtp_host = 7 * hid + emb32 + chunk_host
    mtp_finish = 8 * hid + emb32
    host_peak = max(moe_host, finish_host, mtp_host, mtp_finish)
    row("host: one copy of the hidden states", f"{hid / GB:.2f} GB", f"{S} x {L} x {h} x 4 B (fp32)")
    row("host: copies alive in a MoE layer", f"5 during the experts ({5 * hid / GB:.1f} GB), 6 at the end "
        f"({finish_host / GB:.1f} GB)", "the input H (still held by the pipeline loop) and, per pass F and Q, "
        "out = h1 + shared and x = the MoE input, all fp32 [S, L, h] (moe._run_base); moe._finish's "
        "(Q.out - F.out) is a 6th, transient; the commit's safetensors save_file serializes one more copy, "
        "after F and Q are freed")
    row("host: copies alive in the MTP step", f"7 during the experts + the embedding in fp32 ({emb32 / GB:.1f} GB); "
        f"8 at the end", "moe.step_mtp adds h_main = norm(H[:, :-1]) and next_embeds = embed[ids[:, 1:]] (both "
        "fp32, full size) and holds model.embed_tokens as fp32 for the whole step")
    row("host: expert chunks", f"{held(chunk_n, E, ra)} experts x {e_params / 1e6:.1f}M params x {bpp:.2f} B = "
        f"{chunk_host / GB:.1f} GB", f"the chunk being quantized ({chunk_n} experts)"
        + (" and the next one, read ahead (run.read_ahead)" if ra else "")
        + f", dequantized to bf16: {chunk_bpp} B per expert parameter held"
        + (f" (measured {measured_bpp:.2f} B/param, section 1; the larger is used)" if measured_bpp else "")
        + "; each expert is written and freed as soon as it is quantized")
    row("**peak host RAM**", f"**{host_peak / GB:.0f} GB** (MTP step); MoE layer {max(moe_host, finish_host) / GB:.0f} "
        f"GB", f"MoE: 5 x hidden + chunks + the next step's base read ahead (at most the MTP base with its bf16 "
        f"embedding and head, {mtp_base_host / GB:.1f} GB) = {moe_host / GB:.1f} GB; MTP: 7 x hidden + fp32 "
        f"embedding + chunks = {mtp_host / GB:.1f} GB, at its end 8 x hidden + embedding = {mtp_finish / GB:.1f} GB")

    # -- time (CPU seconds: the machine is shared, and CPU time is what the work itself costs) --
    runs = res["runs"]
    e8, eL = runs[f"e{a.small}"], runs[f"e{a.large}"]
    t_meas = a.samples * a.seq_len
    c_exp = (eL["moe_cpu"] - e8["moe_cpu"]) / (a.large - a.small)
    c_exp_wall = (eL["moe_s"] - e8["moe_s"]) / (a.large - a.small)
    base8 = e8["moe_cpu"] - a.small * c_exp
    tok = runs.get(f"e{a.small}-tok")
    gf = res["matmul_gflops_cpu"]                       # GFLOP per CPU second
    flops_moe = 2 * 2 * (r.mla() + r.shared() + r.router() + k * r.expert()) + 2 * r.attn_core_flops(L)
    flops_dense = 2 * 2 * (r.mla() + r.dense_mlp()) + 2 * r.attn_core_flops(L)
    if tok:
        t_tok = tok["calib_samples"] * tok["calib_seq_len"]
        tau_moe = max(0.0, (tok["moe_cpu"] - e8["moe_cpu"]) / (t_tok - t_meas))
        tau_dense = max(0.0, (tok["dense_cpu"] - e8["dense_cpu"]) / (t_tok - t_meas))
        l_meas = tok["calib_seq_len"]
    else:  # from FLOPs at the measured length and this machine's matmul rate (a lower bound: no overheads)
        l_meas = a.seq_len
        tau_moe = (flops_moe - 2 * r.attn_core_flops(L) + 2 * r.attn_core_flops(l_meas)) / (gf * 1e9)
        tau_dense = (flops_dense - 2 * r.attn_core_flops(L) + 2 * r.attn_core_flops(l_meas)) / (gf * 1e9)
    w_moe = max(0.0, base8 - t_meas * tau_moe)
    w_dense = max(0.0, e8["dense_cpu"] - t_meas * tau_dense)
    cores = a_cores()
    attn_extra = 2 * (r.attn_core_flops(L) - r.attn_core_flops(l_meas)) / (gf * 1e9)          # CPU s/token
    n_moe_like = n_moe + 1                                                                     # + the MTP layer
    cpu_weight = n_dense * w_dense + n_moe_like * (w_moe + E * c_exp)                          # CPU seconds
    cpu_token = T * (n_dense * (tau_dense + attn_extra) + n_moe_like * (tau_moe + attn_extra))
    flops = T * (n_dense * flops_dense + n_moe_like * flops_moe)
    acc_token = flops / (acc_tflops * 1e12)
    xfer = n_moe_like * 2 * T * (k * (2 * h + 4 * h) + 3 * 4 * h) / pcie
    host_weight = cpu_weight / host_cores
    acts_written = (n_dense + n_moe + 1 + 2) * hid
    disk_round = (671 + 370) * GB / disk_bw
    read_s, write_s = in_bytes / disk_bw, (out_bytes + acts_written) / disk_bw
    hr = 3600
    row("measured: per-expert cost", f"{c_exp:.2f} CPU s/expert ({c_exp_wall:.2f} s wall)",
        f"(MoE layer CPU s, E{a.large} - E{a.small}) / {a.large - a.small}: read FP8 + dequantize + quantize "
        f"W4A8 + write, independent of tokens (top-{k} routing gives every token {k} expert evaluations whatever "
        f"E is); CPU s = user + system of all the child's threads during the step")
    row("measured: token-independent part of a MoE base / dense layer", f"{w_moe:.1f} / {w_dense:.1f} CPU s",
        f"MoE layer(E{a.small}) - {a.small} x per-expert - {t_meas} tokens x per-token; dense likewise (floored at 0)")
    row(("measured: " if tok else "") + "per-token cost", f"MoE {tau_moe * 1e3:.2f}, dense {tau_dense * 1e3:.2f} "
        f"CPU ms per token per layer", f"(layer CPU s at {tok['calib_samples']} x {l_meas} tokens - at {a.samples} x "
        f"{a.seq_len}) / token difference (E{a.small}-tok vs E{a.small})" if tok else "not measured (no tok run): "
        "forward FLOPs per token (2 passes) / this machine's matmul rate, a lower bound (ignores fake-quant, norms, "
        "index_add)")
    row("measured: CPU matmul rate", f"{gf:.0f} GFLOP per CPU second ({a.dtype})", "torch matmul 1024x7168 @ "
        f"7168x2048 here; used for the attention's growth from L={l_meas} to L={L}: "
        f"{attn_extra * 1e3:.2f} CPU ms/token/layer")
    row("disk time (round sizes)", f"{disk_round / hr:.2f} h", "(671 GB read + 370 GB written) / 3 GB/s")
    row("disk time (this plan's sizes + activation store)", f"{(read_s + write_s) / hr:.2f} h",
        f"({in_bytes / GB:.0f} GB read + {out_bytes / GB:.0f} GB written + {acts_written / GB:.0f} GB of hidden "
        f"states: the pipeline fsyncs one {hid / GB:.1f} GB copy per step, {n_dense + n_moe + 3} steps) / 3 GB/s")
    row("compute, CPU only (upper bound)", f"{(cpu_weight + cpu_token) / cores / hr:.0f} h on {cores} cores "
        f"(weights {cpu_weight / cores / hr:.1f} h + tokens {cpu_token / cores / hr:.0f} h)",
        f"[{n_dense} x (dense fixed + T x per-token) + {n_moe_like} x (MoE fixed + {E} x per-expert + T x "
        f"per-token)] CPU s / {cores} cores, T = {T:,}; the MTP layer costed as a MoE layer")
    row("compute on the card: forward passes", f"{acc_token / hr:.2f} h ({flops / 1e15:.1f} PFLOP) + copies "
        f"{xfer / hr:.2f} h", f"assumed {acc_tflops:g} TFLOP/s sustained bf16 (about a third of the ~300 TFLOP/s "
        f"peak of a 64 GB Ascend 910B-class card); FLOPs = 2 passes x 2 x (MLA + shared + router + {k} experts) "
        f"per token + causal attention, x T x layers; expert inputs/outputs cross host<->card at an assumed "
        f"{pcie / GB:g} GB/s")
    row("compute on the card: weight processing on the host", f"{host_weight / hr:.1f} h on {host_cores} cores "
        f"({cpu_weight / cores / hr:.1f} h on {cores})", f"streamq dequantizes FP8 (checkpoint.load_weight) and "
        f"quantizes (layerquant.quantize_linears: .float().cpu()) on the host CPU whatever the device; "
        f"{cpu_weight / hr:.1f} CPU hours, assumed to spread over a {host_cores}-core host")
    compute = acc_token + xfer + host_weight
    total = max(read_s, compute) + write_s
    row("**hours, one 64 GB card + 3 GB/s disk**", f"**{total / hr:.1f} h** = max(read {read_s / hr:.2f}, "
        f"compute {compute / hr:.2f}) + writes {write_s / hr:.2f}; {(max(read_s, compute - host_weight + cpu_weight / cores) + write_s) / hr:.1f} h "
        f"with a {cores}-core host", "reads overlap compute (read-ahead of the next layer and chunk); writes and "
        f"their fsyncs are on the main thread; the dominant term is the per-expert host work x "
        f"{n_moe_like * E:,} experts")
    summary = {"in_bytes": in_bytes, "out_bytes": out_bytes, "dev_sum": dev_sum, "dev_real": dev_real,
               "host_peak": host_peak, "chunk_n": chunk_n, "chunk_bpp": chunk_bpp, "c_exp": c_exp,
               "c_exp_wall": c_exp_wall, "hours_total": total / hr}
    return rows, summary


def a_cores() -> int:
    """The cores the measured timings had: this machine's."""
    return os.cpu_count() or 1


def out_bytes_per_expert(c) -> int:
    """Output bytes of one routed expert under the recipe (its three linears' scheme tensors)."""
    recipe = load_recipe(RECIPE)
    h, m = c.hidden_size, c.moe_intermediate_size
    total = 0
    for lin, (n, k) in {"gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}.items():
        name = f"model.layers.{c.first_k_dense_replace}.mlp.experts.0.{lin}"
        args = recipe.args_for(name)
        total += sum(math.prod(shape) * dt.itemsize for _, dt, shape in specs_for(name, n, k, args, torch.bfloat16))
    return total


# ---------------------------------------------------------------------------------------------
# Report


def fmt_mib(b) -> str:
    return f"{b / MiB:,.0f}"


def markdown(res: dict, rows: list, summary: dict, a) -> str:
    runs = res["runs"]
    e8, eL = runs[f"e{a.small}"], runs[f"e{a.large}"]
    lines = ["# DeepSeek-R1: host memory against expert count, and a 671B projection", "",
             f"Generated by `{repro(a)}` "
             f"on {res['started']} ({platform.machine()}, {os.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM, no accelerator, torch {torch.__version__}; "
             f"load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after: other jobs shared "
             f"the machine, so absolute times are indicative and only ratios within this run are compared). "
             f"Whole benchmark: {res['total_s'] / 60:.1f} min." + (f" {a.note}" if a.note else ""), "",
             "Checkpoints: `streamq synth deepseek-v3 --real-widths --fp8` (every tensor has DeepSeek-R1's shape; "
             f"3 layers: layer 0 dense, layers 1-2 MoE{', plus the MTP layer' if a.mtp else ''}; vocab {a.vocab}). "
             f"Recipe: recipes/deepseek_r1_w4a8.toml with calibration {a.samples} x {a.seq_len}, batch_size "
             f"{a.batch}, device cpu, compute_dtype {a.dtype}, and expert_budget_gb chosen so that a chunk holds "
             f"exactly {CHUNK} experts (per expert 3 x 7168 x 2048 x {torch.finfo(CDTYPES[a.dtype]).bits // 8} B = "
             f"{res['per_expert_bytes'] / 1e6:.1f} MB)."
             + ("" if a.dtype == "float32" else " bf16 on this CPU (AVX512-BF16) was fast enough, so no float32 "
                "fallback was needed."), "",
             "Peak RSS is measured outside streamq: `ru_maxrss` of the `streamq run` child (wait4), and psutil polled "
             "every 20 ms, each sample attributed to the step running at the time (a step = load, compute, "
             "write, commit). streamq's own `peak_rss` is the process high-water mark so far, so it cannot show a "
             "later step's peak below an earlier one. CPU seconds (user + system, all threads of the child, "
             "from /proc/PID/stat) are read by the same poll; they are less disturbed by other jobs than wall "
             "seconds, so the per-expert and per-token costs below use them.", "",
             f"streamq source measured: `{src_line(res)}`.", "",
             "## 1. Host RSS and time against routed-expert count", ""]
    lines += ["| run | routed experts | checkpoint | peak RSS (ru_maxrss) | peak RSS (20 ms poll) | peak RSS "
              "in MoE steps | dense layer s (CPU s) | MoE layer s (CPU s), mean of 2 | per expert: MoE s / E "
              "(CPU s / E) | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tag in (f"e{a.small}", f"e{a.large}"):
        r = runs[tag]
        size = res["synth"][str(r["experts"])]["bytes"]
        lines.append(f"| E{r['experts']} | {r['experts']} | {size / GB:.2f} GB | {fmt_mib(r['ru_maxrss'])} MiB | "
                     f"{fmt_mib(r['poll_peak'])} MiB | {fmt_mib(r['moe_peak'])} MiB | {r['dense_s']:.1f} "
                     f"({r['dense_cpu']:.1f}) | {r['moe_s']:.1f} ({r['moe_cpu']:.1f}) | {r['moe_s'] / r['experts']:.2f} "
                     f"({r['moe_cpu'] / r['experts']:.2f}) | {r['wall']:.0f} |")
    ratio = eL["ru_maxrss"] / e8["ru_maxrss"]
    ratio_moe = eL["moe_peak"] / e8["moe_peak"]
    lines += ["", f"- **RSS(E{a.large}) / RSS(E{a.small}) = {ratio:.3f}** (whole run, ru_maxrss; target < "
              f"{RSS_TARGET:.2f}: {'met' if ratio < RSS_TARGET else 'NOT met'}); {eL['poll_peak'] / e8['poll_peak']:.3f} "
              f"by polling; **{ratio_moe:.3f} for the MoE steps alone** (the whole-run peak is the dense layer 0 in "
              "both runs, which hides the MoE steps: this ratio is the one that tests streaming).",
              f"- MoE layer time E{a.large} / E{a.small} = {eL['moe_s'] / e8['moe_s']:.2f} wall, "
              f"{eL['moe_cpu'] / e8['moe_cpu']:.2f} CPU, for {a.large / a.small:.0f}x the experts; marginal cost "
              f"{summary['c_exp']:.2f} CPU s ({summary['c_exp_wall']:.2f} s wall) per expert ((MoE layer E{a.large} - "
              f"E{a.small}) / {a.large - a.small}); one chunk of {CHUNK} experts ~ {CHUNK * summary['c_exp']:.1f} CPU s.",
              ""]
    for tag, r in runs.items():
        extra = {"base": "", "tok": f", {r['calib_samples']} x {r['calib_seq_len']} calibration tokens",
                 }[r["variant"]]
        lines += [f"### {tag.upper()} per step ({r['experts']} experts{extra})", "",
                  f"`{r['cmd']}`", "",
                  "| step | seconds | CPU s | peak RSS while it ran (poll) | of which mapped file pages | RSS at its "
                  "end (report) | rel. error | experts without tokens |", "|---|---|---|---|---|---|---|---|"]
        for s in r["steps"]:
            err = f"{s['rel_error']:.3f}" if s.get("rel_error") is not None else ""
            unr = "" if s.get("experts_without_tokens") is None else str(s["experts_without_tokens"])
            lines.append(f"| {s['step']} | {s['seconds']:.1f} | {r.get('step_cpu', {}).get(s['step'], 0):.1f} | "
                         f"{fmt_mib(r['step_peak'].get(s['step'], 0))} MiB | "
                         f"{fmt_mib(r.get('step_file', {}).get(s['step'], 0))} MiB | {fmt_mib(s['rss'])} MiB | "
                         f"{err} | {unr} |")
        lines.append("")
    ch = res.get("chunk")
    if ch:
        pred, fit = summary["chunk_bpp"], chunk_fit(ch)
        lines += ["### Host memory held per expert of a chunk", "",
                  f"A narrow FP8 checkpoint (2 layers, hidden = expert width = {NARROW}, {fit['experts']} experts; "
                  f"`{ch['synth_cmd']}`) quantized with chunks of 4, 8 and 16 experts. Experts held at once = the "
                  "chunk" + (" plus the next one, read ahead (run.read_ahead), at most all of the layer's"
                             if fit["read_ahead"] else "") + ":", "",
                  "| experts per chunk | experts held | peak RSS of the MoE step | MoE layer s | command |",
                  "|---|---|---|---|---|"]
        for (c, r), (x, _) in zip(ch["runs"].items(), fit["points"]):
            lines.append(f"| {c} | {x} | {fmt_mib(r['moe_peak'])} MiB | {r['moe_s']:.1f} | `{r['cmd']}` |")
        lines += ["", f"Slope {fit['slope'] / 1e6:.1f} MB per expert held, of {ch['params_per_expert'] / 1e6:.1f}M "
                  f"params = **{fit['bytes_per_param']:.2f} B per expert parameter**; predicted from moe.py "
                  f"{pred} B/param (the bf16 dequantized source; each expert's quantized tensors are written and "
                  "freed at once, and the chunk's sources are released expert by expert). At R1's widths that is "
                  f"{fit['bytes_per_param'] * 3 * 7168 * 2048 / 1e6:.0f} MB per expert held; expert_budget_gb sizes "
                  f"the chunk: R1's recipe (8 GB) puts {summary['chunk_n']} experts in a chunk.", ""]
    lines += ["## 2. Projection: DeepSeek-R1 671B on one 64 GB card with a 3 GB/s disk", "",
              "Every size below comes from R1's config widths; the input and output sizes come from streamq's own "
              "plan (streamq.plan.build_plan) over the tensor list of an R1-shaped FP8 checkpoint; the times "
              "come from the measured costs above. Cross-check of that plan against the runs: "
              + ", ".join(f"E{r['experts']} input planned {r['planned_in'] / 1e6:,.0f} MB vs synthesized "
                          f"{res['synth'][str(r['experts'])]['bytes'] / 1e6:,.0f} MB, output planned "
                          f"{r['planned_out'] / 1e6:,.0f} MB vs written {r['output_bytes'] / 1e6:,.0f} MB"
                          for r in runs.values() if r["variant"] == "base")
              + ".", "",
              "| quantity | value | formula / assumption |", "|---|---|---|"]
    lines += [f"| {q} | {v} | {how} |" for q, v, how in rows]
    lines += ["", "## Commands", "",
              "```", repro(a), ""]
    for e, s in res["synth"].items():
        took = "reused" if s["seconds"] is None else f"{s['seconds']:.0f} s"
        lines.append(f"{s['cmd']}    # {took}, {s['bytes'] / GB:.2f} GB")
    for r in runs.values():
        lines.append(r["cmd"])
    lines += ["```", "", "Recipes (in bench/work/deepseek/, rewritten by the script): "
              + "; ".join(f"`{v[0]}` = {v[1]} x {v[2]} tokens, chunks of {v[3]}" for v in res["recipes"].values())
              + ".", ""]
    return "\n".join(lines)


def src_line(res: dict) -> str:
    seen = sorted({r.get("source", "?") for r in res["runs"].values()}
                  | {r.get("source", "?") for r in res.get("chunk", {}).get("runs", {}).values()})
    changed = any(r.get("source_changed") for r in [*res["runs"].values(),
                                                    *res.get("chunk", {}).get("runs", {}).values()])
    note = "" if len(seen) == 1 and not changed else \
        " -- CHANGED while the benchmark ran: the runs measured different code; rerun before comparing"
    return f"sha256[:12] of streamq/**/*.py + the recipe = {', '.join(seen)}{note}"


def repro(a) -> str:
    """The command that reproduces this report (options that differ from the defaults)."""
    cmd = [".venv/bin/python", "bench/deepseek.py"]
    for key, default in (("small", 8), ("large", 32), ("vocab", 4096), ("samples", 4), ("seq_len", 64),
                         ("batch", 2), ("dtype", "bfloat16")):
        if getattr(a, key) != default:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    if a.mtp:
        cmd.append("--mtp")
    if sorted(a.extras) != ["chunk", "tok"]:
        cmd += ["--extras", ",".join(a.extras) or "none"]
    return shlex.join(cmd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=8, help="routed experts of the small checkpoint")
    ap.add_argument("--large", type=int, default=32, help="routed experts of the large checkpoint")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(CDTYPES), default="bfloat16")
    ap.add_argument("--mtp", action="store_true", help="checkpoints with the MTP layer (slower)")
    ap.add_argument("--extras", default="tok,chunk",
                    help="extra runs: tok (the small checkpoint with 4x the calibration tokens), chunk (a narrow "
                         "checkpoint with chunks of 4, 8, 16 experts); comma-separated, or none")
    ap.add_argument("--reuse", action="store_true", help="reuse a same-shaped checkpoint left in bench/work/deepseek")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs in bench/work/deepseek")
    ap.add_argument("--project-only", action="store_true", help="reuse bench/work/deepseek/runs.json")
    ap.add_argument("--out", type=Path, default=MD)
    ap.add_argument("--note", default="", help="a sentence for the report's header (e.g. why --large is not 32)")
    a = ap.parse_args()
    a.extras = [] if a.extras == "none" else a.extras.split(",")
    if a.project_only:
        res = json.loads((WORK / "runs.json").read_text())
        if "matmul_gflops_cpu" not in res:                  # runs.json of an older version of this script
            res["matmul_gflops_cpu"] = matmul_gflops(CDTYPES[res["args"]["dtype"]])
        for key in ("small", "large", "vocab", "samples", "seq_len", "batch", "dtype", "mtp", "extras"):
            setattr(a, key, res["args"][key])
    else:
        res = benchmark(a)
    for r in res["runs"].values():
        cfg = deepseek_v3_config(layers=3, first_k_dense=1, experts=r["experts"], mtp=a.mtp, real_widths=True,
                                 vocab=a.vocab)
        r["planned_in"], r["planned_out"] = plan_bytes(cfg)
    rows, summary = project(res, a)
    a.out.write_text(markdown(res, rows, summary, a))
    print(f"wrote {rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
