"""The model zoo and the SpatialModel adapter: grids, per-constituent predictions, gradients,
token pooling, layouts (NCHW, NHWC, tokens with prefix tokens) and refusals."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixtrain.errors import MixtrainError
from mixtrain.models import MODEL_HELP, MODELS, SpatialModel, adapt, create_model


def split_masks(batch: int, grid, cut: int, axis: int = 1) -> torch.Tensor:
    """Averaging weights ``[B, 2, gh, gw]`` for a split at cell ``cut`` (axis 1: left | right)."""
    gh, gw = grid
    m = torch.zeros(batch, 2, gh, gw)
    if axis == 1:
        m[:, 0, :, :cut] = 1.0
        m[:, 1, :, cut:] = 1.0
    else:
        m[:, 0, :cut] = 1.0
        m[:, 1, cut:] = 1.0
    return m / m.sum((2, 3), keepdim=True)


def first_param(net: nn.Module) -> torch.nn.Parameter:
    return next(p for p in net.parameters() if p.ndim > 1)


def check_two_constituents(model: SpatialModel, size: int, channels: int = 3, classes: int = 10):
    """A composite of two inputs gives two predictions, trains the body, and pools each region."""
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size)
    cut = model.grid[1] // 2
    masks = split_masks(2, model.grid, cut)
    logits = model(x, masks)
    assert logits.shape == (2, 2, classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.reshape(4, classes), torch.tensor([0, 1, 2, 3])).backward()
    g = first_param(model.model).grad  # the body's first weight
    assert g is not None and g.abs().sum() > 0
    # each prediction is the head on the average of the region's features (read in eval mode,
    # so that dropout or batch statistics do not differ between the two computations)
    model.eval()
    with torch.no_grad():
        grid = model.forward_features(x, masks)  # [B, C, gh, gw] (ViTs: of the separated composite)
        assert grid.shape[2:] == model.grid
        left = model.forward_head(grid[:, :, :, :cut].mean((2, 3)))
        right = model.forward_head(grid[:, :, :, cut:].mean((2, 3)))
        got = model(x, masks)
        plain = model(x)
        whole = model.forward_head(model.forward_features(x).mean((2, 3)))
    model.train()
    torch.testing.assert_close(got[:, 0], left, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, 1], right, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, whole, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the two constituents really differ


# ----------------------------------------------------------------------------------------------
# the named models


@pytest.mark.parametrize(
    "name,size,channels,grid",
    [
        ("digitnet", 16, 1, (4, 4)),
        ("resnet18", 32, 3, (4, 4)),
        ("resnet34", 32, 3, (4, 4)),
        ("resnet50", 32, 3, (4, 4)),
        ("mobilenetv2", 32, 3, (4, 4)),
        ("vit_tiny", 32, 3, (8, 8)),  # patch 4: 8x8 tokens
        ("vit_small", 32, 3, (8, 8)),
    ],
)
def test_cifar_models_two_constituents(name, size, channels, grid):
    model = adapt(create_model(name, 10, channels, size), size, channels)
    assert model.grid == grid
    check_two_constituents(model, size, channels)


@pytest.mark.parametrize(
    "name,grid",
    [
        ("resnet18_224", (7, 7)),
        ("resnet34_224", (7, 7)),
        ("resnet50_224", (7, 7)),
        ("mobilenetv2_224", (7, 7)),
        ("vit_tiny_224", (14, 14)),
        ("vit_small_224", (14, 14)),
        ("timm:resnet50", (7, 7)),
        ("timm:vit_tiny_patch16_224", (14, 14)),
        ("timm:swin_tiny_patch4_window7_224", (7, 7)),
    ],
)
def test_imagenet_grids_at_224(name, grid):
    # built on the meta device: shapes only, no memory and no compute
    with torch.device("meta"):
        model = adapt(create_model(name, 1000, 3, 224), 224)
    assert model.grid == grid


@pytest.mark.parametrize("name,grid", [("resnet18_224", (2, 2)), ("mobilenetv2_224", (2, 2)), ("vit_tiny_224", (4, 4))])
def test_imagenet_models_run_on_a_small_input(name, grid):
    model = adapt(create_model(name, 7, 3, 64), 64)
    assert model.grid == grid
    check_two_constituents(model, 64, classes=7)


def test_imagenet_models_take_other_channel_counts():
    model = adapt(create_model("resnet18_224", 5, 1, 64), 64, 1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_model_help_lists_every_name():
    for name in MODELS:
        assert name in MODEL_HELP
    assert "timm:NAME" in MODEL_HELP


def test_unknown_models_are_refused():
    with pytest.raises(MixtrainError, match="unknown model 'resnet19'"):
        create_model("resnet19", 10, 3, 32)
    with pytest.raises(MixtrainError, match="unknown timm model 'no_such_net'"):
        create_model("timm:no_such_net", 10, 3, 32)
    with pytest.raises(MixtrainError, match="unknown timm model"):
        create_model("timm:", 10, 3, 32)


# ----------------------------------------------------------------------------------------------
# ViT token pooling


def tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=6, global_pool="avg")
    args.update(kw)
    return VisionTransformer(**args).eval()


def manual_vit_region_logits(vit, x, rows, cols):
    """Average the region's patch tokens (skipping prefix tokens), then the ViT's norm and head."""
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    gh, gw = vit.patch_embed.grid_size
    patches = tokens.reshape(x.shape[0], gh, gw, -1)
    pooled = patches[:, rows][:, :, cols].mean((1, 2))
    return vit.head(vit.fc_norm(pooled))


@pytest.mark.parametrize("axis", [0, 1])
def test_vit_tiny_pools_each_regions_patch_tokens(axis):
    vit = create_model("vit_tiny", 10, 3, 32).eval()
    assert vit.num_prefix_tokens == 0 and not vit.has_class_token and vit.global_pool == "avg"
    model = adapt(vit, 32, separate_attention=False)  # region pooling only (--vit-separation pooling)
    x = torch.randn(2, 3, 32, 32)
    masks = split_masks(2, model.grid, 3, axis)  # 3 of 8 patch rows/columns, then 5
    with torch.no_grad():
        got = model(x, masks)
        first = (slice(0, 8), slice(0, 3)) if axis == 1 else (slice(0, 3), slice(0, 8))
        second = (slice(0, 8), slice(3, 8)) if axis == 1 else (slice(3, 8), slice(0, 8))
        torch.testing.assert_close(got[:, 0], manual_vit_region_logits(vit, x, *first), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[:, 1], manual_vit_region_logits(vit, x, *second), rtol=1e-4, atol=1e-5)
        # the plain forward is the model's own (average over all patch tokens)
        torch.testing.assert_close(model(x), vit(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(class_token=True), dict(class_token=True, reg_tokens=2), dict(class_token=False, reg_tokens=3)])
def test_vit_prefix_tokens_are_never_pooled(kw):
    vit = tiny_vit(**kw)
    model = adapt(vit, 16)
    assert model.grid == (4, 4) and model.num_prefix_tokens == vit.num_prefix_tokens > 0
    x = torch.randn(3, 3, 16, 16)
    masks = split_masks(3, model.grid, 1, axis=0)
    with torch.no_grad():
        got = model(x, masks)
        torch.testing.assert_close(got[:, 0], manual_vit_region_logits(vit, x, slice(0, 1), slice(0, 4)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[:, 1], manual_vit_region_logits(vit, x, slice(1, 4), slice(0, 4)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), vit(x), rtol=1e-5, atol=1e-6)


def test_class_token_pooling_is_refused():
    with pytest.raises(MixtrainError, match="pools its tokens with 'token'"):
        adapt(tiny_vit(class_token=True, global_pool="token"), 16)
    with pytest.raises(MixtrainError, match="pools its tokens with 'max'"):
        adapt(tiny_vit(global_pool="max"), 16)


def test_timm_vit_is_built_without_class_token():
    # explicit keywords, not a silent fallback: the model really has no class token and averages
    with torch.device("meta"):
        net = create_model("timm:vit_tiny_patch16_224", 10, 3, 32)
    assert net.mixtrain_timm_options == {"img_size": (32, 32), "global_pool": "avg", "class_token": False}
    assert net.num_prefix_tokens == 0 and net.global_pool == "avg"
    with torch.device("meta"):
        assert adapt(net, 32).grid == (2, 2)


def test_timm_model_that_only_pools_its_class_token_is_refused():
    with torch.device("meta"), pytest.raises(MixtrainError, match="cannot be built with global_pool='avg'"):
        create_model("timm:deit_tiny_distilled_patch16_224", 10, 3, 224)


def test_vit_input_not_a_whole_number_of_patches_is_refused():
    with pytest.raises(MixtrainError, match="multiple of 4"):
        adapt(tiny_vit(img_size=18), 18)  # 4 patches of 4 pixels and 2 pixels left over


def test_tokens_off_the_patch_grid_are_refused():
    with torch.device("meta"), pytest.raises(MixtrainError, match="do not lie on a known patch grid.*multiple of 64"):
        adapt(create_model("timm:levit_128s", 10, 3, 224), 224)


# ----------------------------------------------------------------------------------------------
# timm CNNs and NHWC bodies


def test_timm_cnn_runs_with_its_own_head():
    net = create_model("timm:resnet18", 4, 3, 64)
    assert net.mixtrain_timm_options == {"global_pool": "avg"}  # no img_size / class_token for a CNN
    model = adapt(net, 64)
    assert model.grid == (2, 2) and model.layout == "NCHW"
    check_two_constituents(model, 64, classes=4)


def test_nhwc_swin_body():
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=5
    )
    model = adapt(swin, 32)
    assert model.layout == "NHWC" and model.grid == (4, 4)
    check_two_constituents(model, 32, classes=5)
    # the grid view is the NHWC map permuted, not a reshape that scrambles positions
    x = torch.randn(1, 3, 32, 32)
    swin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), swin.forward_features(x).permute(0, 3, 1, 2))


class NHWCNet(nn.Module):
    """An NHWC body that does not declare its output format."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 4, 4)
        self.num_features = c
        self.fc = nn.Linear(c, classes)

    def forward_features(self, x):
        return self.conv(x).permute(0, 2, 3, 1)

    def forward_head(self, x, pre_logits=False):
        x = x.mean((1, 2))
        return x if pre_logits else self.fc(x)


