"""W8A8S: the outlier-protected weight fit, its recipe words, and a run through verify and eval."""
import json
import math
from pathlib import Path

import pytest
import torch

from streamq.errors import StreamqError
from streamq.evaluate import evaluate
from streamq.kernels import ref_matmul as rm
from streamq.layerquant import static_inputs
from streamq.quant.schemes import SCHEMES, ActRange
from streamq.quant.sparse import inlier_scale, outlier_mask, sparse_scale
from streamq.recipe import Outliers, QuantArgs, load_recipe, parse_recipe
from streamq.synth import write_dense
from streamq.verify import verify

from conftest import SMALL_CAL, load_all, run_cli, write_recipe

P = Path("r.toml")


def heavy_tailed(n=24, k=200, seed=0) -> torch.Tensor:
    """Gaussian rows with a few planted outliers (5–40 σ), as LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.02
    rows, cols = torch.randint(0, n, (12,), generator=g), torch.randint(0, k, (12,), generator=g)
    W[rows, cols] = 0.02 * (5 + 35 * torch.rand(12, generator=g)) * torch.sign(torch.randn(12, generator=g))
    return W


# --- the slow references: one row at a time, in float64 Python ------------------------------------

def slow_mask(W: torch.Tensor, o: Outliers) -> list[list[bool]]:
    out = []
    for row in W.double().tolist():
        k = len(row)
        if not o.open_outlier:
            out.append([False] * k)
        elif o.use_sigma:
            mu = sum(row) / k
            sd = math.sqrt(sum((w - mu) ** 2 for w in row) / k)
            out.append([abs(w - mu) > o.sigma_factor * sd for w in row])
        else:
            m = min(max(round(o.fraction * k), 1), k - 1)
            top = sorted(range(k), key=lambda j: -abs(row[j]))[:m]
            out.append([j in top for j in range(k)])
    return out


def slow_scale(W: torch.Tensor, mask: list[list[bool]]) -> list[float]:
    s = []
    for row, m in zip(W.double().tolist(), mask):
        inlier_max = max((abs(w) for w, o in zip(row, m) if not o), default=0.0)
        s.append(max(inlier_max / 7, max(abs(w) for w in row) / 127) or 1.0)
    return s


@pytest.mark.parametrize("o", [Outliers(), Outliers(fraction=0.05), Outliers(use_sigma=True),
                               Outliers(use_sigma=True, sigma_factor=4.0), Outliers(open_outlier=False)])
def test_outliers_and_scale_match_the_slow_reference(o):
    W = heavy_tailed()
    mask = slow_mask(W, o)
    assert outlier_mask(W, o).tolist() == mask
    s = inlier_scale(W, outlier_mask(W, o))
    assert torch.allclose(s[:, 0].double(), torch.tensor(slow_scale(W, mask), dtype=torch.float64), rtol=1e-6)


def test_sigma_finds_the_planted_outliers_and_fraction_takes_its_share():
    W = torch.randn(16, 200, generator=torch.Generator().manual_seed(1)) * 0.02
    W[torch.arange(16), torch.arange(16) * 7] = 0.2  # one 10 σ weight per row
    found = outlier_mask(W, Outliers(use_sigma=True, sigma_factor=4.0))
    assert found[torch.arange(16), torch.arange(16) * 7].all() and found.sum() < 16 + 8
    W = heavy_tailed()
    assert outlier_mask(W, Outliers(fraction=0.05)).sum(dim=1).eq(10).all()  # round(0.05 · 200)
    assert sparse_scale(W, Outliers(open_outlier=False))[1] == 0.0


def quantize(W, o: Outliers, scheme="W8A8S", b=None, w_method="minmax", H=None):
    args = QuantArgs(scheme=scheme, outliers=o, w_method=w_method)
    return SCHEMES[scheme].quantize("m.q_proj", W, b, args, torch.bfloat16, ActRange(-1.5, 2.0), H)


def test_inliers_take_4_bits_and_outliers_are_protected():
    W = heavy_tailed()
    o = Outliers(use_sigma=True)
    q = quantize(W, o)
    mask = torch.tensor(slow_mask(W, o))
    s = torch.tensor(slow_scale(W, slow_mask(W, o))).to(torch.bfloat16).float().unsqueeze(1)
    assert torch.equal(q.tensors["weight_scale"].float(), s)
    assert torch.equal(q.tensors["weight"], torch.clamp(torch.round(W / s), -127, 127).to(torch.int8))
    assert q.tensors["weight"][~mask].abs().max() <= 7
    # Protected, not clipped: every weight, outliers included, within half a step of W.
    assert ((q.W_hat - W).abs() <= s / 2 * 1.01).all()
    # Without protection the same weights lose far more (the planted outliers stretch the 4-bit grid).
    plain = quantize(W, Outliers(open_outlier=False))
    assert plain.tensors["weight"].abs().max() <= 7
    assert (q.W_hat - W).norm() < 0.5 * (plain.W_hat - W).norm()


def test_an_outlier_past_the_int8_range_widens_its_row_instead_of_clipping():
    W = heavy_tailed()
    W[3, 7] = 500 * W[3].abs().median()
    q = quantize(W, Outliers())
    assert q.tensors["weight"][3, 7] == 127 and (q.W_hat[3, 7] - W[3, 7]).abs() <= q.tensors["weight_scale"][3] / 2


def test_stored_tensors_and_runtime_math_are_w8a8s():
    W, b = heavy_tailed(), torch.randn(24) * 0.1
    q, w8a8 = quantize(W, Outliers(), b=b), quantize(W, Outliers(), "W8A8", b=b)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in q.tensors.items()} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in w8a8.tensors.items()}
    assert all(torch.equal(q.tensors[k], w8a8.tensors[k]) for k in ("input_scale", "input_offset"))
    assert (q.act, q.s_x, q.o_x) == (w8a8.act, w8a8.s_x, w8a8.o_x)
    # The consumer's integer math on the stored tensors equals the float model of the fit:
    # (fake-quantized x) · Ŵᵀ + b, computed here without the kernels. The consumer multiplies by
    # 1 / input_scale rounded to the model dtype.
    x = (torch.rand(5, 200) * 3.5 - 1.5).double()
    r = torch.reciprocal(q.tensors["input_scale"]).double()
    x_hat = (torch.clamp(torch.round(x * r + q.o_x), -128, 127) - q.o_x) * q.s_x
    want = x_hat @ q.W_hat.double().T + b.double()
    got = rm.linear("W8A8", x, q.tensors).double()
    deq = q.tensors["deq_scale"].double()
    assert ((got - want).abs() <= deq / 2 + 1e-5).all()  # quant_bias rounds b to whole deq_scale steps


def test_gptq_chooses_q_on_the_sparse_grid():
    W = heavy_tailed()
    X = torch.randn(512, 200)
    H = 2 * X.T @ X / 512
    rtn, gptq = quantize(W, Outliers(), H=H), quantize(W, Outliers(), w_method="gptq", H=H)
    assert torch.equal(rtn.tensors["weight_scale"], gptq.tensors["weight_scale"])
    err = lambda r: float(torch.trace((r.W_hat - W) @ H @ (r.W_hat - W).T))  # noqa: E731
    assert err(gptq) < err(rtn)


def test_hqq_and_ssz_are_refused():
    for method in ("hqq", "ssz"):
        with pytest.raises(StreamqError, match="MinMax or GPTQ"):
            SCHEMES["W8A8S"].check("m.q_proj", 8, 16, QuantArgs("W8A8S", w_method=method))


# --- recipe words -----------------------------------------------------------------------------------

def test_msmodelslim_words_select_w8a8s_and_its_outliers():
    r = parse_recipe('[quant]\nis_lowbit = true\nw_bit = 4\na_bit = 8\nuse_sigma = true\nsigma_factor = 3.5\n'
                     'co_sparse = true\n[[quant.rules]]\nmatch = "*.o_proj"\nscheme = "W8A8"\n', P)
    assert r.default.scheme == "W8A8S" and r.default.outliers == Outliers(use_sigma=True, sigma_factor=3.5)
    assert r.rules[0].args.outliers == r.default.outliers
    plain = parse_recipe('[quant]\nscheme = "W8A8S"\n', P)
    assert plain.default.outliers == Outliers()
    assert parse_recipe('[quant]\nscheme = "W8A8S"\nfraction = 0.05\n', P).semantic_hash() != plain.semantic_hash()
    # msModelSlim passes every word; at its default value a word is accepted beside any scheme.
    assert parse_recipe('[quant]\nscheme = "W8A8"\nfraction = 0.01\nopen_outlier = true\nco_sparse = false\n'
                        'is_lowbit = false\n', P).default.scheme == "W8A8"


@pytest.mark.parametrize("text,needle", [
    ('scheme = "W8A8S"\nsigma_factor = 2.5\nuse_sigma = true', "sigma_factor must be in \\[3, 4\\]"),
    ('scheme = "W8A8S"\nsigma_factor = 4.5\nuse_sigma = true', "sigma_factor must be in \\[3, 4\\]"),
    ('scheme = "W8A8S"\nfraction = 0.0', "fraction must be in"),
    ('scheme = "W8A8S"\nfraction = 0.2', "fraction must be in"),
    ('scheme = "W8A8S"\nuse_sigma = "yes"', "use_sigma' must be bool"),
    ('scheme = "W8A8S"\nopen_outlier = 1', "open_outlier' must be bool"),
    ('scheme = "W8A8S"\nsigma_factor = 4.0', "sigma_factor = 4.0 has no effect"),
    ('scheme = "W8A8S"\nuse_sigma = true\nfraction = 0.05', "fraction = 0.05 has no effect"),
    ('scheme = "W8A8S"\nopen_outlier = false\nuse_sigma = true', "use_sigma = true has no effect"),
    ('scheme = "W8A8"\nuse_sigma = true', "quant.use_sigma = true shapes the weights of W8A8S"),
    ('scheme = "W8A8_DYNAMIC"\nfraction = 0.05', "quant.fraction = 0.05 shapes"),
    ('scheme = "W8A8"\nopen_outlier = false', "quant.open_outlier = false shapes"),
    ('scheme = "W8A8"\nco_sparse = true', "co_sparse mode is not implemented"),
    ('scheme = "W8A8"\nis_lowbit = true', "is_lowbit = true with scheme W8A8"),
    ('is_lowbit = true\nw_bit = 8\na_bit = 8', "with is_lowbit = true"),
    ('is_lowbit = true\nw_bit = 4\na_bit = 8\nis_dynamic = true', "with is_lowbit = true"),
    ('scheme = "W8A8S"\nis_lowbit = 1', "is_lowbit' must be bool"),
])
def test_sparse_words_are_checked_and_name_the_key(text, needle):
    with pytest.raises(StreamqError, match=needle):
        parse_recipe(f"[quant]\n{text}\n", P)


def test_shipped_recipe_is_w8a8s_for_the_sparse_consumer():
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "w8a8s.toml")
    assert r.default.scheme == "W8A8S" and r.default.outliers == Outliers(use_sigma=True)
    assert r.config_extra == {"quantize": "w8a8s"} and (r.anti_method, r.anti_symmetric) == ("m4", False)


def test_w8a8s_inputs_are_observed_as_static():
    assert static_inputs({"a": QuantArgs("W8A8S"), "b": QuantArgs("W8A8_DYNAMIC")}) == {"a"}


def test_outlier_words_are_not_rule_keys():
    with pytest.raises(StreamqError, match="unknown recipe key 'quant.rules\\[0\\].fraction'"):
        parse_recipe('[quant]\nscheme = "W8A8S"\n[[quant.rules]]\nmatch = "*"\nfraction = 0.05\n', P)


# --- a run: verify and eval -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w8a8s")
    model = write_dense(tmp / "m", "llama", layers=2, hidden=64, intermediate=128, vocab=128)
    outs = {}
    for name, quant in {"w8a8s": 'is_lowbit = true\nw_bit = 4\na_bit = 8\nuse_sigma = true\n'
                                 '[[quant.rules]]\nmatch = "*.o_proj"\nscheme = "W8A8"\n',
                        "w8a8": 'scheme = "W8A8"\n'}.items():
        outs[name] = tmp / name
        run_cli("run", write_recipe(tmp / f"{name}.toml", SMALL_CAL + "[quant]\n" + quant), "--model", model,
                "--output", outs[name], check=True)
    return model, outs


def test_w8a8s_output_verifies_with_w8a8s_types(sparse_run):
    model, outs = sparse_run
    assert verify(outs["w8a8s"]) == []
    d = json.loads((outs["w8a8s"] / "quant_model_description.json").read_text())
    assert d["model_quant_type"] == "W8A8S"
    assert d["model.layers.1.mlp.down_proj.deq_scale"] == "W8A8S"
    assert d["model.layers.1.self_attn.o_proj.weight"] == "W8A8"
    ts, ref = load_all(outs["w8a8s"]), load_all(outs["w8a8"])
    assert {k: (v.dtype, v.shape) for k, v in ts.items()} == {k: (v.dtype, v.shape) for k, v in ref.items()}
    # The first layer's attention input is the same in both runs: so is its static range.
    for suffix in ("input_scale", "input_offset"):
        name = f"model.layers.0.self_attn.q_proj.{suffix}"
        assert torch.equal(ts[name], ref[name])
    q = ts["model.layers.0.mlp.up_proj.weight"]
    assert (q.abs() <= 7).float().mean() > 0.97 and q.abs().max() > 7


def test_eval_runs_w8a8s_with_w8a8_math(sparse_run):
    model, outs = sparse_run
    r = evaluate(model, outs["w8a8s"], samples=4, seq_len=32, batch=2)
    assert 0 < r["kl_mean"] < 0.05 and all(e["rel_error"] < 0.3 for e in r["layers"])
