"""What a training run does around its steps, as small components with public names.

The epoch loop (:meth:`mixtrain.trainer.Trainer.fit`) reads plan, batches, step, record, end of
epoch; these parts hang off it:

* :class:`EpochClock` -- an epoch's training seconds (device-synchronised; checkpoint writes left
  out; the part before a resume added back);
* :class:`StepLosses` -- each step's loss in one device buffer (no host synchronisation per step),
  checked for non-finite values at checkpoints and at the epoch's end;
* :class:`FiniteWatch` -- an early, non-blocking look for a non-finite loss every few steps;
* :class:`Checkpoints` -- where the checkpoint goes, the non-finite-weights guard, the background
  atomic write, and which checkpoint is the last good one (for error messages);
* :class:`RunLogs` -- the progress bar or line, ``log.csv`` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import DivergedError, OptionError

FINITE_CHECK_EVERY = 25  # steps between the early, non-blocking looks at an epoch's step losses


class EpochClock:
    """Training seconds of one epoch: from before planning to the end of its last step's work.

    ``sync`` waits for the device, so the clock measures work done, not work queued. Time inside
    :meth:`paused` (checkpoint writes) is left out; ``before`` is the part of the epoch an earlier
    process trained (a resumed epoch).
    """

    def __init__(self, sync, before: float = 0.0):
        self.sync = sync
        self.before = before
        self.excluded = 0.0
        sync()
        self.t0 = time.perf_counter()

    def _at(self, t: float) -> float:
        return self.before + t - self.t0 - self.excluded

    @contextlib.contextmanager
    def paused(self):
        """Leave the block out of the epoch's time; yields the seconds trained so far."""
        self.sync()
        t = time.perf_counter()
        try:
            yield self._at(t)
        finally:
            self.excluded += time.perf_counter() - t

    def stop(self) -> float:
        """The epoch's seconds, once the device has finished its work."""
        self.sync()
        return self._at(time.perf_counter())


class StepLosses:
    """Each step's mean loss, written on the device (``values[j] = loss``), read only at checks.

    ``before`` is the loss sum of the part of the epoch an earlier process trained (a resumed
    epoch), counted once over all ranks.
    """

    def __init__(self, steps: int, device, dist, before: float = 0.0):
        self.values = torch.zeros(steps, device=device)
        self.device = device
        self.dist = dist
        self.before = before

    def checked(self, upto: int, epoch: int, last_good: str) -> np.ndarray:
        """Host copy of the first ``upto`` step losses (one host sync); stops the run at the first
        non-finite one, every rank together."""
        losses = self.values[:upto].double().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        s = self.dist.first_flag(torch.tensor(int(bad[0]) if len(bad) else -1, device=self.device))
        if s >= 0:
            raise DivergedError("non-finite loss at epoch {e}, step {s}; stopped. Last good checkpoint: {last_good}. "
                              "Try a lower {lr}.", e=epoch + 1, s=s + 1, last_good=last_good)
        return losses

    def total(self, losses: np.ndarray, samples: np.ndarray) -> float:
        """Sum over the world of each step's mean loss x the samples it carried (plus ``before``)."""
        local = float((losses * samples[: len(losses)]).sum()) + self.before
        return self.dist.sum(torch.tensor(local, dtype=torch.float64, device=self.device)).item()


class FiniteWatch:
    """Notices a non-finite step loss within about ``every`` steps, without a host sync in a step.

    Every ``every`` steps the device computes "all of this epoch's step losses are finite" (the
    buffer is zero, so finite, before a step writes it) and, on CUDA, copies it into a pinned host
    flag with ``non_blocking=True`` behind a recorded event; later steps read the flag only once
    ``event.query()`` (which never blocks) says the copy has landed. One copy is in flight at a
    time, so the flag is never read while being written. On the CPU the copy is synchronous
    anyway: the flag is read at once. ``bad(j)`` only says that a check should run now; the
    trainer's :meth:`StepLosses.checked` then finds the exact first bad step and stops.
    """

    def __init__(self, device: torch.device, every: int = FINITE_CHECK_EVERY):
        self.every = every
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.ones((), dtype=torch.bool, pin_memory=True) if self.cuda else None
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False  # a copy is in flight
        self.step_loss = None

    def start(self, step_loss: torch.Tensor):
        """A new epoch's buffer (the previous epoch's copy has landed: the epoch end synchronised)."""
        self.step_loss, self.pending = step_loss, False

    def bad(self, j: int) -> bool:
        """After step ``j`` (0-based): True once a non-finite step loss has been seen."""
        if self.pending and self.event.query():
            self.pending = False
            if not bool(self.host):
                return True
        if (j + 1) % self.every == 0:
            flag = torch.isfinite(self.step_loss).all()
            if not self.cuda:
                return not bool(flag)
            if not self.pending:
                self.host.copy_(flag, non_blocking=True)
                self.event.record(torch.cuda.current_stream(self.device))
                self.pending = True
        return False


