"""A decoded cache for ImageNet-style folders: decode every image once, then train at GPU speed.

A mixed pass needs several decoded images, so a loader that decodes JPEGs per sample on the CPU
cannot feed a mixed epoch faster than a plain one. The first use of a folder (or ``mixtrain
prepare folder:DIR --size S``) therefore decodes every image once, with all CPU cores, into a
uint8 store of fixed size; later runs memory-map it. Training then gathers from it like from any
resident array (see :mod:`mixtrain.data` and :mod:`mixtrain.stream`), and every geometric
augmentation runs on the GPU inside the resampling that renders composites.

Layout of a cache (one folder per source folder and size; nothing in it is pickled)::

    <cache root>/<name>-<hash of the folder's path>-<S>px/
        manifest.json        version, size, policy, classes, counts, skipped files, listing digest
        train_images.npy     uint8 [N, 3, S, S] (NumPy format, memory-mapped)
        train_labels.npy     int64 [N]
        val_images.npy, val_labels.npy
        train_files.tsv, val_files.tsv   path, bytes, mtime_ns of every listed file (for diffs)

Resize policy: shorter side to S (antialiased), then the centre S x S crop. The cache root is
``--cache-dir``, else ``$MIXTRAIN_CACHE``, else ``~/.cache/mixtrain/folders``. A cache costs
``3 * S * S`` bytes per image (150 KB at 224 px, 77 KB at 160 px).

A cache is valid when its manifest says complete, its version and size match, and the digest of
the folder's current listing (relative path, bytes, modification time of every file) equals the
recorded one; otherwise it is rebuilt, and the message says what changed. A build writes into a
temporary sibling folder and renames it into place at the end: an interrupted or failed build never
leaves a cache that looks complete, and never harms an earlier good one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import MixtrainError, MixtrainWarning, OptionError, notice

CACHE_VERSION = 1
CACHE_ENV = "MIXTRAIN_CACHE"
# what ImageFolder reads; other files in class folders are reported and ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
POLICY = "shorter side to S (antialiased), centre crop S x S"


class CacheWarning(MixtrainWarning):
    """A file of the folder was skipped or ignored while preparing its cache."""


def default_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mixtrain", "folders")


def cache_path(folder: str, size: int, root: str = "") -> str:
    """Where the cache of ``folder`` at ``size`` pixels lives."""
    folder = os.path.abspath(folder)
    key = hashlib.sha1(folder.encode()).hexdigest()[:10]
    name = os.path.basename(folder.rstrip(os.sep)) or "root"
    return os.path.join(os.path.expanduser(root or default_root()), f"{name}-{key}-{size}px")


# ----------------------------------------------------------------------------------------------
# listing


@dataclass
class Listing:
    """Every image file of one split, in ImageFolder's order, with its label, bytes and mtime."""

    paths: list[str]  # relative to the folder
    labels: list[int]
    stats: list[tuple[int, int]]  # (bytes, mtime_ns)
    ignored: list[str]  # files in class folders that are not images (by extension)

    def lines(self, rows=None) -> list[str]:
        """``path, bytes, mtime_ns`` per file (what the digest covers), plus its row in the store
        (-1: skipped) when ``rows`` is given."""
        if rows is None:
            return [f"{p}\t{b}\t{m}" for p, (b, m) in zip(self.paths, self.stats)]
        return [f"{p}\t{b}\t{m}\t{r}" for p, (b, m), r in zip(self.paths, self.stats, rows)]


