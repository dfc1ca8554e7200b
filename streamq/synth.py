"""Random Hugging Face checkpoints in the hub's exact naming.

Tests, benchmarks and rehearsals need checkpoints shaped like the real ones (Llama, Qwen2,
Qwen3, DeepSeek-V3/R1 with FP8 block scales and the MTP layer) without downloading them. A
checkpoint is described as a lazy list of `TensorSpec`s derived from a transformers config;
each tensor is generated on its own and streamed into shards, so memory stays at about one
shard plus one tensor even at DeepSeek-R1 widths. No transformers model is ever built here.

Values are deterministic: each tensor draws from its own generator seeded by (seed, name), so a
seed gives identical bytes regardless of shard size or of which tensors come before it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config

from streamq.errors import StreamqError

WEIGHT_STD = 0.02
# Real LLMs have a few hidden channels far larger than the rest; that is what makes activation
# quantization hard, so the synthetic weights carry some too.
OUTLIER_FRACTION = 0.01
OUTLIER_GAIN = 8.0
NORM_STD = 0.1
BIAS_STD = 0.02

FP8_BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

MB = 1_000_000  # shard sizes count in decimal megabytes, as Hugging Face's max_shard_size does


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # a key of _INITS
    dtype: torch.dtype | None = None  # None: the checkpoint's dtype


# ---------------------------------------------------------------------------------------------
# Values


def _generator(seed: int, name: str) -> torch.Generator:
    # A 64-bit digest: crc32's 32 bits would collide among the ~90k tensors of an R1-sized
    # checkpoint, giving two tensors identical values. Python's hash() is salted per process.
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _normal(seed: int, name: str, shape: tuple[int, ...], mean: float, std: float) -> torch.Tensor:
    return torch.empty(shape).normal_(mean, std, generator=_generator(seed, name))


def outlier_columns(seed: int, width: int) -> torch.Tensor:
    """The input channels scaled up in every linear reading `width` features. They depend on the
    width only, so all projections reading the residual stream share the same outlier channels,
    as in real models."""
    count = max(1, round(width * OUTLIER_FRACTION))
    return torch.randperm(width, generator=_generator(seed, f"outlier-columns/{width}"))[:count]


def _linear(seed: int, spec: TensorSpec) -> torch.Tensor:
    w = _normal(seed, spec.name, spec.shape, 0.0, WEIGHT_STD)
    w[:, outlier_columns(seed, spec.shape[1])] *= OUTLIER_GAIN
    return w


def _plain(seed: int, spec: TensorSpec) -> torch.Tensor:
    return _normal(seed, spec.name, spec.shape, 0.0, WEIGHT_STD)


def _norm(seed: int, spec: TensorSpec) -> torch.Tensor:
    return _normal(seed, spec.name, spec.shape, 1.0, NORM_STD)


def _bias(seed: int, spec: TensorSpec) -> torch.Tensor:
    return _normal(seed, spec.name, spec.shape, 0.0, BIAS_STD)


# "linear" marks the projections a quantizer works on (and FP8 checkpoints store in FP8);
# "plain" is for embeddings, heads and routers, which keep their precision.
_INITS = {"linear": _linear, "plain": _plain, "norm": _norm, "bias": _bias}


def make_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The fp32 values of one tensor, before casting to the checkpoint's dtype."""
    return _INITS[spec.init](seed, spec)


# ---------------------------------------------------------------------------------------------
# FP8 block scales (DeepSeek-V3/R1 source format)


def scale_inv_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One scale per 128x128 block → one per element, cropped where the last blocks overhang."""
    full = scale.repeat_interleave(FP8_BLOCK, dim=0).repeat_interleave(FP8_BLOCK, dim=1)
    return full[:rows, :cols]


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv) with W ≈ fp8 * scale_inv per 128x128 block."""
    rows, cols = w.shape
    nb, kb = scale_inv_shape(w.shape)
    # Work on a zero-padded copy viewed as blocks, in place: R1's largest weights are 0.5 GB
    # in fp32, and each extra temporary would add that to the peak.
    padded = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK)
    padded[:rows, :cols] = w
    blocks = padded.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = torch.maximum(blocks.amax(dim=(1, 3)), -blocks.amin(dim=(1, 3)))
    # An all-zero block would divide by zero; any scale represents it exactly.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    blocks.div_(scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return padded.to(torch.float8_e4m3fn)[:rows, :cols].contiguous(), scale_inv


