"""disable_level: the recipe word, the streamed outlier ratio, the choice in whole fused groups, the
float pre-pass against transformers, and a run that keeps the chosen linears FLOAT and resumes
with the recorded choice; for dense models, then for DeepSeek-V3/R1 (MTP layer included)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from streamq import cli, prepass
from streamq.calibration import token_ids
from streamq.checkpoint import CheckpointReader
from streamq.errors import StreamqError
from streamq.pipeline import prepare
from streamq.recipe import QuantArgs, parse_recipe
from streamq.synth import write_dense, write_deepseek_v3

from conftest import SMALL_CAL, output_bytes, run_cli, write_recipe

SAMPLES, SEQ = 4, 16       # SMALL_CAL's calibration
GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
          "up_proj": "mlp", "down_proj": "down"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def recipe(body: str):
    return parse_recipe(SMALL_CAL + "[quant]\n" + body, Path("r.toml"))


# ---- the recipe word ------------------------------------------------------------------------------

@pytest.mark.parametrize("word,level", [("", 0), ("L0", 0), ("L4", 4), ("L12", 12)])
def test_level_words(word, level):
    assert recipe(f'disable_level = "{word}"\n').disable_level == level


@pytest.mark.parametrize("bad", ['"4"', '"l4"', '"L-1"', '"L4x"', "4"])
def test_bad_level_is_an_error_naming_the_key(bad):
    with pytest.raises(StreamqError, match="disable_level"):
        recipe(f"disable_level = {bad}\n")


def test_level_is_semantic():
    assert recipe('disable_level = "L2"\n').semantic_hash() != recipe('disable_level = "L3"\n').semantic_hash()
    assert recipe('disable_level = "L2"\n').semantic()["quant"]["disable_level"] == 2


# ---- the statistic --------------------------------------------------------------------------------

def test_streamed_ratio_matches_the_whole_set():
    x = torch.randn(6, 10, 32, generator=gen(0)) * torch.linspace(0.5, 3, 32) + 0.7
    x[2, 3, 5] = 80.0                                   # one outlier
    obs = prepass.OutlierRatio()
    for chunk in x.split(4, dim=1):                     # batches of any shape
        obs.update(chunk)
    flat = x.double().flatten()
    expect = flat.abs().max().item() / flat.std(unbiased=False).item()
    assert obs.ratio() == pytest.approx(expect, rel=1e-9)
    const = prepass.OutlierRatio()
    const.update(torch.full((3, 4), 2.0))
    assert const.ratio() == 0.0                         # nothing outlies a constant input


# ---- the choice -----------------------------------------------------------------------------------

def test_choice_takes_whole_groups_in_decreasing_ratio():
    inputs = [(5.0, ["a.q", "a.k", "a.v"]), (9.0, ["a.down"]), (7.0, ["a.gate", "a.up"]), (1.0, ["b.o"])]
    assert prepass.choose(inputs, 0) == {}
    assert prepass.choose(inputs, 1) == {"a.down": 9.0}
    # the second linear opens gate/up: its group comes whole
    assert prepass.choose(inputs, 2) == {"a.down": 9.0, "a.gate": 7.0, "a.up": 7.0}
    assert list(prepass.choose(inputs, 4)) == ["a.down", "a.gate", "a.up", "a.q", "a.k", "a.v"]
    assert len(prepass.choose(inputs, 100)) == 7
    # equal ratios: by name, so the choice does not depend on the order the inputs were seen
    assert prepass.choose([(3.0, ["z"]), (3.0, ["m"])], 1) == {"m": 3.0}


def test_candidates_skip_float_linears_and_routed_experts():
    plan = SimpleNamespace(args={
        "model.layers.0.self_attn.q_proj": QuantArgs("W8A8"),
        "model.layers.0.self_attn.kv_b_proj": QuantArgs("FLOAT"),
        "model.layers.3.mlp.experts.7.down_proj": QuantArgs("W4A8_DYNAMIC"),
        "model.layers.3.mlp.shared_experts.down_proj": QuantArgs("W8A8_DYNAMIC"),
        "lm_head": QuantArgs("FLOAT")})
    assert prepass.candidates(plan) == {"model.layers.0.self_attn.q_proj",
                                        "model.layers.3.mlp.shared_experts.down_proj"}


# ---- the pre-pass ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_dense(tmp_path_factory.mktemp("dl") / "llama", "llama", layers=3, hidden=64, intermediate=128,
                       vocab=128)


def reference_ratios(model_dir: Path) -> dict[str, float]:
    """max|x|/std of every linear's input over the calibration ids, from transformers' whole model
    with every input kept (the slow way)."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
             for name, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        ref(token_ids([], None, 128, SAMPLES, SEQ, 0))
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        x = torch.cat([t.flatten() for t in xs]).double()
        out[name] = x.abs().max().item() / x.std(unbiased=False).item()
    return out


