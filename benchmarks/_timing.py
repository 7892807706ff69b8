"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, device: torch.device, repeats: int = 7, inner: int = 20, warmup: int = 5) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` timings of ``inner`` calls each,
    after ``warmup`` untimed calls: CUDA events on a GPU, the host clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) * 1000 / inner)
    return statistics.median(times)
