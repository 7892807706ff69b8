"""Models behind ``--model NAME``, and the adapter that splits any of them into body and head.

Every model here follows timm's convention: ``forward_features(x)`` returns the body's final
spatial features and ``forward_head(x)`` pools them and classifies. :class:`SpatialModel` is the
only place in mixtrain that knows a model's internals: it reads the body's output (NCHW or NHWC
feature maps, or ViT tokens whose prefix tokens it skips and whose patch tokens lie on the patch
grid), pools it per region, and applies the model's own head to each pooled vector. It reports
the final feature grid and refuses, with a :class:`MixtrainError`, a body without spatial output
or a head that does not average (class-token, attention or max pooling).

Models: CIFAR-style ones for small images (full-resolution stems; ViTs with 4-pixel patches and no
class token), ImageNet-style ``*_224`` ones (torchvision ResNets and MobileNetV2, ViTs with
16-pixel patches), and ``timm:NAME`` for timm models, built with the image size, average pooling
and no class token wherever the model takes those options.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .airbench import AirbenchNet
from .compose import token_owner  # noqa: F401 -- the ViT mask's owners; part of this module's interface
from .errors import MixtrainError


class _AveragingHead(nn.Module):
    """timm's ``forward_head``/``forward`` for a CNN body: global average, then the final layer
    named by ``head_name`` (``fc``, or ``classifier`` for torchvision's MobileNetV2)."""

    head_name = "fc"

    def forward_head(self, x, pre_logits: bool = False):
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x if pre_logits else getattr(self, self.head_name)(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


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


class CifarResNet(_AveragingHead):
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


class DigitNet(_AveragingHead):
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


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vit(width: str, patch: int, num_classes, in_chans, image_size):
    from timm.models.vision_transformer import VisionTransformer

    dims = {"tiny": (192, 3), "small": (384, 6)}[width]
    # No class token and average pooling: each constituent's prediction comes from the average
    # of its own patch tokens, never from a token that summarises the whole composite.
    return VisionTransformer(
        img_size=_pair(image_size),
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dims[0],
        depth=12,
        num_heads=dims[1],
        class_token=False,
        global_pool="avg",
    )


def _cifar_mobilenetv2(num_classes, in_chans):
    from torchvision.models import MobileNetV2

    # torchvision's MobileNetV2 with the CIFAR strides: stem stride 1 and the second stage at
    # stride 1, so 32x32 ends on 4x4 as the CIFAR ResNets do.
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    m = MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    old = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(m.features[0][0].weight, mode="fan_out")
    return _TorchvisionBody(m.features, m.classifier)


def _imagenet_mobilenetv2(num_classes, in_chans):
    from torchvision.models import mobilenet_v2

    m = mobilenet_v2(num_classes=num_classes)
    if in_chans != 3:
        old = m.features[0][0]
        m.features[0][0] = nn.Conv2d(in_chans, old.out_channels, 3, 2, 1, bias=False)
        nn.init.kaiming_normal_(m.features[0][0].weight, mode="fan_out")
    return _TorchvisionBody(m.features, m.classifier)


def _imagenet_resnet(depth: int, num_classes, in_chans):
    import torchvision.models as tvm

    m = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50}[depth](num_classes=num_classes)
    if in_chans != 3:
        m.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return _TorchvisionBody(body, m.fc)


class _TorchvisionBody(_AveragingHead):
    """Gives a torchvision ``features``/``classifier`` model timm's two methods."""

    head_name = "classifier"

    def __init__(self, features, classifier):
        super().__init__()
        self.features = features
        self.classifier = classifier
        last = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
        self.num_features = last.in_features

    def forward_features(self, x):
        return self.features(x)


# name -> builder(num_classes, in_chans, image_size); the final grid at the size each is made for
MODELS = {
    "digitnet": lambda nc, ic, s: DigitNet(nc, ic),  # small CNN for 16x16 digits (16 px -> 4x4 grid)
    "airbench": lambda nc, ic, s: AirbenchNet(nc, ic),  # the fast recipe's convnet, max-pooled head (32 px -> 3x3; docs/fast-recipe.md)
    "airbench_avg": lambda nc, ic, s: AirbenchNet(nc, ic, pooling="avg"),  # the same with an average-pooled head (32 px -> 3x3)
    "resnet18": lambda nc, ic, s: CifarResNet(BasicBlock, (2, 2, 2, 2), nc, ic),  # CIFAR ResNet-18 (32 px -> 4x4)
    "resnet34": lambda nc, ic, s: CifarResNet(BasicBlock, (3, 4, 6, 3), nc, ic),  # CIFAR ResNet-34 (32 px -> 4x4)
    "resnet50": lambda nc, ic, s: CifarResNet(Bottleneck, (3, 4, 6, 3), nc, ic),  # CIFAR ResNet-50 (32 px -> 4x4)
    "mobilenetv2": lambda nc, ic, s: _cifar_mobilenetv2(nc, ic),  # CIFAR MobileNetV2 (32 px -> 4x4)
    "vit_tiny": lambda nc, ic, s: _vit("tiny", 4, nc, ic, s),  # ViT-Tiny, patch 4, no class token, average pool (32 px -> 8x8 tokens)
    "vit_small": lambda nc, ic, s: _vit("small", 4, nc, ic, s),  # ViT-Small, patch 4, no class token, average pool (32 px -> 8x8 tokens)
    "resnet18_224": lambda nc, ic, s: _imagenet_resnet(18, nc, ic),  # torchvision ResNet-18 (224 px -> 7x7)
    "resnet34_224": lambda nc, ic, s: _imagenet_resnet(34, nc, ic),  # torchvision ResNet-34 (224 px -> 7x7)
    "resnet50_224": lambda nc, ic, s: _imagenet_resnet(50, nc, ic),  # torchvision ResNet-50 (224 px -> 7x7)
    "mobilenetv2_224": lambda nc, ic, s: _imagenet_mobilenetv2(nc, ic),  # torchvision MobileNetV2 (224 px -> 7x7)
    "vit_tiny_224": lambda nc, ic, s: _vit("tiny", 16, nc, ic, s),  # ViT-Tiny, patch 16, no class token, average pool (224 px -> 14x14 tokens)
    "vit_small_224": lambda nc, ic, s: _vit("small", 16, nc, ic, s),  # ViT-Small, patch 16, no class token, average pool (224 px -> 14x14 tokens)
}

MODEL_HELP = (
    "small-image models (CIFAR-style full-resolution stem: 32 px ends on a 4x4 grid; ViTs with "
    "4-pixel patches: 8x8 tokens): "
    + ", ".join(n for n in MODELS if not n.endswith("_224"))
    + "; ImageNet-style (stride-32 stem: 224 px ends on 7x7; ViTs with 16-pixel patches: 14x14): "
    + ", ".join(n for n in MODELS if n.endswith("_224"))
    + "; or timm:NAME for any timm model whose body gives a spatial feature map or patch tokens "
    "(built without pretrained weights; ViTs with global_pool='avg' and no class token where the model allows). "
    "Every model is built for the data's image size; the run's config.json records the final feature grid"
)

# timm keyword sets tried in order, most wanted first: not every timm model takes an image size, a
# pooling choice or a class-token switch, and each says so by raising at construction.
_TIMM_TRIES = (
    ("img_size", "global_pool", "class_token"),
    ("img_size", "global_pool"),
    ("global_pool", "class_token"),
    ("global_pool",),
    ("img_size",),
    (),
)


def check_model_name(name: str):
    """Fail early (before any data loads) on a model name that :func:`create_model` cannot build."""
    if name.startswith("timm:"):
        tname = name[5:]
        if not tname:
            raise MixtrainError("timm: needs a model name, as in timm:resnet50")
        try:
            import timm
        except ImportError:
            raise MixtrainError(f"model {name!r} needs the timm package (pip install timm)") from None
        if not timm.is_model(tname):
            raise MixtrainError(f"unknown timm model {tname!r} (see timm.list_models())")
        return
    if name not in MODELS:
        raise MixtrainError(f"unknown model {name!r}; choose from {MODEL_HELP}")


def _create_timm(tname: str, num_classes: int, in_chans: int, image_size) -> nn.Module:
    import timm

    if not tname or not timm.is_model(tname):
        raise MixtrainError(f"unknown timm model {tname!r} (see timm.list_models())")
    wanted = {"img_size": _pair(image_size), "global_pool": "avg", "class_token": False}
    errors = []
    for keys in _TIMM_TRIES:
        try:
            net = timm.create_model(
                tname, pretrained=False, num_classes=num_classes, in_chans=in_chans, **{k: wanted[k] for k in keys}
            )
        except (TypeError, AssertionError, ValueError) as e:  # a keyword this model does not take
            errors.append(f"{', '.join(keys) or 'no options'}: {type(e).__name__}: {e}")
            continue
        pool = getattr(net, "global_pool", None)
        if "global_pool" not in keys and isinstance(pool, str) and pool != "avg":
            raise MixtrainError(
                f"timm model {tname!r} cannot be built with global_pool='avg' (it pools with {pool!r}); "
                "mixtrain needs a head that averages the body's features, so each constituent can be pooled alone"
            )
        net.mixtrain_timm_options = {k: wanted[k] for k in keys}  # what the model accepted, for the record
        return net
    raise MixtrainError(f"could not build timm model {tname!r}: " + "; ".join(errors[-2:]))


def create_model(name: str, num_classes: int, in_chans: int, image_size) -> nn.Module:
    """Build ``name`` (see :data:`MODEL_HELP`) untrained, for images of ``image_size`` (int or (H, W))."""
    if name.startswith("timm:"):
        return _create_timm(name[5:], num_classes, in_chans, image_size)
    check_model_name(name)
    return MODELS[name](num_classes, in_chans, image_size)


# ----------------------------------------------------------------------------------------------
# The adapter


def _fmt(value) -> str:
    """timm's output_fmt as a plain string (timm uses a str Enum)."""
    return str(getattr(value, "value", value) or "")


class SpatialModel(nn.Module):
    """A classifier seen as body -> (region) pooling -> head.

    ``forward(x)`` is the plain model (its own global average pooling). ``forward(x, pool_masks)``
    with ``pool_masks [B, K, h, w]`` (each region's indicator divided by its area) returns one
    logit vector per region, ``[B, K, classes]``: the body runs once on the composite, the head
    once per constituent.

    The body's output may be a feature map in NCHW (CNNs) or NHWC (timm's Swin, MambaOut, ...)
    layout, or tokens ``[B, P + h*w, C]`` of which the first ``P`` are prefix tokens (class or
    register tokens, never pooled) and the rest patch tokens on an ``h x w`` grid. Construction
    probes the model once and refuses (:class:`MixtrainError`) a body without spatial output, or a
    head that does not average the body's features (class-token, attention or max pooling):
    pooling each region then applying the head is checked to equal the model's own head.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int], in_chans: int, separate_attention: bool = True):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise MixtrainError(
                f"{type(model).__name__} has no forward_features/forward_head; "
                "give it timm's two methods or use a timm model"
            )
        self.model = model
        self.image_size = _pair(image_size)
        self.layout = "NCHW"  # NCHW | NHWC | NLC (tokens)
        self.num_prefix_tokens = 0
        # a model declaring pooling="max" (AirbenchNet) is pooled by region maxima (region_max_pool); checked like the average
        self.pooling = "max" if getattr(model, "pooling", "avg") == "max" else "avg"
        self.grid = self._probe(in_chans)
        # ViTs: separation in the attention itself (see _separated_tokens), where the model allows it
        self.separates_attention = bool(separate_attention) and self._can_mask_attention()
        if self.separates_attention:
            src = tuple(int(s) for s in self.model.patch_embed.grid_size)
            self.register_buffer("_resample_y", _resampling_rows(src[0], self.grid[0]), persistent=False)
            self.register_buffer("_resample_x", _resampling_rows(src[1], self.grid[1]), persistent=False)

    @property
    def tokens(self) -> bool:
        """Whether the body gives tokens (a ViT) rather than a feature map."""
        return self.layout == "NLC"

    # -- construction -----------------------------------------------------------------------

    def _probe(self, in_chans: int) -> tuple[int, int]:
        name = type(self.model).__name__
        h, w = self.image_size
        # probe on the model's device and dtype; a model without parameters (all fixed ops) on the CPU in float32
        p = next(self.model.parameters(), torch.zeros(()))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if p.device.type == "meta":
                    x = torch.empty(1, in_chans, h, w, device="meta", dtype=p.dtype)
                else:  # random, so that pools that differ (avg, max, token) give different results
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(1, in_chans, h, w, generator=g).to(p.device, p.dtype)
                try:
                    f = self.model.forward_features(x)
                except Exception as e:
                    raise MixtrainError(f"{name} failed on a {in_chans}x{h}x{w} input: {type(e).__name__}: {e}") from e
                grid = self._read_layout(f, name)
                if p.device.type != "meta":
                    self._check_head(f, name)
        finally:
            self.model.train(was_training)
        return grid

    def _read_layout(self, f, name: str) -> tuple[int, int]:
        if not isinstance(f, torch.Tensor) or f.ndim not in (3, 4):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise MixtrainError(
                f"{name} has no spatial body: forward_features gives shape {shape}, not a feature map "
                "[B, C, h, w] / [B, h, w, C] or patch tokens [B, N, C]"
            )
        m = self.model
        if f.ndim == 4:
            fmt = _fmt(getattr(m, "output_fmt", ""))
            if fmt not in ("NCHW", "NHWC"):  # not declared: the channel count tells
                c = getattr(m, "num_features", None)
                fmt = "NHWC" if (c is not None and f.shape[3] == c and f.shape[1] != c) else "NCHW"
            self.layout = fmt
            return (int(f.shape[1]), int(f.shape[2])) if fmt == "NHWC" else (int(f.shape[2]), int(f.shape[3]))
        # tokens: prefix tokens first, then patch tokens in row-major order of the patch grid
        self.layout = "NLC"
        self.num_prefix_tokens = int(getattr(m, "num_prefix_tokens", 0) or 0)
        n = int(f.shape[1]) - self.num_prefix_tokens
        pool = getattr(m, "global_pool", "avg")
        if isinstance(pool, str) and pool != "avg":
            raise MixtrainError(
                f"{name} pools its tokens with {pool!r}; mixtrain needs the average of the patch tokens "
                "(create it with global_pool='avg', and no class token where it allows)"
            )
        if getattr(m, "attn_pool", None) is not None or getattr(m, "pool_include_prefix", False):
            raise MixtrainError(f"{name} pools with attention or includes prefix tokens; mixtrain needs global_pool='avg'")
        strides = self._token_strides()
        h, w = self.image_size
        for sy, sx in strides:  # whole patches only, so region boundaries fall on patch boundaries
            if sy > 0 and sx > 0 and h % sy == 0 and w % sx == 0 and (h // sy) * (w // sx) == n:
                return h // sy, w // sx
        hint = f" (try an image size that is a multiple of {max(strides[-1])})" if strides else ""
        raise MixtrainError(
            f"{name}: its {n} output tokens do not lie on a known patch grid of the "
            f"{self.image_size[0]}x{self.image_size[1]} input, so they cannot be split into regions{hint}"
        )

    def _token_strides(self) -> list[tuple[int, int]]:
        """Candidate pixel strides of the output tokens: the patch embedding's patch size, the last stage's."""
        m = self.model
        strides = []
        for attr in ("patch_embed", "stem"):
            ps = getattr(getattr(m, attr, None), "patch_size", None)
            if ps is not None:
                strides.append(_pair(ps))
        info = getattr(m, "feature_info", None)
        if isinstance(info, list) and info and isinstance(info[-1], dict) and "reduction" in info[-1]:
            strides.append(_pair(info[-1]["reduction"]))
        return strides

    def _check_head(self, f, name: str):
        """Averaging the whole grid then applying our head must equal the model's own head."""
        try:
            try:
                theirs, pre = self.model.forward_head(f, pre_logits=True), True
            except TypeError:  # a head without timm's pre_logits switch
                theirs, pre = self.model.forward_head(f), False
        except Exception as e:
            raise MixtrainError(f"{name}: its head failed on the body's output ({type(e).__name__}: {e})") from e
        try:
            ours = self._head(self._pool_all(f), pre_logits=pre)
        except Exception as e:
            raise MixtrainError(f"{name}: its head does not accept one pooled vector per sample ({type(e).__name__}: {e})") from e
        if theirs.shape != ours.shape or not torch.allclose(
            ours.float(), theirs.float(), rtol=1e-3, atol=1e-4 * (1.0 + float(theirs.abs().max()))
        ):
            raise MixtrainError(
                f"{name}: its head does not average the body's features over the grid (class-token, "
                "attention or max pooling?); mixtrain pools each constituent's region by averaging. "
                "Build it with global_pool='avg' and no class token"
            )

    def _can_mask_attention(self) -> bool:
        """A timm-style ViT whose blocks take an attention mask, with an absolute position
        embedding on its patch grid and no prefix tokens: the composite can then be separated
        exactly into its constituents (one sequence, block-diagonal attention)."""
        import inspect

        m = self.model
        if self.layout != "NLC" or self.num_prefix_tokens:
            return False
        pos, blocks, embed = getattr(m, "pos_embed", None), getattr(m, "blocks", None), getattr(m, "patch_embed", None)
        grid = getattr(embed, "grid_size", None)
        if not isinstance(pos, torch.Tensor) or blocks is None or grid is None or len(blocks) == 0:
            return False
        if getattr(m, "cls_token", None) is not None or getattr(m, "reg_token", None) is not None:
            return False
        if pos.ndim != 3 or pos.shape[1] != int(grid[0]) * int(grid[1]):
            return False
        if not all(hasattr(m, a) for a in ("pos_drop", "norm_pre", "norm")):
            return False
        if not isinstance(getattr(m, "patch_drop", nn.Identity()), nn.Identity):
            return False  # patch dropout removes tokens: the layout would no longer hold
        try:
            return all("attn_mask" in inspect.signature(type(b).forward).parameters for b in blocks)
        except (TypeError, ValueError):
            return False

    def _separated_tokens(self, x: torch.Tensor, pool_masks: torch.Tensor, own_positions: bool = False) -> torch.Tensor:
        """The ViT body on composites with every constituent kept apart: ``[B, N, C]`` tokens.

        Each token belongs to the region (slot) that holds it (``pool_masks > 0``); it attends
        only to tokens of the same region (a block-diagonal mask, as an additive bias: never an
        empty row, a token always sees itself), and its position embedding is the model's own resampled to
        its region's token grid (timm's bicubic, antialiased resampling, done as two 1-D linear
        maps per token). A region of h x w tokens is then computed exactly as that constituent
        alone at an h x w token grid; fixed shapes, no host synchronisation.

        ``own_positions`` (scattered cells, any shape of region): every token keeps the position
        embedding of its place in the whole image, so a constituent is computed exactly as its
        whole image with only its own tokens kept (patch dropout).
        """
        m = self.model
        t = m.patch_embed(x)
        if t.ndim == 4:  # NHWC patch grid (dynamic image size)
            t = t.flatten(1, 2)
        b, n, c = t.shape
        gh, gw = self.grid
        present = pool_masks > 0  # [B, K, gh, gw]
        own = token_owner(present)  # [B, N]
        ys = torch.arange(gh, device=x.device).view(1, gh, 1).expand(b, gh, gw).flatten(1)
        xs = torch.arange(gw, device=x.device).view(1, 1, gw).expand(b, gh, gw).flatten(1)
        if own_positions:  # the whole grid's embedding at every token
            h_tok, w_tok, r_tok, c_tok = torch.full_like(own, gh), torch.full_like(own, gw), ys, xs
        else:
            h_tok, w_tok, r_tok, c_tok = region_token_places(present, own, ys, xs)
        wy = self._resample_y[h_tok, r_tok]  # [B, N, gh0]
        wx = self._resample_x[w_tok, c_tok]  # [B, N, gw0]
        gh0, gw0 = wy.shape[-1], wx.shape[-1]
        pos = m.pos_embed.reshape(gh0, gw0, c)
        t = t + torch.einsum("bni,bnj,ijc->bnc", wy.to(pos.dtype), wx.to(pos.dtype), pos).to(t.dtype)
        t = m.norm_pre(m.pos_drop(t))
        mask = separation_bias(own, _attention_dtype(t))
        for blk in m.blocks:
            t = blk(t, attn_mask=mask)
        return m.norm(t)

    # -- forward ------------------------------------------------------------------------------

    def _patch_tokens(self, f):
        return f[:, self.num_prefix_tokens :] if self.num_prefix_tokens else f

    def _pool_all(self, f):
        if self.pooling == "max":
            return self._as_grid(f).amax((2, 3))
        if self.layout == "NLC":
            return self._patch_tokens(f).mean(1)
        return f.mean((1, 2)) if self.layout == "NHWC" else f.mean((2, 3))

    def _head(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from pooled vectors ``[M, C]`` through the model's own head."""
        if self.layout == "NLC":
            # the head averages patch tokens (checked at construction): hand it one token, after
            # zero prefix tokens that it skips
            t = pooled[:, None]
            if self.num_prefix_tokens:
                t = torch.cat([t.new_zeros(t.shape[0], self.num_prefix_tokens, t.shape[2]), t], 1)
        elif self.layout == "NHWC":
            t = pooled[:, None, None, :]
        else:
            t = pooled[:, :, None, None]
        return self.model.forward_head(t, pre_logits=True) if pre_logits else self.model.forward_head(t)

    def forward_features(self, x: torch.Tensor, pool_masks: torch.Tensor | None = None) -> torch.Tensor:
        """The body's output as a grid ``[B, C, h, w]`` (patch tokens laid on their patch grid).
        With ``pool_masks`` and attention separation, the tokens of the separated composite."""
        if pool_masks is not None and self.separates_attention:
            f = self._separated_tokens(x, pool_masks)
        else:
            f = self.model.forward_features(x)
        return self._as_grid(f)

    def _as_grid(self, f: torch.Tensor) -> torch.Tensor:
        """The body's raw output as ``[B, C, h, w]``."""
        if self.layout == "NLC":
            f = self._patch_tokens(f)
            b, n, c = f.shape
            return f.transpose(1, 2).reshape(b, c, *self.grid)
        if self.layout == "NHWC":
            return f.permute(0, 3, 1, 2)
        return f

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled vectors ``[M, C]`` through the model's own head."""
        return self._head(pooled)

    def pool_body_output(self, f: torch.Tensor, pool_masks: torch.Tensor) -> torch.Tensor:
        """The body's raw output ``f`` (in its own layout: NCHW, NHWC or tokens) averaged over each
        region: ``[B, K, C]`` (no layout copies). :func:`region_pool` is the NCHW case."""
        if self.pooling == "max":
            return region_max_pool(self._as_grid(f), pool_masks)
        m = pool_masks.to(f.dtype)
        if self.layout == "NLC":
            return torch.einsum("bnc,bkn->bkc", self._patch_tokens(f), m.flatten(2))
        if self.layout == "NHWC":
            return torch.einsum("bhwc,bkhw->bkc", f, m)
        return region_pool(f, m)

    def forward(self, x: torch.Tensor, pool_masks: torch.Tensor | None = None, own_positions: bool = False) -> torch.Tensor:
        """``forward(x)``: the plain model, logits ``[B, classes]``. ``forward(x, pool_masks)``: one
        prediction per region, logits ``[B, K, classes]`` (see the class docstring).
        ``own_positions``: regions are scattered cells of whole images (ViTs separated by attention
        only; see :meth:`_separated_tokens`)."""
        if pool_masks is None:
            return self.model.forward_head(self.model.forward_features(x))  # the model's own pooling (checked to be the average)
        if own_positions and not self.separates_attention:
            raise MixtrainError("scattered cells need a ViT separated by attention: without the mask every "
                                "constituent's tokens would mix with its partners' in every layer")
        f = self._separated_tokens(x, pool_masks, own_positions) if self.separates_attention else self.model.forward_features(x)
        pooled = self.pool_body_output(f, pool_masks)
        b, k, c = pooled.shape
        return self._head(pooled.reshape(b * k, c)).view(b, k, -1)


def region_token_places(present: torch.Tensor, own: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor):
    """Each token's place in its own rectangular region: from the regions' tokens ``present [B, K,
    gh, gw]``, each token's owner ``own [B, N]`` and its row and column on the whole grid ``ys, xs
    [B, N]`` -> its region's height and width and its row and column within it (``[B, N]`` each).
    Tokens outside every region (owner ``K``) are placed on the whole grid."""
    b, _, gh, gw = present.shape
    rows, cols = present.any(3), present.any(2)  # [B, K, gh], [B, K, gw]
    heights = torch.cat([rows.sum(2), rows.new_full((b, 1), gh, dtype=torch.long)], 1)  # [B, K + 1]
    widths = torch.cat([cols.sum(2), cols.new_full((b, 1), gw, dtype=torch.long)], 1)
    top = torch.cat([rows.to(torch.uint8).argmax(2), rows.new_zeros((b, 1), dtype=torch.long)], 1)
    left = torch.cat([cols.to(torch.uint8).argmax(2), cols.new_zeros((b, 1), dtype=torch.long)], 1)
    r_tok = (ys - top.gather(1, own)).clamp_min(0)
    c_tok = (xs - left.gather(1, own)).clamp_min(0)
    return heights.gather(1, own), widths.gather(1, own), r_tok, c_tok


def separation_mask(owner: torch.Tensor) -> torch.Tensor:
    """The block-diagonal attention mask of tokens owned by ``owner [B, N]``: ``[B, 1, N, N]``, True
    where a token may attend (same owner). The diagonal is always True, so no row is empty."""
    return (owner[:, :, None] == owner[:, None, :])[:, None]


def separation_bias(owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`separation_mask` as an additive bias in the attention's ``dtype``: 0 where a token
    may attend, -inf elsewhere, ``[B, 1, N, N]``; never a row of -inf only (the diagonal is 0).

    Built once per step and read by every block: given a boolean mask, SDPA converts it in each
    block (measured on an H200, ViT-tiny at 64 tokens: the bool form cost 1.43 ms per step over
    no mask, this one 0.18, ``benchmarks/vit_mask_cost.py``). Rows are stored padded to a multiple
    of 16 elements, the memory-efficient kernel's alignment, so no kernel pads them again."""
    b, n = owner.shape
    bias = torch.zeros(b, 1, n, -(-n // 16) * 16, dtype=dtype, device=owner.device)
    bias[..., :n].masked_fill_(~separation_mask(owner), float("-inf"))
    return bias[..., :n]


def _attention_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' attention will compute in: autocast's where it is on, else the tokens'."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def region_pool(features: torch.Tensor, pool_masks: torch.Tensor) -> torch.Tensor:
    """Average ``features [B, C, h, w]`` over each region: ``pool_masks [B, K, h, w]`` -> ``[B, K, C]``.

    ``pool_masks`` holds each region's indicator divided by its area, so this is one batched
    matrix product; an empty region (all zeros) pools to a zero vector.
    """
    return torch.einsum("bchw,bkhw->bkc", features, pool_masks.to(features.dtype))


def region_max_pool(features: torch.Tensor, pool_masks: torch.Tensor) -> torch.Tensor:
    """The maximum of ``features [B, C, h, w]`` over each region (``pool_masks [B, K, h, w] > 0``):
    ``[B, K, C]``; an empty region pools to a zero vector. For heads that max-pool their grid."""
    inside = pool_masks > 0
    lowest = torch.finfo(features.dtype).min
    m = torch.where(inside[:, :, None], features[:, None], lowest).amax((-2, -1))
    return torch.where(inside.flatten(2).any(-1)[..., None], m, torch.zeros((), dtype=m.dtype, device=m.device))


def _resampling_rows(src: int, max_dst: int) -> torch.Tensor:
    """``[max_dst + 1, max_dst, src]``: entry ``[d, r]`` is the weights over ``src`` positions that
    timm's position-embedding resampling (bicubic, antialiased) gives output position ``r`` of a
    ``d``-long axis. That 2-D resampling is separable, so a token's embedding at a region of
    h x w tokens is ``sum_ij Y[h, r, i] X[w, c, j] P[i, j]``."""
    import torch.nn.functional as F

    out = torch.zeros(max_dst + 1, max_dst, src)
    # each basis vector as a 1 x src image, resampled along its width (the same 1-D kernel as along
    # the height; a width-1 image resampled along its height does not give it)
    eye = torch.eye(src).view(src, 1, 1, src)
    for d in range(1, max_dst + 1):
        if d == src:
            out[d, :d] = torch.eye(src)  # timm keeps the embedding unchanged at its own size
            continue
        r = F.interpolate(eye, size=(1, d), mode="bicubic", antialias=True, align_corners=False)
        out[d, :d] = r.view(src, d).T
    return out


def adapt(model: nn.Module, image_size: int | tuple[int, int], in_chans: int = 3,
          separate_attention: bool = True) -> SpatialModel:
    """Wrap any model that has timm's ``forward_features``/``forward_head`` for mixtrain.

    Raises :class:`MixtrainError` if the body's output is not spatial or the head does not average it.
    The final feature grid is ``adapt(...).grid``. ``separate_attention``: for ViTs that allow it
    (timm-style blocks taking an attention mask, an absolute position embedding, no class or
    register tokens), composites are separated in the attention itself, so each constituent is
    computed exactly as if alone at its region's token grid (``adapt(...).separates_attention``).
    """
    if isinstance(model, SpatialModel):
        return model
    return SpatialModel(model, _pair(image_size), in_chans, separate_attention)
