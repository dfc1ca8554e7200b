"""The reference kernels against FORMAT.md §3, with the stored tensors built here from a float W.

For every scheme: (1) the kernel equals an independent float64 evaluation of the same run-time
formula to 1e-6 relative; (2) it is close to the float x·Wᵀ (+ b), i.e. the only error left is
quantization error; (3) a corrupted tensor gives a clearly larger error than the correct one, which
is what lets an evaluation of a checkpoint through these kernels catch a broken writer.
"""
import struct

import pytest
import torch

from streamq.kernels import ref_matmul as rm

N, K, T = 32, 256, 12
TIGHT = 1e-6


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_w(n=N, k=K, seed=0):
    W = torch.randn(n, k, generator=gen(seed)) * 0.05
    W[3, 7] = 0.4   # one outlier weight, as real layers have: per-channel scales must cope with it
    return W


def rand_x(lo=-1.0, hi=3.0, t=T, k=K, seed=1):
    """Activations on an asymmetric range, so the static offset o_x is far from 0."""
    return torch.rand(t, k, generator=gen(seed)) * (hi - lo) + lo


def llm_x(t=T, k=K, seed=1):
    """Activations shaped like an LLM's: Gaussian bulk plus a few outlier channels ~10x larger.

    The outliers set the per-token scale, so the bulk lands on small integers, as it does in real
    models; that is also the regime where a wrong scale_bias (8·ΣŴ, added against x_q − 8) matters.
    """
    x = torch.randn(t, k, generator=gen(seed))
    x[:, 5] *= 10
    x[:, 100] *= -12
    return x


def rel(a, b):
    """Relative Frobenius error of a against b, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def assert_tight(y, ref):
    assert y.dtype == torch.float32
    # The kernel rounds its float64 result to float32 (~6e-8 relative), well inside the tolerance.
    assert rel(y, ref) < TIGHT, rel(y, ref)


# ---- construction of the stored tensors, written out from FORMAT.md §3 -----------------------

def pack4(q):
    """FORMAT §4: packed[j, k] = (q[2j+1, k] << 4) | (q[2j, k] & 0x0F), as an int8 bit pattern."""
    q = q.to(torch.int16)
    return ((q[1::2] << 4) | (q[0::2] & 0x0F)).to(torch.uint8).view(torch.int8)


def swap_rows_pairwise(q):
    """Rows 2j and 2j+1 exchanged: packing this gives the wrong nibble order."""
    n, k = q.shape
    return q.reshape(n // 2, 2, k).flip(1).reshape(n, k)


def deq_as_int64(deq):
    """fp32 bit pattern viewed as int32, widened to int64 (the fp16-model form)."""
    return deq.float().view(torch.int32).to(torch.int64)


def deq_decode_independent(stored):
    """The int64 form read back with struct, independently of the kernel's tensor views."""
    if stored.dtype == torch.int64:
        return torch.tensor([struct.unpack("<f", struct.pack("<I", int(v) & 0xFFFFFFFF))[0] for v in stored],
                            dtype=torch.float64)
    return stored.double()


def build_w8a8_static(W, b, lo, hi, dt):
    s_w = (W.abs().amax(1, keepdim=True) / 127).to(dt)           # stored in the model dtype
    q = torch.clamp(torch.round(W / s_w.float()), -127, 127).to(torch.int8)
    s_x = torch.tensor([(hi - lo) / 255]).to(dt)                  # [1], not 0-d
    o_x = (torch.round(-lo / s_x.float()) - 128).to(dt)
    deq = s_x.float() * s_w.float()[:, 0]                         # fp32, from the dtype-rounded scales
    bias = torch.zeros(W.shape[0]) if b is None else b
    quant_bias = torch.round(bias / deq - o_x.float() * q.float().sum(1)).to(torch.int32)
    t = {"weight": q, "weight_scale": s_w, "weight_offset": torch.zeros_like(s_w),
         "input_scale": s_x, "input_offset": o_x,
         "deq_scale": deq if dt == torch.bfloat16 else deq_as_int64(deq), "quant_bias": quant_bias}
    if b is not None:
        t["bias"] = b.to(dt)
    return t


def build_w8a8_dynamic(W, b, dt):
    s_w = (W.abs().amax(1, keepdim=True) / 127).to(dt)
    q = torch.clamp(torch.round(W / s_w.float()), -127, 127).to(torch.int8)
    t = {"weight": q, "weight_scale": s_w, "weight_offset": torch.zeros_like(s_w)}
    if b is not None:
        t["bias"] = b.to(dt)
    return t


