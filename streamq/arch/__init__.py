"""Architectures by config.model_type (a table, not a ladder)."""
from ..errors import StreamqError
from .deepseek_v3 import DeepseekArch
from .llama import DenseArch

REGISTRY = {"llama": DenseArch, "qwen2": DenseArch, "qwen3": DenseArch, "deepseek_v3": DeepseekArch}


def arch_for(config, reader):
    cls = REGISTRY.get(config.model_type)
    if cls is None:
        raise StreamqError(f"model_type '{config.model_type}' is not supported",
                           f"supported: {', '.join(sorted(REGISTRY))}")
    return cls(config, has_lm_head="lm_head.weight" in reader, names=set(reader.tensors))
