"""Crash points for the resume tests: STREAMQ_KILL_AT=<point>:<n> SIGKILLs the process the n-th
time it passes <point>, exactly as a power cut or the OOM killer would.

Points are passed on more than one thread (`tensor-written` on the shard writer's), so the count
is taken under a lock; SIGKILL from any thread ends the whole process.
"""
import os
import signal
import threading
from collections import Counter

_seen: Counter = Counter()
_lock = threading.Lock()


def point(name: str) -> None:
    target = os.environ.get("STREAMQ_KILL_AT")
    if not target:
        return
    with _lock:
        _seen[name] += 1
        hit = target == f"{name}:{_seen[name]}"
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
