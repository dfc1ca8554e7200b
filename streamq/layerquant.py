"""One step's compute, with no I/O: observe a layer's inputs, quantize its linears, propagate.

Kept apart from the pipeline so that it is a pure function of (layer, hidden states, plan):
the pipeline orders the side effects around it.

A step has two passes over the calibration rows: the float layer (observing the inputs whose
quantization needs statistics), then the quantized layer. Only one of them is propagated, and
only the float pass can feed statistics, so `plan_passes` runs a pass over every row only when
its outputs or statistics are used; otherwise it runs the first batch alone, which is all that
the step's rel_error compares. `process_layer_reference` is the same step with both passes over
every row, kept as the slow reference that tests compare against.
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
    per-tensor range (by the recipe's act_method) when a static linear reads it, and GPTQ's
    Hessian H = 2XᵀX/N when a GPTQ linear reads it."""

    def __init__(self, hessian: bool, ranges: RangeObserver | None):
        self.ranges = ranges
        self.wants_hessian = hessian
        self.hessian: HessianAccumulator | None = None

    def update(self, x: torch.Tensor) -> None:
        if self.ranges is not None:
            self.ranges.update(x)
        if self.wants_hessian:
            if self.hessian is None:  # the input width is known at the first batch
                self.hessian = HessianAccumulator(x.shape[-1], x.device)
            self.hessian.update(x)

    def range(self) -> ActRange | None:
        return None if self.ranges is None else self.ranges.range()

    def H(self) -> torch.Tensor | None:
        return None if self.hessian is None or self.hessian.N == 0 else self.hessian.H.cpu()


@contextmanager
def observe_inputs(layer: nn.Module, prefix: str, groups: dict[str, str], linears: list[str],
                   hessian: set[str] = frozenset(), make_range=MinMax, static: set[str] = frozenset()):
    """One observer per distinct input that a static or GPTQ linear reads: linears that share an
    input (q/k/v) share an observer, and one Hessian serves all of them. Inputs read only by
    data-free linears are not observed."""
    observers: dict[str, InputObserver] = {}
    handles = []
    for name in linears:
        key = groups.get(name, name)
        if key in observers:
            continue
        readers = [n for n in linears if groups.get(n, n) == key]
        wants_range, wants_hessian = any(n in static for n in readers), any(n in hessian for n in readers)
        if not (wants_range or wants_hessian):
            continue
        obs = observers[key] = InputObserver(wants_hessian, make_range() if wants_range else None)
        sub = layer.get_submodule(name[len(prefix) + 1:] if prefix else name)
        handles.append(sub.register_forward_pre_hook(lambda m, args, obs=obs: obs.update(args[0])))
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


STATIC = ("W8A8", "W8A8_MIX", "W8A8S")  # the schemes that store a per-tensor activation range


def static_inputs(args: dict[str, QuantArgs]) -> set[str]:
    return {n for n, a in args.items() if a.scheme in STATIC}


def needs_hessian(args: dict[str, QuantArgs]) -> set[str]:
    return {n for n, a in args.items() if a.scheme != "FLOAT" and a.w_method == "gptq"}


def needs_statistics(args: dict[str, QuantArgs]) -> bool:
    """Whether quantizing these linears reads calibration statistics of their inputs. Smoothing
    and KV C8 collect theirs in passes of their own, before this step's passes."""
    return bool(static_inputs(args) or needs_hessian(args))


def static_fake_quant(x: torch.Tensor, s_x: float, o_x: float) -> torch.Tensor:
    """(clamp(round(x / s_x + o_x), −128, 127) − o_x) · s_x, in place after the division."""
    return (x / s_x).add_(o_x).round_().clamp_(-128, 127).sub_(o_x).mul_(s_x)


class RoundTrip:
    """An input's activation round trip, computed once per batch however many linears read the
    input (q/k/v, gate/up): the result is reused while the same tensor comes again unmodified
    (`_version` counts in-place writes). Holding the last input keeps its identity unique."""

    def __init__(self, fn):
        self.fn, self.x, self.version, self.y = fn, None, -1, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x or x._version != self.version:
            self.x, self.version, self.y = x, x._version, self.fn(x)
        return self.y


def round_trip(q: Quantized) -> RoundTrip | None:
    """What the consumer does to this linear's input: per-token dynamic or static per-tensor int8."""
    fn = {"per_token": fake_quant_per_token,
          "per_tensor": lambda x: static_fake_quant(x, q.s_x, q.o_x)}.get(q.act)
    return None if fn is None else RoundTrip(fn)


def install(layer: nn.Module, sub: str, q: Quantized, act: RoundTrip | None) -> None:
    """Make the float module compute what the consumer computes: Ŵ and the activation round trip."""
    lin = layer.get_submodule(sub)
    # Ŵ was computed on the host; the module may live on an accelerator.
    lin.weight.data = q.W_hat.to(device=lin.weight.device, dtype=lin.weight.dtype)
    q.W_hat = None  # the module holds Ŵ now; a second fp32 copy would double the host memory
    if act is not None:
        lin.register_forward_pre_hook(lambda m, args: (act(args[0]),))


