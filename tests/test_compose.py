"""Augment + compose: every constituent's pixels land in its region, exactly where the rules say."""

import numpy as np
import pytest
import torch

from mixtrain import Augment, Normalizer, compose, pool_masks
from mixtrain import plan as P

H = W = 16
GRID = (4, 4)  # 4-pixel cells
ATOL = 1e-5


def _images(m=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (m, c, H, W), dtype=torch.uint8, generator=g)


def _norm(c=3):
    return Normalizer([0.3, 0.5, 0.4][:c], [0.2, 0.25, 0.3][:c], "cpu")


def _run(images, plan, rand, augment, blend=False):
    t = plan.to_torch("cpu")
    return compose(images, t["index"], t["box"], t["resize"], t["share"], rand, GRID, _norm(images.shape[1]), augment, blend)


def _rand_for(dy=0, dx=0, pad=0, flip=False, oy=0.0, ox=0.0):
    """rand values that give the wanted shift (in [-pad, pad]), flip and crop-offset draws."""
    span = 2 * pad + 1
    return [oy, ox, (dy + pad + 0.5) / span, (dx + pad + 0.5) / span, 0.25 if flip else 0.75]


def test_shape_dtype_layout():
    images = _images(5, 3)
    plan = P.singles(np.arange(5), 2, GRID)
    out = _run(images, plan, torch.rand(5, 2, 5), Augment(pad=2, flip=True))
    assert out.shape == (5, 3, H, W) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k, resize", [(1, False), (2, False), (2, True)])
