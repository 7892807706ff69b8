"""Atomic checkpoints: a run killed at any moment leaves the last complete checkpoint readable."""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import torch

from .errors import MixtrainError


def save_atomic(state: dict, path: str):
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows: readers see the old file or the new one, never
    a partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def host_copy(obj):
    """A copy of ``obj`` that later training cannot change: every tensor cloned to the CPU (also a
    CPU tensor, which the next optimizer step would otherwise update in place), every array,
    dict, list and tuple copied."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread, so training goes on while the disk works.

    :meth:`save` takes a host copy of the state at once (the state as of the call), then writes it
    with :func:`save_atomic` in a thread. One write is in flight at a time: a new save, and
    :meth:`wait`, first wait for the previous one, and a write that failed raises there, naming
    the file. Atomicity is :func:`save_atomic`'s: a kill at any moment leaves the previous
    complete checkpoint.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path = ""

    def save(self, state: dict, path: str):
        self.wait()
        snapshot = host_copy(state)
        self._path = path
        self._thread = threading.Thread(target=self._write, args=(snapshot, path), name="mixtrain-checkpoint")
        self._thread.start()

    def _write(self, snapshot: dict, path: str):
        try:
            save_atomic(snapshot, path)
        except BaseException as e:  # reported on the training thread, at the next save or wait
            self._error = e

    def wait(self, raise_error: bool = True):
        """Block until the write in flight (if any) is on disk; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise MixtrainError(f"cannot write the checkpoint {self._path}: {error}") from error


def load(path: str) -> dict:
    if not os.path.exists(path):
        raise MixtrainError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MixtrainError(f"checkpoint {path} is unreadable: {e}") from e


def remove_stale_temporaries(folder: str):
    """Delete temporary files a killed :func:`save_atomic` left behind (never a finished checkpoint)."""
    for name in os.listdir(folder):
        if name.startswith(".ckpt-") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
