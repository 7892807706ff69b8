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

from .plan import quad_boxes


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


def axis_masks(pbox: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indicators of each box: ``[..., 4]`` -> ``[..., H]``, ``[..., W]`` (float 0/1).

    A box's pixel mask is their outer product; keeping the two factors is H + W numbers per slot
    instead of H * W, small enough to precompute for a whole epoch.
    """
    h, w = size
    ys = torch.arange(h, device=pbox.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=pbox.device, dtype=torch.float32) + 0.5
    my = (ys >= pbox[..., 0:1]) & (ys < pbox[..., 2:3])
    mx = (xs >= pbox[..., 1:2]) & (xs < pbox[..., 3:4])
    return my.float(), mx.float()


def region_masks(pbox: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel indicator of each box: ``[..., 4]`` -> ``[..., H, W]`` (float 0/1)."""
    my, mx = axis_masks(pbox, size)
    return my[..., :, None] * mx[..., None, :]


def pool_masks(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-region averaging weights on the feature grid: ``[..., 4]`` -> ``[..., gh, gw]``."""
    m = region_masks(box.float(), grid)
    area = m.sum((-2, -1), keepdim=True).clamp_min(1.0)
    return m / area


@dataclass
class Geometry:
    """Everything about an item's layout that the step needs, computed for many items at once.

    ``theta [..., K, 2, 3]`` sampling transforms; ``row [..., K, H]`` and ``col [..., K, W]`` pixel
    weights whose outer product is the slot's weight (its region, times its share when blending);
    ``pool [..., K, gh, gw]`` feature-grid averaging weights. Computing these once per epoch for
    all items leaves the step a handful of large operations.

    ``windows``: pixel boxes ``(top, left, bottom, right)`` of the last ``len(windows)`` slots, which
    are rendered only inside their window (their ``theta`` maps the window, not the whole image).
    A quad item's slots 2 and 3 are its bottom quadrants, and no other item uses them, so they cost
    a quarter of a full slot each instead of a whole one. A static tuple: part of a step's shapes.
    """

    theta: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    pool: torch.Tensor
    windows: tuple[tuple[int, int, int, int], ...] = ()

    def __getitem__(self, j) -> "Geometry":
        return Geometry(self.theta[j], self.row[j], self.col[j], self.pool[j], self.windows)


def quad_windows(grid: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int, int, int], ...]:
    """Pixel boxes of slots 2 and 3 of a quad item (:func:`mixtrain.plan.quad_boxes`): the
    bottom-left and bottom-right quadrants, with :func:`pixel_boxes`' rounding."""
    cells = torch.tensor(quad_boxes(grid)[2:])
    return tuple(tuple(int(v) for v in b) for b in pixel_boxes(cells, grid, size).long().tolist())


def window_theta(theta: torch.Tensor, window: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Re-express sampling transforms ``[..., 2, 3]`` over a window of the image instead of the
    whole image: the same source point for every output pixel inside the window.

    With align_corners=False, window coordinate u' maps to image coordinate
    u = u' * (ww / W) + (ww + 2 * x0) / W - 1 (likewise for y), so theta' = theta o that map.
    """
    h, w = size
    y0, x0, y1, x1 = window
    ax, ay = (x1 - x0) / w, (y1 - y0) / h
    bx, by = (x1 - x0 + 2 * x0) / w - 1.0, (y1 - y0 + 2 * y0) / h - 1.0
    c0, c1, c2 = theta.unbind(-1)
    return torch.stack([c0 * ax, c1 * ay, c0 * bx + c1 * by + c2], -1)


def geometry(
    box: torch.Tensor,
    resize: torch.Tensor,
    share: torch.Tensor,
    rand: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    augment: Augment = Augment(),
    blend: bool = False,
    windows: tuple[tuple[int, int, int, int], ...] = (),
) -> Geometry:
    """Layout of items ``[..., K]`` (any leading shape) from their plan columns and random draws.

    ``windows``: pixel boxes for the last slots, rendered only there (see :class:`Geometry`).
    """
    pbox = pixel_boxes(box, grid, size)
    theta = affine_params(pbox, resize, rand, size, augment)
    if windows:
        k, first = theta.shape[-3], theta.shape[-3] - len(windows)
        parts = [theta[..., :first, :, :]] + [window_theta(theta[..., s, :, :], win, size).unsqueeze(-3)
                                              for s, win in zip(range(first, k), windows)]
        theta = torch.cat(parts, -3)
    row, col = axis_masks(pbox, size)
    if blend:
        row = row * share[..., None]
    return Geometry(theta, row, col, pool_masks(box, grid), tuple(windows))


def _resample(images: torch.Tensor, src: torch.Tensor, theta: torch.Tensor, normalize: Normalizer,
              out_hw: tuple[int, int]) -> torch.Tensor:
    """Normalised, augmented and placed pixels ``[n, C, *out_hw]`` of the ``n`` images ``src``."""
    n = src.numel()
    x = normalize(images[src.reshape(-1)])
    sampling = F.affine_grid(theta.reshape(n, 2, 3), [n, x.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(x, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)


def compose_from(images: torch.Tensor, src: torch.Tensor, geo: Geometry, normalize: Normalizer, single: bool = False) -> torch.Tensor:
    """Composites ``[B, C, H, W]`` (channels-last) from uint8 ``images [M, C, H, W]``.

    ``src [B, K]`` indexes ``images``. With ``single`` (K = 1, whole-image regions) the region
    weights are skipped. Slots with a window (``geo.windows``) are resampled only inside it and
    added there: regions are exclusive, so each pixel still gets exactly one slot's value.
    """
    b, k = src.shape
    _, c, h, w = images.shape
    if single and k == 1:
        return _resample(images, src, geo.theta, normalize, (h, w)).contiguous(memory_format=torch.channels_last)
    full = k - len(geo.windows)  # slots resampled over the whole image
    x = _resample(images, src[:, :full], geo.theta[:, :full], normalize, (h, w)).view(b, full, c, h, w)
    out = (x * geo.row[:, :full, None, :, None] * geo.col[:, :full, None, None, :]).sum(1)
    for s, (y0, x0, y1, x1) in zip(range(full, k), geo.windows):
        part = _resample(images, src[:, s], geo.theta[:, s], normalize, (y1 - y0, x1 - x0))
        out[:, :, y0:y1, x0:x1] += part * geo.row[:, s, None, y0:y1, None] * geo.col[:, s, None, None, x0:x1]
    return out.contiguous(memory_format=torch.channels_last)


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
    h, w = images.shape[2], images.shape[3]
    geo = geometry(box, resize, share, rand, grid, (h, w), augment, blend)
    return compose_from(images, src, geo, normalize, single=src.shape[1] == 1 and not blend)
