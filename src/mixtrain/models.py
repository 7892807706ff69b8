"""Models behind ``--model NAME``, and the adapter that splits any of them into body and head.

Every model here follows timm's convention: ``forward_features(x)`` returns the body's final
spatial features and ``forward_head(x)`` pools them and classifies. :class:`SpatialModel` is the
only place in mixtrain that knows a model's internals: it turns the body's output into a grid
``[B, C, h, w]`` (CNN feature maps as they are; ViT patch tokens laid back on their patch grid),
pools it per region, and applies the shared head to each pooled vector.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MixtrainError

# ----------------------------------------------------------------------------------------------
# CIFAR-style ResNets (3x3 stem, no max-pool): a 32x32 input ends on a 4x4 grid.


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block, layers, num_classes=10, in_chans=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        cin, stages = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.layers(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class DigitNet(nn.Module):
    """A small CNN for 16x16 digits: three 3x3 stages ending on a 4x4 grid."""

    def __init__(self, num_classes=10, in_chans=1, width=32):
        super().__init__()

        def cbr(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(*cbr(in_chans, w, 1), *cbr(w, 2 * w, 2), *cbr(2 * w, 4 * w, 2), *cbr(4 * w, 4 * w, 1))
        self.num_features = 4 * w
        self.fc = nn.Linear(4 * w, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits: bool = False):
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _timm_vit(width: str, num_classes, in_chans, image_size):
    from timm.models.vision_transformer import VisionTransformer

    dims = {"tiny": (192, 3), "small": (384, 6)}[width]
    # Patch 4 on 32x32 gives an 8x8 token grid. No class token: each constituent's prediction
    # comes from the average of its own patch tokens, never from a token that saw all of them.
    return VisionTransformer(
        img_size=image_size,
        patch_size=4 if image_size <= 64 else 16,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dims[0],
        depth=12,
        num_heads=dims[1],
        class_token=False,
        global_pool="avg",
    )


def _cifar_mobilenetv2(num_classes, in_chans, image_size):
    from torchvision.models import MobileNetV2

    # torchvision's MobileNetV2 with the CIFAR strides: stem stride 1 and the second stage at
    # stride 1, so 32x32 ends on 4x4 as the CIFAR ResNets do.
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    m = MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    if in_chans != 3:
        old = m.features[0][0]
        m.features[0][0] = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
    else:
        m.features[0][0].stride = (1, 1)
    return _TorchvisionBody(m.features, m.classifier)


class _TorchvisionBody(nn.Module):
    """Gives a torchvision ``features``/``classifier`` model timm's two methods."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


MODELS = {
    "digitnet": lambda nc, ic, s: DigitNet(nc, ic),
    "resnet18": lambda nc, ic, s: CifarResNet(BasicBlock, (2, 2, 2, 2), nc, ic),
    "resnet34": lambda nc, ic, s: CifarResNet(BasicBlock, (3, 4, 6, 3), nc, ic),
    "resnet50": lambda nc, ic, s: CifarResNet(Bottleneck, (3, 4, 6, 3), nc, ic),
    "mobilenetv2": lambda nc, ic, s: _cifar_mobilenetv2(nc, ic, s),
    "vit_tiny": lambda nc, ic, s: _timm_vit("tiny", nc, ic, s),
    "vit_small": lambda nc, ic, s: _timm_vit("small", nc, ic, s),
}

MODEL_HELP = (
    f"{', '.join(MODELS)} (CIFAR-style: full resolution stem, 32x32 ends on a 4x4 grid; "
    "ViTs use 4x4 patches at 32 px), or timm:NAME for any timm model whose body gives a "
    "spatial feature map or patch tokens (e.g. timm:resnet50 at 224 px, no pretrained weights)"
)


def check_model_name(name: str):
    """Fail early (before any data loads) on a model name that :func:`create_model` cannot build."""
    if name.startswith("timm:"):
        if not name[5:]:
            raise MixtrainError("timm: needs a model name, e.g. --model timm:resnet50")
        return  # checked by timm itself when the model is created
    if name not in MODELS:
        raise MixtrainError(f"unknown model {name!r}; choose from {MODEL_HELP}")