def quantize_linears(layer: nn.Module, prefix: str, args: dict[str, QuantArgs], groups: dict[str, str],
                     observers: dict, dt: torch.dtype, share: bool = True) -> dict[str, Quantized]:
    """Quantize each non-FLOAT linear with its input's statistics, and install Ŵ in the layer.
    `share`: linears of one input share its round trip (False: one per linear, the reference)."""
    out, shared = {}, {}
    for name, a in args.items():
        if a.scheme == "FLOAT":
            continue
        sub = name[len(prefix) + 1:] if prefix else name
        lin = layer.get_submodule(sub)
        b = None if lin.bias is None else lin.bias.detach().float().cpu()
        obs = observers.get(groups.get(name, name))
        r, H = (obs.range(), obs.H()) if obs is not None else (None, None)
        q = SCHEMES[a.scheme].quantize(name, lin.weight.detach().float().cpu(), b, a, dt, r, H)
        # Linears of one input with the same round trip share it (static ones: the same s_x, o_x).
        key = (groups.get(name, name), q.act, q.s_x, q.o_x) if share else name
        if key not in shared:
            shared[key] = round_trip(q)
        install(layer, sub, q, shared[key])
        out[name] = q
    return out


@dataclass
class LayerResult:
    quantized: dict[str, Quantized]
    rel_error: float  # ‖Y_q − Y_f‖ / ‖Y_f‖ over the first calibration batch


@dataclass(frozen=True)
class Passes:
    """Calibration rows (sequences) the float and the quantized pass of a step run over."""
    float_rows: int
    quant_rows: int


def plan_passes(rows: int, batch: int, propagate: str | None, float_stats: bool = False,
                quant_stats: bool = False) -> Passes:
    """Every row for a pass that is propagated (`propagate`: "float", "quantized" or None when the
    step's output goes nowhere) or whose statistics quantization needs; the first batch else."""
    first = min(batch, rows)
    return Passes(rows if float_stats or propagate == "float" else first,
                  rows if quant_stats or propagate == "quantized" else first)


def run_batches(fn, H: torch.Tensor, batch: int, device, dtype, out: torch.Tensor | None,
                rows: int | None = None) -> torch.Tensor:
    """fn over the first `rows` rows of H (all by default) in batches; results go to `out` (which
    may be H itself) or are dropped. Returns the first batch's result in fp32 on the host."""
    first = None
    for i in range(0, H.shape[0] if rows is None else rows, batch):
        y = fn(H[i:i + batch].to(device=device, dtype=dtype))
        if i == 0:
            first = y.to(device="cpu", dtype=torch.float32)
        if out is not None:
            out[i:i + batch] = y.to(device="cpu", dtype=out.dtype)
    return first


def rel_error(Y_q: torch.Tensor, Y_f: torch.Tensor) -> float:
    return float((Y_q - Y_f).norm() / Y_f.norm().clamp_min(1e-30))


def observe_and_quantize(layer: nn.Module, prefix: str, forward, H: torch.Tensor, args: dict[str, QuantArgs],
                         groups: dict[str, str], dt: torch.dtype, batch: int, device, cdt,
                         make_range=MinMax) -> dict[str, Quantized]:
    """Float pass with input observers (outputs dropped; skipped when no linear needs
    statistics), then quantize and install Ŵ."""
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    with torch.no_grad():
        with observe_inputs(layer, prefix, groups, quantizable, needs_hessian(args), make_range,
                            static_inputs(args)) as obs:
            if needs_statistics(args):
                run_batches(forward, H, batch, device, cdt, None)
        return quantize_linears(layer, prefix, args, groups, obs, dt)


def process_layer(layer: nn.Module, prefix: str, forward, H: torch.Tensor, args: dict[str, QuantArgs],
                  groups: dict[str, str], dt: torch.dtype, batch: int, device, cdt, propagate: str,
                  make_range=MinMax) -> LayerResult:
    """Float pass (observing) → quantize → quantized pass; the propagated pass writes H in place,
    the other runs only where `plan_passes` says."""
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    if not quantizable:  # the quantized layer is the float layer
        with torch.no_grad():
            run_batches(forward, H, batch, device, cdt, H)
        return LayerResult({}, 0.0)
    p = plan_passes(H.shape[0], batch, propagate, float_stats=needs_statistics(args))
    X0 = H[:batch].clone() if propagate == "float" else None  # the float pass overwrites H
    with torch.no_grad():
        with observe_inputs(layer, prefix, groups, quantizable, needs_hessian(args), make_range,
                            static_inputs(args)) as obs:
            Y_f = run_batches(forward, H, batch, device, cdt, H if propagate == "float" else None, p.float_rows)
        quantized = quantize_linears(layer, prefix, args, groups, obs, dt)
        if propagate == "float":
            Y_q = run_batches(forward, X0, batch, device, cdt, None, p.quant_rows)
        else:
            Y_q = run_batches(forward, H, batch, device, cdt, H, p.quant_rows)
    return LayerResult(quantized, rel_error(Y_q, Y_f))


def process_layer_reference(layer: nn.Module, prefix: str, forward, H: torch.Tensor, args: dict[str, QuantArgs],
                            groups: dict[str, str], dt: torch.dtype, batch: int, device, cdt, propagate: str,
                            make_range=MinMax) -> LayerResult:
    """process_layer with both passes over every row and a round trip per linear: slow, plain."""
    quantizable = [n for n, a in args.items() if a.scheme != "FLOAT"]
    Y_float = torch.empty_like(H)
    with torch.no_grad():
        with observe_inputs(layer, prefix, groups, quantizable, needs_hessian(args), make_range,
                            static_inputs(args)) as obs:
            run_batches(forward, H, batch, device, cdt, Y_float)
        quantized = quantize_linears(layer, prefix, args, groups, obs, dt, share=False)
        run_batches(forward, H, batch, device, cdt, H)
    err = rel_error(H[:batch], Y_float[:batch])
    if propagate == "float":
        H.copy_(Y_float)
    return LayerResult(quantized, err)
