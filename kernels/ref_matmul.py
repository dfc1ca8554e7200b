"""Exact reference kernels: y = linear(x) computed from the stored ascendV1 tensors of one linear.

Each kernel takes the tensors of one linear exactly as the checkpoint holds them (a dict
suffix → tensor: "weight", "weight_scale", "deq_scale", ...) and runs the consumer's run-time
math of FORMAT.md §3. Nothing is repaired on the way: a wrong scale, a swapped nibble, a zeroed
`quant_bias` or a `deq_scale` in the wrong dtype shows up as output error. A tensor the math needs
and the dict lacks raises ValueError (the consumer would read uninitialised memory instead).

Numerics:
- Integer products are accumulated exactly. They run as float64 matmuls of integer-valued
  tensors: every partial sum is an integer of magnitude < 2^53, which float64 represents exactly
  whatever the summation order, so the result equals int64 accumulation — and it runs on BLAS
  and on GPUs, where int64 matmul is slow or missing. `_int_matmul` checks the 2^53 bound.
- Scales enter with the precision the consumer holds them in (noted per kernel); all arithmetic
  after the integer sums is float64, and the result is returned as float32 [..., n].
- Activations are rounded with torch.round (half to even). The device computes its activation
  quantization in fp32; the two can differ only for values within an fp32 ulp of a rounding
  boundary, which does not happen on real data.
- x is used as given (no rounding to the model dtype): the caller decides the input precision.
"""
from __future__ import annotations

import torch

from .pack import unpack_int4

F64 = torch.float64
_EXACT_LIMIT = 2.0 ** 53


# ----------------------------------------------------------------------------------------------
# helpers

def _need(t: dict, scheme: str, *names: str) -> None:
    missing = [s for s in names if s not in t]
    if missing:
        raise ValueError(f"{scheme}: the stored tensors lack {', '.join(missing)} (have {sorted(t)})")


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """[..., k] → float64 [T, k] and the leading shape."""
    return x.reshape(-1, x.shape[-1]).to(F64), tuple(x.shape[:-1])


