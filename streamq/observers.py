"""Activation range observers: choose the (min, max) that static W8A8 quantizes a linear's input with.

Static W8A8 quantizes each linear input per tensor, asymmetric int8 (FORMAT.md §3):
s_x = (max − min) / 255, o_x = round(−min / s_x) − 128. An observer sees every calibration batch
of one input and proposes (min, max). msModelSlim's `act_method` picks the observer:

    1  MinMax     the extremes (global, or the mean of per-batch extremes)
    2  Histogram  the range minimising the int8 quantization MSE of the observed distribution
    3  AutoMix    Histogram for well-behaved inputs, MinMax for inputs with outliers

All observers run in constant memory (a few scalars, or one fixed histogram) whatever the number
of tokens, keep their statistics in float64, and are deterministic: the same batches give the
same range.
"""
from __future__ import annotations

import math

import torch

from .errors import StreamqError
from .quant.schemes import ActRange

QLEVELS = 255            # int8: 256 levels, 255 steps between min and max
CHUNK = 1 << 24          # elements binned at once: bounds the temporary index tensor
SEARCH_CELLS = 1 << 16   # (lo, hi) candidates scored at once: small enough to stay in cache


def _extremes(x: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.aminmax(x.detach())
    return float(lo), float(hi)


class RangeObserver:
    """Sees calibration batches (any shape, last dim = channels), proposes a per-tensor range."""

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> ActRange:
        raise NotImplementedError


class MinMax(RangeObserver):
    """The observed extremes. "global": over all batches; "mean": msModelSlim's average of each
    batch's min and max, which damps a single extreme batch."""

    def __init__(self, aggregate: str = "global"):
        if aggregate not in AGGREGATES:
            raise StreamqError(f"unknown activation range aggregate {aggregate!r}",
                               f"use one of {', '.join(AGGREGATES)}")
        self.aggregate = aggregate
        self.lo, self.hi = math.inf, -math.inf        # global extremes
        self.sum_lo, self.sum_hi, self.batches = 0.0, 0.0, 0  # for the mean of per-batch extremes

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = _extremes(x)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.sum_lo, self.sum_hi, self.batches = self.sum_lo + lo, self.sum_hi + hi, self.batches + 1

    def range(self) -> ActRange:
        if self.batches == 0:   # nothing seen: the degenerate range the scheme widens to contain 0
            return ActRange(0.0, 0.0)
        return AGGREGATES[self.aggregate](self)


AGGREGATES = {
    "global": lambda m: ActRange(m.lo, m.hi),
    "mean": lambda m: ActRange(m.sum_lo / m.batches, m.sum_hi / m.batches),
}


class Histogram(RangeObserver):
    """A fixed number of equal bins over a range that always contains 0 and every value seen.

    When a batch falls outside the range, the range grows to a power-of-two multiple of its width,
    shifted by a whole number of old bins, so that every old bin lies inside exactly one new bin:
    the old counts merge exactly and the result equals binning all data at once on the new grid.
    `range()` then searches every (lo, hi) pair of bin edges with lo ≤ 0 ≤ hi for the least
    expected int8 quantization MSE of the histogram (see `quantization_mse`).
    """

    def __init__(self, bins: int = 2048):
        if bins < 2:
            raise StreamqError(f"a histogram observer needs at least 2 bins (got {bins})", "use bins=2048")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo, self.width = 0.0, 0.0                # histogram range [lo, lo + width]; 0 = empty
        self.data_lo, self.data_hi = math.inf, -math.inf  # exact extremes, to trim the chosen range

    @property
    def bin_width(self) -> float:
        return self.width / self.bins

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = _extremes(x)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise StreamqError(f"a calibration activation is not finite (min {lo}, max {hi})",
                               "check the model in float: an overflow in fp16/bf16 often causes this")
        self.data_lo, self.data_hi = min(self.data_lo, lo), max(self.data_hi, hi)
        if self.width == 0.0:
            self._start(lo, hi)
        else:
            self._grow(lo, hi)
        self._add(x.detach().reshape(-1))

    def _start(self, lo: float, hi: float) -> None:
        # 0 stays inside because the quantized range always contains it; a tiny floor keeps an
        # all-zero first batch from giving a zero-width histogram.
        self.lo = min(lo, 0.0)
        self.width = max(max(hi, 0.0) - self.lo, 1e-12)

    def _grow(self, lo: float, hi: float) -> None:
        """Widen to cover [lo, hi]: shift the start left by whole bins, multiply the width by 2^k."""
        w = self.bin_width
        shift = max(0, math.ceil((self.lo - lo) / w))           # old bins added on the left
        new_lo = self.lo - shift * w
        need = max(hi, self.lo + self.width) - new_lo
        factor = 1
        while self.width * factor < need:
            factor *= 2
        if shift == 0 and factor == 1:
            return
        old_bin_to_new = (torch.arange(self.bins, dtype=torch.int64) + shift) // factor
        self.counts = torch.bincount(old_bin_to_new, weights=self.counts, minlength=self.bins).double()
        self.lo, self.width = new_lo, self.width * factor

    def _add(self, flat: torch.Tensor) -> None:
        # Float32 (float64 for float64 input) is ample for a bin index among a few thousand; bincount
        # gives exact integer counts on any device.
        dtype = torch.promote_types(flat.dtype, torch.float32)
        w = self.bin_width
        for chunk in flat.split(CHUNK):
            idx = ((chunk.to(dtype) - self.lo) / w).floor_().clamp_(0, self.bins - 1).long()
            self.counts += torch.bincount(idx, minlength=self.bins).cpu().double()

    def edges(self) -> torch.Tensor:
        return self.lo + self.bin_width * torch.arange(self.bins + 1, dtype=torch.float64)

    def range(self) -> ActRange:
        if self.width == 0.0:
            return ActRange(0.0, 0.0)
        lo, hi = best_range(self.counts, self.edges())
        # No mass lies beyond the exact extremes, so trimming to them only shrinks the step.
        return ActRange(max(lo, self.data_lo), min(hi, self.data_hi))


def _tail_sums(n: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Σ n, Σ n·c, Σ n·c² over bins [0, k) for k = 0 … bins (prefix sums with a leading 0)."""
    zero = torch.zeros(1, dtype=torch.float64)
    return tuple(torch.cat([zero, torch.cumsum(v, 0)]) for v in (n, n * c, n * c * c))


def clip_errors(counts: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of clamping every value below edge i up to it (left[i]) and every value above
    edge j down to it (right[j]), with each bin's values spread evenly around its centre.

    Each side sums only over the clipped tail (prefix sums from its own end), so the huge centre
    mass never enters a difference with the small tail cost.
    """
    w = float(edges[1] - edges[0])
    c = (edges[:-1] + edges[1:]) / 2
    spread = w * w / 12       # variance of a value uniform in its bin
    n0, n1, n2 = _tail_sums(counts, c)
    left = n2 - 2 * edges * n1 + edges * edges * n0 + spread * n0
    m0, m1, m2 = (v.flip(0) for v in _tail_sums(counts.flip(0), c.flip(0)))
    right = m2 - 2 * edges * m1 + edges * edges * m0 + spread * m0
    return left.clamp_min(0), right.clamp_min(0)


def best_range(counts: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
    """The pair of edges (lo ≤ 0 ≤ hi) with the least expected quantization MSE; ties go to the
    first pair in (lo, hi) order, so the choice is deterministic."""
    left, right = clip_errors(counts, edges)
    inside = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts, 0)])  # mass below edge k
    los = torch.nonzero(edges <= 0).flatten()
    his = torch.nonzero(edges >= 0).flatten()
    rows = max(1, SEARCH_CELLS // his.numel())
    best = (math.inf, 0, 0)
    for part in los.split(rows):
        err = quantization_mse(edges[part, None], edges[None, his], left[part, None], right[None, his],
                               inside[his][None, :] - inside[part, None])
        k = int(torch.argmin(err))
        if float(err.flatten()[k]) < best[0]:
            best = (float(err.flatten()[k]), int(part[k // his.numel()]), int(his[k % his.numel()]))
    _, i, j = best
    return float(edges[i]), float(edges[j])


def quantization_mse(lo, hi, left_clip, right_clip, mass_inside):
    """Total squared error of int8 asymmetric quantization with range [lo, hi] (up to a 1/N):
    rounding noise s²/12 for the mass inside, plus the clipping error of the mass outside.
    A zero-width range cannot quantize anything, so it scores infinity."""
    width = hi - lo
    empty = width <= 0
    err = width.square_().mul_(mass_inside).div_(12 * QLEVELS * QLEVELS)   # in place: this is the hot loop
    err.add_(left_clip).add_(right_clip)
    return err.masked_fill_(empty, math.inf)


class AutoMix(RangeObserver):
    """msModelSlim's auto-mix: on the first `probe_batches` batches, ratio = max(|min|, |max|) / std.
    A ratio ≤ threshold (no outliers: a Gaussian gives about 4) uses Histogram, a larger one MinMax,
    since an MSE-optimal range would clip the outliers that such inputs carry meaning in.

    Until it decides, both candidates see every batch (each in constant memory), so the chosen one
    has seen all data; `chosen` is then the class it kept, and `ratio` the measured ratio."""

    def __init__(self, threshold: float = 50.0, probe_batches: int = 1, aggregate: str = "global",
                 bins: int = 2048):
        self.threshold, self.probe_batches = threshold, probe_batches
        self.candidates = {MinMax: MinMax(aggregate), Histogram: Histogram(bins)}
        self.chosen: type[RangeObserver] | None = None
        self.ratio: float | None = None
        self.count, self.mean, self.m2, self.absmax, self.batches = 0, 0.0, 0.0, 0.0, 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        for obs in self.candidates.values():
            obs.update(x)
        if self.chosen is None:
            self._probe(x)
            if self.batches >= self.probe_batches:
                self._decide()

    def _probe(self, x: torch.Tensor) -> None:
        """Merge this batch's mean and variance into the running ones (Chan et al.), in float64."""
        var, mean = torch.var_mean(x.detach().float(), correction=0)
        n, mean, m2 = x.numel(), float(mean), float(var) * x.numel()
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count, self.batches = total, self.batches + 1
        lo, hi = _extremes(x)
        self.absmax = max(self.absmax, abs(lo), abs(hi))

    def _decide(self) -> None:
        std = math.sqrt(self.m2 / self.count)
        self.ratio = self.absmax / std if std > 0 else math.inf
        self.chosen = Histogram if self.ratio <= self.threshold else MinMax
        self.candidates = {self.chosen: self.candidates[self.chosen]}

    def range(self) -> ActRange:
        if self.batches == 0:
            return ActRange(0.0, 0.0)
        if self.chosen is None:     # fewer batches than the probe wanted: decide on what was seen
            self._decide()
        return self.candidates[self.chosen].range()


OBSERVERS = {1: MinMax, 2: Histogram, 3: AutoMix}

# How each act_method takes the MinMax aggregate: only the observers that hold a MinMax use it.
_FACTORIES = {
    1: lambda aggregate: MinMax(aggregate),
    2: lambda aggregate: Histogram(),
    3: lambda aggregate: AutoMix(aggregate=aggregate),
}


def make_observer(act_method: int, aggregate: str = "global") -> RangeObserver:
    if act_method not in _FACTORIES:
        raise StreamqError(f"unknown act_method {act_method!r}",
                           "use 1 (min-max), 2 (histogram) or 3 (auto-mix)")
    if aggregate not in AGGREGATES:
        raise StreamqError(f"unknown activation range aggregate {aggregate!r}",
                           f"use one of {', '.join(AGGREGATES)}")
    return _FACTORIES[act_method](aggregate)
