"""Scattered cells (``MixOptions.scatter``): for ViTs separated by attention, each constituent keeps
as many patches as its region would have, scattered at random over its whole image and at their own
positions -- packed patch dropout.

The defining property, exactly: a constituent's logits from a scattered composite equal those of
its whole image with only its own patch tokens kept (timm's own modules, no mask).
"""

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mixtrain import Augment, MixOptions, Normalizer, TrainConfig, Trainer, adapt
from mixtrain import plan as P
from mixtrain.batches import EpochBatches
from mixtrain.compose import pool_masks, scattered_pool_masks
from mixtrain.data import from_arrays
from mixtrain.errors import OptionError
from mixtrain.models import create_model
from mixtrain.strategies import create_strategy

PATCH = 4


def _plan(grid, n=14, seed=0):
    """Quads, uneven pairs and singles in four slots, as MixTrain plans an epoch."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)
    items = [P.quads(ids[:8].reshape(2, 4), 4, grid, True),
             P.pairs(ids[8:10], ids[10:12], np.array([0.25, 0.75]), np.array([0, 1]), 4, grid, 0.25),
             P.singles(ids[12:], 4, grid)]
    return P.EpochPlan.concat(items)


def test_scattered_cells_keep_each_slots_cell_count_on_random_cells():
    grid = (8, 8)
    box = torch.from_numpy(_plan(grid).box).long()
    rect = pool_masks(box, grid) > 0
    scat = scattered_pool_masks(box, torch.rand(len(box), 64, generator=torch.Generator().manual_seed(0)), grid)
    cells = scat > 0
    torch.testing.assert_close(cells.sum((-2, -1)), rect.sum((-2, -1)))  # every slot keeps its share of the grid
    assert (cells.sum(1) <= 1).all()  # no cell has two owners
    torch.testing.assert_close(scat.sum((-2, -1))[cells.any((-2, -1))], torch.ones(int(cells.any((-2, -1)).sum())))
    mixed = rect.any((-2, -1)).sum(1) > 1
    assert (cells[mixed] != rect[mixed]).any((-3, -2, -1)).all()  # mixed items are scattered, not rectangles
    # no slot's cells stay in one block: a pair's constituents each reach both halves of the grid
    pair = int(torch.nonzero(rect.any((-2, -1)).sum(1) == 2)[0])
    assert cells[pair, :2, :4].any() and cells[pair, :2, 4:].any()
    # singles stay whole images
    single = rect.any((-2, -1)).sum(1) == 1
    assert cells[single, 0].all()


def test_scattered_composite_shows_each_constituents_own_pixels_on_its_cells():
    grid, size = (4, 4), 16
    plan = _plan(grid)
    images = torch.randint(0, 256, (14, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    norm = Normalizer([0.3, 0.5, 0.4], [0.2, 0.25, 0.3], "cpu")
    eb = EpochBatches(plan, plan.items, grid, "cpu", torch.Generator().manual_seed(3), image_size=(size, size),
                      augment=Augment(pad=0, flip=False), scatter=True)
    batch = eb.batch(0)
    assert batch.geo.scattered
    out = batch.compose(images, norm)
    whole = norm(images)
    owner = batch.geo.pool > 0  # [B, K, gh, gw]
    checked = 0
    for i in range(plan.items):
        for k in range(4):
            if not batch.valid[i, k]:
                continue
            pixels = owner[i, k].repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)  # [H, W]
            src = whole[batch.index[i, k]]
            torch.testing.assert_close(out[i][:, pixels], src[:, pixels], atol=1e-5, rtol=0)
            checked += 1
    assert checked == 14
    # the augmentation's numbers are the same as without scatter (drawn first, from the same generator)
    plain = EpochBatches(plan, plan.items, grid, "cpu", torch.Generator().manual_seed(3), image_size=(size, size),
                         augment=Augment(pad=2, flip=True))
    scat = EpochBatches(plan, plan.items, grid, "cpu", torch.Generator().manual_seed(3), image_size=(size, size),
                        augment=Augment(pad=2, flip=True), scatter=True)
    single = ~(pool_masks(torch.from_numpy(plan.box).long(), grid) > 0).any((-2, -1))[:, 1]
    torch.testing.assert_close(scat.batch(0).geo.lines[single], plain.batch(0).geo.lines[single])


def _alone_with_kept_tokens(net: VisionTransformer, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """timm's ViT on the whole ``image`` with only the patch tokens ``keep [N]`` (no mask)."""
    t = net._pos_embed(net.patch_embed(image[None]))[:, keep]
    t = net.norm_pre(t)
    for blk in net.blocks:
        t = blk(t)
    return net.forward_head(net.norm(t))[0]


