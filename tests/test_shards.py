"""The streaming shard writer: write-behind gives the bytes of in-line writes, holds the caller
back when its queue is full, reports a failed write at the caller's next call, and resumes."""
import errno
import threading

import pytest
import torch
from safetensors.torch import load_file

from streamq.errors import StreamqError
from streamq.pipeline import run
from streamq.plan import OutTensor
from streamq.recipe import load_recipe
from streamq.shards import ShardWriter
from streamq.synth import write_dense

from conftest import SMALL_CAL, output_bytes, write_recipe

NAMES = ["a.safetensors", "b.safetensors"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w0": torch.randn(64, 32, generator=g).to(torch.bfloat16),
            "q0": torch.randint(-128, 128, (48, 32), generator=g, dtype=torch.int8),
            "s0": torch.rand(48, generator=g),
            "w1": torch.randn(32, 96, generator=g).to(torch.float16),
            "q1": torch.randint(-128, 128, (16, 8), generator=g, dtype=torch.int8)}


TENSORS = _tensors()
SPECS = {n: OutTensor(n, t.dtype, tuple(t.shape), "FLOAT", n) for n, t in TENSORS.items()}
SHARDS = ((SPECS["w0"], SPECS["q0"], SPECS["s0"]), (SPECS["w1"], SPECS["q1"]))
ORDER = ["w0", "q0", "s0", "w1", "q1"]


def _write_all(work, buffer_bytes: int) -> dict[str, bytes]:
    work.mkdir()
    w = ShardWriter(work, NAMES, SHARDS, buffer_bytes)
    for n in ORDER:
        w.write(n, TENSORS[n])
    w.sync()
    w.close()
    return {n: (work / n).read_bytes() for n in NAMES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _write_all(tmp_path_factory.mktemp("inline") / "w", 0)


@pytest.mark.parametrize("buffer_bytes", [1, 8192, 10**9])
def test_write_behind_gives_the_bytes_of_inline_writes(tmp_path, reference, buffer_bytes):
    got = _write_all(tmp_path / "w", buffer_bytes)
    assert got == reference
    loaded = {**load_file(str(tmp_path / "w" / NAMES[0])), **load_file(str(tmp_path / "w" / NAMES[1]))}
    assert all(torch.equal(loaded[n], TENSORS[n]) for n in ORDER)


def _gated(w: ShardWriter) -> threading.Event:
    """Make the writer's file side wait for the returned event before each append."""
    gate, append = threading.Event(), w._append

    def slow_append(data):
        assert threading.current_thread() is not threading.main_thread()
        gate.wait(10)
        append(data)
    w._append = slow_append
    return gate


def test_write_returns_before_the_bytes_land_and_sync_waits_for_them(tmp_path, reference):
    w = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)
    gate = _gated(w)
    for n in ORDER[:2]:
        w.write(n, TENSORS[n])             # returns although nothing can be appended yet
    partial = tmp_path / (NAMES[0] + ".partial")
    assert not partial.exists()
    syncing = threading.Thread(target=w.sync)
    syncing.start()
    syncing.join(0.3)
    assert syncing.is_alive(), "sync returned before the queued tensors were written"
    gate.set()
    syncing.join(10)
    pos = w.sync()
    header = len(reference[NAMES[0]]) - sum(TENSORS[n].nbytes for n in ORDER[:3])
    assert pos == {"shard": 0, "tensor": 2, "offset": header + TENSORS["w0"].nbytes + TENSORS["q0"].nbytes}
    assert partial.read_bytes() == reference[NAMES[0]][:pos["offset"]]
    w.close()


def test_a_full_queue_holds_the_caller_back(tmp_path):
    bound = TENSORS["w0"].nbytes + TENSORS["q0"].nbytes
    w = ShardWriter(tmp_path, NAMES, SHARDS, bound)
    gate = _gated(w)
    w.write("w0", TENSORS["w0"])
    w.write("q0", TENSORS["q0"])           # exactly fills the queue
    third = threading.Thread(target=w.write, args=("s0", TENSORS["s0"]))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a write went past the byte bound of the queue"
    assert w._queued <= bound
    gate.set()
    third.join(10)
    assert not third.is_alive()
    w.sync()
    w.close()
    assert (tmp_path / NAMES[0]).exists()  # the shard's last tensor closed and renamed it


class _FullDisk:
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


@pytest.mark.parametrize("call", ["write", "sync", "close"])
def test_a_failed_write_is_raised_at_the_next_call_naming_the_shard(tmp_path, call):
    w = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)
    w.file = _FullDisk()                    # the worker appends to it, and fails
    w.write("w0", TENSORS["w0"])
    with w._cv:
        w._cv.wait_for(lambda: not w._queue, 10)   # the worker has tried, and failed
    with pytest.raises(StreamqError) as e:
        {"write": lambda: w.write("q0", TENSORS["q0"]), "sync": w.sync, "close": w.close}[call]()
    assert NAMES[0] + ".partial" in str(e.value) and "free disk space" in str(e.value)
    w.close(discard=True)                   # on a run already failing: no second error


def test_an_unexpected_worker_error_is_named_too(tmp_path):
    w = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)

    def broken(data):
        raise RuntimeError("boom")
    w._append = broken
    w.write("w0", TENSORS["w0"])
    with pytest.raises(StreamqError, match=r"a\.safetensors\.partial.*boom"):
        w.sync()
    w.close(discard=True)


def test_discarded_writes_are_truncated_on_resume(tmp_path, reference):
    w = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)
    w.write("w0", TENSORS["w0"])
    pos = w.sync()
    w.write("q0", TENSORS["q0"])            # never committed: a crash after it
    w.write("s0", TENSORS["s0"])
    w.close(discard=True)
    again = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)
    again.resume(pos)
    for n in ORDER[1:]:
        again.write(n, TENSORS[n])
    again.sync()
    again.close()
    assert {n: (tmp_path / n).read_bytes() for n in NAMES} == reference


def test_a_tensor_off_the_plan_fails_at_once(tmp_path):
    w = ShardWriter(tmp_path, NAMES, SHARDS, 10**9)
    with pytest.raises(StreamqError, match="where the plan has w0"):
        w.write("q0", TENSORS["q0"])
    for n in ORDER:
        w.write(n, TENSORS[n])
    with pytest.raises(StreamqError, match="plan has nothing more"):
        w.write("q1", TENSORS["q1"])
    w.close()


def test_a_run_writes_the_same_checkpoint_with_and_without_write_behind(tmp_path):
    model = write_dense(tmp_path / "m", "llama", layers=2, hidden=64, intermediate=128, vocab=128)
    body = SMALL_CAL.replace("[run]", "[output]\nshard_size_gb = 0.00003\n[run]") + '[quant]\nscheme = "W8A8_DYNAMIC"\n'
    outs = {}
    for gb in ("0", "0.00001"):            # in line, and a queue smaller than most tensors
        recipe = load_recipe(write_recipe(tmp_path / f"r{gb}.toml",
                                          body.replace("[run]", f"[run]\nwrite_behind_gb = {gb}")))
        run(recipe, model, tmp_path / f"out{gb}", "cpu")
        outs[gb] = output_bytes(tmp_path / f"out{gb}")
    assert outs["0"] == outs["0.00001"]
    assert len([n for n in outs["0"] if n.endswith(".safetensors")]) > 1