def dequant_fp8_reference(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Slow, obvious fp32 dequantization of a block-scaled FP8 weight, for checking others.
    Cropping the expanded scales equals padding the weight, multiplying and cropping the product."""
    return w_fp8.float() * expand_block_scales(scale_inv.float(), *w_fp8.shape)


# ---------------------------------------------------------------------------------------------
# Streaming shards


_CHECKPOINT_GLOBS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
_TEMP_GLOB = ".synth-shard-*.tmp"


class _ShardWriter:
    """Collects tensors until they reach `shard_bytes`, then writes them under a temporary name.
    The final names (`model-0000i-of-0000N`) need N, known only at `finish`."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out = out
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.temp_files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0
        for stale in out.glob(_TEMP_GLOB):
            stale.unlink()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or name in self.shard_of:
            raise StreamqError(f"tensor {name} generated twice", "this is a bug in streamq.synth")
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        temp = self.out / f".synth-shard-{len(self.temp_files):05d}.tmp"
        save_file(self.pending, temp, metadata={"format": "pt"})
        self.shard_of.update((name, len(self.temp_files)) for name in self.pending)
        self.temp_files.append(temp)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self._flush()
        # A rerun into the same folder replaces the previous checkpoint; leftover shards of a
        # different count would otherwise sit beside the new ones.
        for pattern in _CHECKPOINT_GLOBS:
            for old in self.out.glob(pattern):
                old.unlink()
        count = len(self.temp_files)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        mode = _default_file_mode()
        for temp, name in zip(self.temp_files, names):
            temp.rename(self.out / name)
            # safetensors creates files readable by their owner only; a checkpoint is for sharing.
            (self.out / name).chmod(mode)
        if count > 1:
            weight_map = {t: names[i] for t, i in sorted(self.shard_of.items())}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(_json(index))
        return [self.out / name for name in names]


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_checkpoint(out: Path, config, specs: Iterator[TensorSpec], *, dtype: torch.dtype,
                      fp8: bool, shard_mb: float, seed: int, extra_config: dict | None = None) -> Path:
    if shard_mb <= 0:
        raise StreamqError(f"shard_mb must be positive, got {shard_mb}", "pass e.g. --shard-mb 2000")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, int(shard_mb * MB))
    for spec in specs:
        w = make_tensor(spec, seed)
        if fp8 and spec.init == "linear":
            q, scale_inv = quantize_fp8_blocks(w)
            writer.add(spec.name, q)
            writer.add(spec.name + "_scale_inv", scale_inv)
        else:
            writer.add(spec.name, w.to(spec.dtype or dtype))
        del w  # free before generating the next one
    writer.finish()
    # What save_pretrained writes: every model key (hub configs list them all, and readers that
    # parse the JSON directly must not depend on transformers' defaults), no generic ones.
    config_dict = config.to_diff_dict() | (extra_config or {})
    (out / "config.json").write_text(_json(config_dict))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Shared building blocks


def _mlp_specs(prefix: str, hidden: int, intermediate: int) -> Iterator[TensorSpec]:
    yield TensorSpec(prefix + "gate_proj.weight", (intermediate, hidden), "linear")
    yield TensorSpec(prefix + "up_proj.weight", (intermediate, hidden), "linear")
    yield TensorSpec(prefix + "down_proj.weight", (hidden, intermediate), "linear")


def _norm_spec(name: str, width: int) -> TensorSpec:
    return TensorSpec(name, (width,), "norm")


# ---------------------------------------------------------------------------------------------
# Dense families: Llama, Qwen2, Qwen3


@dataclass(frozen=True)
class _Family:
    config_class: type
    architecture: str
    qkv_bias: bool  # Qwen2 has biases on q/k/v
    qk_norm: bool  # Qwen3 RMS-normalizes q and k per head