def _out(y: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    return y.to(torch.float32).reshape(*lead, y.shape[-1])


def _on(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device)


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [T, k] · b [n, k]ᵀ for integer-valued float64 operands, exactly.

    Exact because every partial sum is an integer bounded by k · max|a| · max|b| < 2^53.
    """
    k = a.shape[-1]
    if a.numel() and b.numel():
        bound = k * float(a.abs().max()) * float(b.abs().max())
        if bound >= _EXACT_LIMIT:
            raise ValueError(f"integer matmul of width {k} could exceed 2^53 (bound {bound:.3g}); not exact in float64")
    return a @ b.T


def _unpack(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Packed int4 [n/2, k] (FORMAT §4) → float64 [n, k] on x's device."""
    return unpack_int4(weight.cpu()).to(x.device, F64)


def _per_token_int8(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's dynamic activation quantization: per-token symmetric int8.

    s_t = max|x_t| / 127 is held in fp32 (the device's per-token scale dtype); x_q = round(x / s_t).
    A token of zeros gets x_q = 0 (its scale is replaced by 1 only for the division).
    """
    s_t = (X.to(torch.float32).abs().amax(dim=-1, keepdim=True) / 127).to(F64)
    safe = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
    x_q = torch.clamp(torch.round(X / safe), -127, 127)
    return x_q, s_t


def _bias(t: dict, x: torch.Tensor) -> torch.Tensor | float:
    b = t.get("bias")
    return 0.0 if b is None else _on(b, x).to(F64).reshape(-1)


def decode_deq_scale(deq: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """deq_scale as the consumer reads it → float64 [n].

    The consumer's parameter is int64 for fp16 models (the low 32 bits are the fp32 bit pattern)
    and fp32 otherwise, and the checkpoint tensor is copied into it with a plain dtype cast. So a
    tensor in the other model dtype's form is not decoded but cast, as the consumer does: fp32
    values copied into int64 truncate to 0 (every real deq_scale is < 1), and int64 bit patterns
    copied into fp32 become huge integers. Both give the garbage the consumer would compute.
    """
    if model_dtype == torch.float16:
        bits = torch.trunc(deq.to(F64)).to(torch.int64) if deq.is_floating_point() else deq.to(torch.int64)
        bits = bits & 0xFFFFFFFF                                   # the low 32 bits carry the pattern
        bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)  # as a signed int32, for the view
        return bits.to(torch.int32).view(torch.float32).to(F64).reshape(-1)
    return deq.to(torch.float32).to(F64).reshape(-1)


# ----------------------------------------------------------------------------------------------
# kernels

def w8a8_static(x: torch.Tensor, t: dict, scheme: str = "W8A8") -> torch.Tensor:
    """Per-tensor static int8 activations, per-channel int8 weights.

    x_q = clamp(round(x · r + o_x), −128, 127) with r = 1 / input_scale computed *in the stored
    dtype* (the consumer precomputes the reciprocal in the model dtype and multiplies by it; that
    rounding of r is part of what it computes) and o_x = input_offset (held by the consumer as an
    int8 parameter, so a non-integral value truncates toward zero).
    y = (x_q · qᵀ + quant_bias) · deq_scale.

    `bias`, if present, is NOT added: quant_bias already folds the float bias (FORMAT §3), and the
    consumer passes only quant_bias to its int8 matmul on this path.
    weight_scale is not used here: deq_scale carries s_x · s_w.
    """
    _need(t, scheme, "weight", "input_scale", "input_offset", "deq_scale", "quant_bias")
    X, lead = _rows(x)
    s_x = _on(t["input_scale"], x).reshape(-1)
    recip = torch.reciprocal(s_x).to(F64)                  # rounded to the stored (model) dtype first
    o_x = torch.trunc(_on(t["input_offset"], x).to(F64).reshape(-1))
    x_q = torch.clamp(torch.round(X * recip + o_x), -128, 127)
    q = _on(t["weight"], x).to(F64)
    deq = _on(decode_deq_scale(t["deq_scale"], t["input_scale"].dtype), x)
    qb = _on(t["quant_bias"], x).to(F64).reshape(-1)
    acc = _int_matmul(x_q, q)                              # exact int32-range sums
    return _out((acc + qb) * deq, lead)


def w8a8_dynamic(x: torch.Tensor, t: dict, scheme: str = "W8A8_DYNAMIC") -> torch.Tensor:
    """Per-token symmetric int8 activations, per-channel int8 weights.

    y = (x_q · qᵀ) · s_w · s_t + bias, with s_w = weight_scale as stored (model dtype) and s_t in
    fp32. Weight offsets are ignored (weights are symmetric; the consumer ignores them).
    """
    _need(t, scheme, "weight", "weight_scale")
    X, lead = _rows(x)
    x_q, s_t = _per_token_int8(X)
    q = _on(t["weight"], x).to(F64)
    s_w = _on(t["weight_scale"], x).to(F64).reshape(-1)
    acc = _int_matmul(x_q, q)
    return _out(acc * s_w * s_t + _bias(t, x), lead)


def w8a8_mix(x: torch.Tensor, t: dict, phase: str = "prefill") -> torch.Tensor:
    """PDMIX: "prefill" runs the per-token dynamic path (weight_scale, + bias), "decode" the static
    per-tensor path (deq_scale, quant_bias; bias not added again). The full union of tensors is
    required in both phases, since a serving consumer runs both on the same checkpoint."""
    _need(t, "W8A8_MIX", "weight", "weight_scale", "input_scale", "input_offset", "deq_scale", "quant_bias")
    if phase == "prefill":
        return w8a8_dynamic(x, t, "W8A8_MIX")
    if phase == "decode":
        return w8a8_static(x, t, "W8A8_MIX")
    raise ValueError(f"W8A8_MIX: phase must be 'prefill' or 'decode', not {phase!r}")


def _groups(scale: torch.Tensor, k: int, group_size: int, scheme: str) -> int:
    """Group width along k from the stored scale's shape [n, k/G]; checked against group_size."""
    J = scale.shape[-1] if scale.dim() == 2 else 1
    if J < 1 or k % J:
        raise ValueError(f"{scheme}: scale shape {tuple(scale.shape)} does not divide the input dimension {k}")
    G = k // J
    if group_size and group_size != G:
        raise ValueError(f"{scheme}: group_size {group_size} disagrees with the stored scale shape "
                         f"{tuple(scale.shape)} (groups of {G})")
    return G


def _weight_only(x: torch.Tensor, t: dict, q: torch.Tensor, group_size: int, scheme: str) -> torch.Tensor:
    """Ŵ = (q − offset) · scale per group of G along k, then y = x · Ŵᵀ + bias in float64."""
    X, lead = _rows(x)
    n, k = q.shape
    s = _on(t["weight_scale"], x).to(F64)
    z = _on(t["weight_offset"], x).to(F64)
    G = _groups(s, k, group_size, scheme)
    s, z = s.reshape(n, k // G, 1), z.reshape(n, k // G, 1)
    W_hat = ((q.reshape(n, k // G, G) - z) * s).reshape(n, k)
    return _out(X @ W_hat.T + _bias(t, x), lead)


def w8a16(x: torch.Tensor, t: dict) -> torch.Tensor:
    """int8 per-channel weight, float activations: Ŵ = (q − offset) · scale (offsets are zeros)."""
    _need(t, "W8A16", "weight", "weight_scale", "weight_offset")
    return _weight_only(x, t, _on(t["weight"], x).to(F64), 0, "W8A16")


def w4a16(x: torch.Tensor, t: dict, group_size: int = 0) -> torch.Tensor:
    """int4 per-group weight packed along n (FORMAT §4), float activations:
    Ŵ[n, k] = (q[n, k] − offset[n, k/G]) · scale[n, k/G]; offsets may be nonzero here."""
    _need(t, "W4A16", "weight", "weight_scale", "weight_offset")
    return _weight_only(x, t, _unpack(t["weight"], x), group_size, "W4A16")


def w4a8_dynamic(x: torch.Tensor, t: dict, group_size: int = 0) -> torch.Tensor:
    """int4 weights, per-token int8 activations.

    Two-level (weight_scale_second present): Ŵ = q4 · s2 · s1 with s1 = weight_scale and
    s2 = weight_scale_second both rounded to bf16; per-channel (no *_second): Ŵ = q4 · s with s the
    stored fp32 weight_scale (the consumer hands its fp32 bit pattern to the kernel).

    scale_bias takes part as in the consumer, which passes it as the bias of its int8 × int4
    matmul: the device works on x_q − 8 (the low int4 half of the int8 activation, made signed)
    and adds scale_bias = 8 · ΣŴ back, summed over its chunks ([n, 16] for down/o). So
        y = s_t · (Σ_k (x_q − 8)[k] · Ŵ[n, k] + Σ_c scale_bias[n, c]),
    which equals s_t · x_q · Ŵᵀ when scale_bias is right and carries its error when it is not.
    The integer part is summed exactly per group of G (Σ_{k∈g} (x_q − 8) · q4), then scaled.
    """
    _need(t, "W4A8_DYNAMIC", "weight", "weight_scale", "scale_bias")
    X, lead = _rows(x)
    x_q, s_t = _per_token_int8(X)
    xs = x_q - 8
    q4 = _unpack(t["weight"], x)
    n, k = q4.shape
    if "weight_scale_second" in t:
        s1 = _on(t["weight_scale"], x).to(torch.bfloat16).to(F64).reshape(n)
        s2 = _on(t["weight_scale_second"], x).to(torch.bfloat16).to(F64).reshape(n, -1)
        G = _groups(s2, k, group_size, "W4A8_DYNAMIC")
        acc = torch.zeros(X.shape[0], n, dtype=F64, device=x.device)
        for j in range(k // G):
            g = slice(j * G, (j + 1) * G)
            # exact group sum (|.| < 2^31) times a bf16 s2 (8 significant bits): exact in float64,
            # and the sum over groups stays exact while s2 is integer-valued, as FORMAT requires.
            acc += _int_matmul(xs[:, g], q4[:, g]) * s2[:, j]
        y = acc * s1
    else:
        if group_size:
            raise ValueError(f"W4A8_DYNAMIC: group_size {group_size} but no weight_scale_second is stored "
                             "(per-channel W4A8 has group_size 0)")
        s = _on(t["weight_scale"], x).to(torch.float32).to(F64).reshape(n)
        y = _int_matmul(xs, q4) * s
    sb = _on(t["scale_bias"], x).to(F64).reshape(n, -1).sum(dim=1)
    return _out((y + sb) * s_t, lead)


def float_linear(x: torch.Tensor, t: dict) -> torch.Tensor:
    """An unquantized linear, for completeness: y = x · Wᵀ + bias in float64."""
    _need(t, "FLOAT", "weight")
    X, lead = _rows(x)
    return _out(X @ _on(t["weight"], x).to(F64).T + _bias(t, x), lead)


KERNELS = {
    "FLOAT": float_linear,
    "W8A8": w8a8_static,
    "W8A8_DYNAMIC": w8a8_dynamic,
    "W8A8_MIX": w8a8_mix,
    "W8A16": w8a16,
    "W4A16": w4a16,
    "W4A8_DYNAMIC": w4a8_dynamic,
}

_GROUPED = ("W4A16", "W4A8_DYNAMIC")


def linear(scheme: str, x: torch.Tensor, t: dict, group_size: int = 0, phase: str = "prefill") -> torch.Tensor:
    """Dispatch on the description's type string. group_size is the description's `group_size`
    (used by W4A16 / W4A8_DYNAMIC, ignored by the rest); phase selects the W8A8_MIX path."""
    if scheme not in KERNELS:
        raise ValueError(f"no reference kernel for scheme {scheme!r} (have {', '.join(KERNELS)})")
    if scheme in _GROUPED:
        return KERNELS[scheme](x, t, group_size)
    if scheme == "W8A8_MIX":
        return w8a8_mix(x, t, phase)
    return KERNELS[scheme](x, t)
