"""Short CPU runs on digits through the library and the command line."""

import csv
import glob
import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from mixtrain import MixOptions, TrainConfig, train
from mixtrain.cli import build_parser, config_from_args
from mixtrain.options import OPTIONS

# The test machine's few cores are shared: one thread avoids OpenMP oversubscription stalls.

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixtrain", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("baseline", "mixtrain"):
        d = tmp_path_factory.mktemp(method)
        cfg = TrainConfig(data="digits", method=method, epochs=3, batch_size=32, lr=0.05, seed=0, device="cpu",
                          out=str(d), progress="none", save_checkpoints=False)
        out[method] = (train(cfg), d)
    return out


@pytest.mark.parametrize("method", ["baseline", "mixtrain"])
def test_short_run_learns_and_writes_the_contract(runs, method):
    m, out = runs[method]
    assert m["test_accuracy"] > 0.8  # chance is 0.1
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(m))
    for key, value in (("method", method), ("model", "digitnet"), ("data", "digits"), ("epochs", 3), ("seed", 0)):
        assert saved[key] == value
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["train_seconds"] > 0
    assert saved["wall_seconds"] >= saved["train_seconds"] + saved["eval_seconds"]  # all of fit, not only training
    log = saved["epochs_log"]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for r in log:
        for key in ("epoch", "passes", "samples", "seconds", "train_loss", "mixed_fraction"):
            assert key in r, key
        assert r["samples"] == 1437 and r["seconds"] > 0 and r["train_loss"] > 0
        assert 0.0 <= r["mixed_fraction"] <= 1.0
    assert saved["passes"] == sum(r["passes"] for r in log)
    assert saved["samples"] == sum(r["samples"] for r in log) == 3 * 1437
    assert log[-1]["test_accuracy"] == saved["test_accuracy"]
    assert log[-1]["lr_end"] < 0.05 * 0.05  # the schedule ends at ~0
    with open(out / "config.json") as f:
        config = json.load(f)
    # every mixing option at its default; step_scale auto recorded as what it was with SGD
    assert config["method"] == method and config["mix"] == {**MixOptions().__dict__, "step_scale": "linear"}
    if method == "baseline":
        assert saved["passes"] == saved["samples"]
        assert all(r["mixed_fraction"] == 0 and r["passes"] == r["samples"] for r in log)
    else:
        # the defaults: one warm-up epoch, then mixing, and the last epoch unmixed (one per 15, at least one)
        assert log[0]["mixed_fraction"] == 0 and log[0]["passes"] == 1437
        assert log[1]["mixed_fraction"] > 0 and log[1]["passes"] < log[1]["samples"]
        assert log[2]["mixed_fraction"] == 0 and log[2]["passes"] == 1437
        assert saved["passes"] < saved["samples"]
        # each mixed pair saves one pass, each quad three: between 1/2 and 3/4 of the mixed samples
        for r in log:
            mixed = round(r["mixed_fraction"] * 1437)
            assert r["samples"] - mixed // 2 >= r["passes"] >= r["samples"] - 3 * mixed // 4


def _digits_subset(n=256):
    from mixtrain.data import TensorData, load_digits

    d = load_digits()
    return TensorData("digits", d.train_x[:n], d.train_y[:n], d.test_x, d.test_y, num_classes=10)


def test_train_is_reproducible_for_a_seed(tmp_path):
    def run(seed):
        cfg = TrainConfig(data="digits", method="mixtrain", epochs=2, batch_size=32, lr=0.05, seed=seed, device="cpu",
                          out=str(tmp_path / str(seed)), progress="none", save_checkpoints=False)
        cfg.mix.rule = "all"  # mix in epoch 2 whatever the losses
        cfg.mix.final_unmixed_epochs = 0
        return train(cfg, data=_digits_subset())

    a, b, c = run(0), run(0), run(1)
    assert not os.path.exists(tmp_path / "0" / "checkpoint.pt")
    assert a["epochs_log"][1]["mixed_fraction"] == 1.0 and a["epochs_log"][1]["passes"] == 128
    for key in ("train_loss", "passes"):
        assert [r[key] for r in a["epochs_log"]] == [r[key] for r in b["epochs_log"]]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["epochs_log"][0]["train_loss"] != c["epochs_log"][0]["train_loss"]


def test_cli_train_writes_metrics_logs_and_lines(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--data", "digits", "--method", "mixtrain", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
             "--out", str(out), "--csv", "--tensorboard")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and lines[0].startswith("epoch   1/2") and "passes" in lines[1]
    assert "test accuracy" in r.stdout and "metrics.json" in r.stdout
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert m["method"] == "mixtrain" and m["epochs"] == 2 and len(m["epochs_log"]) == 2
    assert os.path.exists(out / "config.json") and os.path.exists(out / "checkpoint.pt")
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert int(rows[1]["passes"]) == m["epochs_log"][1]["passes"]
    assert float(rows[1]["test_accuracy"]) == pytest.approx(m["test_accuracy"])
    events = glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0


def test_cli_demo_prints_the_table(tmp_path):
    r = _cli("demo", "--epochs", "2", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = [ln for ln in lines if ln.startswith("method")]
    assert header and "passes" in header[0] and "test acc" in header[0]
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in ("baseline", "mixtrain")}
    assert set(rows) == {"baseline", "mixtrain"}
    assert rows["baseline"][3] == "0%"
    for method in ("baseline", "mixtrain"):
        assert os.path.exists(tmp_path / "demo" / method / "metrics.json")


