"""Fixed-size batches of plan items, resident on the training device.

An epoch's plan is padded to whole batches and moved to the device in one copy; each
:class:`Batch` is then a set of slices of those tensors, so a step never changes shape and never
waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .compose import Augment, Normalizer, compose, pool_masks
from .plan import EpochPlan


@dataclass
class Batch:
    index: torch.Tensor  # [B, K] sample ids
    valid: torch.Tensor  # [B, K] bool
    box: torch.Tensor  # [B, K, 4] grid cells
    resize: torch.Tensor  # [B, K] bool
    share: torch.Tensor  # [B, K] float
    rand: torch.Tensor  # [B, K, 5] uniform draws for augmentation
    grid: tuple[int, int]
    samples: int  # samples this batch carries (host int, known from the plan)

    def compose(
        self,
        images: torch.Tensor,
        normalize: Normalizer,
        augment: Augment = Augment(),
        blend: bool = False,
        src: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's images ``[B, C, H, W]`` from uint8 ``images`` indexed by sample id (or ``src``)."""
        return compose(
            images,
            self.index if src is None else src,
            self.box,
            self.resize,
            self.share,
            self.rand,
            self.grid,
            normalize,
            augment,
            blend,
        )

    def pool_masks(self) -> torch.Tensor:
        """Per-constituent averaging weights on the feature grid, ``[B, K, gh, gw]``."""
        return pool_masks(self.box, self.grid)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Hard labels of every slot, ``[B, K]`` (meaningless where not ``valid``)."""
        return labels[self.index]


class EpochBatches:
    """Iterates a padded, sharded plan as :class:`Batch` es of ``batch_size`` items."""

    def __init__(
        self,
        plan: EpochPlan,
        batch_size: int,
        grid: tuple[int, int],
        device,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world: int = 1,
        pad_rng: np.random.Generator | None = None,
    ):
        pad_rng = pad_rng or np.random.default_rng(0)
        full = plan.padded(batch_size * world, pad_rng, grid)
        self.world = world
        # per global step (all ranks): samples carried and passes (items that carry a sample)
        live = full.valid.reshape(-1, world * batch_size, full.slots)
        self.global_samples = live.sum((1, 2))
        self.global_passes = live.any(2).sum(1)
        self.plan = full.shard(rank, world, batch_size) if world > 1 else full
        self.batch_size = batch_size
        self.grid = tuple(grid)
        self.num_batches = self.plan.items // batch_size
        t = self.plan.to_torch(device)
        k = self.plan.slots
        mine = self.plan.valid.reshape(self.num_batches, batch_size, k)
        self.local_samples = mine.sum((1, 2))
        self.local_passes = mine.any(2).sum(1)
        self.t = {name: v.view(self.num_batches, batch_size, *v.shape[1:]) for name, v in t.items()}
        # drawn on the host from a seeded generator: the same numbers on every device, and a
        # resumed epoch redraws them exactly
        self.rand = torch.rand((self.num_batches, batch_size, k, 5), generator=generator).to(device, non_blocking=True)

    def __len__(self):
        return self.num_batches

    def loss_scale(self, j: int, per_pass: bool = False) -> float:
        """Factor for this rank's mean loss of step ``j`` under DDP (1.0 on one process).

        DDP averages the ranks' gradients; ranks carry different numbers of samples in a step
        (composites carry several, padding none), so each rank's mean is rescaled to its share of
        the global mean: then every sample of the global batch weighs the same, as in one process.
        ``per_pass``: for losses averaged over passes (soft-label CutMix/MixUp) instead of samples.
        """
        if self.world == 1:
            return 1.0
        local, total = (self.local_passes, self.global_passes) if per_pass else (self.local_samples, self.global_samples)
        return float(local[j]) * self.world / max(1, int(total[j]))

    def batch(self, j: int) -> Batch:
        t = self.t
        return Batch(
            t["index"][j], t["valid"][j], t["box"][j], t["resize"][j], t["share"][j], self.rand[j], self.grid, int(self.local_samples[j])
        )

    def __iter__(self):
        for j in range(self.num_batches):
            yield self.batch(j)
