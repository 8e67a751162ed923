"""Wall-clock timing shared by the benchmark scripts (run as scripts, so imported as ``timing``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wall_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
