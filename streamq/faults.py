"""Crash points for the resume tests: STREAMQ_KILL_AT=<point>:<n> SIGKILLs the process the n-th
time it passes <point>, exactly as a power cut or the OOM killer would.
"""
import os
import signal
from collections import Counter

_seen: Counter = Counter()


def point(name: str) -> None:
    target = os.environ.get("STREAMQ_KILL_AT")
    if not target:
        return
    _seen[name] += 1
    if target == f"{name}:{_seen[name]}":
        os.kill(os.getpid(), signal.SIGKILL)
