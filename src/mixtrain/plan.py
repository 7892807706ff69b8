"""The epoch plan: which samples train alone, which are packed together, in which regions.

A plan is a table of *items*; each item is one image pushed through the network (one pass) and
carries up to ``K`` constituents (slots). Per item and slot it records the sample index, whether
the slot carries a sample, the slot's region as a box on the model's final feature grid, whether
the constituent is downscaled into its region or cropped to it, its share of the composite
(area fraction, or blend weight for MixUp), and its weight in the loss (1, or for instance
InfoBatch's rescaling of the easy samples it keeps). A plan may carry every training sample once
(mixing) or only some of them (pruning).

Plans are built on the host once per epoch (a few milliseconds for 50k samples) with pure
functions of the loss memory and a seeded generator, so every rank of a distributed run builds
the same plan, and a resumed run rebuilds or reloads it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .errors import MixtrainError


@dataclass
class EpochPlan:
    """One epoch's composition, made on the host before the epoch starts: row ``i`` is one pass
    (one composite or one image alone) with up to ``K`` slots, each a sample, its region on the
    feature grid, its share of the composite and its weight in the loss. Fixed shapes, so the
    step that trains it keeps one shape all epoch."""

    index: np.ndarray  # [I, K] int64 sample ids (any valid id where the slot is empty)
    valid: np.ndarray  # [I, K] bool: the slot carries a sample that is trained on
    box: np.ndarray  # [I, K, 4] int16 (top, left, bottom, right) in feature-grid cells; 0-area = empty
    resize: np.ndarray  # [I, K] bool: downscale the whole constituent into its box (else crop to it)
    share: np.ndarray  # [I, K] float32 share of the composite (area fraction or blend weight)
    weight: np.ndarray  # [I, K] float32 weight of the slot's sample in the loss (1: as in ordinary training)

    @property
    def items(self) -> int:
        """Items (rows) of the plan: passes, padding included."""
        return int(self.index.shape[0])

    @property
    def slots(self) -> int:
        """K: the most samples an item can carry."""
        return int(self.index.shape[1])

    @property
    def passes(self) -> int:
        """Images that carry at least one sample (padding items are not counted)."""
        return int(self.valid.any(1).sum())

    @property
    def samples(self) -> int:
        """Samples the plan trains on (every slot that carries one)."""
        return int(self.valid.sum())

    @property
    def mixed_samples(self) -> int:
        """Samples that share their pass with others."""
        counts = self.valid.sum(1)
        return int(counts[counts > 1].sum())

    def arrays(self) -> dict[str, np.ndarray]:
        """The plan's columns by name (``index``, ``valid``, ``box``, ...)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def take(self, rows) -> "EpochPlan":
        """The plan's items ``rows`` (indices), in that order."""
        # np.take along rows is several times faster than fancy indexing here (planning is host
        # time per epoch, while the GPU waits)
        return EpochPlan(**{k: np.take(v, rows, axis=0) for k, v in self.arrays().items()})

    @staticmethod
    def concat(plans: list["EpochPlan"]) -> "EpochPlan":
        """One plan of the items of ``plans``, in order."""
        return EpochPlan(**{f.name: np.concatenate([getattr(p, f.name) for p in plans]) for f in fields(EpochPlan)})

    def padded(self, multiple: int, rng: np.random.Generator, grid: tuple[int, int]) -> "EpochPlan":
        """Append padding items so the item count is a multiple of ``multiple``.

        Padding items show a random real image (so batch-norm statistics stay natural) but carry
        no sample: they add no loss, no gradient signal of their own, and are not counted.
        """
        extra = (-self.items) % multiple
        if extra == 0:
            return self
        pad = empty_items(extra, self.slots)
        pad.index[:, 0] = rng.integers(0, max(1, int(self.index.max()) + 1), extra)
        pad.box[:, 0] = (0, 0, grid[0], grid[1])
        return EpochPlan.concat([self, pad])

    def shard(self, rank: int, world: int, batch: int) -> "EpochPlan":
        """This rank's items: global batch j is items [j*B*W, (j+1)*B*W), rank r takes the r-th B."""
        n = self.items
        if n % (batch * world):
            raise ValueError("pad the plan to a multiple of batch * world first")
        rows = np.arange(n).reshape(-1, world, batch)[:, rank].reshape(-1)
        return self.take(rows)

    def to_torch(self, device) -> dict[str, torch.Tensor]:
        """The plan's columns as tensors on ``device``."""
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in self.arrays().items()}


def empty_items(n: int, k: int) -> EpochPlan:
    return EpochPlan(
        index=np.zeros((n, k), np.int64),
        valid=np.zeros((n, k), bool),
        box=np.zeros((n, k, 4), np.int16),  # grid cells: small numbers, and an epoch's plan is copied several times
        resize=np.zeros((n, k), bool),
        share=np.zeros((n, k), np.float32),
        weight=np.ones((n, k), np.float32),
    )


# ----------------------------------------------------------------------------------------------
# Building blocks (pure functions)


