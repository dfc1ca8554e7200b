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
SEARCH_CELLS = 1 << 15   # (lo, hi) candidates scored at once: cache-sized, and small enough that
                         # torch keeps each op on one thread (no hand-offs on a busy CPU)


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
    batch's min and max, which damps a single extreme batch.

    The running extremes and sums stay on the input's device (float64, so the sums are exactly
    the host float sums) until `range()` reads them: no host synchronisation per batch."""

    def __init__(self, aggregate: str = "global"):
        if aggregate not in AGGREGATES:
            raise StreamqError(f"unknown activation range aggregate {aggregate!r}",
                               f"use one of {', '.join(AGGREGATES)}")
        self.aggregate = aggregate
        self.batches = 0
        self.acc: torch.Tensor | None = None   # [global lo, global hi, Σ batch lo, Σ batch hi]

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        e = torch.stack(torch.aminmax(x.detach())).double()
        if self.acc is None:
            self.acc = torch.cat([e, e])
        else:
            a = self.acc
            self.acc = torch.cat([torch.minimum(a[:1], e[:1]), torch.maximum(a[1:2], e[1:]), a[2:] + e])
        self.batches += 1

    def range(self) -> ActRange:
        if self.batches == 0:   # nothing seen: the degenerate range the scheme widens to contain 0
            return ActRange(0.0, 0.0)
        lo, hi, sum_lo, sum_hi = self.acc.tolist()
        return AGGREGATES[self.aggregate](lo, hi, sum_lo, sum_hi, self.batches)


AGGREGATES = {  # (global lo, global hi, Σ batch lo, Σ batch hi, batches) → range
    "global": lambda lo, hi, sum_lo, sum_hi, n: ActRange(lo, hi),
    "mean": lambda lo, hi, sum_lo, sum_hi, n: ActRange(sum_lo / n, sum_hi / n),
}


class Histogram(RangeObserver):
    """A fixed number of equal bins over a range that always contains 0 and every value seen.

    When a batch falls outside the range, the range grows to a power-of-two multiple of its width,
    shifted by a whole number of old bins, so that every old bin lies inside exactly one new bin:
    the old counts merge exactly and the result equals binning all data at once on the new grid.
    `range()` then searches every (lo, hi) pair of bin edges with lo ≤ 0 ≤ hi for the least
    expected int8 quantization MSE of the histogram (see `quantization_error`).
    """

    def __init__(self, bins: int = 2048):
        if bins < 2:
            raise StreamqError(f"a histogram observer needs at least 2 bins (got {bins})", "use bins=2048")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo, self.width = 0.0, 0.0                # histogram range [lo, lo + width]; 0 = empty
        self.data_lo, self.data_hi = math.inf, -math.inf  # exact extremes: candidates stop there

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
        # Python integers: after a tiny first batch, shift and factor can exceed int64.
        old_bin_to_new = torch.tensor([(i + shift) // factor for i in range(self.bins)])
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
        # Candidates never reach past the data: no mass lies there, so that would only widen the step.
        candidates = self.edges().clamp(min(self.data_lo, 0.0), max(self.data_hi, 0.0))
        return ActRange(*best_range(Tails(self.counts, self.lo, self.bin_width), candidates))


class Tails:
    """The histogram's mass and squared clipping error beyond any point, in O(1) per point.

    Values are taken as spread evenly within each bin, so a point inside a bin splits it. Each side
    sums only over its own tail (prefix sums from its own end): the large central mass never
    enters a difference with a small tail cost.
    """

    def __init__(self, counts: torch.Tensor, lo: float, w: float):
        self.counts, self.lo, self.w = counts, lo, w
        self.total = float(counts.sum())
        centres = lo + w * (torch.arange(counts.numel(), dtype=torch.float64) + 0.5)
        spread = w * w / 12       # a bin's own variance about its centre
        # Σ n, Σ n·c, Σ n·(c² + spread) over bins [0, k) and over bins [k, end), k = 0 … bins
        # as rows [k, 3], so that one gather fetches all three at a point.
        moments = torch.stack([counts, counts * centres, counts * (centres * centres + spread)], 1)
        zero = torch.zeros(1, 3, dtype=torch.float64)
        self.before = torch.cat([zero, moments.cumsum(0)])
        self.after = torch.cat([moments.flip(0).cumsum(0).flip(0), zero])

    def _locate(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bin holding each point, and how far into it the point lies (0 … 1)."""
        pos = (e - self.lo) / self.w
        k = pos.floor().clamp(0, self.counts.numel() - 1)
        return k.long(), (pos - k).clamp(0, 1)

    def below(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error of raising every value below e to e, and the mass that moves."""
        k, f = self._locate(e)
        m0, m1, m2 = self.before[k].unbind(-1)      # whole bins before k
        part = self.counts[k]
        err = m2 - 2 * e * m1 + e * e * m0 + part * self.w ** 2 * f ** 3 / 3
        return err.clamp_min(0), m0 + part * f

    def above(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error of lowering every value above e to e, and the mass that moves."""
        k, f = self._locate(e)
        m0, m1, m2 = self.after[k + 1].unbind(-1)   # whole bins after k
        part, g = self.counts[k], 1 - f
        err = m2 - 2 * e * m1 + e * e * m0 + part * self.w ** 2 * g ** 3 / 3
        return err.clamp_min(0), m0 + part * g


def best_range(tails: Tails, candidates: torch.Tensor) -> tuple[float, float]:
    """The candidate pair (lo ≤ 0 ≤ hi) with the least expected quantization error; ties go to the
    first pair in (lo, hi) order, so the choice is deterministic."""
    los, his = candidates[candidates <= 0], candidates[candidates >= 0]
    rows = max(1, SEARCH_CELLS // his.numel())
    best = (math.inf, 0.0, 0.0)
    for part in los.split(rows):
        err = quantization_error(tails, part[:, None], his[None, :]).flatten()
        k = int(torch.argmin(err))
        if float(err[k]) < best[0]:
            best = (float(err[k]), float(part[k // his.numel()]), float(his[k % his.numel()]))
    return best[1], best[2]


def quantization_error(tails: Tails, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Total squared error of FORMAT.md §3's int8 quantization with range [lo, hi] (up to a 1/N).

    The offset rounds, so the grid actually covers [−z·s, (255 − z)·s] with z = round(−lo/s), up to
    half a step inside [lo, hi]: clipping is scored at those ends, which matters for skewed inputs
    with few steps below 0. Values inside get the rounding noise s²/12. A zero-width range cannot
    quantize anything, so it scores infinity.
    """
    width = hi - lo
    s = width.clamp_min(1e-30) / QLEVELS
    z = torch.round(-lo / s)
    clip_lo, moved_lo = tails.below(-z * s)
    clip_hi, moved_hi = tails.above((QLEVELS - z) * s)
    err = (tails.total - moved_lo - moved_hi) * s * s / 12 + clip_lo + clip_hi
    return err.masked_fill_(width <= 0, math.inf)


class AutoMix(RangeObserver):
    """msModelSlim's auto-mix: on the first `probe_batches` batches, ratio = max(|min|, |max|) / std.
    A ratio ≤ threshold (no outliers: a Gaussian gives about 4) uses Histogram; a larger one uses
    MinMax, because an MSE-optimal range would clip those outliers, and in LLM activations the
    outlier channels carry signal.

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