def test_cli_bad_input_is_an_error_line(tmp_path):
    r = _cli("train", "--data", f"npz:{tmp_path / 'missing'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def _help(*argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _field_paths():
    """Every option field of the config, as its config.json key (mixing options: mix.NAME)."""
    return [f.name for f in fields(TrainConfig) if f.name != "mix"] + [f"mix.{f.name}" for f in fields(MixOptions)]


def test_help_mentions_every_option(capsys):
    top = _help(capsys=capsys)
    assert "train" in top and "demo" in top
    text = " ".join(_help("train", capsys=capsys).split())
    for path in _field_paths():
        assert OPTIONS[path].flag in text, path
    # the mixing options whose flag is not --field-name keep their names
    for flag in ("--mix-rule", "--mix-threshold", "--mix-fraction", "--mix-ratio"):
        assert flag in text
    # defaults are shown
    assert "(default: 0.5)" in text and "(default: digits)" in text
    demo = _help("demo", capsys=capsys)
    for flag in ("--methods", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--out"):
        assert flag in demo


def _other_value(o):
    """(flag arguments, value): a value of option ``o`` other than its default, as given on the command line."""
    d = o.default
    if o.switch:
        return [o.flag], True
    if isinstance(d, bool):
        return [o.flag, "off" if d else "on"], not d
    if o.choices:
        v = next(c for c in o.choices if c != d)
        return [o.flag, v], v
    if isinstance(d, int):
        return [o.flag, str(d + 3)], d + 3
    if isinstance(d, float):
        return [o.flag, repr(d + 0.125)], d + 0.125
    v = f"{d}-x" if d else "x"
    return [o.flag, v], v


def test_cli_defaults_are_the_library_defaults_and_every_field_has_a_flag_that_reaches_the_config():
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    argv, want = ["train"], {}
    for path in _field_paths():
        assert path in OPTIONS, f"{path} has no declared option"
        flag_args, want[path] = _other_value(OPTIONS[path])
        argv += flag_args
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"flags without an option in the parser: {unknown}"
    cfg = config_from_args(args)
    for path, value in want.items():
        got = getattr(cfg.mix, path[4:]) if path.startswith("mix.") else getattr(cfg, path)
        assert got == value, f"{OPTIONS[path].flag} did not reach {path}: {got!r} != {value!r}"


def test_folder_data_trains_through_its_cache(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog", "emu"):
            os.makedirs(tmp_path / "img" / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(tmp_path / "img" / split / c / f"{i}.png")
    cfg = TrainConfig(data=f"folder:{tmp_path / 'img'}", model="digitnet", image_size=16, workers=1, batch_size=4,
                      epochs=2, method="mixtrain", out=str(tmp_path / "out"), progress="none", save_checkpoints=False)
    cfg.mix.rule = "all"
    cfg.mix.final_unmixed_epochs = 0
    m = train(cfg)
    assert m["grid"] == [4, 4]
    assert [r["passes"] for r in m["epochs_log"]] == [18, 9] and m["samples"] == 36
    assert 0.0 <= m["test_accuracy"] <= 1.0


def test_clip_grad_bounds_every_step(tmp_path):
    """With plain SGD (no momentum, no weight decay) a step moves the weights by lr x the clipped
    gradient, so a tiny clip norm keeps them where they started; without clipping they move."""
    import torch

    from mixtrain.trainer import Trainer

    def moved(clip):
        cfg = TrainConfig(data="digits", method="mixtrain", epochs=2, batch_size=64, lr=0.5, momentum=0.0, nesterov=False,
                          weight_decay=0.0, clip_grad=clip, seed=0, device="cpu", out=str(tmp_path / f"c{clip}"),
                          progress="none", save_checkpoints=False, mix=MixOptions(final_unmixed_epochs=0))
        t = Trainer(cfg)
        before = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
        t.fit()
        after = torch.cat([p.detach().flatten() for p in t.model.parameters()])
        return float((after - before).norm()), t.log[-1]

    steps = 2 * -(-1437 // 64)  # at most this many steps over the two epochs
    tiny, log = moved(1e-6)
    assert tiny <= 0.5 * 1e-6 * steps * 1.01
    # the epoch log reports the unclipped norms and the clipped steps: here every step
    assert log["clipped_steps"] == -(-log["passes"] // 64) and log["grad_norm_max"] >= log["grad_norm_mean"] > 1e-3
    free, log = moved(0.0)
    assert free > 1000 * tiny and log["passes"] < 1437  # it trained, and mixed
    assert "grad_norm_mean" not in log  # measured only where clipping is on


def test_clip_grad_above_every_norm_changes_nothing(tmp_path):
    """A clip norm no gradient reaches leaves training exactly as without clipping (the LR
    schedule, the steps and the losses of every epoch)."""
    def losses(clip):
        cfg = TrainConfig(data="digits", method="mixtrain", epochs=3, batch_size=128, lr=0.1, clip_grad=clip, seed=0,
                          device="cpu", out=str(tmp_path / f"c{clip}"), progress="none", save_checkpoints=False)
        log = train(cfg)["epochs_log"]
        return [(e["train_loss"], e["lr_end"], e["passes"]) for e in log], log

    plain, _ = losses(0.0)
    clipped, log = losses(1e9)
    assert clipped == plain
    assert all(e["clipped_steps"] == 0 and 0 < e["grad_norm_mean"] <= e["grad_norm_max"] < 1e9 for e in log)
