"""Losses over the samples a batch carries.

Separated loss (MixTrain): every constituent is one sample with its own prediction and hard
label; the batch loss is the mean of per-sample cross-entropies over all samples carried, so each
sample weighs what it weighs in ordinary training. Soft-label loss (naive CutMix/MixUp): one
prediction per composite against the share-weighted mixture of its constituents' labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def separated_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float = 0.0,
    per: str = "samples",
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [B, K, C]``, ``targets``/``valid [B, K]`` -> (batch loss, per-slot loss ``[B, K]``).

    The batch loss is the sum of per-sample losses over the samples carried divided by their
    number (``per="samples"``, the spec: every sample weighs as in ordinary training) or by the
    number of passes (``per="passes"``: a step's gradient grows with the samples it carries, as the
    linear LR-scaling rule would have it for a larger batch). ``weight [B, K]`` scales each
    sample's term (the plan's loss weights; the count is unchanged). The per-slot loss uses
    ``reduction='none'`` (with the same label smoothing, without the weight); empty slots
    contribute nothing. The division is on the device: no host synchronisation.
    """
    b, k, c = logits.shape
    ce = F.cross_entropy(
        logits.reshape(b * k, c).float(), targets.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view(b, k)
    w = valid.float()
    count = w.sum() if per == "samples" else valid.any(1).float().sum()
    if weight is not None:
        w = w * weight
    return (ce * w).sum() / count.clamp_min(1.0), ce


def soft_label_loss(
    logits: torch.Tensor, targets: torch.Tensor, share: torch.Tensor, valid: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``logits [B, C]`` against the mixture ``sum_k share_k * onehot(targets_k)``; mean over items."""
    b, k = targets.shape
    lp = logits.float()
    ce = F.cross_entropy(
        lp[:, None].expand(b, k, lp.shape[-1]).reshape(b * k, -1),
        targets.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(b, k)
    w = share * valid.float()
    per_item = (ce * w).sum(1)
    live = valid.any(1).float()
    return (per_item * live).sum() / live.sum().clamp_min(1.0)


@torch.no_grad()
def sample_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-sample cross-entropy (no smoothing) and correctness, for the loss memory."""
    lf = logits.float()
    nll = torch.logsumexp(lf, -1) - lf.gather(-1, targets[..., None]).squeeze(-1)
    return nll, lf.argmax(-1) == targets
