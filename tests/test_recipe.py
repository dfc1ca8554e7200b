"""Recipe parsing: rules, msModelSlim words, validation, semantic vs run keys."""
from pathlib import Path

import pytest

from streamq.errors import StreamqError
from streamq.recipe import parse_recipe

P = Path("r.toml")

RULES = """
[quant]
scheme = "W8A8_DYNAMIC"
disable_names = ["model.layers.0.mlp.down_proj"]
[[quant.rules]]
match = "model.layers.{mtp}.mlp.experts.*"
scheme = "FLOAT"
[[quant.rules]]
match = "*.mlp.down_proj"
scheme = "W8A16"
[[quant.rules]]
match = "re:model\\\\.layers\\\\.[0-9]+\\\\.mlp\\\\..*"
scheme = "W4A16"
group_size = 64
"""


def test_first_matching_rule_wins_and_disable_names_come_first():
    r = parse_recipe(RULES, P)
    assert r.args_for("model.layers.0.mlp.down_proj").scheme == "FLOAT"
    assert r.args_for("model.layers.1.mlp.down_proj").scheme == "W8A16"
    up = r.args_for("model.layers.1.mlp.up_proj")
    assert (up.scheme, up.group_size) == ("W4A16", 64)
    assert r.args_for("model.layers.1.self_attn.q_proj").scheme == "W8A8_DYNAMIC"
    assert r.args_for("lm_head", is_last_linear=True).scheme == "FLOAT"


def test_mtp_placeholder_matches_only_the_mtp_layer():
    r = parse_recipe(RULES, P)
    assert r.args_for("model.layers.61.mlp.experts.3.up_proj", mtp_index=61).scheme == "FLOAT"
    assert r.args_for("model.layers.60.mlp.experts.3.up_proj").scheme == "W4A16"


@pytest.mark.parametrize("bits,scheme", [("w_bit = 8\na_bit = 8\nis_dynamic = true", "W8A8_DYNAMIC"),
                                         ("w_bit = 8\na_bit = 8", "W8A8"),
                                         ("w_bit = 4\na_bit = 16", "W4A16")])
def test_msmodelslim_words(bits, scheme):
    assert parse_recipe(f"[quant]\n{bits}\n", P).default.scheme == scheme


def test_semantic_hash_ignores_run_keys():
    a = parse_recipe('[quant]\nscheme = "W8A16"\n[run]\nbatch_size = 2\ndevice = "cpu"\n', P)
    b = parse_recipe('[quant]\nscheme = "W8A16"\n[run]\nbatch_size = 16\n', P)
    c = parse_recipe('[quant]\nscheme = "W8A8_DYNAMIC"\n', P)
    assert a.semantic_hash() == b.semantic_hash() != c.semantic_hash()


@pytest.mark.parametrize("text,needle", [
    ('[calibraton]\nsamples = 4\n', "did you mean 'calibration'"),
    ('[quant]\nscheme = 8\n', "must be str"),
    ('[quant]\nco_sparse = true\n', "not implemented"),
    ('[quant]\nscheme = "W8A8_DYNAMIC"\nw_sym = false\n', "only to W4A16"),
    ('[[quant.rules]]\nscheme = "FLOAT"\n', "no 'match'"),
    ('[[quant.rules]]\nmatch = "re:(("\n', "not a valid regex"),
    ('[run]\npropagate = "sideways"\n', "run.propagate"),
    ('[run]\nwrite_behind_gb = -1\n', "run.write_behind_gb"),
    ('[run]\nwrite_behind_gb = nan\n', "run.write_behind_gb"),
    ('[quant\n', "not valid TOML"),
])
def test_invalid_recipes_name_the_key(text, needle):
    with pytest.raises(StreamqError, match=needle.replace("(", r"\(")) as e:
        parse_recipe(text, P)
    assert "r.toml" in str(e.value)


def test_write_behind_is_a_run_key_and_zero_is_allowed():
    a = parse_recipe("[run]\nwrite_behind_gb = 0\n", P)
    b = parse_recipe("[run]\nwrite_behind_gb = 2.5\n", P)
    assert (a.run.write_behind_gb, b.run.write_behind_gb) == (0.0, 2.5)
    assert parse_recipe("", P).run.write_behind_gb == 0.5
    assert a.semantic_hash() == b.semantic_hash()


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    from streamq.recipe import load_recipe
    assert load_recipe(path).default.scheme


def test_shipped_static_recipe_is_the_measured_configuration():
    from streamq.recipe import load_recipe
    r = load_recipe(RECIPES_DIR / "w8a8_static.toml")
    assert (r.default.scheme, r.default.w_method, r.default.act_order) == ("W8A8", "gptq", True)
    assert (r.anti_method, r.alpha, r.anti_symmetric, r.act_method, r.disable_level) == ("m4", 0.9, False, 1, 8)


def test_shipped_static_recipe_runs_and_verifies(tmp_path):
    """The recipe as shipped (builtin calibration shrunk on the command line) on a tiny Llama."""
    import json
    from conftest import run_cli
    from streamq.synth import write_dense
    model = write_dense(tmp_path / "m", "llama", layers=2, hidden=64, intermediate=128, vocab=128)
    out = tmp_path / "out"
    run_cli("run", RECIPES_DIR / "w8a8_static.toml", "--model", model, "--output", out, "--device", "cpu",
            "--samples", "4", "--seq-len", "16", check=True)
    run_cli("verify", out, check=True)
    desc = json.loads((out / "quant_model_description.json").read_text())
    report = json.loads((out / "streamq_report.json").read_text())
    assert desc["model_quant_type"] == "W8A8" and "model.layers.0.input_layernorm.bias" in desc
    # L8 on 14 linears: 8 or more (whole input groups) stay FLOAT, the rest are W8A8
    floats = list(report["disabled_by_level"])   # name → its input max|x|/std
    assert len(floats) >= 8 and all(desc[f"{n}.weight"] == "FLOAT" for n in floats)