class Checkpoints:
    """The run's checkpoint file: written atomically in a background thread by the main process,
    never with non-finite weights, and remembered as the last good one for error messages."""

    def __init__(self, out: str, enabled: bool, is_main: bool):
        self.path = os.path.join(out, "checkpoint.pt")
        self.enabled = enabled
        self.is_main = is_main
        self.writer = ckpt.CheckpointWriter()
        self.last_good = None  # where the latest checkpoint written or loaded stands

    def describe_last_good(self) -> str:
        if not self.enabled:
            return "none (checkpoints are off)"
        if self.last_good is None:
            return "none (the run stopped before its first checkpoint)"
        return f"{self.last_good}, in {self.path}"

    def save(self, where: str, model: torch.nn.Module, state):
        """Check the weights (one sync), then write ``state()`` (main process) and remember ``where``."""
        if not weights_finite(model):
            raise DivergedError("non-finite weights at {where}; stopped. Last good checkpoint: {last_good}. Try a lower {lr}.",
                              where=where, last_good=self.describe_last_good())
        if self.is_main and self.enabled:
            self.writer.save(state(), self.path)
        self.last_good = where

    def wait(self, raise_error: bool = True):
        """Block until the checkpoint in flight is on disk."""
        self.writer.wait(raise_error=raise_error)


def weights_finite(model: torch.nn.Module) -> bool:
    """All floating parameters and buffers (e.g. batch-norm statistics) are finite: one sync."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class Progress:
    """A tqdm bar on a terminal; one summary line per epoch otherwise."""

    def __init__(self, mode: str, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode if enabled else "none"
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, steps: int):
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="step")

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def end_epoch(self, row: dict, epochs: int):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode in ("bar", "line"):
            acc = f"  test_acc {row['test_accuracy']:.4f}" if "test_accuracy" in row else ""
            print(
                f"epoch {row['epoch']:>3}/{epochs}  passes {row['passes']:>8,}  samples {row['samples']:>8,}"
                f"  mixed {row['mixed_fraction']:.2f}  loss {row['train_loss']:.4f}  {row['seconds']:.2f}s{acc}",
                flush=True,
            )


class RunLogs:
    """The per-epoch logs of the main process: progress, ``OUT/log.csv`` (``csv``) and TensorBoard
    events under ``OUT/tb`` (``tensorboard``)."""

    CSV_KEYS = ["epoch", "passes", "samples", "seconds", "train_loss", "mixed_fraction", "lr_end", "test_accuracy"]

    def __init__(self, out: str, progress: str, csv: bool, tensorboard: bool, enabled: bool):
        self.progress = Progress(progress, enabled)
        self.csv_path = os.path.join(out, "log.csv") if enabled and csv else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise OptionError("{tensorboard} needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(out, "tb"))

    def restart(self, log: list[dict]):
        """A resumed run: rewrite the CSV from the checkpoint's log, so it holds each epoch once."""
        if self.csv_path:
            self._write_csv(log, "w", header=True)

    def _write_csv(self, rows: list[dict], mode: str, header: bool):
        import csv

        with open(self.csv_path, mode, newline="") as f:
            w = csv.DictWriter(f, self.CSV_KEYS, extrasaction="ignore")
            if header:
                w.writeheader()
            w.writerows(rows)

    def start_epoch(self, epoch: int, epochs: int, steps: int):
        self.progress.start_epoch(epoch, epochs, steps)

    def step(self):
        self.progress.step()

    def end_epoch(self, row: dict, epochs: int):
        self.progress.end_epoch(row, epochs)
        if self.csv_path:
            first = row["epoch"] == 1
            self._write_csv([row], "w" if first else "a", header=first or not os.path.exists(self.csv_path))
        if self.tb:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(f"train/{k}", v, row["epoch"])

    def close(self, metrics: dict):
        if self.tb:
            self.tb.add_scalar("test/accuracy", metrics["test_accuracy"], metrics["epochs"])
            self.tb.close()


def write_json(path: str, obj):
    """``obj`` as JSON at ``path``, atomically (a temporary file renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
