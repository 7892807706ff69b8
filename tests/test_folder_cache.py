"""The decoded folder cache: build, reuse, invalidation, odd and bad files, atomic builds; the GPU-path
random-resized crop against a reference; streamed and resident batches; exact resume from the cache."""

import json
import math
import os
import shutil
import stat
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mixtrain import folder_cache as FC
from mixtrain.batches import EpochBatches
from mixtrain.cli import main
from mixtrain.compose import RAND_BASE, RRC_TRIES, Augment, Normalizer, compose_from, geometry, rrc_windows
from mixtrain.data import FolderData, load_data
from mixtrain.errors import MixtrainError
from mixtrain.strategies import MixOptions, MixTrain
from mixtrain.trainer import TrainConfig, Trainer
from test_reliability import crash_then_resume, without_timings


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(FC.CACHE_ENV, str(tmp_path / "cache"))


def make_folder(root, classes=3, per_class=6, val_per_class=2, size=(20, 28), fmt="png", seed=0):
    """ImageNet layout; class c is brighter in channel c, so a model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
                a[..., c] += 160
                Image.fromarray(a).save(os.path.join(d, f"i{i:02d}.{fmt}"))
    return str(root)


def build(root, size=16, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FC.CacheWarning)  # a clean folder gives no warning
        return FC.open_cache(root, size, workers=1, log=lambda s: None, **kw)


# ------------------------------------------------------------------------------------------------
# build, reuse, invalidation


def test_cache_is_built_once_reused_and_holds_every_image(tmp_path):
    root = make_folder(tmp_path / "f")
    messages = []
    cache = FC.open_cache(root, 16, workers=2, log=messages.append)
    assert any("preparing" in m for m in messages)
    m = cache.manifest
    assert m["complete"] and m["size"] == 16 and m["classes"] == ["c0", "c1", "c2"]
    assert m["counts"] == {"train": 18, "val": 6} and m["skipped"] == [] and m["ignored"] == []
    x, y = cache.images("train"), cache.labels("train")
    assert x.shape == (18, 3, 16, 16) and x.dtype == np.uint8 and y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # every stored image is its file, resized and centre-cropped (the decode function's output)
    for i, rel in enumerate(sorted(os.listdir(os.path.join(root, "train", "c1")))):
        np.testing.assert_array_equal(x[6 + i], FC.decode(os.path.join(root, "train", "c1", rel), 16))
    # the class shows in the pixels: channel c brightest for class c
    assert (x[:6, 0].mean() > x[:6, 1].mean()) and (x[12:, 2].mean() > x[12:, 0].mean())
    mtime = os.path.getmtime(os.path.join(cache.path, "train_images.npy"))
    again = []
    FC.open_cache(root, 16, workers=1, log=again.append)
    assert again == [] and os.path.getmtime(os.path.join(cache.path, "train_images.npy")) == mtime  # reused
    assert json.load(open(os.path.join(cache.path, "manifest.json")))["version"] == FC.CACHE_VERSION


@pytest.mark.parametrize("change", ["modify", "add", "remove"])
def test_a_changed_folder_is_detected_and_the_cache_rebuilt(change, tmp_path):
    root = make_folder(tmp_path / "f")
    build(root)
    target = os.path.join(root, "train", "c0", "i00.png")
    if change == "modify":
        Image.fromarray(np.full((20, 28, 3), 7, np.uint8)).save(target)
        os.utime(target, ns=(1, 1))  # even with an older mtime: the size or mtime differs
    elif change == "add":
        shutil.copy(target, os.path.join(root, "train", "c0", "new.png"))
    else:
        os.remove(target)
    state, why, _, _ = FC.status(root, 16)
    assert state == "stale"
    expected = {"modify": "0 added, 0 removed, 1 modified", "add": "1 added, 0 removed, 0 modified",
                "remove": "0 added, 1 removed, 0 modified"}[change]
    assert expected in why
    messages = []
    cache = FC.open_cache(root, 16, workers=1, log=messages.append)
    assert any(m.startswith("rebuilding") and expected in m for m in messages)
    n = {"modify": 18, "add": 19, "remove": 17}[change]
    assert cache.manifest["counts"]["train"] == n and FC.status(root, 16)[0] == "valid"
    if change == "modify":
        assert (cache.images("train")[0] == 7).all()


def test_sizes_are_separate_caches_and_another_version_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "f")
    a, b = build(root, 16), build(root, 12)
    assert a.path != b.path and b.images("train").shape[2:] == (12, 12)
    manifest = os.path.join(a.path, "manifest.json")
    m = json.load(open(manifest))
    m["version"] = 0
    json.dump(m, open(manifest, "w"))
    state, why, _, _ = FC.status(root, 16)
    assert state == "stale" and "cache format 0" in why
    assert build(root, 16).manifest["version"] == FC.CACHE_VERSION


# ------------------------------------------------------------------------------------------------
# odd files


def test_grey_cmyk_rgba_16bit_palette_and_mixed_sizes_decode_to_rgb(tmp_path):
    root = make_folder(tmp_path / "f", per_class=1, val_per_class=1)
    d = os.path.join(root, "train", "c0")
    Image.fromarray(np.full((30, 50), 200, np.uint8), "L").save(os.path.join(d, "grey.jpg"), quality=100)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(os.path.join(d, "cmyk.jpg"), quality=100)  # red
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 180, 10  # green, nearly transparent: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "rgba.png"))
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(os.path.join(d, "deep.png"))  # 16-bit grey
    Image.fromarray(np.full((18, 18, 3), 90, np.uint8)).convert("P", palette=Image.ADAPTIVE).save(os.path.join(d, "pal.png"))
    Image.fromarray(np.full((300, 90, 3), 60, np.uint8)).save(os.path.join(d, "tall.png"))  # mixed sizes
    cache = build(root, 16)
    x = cache.images("train")
    files = cache.files("train")
    row = {os.path.basename(f): i for i, f in enumerate(files)}
    assert x.shape == (len(files), 3, 16, 16)
    grey = x[row["grey.jpg"]]
    assert np.abs(grey.astype(int) - 200).max() <= 2 and (grey[0] == grey[1]).all()
    red = x[row["cmyk.jpg"]].reshape(3, -1).mean(1)
    assert red[0] > 200 and red[1] < 30 and red[2] < 30
    assert (x[row["rgba.png"]][1] == 180).all() and (x[row["rgba.png"]][0] == 0).all()
    assert (x[row["deep.png"]] == 40000 // 257).all()
    assert (np.abs(x[row["pal.png"]].astype(int) - 90) <= 1).all()
    assert (x[row["tall.png"]] == 60).all()


def test_decode_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # the centre square of a 2:1 image is white
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = FC.decode(str(tmp_path / "wide.png"), 20)
    assert out.shape == (3, 20, 20) and out[:, :, 1:-1].min() >= 250  # only the centre square is kept


def test_corrupt_truncated_and_non_image_files_are_skipped_and_named(tmp_path):
    root = make_folder(tmp_path / "f", fmt="jpg")
    d = os.path.join(root, "train", "c1")
    open(os.path.join(d, "broken.jpg"), "wb").write(b"not an image at all")
    whole = open(os.path.join(d, "i00.jpg"), "rb").read()
    open(os.path.join(d, "cut.jpg"), "wb").write(whole[: len(whole) // 2])
    open(os.path.join(d, "notes.txt"), "w").write("hello")
    with pytest.warns(FC.CacheWarning) as record:
        cache = FC.open_cache(root, 16, workers=2, log=lambda s: None)
    text = " ".join(str(w.message) for w in record)
    assert "broken.jpg" in text and "cut.jpg" in text and "notes.txt" in text
    assert {s["path"] for s in cache.manifest["skipped"]} == {"train/c1/broken.jpg", "train/c1/cut.jpg"}
    assert cache.manifest["ignored"] == ["train/c1/notes.txt"]
    # the skipped rows are gone: every label and image belongs to a readable file
    x, y = cache.images("train"), cache.labels("train")
    assert len(x) == len(y) == 18 and y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert x.reshape(18, 3, -1).mean(2).max() > 0  # no zero-filled hole left behind
    assert FC.status(root, 16)[0] == "valid"  # skipped files do not make the cache stale


def test_an_image_over_the_decompression_limit_is_skipped_and_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(os.path.join(root, "train", "c2", "huge.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 60 = 2400 > 2 x 1000: a "bomb"
    with pytest.warns(FC.CacheWarning, match=r"train/c2/huge.png \(DecompressionBombError"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            cache = FC.open_cache(root, 16, workers=1, log=lambda s: None)
    assert cache.manifest["counts"]["train"] == 18


def test_cli_prepare_reports_and_warns_in_one_line_each(tmp_path, capsys):
    root = make_folder(tmp_path / "f")
    open(os.path.join(root, "train", "c0", "bad.png"), "wb").write(b"x")
    assert main(["prepare", f"folder:{root}", "--size", "16", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "18 train + 6 val images, 3 classes, 16 px" in out and "1 skipped" in out
    assert "warning:" in err and "train/c0/bad.png" in err and "Traceback" not in err
    assert main(["prepare", f"folder:{root}", "--size", "16"]) == 0
    assert "up to date" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# bad input and failed builds


def assert_clean_error(code, err, *parts):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if not l.startswith(("preparing", "rebuilding", "folder cache ready"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for p in parts:
        assert p in lines[0], err


@pytest.mark.parametrize("case", ["file", "no-val", "classes", "empty-class", "nothing-readable"])
def test_bad_folders_give_one_error_line(case, tmp_path, capsys):
    root = tmp_path / "f"
    if case == "file":
        root.write_text("x")
        expected = "not a directory"
    else:
        make_folder(root)
        if case == "no-val":
            shutil.rmtree(root / "val")
            expected = "no 'val/' folder"
        elif case == "classes":
            os.rename(root / "val" / "c2", root / "val" / "zz")
            expected = "different class folders; only in train/: c2; only in val/: zz"
        elif case == "empty-class":
            os.makedirs(root / "train" / "c9")
            os.makedirs(root / "val" / "c9")
            expected = "c9: the class folder holds no images"
        else:
            for p in (root / "val").rglob("*.png"):
                p.write_bytes(b"junk")
            expected = "none of its 6 images could be read"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["prepare", f"folder:{root}", "--size", "16", "--workers", "1"])
    assert_clean_error(code, capsys.readouterr().err, expected)


def test_read_only_cache_place_is_a_clear_error(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: simulate the permission check instead
        monkeypatch.setattr(FC.os, "access", lambda p, mode: not str(p).startswith(str(tmp_path / "ro")))
    root = make_folder(tmp_path / "f")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = main(["prepare", f"folder:{root}", "--size", "16", "--cache-dir", str(ro), "--workers", "1"])
    finally:
        ro.chmod(stat.S_IRWXU)
    assert_clean_error(code, capsys.readouterr().err, "read-only or permission denied", "--cache-dir")


def test_not_enough_disk_is_refused_before_decoding(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "f")
    monkeypatch.setattr(FC.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    code = main(["prepare", f"folder:{root}", "--size", "16", "--workers", "1"])
    assert_clean_error(code, capsys.readouterr().err, "needs 0.00 GB", "--cache-dir")
    assert not os.path.exists(tmp_path / "cache") or not any("building" in n for n in os.listdir(tmp_path / "cache"))


def test_a_failed_rebuild_keeps_the_earlier_good_cache(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "f")
    good = build(root)
    before = good.images("train").copy()
    shutil.copy(os.path.join(root, "train", "c0", "i00.png"), os.path.join(root, "train", "c0", "new.png"))
    real_save = np.save

    def disk_full(path, *a, **kw):
        if "labels" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(path, *a, **kw)

    monkeypatch.setattr(FC.np, "save", disk_full)
    code = main(["prepare", f"folder:{root}", "--size", "16", "--workers", "1"])
    assert_clean_error(code, capsys.readouterr().err, "filled up")
    monkeypatch.setattr(FC.np, "save", real_save)
    # the old cache is untouched and complete; no half-built folder is left
    assert not any(".building" in n for n in os.listdir(os.path.dirname(good.path)))
    m = json.load(open(os.path.join(good.path, "manifest.json")))
    assert m["complete"] and m["counts"]["train"] == 18
    np.testing.assert_array_equal(np.load(os.path.join(good.path, "train_images.npy")), before)
    assert FC.status(root, 16)[0] == "stale"  # and it is rebuilt once the disk has room
    assert build(root).manifest["counts"]["train"] == 19


def test_an_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    calls = {"n": 0}
    real = FC.decode

    def interrupted(path, size):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(FC, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FC.open_cache(root, 16, workers=1, log=lambda s: None)
    assert not os.path.exists(FC.cache_path(root, 16))
    assert not os.listdir(os.path.dirname(FC.cache_path(root, 16)))  # the temporary build is gone
    assert FC.status(root, 16)[0] == "missing"


def test_a_damaged_cache_is_refused_with_its_path(tmp_path):
    root = make_folder(tmp_path / "f")
    cache = build(root)
    np.save(os.path.join(cache.path, "train_images.npy"), np.zeros((3, 3, 16, 16), np.uint8))
    with pytest.raises(MixtrainError, match="is damaged .*train_images.npy.*delete it to rebuild"):
        FC.open_cache(root, 16, log=lambda s: None)


# ------------------------------------------------------------------------------------------------
# the GPU-path random-resized crop


def torchvision_window(draws, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, consuming the given uniform draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(RRC_TRIES):
        target = area * (scale[0] + draws[2 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + draws[2 * t + 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(draws[2 * RRC_TRIES] * (height - h + 1))
            j = int(draws[2 * RRC_TRIES + 1] * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale,ratio,src", [((0.08, 1.0), (3 / 4, 4 / 3), (48, 48)),
                                             ((0.35, 1.0), (3 / 4, 4 / 3), (40, 64)),
                                             ((0.9, 1.0), (2.0, 3.0), (48, 40))])  # often falls back
def test_random_resized_crop_windows_match_torchvision_for_the_same_draws(scale, ratio, src):
    g = torch.Generator().manual_seed(1)
    draws = torch.rand(400, 2 * RRC_TRIES + 2, generator=g)
    ours = rrc_windows(draws, src, scale, ratio)
    ref = torch.tensor([torchvision_window(d.tolist(), *src, scale, ratio) for d in draws], dtype=torch.float32)
    assert (ours - ref).abs().max() <= 1  # within a pixel (float32 vs float64 rounding)
    assert (ours == ref).all(1).float().mean() > 0.97


@pytest.mark.parametrize("flip", [False, True])
def test_random_resized_crop_renders_like_torchvision_resized_crop(flip):
    from torchvision.transforms.v2 import functional as TF

    src, out = (48, 40), (32, 32)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (6, 3, *src), dtype=torch.uint8, generator=g)
    rand = torch.rand(6, 1, RAND_BASE + 2 * RRC_TRIES + 2, generator=g)
    rand[..., 4] = 0.2 if flip else 0.8  # the flip draw
    aug = Augment(pad=0, flip=True, scale=(0.1, 1.0))
    box = torch.tensor([0, 0, 4, 4]).expand(6, 1, 4)
    geo = geometry(box, torch.zeros(6, 1, dtype=torch.bool), torch.ones(6, 1), rand, (4, 4), out, aug, src_size=src)
    identity = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    ours = compose_from(images, torch.arange(6)[:, None], geo, identity, single=True)
    windows = rrc_windows(rand[:, 0, RAND_BASE:], src, aug.scale, aug.ratio)
    for k in range(6):
        top, left, h, w = (int(v) for v in windows[k])
        ref = TF.resized_crop(images[k].float(), top, left, h, w, list(out), antialias=False)
        if flip:
            ref = ref.flip(-1)
        # bilinear sampling at the same points; only the outer pixel row may read outside the window
        assert (ours[k, :, 1:-1, 1:-1] - ref[:, 1:-1, 1:-1]).abs().max() < 0.01  # of 255: float rounding only


def test_rrc_composites_put_each_window_into_its_region():
    """A pair with random-resized crops: each region shows its own constituent's pixels only."""
    src = (24, 24)
    images = torch.stack([torch.full((3, *src), 50, dtype=torch.uint8), torch.full((3, *src), 200, dtype=torch.uint8)])
    box = torch.tensor([[[0, 0, 4, 1], [0, 1, 4, 4]]])  # left quarter, right three quarters
    rand = torch.rand(1, 2, RAND_BASE + 2 * RRC_TRIES + 2, generator=torch.Generator().manual_seed(0))
    aug = Augment(pad=0, flip=True, scale=(0.2, 1.0))
    identity = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    for resize in (False, True):
        geo = geometry(box, torch.tensor([[resize, resize]]), torch.tensor([[0.25, 0.75]]), rand, (4, 4), (32, 32),
                       aug, src_size=src)
        x = compose_from(images, torch.tensor([[0, 1]]), geo, identity)
        assert torch.allclose(x[0, :, :, :8], torch.tensor(50.0)) and torch.allclose(x[0, :, :, 8:], torch.tensor(200.0))