def test_prepass_ratios_match_transformers(model):
    r = recipe('scheme = "W8A8"\ndisable_last_linear = false\n')  # level 0: no pre-pass inside prepare
    p = prepare(r, model)
    got = prepass.input_ratios(r, p.reader, p.arch, p.plan, p.ids, torch.device("cpu"), torch.float32)
    expect = reference_ratios(model)
    assert len(got) == 3 * 4 + 1                        # four inputs per layer, and lm_head's
    for ratio, names in got:
        for n in names:
            assert ratio == pytest.approx(expect[n], rel=1e-4), n
        # linears reading one input are exactly one fused group
        assert len({GROUPS.get(n.rsplit(".", 1)[-1], n) for n in names}) == 1
    assert sorted(n for _, names in got for n in names) == sorted(expect)


# ---- a run ----------------------------------------------------------------------------------------

LEVEL_RECIPE = SMALL_CAL + '[quant]\nscheme = "W8A8"\ndisable_level = "L2"\n'


def test_run_keeps_the_chosen_linears_float(tmp_path, model):
    rec = write_recipe(tmp_path / "r.toml", LEVEL_RECIPE)
    out = tmp_path / "out"
    assert cli.main(["run", str(rec), "--model", str(model), "--output", str(out)]) == 0
    assert cli.main(["verify", str(out)]) == 0
    desc = json.loads((out / "quant_model_description.json").read_text())
    report = json.loads((out / "streamq_report.json").read_text())
    chosen = report["disabled_by_level"]
    # the two largest ratios of the independent computation, completed to whole groups
    expect = reference_ratios(model)
    expect.pop("lm_head")
    by_input: dict[tuple, list] = {}
    for name in expect:
        by_input.setdefault((name.rsplit(".", 2)[0], GROUPS[name.rsplit(".", 1)[-1]]), []).append(name)
    want = prepass.choose([(expect[names[0]], names) for names in by_input.values()], 2)
    assert set(chosen) == set(want) and len(chosen) >= 2
    for name, ratio in chosen.items():
        assert ratio == pytest.approx(want[name], rel=1e-4)
        assert desc[f"{name}.weight"] == "FLOAT" and f"{name}.weight_scale" not in desc
    quantized = [k for k, v in desc.items() if k.endswith("proj.weight") and v == "W8A8"]
    assert len(quantized) == 3 * 7 - len(chosen)
    assert report["state"]["disable_level"]["linears"] == chosen
    assert "kept FLOAT by disable_level" in (out / "streamq_report.md").read_text()