DENSE_FAMILIES = {
    "llama": _Family(LlamaConfig, "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": _Family(Qwen2Config, "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": _Family(Qwen3Config, "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
}


def dense_config(family: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 128,
                 heads: int = 4, kv_heads: int = 2, head_dim: int | None = None, vocab: int = 256,
                 tied: bool = False, dtype: torch.dtype = torch.bfloat16):
    if family not in DENSE_FAMILIES:
        raise StreamqError(f"unknown dense family {family!r}", f"use one of {sorted(DENSE_FAMILIES)}")
    if head_dim is None and hidden % heads:
        raise StreamqError(f"hidden {hidden} is not divisible by heads {heads}",
                           "pass head_dim explicitly or change heads")
    if heads % kv_heads:
        raise StreamqError(f"heads {heads} is not a multiple of kv_heads {kv_heads}",
                           "grouped-query attention needs heads = kv_heads * group")
    spec = DENSE_FAMILIES[family]
    return spec.config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, tie_word_embeddings=tied,
        dtype=_dtype_name(dtype), architectures=[spec.architecture])


def dense_specs(config) -> Iterator[TensorSpec]:
    spec = DENSE_FAMILIES[config.model_type]
    h, hd = config.hidden_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * hd, config.num_key_value_heads * hd
    yield TensorSpec("model.embed_tokens.weight", (config.vocab_size, h), "plain")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield _norm_spec(p + "input_layernorm.weight", h)
        for proj, rows in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
            yield TensorSpec(f"{p}self_attn.{proj}.weight", (rows, h), "linear")
            if spec.qkv_bias:
                yield TensorSpec(f"{p}self_attn.{proj}.bias", (rows,), "bias")
        yield TensorSpec(p + "self_attn.o_proj.weight", (h, q_width), "linear")
        if spec.qk_norm:
            yield _norm_spec(p + "self_attn.q_norm.weight", hd)
            yield _norm_spec(p + "self_attn.k_norm.weight", hd)
        yield _norm_spec(p + "post_attention_layernorm.weight", h)
        yield from _mlp_specs(p + "mlp.", h, config.intermediate_size)
    yield _norm_spec("model.norm.weight", h)
    if not config.tie_word_embeddings:
        yield TensorSpec("lm_head.weight", (config.vocab_size, h), "plain")


def write_dense(out: Path, family: str = "llama", layers: int = 2, hidden: int = 64,
                intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, vocab: int = 256, tied: bool = False,
                dtype: torch.dtype = torch.bfloat16, shard_mb: float = 2000, seed: int = 0) -> Path:
    """A random Llama / Qwen2 / Qwen3 checkpoint in `out`; returns `out`."""
    config = dense_config(family, layers, hidden, intermediate, heads, kv_heads, head_dim, vocab,
                          tied, dtype)
    return _write_checkpoint(out, config, dense_specs(config), dtype=dtype, fp8=False,
                             shard_mb=shard_mb, seed=seed)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 / R1


# "tiny" keeps tests fast; "real" is DeepSeek-V3/R1. A real-widths write differs from R1 only in
# its layer and expert counts (and vocab if asked), so memory and I/O per tensor match the real one.
DEEPSEEK_WIDTHS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=16, vocab_size=256, num_experts_per_tok=2),
    "real": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                 num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                 qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280, num_experts_per_tok=8),
}
# Router grouping at most this fine (R1: 8 groups, best 4 kept).
DEEPSEEK_MAX_GROUPS = {"tiny": 2, "real": 8}
# R1's YaRN. The tiny width shortens the pre-YaRN context so max_position_embeddings stays small
# and still equals original × factor (transformers warns when they disagree).
DEEPSEEK_ORIGINAL_CONTEXT = {"tiny": 64, "real": 4096}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# Keys of R1's config.json that transformers does not define but serving engines read.
DEEPSEEK_EXTRA_CONFIG = {"topk_method": "noaux_tc", "scoring_func": "sigmoid",
                         "moe_layer_freq": 1, "ep_size": 1}
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}

_FROM_WIDTHS: Any = object()  # q_lora_rank's default; None is meaningful (V2-Lite-style q_proj)


