"""The airbench-class network and the parts of its fast CIFAR-10 recipe, written for mixtrain from
the published description (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024;
the airbench94 recipe). Nothing here is the recipe's code; the numbers are its published ones.

* :class:`AirbenchNet`: a frozen 2x2 patch-whitening convolution (its filters and their negations,
  from the eigenvectors of the training patches' covariance; a trainable bias), GELU, then three
  conv groups (conv 3x3 -> max-pool 2 -> batch-norm -> GELU -> conv 3x3 -> batch-norm -> GELU) of
  widths 64/256/256, identity-initialised convolutions, batch-norm without a trainable scale, and
  a head that pools the final 3x3 grid (max, as published, or average) into a bias-free linear
  layer whose logits are scaled by 1/9. A 32 px image ends on a 3x3 feature grid (32 -> 31 after
  the whitening layer -> 15 -> 7 -> 3).
* :func:`init_whitening`, :func:`recipe_optimizer` (Nesterov SGD with the learning rate and weight
  decay decoupled from momentum and batch size, and a 64x learning rate for batch-norm biases),
  :func:`lr_factor` (linear warm-up then linear decay, in fractions of the training seen),
  :class:`WeightAverage` (the Lookahead-style average of weights), :class:`FlipTranslate`
  (alternating flip and reflect-padded translation of the whole training set, once per epoch) and
  :func:`tta_logits` (test-time flips and one-pixel translations).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (64, 256, 256)
BN_KEEP = 0.6  # weight of the old running statistics in each batch-norm update (torch momentum 0.4)
LOGIT_SCALE = 1.0 / 9.0
WHITEN_EPS = 5e-4


class _ShiftOnlyNorm(nn.BatchNorm2d):
    """Batch-norm with a fixed scale of 1 and a trainable shift."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=1.0 - BN_KEEP)
        self.weight.requires_grad_(False)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    """A bias-free 3x3 convolution whose first ``cin`` output channels start as the identity."""
    conv = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _group(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv3(cin, cout), nn.MaxPool2d(2), _ShiftOnlyNorm(cout), nn.GELU(),
                         _conv3(cout, cout), _ShiftOnlyNorm(cout), nn.GELU())


class AirbenchNet(nn.Module):
    """The airbench-class convnet with timm's ``forward_features``/``forward_head``.

    ``pooling``: ``"max"`` (the published head) or ``"avg"``; :class:`mixtrain.SpatialModel` reads
    it and pools each constituent's region the same way. Call :func:`init_whitening` with training
    images before training: until then the frozen first layer holds random filters.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths=WIDTHS, pooling: str = "max"):
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling = pooling
        self.whiten = nn.Conv2d(in_chans, 2 * in_chans * 4, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()
        chans = (2 * in_chans * 4,) + tuple(widths)
        self.groups = nn.Sequential(*[_group(a, b) for a, b in zip(chans, chans[1:])])
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.num_features = widths[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(F.gelu(self.whiten(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.amax((2, 3)) if self.pooling == "max" else x.mean((2, 3))
        return x if pre_logits else self.fc(x) * LOGIT_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def patches_of(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every ``size`` patch of ``images [N, C, H, W]``, flattened in the conv weight's (C, kh, kw) order."""
    kh, kw = size
    p = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # [N, C, H', W', kh, kw]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * kh * kw)


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = WHITEN_EPS):
    """Set ``conv``'s filters to whiten the patches of ``images`` (normalised, ``[N, C, H, W]``):
    the covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps), largest first, then their
    negations (so that the GELU after it loses nothing)."""
    c, (kh, kw) = conv.in_channels, conv.kernel_size
    p = patches_of(images, (kh, kw))
    cov = p.T @ p / len(p)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    filters = (evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))


