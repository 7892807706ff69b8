"""InfoBatch: dynamic data pruning with loss rescaling, as a strategy beside the mixing ones.

What it does (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
Pruning", ICLR 2024, from its published description): each epoch, a random fraction ``r`` of the
samples whose latest loss is below the mean of the latest losses is left out; the easy samples
that are kept have their loss scaled by ``1 / (1 - r)``, so the expected gradient of the easy set
is unchanged; from ``prune_until`` of the schedule on (0.875 by default) every epoch uses all the
data, unscaled. Scores are the per-sample losses of the training pass itself (the same loss memory
as mixtrain's): no extra forward pass. Samples not seen yet are never pruned.

When it helps: many samples are easy for much of training, so an epoch can skip part of them.
What it costs: nothing per pass (plain single-image steps); accuracy when ``r`` is too high or the
annealing too late. Epochs carry fewer samples, so the learning-rate schedule (in samples seen)
advances each epoch by a whole epoch's worth whatever was pruned (the trainer normalises each
epoch's progress to the dataset size): the one-cycle schedule still ends with the last epoch.
"""

from __future__ import annotations

import numpy as np

from . import plan as P
from .memory import LossMemory
from .strategies import MixOptions, Strategy


def prune(loss: np.ndarray, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """InfoBatch's choice for one epoch: ``(kept sample ids, their loss weights)``.

    ``loss``: each sample's latest loss (NaN: not seen yet, always kept). Of the samples below the
    mean (of the seen ones), a random ``ratio`` is left out; the rest of them weigh ``1/(1-ratio)``.
    """
    seen = ~np.isnan(loss)
    weight = np.ones(len(loss), np.float32)
    if not seen.any() or ratio == 0:
        return np.arange(len(loss)), weight
    easy = np.flatnonzero(seen & (loss < loss[seen].mean()))
    dropped = rng.permutation(easy)[: int(round(ratio * len(easy)))]
    keep = np.ones(len(loss), bool)
    keep[dropped] = False
    weight[easy] = 1.0 / (1.0 - ratio)
    ids = np.flatnonzero(keep)
    return ids, weight[ids]


class InfoBatch(Strategy):
    """Dynamic data pruning with loss rescaling (see the module docstring)."""

    name = "infobatch"
    uses_memory = True
    prunes = True
    uses_mix_options = True  # prune_ratio, prune_until

    def __init__(self, num_samples, grid, num_epochs, device="cpu", opts: MixOptions | None = None):
        super().__init__(num_samples, grid, num_epochs, device)
        self.opts = opts or MixOptions()
        self.opts.check()
        self.memory = LossMemory(num_samples, device)

    def pruning(self, epoch: int) -> bool:
        return epoch < int(self.opts.prune_until * self.num_epochs)

    def plan_epoch(self, epoch, rng):
        if not self.pruning(epoch):
            return super().plan_epoch(epoch, rng)
        loss, _ = self.memory.snapshot()
        ids, weight = prune(loss, self.opts.prune_ratio, rng)
        order = rng.permutation(len(ids))
        plan = P.singles(ids[order], self.slots, self.grid)
        plan.weight[:, 0] = weight[order]
        return plan

    def observe(self, index, valid, loss, correct):
        self.memory.update(index, valid, loss, correct)

    def sync(self):
        self.memory.all_reduce()

    def options(self) -> dict:
        return {"prune_ratio": self.opts.prune_ratio, "prune_until": self.opts.prune_until}

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
