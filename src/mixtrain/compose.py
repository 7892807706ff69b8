"""Augment + compose: the pixels of every constituent into its region, as one batched operation.

Each slot's constituent goes through one axis-aligned resampling (``grid_sample``) that does, at
once, the usual random crop with zero padding (a translation), the horizontal flip, and the
placement into its region -- either a crop of the region's size taken at a random offset (no
resizing distortion) or the whole image downscaled into the region. Translations by whole pixels
land on pixel centres, so bilinear sampling copies pixels exactly there. Regions do not overlap,
so one resampling renders every slot of a composite at once (see :func:`compose_from`).

All random numbers come in ``rand [B, K, R]`` (uniform in [0, 1); R = :func:`rand_width`), drawn once per epoch by the
trainer: the step itself draws nothing, has fixed shapes and never waits for the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MixtrainError


@dataclass(frozen=True)
class Augment:
    """Per-constituent augmentation: random crop with ``pad`` pixels of zero padding, random flip,
    and (with ``scale``) an ImageNet-style random-resized crop.

    ``scale``: the random-resized crop's range of area fractions of the source image (``None``:
    off); ``ratio``: its range of aspect ratios (width / height). As in torchvision's
    ``RandomResizedCrop``: up to ten draws of (area, log-uniform aspect) until the window fits the
    image, else the whole image clipped to the ratio range; integer window, uniform position. The
    window then plays the role of the whole image for the region placement, so singles and
    composites take the same path and a constituent costs no extra pass over its pixels.
    """

    pad: int = 4
    flip: bool = True
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


RRC_TRIES = 10  # draws of (area, aspect) before the fallback, as torchvision's RandomResizedCrop
RAND_BASE = 5  # uniform draws per slot without the random-resized crop (offset y/x, shift y/x, flip)


def rand_width(augment: Augment) -> int:
    """Uniform draws per slot that :func:`geometry` reads for ``augment``."""
    return RAND_BASE + (2 * RRC_TRIES + 2 if augment.scale is not None else 0)


def rrc_windows(rand: torch.Tensor, src_size: tuple[int, int], scale, ratio) -> torch.Tensor:
    """Random-resized crop windows ``[..., 4]`` (top, left, height, width in source pixels).

    ``rand [..., 2 * RRC_TRIES + 2]``: per try an area and an aspect draw, then the top and left
    draws. The first try whose window fits wins (torchvision's loop, vectorised); if none does,
    the whole image, clipped to the ratio range, centred.
    """
    hs, ws = src_size
    area = float(hs * ws)
    tries = rand[..., : 2 * RRC_TRIES].unflatten(-1, (RRC_TRIES, 2))
    target = area * (scale[0] + tries[..., 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + tries[..., 1] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= ws) & (h > 0) & (h <= hs)
    first = torch.argmax(fits.to(torch.uint8), -1, keepdim=True)  # first True (0 when none)
    any_fit = fits.any(-1)
    w = torch.gather(w, -1, first).squeeze(-1)
    h = torch.gather(h, -1, first).squeeze(-1)
    in_ratio = ws / hs
    if in_ratio < min(ratio):
        fw, fh = float(ws), float(round(ws / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = float(round(hs * max(ratio))), float(hs)
    else:
        fw, fh = float(ws), float(hs)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u_top, u_left = rand[..., 2 * RRC_TRIES], rand[..., 2 * RRC_TRIES + 1]
    top = torch.where(any_fit, torch.floor(u_top * (hs - h + 1)), torch.floor((hs - h) / 2))
    left = torch.where(any_fit, torch.floor(u_left * (ws - w + 1)), torch.floor((ws - w) / 2))
    return torch.stack([top, left, h, w], -1)


class Normalizer:
    """uint8 pixels -> (x/255 - mean) / std, as one fused multiply-add."""

    def __init__(self, mean, std, device):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = -mean_t / std_t
        self.offset = 255.0 * mean_t  # (x - offset) * scale is the normalised x

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x_uint8.float(), self.scale)

    def scale_into(self, x_offset: torch.Tensor) -> torch.Tensor:
        """``(x - offset)`` pixels ``[B, C, H, W]`` -> normalised, in channels-last layout (one kernel)."""
        out = torch.empty(x_offset.shape, device=x_offset.device, dtype=x_offset.dtype, memory_format=torch.channels_last)
        return torch.mul(x_offset, self.scale, out=out)


def pixel_boxes(box: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Grid-cell boxes ``[..., 4]`` -> pixel boxes (float), boundaries on the grid's cell edges."""
    gh, gw = grid
    h, w = size
    scale = box.new_tensor([h / gh, w / gw, h / gh, w / gw], dtype=torch.float32)
    return torch.round(box.float() * scale)


def affine_params(
    pbox: torch.Tensor, resize: torch.Tensor, rand: torch.Tensor, size: tuple[int, int], augment: Augment,
    src_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Sampling transforms ``theta [..., 2, 3]`` for ``F.affine_grid`` (align_corners=False).

    For an output pixel u inside the region (pixel box y0,x0,y1,x1 of size rh x rw), the point
    read from the original image is  orig = flip(s * (u - x0) + offset) + shift,  where s = 1 and
    offset ~ U{0..W-rw} for a crop, s = W/rw and offset = 0 for a downscale, and shift is the
    random-crop translation in [-pad, pad]. In normalised coordinates this is affine in u.
    """
    if augment.scale is not None:
        return _affine_params_rrc(pbox, resize, rand, size, augment, src_size or size)
    h, w = size
    p = _placement(pbox, resize, rand, size, augment)
    f, sx, sy = p.flip, p.sx, p.sy
    tx = f * sx - f + (2.0 / w) * (f * (p.ox - sx * p.x0) + p.dx)
    ty = sy - 1.0 + (2.0 / h) * (p.oy - sy * p.y0 + p.dy)
    return _theta(f * sx, tx, sy, ty)


@dataclass
class _Placement:
    """Per slot: the region's corner, the scale and offset that place the constituent in it (a
    crop at an offset, or a downscale), the random-crop shift and the flip (-1 or 1)."""

    x0: torch.Tensor
    y0: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    ox: torch.Tensor
    oy: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor
    flip: torch.Tensor


def _placement(pbox, resize, rand, size, augment: Augment) -> _Placement:
    h, w = size
    y0, x0, y1, x1 = pbox.unbind(-1)
    rh = (y1 - y0).clamp_min(1.0)
    rw = (x1 - x0).clamp_min(1.0)
    r_oy, r_ox, r_dy, r_dx, r_flip = rand[..., :RAND_BASE].unbind(-1)
    sy = torch.where(resize, h / rh, torch.ones_like(rh))
    sx = torch.where(resize, w / rw, torch.ones_like(rw))
    oy = torch.where(resize, torch.zeros_like(rh), torch.floor(r_oy * (h - rh + 1)))
    ox = torch.where(resize, torch.zeros_like(rw), torch.floor(r_ox * (w - rw + 1)))
    span = 2 * augment.pad + 1
    dy = torch.floor(r_dy * span) - augment.pad
    dx = torch.floor(r_dx * span) - augment.pad
    f = torch.where(r_flip < 0.5, -1.0, 1.0) if augment.flip else torch.ones_like(rh)
    return _Placement(x0, y0, sx, sy, ox, oy, dx, dy, f)


def _theta(sx, tx, sy, ty) -> torch.Tensor:
    """Axis-aligned transforms ``[..., 2, 3]`` from their x and y scales and offsets."""
    zero = torch.zeros_like(tx)
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1)], -2)


def _affine_params_rrc(pbox, resize, rand, size, augment: Augment, src_size) -> torch.Tensor:
    """:func:`affine_params` with a random-resized crop: the crop window is the "view" that the
    region placement (crop at an offset, or downscale) reads, and the view maps linearly onto the
    window of the source image (of ``src_size``, which may differ from the output ``size``).

    Along x, for an output position p (pixel units, p = u + 1/2): the view position is
    q = A p + B (crop: A = 1, B = ox - x0; downscale: A = W/rw, B = -x0 W/rw; a flip negates and
    adds W), plus the shift d; the source pixel is left + (q + d) * width/W, normalised by the
    source width. The same along y without the flip. Linear in p, so still one line per axis.
    """
    h, w = size
    hs, ws = src_size
    p = _placement(pbox, resize, rand, size, augment)
    top, left, wh, ww = rrc_windows(rand[..., RAND_BASE:], src_size, augment.scale, augment.ratio).unbind(-1)
    # view position q = a p + b: the placement, then the flip
    ax = p.flip * p.sx
    bx = p.flip * (p.ox - p.sx * p.x0) + w * (1 - p.flip) / 2
    ay, by = p.sy, p.oy - p.sy * p.y0
    kx, ky = ww / w, wh / h  # source pixels per view pixel
    # normalised source x = (2 / ws) * (left + kx * (ax * p + bx + dx)) - 1, with p = (x_out + 1) * w / 2
    sx = kx * ax * w / ws
    tx = sx + (2.0 / ws) * (left + kx * (bx + p.dx)) - 1.0
    sy = ky * ay * h / hs
    ty = sy + (2.0 / hs) * (top + ky * (by + p.dy)) - 1.0
    return _theta(sx, tx, sy, ty)


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


def token_owner(present: torch.Tensor) -> torch.Tensor:
    """The region (slot) each cell of the grid belongs to, from ``present [..., K, h, w]`` (a region's
    cells: ``pool_masks > 0``) -> ``[..., h*w]`` (row-major), ``K`` for a cell outside every region
    (for a ViT, those tokens then form a group of their own)."""
    k = present.shape[-3]
    slot = torch.arange(k, device=present.device).view(k, 1, 1)
    return torch.where(present, slot, k).amin(-3).flatten(-2)


def scattered_pool_masks(box: torch.Tensor, cells_rand: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Scattered cells: each slot keeps its region's number of grid cells (so its area share), dealt
    over random cells of the whole grid. ``box [..., K, 4]`` cell boxes, ``cells_rand [..., gh*gw]``
    uniform draws -> averaging weights ``[..., K, gh, gw]`` (each slot's cells / their count).

    The rectangles' owners in row-major order, read through a random permutation (the draws'
    argsort): every arrangement of the same cell counts is equally likely.
    """
    gh, gw = grid
    k = box.shape[-2]
    owner = token_owner(region_masks(box.float(), grid) > 0)  # [..., N], k where no slot
    owner = owner.gather(-1, cells_rand.argsort(-1))
    m = (owner[..., None, :] == torch.arange(k, device=box.device).view(k, 1)).float()
    m = m.unflatten(-1, (gh, gw))
    return m / m.sum((-2, -1), keepdim=True).clamp_min(1.0)


@dataclass
class Geometry:
    """Everything about an item's layout that the step needs, computed for many items at once.

    The sampling transforms have no rotation or shear (crop, flip, placement and downscale are
    separate along each axis), so each slot's is kept as a line of numbers, ``lines [..., K + 1,
    W + H + 1]``: the source x of every output column, the source y of every output row
    (normalised as for ``grid_sample``, align_corners=False) and the slot's depth in the volume of
    :func:`_composite_exclusive`. Entry ``1 + k`` is slot ``k``; entry 0 is a point outside the
    image, read (as zeros) where no region covers a pixel. ``row [..., K, H]`` and ``col [..., K,
    W]`` are pixel weights whose outer product is the slot's weight (its region, times its share
    when blending); ``pool [..., K, gh, gw]`` feature-grid averaging weights. ``scattered``: each
    slot is laid over the whole image and shows on its ``pool`` cells only (patch-sized cells
    scattered at random, for ViTs; see :func:`scattered_pool_masks`), a static flag. ``exclusive``:
    regions do not overlap, so each pixel shows one slot's pixels (every plan but MixUp's blends)
    and one resampling renders all slots; a static flag, part of a step's structure. Computing
    these once per epoch for all items leaves the step a handful of operations.
    """

    lines: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    pool: torch.Tensor
    exclusive: bool = True
    scattered: bool = False

    def __getitem__(self, j) -> "Geometry":
        return Geometry(self.lines[j], self.row[j], self.col[j], self.pool[j], self.exclusive, self.scattered)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.lines, self.row, self.col, self.pool)

    @property
    def xline(self) -> torch.Tensor:
        """Source x of each output column, ``[..., K + 1, W]``."""
        return self.lines[..., : self.col.shape[-1]]

    @property
    def yline(self) -> torch.Tensor:
        """Source y of each output row, ``[..., K + 1, H]``."""
        w = self.col.shape[-1]
        return self.lines[..., w : w + self.row.shape[-1]]


