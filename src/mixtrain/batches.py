"""Fixed-size batches of plan items, resident on the training device.

An epoch's plan is padded to whole batches and moved to the device in one copy; the layout of
every item (sampling transform, region weights, pooling weights) is computed there for the whole
epoch in a few large operations. Each :class:`Batch` is then a set of slices, so a step never
changes shape, never waits for the host, and launches only the work that touches pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .compose import Augment, Geometry, Normalizer, compose_from, geometry, rand_width
from .errors import MixtrainError
from .plan import EpochPlan


@dataclass
class Batch:
    """One step of an :class:`EpochBatches`: ``B`` plan items (passes) of up to ``K`` slots each.

    Fields: ``index [B, K]`` each slot's sample id; ``valid [B, K]`` whether the slot carries a
    sample to train on (empty slots and padding items do not); ``share [B, K]`` its share of the
    composite (area fraction, or blend weight for MixUp); ``geo`` the per-slot sampling transforms,
    region and pooling weights; ``samples`` the samples this step carries (a host int from the
    plan); ``single`` whether every item is one whole image (K = 1, no blending); ``weight [B, K]``
    each slot's weight in the loss (``None``: 1); ``source_size`` the (H, W) of the images
    :meth:`compose` reads (``None``: not checked).

    >>> for batch in batches:                                            # doctest: +SKIP
    ...     logits = model(batch.compose(data.train_x, normalize), batch.pool_masks())
    """

    index: torch.Tensor  # [B, K] sample ids
    valid: torch.Tensor  # [B, K] bool: the slot carries a sample to train on
    share: torch.Tensor  # [B, K] share of the composite (soft-label weight)
    geo: Geometry  # per-slot sampling transforms, region and pooling weights
    samples: int  # samples this batch carries (host int, known from the plan)
    single: bool  # every item is one whole image (K = 1, no blending)
    weight: torch.Tensor | None = None  # [B, K] each slot's weight in the loss (None: 1)
    source_size: tuple[int, int] | None = None  # (H, W) of the images compose() reads; None: unchecked

    def compose(self, images: torch.Tensor, normalize: Normalizer, src: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's images ``[B, C, H, W]`` from uint8 ``images`` indexed by sample id (or by ``src``)."""
        if self.source_size is not None and tuple(images.shape[-2:]) != self.source_size:
            h, w = images.shape[-2:]
            raise MixtrainError(
                f"the images are {h}x{w} but these batches were laid out for {self.source_size[0]}x"
                f"{self.source_size[1]} images: give EpochBatches the data's image_size (and src_size for stored "
                "images of another size), or data= the data source"
            )
        return compose_from(images, self.index if src is None else src, self.geo, normalize, self.single)

    def pool_masks(self) -> torch.Tensor:
        """Per-constituent averaging weights on the feature grid, ``[B, K, gh, gw]``."""
        return self.geo.pool

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Hard labels of every slot, ``[B, K]`` (meaningless where not ``valid``)."""
        return labels[self.index]


class EpochBatches:
    """An epoch's plan as :class:`Batch` es of ``batch_size`` items on ``device``.

    The plan is padded to whole global batches (``batch_size * world``); with ``world > 1`` this
    rank keeps its share of each. ``generator`` (a CPU ``torch.Generator``) draws the augmentation
    randoms, so the numbers are the same on every device and a resumed epoch redraws them exactly.

    ``image_size`` (the training resolution, (H, W)) and ``augment`` (:class:`~mixtrain.Augment`)
    have no defaults: give them, or ``data=`` a data source (:func:`mixtrain.load_data`) whose
    ``image_size``, ``default_augment()`` and ``source_size`` fill whichever is not given.
    ``src_size``: the stored images' size when it differs from ``image_size`` (folder caches).
    ``scatter``: each constituent shows its whole image on random grid cells, as many as its region
    has (:func:`~mixtrain.compose.scattered_pool_masks`; for ViTs separated by attention).

    >>> batches = EpochBatches(plan, 64, model.grid, "cpu", torch.Generator().manual_seed(epoch),
    ...                        data=data)                                 # doctest: +SKIP
    """

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
        image_size: tuple[int, int] | None = None,
        augment: Augment | None = None,
        blend: bool = False,
        src_size: tuple[int, int] | None = None,
        data=None,
        scatter: bool = False,
    ):
        if data is not None:
            image_size = data.image_size if image_size is None else image_size
            augment = data.default_augment() if augment is None else augment
            src_size = data.source_size if src_size is None else src_size
        if image_size is None or augment is None:
            missing = " and ".join(n for n, v in (("image_size", image_size), ("augment", augment)) if v is None)
            raise MixtrainError(
                f"EpochBatches needs {missing}: the training image size (H, W) and the augmentation "
                "(mixtrain.Augment(pad=..., flip=...)), or data= a data source to take them from"
            )
        image_size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(v) for v in image_size)
        pad_rng = pad_rng or np.random.default_rng(0)
        full = plan.padded(batch_size * world, pad_rng, grid)
        self.world = world
        # per global step (all ranks): samples carried and passes (items that carry a sample),
        # for the LR schedule and metrics
        live = full.valid.reshape(-1, world * batch_size, full.slots)
        self.global_samples = live.sum((1, 2))
        self.global_passes = live.any(2).sum(1)
        self.plan = full.shard(rank, world, batch_size) if world > 1 else full
        self.batch_size = batch_size
        self.grid = tuple(grid)
        self.num_batches = self.plan.items // batch_size
        k = self.plan.slots
        mine = self.plan.valid.reshape(self.num_batches, batch_size, k)
        self.local_samples = mine.sum((1, 2))
        self.local_passes = mine.any(2).sum(1)
        self.single = k == 1 and not blend
        t = {name: v.view(self.num_batches, batch_size, *v.shape[1:]) for name, v in self.plan.to_torch(device).items()}
        self.index, self.valid, self.share, self.weight = t["index"], t["valid"], t["share"], t["weight"]
        rand = torch.rand((self.num_batches, batch_size, k, rand_width(augment)), generator=generator)
        rand = rand.to(device, non_blocking=True)
        cells = None
        if scatter:  # drawn after the augmentation's numbers, which stay as without scatter
            cells = torch.rand((self.num_batches, batch_size, self.grid[0] * self.grid[1]), generator=generator)
            cells = cells.to(device, non_blocking=True)
        self.geo = geometry(t["box"], t["resize"], t["share"], rand, self.grid, tuple(image_size), augment, blend,
                            tuple(src_size) if src_size else None, cells)
        self.source_size = tuple(int(v) for v in (src_size or image_size))  # what compose() must be given

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
        """Step ``j`` of this process (slices of the epoch's tensors; nothing is copied)."""
        return Batch(self.index[j], self.valid[j], self.share[j], self.geo[j], int(self.local_samples[j]), self.single,
                     self.weight[j], self.source_size)

    def __iter__(self):
        for j in range(self.num_batches):
            yield self.batch(j)
