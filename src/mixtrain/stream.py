"""Streaming image folders in the order of an epoch plan.

A DataLoader with workers and pinned memory loads, for each step, exactly the distinct samples
that step's items carry (workers decode and random-resize-crop to a fixed size); the device then
composes them like resident data, using each slot's position in the loaded batch.
"""

from __future__ import annotations

import numpy as np
import torch


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, lists):
        self.lists = lists

    def __iter__(self):
        return iter(self.lists)

    def __len__(self):
        return len(self.lists)


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    return images


class FolderStream:
    """``get(j)`` -> (uint8 images ``[M, C, H, W]`` on the device, slot positions ``[B, K]``)."""

    def __init__(self, data, batches, device, workers: int, start: int = 0):
        index = batches.plan.index.reshape(batches.num_batches, batches.batch_size, -1)
        self.lists, self.local = [], []
        for j in range(start, batches.num_batches):
            uniq, inverse = np.unique(index[j], return_inverse=True)
            self.lists.append(uniq.tolist())
            self.local.append(torch.from_numpy(inverse.reshape(index[j].shape).astype(np.int64)))
        self.start = start
        self.device = device
        pin = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            data.train_set,
            batch_sampler=_PlanSampler(self.lists),
            num_workers=workers,
            pin_memory=pin,
            collate_fn=_collate,
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )
        self.it = iter(self.loader)
        self.next_j = start

    def get(self, j: int):
        if j != self.next_j:
            raise RuntimeError("folder stream read out of order")
        self.next_j += 1
        images = next(self.it).to(self.device, non_blocking=True)
        src = self.local[j - self.start].to(self.device, non_blocking=True)
        return images, src
