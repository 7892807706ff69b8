"""Atomic checkpoints: a run killed at any moment leaves the last complete checkpoint readable."""

from __future__ import annotations

import os
import tempfile

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
