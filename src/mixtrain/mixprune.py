"""MixPrune: mixtrain with its easiest tier pruned instead of packed four to an image.

What it does: as :class:`~mixtrain.strategies.MixTrain` (hard samples alone, mixable ones in pairs
with the adaptive area ratio and the separated loss), except for the easiest samples, those that
MixTrain packs in quads (classified right with ``p(true) >= quad_confidence`` in their last
pass). Of those, a random ``prune_ratio`` is left out of the epoch, as InfoBatch leaves out easy
samples. The kept ones join the pairs with their loss weighted ``1 / (1 - prune_ratio)``, so the
easy set's expected gradient is unchanged. The first and the final unmixed epochs train on all the
data, unweighted (they play the part of InfoBatch's full-data final stretch).

When it helps: it is the combination that issue 15 proposes. A quad shows each of its samples at
half resolution, which costs accuracy on some models (pairs only was the most accurate setting on
ResNet-18). Pruning skips those samples outright and keeps every trained sample at its pair's
resolution. Measured (ResNet-18, CIFAR-10, 30 epochs, 3 seeds, H200), it does not: the same
1.72x as mixtrain at 0.39 points less accuracy (``benchmarks/results/s8-mixprune-30ep-h200``,
session 8, when the easiest tier began at p(true) >= 0.9; with today's 0.8 it is larger and prunes
more, not yet measured on the GPU); skipping the easiest samples costs more than showing them small.
What it costs: nothing per pass beyond mixtrain's; epochs carry fewer samples, and the trainer
advances the learning-rate schedule by a whole epoch each epoch, as for InfoBatch.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import OptionError
from .memory import LossMemory
from .plan import EpochPlan
from .strategies import MixOptions, MixTrain, _Mixing, choose_mixed


def prune_easiest(easiest: np.ndarray, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, dropped)`` sample ids: a random ``ratio`` of ``easiest`` (rounded) is dropped."""
    order = rng.permutation(easiest)
    n_drop = int(round(ratio * len(order)))
    return order[n_drop:], order[:n_drop]


class MixPrune(MixTrain):
    """MixTrain with the quad tier pruned (see the module docstring)."""

    name = "mixprune"
    prunes = True

    def __init__(self, num_samples, grid, num_epochs, device="cpu", opts: MixOptions | None = None):
        # pairs only (two slots): the easiest tier is pruned, not packed in quads, so a 1x2 grid will do
        _Mixing.__init__(self, num_samples, grid, num_epochs, device, opts)
        if self.opts.interference_margin >= 0:
            raise OptionError("{interference_margin} (the interference watch) is a rule of method mixtrain only; leave it "
                              "at -1 with mixprune, got {got}", got=self.opts.interference_margin)
        self.memory = LossMemory(num_samples, device)

    def plan_epoch(self, epoch, rng) -> EpochPlan:
        if not self.mixing(epoch):
            return _Mixing.plan_epoch(self, epoch, rng)
        o, n = self.opts, self.num_samples
        loss, correct = self.memory.snapshot()
        mixable = choose_mixed(loss, correct, o)
        easiest = np.flatnonzero(mixable & correct & (loss <= -math.log(o.quad_confidence))) \
            if o.quad_confidence > 0 else np.zeros(0, np.int64)
        kept, dropped = prune_easiest(easiest, o.prune_ratio, rng)
        trained = np.ones(n, bool)
        trained[dropped] = False
        plan = self.with_singles([self.pair_items(np.flatnonzero(mixable & trained), loss, rng)], trained, rng)
        if len(kept) and o.prune_ratio > 0:  # InfoBatch's rescaling of the kept easy samples
            plan.weight[np.isin(plan.index, kept) & plan.valid] = 1.0 / (1.0 - o.prune_ratio)
        return plan
