"""`streamq eval` for DeepSeek-V3/R1: both models layer-streamed, routed experts a chunk at a time.

Per decoder layer, each model — the reference from the source checkpoint (FP8 dequantized to the
model dtype, as the quantization run reads it) and the quantized one from the output's stored
tensors — first runs the layer's base (attention, then the router and the shared expert, or the
dense MLP) over every evaluation sequence, keeping its MoE input, its routing and h1 + shared.
Then the routed experts are read a chunk at a time, as many as `expert_budget_gb` holds (the
quantization run's memory knob), and each expert adds its weighted output to each model's sum
for the tokens that model routed to it. Each model routes its own hidden states with its own
router, so a quantization error that flips a routing decision counts as error.

The MTP layer is not part of the main model's forward (it drafts a further token from the main
model's final states), so it is not evaluated; a log line says so.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import CheckpointReader
from .errors import StreamqError
from .evaluate import QuantLinear
from .moe import base_names, expert_chunks
from .moe_float import Side, add_expert, base_pass, expert_sources, routed
from .plan import DESCRIPTION_NAME, model_dtype

log = logging.getLogger(__name__)
F32 = torch.float32


class OutputModules:
    """The output's tensors grouped by module (one pass over all names, not one per module, since
    R1 has ~47k quantized linears), and modules built from them: FLOAT tensors as stored, each
    quantized linear replaced by a QuantLinear over its stored tensors."""

    def __init__(self, out: CheckpointReader, desc: dict):
        self.out, self.desc = out, desc
        self.group_size = desc.get("group_size", 0)
        self.by_module: dict[str, list[str]] = defaultdict(list)
        for name in out.tensors:
            self.by_module[name.rsplit(".", 1)[0]].append(name)

    def names_for(self, sources: list[str]) -> list[str]:
        """Output tensors of the modules that own these source tensors (norm biases included)."""
        modules = dict.fromkeys(n.rsplit(".", 1)[0] for n in sources)
        return [n for m in modules for n in self.by_module.get(m, ())]

    def load(self, sources: list[str]) -> dict[str, torch.Tensor]:
        return self.out.load(self.names_for(sources))

    def build(self, sources: list[str], shapes: dict, stored: dict, make, prefix: str, device) -> nn.Module:
        """`make(tensors)` builds the float module from source-named tensors; quantized linears
        get a zero placeholder there and are swapped for a QuantLinear afterwards."""
        tensors, quantized = {}, {}
        for name in sources:
            qtype = self.desc.get(name)
            if qtype is None:
                raise StreamqError(f"{DESCRIPTION_NAME} has no entry for {name}", "the output is incomplete")
            if qtype == "FLOAT":
                tensors[name] = stored[name]
            else:
                tensors[name] = torch.zeros(shapes[name])
                quantized[name.rsplit(".", 1)[0]] = qtype
        module = make(tensors)
        for mod, qtype in quantized.items():
            t = {n.rsplit(".", 1)[1]: stored[n].to(device) for n in self.by_module[mod]}
            parent, _, leaf = mod[len(prefix) + 1:].rpartition(".")
            setattr(module.get_submodule(parent), leaf, QuantLinear(qtype, t, self.group_size))
        extra = {n: t for n, t in stored.items() if n not in tensors and n.endswith(".bias")
                 and n.rsplit(".", 1)[0] not in quantized and n.startswith(prefix + ".")}
        _add_biases(module, prefix, extra, device)
        return module


def _add_biases(module: nn.Module, prefix: str, biases: dict, device) -> None:
    """Tensors asymmetric smoothing adds: `<norm>.bias`, added after the norm as the consumer
    does, and biases of FLOAT linears that had none (quantized linears keep theirs inside)."""
    for name, t in biases.items():
        sub = module.get_submodule(name[len(prefix) + 1:].rsplit(".", 1)[0])
        if isinstance(sub, nn.Linear):
            sub.bias = nn.Parameter(t.float().to(device), requires_grad=False)
        else:
            sub.register_forward_hook(lambda m, a, y, b=t.float().to(device): y + b.to(y.dtype))


@dataclass
class Streams:
    """What every layer of the evaluation reads."""
    arch: object
    ref: CheckpointReader
    outputs: OutputModules
    dt: torch.dtype              # the model dtype: FP8 source weights are dequantized to it
    device: torch.device
    batch: int                   # sequences per batch
    budget_gb: float             # routed experts read per chunk (reference + stored tensors)


def _expert_bytes(st: Streams, step, sources: list[str]) -> int:
    """Host bytes one expert takes in a chunk: its source weights in the model dtype and its
    stored output tensors (every expert of a layer has the same shapes)."""
    src = sum(math.prod(step.shapes[n]) for n in sources) * st.dt.itemsize
    info = st.outputs.out.info
    return src + sum(math.prod(info(n).shape) * info(n).dtype.itemsize for n in st.outputs.names_for(sources))


def _base_passes(st: Streams, step, H_r: torch.Tensor, H_q: torch.Tensor, rotary) -> tuple[Side, Side]:
    """The reference base, then the quantized one: one layer base resident at a time."""
    names, moe, prefix = base_names(step), st.arch.is_moe(step.index), f"model.layers.{step.index}"
    base = st.arch.build_base(step, st.ref.load_float(names, st.dt), st.device, F32)
    R = base_pass(st.arch, base, lambda i, j: H_r[i:j].to(st.device, F32), H_r.shape, rotary, st.batch, moe)
    del base
    make = lambda t: st.arch.build_base(step, t, st.device, F32)  # noqa: E731
    base = st.outputs.build(names, step.shapes, st.outputs.load(names), make, prefix, st.device)
    return R, base_pass(st.arch, base, lambda i, j: H_q[i:j].to(st.device, F32), H_q.shape, rotary, st.batch, moe)


def _experts_phase(st: Streams, step, R: Side, Q: Side, seq_len: int) -> None:
    arch, i = st.arch, step.index
    E = arch.config.n_routed_experts
    sources = expert_sources(step, E)
    tokens_per_batch = st.batch * seq_len
    for chunk in expert_chunks(E, _expert_bytes(st, step, sources[0]), st.budget_gb):
        names = [n for e in chunk for n in sources[e]]
        raw, stored = st.ref.load_float(names, st.dt), st.outputs.load(names)
        for e in chunk:
            if routed(R, e):
                add_expert(arch, R, arch.build_expert(i, e, raw, st.device, F32), e, tokens_per_batch, st.device, F32)
            if routed(Q, e):
                make = lambda t, e=e: arch.build_expert(i, e, t, st.device, F32)  # noqa: E731
                expert = st.outputs.build(sources[e], step.shapes, stored, make, arch.expert_prefix(i, e), st.device)
                add_expert(arch, Q, expert, e, tokens_per_batch, st.device, F32)
        del raw, stored


def moe_layers(arch, steps, ref: CheckpointReader, out: CheckpointReader, desc: dict, H_r: torch.Tensor,
               H_q: torch.Tensor, seq_len: int, batch: int, device, expert_budget_gb: float) -> list[dict]:
    """Run every decoder layer of both models over H_r / H_q (updated in place); returns the
    per-layer relative error of the hidden states, as the dense evaluation does."""
    st = Streams(arch, ref, OutputModules(out, desc), model_dtype(arch.config, ref), torch.device(device), batch,
                 expert_budget_gb)
    rotary = arch.rotary(seq_len, st.device, F32)
    layer_err = []
    for step in steps[1:-1]:
        if step.kind == "mtp":
            log.info("model.layers.%d (the MTP layer) is not part of the main model's forward: not evaluated",
                     step.index)
            continue
        R, Q = _base_passes(st, step, H_r, H_q, rotary)
        if arch.is_moe(step.index):
            _experts_phase(st, step, R, Q, seq_len)
        H_r.copy_(R.out)
        H_q.copy_(Q.out)
        layer_err.append({"step": step.key, "rel_error": float((H_q - H_r).norm() / H_r.norm())})
    return layer_err
