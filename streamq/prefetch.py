"""Read-ahead: the next layer's (or expert chunk's) tensors are read and dequantized on a
worker thread while the current one computes, so the disk hides behind the compute.

One load ahead at most, so host memory holds at most two layers' source tensors. The result is
the same bytes a direct load returns (same reader, same order), so output stays deterministic.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class Prefetcher:
    def __init__(self, enabled: bool = True):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-read") if enabled else None
        self.pending: dict[tuple, Future] = {}

    def submit(self, key: tuple, load) -> None:
        if self.pool is not None and key not in self.pending:
            self.pending[key] = self.pool.submit(load)

    def take(self, key: tuple, load):
        """The prefetched result for `key` (errors surface here, as from a direct load), or load now."""
        future = self.pending.pop(key, None)
        return future.result() if future is not None else load()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