# ------------------------------------------------------------------------------------------------
# training from the cache


def mixed_plan(n, grid, seed=0):
    opts = MixOptions(rule="all", first_unmixed_epochs=0, final_unmixed_epochs=0, quad_confidence=0.9)
    return MixTrain(n, grid, 5, "cpu", opts).plan_epoch(0, np.random.default_rng(seed))


def test_streamed_and_resident_batches_are_identical(tmp_path):
    root = make_folder(tmp_path / "f", per_class=10)
    resident = load_data(f"folder:{root}", image_size=24, cache_size=16, workers=1, placement="device").to("cpu")
    streamed = load_data(f"folder:{root}", image_size=24, cache_size=16, workers=1, placement="host").to("cpu")
    assert resident.resident and not streamed.resident
    aug = resident.default_augment()
    assert aug.scale == (0.35, 1.0) and aug.flip and aug.pad == 0  # the folder's own defaults
    batches = EpochBatches(mixed_plan(30, (4, 4)), 4, (4, 4), "cpu", torch.Generator().manual_seed(0),
                           image_size=(24, 24), augment=aug, src_size=(16, 16))
    norm = Normalizer(resident.mean, resident.std, "cpu")
    for start in (0, 3):  # from the start, and resumed mid-epoch
        a, b = resident.step_images(batches, "cpu", start), streamed.step_images(batches, "cpu", start)
        loaded = 0
        for j in range(start, len(batches)):
            ia, sa = a.get(j)
            ib, sb = b.get(j)
            assert sa is None and sb is not None and len(ib) <= 4 * 4
            loaded += len(ib)
            batch = batches.batch(j)
            xa, xb = batch.compose(ia, norm, sa), batch.compose(ib, norm, sb)
            assert xa.shape == (4, 3, 24, 24) and torch.equal(xa, xb)
        b.close()
        if start == 0:
            assert loaded < 4 * 4 * len(batches)  # only the images the steps show, each once per step
        with pytest.raises(RuntimeError, match="out of order"):
            streamed.step_images(batches, "cpu", 1).get(2)


