"""Bad input: a non-zero exit and one clear line naming the problem, no traceback unless --debug.

Most cases call ``mixtrain.cli.main`` in-process (the same code path as the command, without a
Python start-up each); one case runs the real command to check the process exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

from mixtrain import MixtrainError, adapt
from mixtrain import models as M
from mixtrain.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def images(n, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), rng.integers(0, 10, n)


def write_npz(root: Path, train=None, test=None):
    """A valid npz dataset (40 train, 20 test, 10 classes, all present), parts overridable."""
    root.mkdir(parents=True, exist_ok=True)
    xtr, ytr = images(40)
    ytr[:10] = np.arange(10)
    xte, yte = images(20, seed=1)
    np.savez(root / "train_0.npz", **(train or {"x": xtr, "y": ytr}))
    np.savez(root / "test.npz", **(test or {"x": xte, "y": yte}))
    return root


def run(capsys, *args, data=None, out=None):
    """``mixtrain train ...`` in-process -> (exit code, stderr)."""
    # defaults first, so that the test's own flags win
    argv = ["train", "--model", "digitnet", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--progress", "none", "--workers", "1", *args]
    if data is not None:
        argv += ["--data", str(data)]
    if out is not None:
        argv += ["--out", str(out)]
    code = main(argv)
    return code, capsys.readouterr().err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()  # (a library warning may precede it; the error is one line)
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err
    err = lines[-1]
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------------------------------------
# data


def test_missing_data_directory(tmp_path, capsys):
    code, err = run(capsys, data=f"npz:{tmp_path / 'nowhere'}", out=tmp_path / "o")
    assert_clean_error(code, err, "data directory not found", "nowhere")


def test_data_path_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, data=f"npz:{tmp_path / 'file'}", out=tmp_path / "o")
    assert_clean_error(code, err, "not a directory", "file")


def test_data_directory_without_npz_files(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, err = run(capsys, data=f"npz:{tmp_path / 'd'}", out=tmp_path / "o")
    assert_clean_error(code, err, "no train_*.npz")


def test_unreadable_npz_file(tmp_path, capsys):
    root = write_npz(tmp_path / "d")
    os.unlink(root / "test.npz")
    (root / "test.npz").mkdir()  # exists but cannot be read as a file (permissions do not bind root)
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, "test.npz", "is a directory")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "truncated-compressed"])
def test_corrupt_or_truncated_npz(damage, tmp_path, capsys):
    root = write_npz(tmp_path / "d")
    target = root / "train_0.npz"
    if damage == "garbage":
        target.write_bytes(os.urandom(3000))
    else:
        if damage == "truncated-compressed":
            x, y = images(40)
            np.savez_compressed(target, x=x, y=y)
        blob = target.read_bytes()
        target.write_bytes(blob[: len(blob) // 2])
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, "train_0.npz", "not a readable npz file")


@pytest.mark.parametrize(
    "train,needle",
    [
        ({"x": images(40)[0]}, "missing array(s) ['y']"),
        ({"x": images(40)[0].astype(np.float32), "y": images(40)[1]}, "dtype float32"),
        ({"x": images(40)[0][..., 0], "y": images(40)[1]}, "shape (40, 16, 16)"),
        ({"x": images(40)[0], "y": images(40)[1].astype(np.float64)}, "integer labels"),
        ({"x": images(40)[0], "y": images(30)[1]}, "40 images but 30 labels"),
        ({"x": images(40)[0], "y": images(40)[1] - 5}, "labels must be 0..C-1"),
        ({"x": images(0)[0], "y": images(0)[1]}, "the train split is empty"),
        ({"x": images(40)[0], "y": np.r_[images(39)[1], 10**12]},
         "train label 1000000000000 implies 1,000,000,000,001 classes"),
    ],
    ids=["missing-y", "float-pixels", "no-channel-axis", "float-labels", "length-mismatch", "negative-label",
         "empty-train", "huge-label"],
)
def test_bad_train_arrays(train, needle, tmp_path, capsys):
    root = write_npz(tmp_path / "d", train=train)
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, needle)


def test_inferred_class_count_limit():
    """npz data take their class count from the largest train label; more classes than both the
    training samples and 100,000 can only be mislabelled data, anything below is accepted."""
    from mixtrain.data import MAX_INFERRED_CLASSES, from_arrays

    x, y = images(40)
    xte, yte = images(4, seed=1)
    y[0] = MAX_INFERRED_CLASSES - 1  # sparse labels, more classes than samples: still accepted
    assert from_arrays("t", (x, y), (xte, yte), "here").num_classes == MAX_INFERRED_CLASSES
    y[0] = MAX_INFERRED_CLASSES
    with pytest.raises(MixtrainError, match="labels must be 0..C-1: renumber them"):
        from_arrays("t", (x, y), (xte, yte), "here")


def test_test_label_outside_class_range(tmp_path, capsys):
    x, y = images(20)
    y[3] = 10  # train has classes 0..9
    root = write_npz(tmp_path / "d", test={"x": x, "y": y})
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, "test label 10 is outside the class range 0..9")


def test_train_label_outside_known_class_count(tmp_path, capsys):
    x, y = images(40)
    y[0] = 12
    root = write_npz(tmp_path / "d", train={"x": x, "y": y})
    code, err = run(capsys, data=f"cifar10:{root}", out=tmp_path / "o")  # cifar10 fixes 10 classes
    assert_clean_error(code, err, "train label 12 is outside the class range 0..9")


def test_empty_test_split(tmp_path, capsys):
    root = write_npz(tmp_path / "d", test={"x": images(0)[0], "y": images(0)[1]})
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, "the test split is empty")


def test_unknown_data_spec(tmp_path, capsys):
    code, err = run(capsys, data="imagenet21k", out=tmp_path / "o")
    assert_clean_error(code, err, "unknown data spec 'imagenet21k'")


def _image_folder(root: Path, bad: str):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # a PNG header, then garbage


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: the failure crosses from a decoding process
def test_corrupt_image_in_folder_is_skipped_with_a_warning_naming_the_file(workers, tmp_path, capsys):
    _image_folder(tmp_path / "f", bad="train/b/broken.png")
    code, err = run(capsys, "--image-size", "16", "--workers", workers, data=f"folder:{tmp_path / 'f'}",
                    out=tmp_path / "o")
    assert code == 0, err
    warned = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warned) == 1 and "skipped 1 unreadable image file(s): train/b/broken.png" in warned[0]
    assert "Traceback" not in err


def test_folder_without_val_split(tmp_path, capsys):
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    code, err = run(capsys, data=f"folder:{tmp_path / 'f'}", out=tmp_path / "o")
    assert_clean_error(code, err, "no 'val/' folder")


def test_worker_wrapped_error_message_is_unwrapped():
    wrapped = (
        "Caught MixtrainError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmixtrain.errors.MixtrainError: cannot read image /d/a.png: broken\n'
    )
    e = MixtrainError(wrapped)
    assert str(e) == "cannot read image /d/a.png: broken" and e.worker_traceback == wrapped
    assert str(MixtrainError("plain")) == "plain" and MixtrainError("plain").worker_traceback is None


# ------------------------------------------------------------------------------------------------
# options


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("npz") / "d")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--batch-size", "41"], "batch size 41 x 1 process(es) is larger than the training set (40 samples)"),
        (["--method", "mixtrian"], "unknown method 'mixtrian'; choose from baseline, mixtrain"),
        (["--model", "resnet19"], "unknown model 'resnet19'"),
        (["--model", "timm:no_such_net"], "unknown timm model 'no_such_net'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
        (["--label-smoothing", "-1"], "--label-smoothing must be in [0, 1), got -1.0"),
        (["--optimizer", "adam"], "--optimizer must be sgd or adamw, got 'adam'"),
        (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0 (0: off), got -1.0"),
        (["--clip-grad", "nan"], "--clip-grad must be a finite number >= 0 (0: off), got nan"),
        (["--momentum", "-1"], "--momentum must be a finite number >= 0, got -1.0"),
        (["--momentum", "nan"], "--momentum must be a finite number >= 0, got nan"),
        (["--momentum", "0"], "--nesterov on needs --momentum > 0"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
        (["--lr-warmup", "-1"], "--lr-warmup is a fraction of all samples and must be in [0, 1], got -1.0"),
        (["--lr-warmup", "5"], "--lr-warmup is a fraction of all samples and must be in [0, 1], got 5.0"),
        (["--pad", "-5"], "--pad must be >= 0, or -1 for image size / 8, got -5"),
        (["--image-size", "32"], "--image-size applies only to folder:DIR data"),
        (["--method", "mixtrain", "--confidence", "0"], "--confidence is a probability of the true class and must be in (0, 1], got 0.0"),
        (["--method", "mixtrain", "--confidence", "-1"], "must be in (0, 1], got -1.0"),
        (["--method", "mixtrain", "--confidence", "2"], "must be in (0, 1], got 2.0"),
        (["--method", "mixtrain", "--quad-confidence", "2"], "--quad-confidence is a probability of the true class and must be in [0, 1] (0: pairs only, no quads), got 2.0"),
        (["--method", "mixtrain", "--quad-confidence", "-1"], "--quad-confidence is a probability"),
        (["--mix-rule", "threshold", "--mix-threshold", "-1"], "--mix-threshold is a loss and must be a finite number >= 0, got -1.0"),
        (["--mix-rule", "threshold", "--mix-threshold", "inf"], "--mix-threshold is a loss and must be a finite number >= 0, got inf"),
        (["--mix-rule", "most"], "--mix-rule must be auto, threshold, fraction or all, got 'most'"),
        (["--min-share", "0.7"], "--min-share must be in (0, 0.5], got 0.7"),
        (["--precision", "fp8"], "--precision must be auto, bf16 or fp32, got 'fp8'"),
        (["--nesterov", "on", "--momentum", "0"], "--nesterov on needs --momentum > 0; give --nesterov off for plain SGD"),
        (["--device", "cuda:abc"], "--device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...), got 'cuda:abc'"),
        (["--device", "gpu0"], "--device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...), got 'gpu0'"),
        (["--device", "cpu", "--cuda-graph", "on"], "--cuda-graph on needs CUDA and no --compile"),
        (["--ddp-bucket-mb", "0"], "--ddp-bucket-mb must be a finite number of MB > 0, got 0.0"),
        (["--ddp-bucket-mb", "nan"], "--ddp-bucket-mb must be a finite number of MB > 0, got nan"),
    ],
)
def test_bad_options(args, needle, npz, tmp_path, capsys):
    code, err = run(capsys, *args, data=f"npz:{npz}", out=tmp_path / "o")  # later flags win over defaults
    assert_clean_error(code, err, needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--model", "timm:not_a_model"], "unknown timm model 'not_a_model'"),
        (["--method", "mixtrain", "--confidence", "0"], "--confidence is a probability"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1)"),
        (["--device", "cuda:abc"], "got 'cuda:abc'"),
    ],
)
def test_bad_option_fails_before_the_data_loads(args, needle, tmp_path, capsys):
    # the data path is missing too: the bad option must be reported first, without loading anything
    code, err = run(capsys, *args, data=f"npz:{tmp_path / 'nowhere'}", out=tmp_path / "o")
    assert_clean_error(code, err, needle)


@pytest.mark.parametrize("size", ["-5", "4"])
def test_bad_image_size_for_folder_data(size, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "f" / split / "a").mkdir(parents=True)
    code, err = run(capsys, "--image-size", size, data=f"folder:{tmp_path / 'f'}", out=tmp_path / "o")
    assert_clean_error(code, err, f"--image-size must be at least 8 pixels (or 0 for 224), got {size}")


def test_cuda_device_index_beyond_the_visible_gpus(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = run(capsys, "--device", "cuda:7", data=f"npz:{tmp_path / 'nowhere'}", out=tmp_path / "o")
    assert_clean_error(code, err, "--device cuda:7: no such GPU; PyTorch sees 2 (cuda:0 to cuda:1)")


def test_cuda_device_without_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run(capsys, "--device", "cuda:0", data=f"npz:{tmp_path / 'nowhere'}", out=tmp_path / "o")
    assert_clean_error(code, err, "--device cuda:0 asked for, but PyTorch sees no CUDA GPU")


def test_batch_smaller_than_slots_is_valid(npz, tmp_path, capsys):
    """The batch counts items (passes); each item carries up to K samples, so batch 1 with K = 2 is
    fine: a step is then one composite image carrying two samples."""
    code = main(["train", "--data", f"npz:{npz}", "--model", "digitnet", "--method", "mixtrain", "--mix-rule", "all", "--final-unmixed-epochs", "0",
                 "--epochs", "2", "--batch-size", "1", "--device", "cpu", "--progress", "none",
                 "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    import json

    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (m["samples"], m["passes"]) == (80, 40 + 20)  # epoch 2 trains 40 samples in 20 composites


class FlatNet(nn.Module):
    """A classifier whose body pools away the spatial grid: nothing to pool per region."""

    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return self.conv(x).mean((2, 3))

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)


def test_model_without_spatial_body_library():
    with pytest.raises(MixtrainError, match=r"FlatNet has no spatial body: forward_features gives shape \(1, 8\)"):
        adapt(FlatNet(), 16, 1)
    with pytest.raises(MixtrainError, match="has no forward_features/forward_head"):
        adapt(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), 16, 1)


def test_model_without_spatial_body_cli(npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(M.MODELS, "flatnet", lambda nc, ic, s: FlatNet(nc, ic))
    code, err = run(capsys, "--model", "flatnet", data=f"npz:{npz}", out=tmp_path / "o")
    assert_clean_error(code, err, "FlatNet has no spatial body")


def test_model_grid_too_small_to_mix(npz, tmp_path, capsys):
    # timm's resnet18 (stride 32) turns a 16x16 image into a 1x1 grid: nothing to split
    code, err = run(capsys, "--model", "timm:resnet18", "--method", "mixtrain", data=f"npz:{npz}", out=tmp_path / "o")
    assert_clean_error(code, err, "final feature grid is 1x1", "no room for two regions")


# ------------------------------------------------------------------------------------------------
# resume


@pytest.fixture(scope="module")
def finished_run(npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", f"npz:{npz}", "--model", "digitnet", "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu", "--progress", "none", "--out", str(out)]) == 0
    return out


def test_resume_without_checkpoint(npz, tmp_path, capsys):
    code, err = run(capsys, "--resume", data=f"npz:{npz}", out=tmp_path / "empty")
    assert_clean_error(code, err, "no checkpoint to resume from", str(tmp_path / "empty" / "checkpoint.pt"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lr", "0.5"], "lr: 0.2 -> 0.5"),
        (["--seed", "3"], "seed: 0 -> 3"),
        (["--method", "mixtrain"], "method: 'baseline' -> 'mixtrain'"),
        (["--mix-rule", "all"], "mix.rule: 'auto' -> 'all'"),
    ],
)
def test_resume_with_different_config(args, needle, npz, finished_run, capsys):
    code, err = run(capsys, "--resume", *args, data=f"npz:{npz}", out=finished_run)
    assert_clean_error(code, err, "cannot resume", "other options", needle)


def test_resume_may_change_how_it_runs(npz, finished_run, capsys):
    code, err = run(capsys, "--resume", "--checkpoint-every", "3", "--csv", data=f"npz:{npz}", out=finished_run)
    assert code == 0, err


@pytest.mark.parametrize("content, needle", [
    (b"PK\x03\x04 not really", "checkpoint.pt is damaged or truncated"),  # a broken zip archive
    (b"garbage\n", "checkpoint.pt is damaged or not a checkpoint"),  # no pickle at all: not the code refusal
    (b"", "checkpoint.pt is empty (0 bytes)"),
])
def test_resume_from_corrupt_checkpoint(npz, tmp_path, capsys, content, needle):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoint.pt").write_bytes(content)
    code, err = run(capsys, "--resume", data=f"npz:{npz}", out=tmp_path / "o")
    assert_clean_error(code, err, needle)
    assert "refused" not in err


# ------------------------------------------------------------------------------------------------
# --debug and the real process


def test_debug_shows_the_traceback_in_either_position(tmp_path):
    for argv in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(MixtrainError, match="data directory not found"):
            main([*argv, "--data", f"npz:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")])


def test_command_exit_status_and_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "mixtrain", "train", "--data", f"npz:{tmp_path / 'nowhere'}",
                        "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: data directory not found: {tmp_path / 'nowhere'}"
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# found by a user's audit (session 17): each was a traceback, a silent result or a misleading line


def test_negative_seed_is_an_option_error(npz, tmp_path, capsys):
    code, err = run(capsys, "--seed", "-1", data=f"npz:{npz}", out=tmp_path / "o")
    assert_clean_error(code, err, "--seed must be >= 0, got -1")


def test_momentum_of_one_or_more_is_refused(npz, tmp_path, capsys):
    code, err = run(capsys, "--momentum", "1.5", data=f"npz:{npz}", out=tmp_path / "o")
    assert_clean_error(code, err, "--momentum must be in [0, 1)")


def test_usage_errors_are_one_line(capsys):
    for argv, needle in ((["train", "--epochs", "1.5"], "invalid int value: '1.5'"),
                         (["train", "--nesterov", "maybe"], "expected on/off"),
                         (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                         (["fast", "--tta-level", "5"], "invalid choice: 5")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert_clean_error(2, capsys.readouterr().err, needle)


def test_help_shows_on_off_defaults_as_on_off(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Nesterov momentum (default: on)" in out and "(default: True)" not in out


def test_one_class_data_is_refused(tmp_path, capsys):
    xtr, _ = images(40)
    xte, _ = images(20, seed=1)
    root = write_npz(tmp_path / "one", train={"x": xtr, "y": np.zeros(40, np.int64)},
                     test={"x": xte, "y": np.zeros(20, np.int64)})
    code, err = run(capsys, data=f"npz:{root}", out=tmp_path / "o")
    assert_clean_error(code, err, "has 1 class: a classifier needs at least 2")


def test_a_directory_for_digits_is_refused(tmp_path, capsys):
    code, err = run(capsys, data=f"digits:{tmp_path}", out=tmp_path / "o")
    assert_clean_error(code, err, "digits takes no directory")


def test_a_run_that_failed_before_its_first_checkpoint_can_be_retried(npz, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run(capsys, "--seed", "-1", data=f"npz:{npz}", out=out)  # fails at once
    assert code == 2
    (out).mkdir(exist_ok=True)
    (out / "config.json").write_text("{}")  # what a run that died in its first epoch leaves
    code, err = run(capsys, data=f"npz:{npz}", out=out)
    assert code == 0, err
    assert (out / "metrics.json").exists()


def test_resume_without_config_json_takes_the_checkpoints_options(npz, tmp_path, capsys):
    from mixtrain import TrainConfig, train

    out = tmp_path / "o"

    cfg = TrainConfig(data=f"npz:{npz}", model="digitnet", epochs=2, batch_size=8, device="cpu", out=str(out),
                      progress="none", lr=0.05)
    train(cfg)
    os.remove(out / "config.json")  # before the fix: compared with the defaults (batch size 512, 30 epochs)
    argv = ["train", "--resume", "--out", str(out), "--progress", "none"]  # none of the run's options given
    assert main(argv) == 0, capsys.readouterr().err
    assert "other options" not in capsys.readouterr().err


def test_demo_checks_every_method_before_training_and_takes_variants(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path / "d0")]) == 2
    out, err = capsys.readouterr()
    assert "training" not in out and err.strip() == "error: --epochs must be at least 1, got 0"
    assert main(["demo", "--epochs", "2", "--methods", "baseline,mixtrain(quad_confidence=0.9)",
                 "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "mixtrain(quad_confidence=0.9)" in out.splitlines()[-1]
    saved = (tmp_path / "d" / "mixtrain_quad_confidence_0.9_" / "config.json").read_text()
    assert '"quad_confidence": 0.9' in saved


def test_padding_as_large_as_the_image_and_placement_on_resident_data_are_refused(npz, tmp_path, capsys):
    code, err = run(capsys, "--pad", "16", data=f"npz:{npz}", out=tmp_path / "o")  # 16 px images
    assert_clean_error(code, err, "--pad 16 must be below the image size, 16 px")
    code, err = run(capsys, "--placement", "host", data=f"npz:{npz}", out=tmp_path / "o2")
    assert_clean_error(code, err, "--placement applies only to folder:DIR data")
