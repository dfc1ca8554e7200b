"""Each scheme's tensors against FORMAT.md §3, recomputed independently here."""
import struct

import pytest
import torch

from streamq.errors import StreamqError
from streamq.kernels.pack import pack_int4, unpack_int4
from streamq.quant.schemes import SCHEMES, ActRange
from streamq.recipe import QuantArgs


def rand_w(n=16, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def test_pack_matches_format_definition():
    q = torch.randint(-8, 8, (6, 5), generator=torch.Generator().manual_seed(1))
    p = pack_int4(q)
    for j in range(3):
        for k in range(5):
            byte = ((int(q[2 * j + 1, k]) << 4) | (int(q[2 * j, k]) & 0x0F)) & 0xFF
            assert int(p[j, k]) & 0xFF == byte
    assert torch.equal(unpack_int4(p), q.to(torch.int8))


def test_w8a8_dynamic_formula():
    W = rand_w()
    q = SCHEMES["W8A8_DYNAMIC"].quantize("x.up_proj", W, None, QuantArgs("W8A8_DYNAMIC"), torch.bfloat16, None)
    s = (W.abs().amax(1, keepdim=True) / 127).to(torch.bfloat16)
    assert torch.equal(q.tensors["weight_scale"], s)
    expect = torch.clamp(torch.round(W / s.float()), -127, 127).to(torch.int8)
    assert torch.equal(q.tensors["weight"], expect)
    assert not q.tensors["weight_offset"].any()
    assert (W - q.W_hat).abs().max() <= s.float().max() * 0.51


@pytest.mark.parametrize("sym", [True, False])
def test_w4a16_group_formula(sym):
    W, G = rand_w(), 16
    q = SCHEMES["W4A16"].quantize("x.q_proj", W, None, QuantArgs("W4A16", group_size=G, w_sym=sym), torch.bfloat16, None)
    s, z = q.tensors["weight_scale"], q.tensors["weight_offset"]
    assert s.shape == (16, 4) and s.dtype == torch.float32 and z.dtype == torch.float32
    ints = unpack_int4(q.tensors["weight"]).float()
    assert ints.min() >= -8 and ints.max() <= 7
    W_hat = (ints.reshape(16, 4, G) - z[..., None]) * s[..., None]
    assert torch.allclose(W_hat.reshape(16, 64), q.W_hat)
    # every group's error is at most half a step
    assert ((W.reshape(16, 4, G) - W_hat).abs() <= s[..., None] * 0.5 + 1e-7).all()


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_w8a8_static_formula(dt):
    W, b = rand_w(), torch.randn(16) * 0.1
    lo, hi = -1.5, 3.0
    q = SCHEMES["W8A8"].quantize("x.o_proj", W, b, QuantArgs("W8A8"), dt, ActRange(lo, hi))
    t = q.tensors
    s_x = torch.tensor([(hi - lo) / 255]).to(dt).float()
    o_x = (torch.round(-lo / s_x) - 128).to(dt).float()
    assert t["input_scale"].shape == (1,) and t["input_scale"].float().item() == s_x.item()
    assert t["input_offset"].float().item() == o_x.item()
    s_w = t["weight_scale"].float()[:, 0]
    deq = s_x * s_w
    if dt == torch.float16:
        assert t["deq_scale"].dtype == torch.int64
        got = torch.tensor([struct.unpack("<f", struct.pack("<I", int(v) & 0xFFFFFFFF))[0] for v in t["deq_scale"]])
    else:
        assert t["deq_scale"].dtype == torch.float32
        got = t["deq_scale"]
    assert torch.equal(got, deq)
    expect_qb = torch.round(b / deq - o_x * t["weight"].float().sum(1)).to(torch.int32)
    assert torch.equal(t["quant_bias"], expect_qb)
    # run-time math reproduces x·Ŵᵀ + b up to activation rounding
    x = torch.rand(5, 64) * (hi - lo) + lo
    x_q = torch.clamp(torch.round(x / s_x + o_x), -128, 127)
    y = (x_q @ t["weight"].float().T + t["quant_bias"].float()) * deq
    ref = x @ W.T + b
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_w4a8_two_level_formula():
    W, G = rand_w(16, 512), 256
    q = SCHEMES["W4A8_DYNAMIC"].quantize("e.down_proj", W, None, QuantArgs("W4A8_DYNAMIC", group_size=G), torch.bfloat16, None)
    t = q.tensors
    s1 = W.abs().amax(1, keepdim=True) / 119
    w8 = torch.clamp(torch.round(W / s1), -119, 119)
    s2 = torch.clamp(torch.round(w8.reshape(16, 2, G).abs().amax(2) / 7), min=1)
    q4 = torch.clamp(torch.round(w8.reshape(16, 2, G) / s2[..., None]), -7, 7).reshape(16, 512)
    assert torch.equal(t["weight_scale"], s1) and torch.equal(t["weight_scale_second"], s2)
    assert torch.equal(unpack_int4(t["weight"]).float(), q4)
    assert t["weight_offset_second"].dtype == torch.int64 and not t["weight_offset_second"].any()
    W_hat = (q4.reshape(16, 2, G) * s2.to(torch.bfloat16).float()[..., None]).reshape(16, 512) * s1.to(torch.bfloat16).float()
    assert t["scale_bias"].shape == (16, 16)
    assert torch.allclose(t["scale_bias"], 8 * W_hat.reshape(16, 16, 32).sum(2))


def test_w4a16_rejects_group_that_does_not_divide():
    with pytest.raises(StreamqError, match="divide"):
        SCHEMES["W4A16"].check("model.layers.0.mlp.down_proj", 16, 100, QuantArgs("W4A16", group_size=64))
