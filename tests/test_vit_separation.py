"""ViTs separated by attention: the defining property, exactly.

With regions on the patch grid, a masked composite (each constituent's tokens attend only to each
other, with the position embedding resampled to its region's token grid) gives every constituent
the logits the model gives that constituent alone at its own token grid -- computed here
independently by timm itself (``dynamic_img_size=True`` resamples the position embedding).
"""

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mixtrain import adapt, pool_masks
from mixtrain.models import create_model
from mixtrain import plan as P

PATCH = 4


def reference(net: VisionTransformer) -> VisionTransformer:
    """The same weights, free to run at any token grid (timm resamples its position embedding)."""
    kw = dict(img_size=net.patch_embed.img_size, patch_size=PATCH, in_chans=3, num_classes=net.num_classes,
              embed_dim=net.embed_dim, depth=len(net.blocks), num_heads=net.blocks[0].attn.num_heads,
              class_token=False, global_pool="avg", dynamic_img_size=True)
    ref = VisionTransformer(**kw).eval()
    ref.load_state_dict(net.state_dict())
    return ref


def layouts(grid):
    """Singles, pairs split unevenly along both axes, and quads, as cell boxes [items, 4, 4]."""
    a, b = np.array([0]), np.array([1])
    items = [P.singles(np.array([0]), 4, grid),
             P.pairs(a, b, np.array([0.25]), np.array([1]), 4, grid, 0.25),
             P.pairs(a, b, np.array([0.75]), np.array([0]), 4, grid, 0.25),
             P.pairs(a, b, np.array([0.5]), np.array([1]), 4, grid, 0.25),
             P.quads(np.arange(4).reshape(1, 4), 4, grid)]
    return torch.from_numpy(P.EpochPlan.concat(items).box).long()


@pytest.mark.parametrize("name,size", [("vit_tiny", 32), ("vit_small", 24)])
def test_masked_composite_gives_each_constituent_its_logits_alone(name, size):
    torch.manual_seed(0)
    net = create_model(name, 10, 3, size).eval()
    model = adapt(net, size, 3).eval()
    assert model.separates_attention and model.grid == (size // PATCH, size // PATCH)
    ref = reference(net)
    box = layouts(model.grid)
    x = torch.randn(len(box), 3, size, size)
    with torch.no_grad():
        out = model(x, pool_masks(box, model.grid))
        checked = 0
        for i in range(len(box)):
            for k in range(4):
                y0, x0, y1, x1 = (int(v) * PATCH for v in box[i, k])
                if y1 <= y0 or x1 <= x0:
                    continue
                alone = ref(x[i : i + 1, :, y0:y1, x0:x1])  # the constituent's pixels, at its own token grid
                torch.testing.assert_close(out[i, k], alone[0], atol=2e-5, rtol=1e-4)
                checked += 1
        assert checked == 1 + 2 + 2 + 2 + 4
        # a whole-grid single is the plain model
        torch.testing.assert_close(out[0, 0], model(x[:1])[0], atol=2e-5, rtol=1e-4)
        # without the mask (region pooling only) a constituent's logits depend on its neighbour
        pooled = adapt(net, size, 3, separate_attention=False)(x, pool_masks(box, model.grid))
        assert (pooled[1, 0] - out[1, 0]).abs().max() > 1e-3


def test_timm_vits_are_separated_through_the_adapter():
    import timm

    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, class_token=False,
                            global_pool="avg", depth=2).eval()
    model = adapt(net, 64, 3).eval()
    assert model.separates_attention and model.grid == (4, 4)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, class_token=False,
                            global_pool="avg", depth=2, dynamic_img_size=True).eval()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[[0, 0, 4, 1], [0, 1, 4, 4]]])  # a quarter and three quarters
    with torch.no_grad():
        out = model(x, pool_masks(box, model.grid))
        torch.testing.assert_close(out[0, 0], ref(x[:, :, :, :16])[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[0, 1], ref(x[:, :, :, 16:])[0], atol=2e-5, rtol=1e-4)


def test_vits_with_a_class_token_fall_back_to_region_pooling():
    torch.manual_seed(0)
    net = VisionTransformer(img_size=32, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                            class_token=True, global_pool="avg").eval()
    model = adapt(net, 32, 3)
    assert not model.separates_attention  # its class token sees every constituent: no exact separation
    out = model(torch.randn(2, 3, 32, 32), pool_masks(torch.tensor([[0, 0, 8, 4], [0, 4, 8, 8]]).expand(2, 2, 4), (8, 8)))
    assert out.shape == (2, 2, 3) and torch.isfinite(out).all()


def test_masked_path_trains_every_parameter_and_tolerates_uncovered_tokens():
    torch.manual_seed(0)
    model = adapt(create_model("vit_tiny", 4, 3, 16), 16, 3)
    box = torch.tensor([[[0, 0, 4, 2], [0, 2, 2, 4]]])  # cells (2..4, 2..4) belong to no region
    out = model(torch.randn(1, 3, 16, 16), pool_masks(box, model.grid))
    assert torch.isfinite(out).all()  # no fully masked attention row (a token always sees itself)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_mask_is_one_additive_bias_in_the_attention_dtype():
    from mixtrain.models import _attention_dtype, separation_bias, separation_mask

    owner = torch.tensor([[0, 0, 1, 2, 1], [3, 3, 3, 3, 3]])
    bias = separation_bias(owner, torch.float32)
    assert bias.shape == (2, 1, 5, 5) and bias.stride(-2) == 16  # rows padded to the kernels' alignment
    allowed = separation_mask(owner)
    assert (bias[allowed] == 0).all() and torch.isneginf(bias[~allowed]).all()
    assert (bias == 0).any(-1).all()  # no row without a token to attend to
    t = torch.zeros(1, 2, 3)
    assert _attention_dtype(t) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _attention_dtype(t) == torch.bfloat16
        model = adapt(create_model("vit_tiny", 4, 3, 16), 16, 3)
        box = torch.tensor([[[0, 0, 4, 1], [0, 1, 4, 4]]])
        out = model(torch.randn(1, 3, 16, 16), pool_masks(box, model.grid))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