def singles(ids: np.ndarray, k: int, grid: tuple[int, int]) -> EpochPlan:
    """One item per sample, filling the whole grid."""
    p = empty_items(len(ids), k)
    p.index[:, 0] = ids
    p.valid[:, 0] = True
    p.box[:, 0] = (0, 0, grid[0], grid[1])
    p.share[:, 0] = 1.0
    return p


def split_cells(cells: int, min_share: float) -> tuple[int, int]:
    """Smallest and largest number of cells constituent a may take along an axis of ``cells``."""
    lo = max(1, math.ceil(min_share * cells - 1e-9))
    return lo, cells - lo


def snap_share(share_a: np.ndarray, cells: int, min_share: float) -> np.ndarray:
    """Area share of constituent a -> its number of grid cells along the split axis."""
    lo, hi = split_cells(cells, min_share)
    return np.clip(np.rint(share_a * cells), lo, hi).astype(np.int64)


def pairs(
    a: np.ndarray,
    b: np.ndarray,
    share_a: np.ndarray,
    axis: np.ndarray,
    k: int,
    grid: tuple[int, int],
    min_share: float,
    resize: bool = False,
) -> EpochPlan:
    """Items that pack sample a and sample b side by side.

    ``axis`` 1 splits left|right (along the width), 0 splits top/bottom. ``share_a`` is a's
    desired area share; it is snapped to whole feature-grid cells within ``[min_share, 1-min_share]``.
    """
    gh, gw = grid
    n = len(a)
    p = empty_items(n, k)
    p.index[:, 0], p.index[:, 1] = a, b
    p.valid[:, :2] = True
    p.resize[:, :2] = resize
    axis = np.asarray(axis, np.int64).copy()
    if gw < 2:
        axis[:] = 0
    if gh < 2:
        axis[:] = 1
    cells = np.where(axis == 1, gw, gh)
    ca = np.where(axis == 1, snap_share(share_a, gw, min_share), snap_share(share_a, gh, min_share))
    # a gets the top or left part, b the rest
    p.box[:, 0] = np.stack([np.zeros(n), np.zeros(n), np.where(axis == 1, gh, ca), np.where(axis == 1, ca, gw)], 1)
    p.box[:, 1] = np.stack([np.where(axis == 1, 0, ca), np.where(axis == 1, ca, 0), np.full(n, gh), np.full(n, gw)], 1)
    p.share[:, 0] = ca / cells
    p.share[:, 1] = 1.0 - ca / cells
    return p


def box_shows(box: np.ndarray) -> np.ndarray:
    """Whether each cell box ``[..., 4]`` (top, left, bottom, right) covers any cell; an empty box
    is an unused slot."""
    return (box[..., 2] > box[..., 0]) & (box[..., 3] > box[..., 1])


def quad_boxes(grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Cell boxes of a quad item's four slots: top-left, top-right, bottom-left, bottom-right."""
    gh, gw = grid
    ty, tx = gh // 2, gw // 2
    return [(0, 0, ty, tx), (0, tx, ty, gw), (ty, 0, gh, tx), (ty, tx, gh, gw)]


def quads(ids: np.ndarray, k: int, grid: tuple[int, int], resize: bool = True) -> EpochPlan:
    """Items of four samples on a 2x2 grid of regions (``ids`` is ``[Q, 4]``)."""
    if k < 4:
        raise ValueError("quads need 4 slots")
    gh, gw = grid
    p = empty_items(len(ids), k)
    for s, bx in enumerate(quad_boxes(grid)):
        p.index[:, s] = ids[:, s]
        p.box[:, s] = bx
        p.share[:, s] = (bx[2] - bx[0]) * (bx[3] - bx[1]) / (gh * gw)
    p.valid[:, :4] = True
    p.resize[:, :4] = resize
    return p


def blends(a: np.ndarray, b: np.ndarray, lam: np.ndarray, k: int, grid: tuple[int, int]) -> EpochPlan:
    """MixUp items: both samples over the whole image, weighted ``lam`` and ``1 - lam``."""
    p = empty_items(len(a), k)
    p.index[:, 0], p.index[:, 1] = a, b
    p.valid[:, :2] = True
    p.box[:, :2] = (0, 0, grid[0], grid[1])
    p.share[:, 0] = lam
    p.share[:, 1] = 1.0 - lam
    return p


def check_grid_can_mix(grid: tuple[int, int], quads_too: bool = False):
    gh, gw = grid
    if gh < 2 and gw < 2:
        raise MixtrainError(
            f"the model's final feature grid is {gh}x{gw}: there is no room for two regions; "
            "use a larger input or a model that keeps more spatial resolution"
        )
    if quads_too and (gh < 2 or gw < 2):
        raise MixtrainError(f"the model's final feature grid is {gh}x{gw}: quads need at least 2x2")


def speedup(num_samples: int, passes: int) -> float:
    """Epoch speedup in passes: N / passes (the spec's N / (N - (k-1)/k M))."""
    return num_samples / max(1, passes)