def test_evaluation_centre_crops_and_resizes_on_the_device(tmp_path):
    import torch.nn.functional as F

    root = make_folder(tmp_path / "f")
    data = load_data(f"folder:{root}", image_size=20, cache_size=16, workers=1).to("cpu")
    xs, ys = zip(*data.test_batches(4, "cpu"))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 3, 20, 20) and y.tolist() == [0, 0, 1, 1, 2, 2]
    val = torch.from_numpy(np.asarray(data.test_store)).float()
    ref = F.interpolate(val[:, :, 1:15, 1:15], size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(x, ref)
    # under DDP each rank scores every world-th sample
    x1 = torch.cat([b for b, _ in data.test_batches(2, "cpu", rank=1, world=2)])
    assert torch.allclose(x1, ref[1::2])


def folder_cfg(out, root, **kw):
    base = dict(data=f"folder:{root}", model="digitnet", image_size=16, cache_size=16, workers=1, epochs=3,
                batch_size=6, lr=0.05, out=str(out), device="cpu", deterministic=True, progress="none",
                mix=MixOptions(rule="fraction", fraction=0.5, final_unmixed_epochs=0))
    base.update(kw)
    return TrainConfig(**base)


def test_placement_host_trains_exactly_like_device(tmp_path):
    root = make_folder(tmp_path / "f", per_class=8)
    a = Trainer(folder_cfg(tmp_path / "a", root, method="mixtrain", placement="device")).fit()
    b = Trainer(folder_cfg(tmp_path / "b", root, method="mixtrain", placement="host")).fit()
    assert a["passes"] < a["samples"]  # it mixed
    for key in ("passes", "samples", "test_accuracy"):
        assert a[key] == b[key]
    assert [r["train_loss"] for r in a["epochs_log"]] == [r["train_loss"] for r in b["epochs_log"]]


def test_a_run_killed_mid_epoch_resumes_exactly_from_the_cache(tmp_path):
    root = make_folder(tmp_path / "f", per_class=8)
    ref = Trainer(folder_cfg(tmp_path / "ref", root, method="mixtrain", placement="host")).fit()
    resumed = crash_then_resume(
        lambda **kw: folder_cfg(tmp_path / "run", root, method="mixtrain", placement="host", checkpoint_every=2, **kw),
        "epoch 2, step 2")
    for key in ("passes", "samples", "test_accuracy"):
        assert resumed[key] == ref[key]
    assert without_timings(resumed["epochs_log"]) == without_timings(ref["epochs_log"])


def test_folder_trains_through_the_cli_and_records_the_cache(tmp_path, capsys):
    root = make_folder(tmp_path / "f", per_class=8)
    out = tmp_path / "run"
    code = main(["train", "--data", f"folder:{root}", "--image-size", "16", "--model", "digitnet", "--method",
                 "mixtrain", "--mix-rule", "all", "--final-unmixed-epochs", "0", "--quad-confidence", "0",
                 "--epochs", "2", "--batch-size", "8", "--workers", "2", "--device", "cpu", "--lr", "0.05",
                 "--progress", "none", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert [e["passes"] for e in m["epochs_log"]] == [24, 12]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grid"] == [4, 4] and cfg["augment"]["scale"] == [0.35, 1.0] and cfg["placement"] == "auto"
    assert os.path.isdir(FC.cache_path(root, 16))
