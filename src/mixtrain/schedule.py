"""Learning-rate schedules defined in samples seen, not steps.

A strategy that packs several samples into one pass takes fewer steps per epoch; a schedule in
samples keeps the same learning rate at the same point of the data, whatever the step count.
"""

from __future__ import annotations

import numpy as np


def onecycle_lr(samples_seen, total_samples: float, peak: float, warmup: float = 0.15):
    """Linear warm-up from 0 to ``peak`` over the first ``warmup`` fraction of samples, then linear
    decay to 0 at ``total_samples``. Vectorised over ``samples_seen``."""
    if total_samples <= 0:
        raise ValueError("total_samples must be positive")
    w = min(max(warmup, 0.0), 1.0) * total_samples
    knots = [0.0, w, float(total_samples)] if w > 0 else [0.0, float(total_samples)]
    values = [0.0, peak, 0.0] if w > 0 else [peak, 0.0]
    return np.interp(samples_seen, knots, values)


STEP_SCALE_POWER = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def step_scale_factors(samples_per_step, passes_per_step, step_scale: str) -> np.ndarray:
    """Each step's learning-rate factor under ``step_scale`` (:class:`~mixtrain.MixOptions`):
    (samples / passes) ** k, k = 0, 1/2 or 1. A step of composites carries more samples than
    passes, so it takes fewer, larger steps per epoch for the same samples, as a larger batch would."""
    k = STEP_SCALE_POWER[step_scale]
    samples = np.asarray(samples_per_step, np.float64)
    passes = np.maximum(np.asarray(passes_per_step, np.float64), 1.0)
    return np.ones_like(samples) if k == 0 else (np.maximum(samples, passes) / passes) ** k


def step_lrs(samples_per_step: np.ndarray, seen_before: float, total_samples: float, peak: float, warmup: float):
    """The LR of each step of an epoch: evaluated at the middle of the samples the step carries,
    so a first step never gets LR 0 and a step's LR does not depend on how the epoch is split."""
    ends = seen_before + np.cumsum(samples_per_step, dtype=np.float64)
    mids = ends - np.asarray(samples_per_step, np.float64) / 2.0
    return onecycle_lr(mids, total_samples, peak, warmup)
