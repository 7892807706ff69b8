"""cifar100 (npz inside a directory) and folder:DIR end to end, and the host streaming path:
plan order, the per-step local index mapping, resume mid-epoch, evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mixtrain.batches import EpochBatches
from mixtrain.data import load_data
from mixtrain.errors import MixtrainError
from mixtrain.strategies import MixOptions, MixTrain
from mixtrain.stream import HostStream, step_lists
from mixtrain.trainer import TrainConfig, Trainer

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def value_of(path: str) -> int:
    return int(os.path.basename(path)[1:4])


def make_folder(root, classes=3, per_class=10, val_per_class=4, size=32, constant=False):
    """ImageNet layout of PNGs. With ``constant`` each image is one grey value, unique per train
    image and written in its file name (v<value>.png), so a loaded image tells which file it is."""
    rng = np.random.default_rng(0)
    value = 5
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                if constant and split == "train":
                    a = np.full((size, size, 3), value, np.uint8)
                    name = f"v{value:03d}.png"
                    value += 7
                elif constant:
                    a = np.zeros((size, size, 3), np.uint8)
                    name = f"w{i:03d}.png"
                else:  # class c is brighter in channel c: learnable in a few steps
                    a = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                    a[..., c] += 160
                    name = f"i{i:03d}.png"
                Image.fromarray(a).save(os.path.join(d, name))
    return str(root)


def all_mixed_plan(n, grid, slots4=False, seed=0):
    opts = MixOptions(rule="all", first_unmixed_epochs=0, final_unmixed_epochs=0, quad_confidence=0.9 if slots4 else 0.0)
    return MixTrain(n, grid, 5, "cpu", opts).plan_epoch(0, np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------
# the stream


def _value_of_row(data, split="train"):
    """Sample index -> the grey value written in its file's name."""
    return [value_of(p) for p in data.cache.files(split)]


@pytest.mark.parametrize("threads", [1, 3])  # 3: each step's gather split over a thread pool
def test_host_stream_delivers_each_slots_image_in_plan_order(tmp_path, threads):
    root = make_folder(tmp_path, per_class=10, constant=True)
    data = load_data(f"folder:{root}", image_size=16, workers=1, placement="host").to("cpu")
    assert not data.resident
    values = _value_of_row(data)
    grid = (4, 4)
    # four slots per item but only pairs: slots 2 and 3 are empty and must cost no load
    plan = all_mixed_plan(data.num_train, grid, slots4=True)
    assert plan.slots == 4 and plan.items == 15
    batches = EpochBatches(plan, 4, grid, torch.device("cpu"), torch.Generator().manual_seed(0), data=data)
    assert len(batches) == 4  # 15 pairs padded to 16 items
    stream = HostStream(data.train_x, batches, torch.device("cpu"), threads=threads)
    assert (stream.pool is None) == (threads == 1)
    index = batches.plan.index.reshape(4, 4, -1)
    box = batches.plan.box.reshape(4, 4, -1, 4)
    seen = []
    for j in range(len(batches)):
        images, src = stream.get(j)
        shows = (box[j, ..., 2] > box[j, ..., 0]) & (box[j, ..., 3] > box[j, ..., 1])
        assert images.shape[0] == len(np.unique(index[j][shows]))  # each shown sample loaded once, nothing else
        assert images.shape[1:] == (3, 16, 16)
        for b in range(4):
            for k in range(4):
                if shows[b, k]:
                    img = images[src[b, k]]
                    assert int(img.min()) == int(img.max()) == values[index[j, b, k]], (j, b, k)
                    seen.append(int(index[j, b, k]))
    stream.close()
    # every training sample was shown (the padding item repeats one)
    assert set(seen) == set(range(data.num_train))


def test_host_stream_resumes_mid_epoch_and_refuses_out_of_order_reads(tmp_path):
    root = make_folder(tmp_path, per_class=4, constant=True)
    data = load_data(f"folder:{root}", image_size=8, workers=1, placement="host").to("cpu")
    values = _value_of_row(data)
    plan = all_mixed_plan(data.num_train, (2, 2))
    batches = EpochBatches(plan, 2, (2, 2), torch.device("cpu"), torch.Generator().manual_seed(0), data=data)
    stream = HostStream(data.train_x, batches, torch.device("cpu"), start=2)
    with pytest.raises(RuntimeError, match="out of order"):
        stream.get(0)
    index = batches.plan.index.reshape(len(batches), 2, -1)
    images, src = stream.get(2)
    for b in range(2):
        for k in range(2):
            assert int(images[src[b, k]].max()) == values[index[2, b, k]]
    stream.close()


