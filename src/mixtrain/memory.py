"""LossMemory: each training sample's latest loss, kept on the training device.

Written from the per-sample losses that every pass computes anyway (single or mixed), so it costs
no extra forward pass and no host synchronisation; read on the host once per epoch to plan.
"""

from __future__ import annotations

import numpy as np
import torch


class LossMemory:
    """Latest per-sample cross-entropy (NaN until first seen) and whether it was classified right.

    With ``tiers=True`` it also keeps, per sample, the tier of its latest pass (0 alone, 1 in a
    pair, 2 in a quad; -1 not seen) and its latest loss alone (NaN until seen alone): what the
    interference watch compares. Both are written with the loss, in the step, so they always
    describe the passes that really ran (an epoch cut short included).

    Index ``num_samples`` is a scratch slot: writes from empty slots go there, so every update
    has the same fixed shape and no boolean-mask indexing.
    """

    def __init__(self, num_samples: int, device="cpu", tiers: bool = False):
        self.num_samples = n = int(num_samples)
        self.loss = torch.full((n + 1,), float("nan"), device=device)
        self.correct = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.touched = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.tier = torch.full((n + 1,), -1, dtype=torch.int8, device=device) if tiers else None
        self.alone_loss = torch.full((n + 1,), float("nan"), device=device) if tiers else None

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor an update writes (what a CUDA-graph capture must restore)."""
        return [t for t in (self.loss, self.correct, self.touched, self.tier, self.alone_loss) if t is not None]

    @torch.no_grad()
    def update(self, index: torch.Tensor, valid: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor,
               tier: torch.Tensor | None = None):
        """Record ``loss``/``correct`` for ``index`` where ``valid`` (all flat, same length);
        ``tier``: the tier of each slot's pass (int8; None: passes alone)."""
        slot = torch.where(valid, index, self.num_samples)
        loss = loss.detach().float()
        self.loss.index_put_((slot,), loss)
        self.correct.index_put_((slot,), correct)
        self.touched.index_put_((slot,), valid)
        if self.tier is not None:
            tier = torch.zeros_like(slot, dtype=torch.int8) if tier is None else tier.to(torch.int8)
            self.tier.index_put_((slot,), tier)
            alone = torch.where(valid & (tier == 0), index, self.num_samples)
            self.alone_loss.index_put_((alone,), loss)

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
        rows = [torch.where(t, self.loss, 0.0), (t & self.correct).float(), t.float()]
        if self.tier is not None:
            rows.append(torch.where(t, self.tier.float(), 0.0))
        payload = torch.stack(rows)
        dist.all_reduce(payload, group=group)
        hit = payload[2] > 0
        # in place: a captured CUDA-graph step keeps writing to these very tensors
        self.loss.copy_(torch.where(hit, payload[0], self.loss))
        self.correct.copy_(torch.where(hit, payload[1] > 0, self.correct))
        if self.tier is not None:
            # a sample's last pass was on one rank: alone there, its loss is also its loss alone
            # clamped: a sample two ranks trained in one epoch (a loop against the rules) stays a valid tier
            self.tier.copy_(torch.where(hit, payload[3].clamp(max=2).to(torch.int8), self.tier))
            self.alone_loss.copy_(torch.where(hit & (self.tier == 0), self.loss, self.alone_loss))
            self.tier[-1], self.alone_loss[-1] = 0, 0.0
        # the scratch slot holds whatever each rank's empty slots last wrote: the same on every rank
        self.loss[-1], self.correct[-1] = 0.0, False
        self.touched.zero_()

    def to(self, device) -> "LossMemory":
        """Move the memory to ``device`` (where the logits it records are); returns itself."""
        self.loss, self.correct, self.touched = (t.to(device) for t in (self.loss, self.correct, self.touched))
        if self.tier is not None:
            self.tier, self.alone_loss = self.tier.to(device), self.alone_loss.to(device)
        return self

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of (loss, correct) for the real samples: one device-to-host copy."""
        n = self.num_samples
        return self.loss[:n].cpu().numpy(), self.correct[:n].cpu().numpy()

    def tiers(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of (tier of the latest pass, latest loss alone) for the real samples."""
        n = self.num_samples
        return self.tier[:n].cpu().numpy(), self.alone_loss[:n].cpu().numpy()

    def state_dict(self) -> dict:
        """Host copies of the losses and correctness flags (and tiers, when kept): tensors only."""
        state = {"loss": self.loss.cpu(), "correct": self.correct.cpu()}
        if self.tier is not None:
            state.update(tier=self.tier.cpu(), alone_loss=self.alone_loss.cpu())
        return state

    def load_state_dict(self, state: dict):
        """Restore from :meth:`state_dict`; a state of another shape or type raises ``ValueError``."""
        if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k)) for k in ("loss", "correct")):
            raise ValueError("a loss memory state is a dict of two tensors, 'loss' and 'correct'")
        if state["loss"].shape != self.loss.shape or state["correct"].shape != self.correct.shape:
            held = f"{state['loss'].shape[0] - 1} samples" if state["loss"].ndim == 1 else f"shape {list(state['loss'].shape)}"
            raise ValueError(f"loss memory holds {held}, this dataset has {self.num_samples} samples")
        if not state["loss"].is_floating_point() or state["correct"].dtype != torch.bool:
            raise ValueError("a loss memory's 'loss' must be a float tensor and its 'correct' a bool tensor")
        tiers = self._checked_tiers(state) if self.tier is not None else None
        self.loss.copy_(state["loss"])
        self.correct.copy_(state["correct"])
        if self.tier is not None:  # a state kept without tiers: nothing known yet of passes alone
            self.tier.copy_(tiers[0] if tiers else torch.full_like(self.tier, -1))
            self.alone_loss.copy_(tiers[1] if tiers else torch.full_like(self.alone_loss, float("nan")))

    def _checked_tiers(self, state: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``state``'s tier and loss-alone tensors, checked (None: it holds neither)."""
        if "tier" not in state and "alone_loss" not in state:
            return None
        tier, alone = state.get("tier"), state.get("alone_loss")
        if not (torch.is_tensor(tier) and torch.is_tensor(alone)) or tier.shape != self.tier.shape \
                or alone.shape != self.alone_loss.shape:
            raise ValueError(f"a loss memory's tiers are two tensors, 'tier' and 'alone_loss', of {self.num_samples + 1} "
                             "entries (one per sample and a scratch slot)")
        if tier.dtype != torch.int8 or not alone.is_floating_point() or not ((tier >= -1) & (tier <= 2)).all():
            raise ValueError("a loss memory's 'tier' must be an int8 tensor of -1, 0, 1 or 2 and its 'alone_loss' a "
                             "float tensor")
        return tier, alone
