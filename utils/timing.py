"""Wall-clock timing shared by the benchmark and the reproduction tables (paper Sec. 4.3).

:class:`Clock` times one call (``time.perf_counter`` on the CPU, CUDA events on a GPU);
:func:`time_interleaved` times several functions in rotating order and keeps the median.
This module depends on torch only, so any tool can time its own functions with it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Clock:
    """Seconds taken by a call: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            return self._cuda(fn)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    @staticmethod
    def _cuda(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0


def _inner_counts(fns: dict[str, Callable[[], object]], warmup: int, clock: Clock,
                  min_time: float) -> dict[str, int]:
    """Run the warm-up rounds; returns how many calls make one timed sample of each
    function (enough to last about ``min_time`` after the last warm-up round)."""
    inner = {name: 1 for name in fns}
    for w in range(warmup):
        for name, fn in fns.items():
            took = clock(fn)
            if w == warmup - 1 and took < min_time:
                inner[name] = max(1, round(min_time / max(took, 1e-6)))
    return inner


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     clock: Clock, min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved (the order
    rotates every round so that none always follows the same neighbour). A timed
    sample repeats a call that took less than ``min_time`` in warm-up enough times
    to last about ``min_time``, so that short calls are not timed one by one."""
    names = list(fns)
    inner = _inner_counts(fns, warmup, clock, min_time)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], inner[name]
            times[name].append(clock(lambda fn=fn, n=n: [fn() for _ in range(n)]) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}
