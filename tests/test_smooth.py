"""Anti-outlier smoothing: exactness on real decoder layers, the scale formulas, and the m6 search."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from streamq.arch.llama import FAMILIES
from streamq.flex import (
    FLOAT_ACT, fake_quant_int8_sym, fake_quant_static, flex_smooth_search, flex_subgraph_scale, matmul_quant_error,
)
from streamq.smooth import (
    ChannelObserver, ChannelStats, TokenSample, apply_linear_linear, apply_norm_linears, asym_shift, gqa_group_scale,
    iter_smooth_scale, smooth_dense_layer, smoothquant_scale,
)

HIDDEN, INTER, HEADS, HEAD_DIM, SEQ = 64, 128, 4, 16, 12
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
# linear → key of its input statistics (as arch.llama.INPUT_GROUPS)
INPUTS = {"self_attn.q_proj": "attn_in", "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.down_proj": "down_in"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_layer(family, kv_heads, seed=0):
    config = CONFIGS[family](hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                             num_key_value_heads=kv_heads, head_dim=HEAD_DIM, num_hidden_layers=1, vocab_size=32)
    config._attn_implementation = "sdpa"
    layer_cls, rotary_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    layer = layer_cls(config, 0).eval()
    with torch.no_grad():
        for i, (name, p) in enumerate(layer.named_parameters()):
            if name.endswith("norm.weight"):      # non-trivial norm weights, so the fold is visible
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=gen(100 + i)))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen(100 + i)))
    pos = torch.arange(SEQ)[None]
    rotary = rotary_cls(config)(torch.empty(1, SEQ, 1), pos)
    return layer, rotary


def hidden_with_outliers(seed=1, batch=2):
    h = torch.randn(batch, SEQ, HIDDEN, generator=gen(seed))
    h[..., [3, 17, 40]] = h[..., [3, 17, 40]] * 40 + 5        # large, off-centre channels
    return h


def forward(layer, h, rotary):
    out = layer(h, attention_mask=None, position_embeddings=rotary)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibrate(layer, h, rotary, keep=None):
    """The layer output and its input statistics; `keep` (a dict) also receives every input whole."""
    obs = {key: ChannelObserver() for key in INPUTS.values()}

    def hook(key):
        def update(m, a):
            obs[key].update(a[0])
            if keep is not None:
                keep[key] = a[0].reshape(-1, a[0].shape[-1]).clone()
        return update
    hooks = [layer.get_submodule(name).register_forward_pre_hook(hook(key)) for name, key in INPUTS.items()]
    ref = forward(layer, h, rotary)
    for hk in hooks:
        hk.remove()
    return ref, {key: o.stats() for key, o in obs.items()}


def attach_norm_biases(layer, biases):
    """The consumer's RMSNorm-with-bias: y = RMSNorm(x)·w + b."""
    return [getattr(layer, name).register_forward_hook(lambda m, a, y, b=b: y + b.to(y.dtype))
            for name, b in biases.items()]