@pytest.mark.parametrize("name,size", [("vit_tiny", 32), ("vit_small", 16)])
def test_scattered_composite_gives_each_constituent_its_logits_with_only_its_tokens(name, size):
    torch.manual_seed(0)
    net = create_model(name, 10, 3, size).eval()
    model = adapt(net, size, 3).eval()
    grid = model.grid
    box = torch.from_numpy(_plan(grid).box).long()
    masks = scattered_pool_masks(box, torch.rand(len(box), grid[0] * grid[1]), grid)
    images = torch.randn(14, 3, size, size)
    index = torch.from_numpy(_plan(grid).index).long()
    valid = torch.from_numpy(_plan(grid).valid)
    # the composite: each cell shows the pixels of the constituent that owns it
    owner_px = (masks > 0).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)  # [B, K, H, W]
    x = (owner_px[:, :, None] * images[index]).sum(1)
    with torch.no_grad():
        out = model(x, masks, own_positions=True)
        checked = 0
        for i in range(len(box)):
            for k in range(4):
                if valid[i, k]:
                    keep = (masks[i, k] > 0).flatten()
                    alone = _alone_with_kept_tokens(net, images[index[i, k]], keep)
                    torch.testing.assert_close(out[i, k], alone, atol=3e-5, rtol=1e-4)
                    checked += 1
        assert checked == 14
        # a single (every cell its own) is the plain model on that image
        s = int(torch.nonzero(valid.sum(1) == 1)[0])
        torch.testing.assert_close(out[s, 0], model(images[index[s, 0]][None])[0], atol=3e-5, rtol=1e-4)
        # with regions' positions instead of their own, the same tokens give other logits
        assert (model(x, masks)[~(valid.sum(1) == 1)] - out[~(valid.sum(1) == 1)]).abs().max() > 1e-3


def test_scatter_is_refused_without_attention_separation_or_a_loss_per_constituent():
    with pytest.raises(OptionError, match="scatter needs a method with a loss per constituent"):
        create_strategy("cutmix", 100, (4, 4), 10, "cpu", MixOptions(scatter=True))
    cnn = adapt(create_model("resnet18", 10, 3, 32), 32, 3)
    with pytest.raises(Exception, match="separated by attention"):
        cnn(torch.randn(1, 3, 32, 32), pool_masks(torch.tensor([[[0, 0, 4, 2], [0, 2, 4, 4]]]), (4, 4)),
            own_positions=True)
    data = _digits()
    cfg = TrainConfig(data="tiny", model="digitnet", method="mixtrain", epochs=3, batch_size=32, device="cpu",
                      progress="none", out="", mix=MixOptions(scatter=True))
    with pytest.raises(OptionError, match=r"mix\.scatter needs a ViT separated by attention.*digitnet"):
        Trainer(cfg, data)


def _digits(n_train=192, n_test=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)[..., None]  # 16x16x1
    y = d.target.astype(np.int64)
    return from_arrays("tiny", (x[:n_train], y[:n_train]), (x[n_train : n_train + n_test], y[n_train : n_train + n_test]),
                       "tiny")


def test_a_vit_trains_with_scattered_constituents(tmp_path):
    mix = MixOptions(scatter=True, rule="all", first_unmixed_epochs=1, final_unmixed_epochs=0)
    cfg = TrainConfig(data="tiny", model="vit_tiny", method="mixtrain", epochs=2, batch_size=32, device="cpu",
                      progress="none", out=str(tmp_path), optimizer="adamw", lr=1e-3, mix=mix)
    trainer = Trainer(cfg, _digits())
    assert trainer.strategy.scatter and trainer.model.separates_attention
    rows = trainer.fit()["epochs_log"]
    assert rows[1]["passes"] < rows[0]["passes"]  # the scattered epoch packed samples: fewer passes
    assert all(np.isfinite(r["train_loss"]) for r in rows)


def test_the_own_loop_mixer_and_the_fast_recipe_refuse_scatter():
    from mixtrain import Mixer
    from mixtrain.fast import recipe_mix_options

    with pytest.raises(OptionError, match="Mixer composes rectangular regions only"):
        Mixer(grid=(4, 4), image_size=16, num_samples=64, epochs=3, batch_size=8, opts=MixOptions(scatter=True))
    with pytest.raises(OptionError, match="the fast recipe trains a CNN"):
        recipe_mix_options(scatter=True)
