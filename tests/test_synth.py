"""streamq.synth: hub naming checked against transformers' own models, sharding, determinism,
FP8 block scales and the DeepSeek MTP layer."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from streamq import synth


def read_all(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("model*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            tensors |= {k: sf.get_tensor(k) for k in sf.keys()}
    return tensors


def shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def model_shapes(out: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the transformers model built from the written config."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    return shapes(model.state_dict())


def unfuse_experts(hf_shapes: dict) -> dict:
    """transformers stores routed experts as 3-D gate_up_proj [E, 2i, h] / down_proj [E, h, i];
    the hub stores one 2-D tensor per expert and projection. Rewrite the former as the latter."""
    result = {}
    for name, shape in hf_shapes.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts") and leaf == "gate_up_proj":
            experts, rows, cols = shape
            for e in range(experts):
                result[f"{prefix}.{e}.gate_proj.weight"] = (rows // 2, cols)
                result[f"{prefix}.{e}.up_proj.weight"] = (rows // 2, cols)
        elif prefix.endswith("mlp.experts") and leaf == "down_proj":
            for e in range(shape[0]):
                result[f"{prefix}.{e}.down_proj.weight"] = shape[1:]
        else:
            result[name] = shape
    return result


# ---------------------------------------------------------------------------------------------
# Dense families


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dense_names_and_shapes_match_transformers(tmp_path, family, tied):
    out = synth.write_dense(tmp_path, family=family, layers=2, tied=tied, head_dim=24)
    written = read_all(out)
    expected = model_shapes(out)
    if tied:  # transformers lists the tied head in its state_dict; checkpoints leave it out
        expected.pop("lm_head.weight")
    assert shapes(written) == expected
    assert ("lm_head.weight" in written) == (not tied)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == family and cfg.tie_word_embeddings == tied and cfg.head_dim == 24
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_dense_dtype_and_value_shapes(tmp_path):
    out = synth.write_dense(tmp_path, family="qwen2", layers=1, hidden=256, dtype=torch.float16)
    t = read_all(out)
    assert {v.dtype for v in t.values()} == {torch.float16}
    norm = t["model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15
    assert t["model.layers.0.self_attn.q_proj.bias"].float().abs().max() < 0.2
    # The outlier input channels stand out from the rest in every linear reading the stream.
    q = t["model.layers.0.self_attn.q_proj.weight"].float()
    outliers = synth.outlier_columns(0, 256)
    others = torch.ones(256, dtype=torch.bool)
    others[outliers] = False
    assert len(outliers) == 3
    ratio = q[:, outliers].std() / q[:, others].std()
    assert 6 < ratio < 10


def test_sharded_index_is_consistent_and_rewrites_replace(tmp_path):
    out = synth.write_dense(tmp_path, family="llama", layers=3, hidden=128, shard_mb=0.1)
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    count = len(files)
    assert count > 2
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as sf:
            for name in sf.keys():
                assert index["weight_map"].pop(name) == file
                t = sf.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == {}
    assert index["metadata"]["total_size"] == total
    assert not list(out.glob(".synth-shard-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())

    # Same seed, one shard: same tensors, and the old shards and index are gone.
    sharded = read_all(out)
    synth.write_dense(out, family="llama", layers=3, hidden=128)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    single = read_all(out)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_deterministic_bytes(tmp_path):
    a = synth.write_dense(tmp_path / "a", family="qwen3", layers=2, shard_mb=0.05, seed=7)
    b = synth.write_dense(tmp_path / "b", family="qwen3", layers=2, shard_mb=0.05, seed=7)
    c = synth.write_dense(tmp_path / "c", family="qwen3", layers=2, shard_mb=0.05, seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    shard = next(n for n in names if n.endswith(".safetensors"))
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3


def expert_names(layer: int, experts: int) -> set[str]:
    return {f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
            for e in range(experts) for p in ("gate", "up", "down")}


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_deepseek_names_and_shapes_match_transformers(tmp_path, q_lora_rank):
    out = synth.write_deepseek_v3(tmp_path, layers=3, first_k_dense=1, experts=4, q_lora_rank=q_lora_rank)
    written = read_all(out)
    assert shapes(written) == unfuse_experts(model_shapes(out))
    # By construction as well, in case transformers changes how it stores experts.
    for layer in (1, 2):
        names = {n for n in written if f"layers.{layer}.mlp.experts." in n}
        assert names == expert_names(layer, 4)
    assert written["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert written["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (32, 64)
    assert written["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert ("model.layers.0.self_attn.q_proj.weight" in written) == (q_lora_rank is None)
    assert ("model.layers.0.self_attn.q_a_proj.weight" in written) == (q_lora_rank is not None)
    assert "model.layers.0.mlp.gate_proj.weight" in written  # dense below first_k_dense


def test_deepseek_loads_in_transformers(tmp_path):
    out = synth.write_deepseek_v3(tmp_path, layers=2, experts=4)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 40
    assert cfg.num_nextn_predict_layers == 0 and cfg.n_group == 2 and cfg.topk_group == 1
    raw = json.loads((out / "config.json").read_text())
    assert raw["scoring_func"] == "sigmoid" and raw["topk_method"] == "noaux_tc"
    assert "quantization_config" not in raw
    logits = model(torch.randint(0, 256, (1, 6))).logits
    assert torch.isfinite(logits).all()


def test_deepseek_mtp_layer(tmp_path):
    out = synth.write_deepseek_v3(tmp_path, layers=2, experts=2, mtp=True, fp8=True)
    t = read_all(out)
    assert AutoConfig.from_pretrained(out).num_nextn_predict_layers == 1
    p = "model.layers.2."
    assert t[p + "eh_proj.weight"].shape == (64, 128)
    assert t[p + "eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert t[p + "eh_proj.weight_scale_inv"].shape == (1, 1)
    for name in ("embed_tokens.weight", "shared_head.head.weight"):
        assert t[p + name].shape == (256, 64) and t[p + name].dtype == torch.bfloat16
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight", "self_attn.kv_b_proj.weight",
                 "mlp.gate.weight", "mlp.shared_experts.down_proj.weight"):
        assert p + name in t
    assert expert_names(2, 2) <= t.keys()
    assert not any(n.startswith("model.layers.3.") for n in t)


def test_fp8_dequantizes_to_the_bf16_write(tmp_path):
    # hidden 200: two 128-blocks along the input with a cropped edge.
    kw = dict(layers=2, experts=2, hidden=200, seed=3)
    bf16 = read_all(synth.write_deepseek_v3(tmp_path / "bf16", **kw))
    fp8 = read_all(synth.write_deepseek_v3(tmp_path / "fp8", fp8=True, **kw))
    raw = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert raw["quantization_config"] == synth.FP8_QUANTIZATION_CONFIG

    scales = {n for n in fp8 if n.endswith("_scale_inv")}
    assert fp8.keys() - scales == bf16.keys()
    quantized = {n.removesuffix("_scale_inv") for n in scales}
    assert "model.layers.1.mlp.experts.1.up_proj.weight" in quantized
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantized
    for name, ref in bf16.items():
        if name not in quantized:  # norms, embeddings, heads, the router: untouched
            assert torch.equal(fp8[name], ref), name
            continue
        w, s = fp8[name], fp8[name + "_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert tuple(s.shape) == synth.scale_inv_shape(ref.shape)
        deq = synth.dequant_fp8_reference(w, s)
        tol = 0.07 * ref.float().abs() + synth.expand_block_scales(s, *ref.shape) * 2**-9
        assert ((deq - ref.float()).abs() <= tol).all(), name
    assert not any(n.startswith(("model.embed", "lm_head")) or ".mlp.gate." in n for n in quantized)


def test_dequant_fp8_reference_on_cropped_blocks():
    w = torch.randn(576, 300, generator=torch.Generator().manual_seed(0))
    w[500:, 290:] *= 50  # a large block must not spoil the scale of its neighbours
    q, s = synth.quantize_fp8_blocks(w)
    assert q.shape == (576, 300) and s.shape == (5, 3)
    deq = synth.dequant_fp8_reference(q, s)
    # Against an explicit block loop.
    for i in range(5):
        for j in range(3):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            assert torch.equal(deq[rows, cols], q[rows, cols].float() * s[i, j])
            assert s[i, j] == pytest.approx(float(w[rows, cols].abs().max()) / 448, rel=1e-6)
    assert ((deq - w).abs() <= 0.0625 * w.abs() + s.max() * 2**-9).all()
    assert (deq - w).norm() / w.norm() < 0.03


def test_fp8_zero_block_has_a_finite_scale():
    q, s = synth.quantize_fp8_blocks(torch.zeros(130, 10))
    assert torch.equal(s, torch.ones(2, 1))
    assert torch.equal(synth.dequant_fp8_reference(q, s), torch.zeros(130, 10))


def test_real_widths_table_matches_r1():
    cfg = synth.deepseek_v3_config(layers=61, first_k_dense=3, experts=256, mtp=True, real_widths=True)
    expected = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, num_attention_heads=128, vocab_size=129280,
                    num_experts_per_tok=8, n_group=8, topk_group=4, max_position_embeddings=163840,
                    num_nextn_predict_layers=1)
    assert {k: getattr(cfg, k) for k in expected} == expected
    specs = {s.name: s.shape for s in synth.deepseek_v3_specs(cfg)}
    assert specs["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert synth.scale_inv_shape((576, 7168)) == (5, 56)
    assert specs["model.layers.0.self_attn.q_b_proj.weight"] == (24576, 1536)
    assert specs["model.layers.0.self_attn.kv_b_proj.weight"] == (32768, 512)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == (7168, 16384)
    assert specs["model.layers.3.mlp.experts.255.down_proj.weight"] == (7168, 2048)
    assert specs["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert "model.layers.2.mlp.experts.0.up_proj.weight" not in specs
    assert len([n for n in specs if ".experts." in n]) == (61 - 3 + 1) * 256 * 3

    small = synth.deepseek_v3_config(layers=1, experts=4, real_widths=True, vocab=512)
    assert small.vocab_size == 512 and small.hidden_size == 7168
    assert (small.num_experts_per_tok, small.n_group, small.topk_group) == (4, 2, 2)


@pytest.mark.parametrize("experts, per_token, max_groups, expected", [
    (256, 8, 8, (8, 4)), (8, 2, 2, (2, 1)), (2, 2, 2, (1, 1)), (3, 2, 2, (1, 1)),
    (16, 8, 8, (8, 4)), (4, 4, 8, (2, 2)), (1, 1, 8, (1, 1)),
])
def test_router_groups(experts, per_token, max_groups, expected):
    assert synth.router_groups(experts, per_token, max_groups) == expected


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli(tmp_path, capsys):
    assert synth.main_synth(["deepseek-v3", "--out", str(tmp_path / "ds"), "--layers", "2",
                             "--experts", "2", "--fp8", "--mtp", "--shard-mb", "0.05"]) == 0
    line = capsys.readouterr().out.strip()
    assert "tensors" in line and "shard" in line and "\n" not in line
    tensors, size, shard_count = synth.summarize(tmp_path / "ds")
    assert f"{tensors} tensors" in line and f"in {shard_count} shard" in line and shard_count > 1

    assert synth.main_synth(["qwen3", "--out", str(tmp_path / "q"), "--tied", "--dtype", "fp32"]) == 0
    assert read_all(tmp_path / "q")["model.norm.weight"].dtype == torch.float32
    with pytest.raises(SystemExit):
        synth.main_synth(["llama", "--out", str(tmp_path / "x"), "--fp8"])
    with pytest.raises(SystemExit):
        synth.main_synth(["deepseek-v3", "--out", str(tmp_path / "x"), "--tied"])
    with pytest.raises(synth.StreamqError, match="experts"):
        synth.main_synth(["deepseek-v3", "--out", str(tmp_path / "x"), "--experts", "0"])