def recipe_optimizer(model: nn.Module, lr: float = 11.5, momentum: float = 0.85, weight_decay: float = 0.0153,
                     bias_scale: float = 64.0, batch_size: int = 1024) -> torch.optim.SGD:
    """Nesterov SGD in the recipe's decoupled form, for a loss summed over the batch's samples.

    ``lr`` and ``weight_decay`` are per 1024 samples and independent of ``momentum`` (the step is
    divided by the momentum's gain 1 + 1/(1 - momentum)); batch-norm biases get ``bias_scale``
    times the learning rate and the same decay. Each group keeps its ``base_lr`` for the schedule.
    """
    kilo = 1024 * (1 + 1 / (1 - momentum))
    base, wd = lr / kilo, weight_decay * batch_size / kilo
    norm_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in params if id(p) in norm_ids]
    rest = [p for p in params if id(p) not in norm_ids]
    groups = [dict(params=norm, lr=base * bias_scale, weight_decay=wd / (base * bias_scale), base_lr=base * bias_scale),
              dict(params=rest, lr=base, weight_decay=wd / base, base_lr=base)]
    return torch.optim.SGD(groups, momentum=momentum, nesterov=True)


def lr_factor(fraction, warmup: float = 0.23, start: float = 0.2, end: float = 0.07):
    """The recipe's schedule as a factor of the peak LR at ``fraction`` of the training samples:
    linear from ``start`` to 1 over the first ``warmup``, then linear to ``end``."""
    return np.interp(fraction, [0.0, warmup, 1.0], [start, 1.0, end])


def average_decay(fraction: float) -> float:
    """The weight average's decay at ``fraction`` of training: 0.95^5 * fraction^3 (none early, strong late)."""
    return 0.95**5 * float(fraction) ** 3


class WeightAverage:
    """Lookahead-style averaging: every few steps the slow copy moves toward the network's weights
    (and batch-norm statistics) by ``1 - decay`` and the network is reset to it."""

    def __init__(self, model: nn.Module):
        self.live = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self, decay: float):
        torch._foreach_lerp_(self.slow, self.live, 1.0 - decay)
        for live, slow in zip(self.live, self.slow):
            live.copy_(slow)


class FlipTranslate:
    """The recipe's training augmentation over a resident uint8 set ``[N, C, H, W]``.

    Each image is flipped at random once; every odd epoch shows all of them mirrored (alternating
    flip: each image is seen flipped and unflipped in turn). Each epoch every image is translated by
    up to ``pad`` pixels in each direction, with reflect padding. :meth:`epoch` gives the epoch's
    images (uint8, channels-last), made in one gather on the images' device.
    """

    def __init__(self, images: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = True):
        n = len(images)
        self.pad, self.size = pad, tuple(images.shape[-2:])
        flips = (torch.rand(n, generator=generator) < 0.5).to(images.device) if flip else None
        base = images if flips is None else torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        self.flip = flip
        self.padded = self._reflect_pad(base, pad) if pad else base

    @staticmethod
    def _reflect_pad(x: torch.Tensor, pad: int, chunk: int = 10000) -> torch.Tensor:
        return torch.cat([F.pad(part.float(), (pad,) * 4, mode="reflect").to(torch.uint8) for part in x.split(chunk)])

    def epoch(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        src = self.padded.flip(-1) if (self.flip and epoch % 2 == 1) else self.padded
        n, (h, w) = len(src), self.size
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).to(src.device)
        rows = (shifts[:, :1] + torch.arange(h, device=src.device)).view(n, h, 1)
        cols = (shifts[:, 1:] + torch.arange(w, device=src.device)).view(n, 1, w)
        out = src[torch.arange(n, device=src.device).view(n, 1, 1), :, rows, cols]  # [N, H, W, C]
        return out.permute(0, 3, 1, 2)  # NCHW view of channels-last memory


def tta_views(x: torch.Tensor, level: int = 2) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of the test-time augmentation: level 0 the image, 1 with its mirror
    (1/2 each), 2 also the image translated one pixel up-left and down-right (reflect padding), each
    with its mirror: 1/4 for the image and its mirror, 1/8 for each of the four translated views."""
    if level == 0:
        return [(1.0, x)]
    views = [(0.5, x), (0.5, x.flip(-1))]
    if level == 1:
        return views
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    return ([(0.25, v) for _, v in views]
            + [(0.125, v) for s in shifted for v in (s, s.flip(-1))])


@torch.no_grad()
def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 2) -> torch.Tensor:
    """The weighted mean of ``model``'s logits over :func:`tta_views` of ``x``."""
    out = None
    for weight, view in tta_views(x, level):
        y = model(view).float() * weight
        out = y if out is None else out + y
    return out