def test_identity(k, resize):
    # no padding, no flip, whole-image box: the output is the normalised input, whatever rand says
    images = _images(4)
    plan = P.singles(np.array([2, 0, 3, 1]), k, GRID)
    plan.resize[:, 0] = resize
    out = _run(images, plan, torch.rand(4, k, 5), Augment(pad=0, flip=False))
    expected = _norm()(images[[2, 0, 3, 1]])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_flip():
    images = _images(2)
    plan = P.singles(np.array([0, 1]), 1, GRID)
    rand = torch.tensor([[_rand_for(flip=True)], [_rand_for(flip=False)]])
    out = _run(images, plan, rand, Augment(pad=0, flip=True))
    x = _norm()(images)
    torch.testing.assert_close(out[0], x[0].flip(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=ATOL, rtol=0)
    # flip off: the flip draw is ignored
    out = _run(images, plan, rand, Augment(pad=0, flip=False))
    torch.testing.assert_close(out, x, atol=ATOL, rtol=0)


def _shifted(x, dy, dx):
    """out[..., v, u] = x[..., v + dy, u + dx], zero where that falls outside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    ys2, xs2 = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    out[..., ys, xs] = x[..., ys2, xs2]
    return out


@pytest.mark.parametrize("dy, dx", [(0, 3), (0, -2), (4, 0), (-1, 2), (-4, -4)])
def test_crop_shift(dy, dx):
    images = _images(1)
    plan = P.singles(np.array([0]), 1, GRID)
    rand = torch.tensor([[_rand_for(dy, dx, pad=4)]])
    out = _run(images, plan, rand, Augment(pad=4, flip=False))
    expected = _shifted(_norm()(images), dy, dx)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # the pixels that enter are 0 after normalisation, and there are exactly |d| rows/columns of them
    zero_cols = (out[0].abs() < ATOL).all(0).all(0).sum().item()
    zero_rows = (out[0].abs() < ATOL).all(0).all(1).sum().item()
    assert zero_cols == abs(dx)
    assert zero_rows == abs(dy)


def _reference_crop(x, pbox, rand, pad, flip):
    """The crop-mode rule in plain indexing: region pixel (v, u) of a box (y0, x0, y1, x1) reads
    the constituent at row v - y0 + oy + dy and column flip(u - x0 + ox) + dx (zero outside)."""
    c, h, w = x.shape
    y0, x0, y1, x1 = pbox
    r_oy, r_ox, r_dy, r_dx, r_flip = rand
    oy = int(np.floor(r_oy * (h - (y1 - y0) + 1)))
    ox = int(np.floor(r_ox * (w - (x1 - x0) + 1)))
    dy = int(np.floor(r_dy * (2 * pad + 1))) - pad
    dx = int(np.floor(r_dx * (2 * pad + 1))) - pad
    flipped = flip and r_flip < 0.5
    out = torch.zeros(c, y1 - y0, x1 - x0)
    for v in range(y0, y1):
        for u in range(x0, x1):
            q = u - x0 + ox
            col = (w - 1 - q if flipped else q) + dx
            row = v - y0 + oy + dy
            if 0 <= row < h and 0 <= col < w:
                out[:, v - y0, u - x0] = x[:, row, col]
    return out


@pytest.mark.parametrize("axis, share_a", [(1, 0.25), (0, 0.75), (1, 0.5)])
@pytest.mark.parametrize("pad, flip", [(0, False), (2, True)])
def test_pair_regions_crop_mode(axis, share_a, pad, flip):
    images = _images(6)
    a, b = np.array([0, 2, 4]), np.array([1, 3, 5])
    plan = P.pairs(a, b, np.full(3, share_a), np.full(3, axis), 2, GRID, min_share=0.25)
    g = torch.Generator().manual_seed(7)
    rand = torch.rand(3, 2, 5, generator=g)
    rand[0, :, 4] = torch.tensor([0.1, 0.9])  # one flipped constituent and one not, for sure
    out = _run(images, plan, rand, Augment(pad=pad, flip=flip))
    x = _norm()(images)
    cell = H // GRID[0]
    for i in range(3):
        covered = torch.zeros(H, W, dtype=torch.int64)
        for s, sample in enumerate((a[i], b[i])):
            y0, x0, y1, x1 = (plan.box[i, s] * cell).tolist()
            expected = _reference_crop(x[sample], (y0, x0, y1, x1), rand[i, s].tolist(), pad, flip)
            torch.testing.assert_close(out[i, :, y0:y1, x0:x1], expected, atol=ATOL, rtol=0)
            covered[y0:y1, x0:x1] += 1
        assert (covered == 1).all()  # the two regions tile the image
        # a's region has the asked-for share of the image
        area_a = (plan.box[i, 0, 2] - plan.box[i, 0, 0]) * (plan.box[i, 0, 3] - plan.box[i, 0, 1])
        assert area_a / (GRID[0] * GRID[1]) == pytest.approx(share_a)


def test_quads_resize_hold_2x_downscale():
    images = _images(8)
    ids = np.array([[3, 1, 6, 0], [2, 7, 5, 4]])
    plan = P.quads(ids, 4, GRID, resize=True)
    out = _run(images, plan, torch.rand(2, 4, 5), Augment(pad=0, flip=False))
    x = _norm()(images)
    down = torch.nn.functional.avg_pool2d(x, 2)  # [8, C, 8, 8]: 2x2 averages
    for i in range(2):
        for s, (ty, tx) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
            torch.testing.assert_close(out[i, :, ty : ty + 8, tx : tx + 8], down[ids[i, s]], atol=ATOL, rtol=0)


def test_blend_is_weighted_sum():
    images = _images(4)
    lam = np.array([0.3, 0.8], np.float32)
    plan = P.blends(np.array([0, 1]), np.array([2, 3]), lam, 2, GRID)
    out = _run(images, plan, torch.rand(2, 2, 5), Augment(pad=0, flip=False), blend=True)
    x = _norm()(images)
    for i in range(2):
        torch.testing.assert_close(out[i], lam[i] * x[i] + (1 - lam[i]) * x[i + 2], atol=ATOL, rtol=0)


def test_pool_masks_average_each_region():
    box = torch.tensor([[[0, 0, 4, 1], [0, 1, 4, 4], [0, 0, 0, 0]]])
    m = pool_masks(box, GRID)
    assert m.shape == (1, 3, 4, 4)
    torch.testing.assert_close(m.sum((-2, -1)), torch.tensor([[1.0, 1.0, 0.0]]))
    assert (m[0, 0, :, 0] == 0.25).all() and (m[0, 0, :, 1:] == 0).all()
    assert (m[0, 1, :, 1:] == 1 / 12).all() and (m[0, 1, :, 0] == 0).all()


def _mixtrain_like_plan(n, grid, rng, quad_resize=True):
    """Quads, pairs and singles in four slots, shuffled, as MixTrain plans an epoch."""
    ids = rng.permutation(n)
    q, p2, rest = ids[:8], ids[8:14], ids[14:]
    items = [P.quads(q.reshape(2, 4), 4, grid, quad_resize),
             P.pairs(p2[:3], p2[3:], rng.uniform(0.2, 0.8, 3), rng.integers(0, 2, 3), 4, grid, 0.25),
             P.singles(rest, 4, grid)]
    plan = P.EpochPlan.concat(items)
    return plan.take(rng.permutation(plan.items))


@pytest.mark.parametrize("grid, size, quad_resize", [((4, 4), 16, True), ((4, 4), 32, False), ((3, 3), 24, True), ((7, 7), 56, True)])
def test_one_resampling_of_all_slots_matches_each_slot_resampled_alone(grid, size, quad_resize):
    # the step renders every slot with one resampling of a K-deep volume; the reference resamples
    # each slot over the whole image and keeps its region's pixels
    from mixtrain.batches import EpochBatches
    from mixtrain.compose import _composite_weighted

    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, size, size), dtype=torch.uint8, generator=g)
    plan = _mixtrain_like_plan(20, grid, rng, quad_resize)
    aug = Augment(pad=size // 8, flip=True)
    eb = EpochBatches(plan, plan.items, grid, "cpu", torch.Generator().manual_seed(3), image_size=(size, size), augment=aug)
    batch = eb.batch(0)
    assert batch.geo.exclusive
    fast = batch.compose(images, _norm())
    reference = _composite_weighted(images, batch.index, batch.geo, _norm())
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=0)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert (fast != 0).float().mean() > 0.5  # not trivially equal: the images are there (zeros: crop padding)


def test_uncovered_pixels_are_zero_and_the_last_slot_shows_where_regions_overlap():
    images = _images(3)
    plan = P.singles(np.array([0, 1]), 2, GRID)
    plan.box[0, 0] = (0, 0, 2, 4)  # item 0: top half only; the bottom half is covered by no slot
    plan.box[1, 1] = (0, 0, 4, 2)  # item 1: slot 1 (image 2) over the left half of slot 0 (image 1)
    plan.index[1, 1], plan.valid[1, 1] = 2, True
    rand = torch.tensor([[_rand_for()] * 2] * 2)
    out = _run(images, plan, rand, Augment(pad=0, flip=False))
    x = _norm()(images)
    torch.testing.assert_close(out[0, :, :8], x[0, :, :8], atol=ATOL, rtol=0)
    assert (out[0, :, 8:] == 0).all()
    torch.testing.assert_close(out[1, :, :, :8], x[2, :, :, :8], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :, :, 8:], x[1, :, :, 8:], atol=ATOL, rtol=0)