def create_model(name: str, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """Build ``name`` (see :data:`MODEL_HELP`), untrained."""
    if name.startswith("timm:"):
        import timm

        tname = name[5:]
        if not timm.is_model(tname):
            raise MixtrainError(f"unknown timm model {tname!r} (see timm.list_models())")
        kwargs = dict(num_classes=num_classes, in_chans=in_chans, pretrained=False)
        try:
            return timm.create_model(tname, img_size=image_size, global_pool="avg", class_token=False, **kwargs)
        except TypeError:
            return timm.create_model(tname, **kwargs)
    if name not in MODELS:
        raise MixtrainError(f"unknown model {name!r}; choose from {MODEL_HELP}")
    return MODELS[name](num_classes, in_chans, image_size)


# ----------------------------------------------------------------------------------------------
# The adapter


class SpatialModel(nn.Module):
    """A classifier seen as body -> (region) pooling -> head.

    ``forward(x)`` is the plain model (global average pooling). ``forward(x, pool_masks)`` with
    ``pool_masks [B, K, h, w]`` (each region's indicator divided by its area) returns one logit
    vector per region, ``[B, K, classes]``: the body runs once on the composite, the head once
    per constituent.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int], in_chans: int):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise MixtrainError(
                f"{type(model).__name__} has no forward_features/forward_head; "
                "give it timm's two methods or use a timm model"
            )
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.nhwc = getattr(model, "output_fmt", "NCHW") in ("NHWC", getattr(_fmt_nhwc(), "value", "NHWC"))
        self.tokens = False
        self.image_size = tuple(image_size)
        self.grid = self._probe_grid(in_chans)

    def _probe_grid(self, in_chans: int) -> tuple[int, int]:
        h, w = self.image_size
        was_training = self.model.training
        self.model.eval()
        # a model without parameters (all fixed ops) probes on the CPU in float32
        p = next(self.model.parameters(), torch.zeros(()))
        try:
            with torch.no_grad():
                f = self.model.forward_features(torch.zeros(1, in_chans, h, w, device=p.device, dtype=p.dtype))
        except Exception as e:
            raise MixtrainError(f"{type(self.model).__name__} failed on a {in_chans}x{h}x{w} input: {e}") from e
        finally:
            self.model.train(was_training)
        if f.ndim == 4:
            gh, gw = (f.shape[1], f.shape[2]) if self.nhwc else (f.shape[2], f.shape[3])
            return int(gh), int(gw)
        if f.ndim == 3:
            self.tokens = True
            grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            n = f.shape[1] - self.num_prefix_tokens
            if grid is None or grid[0] * grid[1] != n:
                raise MixtrainError(
                    f"{type(self.model).__name__}: {n} patch tokens that do not lie on a known patch grid"
                )
            pool = getattr(self.model, "global_pool", "avg")
            if pool not in ("avg", ""):
                raise MixtrainError(
                    f"{type(self.model).__name__} pools with {pool!r}; mixtrain needs average pooling of "
                    "patch tokens (create it with global_pool='avg')"
                )
            return int(grid[0]), int(grid[1])
        raise MixtrainError(
            f"{type(self.model).__name__} has no spatial body: forward_features gives shape "
            f"{tuple(f.shape)}, not a feature map [B,C,h,w] or patch tokens [B,N,C]"
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's output as a grid ``[B, C, h, w]`` (a view where possible)."""
        f = self.model.forward_features(x)
        if self.tokens:
            f = f[:, self.num_prefix_tokens :]
            b, n, c = f.shape
            return f.transpose(1, 2).reshape(b, c, *self.grid)
        if self.nhwc:
            return f.permute(0, 3, 1, 2)
        return f

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled vectors ``[M, C]`` through the model's own head."""
        if self.tokens:
            # timm's ViT head averages patch tokens, then norms and classifies: hand it one token.
            t = pooled[:, None]
            if self.num_prefix_tokens:
                t = torch.cat([t.new_zeros(t.shape[0], self.num_prefix_tokens, t.shape[2]), t], 1)
            return self.model.forward_head(t)
        if self.nhwc:
            return self.model.forward_head(pooled[:, None, None, :])
        return self.model.forward_head(pooled[:, :, None, None])

    def forward(self, x: torch.Tensor, pool_masks: torch.Tensor | None = None) -> torch.Tensor:
        f = self.forward_features(x)
        if pool_masks is None:
            return self.forward_head(f.mean((2, 3)))
        pooled = region_pool(f, pool_masks)
        b, k, c = pooled.shape
        return self.forward_head(pooled.reshape(b * k, c)).view(b, k, -1)


def region_pool(features: torch.Tensor, pool_masks: torch.Tensor) -> torch.Tensor:
    """Average ``features [B, C, h, w]`` over each region: ``pool_masks [B, K, h, w]`` -> ``[B, K, C]``.

    ``pool_masks`` holds each region's indicator divided by its area, so this is one batched
    matrix product; an empty region (all zeros) pools to a zero vector.
    """
    return torch.einsum("bchw,bkhw->bkc", features, pool_masks.to(features.dtype))


def _fmt_nhwc():
    try:
        from timm.layers import Format

        return Format.NHWC
    except Exception:  # older timm
        return None


def adapt(model: nn.Module, image_size: int | tuple[int, int], in_chans: int = 3) -> SpatialModel:
    """Wrap any model that has timm's ``forward_features``/``forward_head`` for mixtrain.

    Raises :class:`MixtrainError` if the body's output is not spatial.
    """
    if isinstance(model, SpatialModel):
        return model
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    return SpatialModel(model, image_size, in_chans)