def assert_same(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


CASES = [("llama", HEADS), ("llama", 2), ("qwen2", 2), ("qwen3", 1)]   # MHA, GQA, GQA + biases, MQA + q/k norms


# ---- 1. exactness on decoder layers ------------------------------------------------------------

@pytest.mark.parametrize("family,kv_heads", CASES)
def test_m1_layer_output_unchanged(family, kv_heads):
    layer, rotary = make_layer(family, kv_heads)
    h = hidden_with_outliers()
    ref, stats = calibrate(layer, h, rotary)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    assert smooth_dense_layer(layer, stats, "m1") == {}
    # every smoothed tensor really changed, so the check below is not vacuous
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        assert not torch.allclose(before[name], dict(layer.named_parameters())[name])
    with torch.no_grad():
        assert_same(forward(layer, h, rotary), ref)


SMOOTHED = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@pytest.mark.parametrize("family,kv_heads", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["m4", "m6"])
def test_m4_m6_layer_output_unchanged(family, kv_heads, symmetric, method):
    layer, rotary = make_layer(family, kv_heads)
    h = hidden_with_outliers()
    samples = {}
    ref, stats = calibrate(layer, h, rotary, samples)
    had_bias = layer.self_attn.q_proj.bias is not None
    before = {n: p.clone() for n, p in layer.named_parameters()}
    acts = {"attn_in": "per_tensor", "o_in": "per_token", "mlp_in": "per_tensor", "down_in": "per_token"}
    biases = smooth_dense_layer(layer, stats, method, symmetric=symmetric, samples=samples, acts=acts)
    for name in SMOOTHED:          # every subgraph was rescaled, so the check below is not vacuous
        assert not torch.allclose(before[name], dict(layer.named_parameters())[name]), name
    if symmetric:
        assert biases == {}
    else:
        assert set(biases) == {"input_layernorm", "post_attention_layernorm"}
        for b in biases.values():
            assert b.dtype == torch.float32 and b.shape == (HIDDEN,)
        # the compensating term needs a bias on every shifted linear, created where there was none
        for name in ("q_proj", "k_proj", "v_proj"):
            assert getattr(layer.self_attn, name).bias is not None
        assert layer.mlp.gate_proj.bias is not None and layer.mlp.up_proj.bias is not None
        assert had_bias == (family == "qwen2")
    hooks = attach_norm_biases(layer, biases)
    with torch.no_grad():
        assert_same(forward(layer, h, rotary), ref)
    for hk in hooks:
        hk.remove()


def test_asymmetric_norm_output_is_centred_and_scaled():
    """After the shifted fold, the norm emits (x − δ)/s: every channel's range is centred on 0."""
    layer, rotary = make_layer("llama", 2)
    h = hidden_with_outliers()
    _, stats = calibrate(layer, h, rotary)
    s = iter_smooth_scale(stats["attn_in"], [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                             layer.self_attn.v_proj.weight], symmetric=False)
    with torch.no_grad():
        x = layer.input_layernorm(h)
        b = apply_norm_linears(layer.input_layernorm.weight,
                               [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                               s, asym_shift(stats["attn_in"]))
        x2 = layer.input_layernorm(h) + b
    torch.testing.assert_close(x2, (x - asym_shift(stats["attn_in"])) / s, rtol=1e-5, atol=1e-6)
    obs = ChannelObserver()
    obs.update(x2)
    torch.testing.assert_close(obs.stats().max, -obs.stats().min, rtol=1e-4, atol=1e-5)


def test_gqa_fold_is_exact_for_any_scale():
    """v→o with 4 query heads over 2 kv heads: an arbitrary s over o's inputs is reduced per kv
    group (max), folded into v's rows, and the attention output does not change."""
    layer, rotary = make_layer("qwen2", 2)
    h = hidden_with_outliers()
    with torch.no_grad():
        ref = forward(layer, h, rotary)
        s = torch.rand(HEADS * HEAD_DIM, generator=gen(5)) * 10 + 0.1
        v0 = layer.self_attn.v_proj.weight.clone()
        s_o = apply_linear_linear(layer.self_attn.v_proj, layer.self_attn.o_proj, s, heads=(HEADS, 2))
        assert_same(forward(layer, h, rotary), ref)
    s_v, s_o2 = gqa_group_scale(s, HEADS, 2)
    assert torch.equal(s_o, s_o2)
    expect_v = torch.stack([s[:32].reshape(2, 16).amax(0), s[32:].reshape(2, 16).amax(0)]).reshape(-1)
    assert torch.equal(s_v, expect_v)
    assert torch.equal(s_o, torch.cat([expect_v[:16], expect_v[:16], expect_v[16:], expect_v[16:]]))
    torch.testing.assert_close(layer.self_attn.v_proj.weight, v0 / s_v[:, None])
    with pytest.raises(ValueError):
        apply_linear_linear(layer.self_attn.v_proj, layer.self_attn.o_proj, s)   # GQA needs heads


def test_linear_linear_scales_prev_bias():
    prev, nxt = nn.Linear(8, 6), nn.Linear(6, 5)
    x = torch.randn(10, 8, generator=gen(2))
    with torch.no_grad():
        ref = nxt(prev(x))
        apply_linear_linear(prev, nxt, torch.rand(6, generator=gen(3)) + 0.2)
        torch.testing.assert_close(nxt(prev(x)), ref, rtol=1e-5, atol=1e-6)


def test_norm_bias_existing_is_rescaled_and_bf16_weights():
    """A norm that already has a bias keeps its output relation; bf16 linears get a bf16 bias."""
    w, b0 = torch.rand(8, generator=gen(4)) + 0.5, torch.randn(8, generator=gen(5))
    lin = nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    s, shift = torch.rand(8, generator=gen(6)) + 0.5, torch.randn(8, generator=gen(7))
    W0, w0 = lin.weight.float().clone(), w.clone()
    b = apply_norm_linears(w, [lin], s, shift, norm_bias=b0)
    torch.testing.assert_close(w, w0 / s)
    torch.testing.assert_close(b, (b0 - shift) / s)
    assert lin.bias.dtype == torch.bfloat16
    torch.testing.assert_close(lin.bias.float(), (W0 @ shift).bfloat16().float())
    assert apply_norm_linears(w, [lin], torch.ones(8)) is None


# ---- 2. the formulas -----------------------------------------------------------------------------

def test_observer_streams_to_the_global_statistics():
    x = torch.randn(5, 7, 16, generator=gen(8)) * torch.linspace(0.1, 30, 16) + torch.linspace(-3, 3, 16)
    obs = ChannelObserver()
    for chunk in x.split(2):
        obs.update(chunk)
    st, flat = obs.stats(), x.reshape(-1, 16)
    assert torch.equal(st.min, flat.amin(0)) and torch.equal(st.max, flat.amax(0))
    assert torch.equal(st.absmax, flat.abs().amax(0))
    torch.testing.assert_close(asym_shift(st), (flat.amax(0) + flat.amin(0)) / 2)
    # the midpoint centres the data: max|x − δ| equals the half range and is symmetric around 0
    centred = flat - asym_shift(st)
    torch.testing.assert_close(centred.amax(0), -centred.amin(0))
    torch.testing.assert_close(centred.abs().amax(0), (st.max - st.min) / 2)


def test_smoothquant_scale_matches_independent_formula():
    a = torch.rand(12, generator=gen(9)) * 50
    W1, W2 = torch.randn(5, 12, generator=gen(10)), torch.randn(3, 12, generator=gen(11)) * 3
    a[0], W1[:, 0], W2[:, 0] = 0, 0, 0          # dead channel → 1
    a[1] = 0                                    # no activation → clamp
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        s = smoothquant_scale(a, [W1, W2], alpha)
        for j in range(12):
            wmax = max(abs(W1[i, j].item()) for i in range(5))
            wmax = max([wmax] + [abs(W2[i, j].item()) for i in range(3)])
            if a[j] == 0 and wmax == 0:
                expect = 1.0
            else:
                expect = max(a[j].item() ** alpha / max(wmax, 1e-5) ** (1 - alpha), 1e-5)
            assert s[j].item() == pytest.approx(expect, rel=1e-5), (alpha, j)


def test_iter_smooth_scale_symmetric_asymmetric_and_fixed_point():
    x = torch.randn(200, 10, generator=gen(12)) * torch.linspace(1, 20, 10) + 7
    obs = ChannelObserver()
    obs.update(x)
    st = obs.stats()
    W = torch.randn(6, 10, generator=gen(13))
    wmax = W.abs().amax(0)
    torch.testing.assert_close(iter_smooth_scale(st, [W]), st.absmax ** 0.9 / wmax ** 0.1)
    torch.testing.assert_close(iter_smooth_scale(st, [W], 0.5), smoothquant_scale(st.absmax, [W], 0.5))
    half = (st.max - st.min) / 2
    torch.testing.assert_close(iter_smooth_scale(st, [W], symmetric=False), half ** 0.9 / wmax ** 0.1)
    # re-deriving s from the smoothed statistics gives 1: one application is the fixed point
    for sym in (True, False):
        s = iter_smooth_scale(st, [W], symmetric=sym)
        smoothed = ChannelStats(absmax=st.absmax / s, min=st.min / s, max=st.max / s)
        torch.testing.assert_close(iter_smooth_scale(smoothed, [W * s], symmetric=sym), torch.ones(10))


def test_smoothing_reduces_int8_error_with_outlier_channels():
    X = torch.randn(256, 64, generator=gen(14))
    X[:, [5, 23, 50]] *= 60                                  # outlier channels
    W = torch.randn(96, 64, generator=gen(15)) * 0.05
    s = smoothquant_scale(X.abs().amax(0), [W], 0.5)
    Xs = X / s

    def rel(t, q):
        return ((t - q).norm() / t.norm()).item()

    def channel_rel(t, q):                               # mean over channels: every channel counts alike
        return ((t - q).norm(dim=0) / t.norm(dim=0)).mean().item()

    # per-tensor int8 activations: the outliers no longer set the step for every channel
    plain, smooth = channel_rel(X, fake_quant_int8_sym(X, None)), channel_rel(Xs, fake_quant_int8_sym(Xs, None))
    assert smooth < 0.25 * plain
    # and end to end, per-tensor activations with per-channel weights
    ref = X @ W.T
    err_plain = rel(ref, fake_quant_int8_sym(X, None) @ fake_quant_int8_sym(W).T)
    err_smooth = rel(ref, fake_quant_int8_sym(Xs, None) @ fake_quant_int8_sym(W * s).T)
    assert err_smooth < 0.5 * err_plain


# ---- 3. m6 search --------------------------------------------------------------------------------

def slow_static_round_trip(x, lo, hi):
    """FORMAT.md §3's static W8A8 input in float64 from scalar parameters: s_x = (max − min)/255
    over a range holding 0, o_x = round(−min/s_x) − 128, q = clamp(round(x/s_x + o_x)), x̂ = (q − o_x)·s_x."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s_x = (hi - lo) / 255
    o_x = round(-lo / s_x) - 128
    return (torch.clamp(torch.round(x.double() / s_x + o_x), -128, 127) - o_x) * s_x


def slow_quant_matmul_error(X, W, s, act, lo=None, hi=None):
    """The m6 objective from integer parts: q_w = round(W·s / step_n) per output row n, the input
    per act, the product accumulated in float64."""
    Ws = (W * s).double()
    step_w = Ws.abs().amax(1, keepdim=True) / 127
    Wq = torch.clamp(torch.round(Ws / step_w), -127, 127) * step_w
    Xs = (X / s).double()
    if act == "per_tensor":
        Xq = slow_static_round_trip(Xs, float((lo / s).min()), float((hi / s).max()))
    elif act == "per_token":
        step_x = Xs.abs().amax(1, keepdim=True) / 127
        Xq = torch.clamp(torch.round(Xs / step_x), -127, 127) * step_x
    else:
        Xq = Xs
    ref = X.double() @ W.double().T
    return ((ref - Xq @ Wq.T).norm() / ref.norm()).item()


def outlier_data(seed, tokens=96, channels=32, rows=24):
    X = torch.randn(tokens, channels, generator=gen(seed))
    X[:, [2, 9]] = X[:, [2, 9]] * 50 + 20                # large, off-centre channels
    W = torch.randn(rows, channels, generator=gen(seed + 1)) * 0.1
    return X, W


def test_static_round_trip_matches_the_format():
    x = torch.randn(7, 9, generator=gen(21)) * 3 + 1
    for lo, hi in ((-2.5, 6.0), (0.5, 6.0), (-4.0, -1.0)):   # ranges that do and do not hold 0
        got = fake_quant_static(x, lo, hi)
        torch.testing.assert_close(got, slow_static_round_trip(x, lo, hi).float())
        s_x = (max(hi, 0.0) - min(lo, 0.0)) / 255            # element by element, as the consumer does
        o_x = round(-min(lo, 0.0) / s_x) - 128
        for v, g in zip(x.flatten().tolist(), got.flatten().tolist()):
            assert g == pytest.approx((min(max(round(v / s_x + o_x), -128), 127) - o_x) * s_x, rel=1e-5, abs=1e-6)
    # one range per candidate of a batch
    lo, hi = torch.tensor([-2.5, 0.5])[:, None, None], torch.tensor([6.0, 3.0])[:, None, None]
    both = fake_quant_static(x.expand(2, 7, 9), lo, hi)
    torch.testing.assert_close(both[1], fake_quant_static(x, 0.5, 3.0))


@pytest.mark.parametrize("act", ["per_tensor", "per_token", "none"])
def test_matmul_error_matches_slow_integer_computation(act):
    X, W = outlier_data(22)
    s = torch.rand(32, generator=gen(24)) * 3 + 0.2
    lo, hi = X.amin(0) - 1, X.amax(0) + 1                  # the calibration range is wider than the sample
    got = matmul_quant_error(X, W, s, act, lo, hi)
    assert got == pytest.approx(slow_quant_matmul_error(X, W, s, act, lo, hi), rel=1e-4)


@pytest.mark.parametrize("act", ["per_tensor", "per_token"])
def test_flex_search_returns_grid_minimum(act):
    X, W1 = outlier_data(16)
    Ws = [W1, torch.randn(8, 32, generator=gen(18))]
    A, lo, hi = X.abs().amax(0), X.amin(0), X.amax(0)
    alphas, betas = (0.0, 0.25, 0.5, 0.75, 1.0), (0.0, 0.3, 0.6, 0.9)
    a, b, err = flex_smooth_search(X, Ws, A, act, lo, hi, alphas=alphas, betas=betas)
    # brute force, independently of the search's own loop and error function
    W = torch.cat(Ws)
    wmax = W.abs().amax(0)
    errs = {(al, be): slow_quant_matmul_error(X, W, (A ** al / wmax ** be).clamp(min=1e-5), act, lo, hi)
            for al in alphas for be in betas}
    best = min(errs.values())
    assert errs[(a, b)] == pytest.approx(best, rel=1e-4) and err == pytest.approx(best, rel=1e-4)
    assert best < 0.5 * errs[(0.0, 0.0)]                   # smoothing beats none on outlier data


def test_flex_search_scores_the_folded_scale():
    """v→o under GQA: the search must score the scale o_proj really gets (max per kv group)."""
    X, _ = outlier_data(25, channels=HEADS * HEAD_DIM)
    W = torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=gen(26)) * 0.1
    A = X.abs().amax(0)
    fold = lambda s: gqa_group_scale(s, HEADS, 2)[1]        # noqa: E731
    grid = (0.0, 0.5, 1.0)
    a, b, _ = flex_smooth_search(X, [W], A, "per_token", fold=fold, alphas=grid, betas=grid)
    errs = {(al, be): slow_quant_matmul_error(X, W, fold((A ** al / W.abs().amax(0) ** be).clamp(min=1e-5)),
                                              "per_token") for al in grid for be in grid}
    assert errs[(a, b)] == pytest.approx(min(errs.values()), rel=1e-4)


def test_flex_search_row_sample_keeps_full_weight_maxima():
    """Measured on a seeded sample of rows, but s = A^α / max|W|^β over every row: a row outside
    the sample that holds a column maximum still sets the scale."""
    X, W = outlier_data(27, rows=40)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:6].sort().values
    outside = next(r for r in range(40) if r not in rows.tolist())
    W[outside, 2] = 30.0                                   # dominates max|W| of an outlier channel
    A, grid = X.abs().amax(0), (0.0, 0.5, 1.0)
    a, b, err = flex_smooth_search(X, [W], A, "per_token", alphas=grid, betas=grid, rows=6)
    wmax = W.abs().amax(0)
    errs = {(al, be): slow_quant_matmul_error(X, W[rows], (A ** al / wmax ** be).clamp(min=1e-5), "per_token")
            for al in grid for be in grid}
    assert err == pytest.approx(errs[(a, b)], rel=1e-4) and errs[(a, b)] == pytest.approx(min(errs.values()), rel=1e-4)
    assert flex_smooth_search(X, [W], A, "per_token", alphas=grid, betas=grid, rows=40) == \
        flex_smooth_search(X, [W], A, "per_token", alphas=grid, betas=grid, rows=None)


def test_flex_subgraph_scale_shifted_and_float():
    X, W = outlier_data(28, tokens=48)
    obs = ChannelObserver()
    obs.update(X)
    st = obs.stats()
    # shifted: the search sees X − δ with the shifted range, and A is the half range
    s = flex_subgraph_scale(st, X, [W], False, "per_tensor")
    delta, half = (st.max + st.min) / 2, (st.max - st.min) / 2
    wmax = W.abs().amax(0)
    grid = [round(0.1 * i, 1) for i in range(11)]
    errs = {(al, be): slow_quant_matmul_error(X - delta, W, (half ** al / wmax ** be).clamp(min=1e-5), "per_tensor",
                                              st.min - delta, st.max - delta) for al in grid for be in grid}
    al, be = min(errs, key=lambda k: (errs[k], k))
    torch.testing.assert_close(s, (half ** al / wmax ** be).clamp(min=1e-5))
    assert not torch.allclose(s, torch.ones_like(s))
    # a float consumer quantizes nothing: no smoothing
    assert torch.equal(flex_subgraph_scale(st, X, [W], True, FLOAT_ACT), torch.ones(32))


def test_token_sample_is_the_same_subset_whatever_the_batches():
    x = torch.randn(6, 10, 8, generator=gen(29))
    keep = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:17].sort().values
    for split in (1, 2, 6):
        ts = TokenSample(60, 17)
        for chunk in x.split(split):
            ts.update(chunk)
        assert torch.equal(ts.tensor(), x.reshape(60, 8)[keep])
    small = TokenSample(60, 100)                            # a budget above the total keeps every token
    small.update(x)
    assert torch.equal(small.tensor(), x.reshape(60, 8))


def test_smoothing_pass_samples_and_maps_consumer_schemes():
    from streamq.smoothing import channel_stats, consumer_acts
    layer, rotary = make_layer("llama", 2)
    h = hidden_with_outliers(batch=3)
    found = channel_stats(layer, lambda x: forward(layer, x, rotary), h, 2, "cpu", torch.float32, sample=20)
    assert found["down_in/sample"].shape == (20, INTER) and found["attn_in/sample"].shape == (20, HIDDEN)
    keep = {}
    calibrate(layer, h, rotary, keep)
    idx = torch.randperm(3 * SEQ, generator=torch.Generator().manual_seed(0))[:20].sort().values
    torch.testing.assert_close(found["o_in/sample"], keep["o_in"][idx])
    acts = consumer_acts({"self_attn.q_proj": "W8A8", "self_attn.o_proj": "W8A8_DYNAMIC", "mlp.gate_proj": "W8A16",
                          "mlp.down_proj": "FLOAT"})
    assert acts == {"attn_in": "per_tensor", "o_in": "per_token", "mlp_in": "none", "down_in": FLOAT_ACT}


def run_tiny(tmp_path, kind: str, quant: str):
    """Run and verify a recipe ([quant] body) on a tiny 2-layer model; returns (model, out)."""
    from streamq import cli
    from streamq.synth import write_dense
    from conftest import SMALL_CAL, write_recipe
    model = write_dense(tmp_path / "m", kind, layers=2, hidden=64, intermediate=128, vocab=128)
    rec = write_recipe(tmp_path / "r.toml", SMALL_CAL + "[quant]\n" + quant)
    out = tmp_path / "out"
    assert cli.main(["run", str(rec), "--model", str(model), "--output", str(out)]) == 0
    assert cli.main(["verify", str(out)]) == 0
    return model, out


def test_m6_run_verifies_and_stays_close(tmp_path):
    from streamq.evaluate import evaluate
    from conftest import load_all
    model, out = run_tiny(tmp_path, "qwen2", 'scheme = "W8A8"\nanti_method = "m6"\nanti_symmetric = false\n')
    assert load_all(out)["model.layers.1.post_attention_layernorm.bias"].dtype == torch.float32
    assert evaluate(model, out, samples=4, seq_len=32, batch=2)["kl_mean"] < 0.01


# ---- 4. subgraph selection (enable_subgraph_type) ----------------------------------------------

# msModelSlim's subgraph type → the tensors of a dense layer it rescales ("linear-linear" has none)
DENSE_TOUCHED = {
    "up-down": {"mlp.up_proj.weight", "mlp.down_proj.weight"},
    "ov": {"self_attn.v_proj.weight", "self_attn.o_proj.weight"},
    "norm-linear": {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                    "mlp.up_proj.weight"},
    "linear-linear": set(),
}


@pytest.mark.parametrize("kind", sorted(DENSE_TOUCHED))
def test_subgraph_selection_restricts_dense_smoothing(kind):
    layer, rotary = make_layer("llama", 2)
    h = hidden_with_outliers()
    ref, stats = calibrate(layer, h, rotary)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    assert smooth_dense_layer(layer, stats, "m4", subgraphs=(kind,)) == {}
    changed = {n for n, p in layer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == DENSE_TOUCHED[kind]
    with torch.no_grad():
        assert_same(forward(layer, h, rotary), ref)


def test_asymmetric_run_without_norm_linear_plans_no_biases(tmp_path):
    """The shift belongs to norm→linears: without that subgraph, asymmetric smoothing creates no
    bias, and the plan expects none; ov alone leaves the norms as they were."""
    from conftest import load_all
    model, out = run_tiny(tmp_path, "llama", 'scheme = "FLOAT"\nanti_method = "m4"\nanti_symmetric = false\n'
                          'enable_subgraph_type = ["ov"]\n')
    got, src = load_all(out), load_all(model)
    assert not [n for n in got if n.endswith("norm.bias")]
    for i in (0, 1):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(got[f"model.layers.{i}.{norm}.weight"], src[f"model.layers.{i}.{norm}.weight"])
        assert not torch.equal(got[f"model.layers.{i}.self_attn.v_proj.weight"],
                               src[f"model.layers.{i}.self_attn.v_proj.weight"])
