"""Activation range observers, each checked against a computation done here from the raw data."""
import pytest
import torch

from streamq.errors import StreamqError
from streamq.observers import OBSERVERS, AutoMix, Histogram, MinMax, make_observer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: on a busy CPU, handing them between threads costs more time than
    it saves (tens of seconds instead of two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int8_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    """Measured MSE of quantizing x with FORMAT.md §3's per-tensor asymmetric int8 and back."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / 255
    o = round(-lo / s) - 128
    x_hat = (torch.clamp(torch.round(x / s + o), -128, 127) - o) * s
    return float(((x.double() - x_hat.double()) ** 2).mean())


def brute_force_mse(x: torch.Tensor, points: int = 81) -> float:
    """The least measured MSE over a grid of ranges [lo, 0] × [0, hi] spanning the data."""
    x = x.double()
    lo, hi = torch.meshgrid(torch.linspace(float(x.min()), 0, points, dtype=torch.float64),
                            torch.linspace(0, float(x.max()), points, dtype=torch.float64), indexing="ij")
    keep = (hi > lo).flatten()                        # (0, 0) is no range at all
    lo, hi = lo.flatten()[keep], hi.flatten()[keep]
    best = float("inf")
    for l, h in zip(lo.split(256), hi.split(256)):
        s = ((h - l) / 255)[:, None]
        o = torch.round(-l[:, None] / s) - 128
        x_hat = (torch.clamp(torch.round(x[None, :] / s + o), -128, 127) - o) * s
        best = min(best, float(((x[None, :] - x_hat) ** 2).mean(dim=1).min()))
    return best


def student_t3(n, g):
    """Student's t with 3 degrees of freedom: a normal over the root of a scaled chi-square."""
    z = torch.randn(4, n, generator=g, dtype=torch.float64)
    return z[0] / (z[1:].square().sum(0) / 3).sqrt()


def growing_batches(seed=0):
    """Batches whose spread grows, on both sides and one side at a time, as hidden states do."""
    g = gen(seed)
    return [torch.randn(4, 50, 64, generator=g) * 0.05 * 2 ** k + shift
            for k, shift in enumerate([0.0, 0.3, -0.5, 0.0, 2.0, -1.0, 0.0])]


# --- MinMax -------------------------------------------------------------------------------------

def test_minmax_global_is_extremes_of_all_batches():
    batches = growing_batches()
    obs = MinMax("global")
    for b in batches:
        obs.update(b)
    everything = torch.cat([b.flatten() for b in batches])
    r = obs.range()
    assert (r.lo, r.hi) == (float(everything.min()), float(everything.max()))


def test_minmax_mean_averages_per_batch_extremes():
    batches = growing_batches()
    obs = MinMax("mean")
    for b in batches:
        obs.update(b)
    los = torch.tensor([float(b.min()) for b in batches], dtype=torch.float64)
    his = torch.tensor([float(b.max()) for b in batches], dtype=torch.float64)
    r = obs.range()
    assert r.lo == pytest.approx(float(los.mean()), rel=1e-12)
    assert r.hi == pytest.approx(float(his.mean()), rel=1e-12)


# --- Histogram ----------------------------------------------------------------------------------

def test_histogram_clips_rare_huge_outliers_and_lowers_error():
    # One outlier per side in 2M values: clipping them costs less than the rounding noise a
    # ±1000 range would add to every other value.
    x = torch.randn(1 << 21, generator=gen(1))
    x[:2] = torch.tensor([1000.0, -1000.0])
    obs = Histogram()
    for part in x.split(1 << 19):
        obs.update(part)
    r = obs.range()
    assert r.hi - r.lo < 0.2 * 2000
    assert r.lo < -4 and r.hi > 4          # the Gaussian body stays inside
    assert int8_mse(x, r.lo, r.hi) < 0.85 * int8_mse(x, -1000.0, 1000.0)


def test_histogram_on_uniform_data_stays_near_minmax():
    x = torch.rand(200_000, generator=gen(2), dtype=torch.float64) * 4 - 1
    obs = Histogram()
    obs.update(x)
    r = obs.range()
    width = float(x.max() - x.min())
    assert abs(r.lo - float(x.min())) < 0.01 * width
    assert abs(r.hi - float(x.max())) < 0.01 * width


def test_streamed_histogram_equals_binning_all_data_on_its_final_grid():
    batches = growing_batches()
    obs = Histogram()
    for b in batches:
        obs.update(b)
    everything = torch.cat([b.flatten() for b in batches]).double()
    idx = ((everything - obs.lo) / obs.bin_width).floor().clamp(0, obs.bins - 1).long()
    direct = torch.bincount(idx, minlength=obs.bins).double()
    # Re-binning merges whole bins, so only values within rounding of an edge may differ.
    assert float((obs.counts - direct).abs().sum()) <= 4
    assert float(obs.counts.sum()) == everything.numel()


def test_streamed_range_is_within_two_bins_of_one_shot():
    batches = growing_batches()
    streamed, one_shot = Histogram(), Histogram()
    for b in batches:
        streamed.update(b)
    one_shot.update(torch.cat([b.flatten() for b in batches]))
    assert streamed.width > one_shot.width     # the streamed grid did grow, and is coarser
    a, b = streamed.range(), one_shot.range()
    tol = 2 * streamed.bin_width
    assert abs(a.lo - b.lo) <= tol and abs(a.hi - b.hi) <= tol


def test_histogram_memory_does_not_grow_with_tokens():
    obs = Histogram(bins=512)

    def tensor_elements():
        return sum(v.numel() for v in vars(obs).values() if isinstance(v, torch.Tensor))

    obs.update(torch.randn(1000, generator=gen(3)) * 0.01)
    size = tensor_elements()
    for k in range(40):
        obs.update(torch.randn(3, 1000, generator=gen(4 + k)) * 1.3 ** k)
    assert obs.counts.shape == (512,)
    assert tensor_elements() == size
    assert float(obs.counts.sum()) == 1000 + 40 * 3000


@pytest.mark.parametrize("name, make", [
    ("student-t", lambda g: student_t3(4000, g)),
    ("skewed", lambda g: torch.nn.functional.silu(torch.randn(4000, generator=g, dtype=torch.float64) * 3)),
    ("gauss+outlier", lambda g: torch.cat([torch.randn(3999, generator=g, dtype=torch.float64),
                                           torch.tensor([40.0], dtype=torch.float64)])),
])
def test_histogram_choice_is_near_brute_force_optimum(name, make):
    x = make(gen(5))
    obs = Histogram()
    obs.update(x)
    r = obs.range()
    assert int8_mse(x, r.lo, r.hi) <= 1.05 * brute_force_mse(x)


def test_histogram_survives_a_tiny_first_batch_then_a_huge_one():
    obs = Histogram()
    obs.update(torch.zeros(10))          # zero width: the range grows by ~2^60 on the next batch
    obs.update(torch.tensor([-1e4, 3e5]))
    assert float(obs.counts.sum()) == 12
    assert obs.lo <= -1e4 and obs.lo + obs.width >= 3e5


def test_histogram_rejects_non_finite_input():
    with pytest.raises(StreamqError):
        Histogram().update(torch.tensor([1.0, float("inf")]))


def test_histogram_range_of_positive_input_starts_at_zero():
    x = torch.rand(10_000, generator=gen(6)) + 1     # all in [1, 2): the quantized range needs 0 too
    obs = Histogram()
    obs.update(x)
    r = obs.range()
    assert r.lo == 0.0 and float(x.max()) - 0.01 < r.hi <= float(x.max())


def test_histogram_is_deterministic():
    ranges = []
    for _ in range(2):
        obs = Histogram()
        for b in growing_batches(seed=7):
            obs.update(b)
        ranges.append(obs.range())
    assert ranges[0] == ranges[1]


# --- AutoMix ------------------------------------------------------------------------------------

def test_automix_picks_histogram_for_gaussian():
    x = torch.randn(8, 64, 256, generator=gen(8))
    obs, ref = AutoMix(), Histogram()
    obs.update(x)
    ref.update(x)
    assert obs.chosen is Histogram
    ratio = float(x.abs().max() / x.double().std(correction=0))
    assert obs.ratio == pytest.approx(ratio, rel=1e-6) and 3 < obs.ratio < 6
    assert obs.range() == ref.range()


def test_automix_picks_minmax_for_outliers_and_keeps_seeing_batches():
    first = torch.randn(2, 64, 256, generator=gen(9))
    first[0, 0, 0] = 300.0                 # ratio ≈ 300 > 50
    later = torch.randn(2, 64, 256, generator=gen(10)) * 2
    later[1, 1, 1] = -500.0
    obs = AutoMix(probe_batches=1)
    obs.update(first)
    obs.update(later)
    assert obs.chosen is MinMax and obs.ratio > 50
    assert (obs.range().lo, obs.range().hi) == (-500.0, 300.0)


def test_automix_decides_after_its_probe_batches():
    obs = AutoMix(probe_batches=2)
    obs.update(torch.randn(10_000, generator=gen(11)))
    assert obs.chosen is None
    spike = torch.randn(10_000, generator=gen(12))  # one spike in n values gives a ratio ≤ √n
    spike[0] = 1000.0
    obs.update(spike)
    assert obs.chosen is MinMax


# --- Table --------------------------------------------------------------------------------------

def test_make_observer_follows_act_method():
    assert {k: type(make_observer(k)) for k in OBSERVERS} == OBSERVERS
    assert make_observer(1, "mean").aggregate == "mean"
    assert make_observer(3, "mean").candidates[MinMax].aggregate == "mean"
    with pytest.raises(StreamqError):
        make_observer(4)
    with pytest.raises(StreamqError):
        make_observer(1, "median")
