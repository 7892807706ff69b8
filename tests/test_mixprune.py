"""MixPrune (issue 15's combination): the quad tier pruned InfoBatch-style, the rest as mixtrain."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixtrain import MixOptions, TrainConfig, Trainer, create_strategy
from mixtrain.mixprune import prune_easiest
from test_reliability import crash_then_resume, without_timings

N, GRID = 400, (4, 4)


def test_prune_easiest_drops_a_rounded_random_fraction():
    rng = np.random.default_rng(0)
    kept, dropped = prune_easiest(np.arange(10, 20), 0.25, rng)
    assert len(dropped) == 2 and len(kept) == 8  # round(2.5) == 2
    assert sorted(np.concatenate([kept, dropped]).tolist()) == list(range(10, 20))
    assert len(prune_easiest(np.arange(5), 0.0, rng)[1]) == 0


def _strategy_with_memory(ratio=0.5):
    """Samples 0-99 hard (wrong), 100-199 middle (right, p = 0.6), 200-399 easiest (right, p = 0.95)."""
    s = create_strategy("mixprune", N, GRID, 6, "cpu", MixOptions(prune_ratio=ratio, quad_confidence=0.9))
    p = np.r_[np.full(100, 0.2), np.full(100, 0.6), np.full(200, 0.95)]
    correct = np.r_[np.zeros(100, bool), np.ones(300, bool)]
    s.observe(torch.arange(N), torch.ones(N, dtype=torch.bool), torch.tensor(-np.log(p), dtype=torch.float32),
              torch.from_numpy(correct))
    return s


def test_a_mixed_epoch_prunes_only_the_easiest_and_weighs_the_kept_ones():
    s = _strategy_with_memory(0.5)
    plan = s.plan_epoch(2, np.random.default_rng(0))
    ids = plan.index[plan.valid]
    assert len(ids) == len(set(ids.tolist())) == 300  # each trained sample once; 100 of the 200 easiest left out
    assert set(range(200)) <= set(ids.tolist())  # hard and middle samples are never pruned
    assert plan.index.shape[1] == 2  # pairs at most: no quads
    counts = plan.valid.sum(1)
    hard_alone = {int(plan.index[i, 0]) for i in np.flatnonzero(counts == 1)}
    assert set(range(100)) <= hard_alone  # wrong ones train alone
    w = plan.weight[plan.valid]
    easiest = ids >= 200
    assert np.all(w[easiest] == 2.0) and np.all(w[~easiest] == 1.0)  # 1 / (1 - 0.5)
    assert s.epoch_stats(plan)["pruned_fraction"] == pytest.approx(0.25)


def test_unmixed_epochs_train_everything_unweighted_and_ratio_0_prunes_nothing():
    s = _strategy_with_memory(0.5)
    first = s.plan_epoch(0, np.random.default_rng(0))  # the first epoch is unmixed
    assert sorted(first.index[first.valid].tolist()) == list(range(N)) and np.all(first.weight == 1)
    s0 = _strategy_with_memory(0.0)
    plan = s0.plan_epoch(2, np.random.default_rng(0))
    assert sorted(plan.index[plan.valid].tolist()) == list(range(N)) and np.all(plan.weight[plan.valid] == 1)


def test_mixprune_trains_on_digits_with_fewer_passes_and_samples_and_resumes_exactly(tmp_path):
    def config(out, **kw):
        base = dict(data="digits", model="digitnet", method="mixprune", epochs=6, batch_size=64, lr=0.05, seed=0,
                    device="cpu", out=str(out), progress="none", deterministic=True)
        return TrainConfig(**{**base, **kw})

    ref = Trainer(config(tmp_path / "ref")).fit()
    n = ref["epochs_log"][0]["samples"]
    assert ref["samples"] < 6 * n and ref["passes"] < ref["samples"]  # pruned and mixed
    # a real share pruned (about 0.2 at the peak with today's defaults), none in the final unmixed epoch
    assert max(r["pruned_fraction"] for r in ref["epochs_log"]) > 0.05 and ref["epochs_log"][-1]["pruned_fraction"] == 0
    assert ref["test_accuracy"] > 0.8 and math.isfinite(ref["epochs_log"][-1]["train_loss"])

    resumed = crash_then_resume(lambda **kw: config(tmp_path / "run", checkpoint_every=5, **kw), "epoch 4, step 5")
    assert resumed["test_accuracy"] == ref["test_accuracy"]
    assert without_timings(resumed["epochs_log"]) == without_timings(ref["epochs_log"])
