"""Every ``--data`` form loads into the same shapes and dtypes, from tiny fixtures built here."""

import os
import pickle

import numpy as np
import pytest
import torch

from mixtrain import MixtrainError, OptionError, load_data
from mixtrain.data import IMAGENET_MEAN, IMAGENET_STD


def _check_tensor_data(d, n_train, n_test, chw, num_classes):
    assert d.train_x.dtype == torch.uint8 and d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == torch.int64 and d.test_y.dtype == torch.int64
    assert tuple(d.train_x.shape) == (n_train, *chw)
    assert tuple(d.test_x.shape) == (n_test, *chw)
    assert tuple(d.train_y.shape) == (n_train,) and tuple(d.test_y.shape) == (n_test,)
    assert d.num_train == n_train
    assert d.channels == chw[0] and d.image_size == chw[1:]
    assert d.num_classes == num_classes
    # mean/std are the per-channel statistics of the training images on the 0..1 scale
    f = d.train_x.double() / 255.0
    assert len(d.mean) == len(d.std) == chw[0]
    np.testing.assert_allclose(d.mean, f.mean((0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.std, f.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-6, atol=1e-9)


def test_digits():
    d = load_data("digits")
    _check_tensor_data(d, 1437, 360, (1, 16, 16), 10)
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    assert set(d.train_y.tolist()) == set(range(10)) == set(d.test_y.tolist())
    # 8x8 upsampled by 2: every 2x2 block is constant
    x = d.train_x[:20, 0]
    assert torch.equal(x[:, ::2, ::2], x[:, 1::2, 1::2])
    # the split does not depend on any global seed
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(load_data("digits").test_y, d.test_y)


def _npz_fixture(root, rng, sizes=(5, 7), test=4, hwc=(6, 8, 3), classes=3):
    os.makedirs(root, exist_ok=True)
    parts = []
    for i, n in enumerate(sizes):
        x = rng.integers(0, 256, (n, *hwc), dtype=np.uint8)
        y = rng.integers(0, classes, n).astype(np.int32)
        y[0] = classes - 1  # the class count is inferred from the largest label
        np.savez(os.path.join(root, f"train_{i:02d}.npz"), x=x, y=y)
        parts.append((x, y))
    xt = rng.integers(0, 256, (test, *hwc), dtype=np.uint8)
    yt = rng.integers(0, classes, test)
    np.savez(os.path.join(root, "test.npz"), x=xt, y=yt)
    return parts, (xt, yt)


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    parts, (xt, yt) = _npz_fixture(str(tmp_path), rng)
    d = load_data(f"npz:{tmp_path}")
    _check_tensor_data(d, 12, 4, (3, 6, 8), 3)
    # train_00 then train_01, NHWC -> NCHW without changing a pixel
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    assert np.array_equal(d.train_x.numpy(), x.transpose(0, 3, 1, 2))
    assert np.array_equal(d.train_y.numpy(), y)
    assert np.array_equal(d.test_x.numpy(), xt.transpose(0, 3, 1, 2))
    assert np.array_equal(d.test_y.numpy(), yt)


def test_npz_grey(tmp_path):
    _npz_fixture(str(tmp_path), np.random.default_rng(1), hwc=(5, 5, 1))
    d = load_data(f"npz:{tmp_path}")
    _check_tensor_data(d, 12, 4, (1, 5, 5), 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(x=np.zeros((3, 4, 4, 3), np.float32), y=np.zeros(3, np.int64)), "uint8"),
        (dict(x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(3, np.int64)), "shape"),
        (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.zeros(2, np.int64)), "3 images but 2 labels"),
        (dict(x=np.zeros((3, 4, 4, 3), np.uint8)), "missing"),
        (dict(x=np.zeros((3, 4, 4, 3), np.uint8), y=np.array([0, -1, 0])), "labels"),
    ],
)
def test_npz_bad_input_is_a_clear_error(tmp_path, bad, message):
    np.savez(tmp_path / "train_00.npz", **bad)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(MixtrainError, match=message):
        load_data(f"npz:{tmp_path}")


def test_npz_missing_files_and_bad_specs(tmp_path):
    with pytest.raises(MixtrainError, match="not found"):
        load_data(f"npz:{tmp_path / 'nope'}")
    with pytest.raises(MixtrainError, match="train_"):
        load_data(f"npz:{tmp_path}")
    (tmp_path / "train_00.npz").write_bytes(b"not a zip file")
    (tmp_path / "test.npz").write_bytes(b"not a zip file")
    with pytest.raises(MixtrainError, match="train_00.npz"):
        load_data(f"npz:{tmp_path}")
    with pytest.raises(MixtrainError, match="unknown data spec"):
        load_data("mnist")
    with pytest.raises(MixtrainError, match="npz:DIR"):
        load_data("npz")


def test_cifar10_dir_with_npz(tmp_path):
    # cifar10:DIR also reads train_*.npz + test.npz; the class count is CIFAR-10's, not the labels'
    rng = np.random.default_rng(2)
    _npz_fixture(str(tmp_path), rng, hwc=(32, 32, 3), classes=4)
    d = load_data(f"cifar10:{tmp_path}")
    assert d.name == "cifar10"
    _check_tensor_data(d, 12, 4, (3, 32, 32), 10)


