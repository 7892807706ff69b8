"""Datasets behind ``--data SPEC``.

Two kinds of source, one interface:

* :class:`TensorData` -- the whole split as one uint8 tensor ``[N, C, H, W]`` (digits, CIFAR, npz).
  It is moved to the training device once and augmented there, so no loader runs in the loop.
* :class:`FolderData` -- an ImageNet-style folder streamed through a DataLoader with workers and
  pinned memory; workers decode and random-resize-crop to a fixed size, the device does the rest.

Every check that can fail on user input raises :class:`~mixtrain.errors.MixtrainError` naming the
file and the problem, before any training starts.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import MixtrainError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# npz data infer their class count as the largest train label + 1. A count above both this and the
# number of training samples can only come from labels that are not numbered 0..C-1 (a stray huge
# value would otherwise make the model's head ask for petabytes); real datasets with more classes
# than samples stay below it.
MAX_INFERRED_CLASSES = 100_000


@dataclass
class TensorData:
    """A labelled split pair held as uint8 image tensors (NCHW) and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    streaming = False

    def __post_init__(self):
        if not self.mean:
            self.mean, self.std = channel_stats(self.train_x)

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    def to(self, device) -> "TensorData":
        """Move the splits to ``device`` (once; the training loop then indexes them there)."""
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` on the 0..1 scale."""
    # Sum in float64 over chunks: exact enough, and never a float copy of the whole set.
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in x.split(4096):
        f = chunk.to(torch.float64).div_(255.0)
        total += f.sum(dim=(0, 2, 3))
        total_sq += f.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------------------------
# digits (embedded default)


def load_digits(upscale: int = 2) -> TensorData:
    """scikit-learn's bundled 8x8 handwritten digits, scaled to uint8 and upsampled to 16x16.

    A fixed stratified 80/20 split (independent of the run's seed) so runs are comparable.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], values 0..16
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    x = images[:, None]  # NCHW, one channel
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return TensorData(
        "digits",
        torch.from_numpy(np.ascontiguousarray(xtr)),
        torch.from_numpy(ytr),
        torch.from_numpy(np.ascontiguousarray(xte)),
        torch.from_numpy(yte),
        num_classes=10,
    )


# ----------------------------------------------------------------------------------------------
# npz:DIR  (train_*.npz + test.npz, x uint8 [N,H,W,C], y int [N])


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    if os.path.isdir(path):
        raise MixtrainError(f"{path}: is a directory, not an npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise MixtrainError(
                    f"{path}: missing array(s) {missing}; an npz split needs 'x' (uint8 [N,H,W,C]) and 'y' (labels [N])"
                )
            x, y = f["x"], f["y"]
    except MixtrainError:
        raise
    except PermissionError as e:
        raise MixtrainError(f"{path}: cannot read the file (permission denied)") from e
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, ...: all mean a damaged file
        raise MixtrainError(
            f"{path}: not a readable npz file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from e
    if x.dtype != np.uint8:
        raise MixtrainError(f"{path}: 'x' has dtype {x.dtype}; expected uint8 pixels 0..255")
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise MixtrainError(
            f"{path}: 'x' has shape {tuple(x.shape)}; expected [N, H, W, C] with C = 1 or 3"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise MixtrainError(
            f"{path}: 'y' has shape {tuple(y.shape)} and dtype {y.dtype}; expected integer labels [N]"
        )
    if len(y) != len(x):
        raise MixtrainError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _check_split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int | None, where: str):
    if len(x) == 0:
        raise MixtrainError(f"{where}: the {name} split is empty")
    if y.min() < 0:
        raise MixtrainError(f"{where}: {name} labels include {int(y.min())}; labels must be 0..C-1")
    if num_classes is not None and y.max() >= num_classes:
        raise MixtrainError(
            f"{where}: {name} label {int(y.max())} is outside the class range 0..{num_classes - 1}"
        )


def from_arrays(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    where: str,
    num_classes: int | None = None,
) -> TensorData:
    """Validate NHWC uint8 arrays and wrap them as :class:`TensorData`."""
    (xtr, ytr), (xte, yte) = train, test
    _check_split("train", xtr, ytr, num_classes, where)
    if num_classes is None:
        num_classes = int(ytr.max()) + 1
        limit = max(MAX_INFERRED_CLASSES, len(ytr))
        if num_classes > limit:
            raise MixtrainError(
                f"{where}: train label {num_classes - 1} implies {num_classes:,} classes (the class count is the "
                f"largest label + 1), more than both the {len(ytr):,} training samples and {MAX_INFERRED_CLASSES:,}; "
                "labels must be 0..C-1: renumber them"
            )
    _check_split("test", xte, yte, num_classes, where)
    if xtr.shape[1:] != xte.shape[1:]:
        raise MixtrainError(
            f"{where}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]} (H, W, C)"
        )

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    return TensorData(
        name,
        nchw(xtr),
        torch.from_numpy(ytr.astype(np.int64)),
        nchw(xte),
        torch.from_numpy(yte.astype(np.int64)),
        num_classes=num_classes,
    )


def _check_dir(root: str):
    """A data directory must exist, be a directory, and be listable."""
    if not os.path.exists(root):
        raise MixtrainError(f"data directory not found: {root}")
    if not os.path.isdir(root):
        raise MixtrainError(f"data path is not a directory: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise MixtrainError(f"data directory is not readable (permission denied): {root}")


def load_npz(root: str, name: str | None = None, num_classes: int | None = None) -> TensorData:
    _check_dir(root)
    train_files = sorted(glob.glob(os.path.join(root, "train_*.npz")))
    test_file = os.path.join(root, "test.npz")
    if not train_files:
        raise MixtrainError(f"{root}: no train_*.npz files (expected train_*.npz and test.npz)")
    if not os.path.exists(test_file):
        raise MixtrainError(f"{root}: no test.npz (expected train_*.npz and test.npz)")
    parts = [_read_npz(f) for f in train_files]
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise MixtrainError(f"{root}: train files disagree on image shape: {sorted(shapes)}")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_npz(test_file)
    return from_arrays(name or f"npz:{root}", (xtr, ytr), (xte, yte), root, num_classes)


# ----------------------------------------------------------------------------------------------
# cifar10[:DIR], cifar100[:DIR] through torchvision


def load_cifar(which: str, root: str | None) -> TensorData:
    classes = 10 if which == "cifar10" else 100
    if root and glob.glob(os.path.join(root, "train_*.npz")):
        return load_npz(root, name=which, num_classes=classes)
    import torchvision

    root = root or os.path.join(os.path.expanduser("~"), ".cache", "mixtrain", which)
    cls = torchvision.datasets.CIFAR10 if which == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root, train=True, download=True)
        test = cls(root, train=False, download=True)
    except Exception as e:  # offline, or a damaged archive
        raise MixtrainError(
            f"could not load {which} from {root} ({type(e).__name__}: {e}); "
            f"put torchvision's {which} files there, or use npz:DIR"
        ) from e
    return from_arrays(
        which,
        (train.data, np.asarray(train.targets)),
        (test.data, np.asarray(test.targets)),
        root,
        classes,
    )


# ----------------------------------------------------------------------------------------------
# folder:DIR (ImageNet layout: train/<class>/*.jpg, val/<class>/*.jpg), streamed


class _CheckedLoader:
    """PIL loader that names the file when an image cannot be decoded."""

    def __call__(self, path: str):
        from PIL import Image

        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except Exception as e:
            raise MixtrainError(f"cannot read image {path}: {e}") from e


@dataclass
class FolderData:
    """An image folder streamed through a DataLoader at a fixed ``image_size``."""

    name: str
    root: str
    size: int
    workers: int = 8
    streaming = True

    def __post_init__(self):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(self.root, split)):
                raise MixtrainError(
                    f"{self.root}: no '{split}/' folder (expected train/<class>/... and val/<class>/...)"
                )
        to_uint8 = T.PILToTensor()
        train_tf = T.Compose([T.RandomResizedCrop(self.size, scale=(0.35, 1.0), antialias=True), to_uint8])
        val_tf = T.Compose([T.Resize(int(round(self.size / 0.875)), antialias=True), T.CenterCrop(self.size), to_uint8])
        try:
            self.train_set = ImageFolder(os.path.join(self.root, "train"), train_tf, loader=_CheckedLoader())
            self.test_set = ImageFolder(os.path.join(self.root, "val"), val_tf, loader=_CheckedLoader())
        except (FileNotFoundError, OSError) as e:
            raise MixtrainError(f"{self.root}: {e}") from e
        if self.train_set.classes != self.test_set.classes:
            raise MixtrainError(f"{self.root}: train/ and val/ have different class folders")
        self.num_classes = len(self.train_set.classes)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.train_y = torch.tensor(self.train_set.targets, dtype=torch.int64)

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    channels = 3

    def to(self, device) -> "FolderData":
        self.train_y = self.train_y.to(device)
        return self

    def test_loader(self, batch_size: int, pin: bool, rank: int = 0, world: int = 1):
        """The validation split in order; with ``world`` > 1, only every ``world``-th image from ``rank``."""
        subset = self.test_set if world == 1 else torch.utils.data.Subset(self.test_set, range(rank, len(self.test_set), world))
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=self.workers, pin_memory=pin)


# ----------------------------------------------------------------------------------------------


DATA_HELP = (
    "digits (scikit-learn's bundled 8x8 digits, upsampled to 16x16; the default), "
    "cifar10[:DIR], cifar100[:DIR] (torchvision; downloads when online, or reads DIR), "
    "npz:DIR (train_*.npz + test.npz with x uint8 [N,H,W,C] and y [N]), "
    "folder:DIR (ImageNet layout: DIR/train/<class>/*, DIR/val/<class>/*)"
)


def load_data(spec: str, image_size: int | None = None, workers: int = 8):
    """Parse ``--data SPEC`` and load it. See :data:`DATA_HELP` for the forms."""
    kind, _, arg = spec.partition(":")
    arg = os.path.expanduser(arg) if arg else None
    if kind == "digits":
        return load_digits()
    if kind in ("cifar10", "cifar100"):
        return load_cifar(kind, arg)
    if kind == "npz":
        if not arg:
            raise MixtrainError("npz needs a directory: --data npz:DIR")
        return load_npz(arg)
    if kind == "folder":
        if not arg:
            raise MixtrainError("folder needs a directory: --data folder:DIR")
        _check_dir(arg)
        return FolderData(f"folder:{arg}", arg, image_size or 224, workers)
    raise MixtrainError(f"unknown data spec {spec!r}; use one of: {DATA_HELP}")