def check_dir(root: str):
    """A data directory must exist, be a directory, and be listable."""
    if not os.path.exists(root):
        raise MixtrainError(f"data directory not found: {root}")
    if not os.path.isdir(root):
        raise MixtrainError(f"data path is not a directory: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise MixtrainError(f"data directory is not readable (permission denied): {root}")


def _check_folder(root: str):
    check_dir(root)
    for split in SPLITS:
        if not os.path.isdir(os.path.join(root, split)):
            raise MixtrainError(f"{root}: no '{split}/' folder (expected train/<class>/... and val/<class>/...)")


def class_names(root: str, split: str) -> list[str]:
    d = os.path.join(root, split)
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise MixtrainError(f"cannot list {d}: {e.strerror or e}") from e


def scan(root: str, split: str, classes: list[str]) -> Listing:
    """The split's image files, sorted per class as ImageFolder sorts them (symlinks followed)."""
    paths, labels, stats, ignored = [], [], [], []
    for label, cls in enumerate(classes):
        top = os.path.join(root, split, cls)
        found = 0
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(rel)
                    continue
                try:
                    st = os.stat(full)
                except OSError as e:
                    raise MixtrainError(f"cannot read {full}: {e.strerror or e}") from e
                paths.append(rel)
                labels.append(label)
                stats.append((int(st.st_size), int(st.st_mtime_ns)))
                found += 1
        if found == 0:
            raise MixtrainError(
                f"{os.path.join(root, split, cls)}: the class folder holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
            )
    return Listing(paths, labels, stats, ignored)


def list_folder(root: str) -> tuple[list[str], dict[str, Listing]]:
    """Classes and per-split listings of an ImageNet-style folder, checked."""
    _check_folder(root)
    classes = class_names(root, "train")
    if not classes:
        raise MixtrainError(f"{root}/train: no class folders (expected train/<class>/<images>)")
    val_classes = class_names(root, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise MixtrainError(
            f"{root}: train/ and val/ have different class folders"
            + (f"; only in train/: {', '.join(only_train[:5])}" if only_train else "")
            + (f"; only in val/: {', '.join(only_val[:5])}" if only_val else "")
        )
    return classes, {split: scan(root, split, classes) for split in SPLITS}


def listing_digest(listings: dict[str, Listing]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"[{split}]\n".encode())
        for line in listings[split].lines():
            h.update(line.encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# decoding


def decode(path: str, size: int) -> np.ndarray:
    """One image file -> uint8 ``[3, size, size]``: shorter side to ``size``, centre crop.

    Grey, palette, CMYK and alpha images become RGB (alpha dropped, as torchvision's loader does);
    16-bit greys are scaled to 8 bits. JPEGs are decoded at a reduced scale where that still
    leaves at least ``size`` pixels (much faster for large photos). Raises on a file that is not a
    readable image.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(im)
            if a.dtype != np.uint8:  # 16-bit (or 32-bit holding 16-bit values) grey
                a = (a.astype(np.int64).clip(0, 65535) // 257).astype(np.uint8)
            im = Image.fromarray(a, "L")
        elif im.mode == "F":
            raise ValueError("floating-point pixels (mode F) are not supported")
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)  # Pillow's resize is antialiased when shrinking
        left, top = (nw - size) // 2, (nh - size) // 2
        if (nw, nh) != (size, size):
            im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def _decode_chunk(task):
    """Worker: decode files into rows of the split's memory-mapped store; returns the failures."""
    store, size, root, rows, paths = task
    out = np.load(store, mmap_mode="r+")
    failed = []
    for row, rel in zip(rows, paths):
        try:
            out[row] = decode(os.path.join(root, rel), size)
        except Exception as e:  # noqa: BLE001 -- any decoding failure means "skip and report this file"
            out[row] = 0
            failed.append((row, rel, f"{type(e).__name__}: {e}"))
    out.flush()
    del out
    return len(rows), failed


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_CLAMP_SAID: set = set()


def decoding_workers(workers: int) -> int:
    """Decoding processes for ``workers`` (``--workers``): 0 means all CPU cores, and more than the
    cores is clamped to them -- extra processes only compete for the same cores -- with one notice
    per process and value."""
    cores = _cpu_count()
    if workers <= 0:
        return cores
    if workers > cores:
        if workers not in _CLAMP_SAID:
            _CLAMP_SAID.add(workers)
            notice(f"--workers {workers}: this machine gives the process {cores} CPU core(s); "
                   f"decoding with {cores} process(es)", stacklevel=3)
        return cores
    return workers


# ----------------------------------------------------------------------------------------------
# the cache


@dataclass
class Cache:
    """A complete cache, opened read-only (arrays memory-mapped)."""

    path: str
    manifest: dict

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def images(self, split: str) -> np.ndarray:
        """uint8 ``[N, 3, S, S]``, memory-mapped copy-on-write (never written back)."""
        return np.load(os.path.join(self.path, f"{split}_images.npy"), mmap_mode="c", allow_pickle=False)

    def labels(self, split: str) -> np.ndarray:
        return np.load(os.path.join(self.path, f"{split}_labels.npy"), allow_pickle=False)

    def files(self, split: str) -> list[str]:
        """The file behind each stored image of ``split``, in row order (relative to the folder)."""
        out = []
        with open(os.path.join(self.path, f"{split}_files.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if int(parts[3]) >= 0:
                    out.append(parts[0])
        return out

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))


def _read_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            m = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MixtrainError(f"the folder cache {path} has an unreadable manifest ({e}); delete the folder to rebuild it")
    return m if isinstance(m, dict) else None


def _check_arrays(path: str, m: dict):
    """Shapes and dtypes of the stored arrays agree with the manifest (a damaged cache is refused)."""
    s = int(m["size"])
    for split in SPLITS:
        n = int(m["counts"][split])
        try:
            x = np.load(os.path.join(path, f"{split}_images.npy"), mmap_mode="r", allow_pickle=False)
            y = np.load(os.path.join(path, f"{split}_labels.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MixtrainError(f"the folder cache {path} is damaged ({split}: {e}); delete it to rebuild")
        if x.dtype != np.uint8 or x.shape != (n, 3, s, s) or y.shape != (n,) or y.dtype != np.int64:
            raise MixtrainError(
                f"the folder cache {path} is damaged ({split}_images.npy is {x.dtype} {x.shape}, labels {y.dtype} "
                f"{y.shape}; the manifest says {n} images of 3x{s}x{s}); delete it to rebuild"
            )
        if n and (y.min() < 0 or y.max() >= len(m["classes"])):
            raise MixtrainError(f"the folder cache {path} is damaged ({split} labels out of range); delete it to rebuild")


def _diff_message(path: str, listings: dict[str, Listing]) -> str:
    """'3 added, 1 removed, 2 modified' between the cached listing and the folder's current one."""
    added = removed = modified = 0
    for split in SPLITS:
        old = {}
        try:
            with open(os.path.join(path, f"{split}_files.tsv")) as f:
                for line in f:
                    p, b, m = line.rstrip("\n").split("\t")[:3]
                    old[p] = f"{b}\t{m}"
        except OSError:
            return "its file list is missing"
        new = {p: f"{b}\t{m}" for p, (b, m) in zip(listings[split].paths, listings[split].stats)}
        added += len(new.keys() - old.keys())
        removed += len(old.keys() - new.keys())
        modified += sum(1 for p in new.keys() & old.keys() if new[p] != old[p])
    return f"{added} added, {removed} removed, {modified} modified"


def status(root: str, size: int, cache_dir: str = "") -> tuple[str, str, dict[str, Listing] | None, list[str] | None]:
    """``(state, why, listings, classes)``: state is "valid", "missing" or "stale"."""
    classes, listings = list_folder(root)
    path = cache_path(root, size, cache_dir)
    m = _read_manifest(path)
    if m is None:
        return "missing", "no cache yet", listings, classes
    if m.get("version") != CACHE_VERSION:
        return "stale", f"it was built by cache format {m.get('version')}, this mixtrain reads {CACHE_VERSION}", listings, classes
    if not m.get("complete"):
        return "stale", "its build did not finish", listings, classes
    if m.get("size") != size:
        return "stale", f"it holds {m.get('size')} px images, {size} px were asked for", listings, classes
    if m.get("classes") != classes:
        return "stale", "the class folders changed", listings, classes
    if m.get("listing_digest") != listing_digest(listings):
        return "stale", f"the folder changed since it was built ({_diff_message(path, listings)})", listings, classes
    return "valid", "", listings, classes


def open_cache(root: str, size: int, cache_dir: str = "", workers: int = 0, log=None) -> Cache:
    """The cache of ``root`` at ``size`` px, built (or rebuilt) first when missing or stale."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    state, why, listings, classes = status(root, size, cache_dir)
    path = cache_path(root, size, cache_dir)
    if state == "stale":
        log(f"rebuilding the folder cache {path}: {why}")
    if state != "valid":
        build(root, size, cache_dir, workers, listings=listings, classes=classes, log=log)
    return open_built(path)


def open_built(path: str) -> Cache:
    """A complete cache at ``path`` (found valid by :func:`status`), its arrays checked against its manifest."""
    m = _read_manifest(path)
    _check_arrays(path, m)
    return Cache(path, m)


def _writable_parent(path: str):
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OptionError("cannot create the folder cache under {parent} ({why}); choose another place with "
                          "{cache_dir} or ${env}", parent=parent, why=e.strerror or e, env=CACHE_ENV) from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError("cannot write the folder cache under {parent} (read-only or permission denied); choose "
                          "another place with {cache_dir} or ${env}", parent=parent, env=CACHE_ENV)


def build(
    root: str,
    size: int,
    cache_dir: str = "",
    workers: int = 0,
    listings: dict[str, Listing] | None = None,
    classes: list[str] | None = None,
    log=None,
    progress: bool | None = None,
) -> Cache:
    """Decode every image of ``root`` once into a new cache (atomically replacing any old one).

    ``workers``: decoding processes (0: all CPU cores; 1: in this process). Unreadable files are
    skipped, listed in the manifest and reported (a :class:`CacheWarning` naming them); files that
    are not images by extension are ignored and reported the same way.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if size < 1:
        raise MixtrainError(f"the cache size must be at least 1 pixel, got {size}")
    if listings is None or classes is None:
        classes, listings = list_folder(root)
    path = cache_path(root, size, cache_dir)
    _writable_parent(path)
    total = sum(len(listings[s].paths) for s in SPLITS)
    need = _check_free_space(path, size, total)
    workers = decoding_workers(workers)
    # built under a name of its own and renamed into place once finished: a failed or interrupted
    # build never leaves a half-written cache at ``path``
    tmp = f"{path}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"preparing the folder cache of {root} at {size} px: {total:,} images, {workers} process(es) -> {path}")
    try:
        manifest = _build_into(tmp, root, size, listings, classes, workers, progress, t0)
        _swap_into_place(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OptionError("the disk under {where} filled up while preparing the folder cache (it needs {gb:.2f} GB); "
                              "free space or choose another place with {cache_dir}", where=os.path.dirname(path),
                              gb=need / 1e9) from e
        raise MixtrainError(f"cannot write the folder cache {path}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report_files(root, manifest["skipped"], manifest["ignored"])
    cache = Cache(path, manifest)
    counts = manifest["counts"]
    log(f"folder cache ready: {counts['train']:,} train + {counts['val']:,} val images, "
        f"{cache.nbytes() / 1e9:.2f} GB, {manifest['build_seconds']:.1f} s")
    return cache


def _check_free_space(path: str, size: int, total: int) -> int:
    """Bytes the cache of ``total`` images at ``size`` px takes; refused up front when the disk of
    ``path`` has less free."""
    need = total * 3 * size * size
    free = shutil.disk_usage(os.path.dirname(path)).free
    if need > free:
        raise OptionError("the folder cache needs {need:.2f} GB ({total:,} images of 3x{size}x{size}) but {where} has "
                          "{free:.2f} GB free; choose another place with {cache_dir}", need=need / 1e9, total=total,
                          size=size, where=os.path.dirname(path), free=free / 1e9)
    return need


def _build_into(tmp: str, root: str, size: int, listings: dict[str, Listing], classes: list[str], workers: int,
                progress, t0: float) -> dict:
    """Write the whole cache into the new folder ``tmp``; returns its manifest, written last (and
    synced) so that a cache with a manifest is a finished one."""
    os.makedirs(tmp)
    skipped: list[dict] = []
    counts = {}
    for split in SPLITS:
        counts[split], unreadable = _write_split(tmp, root, split, listings[split], size, workers, progress)
        skipped += unreadable
    manifest = {
        "version": CACHE_VERSION,
        "complete": True,
        "root": os.path.abspath(root),
        "size": size,
        "policy": POLICY,
        "layout": "uint8 [N, 3, S, S] (NumPy .npy), labels int64 [N]",
        "classes": classes,
        "counts": counts,
        "skipped": skipped,
        "ignored": [p for s in SPLITS for p in listings[s].ignored],
        "listing_digest": listing_digest(listings),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "workers": workers,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _write_split(tmp: str, root: str, split: str, listing: Listing, size: int, workers: int,
                 progress) -> tuple[int, list[dict]]:
    """Decode one split into ``tmp``: its images (unreadable ones left out), labels, and file list
    (each file's row in the arrays, -1 when left out). Returns (images kept, the files left out)."""
    n = len(listing.paths)
    store = os.path.join(tmp, f"{split}_images.npy")
    np.lib.format.open_memmap(store, mode="w+", dtype=np.uint8, shape=(n, 3, size, size)).flush()
    failed = _decode_split(store, size, root, listing.paths, workers, f"decoding {split}", progress)
    bad_rows = sorted(r for r, _, _ in failed)
    skipped = [{"path": rel, "split": split, "reason": why} for _, rel, why in sorted(failed)]
    labels = np.asarray(listing.labels, dtype=np.int64)
    if bad_rows:
        _compact(store, bad_rows)
        labels = np.delete(labels, bad_rows)
    np.save(os.path.join(tmp, f"{split}_labels.npy"), labels, allow_pickle=False)
    rows = np.full(n, -1, np.int64)
    kept = np.setdiff1d(np.arange(n), np.asarray(bad_rows, dtype=np.int64))
    rows[kept] = np.arange(len(kept))
    with open(os.path.join(tmp, f"{split}_files.tsv"), "w") as f:
        f.writelines(line + "\n" for line in listing.lines(rows.tolist()))
    if len(labels) == 0:
        raise MixtrainError(f"{root}/{split}: none of its {n} images could be read")
    return int(len(labels)), skipped


def _decode_split(store: str, size: int, root: str, paths: list[str], workers: int, desc: str, progress) -> list:
    from tqdm.auto import tqdm

    chunk = 64
    tasks = [(store, size, root, list(range(i, min(i + chunk, len(paths)))), paths[i : i + chunk])
             for i in range(0, len(paths), chunk)]
    failed = []
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=len(paths), desc=desc, unit="img", disable=disable, leave=False) as bar:
        if workers == 1 or len(tasks) <= 1:
            results = map(_decode_chunk, tasks)
            for n, f in results:
                failed += f
                bar.update(n)
        else:
            import multiprocessing as mp

            # fork: workers inherit the imported modules (no re-import per worker); they only
            # decode files and write rows of their own memory-mapped store
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for n, f in pool.imap_unordered(_decode_chunk, tasks):
                    failed += f
                    bar.update(n)
    return failed


def _compact(store: str, bad_rows: list[int]):
    """Rewrite ``store`` without ``bad_rows`` (files that could not be decoded)."""
    x = np.load(store, mmap_mode="r")
    keep = np.setdiff1d(np.arange(len(x)), np.asarray(bad_rows))
    tmp = store + ".compact.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *x.shape[1:]))
    for i in range(0, len(keep), 1024):
        out[i : i + 1024] = x[keep[i : i + 1024]]
    out.flush()
    del out, x
    os.replace(tmp, store)


def _swap_into_place(tmp: str, path: str):
    """Rename the finished build over ``path``; an old cache is moved aside first, then deleted."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _report_files(root: str, skipped: list[dict], ignored: list[str]):
    def shown(items):
        return "; ".join(items[:10]) + (f"; ... and {len(items) - 10} more" if len(items) > 10 else "")

    if skipped:
        warnings.warn(
            f"{root}: skipped {len(skipped)} unreadable image file(s): "
            + shown([f"{s['path']} ({s['reason']})" for s in skipped]),
            CacheWarning,
            stacklevel=3,
        )
    if ignored:
        warnings.warn(f"{root}: ignored {len(ignored)} file(s) that are not images: {shown(ignored)}", CacheWarning,
                      stacklevel=3)
