"""The tensors of each scheme, exactly as FORMAT.md §3 writes them.

Conventions: W is [n, k] (out, in) in fp32; groups of G run along k; dequant is (q − z)·s;
"dt" is the model dtype (bf16/fp16) that the consumer loads scales in. Each scheme computes
with the scales rounded to the dtype it stores them in, because that is what the consumer sees.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import StreamqError
from ..kernels.affine import absmax_scale, dequantize_groups, quantize_sym
from ..kernels.pack import pack_int4
from ..recipe import QuantArgs
from .methods import choose
from .sparse import sparse_scale

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (suffix, dtype, shape)


@dataclass(frozen=True)
class ActRange:
    """Per-tensor activation range of one linear's input, from calibration."""
    lo: float
    hi: float


@dataclass
class Quantized:
    tensors: dict[str, torch.Tensor]     # suffix → tensor, in spec order
    W_hat: torch.Tensor                  # fp32 [n, k]: the weight the consumer effectively uses
    act: str                             # "none" | "per_token" | "per_tensor"
    s_x: float = 0.0                     # per-tensor activation scale/offset (static schemes)
    o_x: float = 0.0
    info: dict = field(default_factory=dict)  # weight-method notes (GPTQ damping, fallbacks)


def _rounded(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return x.to(dt).float()


def _deq_scale_tensor(deq: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    # fp16 consumers read deq_scale as int64 holding the fp32 bit pattern (FORMAT.md §3).
    if dt == torch.float16:
        return deq.float().view(torch.int32).to(torch.int64)
    return deq.float()


def _per_channel_int8(name, W: torch.Tensor, dt: torch.dtype, args: QuantArgs, H) -> tuple:
    """Symmetric int8 per channel, with the scale rounded to the model dtype before rounding q."""
    q, s_w, _, info = choose(W, W.shape[1], -127, 127, True, args, H, lambda s: _rounded(s, dt), name)
    return q, s_w, info


def _scale_bias(W_hat: torch.Tensor, name: str) -> torch.Tensor:
    """8·ΣŴ per row, or per 16 chunks of k for down/o projections."""
    n, k = W_hat.shape
    if name.endswith(("down_proj", "o_proj")):
        return 8 * W_hat.reshape(n, 16, k // 16).sum(dim=2)
    return 8 * W_hat.sum(dim=1, keepdim=True)


class Scheme:
    name = "FLOAT"
    act = "none"

    def check(self, name: str, n: int, k: int, args: QuantArgs) -> None:
        """Raise a StreamqError if this linear's shape cannot take the scheme."""

    def specs(self, name: str, n: int, k: int, args: QuantArgs, dt: torch.dtype) -> list[Spec]:
        raise NotImplementedError

    def quantize(self, name: str, W: torch.Tensor, b, args: QuantArgs, dt: torch.dtype,
                 act_range: ActRange | None, H: torch.Tensor | None = None) -> Quantized:
        raise NotImplementedError


def _require(cond: bool, name: str, scheme: str, what: str, fix: str) -> None:
    if not cond:
        raise StreamqError(f"{name}: {scheme} needs {what}", fix)


def _group(args: QuantArgs, k: int) -> int:
    return args.group_size or k


def _per_channel_only(scheme: Scheme, name: str, args: QuantArgs) -> None:
    _require(args.group_size == 0, name, scheme.name, "group_size = 0 (its weights are per-channel)",
             "set group_size = 0 in the rule for this scheme (W4A16 and W4A8_DYNAMIC take groups)")


class W8A8Dynamic(Scheme):
    name, act = "W8A8_DYNAMIC", "per_token"

    def check(self, name, n, k, args):
        _per_channel_only(self, name, args)

    def specs(self, name, n, k, args, dt):
        return [("weight", torch.int8, (n, k)), ("weight_scale", dt, (n, 1)), ("weight_offset", dt, (n, 1))]

    def quantize(self, name, W, b, args, dt, act_range, H=None):
        q, s_w, info = _per_channel_int8(name, W, dt, args, H)
        tensors = {"weight": q, "weight_scale": s_w.to(dt), "weight_offset": torch.zeros_like(s_w).to(dt)}
        return Quantized(tensors, q.float().mul_(s_w), self.act, info=info)


class W8A16(W8A8Dynamic):
    name, act = "W8A16", "none"


class W4A16(Scheme):
    name, act = "W4A16", "none"

    def check(self, name, n, k, args):
        G = _group(args, k)
        _require(k % G == 0, name, self.name, f"group_size {G} to divide the input dimension {k}",
                 f"choose a group_size that divides {k} (e.g. 32, 64 or 128), or 0 for per-channel")
        _require(n % 2 == 0, name, self.name, f"an even output dimension (has {n}) to pack int4 pairs",
                 "keep this linear FLOAT with a rule")

    def specs(self, name, n, k, args, dt):
        g = k // _group(args, k)
        return [("weight", torch.int8, (n // 2, k)), ("weight_scale", torch.float32, (n, g)),
                ("weight_offset", torch.float32, (n, g))]

    def quantize(self, name, W, b, args, dt, act_range, H=None):
        G = _group(args, k=W.shape[1])
        # The consumer holds weight_scale / weight_offset in the model dtype.
        q, s, z, info = choose(W, G, -8, 7, args.w_sym, args, H, held_as=dt, name=name)
        tensors = {"weight": pack_int4(q), "weight_scale": s, "weight_offset": z}
        return Quantized(tensors, dequantize_groups(q, s, z, G), self.act, info=info)


class W8A8Static(Scheme):
    name, act = "W8A8", "per_tensor"

    def check(self, name, n, k, args):
        _per_channel_only(self, name, args)

    def specs(self, name, n, k, args, dt):
        deq_dt = torch.int64 if dt == torch.float16 else torch.float32
        return [("weight", torch.int8, (n, k)), ("weight_scale", dt, (n, 1)), ("weight_offset", dt, (n, 1)),
                ("input_scale", dt, (1,)), ("input_offset", dt, (1,)), ("deq_scale", deq_dt, (n,)),
                ("quant_bias", torch.int32, (n,))]

    def quantize(self, name, W, b, args, dt, act_range, H=None):
        if act_range is None:
            raise StreamqError(f"{name}: {self.name} needs calibration statistics of its input",
                               "this is a bug: the layer's observer did not run")
        q, s_w, info = self.weights(name, W, dt, args, H)
        lo, hi = min(act_range.lo, 0.0), max(act_range.hi, 0.0)
        s_x = _rounded(torch.tensor([max(hi - lo, 1e-8) / 255]), dt)
        o_x = _rounded(torch.round(-lo / s_x) - 128, dt)
        deq = s_x * s_w[:, 0]
        bias = torch.zeros(W.shape[0]) if b is None else b.float()
        quant_bias = torch.round(bias / deq - o_x * q.float().sum(dim=1)).to(torch.int32)
        tensors = {"weight": q, "weight_scale": s_w.to(dt), "weight_offset": torch.zeros_like(s_w).to(dt),
                   "input_scale": s_x.to(dt), "input_offset": o_x.to(dt),
                   "deq_scale": _deq_scale_tensor(deq, dt), "quant_bias": quant_bias}
        return Quantized(tensors, q.float().mul_(s_w), self.act, float(s_x), float(o_x), info)

    def weights(self, name, W, dt, args, H):
        return _per_channel_int8(name, W, dt, args, H)


class W8A8Sparse(W8A8Static):
    """W8A8S: W8A8's tensors and activation path; the weights fitted with outlier protection
    (quant/sparse.py). GPTQ may choose q on that grid; HQQ and ssz would refit the scale."""
    name = "W8A8S"

    def check(self, name, n, k, args):
        super().check(name, n, k, args)
        _require(args.w_method in ("minmax", "gptq"), name, self.name, "w_method MinMax or GPTQ (its scale is "
                 f"fitted on the inliers, which {args.w_method} would replace)", "set w_method in the rule")

    def weights(self, name, W, dt, args, H):
        s, share = sparse_scale(W, args.outliers)
        s = _rounded(s, dt)
        q, s, _, info = choose(W, W.shape[1], -127, 127, True, args, H, lambda _: s, name)
        return q, s, {**info, "outlier_share": share}


class W8A8Mix(W8A8Static):
    """PDMIX: the static set serves decode, weight_scale with per-token activations serves prefill."""
    name, act = "W8A8_MIX", "per_token"


class W4A8TwoLevel(Scheme):
    """int8 per channel (±119), then int4 per group with an integer scale (FORMAT.md §3)."""
    name, act = "W4A8_DYNAMIC", "per_token"

    def check(self, name, n, k, args):
        G = args.group_size
        if G:
            _require(k % G == 0, name, self.name, f"group_size {G} to divide the input dimension {k}",
                     f"choose a group_size that divides {k} (256 for DeepSeek experts)")
        _require(n % 8 == 0, name, self.name, f"an output dimension divisible by 8 (has {n})",
                 "keep this linear FLOAT or W8A8_DYNAMIC with a rule")
        if name.endswith(("down_proj", "o_proj")):
            _require(k % 16 == 0, name, self.name, f"an input dimension divisible by 16 (has {k})",
                     "keep this linear W8A8_DYNAMIC with a rule")

    def specs(self, name, n, k, args, dt):
        sb = (n, 16) if name.endswith(("down_proj", "o_proj")) else (n, 1)
        out = [("weight", torch.int8, (n // 2, k)), ("weight_scale", torch.float32, (n, 1)),
               ("weight_offset", torch.float32, (n, 1))]
        if args.group_size:
            g = k // args.group_size
            out += [("weight_scale_second", torch.float32, (n, g)), ("weight_offset_second", torch.int64, (n, g))]
        return out + [("scale_bias", torch.float32, sb)]

    def quantize(self, name, W, b, args, dt, act_range, H=None):
        n, k = W.shape
        if args.group_size:
            tensors, W_hat, info = self._two_level(name, W, args, H)
        else:
            q4, s, _, info = choose(W, k, -8, 7, True, args, H, name=name)
            W_hat = q4.float() * _rounded(s, torch.bfloat16)
            tensors = {"weight": pack_int4(q4), "weight_scale": s, "weight_offset": torch.zeros_like(s)}
        tensors["scale_bias"] = _scale_bias(W_hat, name)
        return Quantized(tensors, W_hat, self.act, info=info)

    def _two_level(self, name, W, args, H):
        """Stage 1: int8 per channel (±119) by round-to-nearest; stage 2: int4 per group with an
        integer scale, chosen by the weight method on the int8 grid (H is unchanged by the
        per-row scale s1, so GPTQ's Hessian applies as is)."""
        n, k = W.shape
        G = args.group_size
        s1 = absmax_scale(W, 119)
        w8 = quantize_sym(W, s1, -119, 119).float()
        s2 = torch.clamp(torch.round(w8.reshape(n, k // G, G).abs().amax(dim=2) / 7), min=1)
        stage2 = dataclasses.replace(args, w_method="gptq" if args.w_method == "gptq" else "minmax")
        q4, _, _, info = choose(w8, G, -7, 7, True, stage2, H, lambda _: s2, name)
        W_hat = (q4.float().reshape(n, k // G, G) * _rounded(s2, torch.bfloat16).unsqueeze(2)).reshape(n, k) \
            * _rounded(s1, torch.bfloat16)
        tensors = {"weight": pack_int4(q4), "weight_scale": s1, "weight_offset": torch.zeros_like(s1),
                   "weight_scale_second": s2, "weight_offset_second": torch.zeros_like(s2, dtype=torch.int64)}
        return tensors, W_hat, info


SCHEMES: dict[str, Scheme] = {s.name: s for s in (W8A8Dynamic(), W8A16(), W4A16(), W8A8Static(), W8A8Mix(),
                                                   W8A8Sparse(), W4A8TwoLevel())}


def specs_for(name: str, n: int, k: int, args: QuantArgs, dt: torch.dtype) -> list[Spec]:
    return SCHEMES[args.scheme].specs(name, n, k, args, dt)


def implemented(scheme: str) -> bool:
    return scheme == "FLOAT" or scheme in SCHEMES
