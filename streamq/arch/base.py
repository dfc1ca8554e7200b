"""What the pipeline needs from an architecture, and the pieces families share.

A run is a list of steps in write order: the embedding, each decoder layer, then the final norm
and lm_head. An architecture says which source tensors each step owns (names and shapes from the
config), which of them are linears that rules may quantize, and how to run a layer forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import StreamqError


@dataclass(frozen=True)
class Step:
    key: str                                   # "embed", "layer.3", "final"
    kind: str                                  # "embed" | "layer" | "final"
    index: int                                 # layer index (-1 for embed/final)
    shapes: dict[str, tuple[int, ...]]         # source tensor name → expected shape, in write order
    linears: tuple[str, ...] = ()              # module names whose .weight rules may quantize
    groups: dict[str, str] = field(default_factory=dict)  # linear → key of the input it shares


def embed_and_final(config, has_lm_head: bool) -> tuple[Step, Step]:
    """The first and last steps every family shares: the embedding; the final norm and lm_head
    (absent when the checkpoint ties it to the embedding)."""
    c = config
    embed = Step("embed", "embed", -1, {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)})
    final_shapes = {"model.norm.weight": (c.hidden_size,)}
    if has_lm_head:
        final_shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return embed, Step("final", "final", -1, final_shapes, ("lm_head",) if has_lm_head else ())


def expected_shapes(module: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a module built on the meta device (no memory)."""
    return {f"{prefix}.{name}": tuple(p.shape) for name, p in module.state_dict().items()}


def linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def check_shapes(step: Step, info) -> None:
    """Every source tensor of the step exists with the shape the config implies."""
    for name, shape in step.shapes.items():
        got = info(name).shape
        if tuple(got) != tuple(shape):
            raise StreamqError(f"tensor '{name}' has shape {list(got)}, the config implies {list(shape)}",
                               "the checkpoint does not match its config.json: fix the config or the shards")


def load_into(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """Materialise a meta-device module from checkpoint tensors (cast to the compute dtype)."""
    state = {name[len(prefix) + 1:]: t.to(device=device, dtype=dtype) for name, t in tensors.items()
             if name.startswith(prefix + ".")}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()
