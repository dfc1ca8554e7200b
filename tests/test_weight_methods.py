"""GPTQ, HQQ and SSZ against slow, plain references written here.

Conventions as in kernels/affine.py: W is [n, k] = [out, in]; q = clamp(round(W / s + z)), Ŵ = (q − z)·s.
"""
import pytest
import torch

from streamq.kernels.affine import (absmax_scale, dequantize_groups, minmax_affine_groups, minmax_asym_groups,
                                    quantize_groups, quantize_sym)
from streamq.quant.schemes import SCHEMES
from streamq.recipe import QuantArgs
from streamq.quant.gptq import HessianAccumulator, gptq
from streamq.quant.hqq import hqq
from streamq.quant.ssz import ssz

INT8 = (-127, 127)
INT4 = (-8, 7)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_w(n=32, k=128, seed=0):
    return torch.randn(n, k, generator=gen(seed)) * 0.05


def outlier_x(N=512, k=128, seed=1):
    """Correlated inputs (a low-rank mix plus noise) with a few outlier columns, like LLM activations."""
    g = gen(seed)
    X = torch.randn(N, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) / (k // 4) ** 0.5
    X += 0.3 * torch.randn(N, k, generator=g)
    X[:, torch.randperm(k, generator=g)[:4]] *= 20
    return X


def hessian(X):
    return 2 * X.T @ X / X.shape[0]


def scales(W, G, qmin, qmax):
    """Static (s, z) computed from the original W: asymmetric min-max for int4, symmetric absmax for int8."""
    if qmin == -127:
        s = absmax_scale(W.reshape(-1, G), qmax).reshape(W.shape[0], -1)
        return s, torch.zeros_like(s)
    return minmax_asym_groups(W, G, qmin, qmax)


def rtn(W, s, z, G, qmin, qmax):
    return quantize_groups(W, s, z, G, qmin, qmax)


# -- GPTQ ------------------------------------------------------------------------------------------

def gptq_reference(W, H, s, z, G, qmin, qmax, percdamp=0.01, act_order=False):
    """GPTQ written plainly in float64: one column at a time, every later column updated at once."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    for i in range(k):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    order = list(range(k))
    if act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    Hp = H[order][:, order]
    Hp = Hp + percdamp * torch.diagonal(Hp).mean() * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    Wp = W[:, order]
    q = torch.zeros(n, k, dtype=torch.float64)
    for j in range(k):
        col = order[j]
        sj, zj = s[:, col // G].double(), z[:, col // G].double()
        qj = torch.clamp(torch.round(Wp[:, j] / sj + zj), qmin, qmax)
        q[:, col] = qj
        err = (Wp[:, j] - (qj - zj) * sj) / U[j, j]
        Wp[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
    return q.to(torch.int8)


@pytest.mark.parametrize("bits", [INT8, INT4])
@pytest.mark.parametrize("G", [128, 32])
def test_gptq_with_identity_hessian_is_rtn(bits, G):
    qmin, qmax = bits
    W = rand_w()
    s, z = scales(W, G, qmin, qmax)
    res = gptq(W, torch.eye(W.shape[1]), s, z, G, qmin, qmax, block_size=48)
    assert torch.equal(res.q, rtn(W, s, z, G, qmin, qmax))
    assert torch.equal(res.W_hat, dequantize_groups(res.q, s, z, G))
    assert res.info == dict(damp=pytest.approx(0.01), retries=0, fallback=False, dead=0)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,G", [(INT4, 32), (INT8, 128)])
def test_gptq_matches_columnwise_reference(act_order, bits, G):
    qmin, qmax = bits
    W = rand_w(seed=2)
    H = hessian(outlier_x())
    s, z = scales(W, G, qmin, qmax)
    res = gptq(W, H, s, z, G, qmin, qmax, block_size=40, act_order=act_order)   # 40: blocks cut across groups
    ref = gptq_reference(W, H, s, z, G, qmin, qmax, act_order=act_order)
    assert (res.q == ref).float().mean() >= 0.999
    assert res.q.dtype == torch.int8 and res.q.min() >= qmin and res.q.max() <= qmax
    assert torch.equal(res.W_hat, dequantize_groups(res.q, s, z, G))
    assert not torch.equal(res.q, rtn(W, s, z, G, qmin, qmax))      # the error feedback did something


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,G", [(INT4, 32), (INT4, 128), (INT8, 128)])
def test_gptq_reduces_output_error(act_order, bits, G):
    qmin, qmax = bits
    W = rand_w(seed=3)
    X = outlier_x(seed=4)
    s, z = scales(W, G, qmin, qmax)
    res = gptq(W, hessian(X), s, z, G, qmin, qmax, act_order=act_order)
    W_rtn = dequantize_groups(rtn(W, s, z, G, qmin, qmax), s, z, G)
    err_gptq = (X @ W.T - X @ res.W_hat.T).norm()
    err_rtn = (X @ W.T - X @ W_rtn.T).norm()
    assert err_gptq < err_rtn


def test_gptq_dead_channels():
    qmin, qmax = INT4
    W = rand_w(seed=5)
    X = outlier_x(seed=6)
    dead = [3, 50, 127]
    X[:, dead] = 0
    H = hessian(X)
    s, z = scales(W, 32, qmin, qmax)
    res = gptq(W, H, s, z, 32, qmin, qmax)
    assert res.info["dead"] == 3 and not res.info["fallback"]
    assert not res.W_hat[:, dead].any()                 # a dead input's weight is zeroed, and zero is exact
    ref = gptq_reference(W, H, s, z, 32, qmin, qmax)
    assert (res.q == ref).float().mean() >= 0.999
    assert H[3, 3] == 0                                 # the caller's H is left as it was


def test_gptq_retries_damping_on_indefinite_hessian():
    qmin, qmax = INT4
    k = 64
    W = rand_w(k=k, seed=7)
    # Eigenvalues: one at −0.05, the rest in [0.5, 1.5]; mean(diag) ≈ 1 so λ = 0.01 is not enough, 0.1 is.
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen(8), dtype=torch.float64))
    ev = torch.cat([torch.tensor([-0.05], dtype=torch.float64), torch.linspace(0.5, 1.5, k - 1, dtype=torch.float64)])
    H = (Q * ev) @ Q.T
    s, z = scales(W, 32, qmin, qmax)
    res = gptq(W, H.float(), s, z, 32, qmin, qmax)
    assert res.info["retries"] == 1 and not res.info["fallback"]
    assert res.info["damp"] == pytest.approx(0.1 * torch.diagonal(H).mean().item(), rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gptq_falls_back_to_rtn_on_impossible_hessian(bad):
    qmin, qmax = INT4
    W = rand_w(seed=9)
    H = hessian(outlier_x(seed=10))
    H[5, 7] = H[7, 5] = bad
    s, z = scales(W, 32, qmin, qmax)
    res = gptq(W, H, s, z, 32, qmin, qmax)
    assert res.info["fallback"]
    assert torch.equal(res.q, rtn(W, s, z, 32, qmin, qmax))
    assert torch.equal(res.W_hat, dequantize_groups(res.q, s, z, 32))


def test_gptq_falls_back_when_damping_cannot_help():
    qmin, qmax = INT4
    W = rand_w(k=16, seed=11)
    H = -torch.eye(16)                  # mean(diag) < 0: every ×10 makes λ more negative
    H[0, 0] = 1
    s, z = scales(W, 16, qmin, qmax)
    res = gptq(W, H, s, z, 16, qmin, qmax)
    assert res.info["fallback"] and res.info["retries"] == 5
    assert torch.equal(res.q, rtn(W, s, z, 16, qmin, qmax))


def test_hessian_accumulator_streams():
    k = 48
    chunks = [torch.randn(b, 7, k, generator=gen(12 + b)) for b in (2, 3, 5)]   # [batch, seq, k]
    acc = HessianAccumulator(k)
    for x in chunks:
        acc.update(x.to(torch.bfloat16).float())
    X = torch.cat([x.to(torch.bfloat16).double().reshape(-1, k) for x in chunks])
    assert acc.N == X.shape[0] == 70
    assert torch.allclose(acc.H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)
    assert acc.H.dtype == torch.float32 and acc.H.shape == (k, k)
    assert not HessianAccumulator(k).H.any()


# -- HQQ -------------------------------------------------------------------------------------------

def heavy_tailed_w(n=64, k=256, seed=13, nu=3):
    """Student-t weights (ν = 3): a normal over the root of a χ²_ν / ν, drawn from a seeded generator."""
    g = gen(seed)
    chi2 = (torch.randn(nu, n, k, generator=g) ** 2).sum(dim=0)
    return 0.02 * torch.randn(n, k, generator=g) / (chi2 / nu).sqrt()


def group_err(W, W_hat, G):
    return ((W - W_hat) ** 2).reshape(W.shape[0], -1, G).sum(dim=2)


@pytest.mark.parametrize("optimize_scale", [False, True])
def test_hqq_asymmetric_not_worse_than_minmax(optimize_scale):
    qmin, qmax = INT4
    G = 64
    W = heavy_tailed_w()
    s0, z0 = minmax_asym_groups(W, G, qmin, qmax)
    W_mm = dequantize_groups(quantize_groups(W, s0, z0, G, qmin, qmax), s0, z0, G)
    q, s, z = hqq(W, G, qmin, qmax, optimize_scale=optimize_scale)
    W_hat = dequantize_groups(q, s, z, G)
    assert q.shape == W.shape and s.shape == z.shape == (W.shape[0], W.shape[1] // G)
    assert torch.equal(z, torch.round(z)) and z.min() >= qmin and z.max() <= qmax
    assert q.min() >= qmin and q.max() <= qmax
    assert torch.equal(q, quantize_groups(W, s, z, G, qmin, qmax))          # q is the rounding of W by (s, z)
    assert (group_err(W, W_hat, G) <= group_err(W, W_mm, G)).all()
    if optimize_scale:
        assert (W - W_hat).norm() < 0.99 * (W - W_mm).norm()


def test_minmax_real_zero_maps_the_group_range_onto_the_grid():
    qmin, qmax = INT4
    G = 64
    W = heavy_tailed_w(seed=21)
    W[0, :G] = 0.25                                   # a constant group
    W[1, :G] = 0.0                                    # an all-zero group
    s, z = minmax_affine_groups(W, G, qmin, qmax)
    Wg = W.reshape(W.shape[0], -1, G)
    lo, hi = Wg.amin(2), Wg.amax(2)
    varied = hi > lo
    # Written out: the min lands on qmin and the max on qmax (up to fp32 rounding).
    assert torch.allclose((lo / s + z)[varied], torch.full_like(lo[varied], qmin), atol=1e-4)
    assert torch.allclose((hi / s + z)[varied], torch.full_like(hi[varied], qmax), atol=1e-4)
    q = quantize_groups(W, s, z, G, qmin, qmax)
    W_hat = dequantize_groups(q, s, z, G)
    assert torch.allclose(W_hat[:2, :G], W[:2, :G])   # constant groups are exact
    assert ((W - W_hat).abs().reshape(Wg.shape) <= 0.5 * s.unsqueeze(2) * (1 + 1e-5)).all()
    # Against the integral zero point, which must stretch the range to include 0 and up to a step:
    # a little better on centred groups, much better on groups off centre.
    for Ws, factor in ((W, 1.0), (rand_w(64, 256, seed=4) + 0.3, 0.7)):   # centred; all positive
        s, z = minmax_affine_groups(Ws, G, qmin, qmax)
        W_real = dequantize_groups(quantize_groups(Ws, s, z, G, qmin, qmax), s, z, G)
        s_i, z_i = minmax_asym_groups(Ws, G, qmin, qmax)
        W_int = dequantize_groups(quantize_groups(Ws, s_i, z_i, G, qmin, qmax), s_i, z_i, G)
        assert (Ws - W_real).norm() < factor * (Ws - W_int).norm()


def test_hqq_real_zero_beats_minmax_real_zero():
    qmin, qmax = INT4
    G = 64
    W = heavy_tailed_w(seed=22)
    s0, z0 = minmax_affine_groups(W, G, qmin, qmax)
    W_mm = dequantize_groups(quantize_groups(W, s0, z0, G, qmin, qmax), s0, z0, G)
    q, s, z = hqq(W, G, qmin, qmax, optimize_scale=True, real_zero=True)
    W_hat = dequantize_groups(q, s, z, G)
    assert not torch.equal(z, torch.round(z))                          # the zero point is real-valued
    assert torch.equal(q, quantize_groups(W, s, z, G, qmin, qmax))
    assert (group_err(W, W_hat, G) <= group_err(W, W_mm, G)).all()     # the min-max start is kept if best
    assert (W - W_hat).norm() < 0.95 * (W - W_mm).norm()


@pytest.mark.parametrize("method", ["MinMax", "HQQ", "GPTQ"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_w4a16_scales_survive_the_consumers_cast(method, dt):
    """The consumer casts the fp32 weight_scale / weight_offset to the model dtype on load: the stored
    values must already be representable there, and q must be the rounding for exactly those values."""
    W, G = heavy_tailed_w(n=32, k=128, seed=23), 32
    H = hessian(outlier_x(k=128)) if method == "GPTQ" else None
    args = QuantArgs("W4A16", group_size=G, w_sym=False, w_method=method.lower())
    r = SCHEMES["W4A16"].quantize("x.up_proj", W, None, args, dt, None, H)
    s, z = r.tensors["weight_scale"], r.tensors["weight_offset"]
    assert s.dtype == z.dtype == torch.float32
    assert torch.equal(s, s.to(dt).float()) and torch.equal(z, z.to(dt).float())
    if method != "GPTQ":
        from streamq.kernels.pack import unpack_int4
        assert torch.equal(unpack_int4(r.tensors["weight"]), quantize_groups(W, s, z, G, -8, 7))


def test_hqq_symmetric_keeps_zero_point():
    qmin, qmax = INT4
    G = 64
    W = heavy_tailed_w(seed=14)
    q, s, z = hqq(W, G, qmin, qmax, symmetric=True)
    assert not z.any()
    s_mm = W.reshape(W.shape[0], -1, G).abs().amax(dim=2) / qmax
    W_mm = dequantize_groups(quantize_groups(W, s_mm, torch.zeros_like(s_mm), G, qmin, qmax), s_mm, z, G)
    W_hat = dequantize_groups(q, s, z, G)
    assert (group_err(W, W_hat, G) <= group_err(W, W_mm, G)).all()
    assert (W - W_hat).norm() < 0.95 * (W - W_mm).norm()
    assert q.min() >= qmin and q.max() <= qmax


# -- SSZ -------------------------------------------------------------------------------------------

def ssz_reference(W, qmin, qmax):
    """Brute force per row: the best scale on a fine grid of fractions of max|W| / qmax."""
    best = torch.full((W.shape[0], 1), float("inf"))
    for f in torch.linspace(0.5, 1.0, 501):
        s = absmax_scale(W, qmax) * f
        q = torch.clamp(torch.round(W / s), qmin, qmax)
        best = torch.minimum(best, ((W - s * q) ** 2).sum(dim=1, keepdim=True))
    return best


def test_ssz_not_worse_than_minmax_per_row():
    qmin, qmax = INT4
    W = heavy_tailed_w(n=48, k=192, seed=15)
    W[7] = 0                                                 # an all-zero row stays exact
    q, s = ssz(W, qmin, qmax)
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    assert s.shape == (W.shape[0], 1) and (s > 0).all()
    assert torch.equal(q, quantize_sym(W, s, qmin, qmax))
    s_mm = absmax_scale(W, qmax)
    e_mm = ((W - s_mm * quantize_sym(W, s_mm, qmin, qmax).float()) ** 2).sum(dim=1, keepdim=True)
    e = ((W - s * q.float()) ** 2).sum(dim=1, keepdim=True)
    assert (e <= e_mm).all() and e.sum() < 0.9 * e_mm.sum()
    assert not e[7].item()
    # A fine brute-force scale search does at most a little better on any row.
    assert (e <= 1.02 * ssz_reference(W, qmin, qmax) + 1e-12).all()


def test_w4a16_hqq_keeps_the_min_max_scale_and_refines_the_zero():
    """HQQ as the W4A16 method: the grid's step stays min-max's (refitting it clipped the weights that
    massive-activation inputs read), only the real-valued zero point moves, and no group gets worse."""
    W, G = heavy_tailed_w(n=32, k=128, seed=24), 32
    args = QuantArgs("W4A16", group_size=G, w_sym=False, w_method="hqq")
    r = SCHEMES["W4A16"].quantize("x.up_proj", W, None, args, torch.float32, None, None)
    s, z = r.tensors["weight_scale"], r.tensors["weight_offset"]
    s_mm, z_mm = minmax_affine_groups(W, G, -8, 7)
    assert torch.equal(s, s_mm) and not torch.equal(z, z_mm)
    from streamq.kernels.pack import unpack_int4
    W_hat = dequantize_groups(unpack_int4(r.tensors["weight"]), s, z, G)
    W_mm = dequantize_groups(quantize_groups(W, s_mm, z_mm, G, -8, 7), s_mm, z_mm, G)
    assert (group_err(W, W_hat, G) <= group_err(W, W_mm, G)).all()
    assert (W - W_hat).norm() < (W - W_mm).norm()
