"""Checkpoints, resume, non-finite losses and seeds (CPU, tiny digits fixtures).

A "crash" is simulated two ways: in-process, a Trainer subclass raises right after a chosen
checkpoint is written (exactly what a kill at that moment leaves behind); and for real, the CLI
runs as a subprocess that is killed with SIGKILL at random moments and resumed with --resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtrain import MixOptions, TrainConfig, Trainer
from mixtrain.errors import MixtrainError
from mixtrain import models as M
from mixtrain.cli import main
from mixtrain.data import from_arrays

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True, scope="module")
def _restore_determinism():
    # --deterministic switches a process-wide PyTorch setting; later test modules get it back as it was
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)


def digits_arrays(n_train=200, n_test=100):
    """sklearn digits as uint8 NHWC 16x16x1 (values 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)[..., None]
    y = d.target.astype(np.int64)
    return (x[:n_train], y[:n_train]), (x[n_train : n_train + n_test], y[n_train : n_train + n_test])


def tiny_data():
    train, test = digits_arrays()
    return from_arrays("tiny", train, test, "tiny")


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    (xtr, ytr), (xte, yte) = digits_arrays()
    np.savez(root / "train_0.npz", x=xtr, y=ytr)
    np.savez(root / "test.npz", x=xte, y=yte)
    return root


def config(out, **kw) -> TrainConfig:
    # mix rule "fraction": half the samples are mixed from epoch 2 on, however little was learned
    base = dict(data="tiny", model="digitnet", epochs=3, batch_size=16, lr=0.05, out=str(out), device="cpu",
                deterministic=True, progress="none", mix=MixOptions(rule="fraction", fraction=0.5))
    base.update(kw)
    return TrainConfig(**base)


class Crash(Exception):
    pass


class CrashAfter(Trainer):
    """Dies right after writing the checkpoint described by ``crash_at`` (e.g. "end of epoch 2")."""

    crash_at = None

    def on_checkpoint(self, where):
        if where == self.crash_at:
            raise Crash(where)


def crash_then_resume(make_config, crash_at: str) -> dict:
    """Train ``make_config()`` until it dies right after the checkpoint ``crash_at``, then resume it
    (``make_config(resume=True)``); the resumed run's metrics."""
    crashed = CrashAfter(make_config())
    crashed.crash_at = crash_at
    with pytest.raises(Crash):
        crashed.fit()
    return Trainer(make_config(resume=True)).fit()


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timings(log):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


_reference: dict = {}


def reference(method, tmp_path_factory):
    """An uninterrupted deterministic run per method (cached: several tests compare with it)."""
    if method not in _reference:
        out = tmp_path_factory.mktemp(f"ref-{method}")
        metrics = Trainer(config(out, method=method), tiny_data()).fit()
        _reference[method] = (metrics, load_ckpt(out / "checkpoint.pt"))
    return _reference[method]


