"""The few device specifics: choosing a device, peak-memory counters, freeing cached memory.

torch_npu is optional: importing streamq never requires it.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import resource

import psutil
import torch

from .errors import StreamqError


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve(name: str) -> torch.device:
    """auto → NPU if torch_npu and a device are present, else CUDA, else CPU."""
    if name == "auto":
        if _npu_available():
            return torch.device("npu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "npu": _npu_available}
    if kind not in available:
        raise StreamqError(f"unknown device '{name}'", "use auto, cpu, cuda[:i] or npu[:i]")
    if not available[kind]():
        raise StreamqError(f"device '{name}' is not available on this machine", "use --device cpu or auto")
    return torch.device(name)


def _backend(device: torch.device):
    return {"cuda": getattr(torch, "cuda", None), "npu": getattr(torch, "npu", None)}.get(device.type)


def reset_peak(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak device memory since the last reset (None on CPU, where host RSS is the measure)."""
    backend = _backend(device)
    return None if backend is None else int(backend.max_memory_allocated(device))


def empty_cache(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.empty_cache()


_LIBC = None
M_MMAP_THRESHOLD = -3


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def steady_host_memory() -> None:
    """Serve large blocks (≥ 1 MiB: weights, hidden-state batches) from their own mappings.

    glibc otherwise raises its mmap threshold after the first large free, and layer-sized
    buffers then fragment the heap, so resident memory creeps up over the first layers.
    """
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    # What exists now (modules, classes, the plan) lives for the whole run: frozen, it is left out
    # of the collection after every step, which otherwise walks ~350k objects (a third of a second).
    gc.freeze()


def release_host_memory() -> None:
    """Between steps: return the freed heap to the system so peak RSS tracks one layer."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