def kill_then_forbid_prepass(rec, model, out, kill_at: str, monkeypatch) -> None:
    """Kill a run at `kill_at`, then make any further pre-pass in this process fail the test."""
    killed = run_cli("run", rec, "--model", model, "--output", out, env={"STREAMQ_KILL_AT": kill_at})
    assert killed.returncode == -9

    def no_prepass(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")
    monkeypatch.setattr(prepass, "input_ratios", no_prepass)


def test_resume_adopts_the_recorded_choice(tmp_path, model, monkeypatch):
    rec = write_recipe(tmp_path / "r.toml", LEVEL_RECIPE)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_cli("run", rec, "--model", model, "--output", ref, check=True)
    kill_then_forbid_prepass(rec, model, out, "acts-saved:3", monkeypatch)
    assert cli.main(["run", str(rec), "--model", str(model), "--output", str(out)]) == 0
    assert output_bytes(out) == output_bytes(ref)
    # a finished output is recognised without the pre-pass too
    assert cli.main(["run", str(rec), "--model", str(model), "--output", str(out)]) == 0
    # --restart starts over: the choice is made again
    with pytest.raises(AssertionError, match="ran again"):
        cli.main(["run", str(rec), "--model", str(model), "--output", str(out), "--restart"])


def test_changed_level_refuses_to_resume(tmp_path, model):
    rec = write_recipe(tmp_path / "r.toml", LEVEL_RECIPE)
    out = tmp_path / "out"
    assert run_cli("run", rec, "--model", model, "--output", out, env={"STREAMQ_KILL_AT": "acts-saved:2"}).returncode == -9
    other = write_recipe(tmp_path / "o.toml", LEVEL_RECIPE.replace('"L2"', '"L3"'))
    proc = run_cli("run", other, "--model", model, "--output", out)
    assert proc.returncode == 2 and "quant.disable_level" in proc.stderr


# ---- DeepSeek-V3/R1 -------------------------------------------------------------------------------

DS_LAYERS, DS_EXPERTS = 2, 4
MTP = f"model.layers.{DS_LAYERS}"
EXPERT = ".mlp.experts."


def ds_recipe(level: str) -> str:
    # 0.00005 GB holds two of these 64×64 experts: each MoE layer streams its experts in two chunks.
    return SMALL_CAL + ('expert_budget_gb = 0.00005\n[quant]\nscheme = "W8A8_DYNAMIC"\n'
                        f'disable_last_linear = false\ndisable_level = "{level}"\n')


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """FP8 with block scales, a dense first layer, a MoE layer and the MTP layer."""
    return write_deepseek_v3(tmp_path_factory.mktemp("dl-ds") / "ds", layers=DS_LAYERS, first_k_dense=1,
                             experts=DS_EXPERTS, hidden=64, moe_intermediate=64, vocab=128, fp8=True, mtp=True)


def hf_layer_state(src: dict, prefix: str, moe: bool) -> dict:
    """A decoder layer's tensors under transformers' names, without the prefix; experts fused."""
    state = {n[len(prefix) + 1:]: t for n, t in src.items() if n.startswith(prefix + ".") and EXPERT not in n}
    if moe:
        e = [f"{prefix}.mlp.experts.{x}" for x in range(DS_EXPERTS)]
        state["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([src[f"{x}.gate_proj.weight"], src[f"{x}.up_proj.weight"]]) for x in e])
        state["mlp.experts.down_proj"] = torch.stack([src[f"{x}.down_proj.weight"] for x in e])
    return state


def record(modules: dict[str, torch.nn.Module], seen: dict) -> list:
    """Hooks keeping every input of every nn.Linear under `modules` (name prefix → module)."""
    return [m.register_forward_pre_hook(lambda m, a, n=f"{prefix}{name}": seen.setdefault(n, []).append(a[0]))
            for prefix, module in modules.items() for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)]


def ds_reference_inputs(model_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Every nn.Linear's inputs over the calibration ids (routed experts are fused tensors there,
    not linears): transformers' main model in fp32 from the FP8 weights dequantized to bf16, then
    the MTP layer as a transformers decoder layer fed eh_proj(enorm(embedding of token t+1),
    hnorm(final-normed state at t)), and its shared head. The MTP layer has its own embedding."""
    config = DeepseekV3Config.from_pretrained(model_dir)
    config._attn_implementation = "eager"
    reader = CheckpointReader(model_dir)
    src = {n: t.float() for n, t in reader.load_float(
        [n for n in reader.tensors if not n.endswith("_scale_inv")], torch.bfloat16).items()}
    hf = DeepseekV3ForCausalLM(config).float().eval()
    state = {n: t for n, t in src.items() if not n.startswith("model.layers.")}
    for i in range(DS_LAYERS):
        state |= {f"model.layers.{i}.{n}": t for n, t in hf_layer_state(src, f"model.layers.{i}", i > 0).items()}
    hf.load_state_dict(state, strict=True)
    mtp = torch.nn.Module()
    mtp.layer = DeepseekV3DecoderLayer(config, DS_LAYERS)
    mtp.eh_proj = torch.nn.Linear(128, 64, bias=False)
    mtp.head = torch.nn.Linear(64, 128, bias=False)
    for k in ("enorm", "hnorm", "norm"):
        setattr(mtp, k, DeepseekV3RMSNorm(64, config.rms_norm_eps))
    own = hf_layer_state(src, MTP, True)
    mtp.load_state_dict({**{f"layer.{n}": t for n, t in own.items() if n.split(".")[0] in
                            ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")},
                         "eh_proj.weight": own["eh_proj.weight"], "head.weight": own["shared_head.head.weight"],
                         "norm.weight": own["shared_head.norm.weight"], "enorm.weight": own["enorm.weight"],
                         "hnorm.weight": own["hnorm.weight"]}, strict=True)

    seen: dict[str, list] = {}
    hooks = record({"": hf, f"{MTP}.": mtp.layer, f"{MTP}.eh_proj": mtp.eh_proj,
                    f"{MTP}.shared_head.head": mtp.head}, seen)
    ids = token_ids([], None, 128, SAMPLES, SEQ, 0)
    L = SEQ - 1
    with torch.no_grad():
        h = hf.model(ids).last_hidden_state                                     # final-normed
        hf.lm_head(h)                                                           # as the CausalLM does
        x = mtp.eh_proj(torch.cat([mtp.enorm(own["embed_tokens.weight"][ids[:, 1:]]), mtp.hnorm(h[:, :-1])], -1))
        causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
        y = mtp.layer(x, attention_mask=causal, position_embeddings=hf.model.rotary_emb(x, torch.arange(L)[None]))
        mtp.head(mtp.norm(y))
    for hook in hooks:
        hook.remove()
    return seen


def ratio_of(xs: list[torch.Tensor]) -> float:
    t = torch.cat([x.flatten() for x in xs]).double()
    return t.abs().max().item() / t.std(unbiased=False).item()


def ds_reference(model_dir: Path) -> list[tuple[float, list[str]]]:
    """(ratio, linears) per input, linears grouped by the very tensor they read in the reference."""
    by_tensor: dict[int, list[str]] = {}
    seen = ds_reference_inputs(model_dir)
    for name, xs in seen.items():
        assert len(xs) == 1                          # one forward: one input tensor per linear
        by_tensor.setdefault(xs[0].data_ptr(), []).append(name)
    return [(ratio_of(seen[names[0]]), sorted(names)) for names in by_tensor.values()]


@pytest.fixture(scope="module")
def ds_expect(ds):
    return ds_reference(ds)


def test_deepseek_prepass_ratios_match_transformers(ds, ds_expect):
    r = parse_recipe(ds_recipe(""), Path("r.toml"))
    p = prepare(r, ds)
    got = prepass.input_ratios(r, p.reader, p.arch, p.plan, p.ids, torch.device("cpu"), torch.float32)
    # the same inputs, each read by the same (fused) linears: every candidate, no routed expert
    assert sorted(sorted(names) for _, names in got) == sorted(names for _, names in ds_expect)
    groups = {tuple(sorted(names)) for _, names in got}
    assert ("model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.1.self_attn.q_a_proj") in groups
    assert {f"{MTP}.eh_proj", f"{MTP}.shared_head.head", f"{MTP}.mlp.shared_experts.down_proj"} <= \
        {n for _, names in got for n in names}
    expect = {n: ratio for ratio, names in ds_expect for n in names}
    for ratio, names in got:
        for n in names:
            assert ratio == pytest.approx(expect[n], rel=1e-4), n


def test_deepseek_routed_experts_are_never_chosen(ds):
    p = prepare(parse_recipe(ds_recipe("L1000"), Path("r.toml")), ds)
    chosen = p.state["disable_level"]["linears"]
    assert not [n for n in chosen if EXPERT in n]
    # every other linear is kept FLOAT
    assert chosen.keys() == {n for n, a in p.plan.args.items() if a.scheme == "FLOAT" and EXPERT not in n}
    experts = [a.scheme for n, a in p.plan.args.items() if EXPERT in n]
    assert len(experts) == 2 * DS_EXPERTS * 3 and set(experts) == {"W8A8_DYNAMIC"}


def test_deepseek_run_keeps_the_chosen_linears_float(tmp_path, ds, ds_expect):
    rec = write_recipe(tmp_path / "r.toml", ds_recipe("L2"))
    out = tmp_path / "out"
    assert cli.main(["run", str(rec), "--model", str(ds), "--output", str(out)]) == 0
    assert cli.main(["verify", str(out)]) == 0
    desc = json.loads((out / "quant_model_description.json").read_text())
    chosen = json.loads((out / "streamq_report.json").read_text())["disabled_by_level"]
    want = prepass.choose(ds_expect, 2)
    assert set(chosen) == set(want) and len(chosen) >= 2
    for name, ratio in chosen.items():
        assert ratio == pytest.approx(want[name], rel=1e-4)
        assert desc[f"{name}.weight"] == "FLOAT" and f"{name}.weight_scale" not in desc
    expect = {n: ratio for ratio, names in ds_expect for n in names}
    quantized = {k[:-len(".weight")] for k, v in desc.items() if v == "W8A8_DYNAMIC" and k.endswith(".weight")}
    assert quantized == (set(expect) - set(chosen)) | {k[:-len(".weight")] for k in desc if EXPERT in k
                                                        and k.endswith(".weight")}


def test_deepseek_resume_adopts_the_recorded_choice(tmp_path, ds, ds_expect, monkeypatch):
    rec = write_recipe(tmp_path / "r.toml", ds_recipe("L2"))
    out = tmp_path / "out"
    kill_then_forbid_prepass(rec, ds, out, "acts-saved:2", monkeypatch)
    assert cli.main(["run", str(rec), "--model", str(ds), "--output", str(out)]) == 0
    assert cli.main(["verify", str(out)]) == 0
    # the choice the killed run recorded (byte-identical resumption is the dense test's and the
    # DeepSeek pipeline tests' subject)
    chosen = json.loads((out / "streamq_report.json").read_text())["disabled_by_level"]
    assert set(chosen) == set(prepass.choose(ds_expect, 2))