def test_step_lists_points_empty_slots_at_their_items_first_slot():
    index = np.array([[[7, 0], [3, 9]]])  # one step, two items, two slots
    box = np.zeros((1, 2, 2, 4), np.int64)
    box[0, 0, 0] = (0, 0, 2, 2)  # item 0: a single (slot 1 empty, its index 0 is a placeholder)
    box[0, 1, 0] = (0, 0, 2, 1)  # item 1: a pair
    box[0, 1, 1] = (0, 1, 2, 2)
    lists, local = step_lists(index, box)
    assert [l.tolist() for l in lists] == [[3, 7, 9]]  # sample 0 is never loaded
    np.testing.assert_array_equal(local[0], [[1, 1], [0, 2]])


# ----------------------------------------------------------------------------------------------
# training end to end


def small_cfg(tmp_path, data, **kw):
    base = dict(
        data=data, model="digitnet", method="mixtrain", epochs=2, batch_size=8, lr=0.05, seed=0,
        device="cpu", out=str(tmp_path / "run"), progress="none", save_checkpoints=False,
    )
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.mix.rule = "all"  # mix every sample from epoch 2, whatever its loss
    cfg.mix.final_unmixed_epochs = 0
    cfg.mix.quad_confidence = 0.0  # in pairs
    return cfg


def test_folder_trains_end_to_end_and_evaluates_the_val_split(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=10, val_per_class=4)
    trainer = Trainer(small_cfg(tmp_path, f"folder:{root}", image_size=32, workers=1))
    assert trainer.data.resident and trainer.grid == (8, 8)  # on the CPU the memory map is "resident"
    m = trainer.fit()
    first, second = m["epochs_log"]
    assert first["samples"] == second["samples"] == 30
    assert first["passes"] == 30 and second["passes"] == 15  # all mixed in pairs in epoch 2
    assert np.isfinite(second["train_loss"])
    # evaluation scores the val split in folder order against its own labels (centre crop, resized)
    model = trainer.model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in trainer.data.test_batches(5, "cpu"):
            correct += int((model(trainer.normalize(x)).argmax(-1) == y).sum())
    assert m["test_accuracy"] == pytest.approx(correct / 12)
    assert m["grid"] == [8, 8] and m["test_samples"] == 12


def write_npz_split(path, n, classes, seed):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype(np.int64)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x, y=y)


def test_cifar100_from_npz_directory_trains_end_to_end(tmp_path):
    d = tmp_path / "c100"
    d.mkdir()
    write_npz_split(d / "train_0.npz", 24, 100, 0)
    write_npz_split(d / "train_1.npz", 16, 100, 1)
    write_npz_split(d / "test.npz", 10, 100, 2)
    trainer = Trainer(small_cfg(tmp_path, f"cifar100:{d}", batch_size=10))
    assert trainer.data.name == "cifar100" and trainer.data.num_classes == 100
    assert trainer.data.num_train == 40 and trainer.grid == (8, 8)
    assert trainer.model.model.fc.out_features == 100
    m = trainer.fit()
    assert [e["passes"] for e in m["epochs_log"]] == [40, 20]
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["data"] == f"cifar100:{d}"


def test_cifar100_npz_labels_outside_100_classes_are_refused(tmp_path):
    write_npz_split(tmp_path / "train_0.npz", 10, 101, 0)  # labels 0..9 here ...
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 100]))  # ... 100 here
    with pytest.raises(MixtrainError, match="label 100 is outside the class range 0..99"):
        load_data(f"cifar100:{tmp_path}")


def test_auto_model_for_imagenet_style_folders():
    assert TrainConfig(data="folder:x").resolved_model() == "resnet18_224"
    assert TrainConfig(data="folder:x", image_size=32).resolved_model() == "resnet18"
    assert TrainConfig(data="cifar10").resolved_model() == "resnet18"
    assert TrainConfig(data="folder:x", model="vit_tiny").resolved_model() == "vit_tiny"