def router_groups(experts: int, per_token: int, max_groups: int) -> tuple[int, int]:
    """(n_group, topk_group) for `experts`: groups of at least two experts (the router scores a
    group by its top two), and enough kept groups to hold `per_token` experts."""
    fitting = [g for g in range(1, max_groups + 1) if experts % g == 0 and experts // g >= 2]
    n_group = max(fitting, default=1)
    needed = math.ceil(per_token / (experts // n_group))
    return n_group, min(n_group, max(n_group // 2, needed))


def deepseek_v3_config(layers: int = 3, first_k_dense: int = 1, experts: int = 8,
                       hidden: int | None = None, mtp: bool = False, real_widths: bool = False,
                       q_lora_rank: int | None = _FROM_WIDTHS, vocab: int | None = None,
                       moe_intermediate: int | None = None) -> DeepseekV3Config:
    if experts < 1:
        raise StreamqError(f"experts must be at least 1, got {experts}", "pass e.g. experts=8")
    width = "real" if real_widths else "tiny"
    kw = dict(DEEPSEEK_WIDTHS[width])
    kw["hidden_size"] = hidden or kw["hidden_size"]
    kw["vocab_size"] = vocab or kw["vocab_size"]
    kw["moe_intermediate_size"] = moe_intermediate or kw["moe_intermediate_size"]
    if q_lora_rank is not _FROM_WIDTHS:
        kw["q_lora_rank"] = q_lora_rank
    kw["num_experts_per_tok"] = min(kw["num_experts_per_tok"], experts)
    n_group, topk_group = router_groups(experts, kw["num_experts_per_tok"], DEEPSEEK_MAX_GROUPS[width])
    original = DEEPSEEK_ORIGINAL_CONTEXT[width]
    rope = YARN | {"original_max_position_embeddings": original}
    return DeepseekV3Config(
        **kw, num_hidden_layers=layers, first_k_dense_replace=first_k_dense,
        num_key_value_heads=kw["num_attention_heads"], n_routed_experts=experts,
        n_shared_experts=1, n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_parameters=rope,
        max_position_embeddings=int(original * YARN["factor"]), num_mtp_layers=int(mtp),
        tie_word_embeddings=False, dtype="bfloat16", architectures=["DeepseekV3ForCausalLM"])


def _mla_specs(p: str, c: DeepseekV3Config) -> Iterator[TensorSpec]:
    h, heads = c.hidden_size, c.num_attention_heads
    qk_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank is None:
        yield TensorSpec(p + "q_proj.weight", (heads * qk_dim, h), "linear")
    else:
        yield TensorSpec(p + "q_a_proj.weight", (c.q_lora_rank, h), "linear")
        yield _norm_spec(p + "q_a_layernorm.weight", c.q_lora_rank)
        yield TensorSpec(p + "q_b_proj.weight", (heads * qk_dim, c.q_lora_rank), "linear")
    # One projection yields both the compressed KV latent and the shared rope key.
    yield TensorSpec(p + "kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, h), "linear")
    yield _norm_spec(p + "kv_a_layernorm.weight", c.kv_lora_rank)
    yield TensorSpec(p + "kv_b_proj.weight",
                     (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), "linear")
    yield TensorSpec(p + "o_proj.weight", (h, heads * c.v_head_dim), "linear")


def _moe_specs(p: str, c: DeepseekV3Config) -> Iterator[TensorSpec]:
    h, experts = c.hidden_size, c.n_routed_experts
    yield TensorSpec(p + "gate.weight", (experts, h), "plain")
    yield TensorSpec(p + "gate.e_score_correction_bias", (experts,), "bias", torch.float32)
    for e in range(experts):
        yield from _mlp_specs(f"{p}experts.{e}.", h, c.moe_intermediate_size)
    yield from _mlp_specs(p + "shared_experts.", h, c.moe_intermediate_size * c.n_shared_experts)


def _deepseek_layer_specs(p: str, c: DeepseekV3Config, moe: bool) -> Iterator[TensorSpec]:
    yield _norm_spec(p + "input_layernorm.weight", c.hidden_size)
    yield from _mla_specs(p + "self_attn.", c)
    yield _norm_spec(p + "post_attention_layernorm.weight", c.hidden_size)
    yield from (_moe_specs(p + "mlp.", c) if moe else _mlp_specs(p + "mlp.", c.hidden_size, c.intermediate_size))


def _mtp_specs(p: str, c: DeepseekV3Config) -> Iterator[TensorSpec]:
    h = c.hidden_size
    yield TensorSpec(p + "embed_tokens.weight", (c.vocab_size, h), "plain")
    yield _norm_spec(p + "enorm.weight", h)
    yield _norm_spec(p + "hnorm.weight", h)
    yield TensorSpec(p + "eh_proj.weight", (h, 2 * h), "linear")
    yield _norm_spec(p + "shared_head.norm.weight", h)
    yield TensorSpec(p + "shared_head.head.weight", (c.vocab_size, h), "plain")
    yield from _deepseek_layer_specs(p, c, moe=True)


def deepseek_v3_specs(c: DeepseekV3Config) -> Iterator[TensorSpec]:
    """Every tensor of the checkpoint in bf16 form (FP8 writes add a scale per "linear")."""
    yield TensorSpec("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), "plain")
    for i in range(c.num_hidden_layers):
        yield from _deepseek_layer_specs(f"model.layers.{i}.", c, moe=i >= c.first_k_dense_replace)
    for i in range(c.num_nextn_predict_layers):
        yield from _mtp_specs(f"model.layers.{c.num_hidden_layers + i}.", c)
    yield _norm_spec("model.norm.weight", c.hidden_size)
    yield TensorSpec("lm_head.weight", (c.vocab_size, c.hidden_size), "plain")


def write_deepseek_v3(out: Path, layers: int = 3, first_k_dense: int = 1, experts: int = 8,
                      hidden: int | None = None, fp8: bool = False, mtp: bool = False,
                      real_widths: bool = False, shard_mb: float = 2000, seed: int = 0,
                      q_lora_rank: int | None = _FROM_WIDTHS, vocab: int | None = None,
                      moe_intermediate: int | None = None) -> Path:
    """A random DeepSeek-V3/R1-layout checkpoint in `out`; returns `out`.

    hidden / vocab / q_lora_rank default to the width table (tiny, or R1's with real_widths);
    q_lora_rank=None gives V2-Lite-style attention with a plain q_proj."""
    config = deepseek_v3_config(layers, first_k_dense, experts, hidden, mtp, real_widths,
                                q_lora_rank, vocab, moe_intermediate)
    extra = DEEPSEEK_EXTRA_CONFIG | ({"quantization_config": FP8_QUANTIZATION_CONFIG} if fp8 else {})
    return _write_checkpoint(out, config, deepseek_v3_specs(config), dtype=torch.bfloat16, fp8=fp8,
                             shard_mb=shard_mb, seed=seed, extra_config=extra)


# ---------------------------------------------------------------------------------------------
# Command line


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Options (argparse dests) that only one kind of checkpoint takes.
_DEEPSEEK_ONLY = ("experts", "moe_intermediate", "fp8", "mtp", "real_widths")
_DENSE_ONLY = ("tied", "dtype")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamq synth",
                                 description="Write a random checkpoint in Hugging Face hub naming.")
    ap.add_argument("family", choices=["deepseek-v3", *DENSE_FAMILIES])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--experts", type=int, help="deepseek-v3: routed experts per MoE layer")
    ap.add_argument("--moe-intermediate", type=int, help="deepseek-v3: width of each routed expert")
    ap.add_argument("--fp8", action="store_true", help="deepseek-v3: FP8 weights with 128x128 block scales")
    ap.add_argument("--mtp", action="store_true", help="deepseek-v3: add the multi-token-prediction layer")
    ap.add_argument("--real-widths", action="store_true", help="deepseek-v3: DeepSeek-R1 tensor widths")
    ap.add_argument("--tied", action="store_true", help="dense: tie lm_head to the embeddings")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="dense: checkpoint dtype (default bf16)")
    ap.add_argument("--shard-mb", type=float, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def summarize(out: Path) -> tuple[int, int, int]:
    """(tensors, bytes, shards) of the checkpoint in `out`."""
    files = sorted(Path(out).glob("model*.safetensors"))
    tensors = 0
    for f in files:
        with safe_open(f, framework="pt") as sf:
            tensors += len(sf.keys())
    return tensors, sum(f.stat().st_size for f in files), len(files)


def main_synth(argv: list[str]) -> int:
    """`streamq synth ...`. Bad values raise StreamqError, which the main command line reports."""
    ap = _parser()
    args = ap.parse_args(argv)
    deepseek = args.family == "deepseek-v3"
    wrong = _DENSE_ONLY if deepseek else _DEEPSEEK_ONLY
    given = [name for name in wrong if getattr(args, name) not in (None, False)]
    if given:
        ap.error(f"{args.family} does not take --{given[0].replace('_', '-')}")
    common = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden), ("vocab", args.vocab))
              if v is not None}
    common |= {"shard_mb": args.shard_mb, "seed": args.seed}
    if deepseek:
        experts = {k: v for k, v in (("experts", args.experts), ("moe_intermediate", args.moe_intermediate))
                   if v is not None}
        write_deepseek_v3(args.out, fp8=args.fp8, mtp=args.mtp, real_widths=args.real_widths,
                          **common, **experts)
    else:
        write_dense(args.out, family=args.family, tied=args.tied, dtype=DTYPES[args.dtype or "bf16"],
                    **common)
    tensors, size, shards = summarize(args.out)
    print(f"wrote {args.family} to {args.out}: {tensors} tensors, {size / MB:.1f} MB in {shards} shard(s)")
    return 0
