"""One step's compute, with no I/O: observe a layer's inputs, quantize its linears, propagate.

Kept apart from the pipeline so that it is a pure function of (layer, hidden states, plan):
the pipeline orders the side effects around it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .kernels.affine import fake_quant_per_token
from .quant.schemes import SCHEMES, ActRange, Quantized
from .observers import MinMax, RangeObserver
from .quant.gptq import HessianAccumulator
from .recipe import QuantArgs


class InputObserver:
    """Statistics of one linear input over all calibration batches, in constant memory: its
    per-tensor range (by the recipe's act_method), and GPTQ's Hessian H = 2XᵀX/N when a linear
    reading it needs one."""

    def __init__(self, hessian: bool, ranges: RangeObserver):
        self.ranges = ranges
        self.wants_hessian = hessian
        self.hessian: HessianAccumulator | None = None

    def update(self, x: torch.Tensor) -> None:
        self.ranges.update(x)
        if self.wants_hessian:
            if self.hessian is None:  # the input width is known at the first batch
                self.hessian = HessianAccumulator(x.shape[-1], x.device)
            self.hessian.update(x)

    def range(self) -> ActRange:
        return self.ranges.range()

    def H(self) -> torch.Tensor | None:
        return None if self.hessian is None or self.hessian.N == 0 else self.hessian.H.cpu()


@contextmanager
def observe_inputs(layer: nn.Module, prefix: str, groups: dict[str, str], linears: list[str],
                   hessian: set[str] = frozenset(), make_range=MinMax, static: set[str] = frozenset()):
    """One observer per distinct input: linears that share an input (q/k/v) share an observer,
    and one Hessian serves all of them."""
    observers: dict[str, InputObserver] = {}
    handles = []
    for name in linears:
        key = groups.get(name, name)
        if key in observers:
            continue
        readers = [n for n in linears if groups.get(n, n) == key]
        # Only static inputs use the range, so only they pay for a histogram.
        ranges = make_range() if any(n in static for n in readers) else MinMax()
        obs = observers[key] = InputObserver(any(n in hessian for n in readers), ranges)
        sub = layer.get_submodule(name[len(prefix) + 1:] if prefix else name)
        handles.append(sub.register_forward_pre_hook(lambda m, args, obs=obs: obs.update(args[0])))
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


STATIC = ("W8A8", "W8A8_MIX")  # the schemes that store a per-tensor activation range


def static_inputs(args: dict[str, QuantArgs]) -> set[str]:
    return {n for n, a in args.items() if a.scheme in STATIC}


def needs_hessian(args: dict[str, QuantArgs]) -> set[str]:
    return {n for n, a in args.items() if a.scheme != "FLOAT" and a.w_method == "gptq"}


def static_fake_quant(x: torch.Tensor, s_x: float, o_x: float) -> torch.Tensor:
    return (torch.clamp(torch.round(x / s_x + o_x), -128, 127) - o_x) * s_x


def install(layer: nn.Module, sub: str, q: Quantized) -> None:
    """Make the float module compute what the consumer computes: Ŵ and the activation round trip."""
    lin = layer.get_submodule(sub)
    # Ŵ was computed on the host; the module may live on an accelerator.
    lin.weight.data = q.W_hat.to(device=lin.weight.device, dtype=lin.weight.dtype)
    q.W_hat = None  # the module holds Ŵ now; a second fp32 copy would double the host memory
    act = {"per_token": lambda x: fake_quant_per_token(x),
           "per_tensor": lambda x: static_fake_quant(x, q.s_x, q.o_x)}.get(q.act)
    if act is not None:
        lin.register_forward_pre_hook(lambda m, args: (act(args[0]),))


def quantize_linears(layer: nn.Module, prefix: str, args: dict[str, QuantArgs], groups: dict[str, str],
                     observers: dict, dt: torch.dtype) -> dict[str, Quantized]:
    """Quantize each non-FLOAT linear with its input's statistics, and install Ŵ in the layer."""
    out = {}
    for name, a in args.items():
        if a.scheme == "FLOAT":
            continue
        sub = name[len(prefix) + 1:] if prefix else name
        lin = layer.get_submodule(sub)
        b = None if lin.bias is None else lin.bias.detach().float().cpu()
        obs = observers.get(groups.get(name, name))
        r, H = (obs.range(), obs.H()) if obs is not None else (None, None)
        q = SCHEMES[a.scheme].quantize(name, lin.weight.detach().float().cpu(), b, a, dt, r, H)
        install(layer, sub, q)
        out[name] = q
    return out


@dataclass
class LayerResult:
    quantized: dict[str, Quantized]
    rel_error: float


def run_batches(fn, H: torch.Tensor, batch: int, device, dtype, out: torch.Tensor | None) -> None:
    """fn over H in batches; results go to `out` (which may be H itself) or are dropped."""
    for i in range(0, H.shape[0], batch):
        y = fn(H[i:i + batch].to(device=device, dtype=dtype))
        if out is not None:
            out[i:i + batch] = y.to(device="cpu", dtype=out.dtype)


def observe_and_quantize(layer: nn.Module, prefix: str, forward, H: torch.Tensor, args: dict[str, QuantArgs],
                         groups: dict[str, str], dt: torch.dtype, batch: int, device, cdt,
                         out: torch.Tensor | None = None, make_range=MinMax) -> dict[str, Quantized]:
    """Float pass with input observers (its outputs to `out`), then quantize and install Ŵ."""
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    with torch.no_grad():
        with observe_inputs(layer, prefix, groups, quantizable, needs_hessian(args), make_range,
                            static_inputs(args)) as obs:
            run_batches(forward, H, batch, device, cdt, out)
        return quantize_linears(layer, prefix, args, groups, obs, dt)


def process_layer(layer: nn.Module, prefix: str, forward, H: torch.Tensor, args: dict[str, QuantArgs],
                  groups: dict[str, str], dt: torch.dtype, batch: int, device, cdt, propagate: str,
                  make_range=MinMax) -> LayerResult:
    """Observe (float pass) → quantize → propagate (quantized pass, into H in place)."""
    Y_float = torch.empty_like(H)
    quantized = observe_and_quantize(layer, prefix, forward, H, args, groups, dt, batch, device, cdt, Y_float,
                                     make_range)
    with torch.no_grad():
        if quantized:
            run_batches(forward, H, batch, device, cdt, H)
        else:
            H.copy_(Y_float)
    err = float((H - Y_float).norm() / Y_float.norm().clamp_min(1e-30))
    if propagate == "float":
        H.copy_(Y_float)
    return LayerResult(quantized, err)
