"""Datasets behind ``--data SPEC``.

One interface (:class:`DataSource`), two kinds of source:

* :class:`TensorData` -- the whole split as one uint8 tensor ``[N, C, H, W]`` (digits, CIFAR, npz).
  It is moved to the training device once and augmented there, so no loader runs in the loop.
* :class:`FolderData` -- an ImageNet-style folder, decoded once into a uint8 cache
  (:mod:`mixtrain.folder_cache`); resident on the GPU when it fits, otherwise streamed from
  memory-mapped host memory ahead of the step (:mod:`mixtrain.stream`). Random-resized crop and
  flip run on the GPU inside the resampling that renders composites.

Every check that can fail on user input raises :class:`~mixtrain.errors.MixtrainError` naming the
file and the problem, before any training starts.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .compose import Augment
from .errors import MixtrainError, OptionError
from .folder_cache import check_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# npz data infer their class count as the largest train label + 1. A count above both this and the
# number of training samples can only come from labels that are not numbered 0..C-1 (a stray huge
# value would otherwise make the model's head ask for petabytes); real datasets with more classes
# than samples stay below it.
MAX_INFERRED_CLASSES = 100_000


class DataSource:
    """What the trainer needs from a dataset; every source implements this.

    Attributes: ``name``, ``num_classes``, ``channels``, ``mean``/``std`` (normalisation),
    ``train_y`` (int64 labels, on the training device after :meth:`to`), ``image_size`` (the
    training resolution), ``source_size`` (the stored images' size) and ``resident`` (after
    :meth:`to`: the whole training split is one tensor on the device, ``train_x``, so a step can
    gather from it and be captured as a CUDA graph). Each source also carries its own defaults
    (:meth:`default_augment`), so nothing tests the ``--data`` string.
    """

    name: str
    num_classes: int
    channels: int
    resident: bool = True
    flip: bool = True  # the default horizontal flip

    @property
    def num_train(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def source_size(self) -> tuple[int, int]:
        return self.image_size

    def default_augment(self) -> Augment:
        """The augmentation this kind of data trains with unless options say otherwise."""
        h = self.image_size[0]
        return Augment(pad=max(1, h // 8), flip=self.flip)

    def to(self, device) -> "DataSource":
        raise NotImplementedError

    def step_images(self, batches, device, start: int = 0):
        """An object whose ``get(j)`` gives step ``j``'s images: ``(uint8 [M, C, H, W], src)`` with
        ``src [B, K]`` indexing them (``None``: the images are indexed by sample id). Steps are
        read in order from ``start``; ``close()`` ends it."""
        return _Resident(self.train_x)

    def test_batches(self, batch_size: int, device, rank: int = 0, world: int = 1):
        """The test split in order as ``(images [b, C, H, W] at image_size, labels)`` on ``device``;
        with ``world`` > 1, only every ``world``-th sample from ``rank``."""
        raise NotImplementedError

    def subset(self, n_train: int, n_test: int) -> "DataSource":
        """The first samples of each split, with the same statistics (a benchmark's warm-up)."""
        raise NotImplementedError


class _Resident:
    def __init__(self, images):
        self.images = images

    def get(self, j):
        return self.images, None

    def close(self):
        pass


@dataclass
class TensorData(DataSource):
    """A labelled split pair held as uint8 image tensors (NCHW) and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    flip: bool = True  # the default horizontal flip (off for digits)

    resident = True

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

    def test_batches(self, batch_size: int, device, rank: int = 0, world: int = 1):
        tx, ty = self.test_x[rank::world], self.test_y[rank::world]
        return zip(tx.split(batch_size), ty.split(batch_size))

    def subset(self, n_train: int, n_test: int) -> "TensorData":
        return dataclasses.replace(self, train_x=self.train_x[:n_train], train_y=self.train_y[:n_train],
                                   test_x=self.test_x[:n_test], test_y=self.test_y[:n_test])


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
        flip=False,  # digits are not mirror-symmetric
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



def load_npz(root: str, name: str | None = None, num_classes: int | None = None) -> TensorData:
    check_dir(root)
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
# folder:DIR (ImageNet layout: train/<class>/*.jpg, val/<class>/*.jpg), through its decoded cache


# A cache goes on the GPU when it takes at most this fraction of the free device memory, minus
# a reserve for the model's activations; otherwise it streams from host memory.
RESIDENT_FRACTION = 0.8
RESIDENT_RESERVE = 8 << 30
FOLDER_CROP_SCALE = (0.35, 1.0)  # random-resized crop area range for folders (short schedules, small sets)
EVAL_CROP = 0.875  # evaluation: the centre 87.5 % of the cached image, resized to the training size


class FolderData(DataSource):
    """An ImageNet-style folder, read through its decoded uint8 cache (:mod:`mixtrain.folder_cache`).

    Training images are ``cache_size`` pixels square in the cache and rendered at ``size`` pixels
    by the GPU resampling, with an ImageNet-style random-resized crop and flip. ``placement``:
    ``device`` (the whole training split on the GPU), ``host`` (streamed from memory-mapped host
    memory in the order of the plan) or ``auto`` (device when it fits with a margin).
    Evaluation: the centre crop resized to ``size`` on the device.
    """

    def __init__(self, root: str, size: int = 224, cache_size: int = 0, cache_dir: str = "", workers: int = 0,
                 placement: str = "auto", cache=None, log=None):
        from .folder_cache import open_cache

        if placement not in ("auto", "device", "host"):
            raise OptionError("{placement} must be auto, device or host, got {got!r}", got=placement)
        self.name = f"folder:{root}"
        self.root = root
        self.size = int(size)
        self.cache = cache or open_cache(root, cache_size or self.size, cache_dir, workers, log)
        self.classes = self.cache.classes
        self.num_classes = len(self.classes)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.placement = placement
        self.train_store = self.cache.images("train")  # memory-mapped, read-only
        self.test_store = self.cache.images("val")
        self.train_y = torch.from_numpy(self.cache.labels("train"))
        self.test_y = torch.from_numpy(self.cache.labels("val"))
        self.train_x = torch.from_numpy(self.train_store)  # host (memory-mapped) until to()
        self.resident = False
        self.device = torch.device("cpu")

    channels = 3

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def source_size(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[2:])

    def default_augment(self) -> Augment:
        return Augment(pad=0, flip=True, scale=FOLDER_CROP_SCALE)

    def placement_for(self, device: torch.device) -> str:
        """Where the training split will live on ``device``: "device" or "host"."""
        if device.type != "cuda":
            return "host" if self.placement == "host" else "device"  # on the CPU, "device" is the memory map
        if self.placement != "auto":
            return self.placement
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if self.train_x.nbytes <= RESIDENT_FRACTION * free - RESIDENT_RESERVE else "host"

    def to(self, device) -> "FolderData":
        device = torch.device(device)
        self.device = device
        self.train_y = self.train_y.to(device)
        self.test_y = self.test_y.to(device)
        where = self.placement_for(device)
        self.resident = where == "device"
        if self.resident and device.type == "cuda" and not self.train_x.is_cuda:
            try:
                self.train_x = self.train_x.to(device)
            except torch.OutOfMemoryError as e:
                raise OptionError(
                    "the folder cache ({gb:.1f} GB) does not fit on {dev}; use {placement} host (stream it from host "
                    "memory) or a smaller {cache_size}", gb=self.train_x.nbytes / 1e9, dev=str(device)
                ) from e
        return self

    def step_images(self, batches, device, start: int = 0):
        if self.resident:
            return super().step_images(batches, device, start)
        from .stream import HostStream

        stream = HostStream(self.train_x, batches, device, start)
        return stream

    def test_batches(self, batch_size: int, device, rank: int = 0, world: int = 1):
        import torch.nn.functional as F

        device = torch.device(device)
        ids = np.arange(rank, len(self.test_store), world)
        s = self.test_store.shape[2]
        c = max(1, round(s * EVAL_CROP))
        o = (s - c) // 2
        for i in range(0, len(ids), batch_size):
            part = ids[i : i + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(self.test_store[part[0] : part[-1] + 1 : world]))
            x = x.to(device)[:, :, o : o + c, o : o + c].float()
            if c != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            yield x, self.test_y[torch.from_numpy(part).to(device)]

    def subset(self, n_train: int, n_test: int) -> "FolderData":
        sub = copy.copy(self)
        sub.train_x, sub.train_y = self.train_x[:n_train], self.train_y[:n_train]
        sub.test_store, sub.test_y = self.test_store[:n_test], self.test_y[:n_test]
        return sub


# ----------------------------------------------------------------------------------------------


# the registry of --data kinds


@dataclass(frozen=True)
class DataKind:
    """One kind of ``--data`` spec, registered in :data:`DATA_KINDS` under the prefix before ``:``.

    ``load(arg, **options)`` returns its :class:`DataSource`: ``arg`` is the spec's part after the
    ``:`` (``~`` expanded; None when there is none), and ``options`` are ``image_size``,
    ``cache_size``, ``cache_dir``, ``workers`` and ``placement`` (a loader takes what it uses in
    ``**_``). The other fields say what the options and ``--model auto`` make of it, so that no
    code outside this module tests the spec string.
    """

    load: Callable[..., DataSource]
    form: str  # how the spec is written: "npz:DIR", "cifar10[:DIR]"
    help: str  # what it is, for --help (kinds with the same help are listed together)
    needs_arg: bool = False  # the spec must name something after the ":" (a directory)
    image_size: int = 0  # > 0: images are resampled to a training resolution, this one unless --image-size
    #                      gives another (from a cache of --cache-size px); 0: they keep their own size
    imagenet_style: bool = False  # photos: --model auto is ImageNet-style (resnet18_224) at >= 128 px
    auto_model: str = ""  # the model --model auto trains ("": resnet18, or resnet18_224 as above)


def _load_digits(arg, **_):
    return load_digits()


def _load_cifar10(arg, **_):
    return load_cifar("cifar10", arg)


def _load_cifar100(arg, **_):
    return load_cifar("cifar100", arg)


def _load_npz(arg, **_):
    return load_npz(arg)


def _load_folder(arg, image_size, cache_size, cache_dir, workers, placement, **_):
    return FolderData(arg, image_size, cache_size, cache_dir, workers, placement)


_CIFAR_HELP = "torchvision; downloads when online, or reads DIR"

# prefix -> kind. A new source: a loader (here, or in its own module) and one line here.
DATA_KINDS: dict[str, DataKind] = {
    "digits": DataKind(_load_digits, "digits", "scikit-learn's bundled 8x8 digits, upsampled to 16x16; the default",
                       auto_model="digitnet"),
    "cifar10": DataKind(_load_cifar10, "cifar10[:DIR]", _CIFAR_HELP),
    "cifar100": DataKind(_load_cifar100, "cifar100[:DIR]", _CIFAR_HELP),
    "npz": DataKind(_load_npz, "npz:DIR", "train_*.npz + test.npz with x uint8 [N,H,W,C] and y [N]", needs_arg=True),
    "folder": DataKind(_load_folder, "folder:DIR", "ImageNet layout: DIR/train/<class>/*, DIR/val/<class>/*; decoded "
                       "once into a cache, see --cache-dir", needs_arg=True, image_size=224, imagenet_style=True),
}


def data_kind(spec: str) -> DataKind | None:
    """The registered kind of a ``--data`` spec (None: no kind has its prefix)."""
    return DATA_KINDS.get(spec.partition(":")[0])


def data_help() -> str:
    """Every registered kind with what it is, for ``--help`` and error messages."""
    parts: list[list] = []  # [forms, help]: neighbours with the same help are listed together
    for kind in DATA_KINDS.values():
        if parts and parts[-1][1] == kind.help:
            parts[-1][0].append(kind.form)
        else:
            parts.append([[kind.form], kind.help])
    return ", ".join(f"{', '.join(forms)} ({text})" for forms, text in parts)


DATA_HELP = data_help()


def load_data(spec: str, image_size: int | None = None, workers: int = 0, cache_size: int = 0, cache_dir: str = "",
              placement: str = "auto"):
    """Parse ``--data SPEC`` and load it through its kind in :data:`DATA_KINDS`. See
    :data:`DATA_HELP` for the forms.

    Folder options: ``image_size`` (training resolution, default 224), ``cache_size`` (the cache's
    image size, default ``image_size``), ``cache_dir``, ``workers`` (decoding processes when the
    cache is built; 0: all cores) and ``placement`` (see :class:`FolderData`).
    """
    prefix, _, arg = spec.partition(":")
    kind = DATA_KINDS.get(prefix)
    if kind is None:
        raise MixtrainError(f"unknown data spec {spec!r}; use one of: {data_help()}")
    arg = os.path.expanduser(arg) if arg else None
    if kind.needs_arg and not arg:
        raise MixtrainError(f"{prefix} needs a directory, as in {kind.form}")
    if arg and ":" not in kind.form:
        raise MixtrainError(f"{prefix} takes no directory, got {spec!r}: give --data {kind.form}")
    data = kind.load(arg, image_size=image_size or kind.image_size or None, cache_size=cache_size,
                     cache_dir=cache_dir, workers=workers, placement=placement)
    if data.num_classes < 2:  # one class trains to a loss of 0 and 100 % accuracy, which says nothing
        raise MixtrainError(f"--data {spec} has {data.num_classes} class: a classifier needs at least 2")
    return data