def build_w4a16(W, G, sym):
    n, k = W.shape
    Wg = W.reshape(n, k // G, G)
    if sym:
        s = Wg.abs().amax(2) / 7
        z = torch.zeros_like(s)
    else:
        lo, hi = Wg.amin(2).clamp(max=0), Wg.amax(2).clamp(min=0)
        s = (hi - lo) / 15
        z = torch.clamp(torch.round(-8 - lo / s), -8, 7)
    q = torch.clamp(torch.round(Wg / s[..., None] + z[..., None]), -8, 7).reshape(n, k)
    return {"weight": pack4(q), "weight_scale": s, "weight_offset": z}, q


def bf16(v):
    return v.to(torch.bfloat16).float()


def scale_bias(W_hat, down):
    n, k = W_hat.shape
    return 8 * (W_hat.reshape(n, 16, k // 16).sum(2) if down else W_hat.sum(1, keepdim=True))


def build_w4a8_two_level(W, G, down):
    n, k = W.shape
    s1 = W.abs().amax(1, keepdim=True) / 119
    w8 = torch.clamp(torch.round(W / s1), -119, 119)
    s2 = torch.clamp(torch.round(w8.reshape(n, k // G, G).abs().amax(2) / 7), min=1)
    q4 = torch.clamp(torch.round(w8.reshape(n, k // G, G) / s2[..., None]), -7, 7).reshape(n, k)
    W_hat = (q4.reshape(n, k // G, G) * bf16(s2)[..., None]).reshape(n, k) * bf16(s1)   # fp32
    t = {"weight": pack4(q4), "weight_scale": s1, "weight_offset": torch.zeros_like(s1),
         "weight_scale_second": s2, "weight_offset_second": torch.zeros_like(s2, dtype=torch.int64),
         "scale_bias": scale_bias(W_hat, down)}
    return t, q4, W_hat


def build_w4a8_per_channel(W, down):
    s = W.abs().amax(1, keepdim=True) / 7
    q4 = torch.clamp(torch.round(W / s), -8, 7)
    W_hat = q4 * s
    t = {"weight": pack4(q4), "weight_scale": s, "weight_offset": torch.zeros_like(s),
         "scale_bias": scale_bias(W_hat, down)}
    return t, q4, W_hat


# ---- independent float64 evaluations of the run-time formulas --------------------------------

def ref_static(x, t):
    s_x = t["input_scale"]
    r = (1 / s_x).double()                        # the consumer's reciprocal, in the model dtype
    x_q = torch.clamp(torch.round(x.double() * r + t["input_offset"].double()), -128, 127)
    deq = deq_decode_independent(t["deq_scale"])
    return (x_q @ t["weight"].double().T + t["quant_bias"].double()) * deq


def per_token(x):
    s_t = (x.float().abs().amax(-1, keepdim=True) / 127).double()
    x_q = torch.nan_to_num(torch.round(x.double() / s_t))     # a token of zeros: 0 / 0 → 0
    return torch.clamp(x_q, -127, 127), s_t


def ref_dynamic(x, t):
    x_q, s_t = per_token(x)
    y = (x_q @ t["weight"].double().T) * t["weight_scale"].double().reshape(-1) * s_t
    return y + (t["bias"].double() if "bias" in t else 0)


def float_ref(x, W, b=None):
    return x.double() @ W.double().T + (0 if b is None else b.double())


# ---- exactness of the integer accumulation ---------------------------------------------------

def test_int_matmul_is_exact_at_int8_extremes():
    g = gen(5)
    k = 8192
    a = torch.randint(-128, 128, (6, k), generator=g)
    b = torch.randint(-127, 128, (5, k), generator=g)
    a[0], b[0] = -128, -127                        # the largest possible sum, 8192 · 128 · 127
    got = rm._int_matmul(a.double(), b.double())
    assert torch.equal(got.to(torch.int64), a @ b.T)
    assert torch.equal(got, torch.round(got))


def test_deq_scale_decoding():
    deq = torch.tensor([1.5e-5, 3.0e-4, 0.125], dtype=torch.float32)
    assert torch.equal(rm.decode_deq_scale(deq_as_int64(deq), torch.float16), deq.double())
    # the same pattern held as an unsigned 32-bit value decodes the same way
    unsigned = deq_as_int64(deq) & 0xFFFFFFFF
    assert torch.equal(rm.decode_deq_scale(unsigned, torch.float16), deq.double())
    assert torch.equal(rm.decode_deq_scale(deq, torch.bfloat16), deq.double())
    # the wrong model's form is cast, not decoded, as the consumer's parameter copy does
    assert not rm.decode_deq_scale(deq, torch.float16).any()
    assert rm.decode_deq_scale(deq_as_int64(deq), torch.bfloat16).min() > 1e8


# ---- W8A8 static ------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_static(dt, with_bias):
    W, x = rand_w(), rand_x()
    b = torch.randn(N, generator=gen(2)) * 0.1 if with_bias else None
    t = build_w8a8_static(W, b, -1.0, 3.0, dt)
    y = rm.w8a8_static(x, t)
    assert_tight(y, ref_static(x, t))
    # bias is folded into quant_bias: the output tracks x·Wᵀ + b without adding `bias` again
    assert rel(y, float_ref(x, W, b)) < 0.02


def corrupt_static(t, how):
    t = dict(t)
    if how == "quant_bias_zeros":
        t["quant_bias"] = torch.zeros_like(t["quant_bias"])
    elif how == "deq_without_s_x":
        deq = t["weight_scale"].float()[:, 0]
        t["deq_scale"] = deq_as_int64(deq) if t["deq_scale"].dtype == torch.int64 else deq
    elif how == "deq_other_model_form":
        # the bf16 model's fp32 deq_scale written for an fp16 model: the consumer casts it to int64 → 0
        t["deq_scale"] = rm.decode_deq_scale(t["deq_scale"], torch.float16).float()
    elif how == "offset_sign":
        t["input_offset"] = -t["input_offset"]
    return t


@pytest.mark.parametrize("how", ["quant_bias_zeros", "deq_without_s_x", "deq_other_model_form", "offset_sign"])
def test_w8a8_static_corruptions_show_as_error(how):
    W, x, dt = rand_w(), rand_x(), torch.float16
    t = build_w8a8_static(W, None, -1.0, 3.0, dt)
    good = rel(rm.w8a8_static(x, t), float_ref(x, W))
    bad = rel(rm.w8a8_static(x, corrupt_static(t, how)), float_ref(x, W))
    assert bad > 0.3 and bad > 20 * good, (how, good, bad)


def test_w8a8_static_int64_deq_in_bf16_model_is_garbage():
    W, x = rand_w(), rand_x()
    t = build_w8a8_static(W, None, -1.0, 3.0, torch.bfloat16)
    t["deq_scale"] = deq_as_int64(t["deq_scale"])
    assert rel(rm.w8a8_static(x, t), float_ref(x, W)) > 1e6


# ---- W8A8 dynamic and PDMIX -------------------------------------------------------------------

@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_w8a8_dynamic(dt):
    W, x = rand_w(), llm_x()
    x[0] = 0                                       # a token of zeros gives zeros + bias, not NaN
    b = torch.randn(N, generator=gen(3)) * 0.1
    t = build_w8a8_dynamic(W, b, dt)
    y = rm.w8a8_dynamic(x, t)
    assert_tight(y, ref_dynamic(x, t))
    assert torch.allclose(y[0].double(), t["bias"].double())
    assert rel(y[1:], float_ref(x[1:], W, b)) < 0.04   # outlier channels make the int8 steps coarse


def test_w8a8_dynamic_wrong_scale_rows_show_as_error():
    W, x = rand_w(), llm_x()
    t = build_w8a8_dynamic(W, None, torch.bfloat16)
    good = rel(rm.w8a8_dynamic(x, t), float_ref(x, W))
    t["weight_scale"] = t["weight_scale"].roll(1, 0)
    bad = rel(rm.w8a8_dynamic(x, t), float_ref(x, W))
    assert bad > 0.1 and bad > 10 * good, (good, bad)


def test_w8a8_mix_phases():
    W, x, dt = rand_w(), rand_x(), torch.bfloat16
    b = torch.randn(N, generator=gen(4)) * 0.1
    t = build_w8a8_static(W, b, -1.0, 3.0, dt)     # the union: static set + weight_scale + bias
    prefill, decode = rm.w8a8_mix(x, t, "prefill"), rm.w8a8_mix(x, t, "decode")
    assert_tight(prefill, ref_dynamic(x, t))       # weight_scale, per-token activations, + bias
    assert_tight(decode, ref_static(x, t))         # deq_scale, quant_bias; bias not added twice
    assert rel(prefill, float_ref(x, W, b)) < 0.02 and rel(decode, float_ref(x, W, b)) < 0.02
    assert torch.equal(rm.linear("W8A8_MIX", x, t), prefill)
    assert torch.equal(rm.linear("W8A8_MIX", x, t, phase="decode"), decode)
    with pytest.raises(ValueError, match="phase"):
        rm.w8a8_mix(x, t, "both")


# ---- weight-only ------------------------------------------------------------------------------

def test_w8a16():
    W, x = rand_w(), llm_x()
    b = torch.randn(N, generator=gen(6)) * 0.1
    t = build_w8a8_dynamic(W, b, torch.bfloat16)
    y = rm.w8a16(x, t)
    W_hat = t["weight"].double() * t["weight_scale"].double()
    assert_tight(y, x.double() @ W_hat.T + t["bias"].double())
    assert rel(y, float_ref(x, W, b)) < 0.01


@pytest.mark.parametrize("G, sym", [(32, True), (32, False), (K, False)])
def test_w4a16(G, sym):
    W, x = rand_w(), llm_x()
    t, q = build_w4a16(W, G, sym)
    y = rm.w4a16(x, t, G)
    s, z = t["weight_scale"].double(), t["weight_offset"].double()
    W_hat = ((q.double().reshape(N, K // G, G) - z[..., None]) * s[..., None]).reshape(N, K)
    assert_tight(y, x.double() @ W_hat.T)
    assert rel(y, float_ref(x, W)) < 0.15
    # the group width also follows from the stored scale shape alone
    assert torch.equal(rm.linear("W4A16", x, t, 0), y)


def test_w4a16_swapped_nibbles_show_as_error():
    W, x, G = rand_w(), llm_x(), 32
    t, q = build_w4a16(W, G, sym=False)
    good = rel(rm.w4a16(x, t, G), float_ref(x, W))
    t["weight"] = pack4(swap_rows_pairwise(q))
    bad = rel(rm.w4a16(x, t, G), float_ref(x, W))
    assert bad > 1.0 and bad > 5 * good, (good, bad)


# ---- W4A8 dynamic -----------------------------------------------------------------------------

def ref_w4a8(x, W_hat):
    """s_t · x_q · Ŵᵀ: the formula without the device's scale_bias split, which must cancel."""
    x_q, s_t = per_token(x)
    return (x_q @ W_hat.double().T) * s_t


@pytest.mark.parametrize("down", [False, True])
def test_w4a8_two_level(down):
    W, x, G = rand_w(), llm_x(), 64
    t, q4, W_hat = build_w4a8_two_level(W, G, down)
    y = rm.w4a8_dynamic(x, t, G)
    assert_tight(y, ref_w4a8(x, W_hat))
    assert rel(y, float_ref(x, W)) < 0.2
    assert torch.equal(rm.linear("W4A8_DYNAMIC", x, t, G), y)


@pytest.mark.parametrize("down", [False, True])
def test_w4a8_per_channel(down):
    W, x = rand_w(), llm_x()
    t, q4, W_hat = build_w4a8_per_channel(W, down)
    y = rm.w4a8_dynamic(x, t, 0)
    assert_tight(y, ref_w4a8(x, W_hat))
    assert rel(y, float_ref(x, W)) < 0.25   # one int4 scale per row, over an outlier: coarse


def corrupt_w4a8(t, q4, how):
    t = dict(t)
    if how == "swapped_nibbles":
        t["weight"] = pack4(swap_rows_pairwise(q4))
    elif how == "scale_bias_zeros":
        t["scale_bias"] = torch.zeros_like(t["scale_bias"])
    elif how == "second_scale_ones":
        t["weight_scale_second"] = torch.ones_like(t["weight_scale_second"])
    return t


@pytest.mark.parametrize("how", ["swapped_nibbles", "scale_bias_zeros", "second_scale_ones"])
def test_w4a8_corruptions_show_as_error(how):
    W, x, G = rand_w(), llm_x(), 64
    t, q4, _ = build_w4a8_two_level(W, G, down=True)
    good = rel(rm.w4a8_dynamic(x, t, G), float_ref(x, W))
    bad = rel(rm.w4a8_dynamic(x, corrupt_w4a8(t, q4, how), G), float_ref(x, W))
    assert bad > 0.5 and bad > 4 * good, (how, good, bad)


# ---- dispatch and input checks ----------------------------------------------------------------

def test_linear_dispatch_shapes_and_errors():
    W = rand_w()
    x = llm_x(t=6).reshape(2, 3, K).to(torch.bfloat16)
    t = build_w8a8_dynamic(W, None, torch.bfloat16)
    y = rm.linear("W8A8_DYNAMIC", x, t)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    assert torch.equal(y.reshape(6, N), rm.w8a8_dynamic(x.reshape(6, K), t))
    y_float = rm.linear("FLOAT", x, {"weight": W})
    assert rel(y, y_float) < 0.04
    assert set(rm.KERNELS) >= {"W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC"}
    with pytest.raises(ValueError, match="no reference kernel"):
        rm.linear("W8A8S", x, t)
    with pytest.raises(ValueError, match="quant_bias"):
        rm.linear("W8A8", x, {k: v for k, v in build_w8a8_static(W, None, -1, 3, torch.bfloat16).items()
                              if k != "quant_bias"})
    t4, _ = build_w4a16(W, 32, sym=True)
    with pytest.raises(ValueError, match="group_size 64"):
        rm.linear("W4A16", x, t4, 64)
