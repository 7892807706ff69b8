"""The defining property of separated pooling, and the model adapter.

For a body with no spatial mixing across region boundaries, one pass on a composite gives each
constituent exactly the prediction the model gives that constituent's region on its own.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixtrain import Augment, MixtrainError, Normalizer, adapt, compose, pool_masks
from mixtrain import plan as P
from mixtrain.models import create_model

H = W = 16


class PointwiseNet(nn.Module):
    """1x1 convolutions and a 4x4 average pooling: 16x16 ends on a 4x4 grid, and no output cell
    sees a pixel outside its own 4x4 window."""

    def __init__(self, in_chans=3, classes=5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Tanh(),
            nn.AvgPool2d(4), nn.Conv2d(8, 12, 1), nn.ReLU(),
        )
        self.fc = nn.Linear(12, classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)


@pytest.mark.parametrize("axis, share_a", [(1, 0.25), (0, 0.25), (1, 0.75), (0, 0.75)])
def test_constituent_predictions_equal_own_region_predictions(axis, share_a):
    torch.manual_seed(0)
    model = adapt(PointwiseNet().double(), H, 3).eval()
    assert model.grid == (4, 4)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8, generator=g)
    plan = P.pairs(np.array([0, 1, 2]), np.array([3, 4, 5]), np.full(3, share_a), np.full(3, axis), 2, model.grid, 0.25)
    t = plan.to_torch("cpu")
    norm = Normalizer([0.4] * 3, [0.25] * 3, "cpu")
    rand = torch.rand(3, 2, 5, generator=g)
    x = compose(images, t["index"], t["box"], t["resize"], t["share"], rand, model.grid, norm, Augment(pad=2, flip=True))
    x = x.double()

    logits = model(x, pool_masks(t["box"], model.grid))  # [3, 2, classes], one body pass
    assert logits.shape == (3, 2, 5)
    cell = H // 4
    for i in range(3):
        for s in range(2):
            y0, x0, y1, x1 = (plan.box[i, s] * cell).tolist()
            own = model(x[i : i + 1, :, y0:y1, x0:x1])[0]  # the model on this region alone
            torch.testing.assert_close(logits[i, s], own, atol=1e-5, rtol=0)
        # the two constituents do get different predictions (the test can tell them apart)
        assert (logits[i, 0] - logits[i, 1]).abs().max() > 1e-3
    # and the per-region prediction is not the whole-composite prediction
    assert (logits[:, 0] - model(x)).abs().max() > 1e-3


def test_full_region_equals_plain_forward():
    torch.manual_seed(0)
    model = adapt(PointwiseNet(), H, 3).eval()
    x = torch.randn(2, 3, H, W)
    box = torch.tensor([[0, 0, 4, 4], [0, 0, 0, 0]]).expand(2, 2, 4)
    out = model(x, pool_masks(box, model.grid))
    torch.testing.assert_close(out[:, 0], model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, size, chans, grid", [("digitnet", 16, 1, (4, 4)), ("resnet18", 32, 3, (4, 4))])
def test_adapter_matches_model_and_reports_grid(name, size, chans, grid):
    torch.manual_seed(0)
    net = create_model(name, 10, chans, size).eval()
    model = adapt(net, size, chans)
    assert model.grid == grid
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)


def test_adapter_vit_tokens():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=7, embed_dim=16, depth=1,
                            num_heads=2, class_token=False, global_pool="avg").eval()
    model = adapt(net, 32, 3, separate_attention=False)  # region pooling only (the masked path: test_vit_separation.py)
    assert model.tokens and model.grid == (8, 8) and not model.separates_attention
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
        f = model.forward_features(x)
        assert f.shape == (2, 16, 8, 8)
        box = torch.tensor([[0, 0, 8, 2], [0, 2, 8, 8]]).expand(2, 2, 4)
        per_region = model(x, pool_masks(box, model.grid))
        # region pooling of patch tokens, then the model's own head
        tokens = net.forward_features(x)  # [2, 64, 16], row-major on the 8x8 grid
        left = tokens.view(2, 8, 8, 16)[:, :, :2].reshape(2, -1, 16)
        torch.testing.assert_close(per_region[:, 0], net.forward_head(left), atol=1e-5, rtol=1e-5)


def test_adapter_rejects_non_spatial_models():
    class Flat(nn.Module):
        def forward_features(self, x):
            return x.flatten(1)

        def forward_head(self, x):
            return x

    with pytest.raises(MixtrainError, match="no spatial body"):
        adapt(Flat(), 8, 3)
    with pytest.raises(MixtrainError, match="forward_features"):
        adapt(nn.Linear(3, 3), 8, 3)
    with pytest.raises(MixtrainError, match="unknown model"):
        create_model("resnet7", 10, 3, 32)
