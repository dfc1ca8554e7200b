"""Dense decoder families: Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms).

The decoder layer, RMSNorm and rotary embedding are transformers' own classes, so streamq's
layer-by-layer forward is numerically the reference model's; streamq only feeds them one layer's
weights at a time.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from ..errors import StreamqError
from .base import Step, embed_and_final, expected_shapes, linear_names, load_into

FAMILIES = {
    "llama": (modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding, modeling_llama.LlamaRMSNorm),
    "qwen2": (modeling_qwen2.Qwen2DecoderLayer, modeling_qwen2.Qwen2RotaryEmbedding, modeling_qwen2.Qwen2RMSNorm),
    "qwen3": (modeling_qwen3.Qwen3DecoderLayer, modeling_qwen3.Qwen3RotaryEmbedding, modeling_qwen3.Qwen3RMSNorm),
}

# Linears that read the same tensor share one input observer (and, in static schemes, one
# activation scale), since the consumer fuses them.
INPUT_GROUPS = {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in",
}


class DenseArch:
    def __init__(self, config, has_lm_head: bool, names: set[str] | None = None):
        self.config = config
        self.config._attn_implementation = "sdpa"  # causal without an explicit mask
        self.family = config.model_type
        self.layer_cls, self.rotary_cls, self.norm_cls = FAMILIES[self.family]
        self.has_lm_head = has_lm_head
        if not has_lm_head and not getattr(config, "tie_word_embeddings", False):
            raise StreamqError("the checkpoint has no lm_head.weight and config.json does not tie embeddings",
                               "the checkpoint is incomplete: add lm_head.weight or set tie_word_embeddings")

    def steps(self) -> list[Step]:
        embed, final = embed_and_final(self.config, self.has_lm_head)
        return [embed, *(self.layer_step(i) for i in range(self.config.num_hidden_layers)), final]

    def layer_step(self, i: int) -> Step:
        prefix = f"model.layers.{i}"
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        linears = tuple(f"{prefix}.{n}" for n in linear_names(layer))
        groups = {f"{prefix}.{sub}": key for sub, key in INPUT_GROUPS.items()}
        return Step(f"layer.{i}", "layer", i, dict(sorted(expected_shapes(layer, prefix).items())), linears, groups)

    def build_layer(self, step: Step, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
        with torch.device("meta"):
            layer = self.layer_cls(self.config, step.index)
        return load_into(layer, f"model.layers.{step.index}", tensors, device, dtype)

    def rotary(self, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rotary_cls(self.config).to(device)
        pos = torch.arange(seq_len, device=device)[None]
        x = torch.empty(1, seq_len, 1, device=device, dtype=dtype)
        return rope(x, pos)

    def layer_forward(self, layer: nn.Module, h: torch.Tensor, rotary) -> torch.Tensor:
        out = layer(h, attention_mask=None, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = weight
        return norm
