"""LossMemory: each training sample's latest loss, kept on the training device.

Written from the per-sample losses that every pass computes anyway (single or mixed), so it costs
no extra forward pass and no host synchronisation; read on the host once per epoch to plan.
"""

from __future__ import annotations

import numpy as np
import torch


class LossMemory:
    """Latest per-sample cross-entropy (NaN until first seen) and whether it was classified right.

    Index ``num_samples`` is a scratch slot: writes from empty slots go there, so every update
    has the same fixed shape and no boolean-mask indexing.
    """

    def __init__(self, num_samples: int, device="cpu"):
        self.num_samples = int(num_samples)
        self.loss = torch.full((self.num_samples + 1,), float("nan"), device=device)
        self.correct = torch.zeros(self.num_samples + 1, dtype=torch.bool, device=device)
        self.touched = torch.zeros(self.num_samples + 1, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, index: torch.Tensor, valid: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor):
        """Record ``loss``/``correct`` for ``index`` where ``valid`` (all flat, same length)."""
        slot = torch.where(valid, index, self.num_samples)
        self.loss.index_put_((slot,), loss.detach().float())
        self.correct.index_put_((slot,), correct)
        self.touched.index_put_((slot,), valid)

    @torch.no_grad()
    def all_reduce(self, group=None):
        """Make every rank's memory the union of what the ranks wrote since the last call.

        Each sample is trained on exactly one rank per epoch, so a sum of the touched entries
        (zeros elsewhere) is that rank's value.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            self.touched.zero_()
            return
        t = self.touched.clone()
        t[-1] = False
        payload = torch.stack([torch.where(t, self.loss, 0.0), (t & self.correct).float(), t.float()])
        dist.all_reduce(payload, group=group)
        hit = payload[2] > 0
        # in place: a captured CUDA-graph step keeps writing to these very tensors
        self.loss.copy_(torch.where(hit, payload[0], self.loss))
        self.correct.copy_(torch.where(hit, payload[1] > 0, self.correct))
        # the scratch slot holds whatever each rank's empty slots last wrote: the same on every rank
        self.loss[-1], self.correct[-1] = 0.0, False
        self.touched.zero_()

    def to(self, device) -> "LossMemory":
        """Move the memory to ``device`` (where the logits it records are); returns itself."""
        self.loss, self.correct, self.touched = (t.to(device) for t in (self.loss, self.correct, self.touched))
        return self

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of (loss, correct) for the real samples: one device-to-host copy."""
        n = self.num_samples
        return self.loss[:n].cpu().numpy(), self.correct[:n].cpu().numpy()

    def state_dict(self) -> dict:
        """Host copies of the losses and correctness flags (tensors only)."""
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu()}

    def load_state_dict(self, state: dict):
        """Restore from :meth:`state_dict`; a state of another shape or type raises ``ValueError``."""
        if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k)) for k in ("loss", "correct")):
            raise ValueError("a loss memory state is a dict of two tensors, 'loss' and 'correct'")
        if state["loss"].shape != self.loss.shape or state["correct"].shape != self.correct.shape:
            held = f"{state['loss'].shape[0] - 1} samples" if state["loss"].ndim == 1 else f"shape {list(state['loss'].shape)}"
            raise ValueError(f"loss memory holds {held}, this dataset has {self.num_samples} samples")
        if not state["loss"].is_floating_point() or state["correct"].dtype != torch.bool:
            raise ValueError("a loss memory's 'loss' must be a float tensor and its 'correct' a bool tensor")
        self.loss.copy_(state["loss"])
        self.correct.copy_(state["correct"])