# a source coordinate outside [-1, 1] by more than one pixel: bilinear sampling reads zeros there
_OUTSIDE = -4.0


def sampling_lines(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Axis-aligned sampling transforms ``theta [..., K, 2, 3]`` -> :attr:`Geometry.lines`
    ``[..., K + 1, W + H + 1]``; x and y exactly where ``F.affine_grid(theta, align_corners=False)``
    would place them, then the depth ``(2k + 1) / K - 1`` of slot k; entry 0 outside the image."""
    h, w = size
    k = theta.shape[-3]
    xs = (torch.arange(w, device=theta.device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=torch.float32) * 2 + 1) / h - 1
    xline = theta[..., 0, 0, None] * xs + theta[..., 0, 2, None]
    yline = theta[..., 1, 1, None] * ys + theta[..., 1, 2, None]
    depth = ((torch.arange(k, device=theta.device, dtype=torch.float32) * 2 + 1) / k - 1).expand(*theta.shape[:-2])
    slots = torch.cat([xline, yline, depth[..., None]], -1)
    outside = torch.cat([slots.new_full((w,), _OUTSIDE), slots.new_zeros(h + 1)]).expand(*theta.shape[:-3], 1, w + h + 1)
    return torch.cat([outside, slots], -2)


def geometry(
    box: torch.Tensor,
    resize: torch.Tensor,
    share: torch.Tensor,
    rand: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    augment: Augment = Augment(),
    blend: bool = False,
    src_size: tuple[int, int] | None = None,
    cells_rand: torch.Tensor | None = None,
) -> Geometry:
    """Layout of items ``[..., K]`` (any leading shape) from their plan columns and random draws.

    ``size`` is the output (training) size; ``src_size`` the stored images' size (default: the
    same). They may differ only with a random-resized crop or a downscale, which resample anyway.
    ``cells_rand [..., gh*gw]``: scatter each slot's cells (:func:`scattered_pool_masks`); every
    used slot is then placed over the whole image (its usual crop and flip, never downscaled).
    """
    scattered = cells_rand is not None
    place = box
    if scattered:
        if blend:
            raise MixtrainError("scattered cells need exclusive regions; blends (MixUp) cover the whole image")
        used = (box[..., 2] > box[..., 0]) & (box[..., 3] > box[..., 1])
        place = torch.where(used[..., None], box.new_tensor([0, 0, grid[0], grid[1]]), box)
        resize = torch.zeros_like(resize)
    pbox = pixel_boxes(place, grid, size)
    lines = sampling_lines(affine_params(pbox, resize, rand, size, augment, src_size), size)
    row, col = axis_masks(pbox, size)
    if blend:
        row = row * share[..., None]
    pool = scattered_pool_masks(box, cells_rand, grid) if scattered else pool_masks(box, grid)
    return Geometry(lines, row, col, pool, exclusive=not blend, scattered=scattered)


def _sampling_grid(xline: torch.Tensor, yline: torch.Tensor) -> torch.Tensor:
    """Per-slot lines ``[n, W]``, ``[n, H]`` -> a ``grid_sample`` grid ``[n, H, W, 2]``."""
    n, w = xline.shape
    h = yline.shape[1]
    return torch.stack([xline[:, None, :].expand(n, h, w), yline[:, :, None].expand(n, h, w)], -1)


_WITHIN: dict = {}


def _within_lines(h: int, w: int, device) -> torch.Tensor:
    """``[H, W, 3]``: where pixel (y, x)'s source x, source y and depth lie within a slot's lines
    (made once per size and device, so a step -- and a captured CUDA graph -- reuses it)."""
    key = (h, w, str(device))
    if key not in _WITHIN:
        ys = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w)
        xs = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w)
        _WITHIN[key] = torch.stack([xs, ys + w, torch.full_like(xs, w + h)], -1)
    return _WITHIN[key]


def _composite_exclusive(images: torch.Tensor, src: torch.Tensor, geo: Geometry, normalize: Normalizer) -> torch.Tensor:
    """All slots in one resampling: the K source images as the depth of a volume, and for each
    output pixel the source point of the slot whose region holds it (depth = that slot).

    Trilinear sampling at a slot's exact depth reads that slot alone, so this equals resampling
    every slot over the whole image and keeping each pixel's own -- at a fraction of the work. The
    images are offset by the mean before sampling (zero padding then reads the mean colour, as
    padding a normalised image does) and scaled once, on the composite.
    """
    b, k = src.shape
    h, w = geo.row.shape[-1], geo.col.shape[-1]  # the output size (the source may differ)
    stride = geo.lines.shape[-1]  # W + H + 1
    # where each pixel's (x, y, depth) lie in the item's flattened lines: its owner's entry (the
    # slot 1 + k whose region holds it, 0 where none does, the last where regions overlap) ...
    code = torch.arange(1, k + 1, device=src.device, dtype=geo.row.dtype) * stride
    if geo.scattered:  # the owner of each pixel's grid cell
        cells = ((geo.pool > 0) * code[:, None, None]).amax(1)  # [B, gh, gw]
        gh, gw = cells.shape[-2:]
        ys = torch.arange(h, device=src.device) * gh // h
        xs = torch.arange(w, device=src.device) * gw // w
        owner = cells[:, ys][:, :, xs]  # [B, H, W]
    else:
        owner = ((geo.row * code[:, None])[:, :, :, None] * geo.col[:, :, None, :]).amax(1)  # [B, H, W]
    # ... plus the pixel's column, row, and the depth's place within that entry
    where = (owner[..., None] + _within_lines(h, w, owner.device)).long()
    sampling = torch.gather(geo.lines.reshape(b, -1), 1, where.reshape(b, -1)).view(b, 1, h, w, 3)
    volume = (images[src] - normalize.offset).transpose(1, 2)  # [B, C, K, H, W] (a view)
    out = F.grid_sample(volume, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    return normalize.scale_into(out[:, :, 0])


def _composite_single(images: torch.Tensor, src: torch.Tensor, geo: Geometry, normalize: Normalizer) -> torch.Tensor:
    sampling = _sampling_grid(geo.xline[:, 1], geo.yline[:, 1])
    x = images[src[:, 0]] - normalize.offset
    return normalize.scale_into(F.grid_sample(x, sampling, mode="bilinear", padding_mode="zeros", align_corners=False))


def _composite_weighted(images: torch.Tensor, src: torch.Tensor, geo: Geometry, normalize: Normalizer) -> torch.Tensor:
    """Every slot resampled over the whole image, weighted by its pixel weights and summed (MixUp's
    blends; the reference the exclusive path is tested against)."""
    b, k = src.shape
    c = images.shape[1]
    h, w = geo.row.shape[-1], geo.col.shape[-1]
    x = images[src.reshape(-1)] - normalize.offset
    sampling = _sampling_grid(geo.xline[:, 1:].reshape(b * k, w), geo.yline[:, 1:].reshape(b * k, h))
    x = F.grid_sample(x, sampling, mode="bilinear", padding_mode="zeros", align_corners=False).view(b, k, c, h, w)
    return normalize.scale_into((x * geo.row[:, :, None, :, None] * geo.col[:, :, None, None, :]).sum(1))


def compose_from(images: torch.Tensor, src: torch.Tensor, geo: Geometry, normalize: Normalizer, single: bool = False) -> torch.Tensor:
    """Composites ``[B, C, H, W]`` (channels-last, normalised) from uint8 ``images [M, C, H, W]``.

    ``src [B, K]`` indexes ``images``. With ``single`` (K = 1, whole-image regions) there are no
    regions to resolve; with ``geo.exclusive`` each pixel shows the slot whose region holds it
    (zero where none does); otherwise (blends) the slots' weighted pixels are summed.
    """
    if single and src.shape[1] == 1:
        return _composite_single(images, src, geo, normalize)
    if geo.exclusive:
        return _composite_exclusive(images, src, geo, normalize)
    return _composite_weighted(images, src, geo, normalize)


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
    geo = geometry(box, resize, share, rand, grid, (h, w), augment, blend)  # output size = source size
    return compose_from(images, src, geo, normalize, single=src.shape[1] == 1 and not blend)