# ------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize(
    "method,checkpoint_every,crash_at",
    [
        ("baseline", 0, "end of epoch 2"),
        ("mixtrain", 0, "end of epoch 2"),
        ("mixtrain", 4, "epoch 2, step 8"),  # mid-epoch: the plan of a mixed epoch is restored
        ("baseline", 5, "epoch 3, step 5"),
        ("cutmix", 4, "epoch 2, step 4"),  # naive mixing: soft labels, global pooling
    ],
)
def test_resume_matches_uninterrupted_run(method, checkpoint_every, crash_at, tmp_path, tmp_path_factory):
    ref_metrics, ref_state = reference(method, tmp_path_factory)
    if method == "mixtrain":  # the test means something only if epochs 2-3 really mix
        assert ref_metrics["passes"] < ref_metrics["samples"]
        assert ref_metrics["epochs_log"][1]["mixed_fraction"] > 0

    cfg = config(tmp_path, method=method, checkpoint_every=checkpoint_every)
    crashed = CrashAfter(cfg, tiny_data())
    crashed.crash_at = crash_at
    with pytest.raises(Crash):
        crashed.fit()
    left = load_ckpt(tmp_path / "checkpoint.pt")
    if checkpoint_every:
        epoch, step = (int(s) for s in crash_at.replace("epoch ", "").replace("step ", "").split(", "))
        assert (left["epoch"], left["step_in_epoch"]) == (epoch - 1, step)
        assert left["plan"] is not None  # the epoch plan, for mixtrain built from the loss memory
        assert left["partial"]["samples"] == left["plan"]["valid"][: step * 16].sum()  # LR position
    else:
        assert (left["epoch"], left["step_in_epoch"], left["plan"]) == (2, 0, None)
    if method == "mixtrain":
        assert torch.isfinite(left["strategy"]["memory"]["loss"][:-1]).all()  # the loss memory is saved

    resumed = Trainer(config(tmp_path, method=method, checkpoint_every=checkpoint_every, resume=True), tiny_data()).fit()
    for key in ("passes", "samples", "test_accuracy"):
        assert resumed[key] == ref_metrics[key], key
    assert without_timings(resumed["epochs_log"]) == without_timings(ref_metrics["epochs_log"])
    assert all(row["seconds"] > 0 for row in resumed["epochs_log"])
    final = load_ckpt(tmp_path / "checkpoint.pt")
    assert same_tensors(final["model"], ref_state["model"])  # bit-identical weights
    assert same_tensors(final["strategy"].get("memory", {}), ref_state["strategy"].get("memory", {}))
    momentum = [s["momentum_buffer"] for s in final["optimizer"]["state"].values()]
    ref_momentum = [s["momentum_buffer"] for s in ref_state["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, ref_momentum)) and momentum


def test_resume_rewrites_csv_log_once_per_epoch(tmp_path):
    cfg = config(tmp_path, epochs=2, csv=True)
    crashed = CrashAfter(cfg, tiny_data())
    crashed.crash_at = "end of epoch 1"  # killed after the checkpoint, before the CSV row was written
    with pytest.raises(Crash):
        crashed.fit()
    Trainer(config(tmp_path, epochs=2, csv=True, resume=True), tiny_data()).fit()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "1", "2"]


def _cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for_new_checkpoint(path: Path, proc, after_ns: int, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if path.stat().st_mtime_ns != after_ns:
                return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared in time")


def test_sigkill_at_random_moments_leaves_loadable_checkpoint_and_resume_matches(npz_dir, tmp_path):
    args = ["train", "--data", f"npz:{npz_dir}", "--model", "digitnet", "--method", "mixtrain", "--epochs", "3",
            "--batch-size", "4", "--lr", "0.05", "--deterministic", "--device", "cpu", "--progress", "none",
            "--mix-rule", "fraction"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0  # uninterrupted, in-process, one thread
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    cmd = [sys.executable, "-m", "mixtrain", *args, "--checkpoint-every", "1", "--out", str(out)]
    rng = random.Random(20240607)
    positions = []
    for attempt in range(3):
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        proc = subprocess.Popen(cmd + (["--resume"] if ckpt.exists() else []), env=_cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if attempt == 0:
                time.sleep(0.2)  # still starting up: nothing may be written yet
            else:
                assert _wait_for_new_checkpoint(ckpt, proc, before), proc.stderr.read().decode()
                time.sleep(rng.uniform(0.0, 0.25))  # mid-step, or mid-save (a save every step)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        if ckpt.exists():
            state = load_ckpt(ckpt)  # never a partial file: it always loads
            assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
            positions.append((state["epoch"], state["step_in_epoch"]))
        else:
            assert attempt == 0, "a checkpoint existed and disappeared"
        names = os.listdir(out) if out.exists() else []
        assert all(not n.startswith("checkpoint") or n == "checkpoint.pt" for n in names)
        if proc.returncode == 0:  # a very fast machine finished before the kill: nothing left to test
            break
    print("checkpoints left by the kills (epoch, step):", positions)
    assert positions == sorted(positions) and positions and positions[0][0] < 3

    assert main(args + ["--out", str(out), "--resume"]) == 0  # the last resume in-process: same code, no start-up
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # stale temporaries cleaned up
    got = json.loads((out / "metrics.json").read_text())
    for key in ("passes", "samples", "test_accuracy"):
        assert got[key] == ref[key], key
    assert without_timings(got["epochs_log"]) == without_timings(ref["epochs_log"])
    assert same_tensors(load_ckpt(ckpt)["model"], load_ckpt(tmp_path / "ref" / "checkpoint.pt")["model"])


_DDP_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from test_reliability import Crash, CrashAfter, config, tiny_data
from mixtrain import Trainer

out = {out!r}
ref = Trainer(config(out + "/ref", method="mixtrain", batch_size=8), tiny_data()).fit()
crashed = CrashAfter(config(out + "/run", method="mixtrain", batch_size=8, checkpoint_every=3), tiny_data())
crashed.crash_at = "epoch 2, step 6"
try:
    crashed.fit()
except Crash:
    pass
dist.barrier()
got = Trainer(config(out + "/run", method="mixtrain", batch_size=8, checkpoint_every=3, resume=True), tiny_data()).fit()
if int(os.environ["RANK"]) == 0:
    json.dump({{"ref": ref, "got": got}}, open(out + "/both.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_process_resume_from_mid_epoch_checkpoint(tmp_path):
    """Under torchrun (gloo, CPU) only rank 0 writes the checkpoint: it must hold the loss sum and
    the loss memory of every rank, or the resumed run plans and reports differently."""
    script = tmp_path / "ddp_resume.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    # --standalone: torchrun binds a free port itself (a port picked here could be taken before it binds)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       env=_cli_env(), capture_output=True, text=True, timeout=300)
    from test_distributed import TEARDOWN_ABORT

    done = (tmp_path / "both.json").exists()  # written before the last barrier: all the work ran
    assert p.returncode == 0 or (done and TEARDOWN_ABORT in p.stderr), p.stderr[-3000:]  # docs/distributed.md
    both = json.loads((tmp_path / "both.json").read_text())
    ref, got = both["ref"], both["got"]
    assert ref["world_size"] == 2 and ref["passes"] < ref["samples"]
    for key in ("passes", "samples", "test_accuracy"):
        assert got[key] == ref[key], key
    assert without_timings(got["epochs_log"]) == without_timings(ref["epochs_log"])
    final, ref_state = load_ckpt(tmp_path / "run" / "checkpoint.pt"), load_ckpt(tmp_path / "ref" / "checkpoint.pt")
    assert same_tensors(final["model"], ref_state["model"])
    assert same_tensors(final["strategy"]["memory"], ref_state["strategy"]["memory"])


def test_checkpoint_writer_saves_the_state_as_of_the_call_while_training_goes_on(tmp_path, monkeypatch):
    import threading

    from mixtrain import checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    release, started = threading.Event(), threading.Event()
    real_save = ckpt.save_atomic

    def slow_disk(state, p):
        started.set()
        assert release.wait(10)
        real_save(state, p)

    monkeypatch.setattr(ckpt, "save_atomic", slow_disk)
    writer = ckpt.CheckpointWriter()
    weights = torch.zeros(4)
    log = [{"epoch": 1}]
    writer.save({"w": weights, "log": log, "plan": np.arange(3)}, str(path))
    assert started.wait(10) and not path.exists()  # save returned while the write is still waiting
    weights.add_(1.0)  # training goes on and changes the state in place
    log.append({"epoch": 2})
    release.set()
    writer.wait()
    state = load_ckpt(path)
    assert torch.equal(state["w"], torch.zeros(4)) and state["log"] == [{"epoch": 1}]
    assert state["plan"].tolist() == [0, 1, 2]


def test_checkpoint_writer_reports_a_failed_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    from mixtrain import checkpoint as ckpt
    from mixtrain.errors import MixtrainError

    path = tmp_path / "checkpoint.pt"
    writer = ckpt.CheckpointWriter()
    writer.save({"epoch": 1}, str(path))
    writer.wait()

    def disk_full(obj, f):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)
    writer.save({"epoch": 2}, str(path))
    with pytest.raises(MixtrainError, match="cannot write the checkpoint .*checkpoint.pt: disk full"):
        writer.wait()
    monkeypatch.undo()
    assert load_ckpt(path)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]
    writer.wait()  # the error was reported once


# ------------------------------------------------------------------------------------------------
# non-finite losses


class FaultyNet(M.DigitNet):
    """A small DigitNet that goes wrong at training step ``at`` (1-based, counted over the run).

    ``loss``: its features become NaN from then on. ``buffer``: a running statistic (like a
    batch-norm running variance) becomes NaN, which leaves the training loss finite but the
    weights unfit to keep.
    """

    def __init__(self, num_classes, in_chans, at: int, fault: str):
        super().__init__(num_classes, in_chans, width=8)
        self.at, self.fault, self.calls = at, fault, 0
        self.register_buffer("running_stat", torch.zeros(4))

    def forward_features(self, x):
        f = super().forward_features(x)
        if self.training:
            self.calls += 1
            if self.fault == "loss" and self.calls >= self.at:
                f = f * float("nan")
            if self.fault == "buffer" and self.calls == self.at:
                self.running_stat.fill_(float("nan"))
        return f


def _train_cli(npz_dir, out, *extra, model="digitnet"):
    return main(["train", "--data", f"npz:{npz_dir}", "--model", model, "--epochs", "3", "--batch-size", "20",
                 "--lr", "0.05", "--device", "cpu", "--progress", "none", "--out", str(out), *extra])


def _assert_checkpoint_of_epoch(path, epoch):
    state = load_ckpt(path)
    assert (state["epoch"], state["step_in_epoch"]) == (epoch, 0)
    for name, t in state["model"].items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("method", ["baseline", "mixtrain"])
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(method, npz_dir, tmp_path, monkeypatch, capsys):
    # 200 samples / batch 20 = 10 steps per epoch: step 14 of the run is epoch 2, step 4
    monkeypatch.setitem(M.MODELS, "faulty", lambda nc, ic, s: FaultyNet(nc, ic, at=14, fault="loss"))
    rc = _train_cli(npz_dir, tmp_path, "--method", method, model="faulty")
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite loss at epoch 2, step 4" in err and "end of epoch 1" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: non-finite loss")
    _assert_checkpoint_of_epoch(tmp_path / "checkpoint.pt", 1)
    assert not (tmp_path / "metrics.json").exists()


def test_a_diverged_run_closes_its_image_source_and_raises_diverged_error(npz_dir, tmp_path, monkeypatch):
    """A bench goes on after a diverged run in the same process, so the run must let go of what it
    holds: the step-image source (a streamed one has a gathering thread) is closed when a step
    raises, and the error is a DivergedError that the bench can tell from other errors."""
    from mixtrain.data import TensorData
    from mixtrain.errors import DivergedError

    # 200 samples / batch 4 = 50 steps an epoch: step 54 is epoch 2, step 4, found by the early
    # look at step 25 of that epoch (FINITE_CHECK_EVERY), i.e. inside the step loop
    monkeypatch.setitem(M.MODELS, "faulty", lambda nc, ic, s: FaultyNet(nc, ic, at=54, fault="loss"))
    opened, closed = [], []
    real = TensorData.step_images

    def tracked(self, batches, device, start=0):
        source = real(self, batches, device, start)
        opened.append(source)
        close = source.close
        source.close = lambda: (closed.append(source), close())
        return source

    monkeypatch.setattr(TensorData, "step_images", tracked)
    cfg = TrainConfig(data=f"npz:{npz_dir}", model="faulty", method="baseline", epochs=3, batch_size=4, lr=0.05,
                      device="cpu", progress="none", out=str(tmp_path), save_checkpoints=False)
    with pytest.raises(DivergedError, match="non-finite loss at epoch 2, step 4"):
        Trainer(cfg).fit()
    assert len(opened) == 2 and closed == opened  # epoch 1 and the epoch that diverged


def test_nan_loss_found_at_mid_epoch_checkpoint(npz_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(M.MODELS, "faulty", lambda nc, ic, s: FaultyNet(nc, ic, at=14, fault="loss"))
    rc = _train_cli(npz_dir, tmp_path, "--checkpoint-every", "3", model="faulty")
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss at epoch 2, step 4" in err
    assert "last good checkpoint: epoch 2, step 3" in err.lower()  # found at the step-6 check
    state = load_ckpt(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 3)


def test_non_finite_weights_with_finite_loss_are_never_checkpointed(npz_dir, tmp_path, monkeypatch, capsys):
    # step 20 = the last step of epoch 2: its loss is finite, but the saved state would not be
    monkeypatch.setitem(M.MODELS, "faulty", lambda nc, ic, s: FaultyNet(nc, ic, at=20, fault="buffer"))
    rc = _train_cli(npz_dir, tmp_path, model="faulty")
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite weights at end of epoch 2" in err and "end of epoch 1" in err
    _assert_checkpoint_of_epoch(tmp_path / "checkpoint.pt", 1)


def test_huge_learning_rate_stops_cleanly(npz_dir, tmp_path, capsys):
    rc = _train_cli(npz_dir, tmp_path, "--lr", "1e12", "--lr-warmup", "0")
    err = capsys.readouterr().err
    assert rc == 2 and "error: non-finite" in err and "epoch 1" in err and "Try a lower --lr" in err
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing good to keep


# ------------------------------------------------------------------------------------------------
# seeds


def test_same_seed_same_run_other_seed_differs(tmp_path, tmp_path_factory):
    ref_metrics, ref_state = reference("mixtrain", tmp_path_factory)
    again = Trainer(config(tmp_path / "again", method="mixtrain"), tiny_data()).fit()
    assert without_timings(again["epochs_log"]) == without_timings(ref_metrics["epochs_log"])
    for key in ("passes", "samples", "test_accuracy"):
        assert again[key] == ref_metrics[key]
    assert same_tensors(load_ckpt(tmp_path / "again" / "checkpoint.pt")["model"], ref_state["model"])

    other = Trainer(config(tmp_path / "other", method="mixtrain", seed=1), tiny_data()).fit()
    other_state = load_ckpt(tmp_path / "other" / "checkpoint.pt")
    assert not torch.equal(other_state["model"]["model.fc.weight"], ref_state["model"]["model.fc.weight"])
    assert [r["train_loss"] for r in other["epochs_log"]] != [r["train_loss"] for r in ref_metrics["epochs_log"]]


def test_save_atomic_keeps_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    from mixtrain import checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"epoch": 1, "w": torch.ones(3)}, str(path))

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        ckpt.save_atomic({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert load_ckpt(path)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]
    (tmp_path / ".ckpt-x.tmp").write_bytes(b"left by a kill")  # what SIGKILL mid-save leaves
    ckpt.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


# ------------------------------------------------------------------------------------------------
# non-finite losses: the early, non-blocking look every FINITE_CHECK_EVERY steps


def _faulty_factory(monkeypatch, at):
    made = []

    def factory(nc, ic, s):
        made.append(FaultyNet(nc, ic, at=at, fault="loss"))
        return made[-1]

    monkeypatch.setitem(M.MODELS, "faulty", factory)
    return made


def test_nan_loss_stops_long_before_the_epoch_ends(npz_dir, tmp_path, monkeypatch, capsys):
    from mixtrain.hooks import FINITE_CHECK_EVERY

    # 200 samples / batch 2 = 100 steps per epoch; the loss turns NaN at step 3 of epoch 1
    made = _faulty_factory(monkeypatch, at=3)
    rc = main(["train", "--data", f"npz:{npz_dir}", "--model", "faulty", "--epochs", "3", "--batch-size", "2",
               "--lr", "0.05", "--device", "cpu", "--progress", "none", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite loss at epoch 1, step 3;" in err and "Try a lower --lr" in err
    assert "none (the run stopped before its first checkpoint)" in err
    assert made[0].calls == FINITE_CHECK_EVERY < 100  # stopped at the first early look, not at the epoch end
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_nan_loss_stops_early_after_a_mid_epoch_resume(tmp_path, monkeypatch):
    from mixtrain.errors import MixtrainError

    _faulty_factory(monkeypatch, at=10**9)  # a healthy first run, killed after its step-20 checkpoint
    crashed = CrashAfter(config(tmp_path, model="faulty", epochs=1, batch_size=2, checkpoint_every=10), tiny_data())
    crashed.crash_at = "epoch 1, step 20"
    with pytest.raises(Crash):
        crashed.fit()
    # resumed, the loss turns NaN at the resumed run's 2nd step: step 22 of epoch 1
    made = _faulty_factory(monkeypatch, at=2)
    resumed = Trainer(config(tmp_path, model="faulty", epochs=1, batch_size=2, resume=True), tiny_data())
    with pytest.raises(MixtrainError, match=r"non-finite loss at epoch 1, step 22;") as e:
        resumed.fit()
    assert "Last good checkpoint: epoch 1, step 20" in str(e.value)
    assert made[0].calls == 5  # steps 21..25: the look after step 25 stopped it
    state = load_ckpt(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 20)


def test_finite_watch_reads_the_host_flag_only_after_its_copy_landed(monkeypatch):
    """The CUDA branch of the watch with a stand-in event (no GPU here): one copy in flight at a
    time, recorded every ``every`` steps; the flag is read only once ``query()`` says it landed."""
    from mixtrain.hooks import FiniteWatch

    class Event:
        def __init__(self):
            self.records, self.left = 0, 0

        def record(self, stream=None):
            self.records, self.left = self.records + 1, 5  # lands 5 queries later

        def query(self):
            self.left -= 1
            return self.left <= 0

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    w = FiniteWatch(torch.device("cpu"), every=4)
    w.cuda, w.host, w.event = True, torch.ones((), dtype=torch.bool), Event()
    step_loss = torch.zeros(40)
    w.start(step_loss)
    seen = []
    for j in range(40):
        step_loss[j] = float("nan") if j == 9 else 1.0
        if w.bad(j):
            seen.append(j)
            break
    # copies after step 4 (all finite; still in flight at step 8, so none recorded then; lands at
    # step 9) and step 12 (holds step 10's NaN; lands at step 17, when the watch says so)
    assert seen == [16] and w.event.records == 2


def test_adamw_run_resumes_exactly(tmp_path):
    """--optimizer adamw: a run killed mid-epoch and resumed ends with the weights and Adam moments
    of an uninterrupted run (the optimizer kind is part of what a checkpoint must match)."""
    ref_out = tmp_path / "ref"
    ref = Trainer(config(ref_out, method="mixtrain", optimizer="adamw", lr=0.003), tiny_data()).fit()
    ref_state = load_ckpt(ref_out / "checkpoint.pt")
    out = tmp_path / "run"
    crashed = CrashAfter(config(out, method="mixtrain", optimizer="adamw", lr=0.003, checkpoint_every=4), tiny_data())
    crashed.crash_at = "epoch 2, step 4"
    with pytest.raises(Crash):
        crashed.fit()
    with pytest.raises(MixtrainError, match="optimizer: 'adamw' -> 'sgd'"):
        Trainer(config(out, method="mixtrain", lr=0.003, checkpoint_every=4, resume=True), tiny_data())
    resumed = Trainer(config(out, method="mixtrain", optimizer="adamw", lr=0.003, checkpoint_every=4, resume=True),
                      tiny_data()).fit()
    assert without_timings(resumed["epochs_log"]) == without_timings(ref["epochs_log"])
    final = load_ckpt(out / "checkpoint.pt")
    assert same_tensors(final["model"], ref_state["model"])
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in final["optimizer"]["state"].values()]
    ref_moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in ref_state["optimizer"]["state"].values()]
    assert moments and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(moments, ref_moments))