def _fake_cifar10(root, rng, per_batch=3, test=4):
    """torchvision's cifar-10-batches-py layout: pickled dicts of flat CHW rows, labels lists."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": data, "labels": y}, f)
        rows.append(data)
        labels += y
    tdata = rng.integers(0, 256, (test, 3 * 32 * 32), dtype=np.uint8)
    ty = rng.integers(0, 10, test).tolist()
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": tdata, "labels": ty}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return np.concatenate(rows), np.array(labels), tdata, np.array(ty)


def _offline(*args, **kwargs):
    raise RuntimeError("offline (test)")


def test_cifar10_dir_torchvision_layout(tmp_path, monkeypatch):
    # torchvision checks each file's md5 against the real CIFAR-10 files, which a fake folder can
    # never match; accept the files as they are (and never go online) to test our conversion.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)
    rows, labels, trows, tlabels = _fake_cifar10(str(tmp_path), np.random.default_rng(3))
    d = load_data(f"cifar10:{tmp_path}")
    _check_tensor_data(d, 15, 4, (3, 32, 32), 10)
    assert np.array_equal(d.train_x.numpy(), rows.reshape(-1, 3, 32, 32))
    assert np.array_equal(d.train_y.numpy(), labels)
    assert np.array_equal(d.test_x.numpy(), trows.reshape(-1, 3, 32, 32))
    assert np.array_equal(d.test_y.numpy(), tlabels)


def test_cifar10_dir_unverifiable_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)
    _fake_cifar10(str(tmp_path), np.random.default_rng(4))
    with pytest.raises(MixtrainError, match="could not load cifar10"):
        load_data(f"cifar10:{tmp_path}")


def _png_folder(root, rng, classes=("cat", "dog", "emu"), per_class=(3, 2), size=(20, 26)):
    from PIL import Image

    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(a).save(os.path.join(root, split, c, f"{i}.png"))


def test_folder(tmp_path):
    _png_folder(str(tmp_path), np.random.default_rng(5))
    d = load_data(f"folder:{tmp_path}", image_size=16, workers=1)
    assert d.num_classes == 3 and d.num_train == 9 and d.classes == ["cat", "dog", "emu"]
    assert d.image_size == (16, 16) and d.source_size == (16, 16) and d.channels == 3
    assert tuple(d.mean) == IMAGENET_MEAN and tuple(d.std) == IMAGENET_STD
    assert d.train_y.dtype == torch.int64 and d.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert d.train_x.dtype == torch.uint8 and tuple(d.train_x.shape) == (9, 3, 16, 16)
    d.to("cpu")
    batches = list(d.test_batches(4, "cpu"))
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1, 1, 2, 2]
    assert d.subset(4, 3).num_train == 4


def test_folder_errors(tmp_path):
    with pytest.raises(MixtrainError, match="not found"):
        load_data(f"folder:{tmp_path / 'nope'}")
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(MixtrainError, match="val/"):
        load_data(f"folder:{tmp_path}", workers=1)
    _png_folder(str(tmp_path / "two"), np.random.default_rng(6), classes=("a", "b"))
    with pytest.raises(OptionError, match="^placement must be auto, device or host, got 'gpu'$"):
        load_data(f"folder:{tmp_path / 'two'}", image_size=8, workers=1, placement="gpu")


def test_a_data_kind_is_one_registry_line_that_the_options_ask(monkeypatch, tmp_path, capsys):
    """A kind registered under its prefix loads through load_data, and the checks and the auto model
    ask the registry what it takes: nothing tests the spec string."""
    from mixtrain import TrainConfig
    from mixtrain.cli import main
    from mixtrain.data import DATA_KINDS, DataKind, data_help, load_digits

    calls = []

    def load_mine(arg, image_size, **options):
        calls.append((arg, image_size, options["cache_size"]))
        return load_digits()

    monkeypatch.setitem(DATA_KINDS, "mine", DataKind(load_mine, "mine:DIR", "my photos", needs_arg=True,
                                                     image_size=160, imagenet_style=True))
    assert load_data("mine:~/p", cache_size=96).num_train == 1437
    assert calls == [(os.path.expanduser("~/p"), 160, 96)]
    with pytest.raises(MixtrainError, match=r"^mine needs a directory, as in mine:DIR$"):
        load_data("mine")
    assert "mine:DIR (my photos)" in data_help()
    # it is resampled: it takes image_size and cache_size, and auto picks the ImageNet stem at >= 128 px
    TrainConfig(data="mine:p", image_size=32, cache_size=64).check()
    assert TrainConfig(data="mine:p").resolved_model() == "resnet18_224"
    assert TrainConfig(data="mine:p", image_size=64).resolved_model() == "resnet18"
    with pytest.raises(OptionError, match=r"^image_size must be at least 8 pixels \(or 0 for 160\), got 4$"):
        TrainConfig(data="mine:p", image_size=4).check()
    # kinds that keep their own size refuse both, naming every kind that takes them
    with pytest.raises(OptionError, match=r"^cache_size applies only to folder:DIR or mine:DIR data; 'npz:d' is used"):
        TrainConfig(data="npz:d", cache_size=64).check()
    assert TrainConfig(data="digits").resolved_model() == "digitnet"
    assert TrainConfig(data="npz:d").resolved_model() == "resnet18"
    assert TrainConfig(data="nope:d").resolved_model() == "resnet18"
    # the command line lists it in --help
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "mine:DIR (my photos)" in " ".join(capsys.readouterr().out.split())
