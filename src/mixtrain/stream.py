"""Streaming image folders in the order of an epoch plan.

A DataLoader with workers and pinned memory loads, for each step, exactly the distinct samples
that step's items show (workers decode and random-resize-crop to a fixed size); the device then
composes them like resident data, using each slot's position in the loaded batch.
"""

from __future__ import annotations

import numpy as np
import torch

from .plan import box_shows


class _PlanSampler(torch.utils.data.Sampler):
    """Yields one list of dataset indices per step, in step order."""

    def __init__(self, lists):
        self.lists = lists

    def __iter__(self):
        return iter(self.lists)

    def __len__(self):
        return len(self.lists)


def _collate(batch):
    return torch.stack([b[0] for b in batch])


def step_lists(index: np.ndarray, box: np.ndarray) -> tuple[list[list[int]], list[np.ndarray]]:
    """Per step, the distinct samples to load and each slot's position among them.

    ``index [S, B, K]`` and ``box [S, B, K, 4]`` are one epoch's items grouped by step. A slot
    whose box is empty shows nothing (an unused slot): it points at its item's first slot
    instead, so it costs no decode of its own. Padding items show a real image (their box is the
    whole grid) and are loaded like any other.
    """
    ids = np.where(box_shows(box), index, index[..., :1])
    lists, local = [], []
    for step in ids:
        uniq, inverse = np.unique(step, return_inverse=True)
        lists.append(uniq.tolist())
        local.append(inverse.reshape(step.shape).astype(np.int64))
    return lists, local


class FolderStream:
    """``get(j)`` -> (uint8 images ``[M, C, H, W]`` on the device, slot positions ``[B, K]``).

    Steps must be read in order, from ``start`` (a resumed epoch starts mid-way).
    """

    def __init__(self, data, batches, device, workers: int, start: int = 0):
        n, b = batches.num_batches, batches.batch_size
        index = batches.plan.index.reshape(n, b, -1)[start:]
        box = batches.plan.box.reshape(n, b, -1, 4)[start:]
        self.lists, local = step_lists(index, box)
        local = torch.from_numpy(np.stack(local)) if local else torch.zeros(0, b, 1, dtype=torch.int64)
        self.local = local.to(device)  # all steps' slot positions in one copy; a step then takes a view
        self.start = start
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            data.train_set,
            batch_sampler=_PlanSampler(self.lists),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            collate_fn=_collate,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.it = iter(self.loader)
        self.next_j = start

    def get(self, j: int):
        if j != self.next_j:
            raise RuntimeError(f"folder stream read out of order: step {j}, expected {self.next_j}")
        self.next_j += 1
        images = next(self.it).to(self.device, non_blocking=True)
        return images, self.local[j - self.start]

