"""Augment + compose: the pixels of every constituent into its region, as one batched operation.

Each slot's constituent goes through one affine resampling (``affine_grid`` + ``grid_sample``)
that does, at once, the usual random crop with zero padding (a translation), the horizontal
flip, and the placement into its region -- either a crop of the region's size taken at a random
offset (no resizing distortion) or the whole image downscaled into the region. Translations by
whole pixels land on pixel centres, so bilinear sampling copies pixels exactly there.

All random numbers come in ``rand [B, K, 5]`` (uniform in [0, 1)), drawn once per epoch by the
trainer: the step itself draws nothing, has fixed shapes and never waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Per-constituent augmentation: random crop with ``pad`` pixels of zero padding, random flip."""

    pad: int = 4
    flip: bool = True


class Normalizer:
    """uint8 pixels -> (x/255 - mean) / std, as one fused multiply-add."""

    def __init__(self, mean, std, device):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = -mean_t / std_t

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x_uint8.float(), self.scale)


def pixel_boxes(box: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Grid-cell boxes ``[..., 4]`` -> pixel boxes (float), boundaries on the grid's cell edges."""
    gh, gw = grid
    h, w = size
    scale = box.new_tensor([h / gh, w / gw, h / gh, w / gw], dtype=torch.float32)
    return torch.round(box.float() * scale)


def affine_params(
    pbox: torch.Tensor, resize: torch.Tensor, rand: torch.Tensor, size: tuple[int, int], augment: Augment
) -> torch.Tensor:
    """Sampling transforms ``theta [..., 2, 3]`` for ``F.affine_grid`` (align_corners=False).

    For an output pixel u inside the region (pixel box y0,x0,y1,x1 of size rh x rw), the point
    read from the original image is  orig = flip(s * (u - x0) + offset) + shift,  where s = 1 and
    offset ~ U{0..W-rw} for a crop, s = W/rw and offset = 0 for a downscale, and shift is the
    random-crop translation in [-pad, pad]. In normalised coordinates this is affine in u.
    """
    h, w = size
    y0, x0, y1, x1 = pbox.unbind(-1)
    rh = (y1 - y0).clamp_min(1.0)
    rw = (x1 - x0).clamp_min(1.0)
    r_oy, r_ox, r_dy, r_dx, r_flip = rand.unbind(-1)
    sy = torch.where(resize, h / rh, torch.ones_like(rh))
    sx = torch.where(resize, w / rw, torch.ones_like(rw))
    oy = torch.where(resize, torch.zeros_like(rh), torch.floor(r_oy * (h - rh + 1)))
    ox = torch.where(resize, torch.zeros_like(rw), torch.floor(r_ox * (w - rw + 1)))
    span = 2 * augment.pad + 1
    dy = torch.floor(r_dy * span) - augment.pad
    dx = torch.floor(r_dx * span) - augment.pad
    f = torch.where(r_flip < 0.5, -1.0, 1.0) if augment.flip else torch.ones_like(rh)
    tx = f * sx - f + (2.0 / w) * (f * (ox - sx * x0) + dx)
    ty = sy - 1.0 + (2.0 / h) * (oy - sy * y0 + dy)
    zero = torch.zeros_like(tx)
    row_x = torch.stack([f * sx, zero, tx], -1)
    row_y = torch.stack([zero, sy, ty], -1)
    return torch.stack([row_x, row_y], -2)


def region_masks(pbox: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel indicator of each box: ``[B, K, 4]`` -> ``[B, K, H, W]`` (float 0/1)."""
    h, w = size
    ys = torch.arange(h, device=pbox.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=pbox.device, dtype=torch.float32) + 0.5
    my = (ys >= pbox[..., 0:1]) & (ys < pbox[..., 2:3])
    mx = (xs >= pbox[..., 1:2]) & (xs < pbox[..., 3:4])
    return (my[..., :, None] & mx[..., None, :]).float()


def pool_masks(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-region averaging weights on the feature grid: ``[B, K, 4]`` -> ``[B, K, gh, gw]``."""
    m = region_masks(box.float(), grid)
    area = m.sum((-2, -1), keepdim=True).clamp_min(1.0)
    return m / area


def compose(
    images: torch.Tensor,
    src: torch.Tensor,
    box: torch.Tensor,
    resize: torch.Tensor,
    share: torch.Tensor,
    rand: torch.Tensor,
    grid: tuple[int, int],
    normalize: Normalizer,
    augment: Augment = Augment(),
    blend: bool = False,
) -> torch.Tensor:
    """Build ``B`` composite images from uint8 ``images [M, C, H, W]``.

    ``src [B, K]`` indexes ``images``; ``box [B, K, 4]`` are grid-cell regions (empty for unused
    slots); ``resize``/``share``/``rand`` are per slot. With ``blend`` (MixUp) every slot covers
    its box with weight ``share`` instead of an exclusive region. Returns normalised float
    ``[B, C, H, W]`` in channels-last layout.
    """
    b, k = src.shape
    _, c, h, w = images.shape
    x = normalize(images[src.reshape(-1)])  # [B*K, C, H, W]
    pbox = pixel_boxes(box, grid, (h, w))
    theta = affine_params(pbox, resize, rand, (h, w), augment).reshape(b * k, 2, 3)
    sampling = F.affine_grid(theta, [b * k, c, h, w], align_corners=False)
    x = F.grid_sample(x, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x.view(b, k, c, h, w)
    if k == 1 and not blend:
        out = x[:, 0]
    else:
        weight = region_masks(pbox, (h, w))
        if blend:
            weight = weight * share[..., None, None]
        out = (x * weight[:, :, None]).sum(1)
    return out.contiguous(memory_format=torch.channels_last)