def test_undeclared_nhwc_layout_is_inferred_from_the_channel_count():
    model = adapt(NHWCNet(), (16, 24))
    assert model.layout == "NHWC" and model.grid == (4, 6)
    x = torch.randn(2, 3, 16, 24)
    masks = split_masks(2, model.grid, 2)
    with torch.no_grad():
        got = model(x, masks)
        f = model.model.forward_features(x)
        torch.testing.assert_close(got[:, 0], model.model.fc(f[:, :, :2].mean((1, 2))))
        torch.testing.assert_close(got[:, 1], model.model.fc(f[:, :, 2:].mean((1, 2))))


# ----------------------------------------------------------------------------------------------
# refusals


class FlatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward_features(self, x):
        return self.fc(x.flatten(1))

    def forward_head(self, x, pre_logits=False):
        return x


class MaxPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 4)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits=False):
        x = x.amax((2, 3))
        return x if pre_logits else self.fc(x)


def test_body_without_spatial_output_is_refused():
    with pytest.raises(MixtrainError, match=r"FlatNet has no spatial body: forward_features gives shape \(1, 4\)"):
        adapt(FlatNet(), 8)


def test_head_that_does_not_average_is_refused():
    with pytest.raises(MixtrainError, match="does not average"):
        adapt(MaxPoolNet(), 8)


def test_model_without_timm_methods_is_refused():
    with pytest.raises(MixtrainError, match="no forward_features/forward_head"):
        adapt(nn.Conv2d(3, 3, 1), 8)


def test_model_that_fails_on_the_input_size_is_refused():
    vit = tiny_vit()  # built for 16x16, strict image size
    with pytest.raises(MixtrainError, match="failed on a 3x32x32 input"):
        adapt(vit, 32)


def test_probe_leaves_training_mode_and_rng_alone():
    net = create_model("digitnet", 10, 1, 16).train()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    adapt(net, 16, 1)
    assert net.training
    assert torch.equal(before, torch.get_rng_state())
