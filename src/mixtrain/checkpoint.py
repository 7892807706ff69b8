"""Checkpoints: atomic writes, data-only reads, and checks of every field before a resume uses it.

* A run killed at any moment leaves the last complete checkpoint readable (:func:`save_atomic`).
* A checkpoint holds only tensors and plain Python data (dict, list, tuple, str, int, float, bool,
  None): :func:`host_copy` converts numpy arrays and scalars and refuses anything else, and
  :func:`load` reads with ``torch.load(weights_only=True)``, which refuses any other pickled
  object before it is built, so a crafted file cannot run code. No type is added to PyTorch's
  allow-list (``torch.serialization.add_safe_globals`` is not used).
* :func:`check_config` and :func:`check_state` check the type, shape and range of every field
  against what this run needs, raising :class:`StateError` naming the field, before anything is
  applied.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MixtrainError
from .options import upgrade_config


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


def host_copy(obj, field: str = "state"):
    """A copy of ``obj`` that later training cannot change and that loads with ``weights_only=True``:
    every tensor cloned to the CPU (also a CPU tensor, which the next optimizer step would
    otherwise update in place), every numpy array turned into a CPU tensor, every numpy scalar into
    a Python number, every dict, list and tuple copied. Any other object is a programming error:
    a ``TypeError`` naming where it sits, so no checkpoint is written that a safe load would refuse."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{field}: a numpy array of Python objects cannot go into a checkpoint")
        return torch.from_numpy(np.array(obj, copy=True, order="C"))
    if isinstance(obj, np.generic):  # before int/float: np.float64 is a float subclass, pickled as numpy
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, dict):
        return {k: host_copy(v, sub(field, k)) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v, sub(field, i)) for i, v in enumerate(obj))
    raise TypeError(f"{field}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go into a checkpoint "
                    "(only tensors and plain Python data load with weights_only=True)")


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
    """Read a checkpoint as data: tensors and plain Python types only, never code.

    ``torch.load(weights_only=True)`` refuses a pickled object of any other type before building
    it, so a crafted checkpoint (say, an object whose ``__reduce__`` calls ``os.system``) is refused
    without its payload running. Every failure is one :class:`MixtrainError` line.
    """
    if not os.path.exists(path):
        raise MixtrainError(f"no checkpoint to resume from: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise MixtrainError(f"checkpoint {path} is empty (0 bytes): it was not written by mixtrain, which writes "
                            "checkpoints atomically; train afresh or restore the file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not names and "allowed global" not in str(e):  # not code, just bytes that are no pickle at all
            raise MixtrainError(f"checkpoint {path} is damaged or not a checkpoint: it is not a file torch.save "
                                "wrote (train afresh or restore the file)") from e
        what = f" ({', '.join(names)})" if names else ""
        hint = ""
        if any(n.startswith("numpy") for n in names):
            hint = ("; numpy arrays there mean a mid-epoch checkpoint of an older mixtrain, which saved its plan "
                    "that way: it cannot be resumed, train afresh")
        raise MixtrainError(
            f"checkpoint {path} is refused: it holds pickled Python objects{what} beyond tensors and plain data, "
            f"and mixtrain reads checkpoints as data only, never running code from them{hint}"
        ) from e
    except (EOFError, RuntimeError, OSError) as e:  # cut short, a broken zip archive, a read error
        detail = one_line(e).split(". ")[0] or type(e).__name__
        raise MixtrainError(f"checkpoint {path} is damaged or truncated ({detail}); train afresh or restore "
                            "the file") from e
    except Exception as e:
        raise MixtrainError(f"checkpoint {path} is unreadable: {one_line(e) or type(e).__name__}") from e


def one_line(e: BaseException) -> str:
    """An exception's message on one line (some of PyTorch's span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def remove_stale_temporaries(folder: str):
    """Delete temporary files a killed :func:`save_atomic` left behind (never a finished checkpoint)."""
    for name in os.listdir(folder):
        if name.startswith(".ckpt-") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# checks of a loaded checkpoint, field by field


class StateError(Exception):
    """A checkpoint field that this run cannot use; the message starts with ``field NAME``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field} {problem}")
        self.field = field


def sub(field: str, key) -> str:
    """The name of ``field``'s entry ``key``: ``plan.index``, ``log[2]``, ``model['fc.weight']``."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{field}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{field}.{key}" if field else key
    return f"{field}[{key!r}]"


def describe(v) -> str:
    if torch.is_tensor(v):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {list(v.shape)}"
    if v is None:
        return "None"
    if isinstance(v, bool):
        return f"the bool {v}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, dict):
        return f"a dict of {len(v)} entries"
    if isinstance(v, (list, tuple)):
        return f"a {type(v).__name__} of {len(v)} items"
    return f"a {type(v).__name__}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def need_dict(v, field: str, required=()) -> dict:
    if not isinstance(v, dict):
        raise StateError(field, f"should be a dict, not {describe(v)}")
    for key in required:
        if key not in v:
            raise StateError(sub(field, key), "is missing")
    return v


def need_list(v, field: str, length: int | None = None) -> list:
    if not isinstance(v, (list, tuple)):
        raise StateError(field, f"should be a list, not {describe(v)}")
    if length is not None and len(v) != length:
        raise StateError(field, f"has {len(v)} items; this run needs {length}")
    return v


def need_int(v, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise StateError(field, f"should be a whole number, not {describe(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise StateError(field, f"is {v}; it must be {bounds} for this run")
    return v


def need_number(v, field: str, lo: float | None = None) -> float:
    if not _is_number(v) or not math.isfinite(v):
        raise StateError(field, f"should be a finite number, not {describe(v)}")
    if lo is not None and v < lo:
        raise StateError(field, f"is {v}; it must be at least {lo}")
    return v


def need_tensor(v, field: str, shape=None, dtype=None, hint: str = "") -> torch.Tensor:
    if not torch.is_tensor(v):
        raise StateError(field, f"should be a tensor, not {describe(v)}")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise StateError(field, f"has shape {list(v.shape)}; this run needs {list(shape)}{hint}")
    if dtype is not None and v.dtype != dtype:
        raise StateError(field, f"has dtype {str(v.dtype).replace('torch.', '')}; this run needs "
                                f"{str(dtype).replace('torch.', '')}{hint}")
    return v


def match(v, template, field: str, hint: str = ""):
    """``v`` has the structure of ``template``: the same keys, list lengths, tensor shapes and dtypes."""
    if torch.is_tensor(template):
        need_tensor(v, field, template.shape, template.dtype, hint)
    elif isinstance(template, dict):
        need_dict(v, field)
        for k in template:
            if k not in v:
                raise StateError(sub(field, k), f"is missing{hint}")
        extra = [k for k in v if k not in template]
        if extra:
            raise StateError(sub(field, extra[0]), f"is not part of this run's state{hint}")
        for k, t in template.items():
            match(v[k], t, sub(field, k), hint)
    elif isinstance(template, (list, tuple)):
        need_list(v, field, len(template))
        for i, (a, t) in enumerate(zip(v, template)):
            match(a, t, sub(field, i), hint)
    elif _is_number(template):
        need_number(v, field)
    elif template is not None and not isinstance(v, type(template)):
        raise StateError(field, f"should be a {type(template).__name__}, not {describe(v)}")


def check_config(state, defaults: dict, resumable=frozenset()):
    """The checkpoint is a dict holding a ``config`` whose options have their types (so comparing
    it with this run's options cannot fail). A missing option reads as its default, as for a
    checkpoint of a version before that option; an unknown one is ignored."""
    need_dict(state, "checkpoint", required=("config",))
    config = upgrade_config(need_dict(state["config"], "config"))
    if "world_size" in state:  # absent in checkpoints of versions before it: one process
        need_int(state["world_size"], "world_size", 1)
    for key, default in defaults.items():
        if key not in config or key in resumable:
            continue
        field, v = sub("config", key), config[key]
        if isinstance(default, dict):
            need_dict(v, field)
            for k, d in default.items():
                if k in v:
                    _same_kind(v[k], d, sub(field, k))
        else:
            _same_kind(v, default, field)


def _same_kind(v, ref, field: str):
    """``v`` can stand where this run has ``ref`` (a config option or an optimizer setting)."""
    if isinstance(ref, bool):
        if not isinstance(v, bool):
            raise StateError(field, f"should be true or false, not {describe(v)}")
    elif _is_number(ref) or (torch.is_tensor(ref) and ref.ndim == 0):
        need_number(v, field)
    elif isinstance(ref, (list, tuple)):
        need_list(v, field, len(ref))
        for i, x in enumerate(v):
            need_number(x, sub(field, i))
    elif isinstance(ref, str):
        if not isinstance(v, str):
            raise StateError(field, f"should be a string, not {describe(v)}")
    elif ref is None:
        if v is not None and not isinstance(v, bool):
            raise StateError(field, f"should be None, true or false, not {describe(v)}")


@dataclass
class Expected:
    """What a checkpoint must hold to resume this run (see :func:`check_state`)."""

    model: dict  # this run's model.state_dict(): names, shapes, dtypes
    model_name: str
    optimizer: torch.optim.Optimizer
    strategy: dict  # this run's strategy.state_dict()
    num_train: int
    slots: int
    grid: tuple[int, int]
    epochs: int
    batch_size: int
    world: int
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None  # on CUDA: this device's generator state
    prunes: bool = False  # the strategy's plans may leave samples out (InfoBatch)


REQUIRED = ("config", "model", "optimizer", "strategy", "epoch", "step_in_epoch", "samples_seen", "log", "torch_rng")
PLAN_DTYPES = {"index": torch.int64, "valid": torch.bool, "box": torch.int16, "resize": torch.bool, "share": torch.float32,
               "weight": torch.float32}
LOG_KEYS = ("epoch", "passes", "samples", "seconds")
# optimizer settings that follow where a run trains, not the checkpoint: the trainer sets them anew
DEVICE_SETTINGS = ("capturable", "fused", "foreach")


def check_state(state: dict, e: Expected):
    """Every field of a loaded checkpoint fits this run, or :class:`StateError` names the first one
    that does not. Nothing is applied here: a refused checkpoint leaves the run untouched."""
    need_dict(state, "checkpoint", required=REQUIRED)
    model_hint = f" (a checkpoint of another model or class count? this run's model is {e.model_name})"
    match(state["model"], e.model, "model", model_hint)
    for name, t in state["model"].items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise StateError(sub("model", name), "holds non-finite values")
    _check_optimizer(state["optimizer"], e.optimizer)
    n = e.num_train
    match(state["strategy"], e.strategy, "strategy",
          f" (a loss memory holds one entry per training sample, plus one; this dataset has {n} samples)")
    epoch = need_int(state["epoch"], "epoch", 0, e.epochs)
    log = need_list(state["log"], "log", epoch)
    for i, row in enumerate(log):
        need_dict(row, f"log[{i}]", required=LOG_KEYS)
        for k, v in row.items():
            need_number(v, sub(f"log[{i}]", k))
    need_tensor(state["torch_rng"], "torch_rng", e.torch_rng.shape, e.torch_rng.dtype)
    if state.get("wall_seconds") is not None:  # absent before this field existed
        need_number(state["wall_seconds"], "wall_seconds", 0)
    cuda_rng = state.get("cuda_rng")
    if e.cuda_rng is not None and cuda_rng is not None:
        need_tensor(cuda_rng, "cuda_rng", e.cuda_rng.shape, e.cuda_rng.dtype)
    elif cuda_rng is not None:
        need_tensor(cuda_rng, "cuda_rng", dtype=torch.uint8)

    step = need_int(state["step_in_epoch"], "step_in_epoch", 0)
    plan, partial = state.get("plan"), state.get("partial")
    done = 0
    if plan is None:
        if step:
            raise StateError("step_in_epoch", f"is {step}, but the checkpoint holds no plan for that epoch")
        if partial is not None:
            raise StateError("partial", f"should be None without a plan, not {describe(partial)}")
    else:
        if epoch >= e.epochs:
            raise StateError("plan", f"is set, but epoch {epoch} is the run's last")
        items = _check_plan(plan, e)
        steps = -(-items // (e.batch_size * e.world))
        need_int(step, "step_in_epoch", 1, steps - 1)
        need_dict(partial, "partial", required=("loss_sum", "seconds", "samples"))
        need_number(partial["loss_sum"], "partial.loss_sum")
        need_number(partial["seconds"], "partial.seconds", 0)
        done = int(plan["valid"][: step * e.batch_size * e.world].sum())
        need_int(partial["samples"], "partial.samples", done, done)
        if partial.get("grad_stats") is not None:
            for i, v in enumerate(need_list(partial["grad_stats"], "partial.grad_stats", 3)):
                need_number(v, f"partial.grad_stats[{i}]")
    # samples seen so far: every finished epoch's (all of the data, or fewer where a strategy prunes)
    seen = sum(int(row["samples"]) for row in log) + done
    need_int(state["samples_seen"], "samples_seen", seen, seen)


def _check_plan(plan, e: Expected) -> int:
    """An epoch plan for this dataset and strategy; returns its item count."""
    need_dict(plan, "plan", required=list(PLAN_DTYPES))
    extra = [k for k in plan if k not in PLAN_DTYPES]
    if extra:
        raise StateError(sub("plan", extra[0]), "is not part of an epoch plan")
    for key, dtype in PLAN_DTYPES.items():
        need_tensor(plan[key], sub("plan", key), dtype=dtype)
    counts = [plan[k].shape[0] if plan[k].ndim else 0 for k in PLAN_DTYPES]
    items = max(set(counts), key=counts.count)  # the arrays' common item count: the odd one is named
    for key in PLAN_DTYPES:
        want = [items, e.slots, 4] if key == "box" else [items, e.slots]
        if list(plan[key].shape) != want:
            raise StateError(sub("plan", key), f"has shape {list(plan[key].shape)}; this run needs {want} "
                                               f"(items x {e.slots} slots{' x 4' if key == 'box' else ''})")
    n = e.num_train
    samples = int(plan["valid"].sum())
    if samples != n and not (e.prunes and 0 < samples < n):
        raise StateError("plan", f"carries {samples} samples; this dataset has {n} (a plan of another length)")
    if items and (int(plan["index"].min()) < 0 or int(plan["index"].max()) >= n):
        raise StateError("plan.index", f"holds sample ids outside 0..{n - 1}")
    box = plan["box"].long()
    gh, gw = e.grid
    if items and not ((box[..., 0] >= 0) & (box[..., 0] <= box[..., 2]) & (box[..., 2] <= gh)
                      & (box[..., 1] >= 0) & (box[..., 1] <= box[..., 3]) & (box[..., 3] <= gw)).all():
        raise StateError("plan.box", f"holds regions outside this model's {gh}x{gw} feature grid")
    share = plan["share"]
    if not (torch.isfinite(share) & (share >= 0) & (share <= 1)).all():
        raise StateError("plan.share", "holds shares outside [0, 1]")
    return items


def _check_optimizer(saved, opt: torch.optim.Optimizer):
    """A state this optimizer can load and step with: its groups, parameter counts and shapes."""
    need_dict(saved, "optimizer", required=("state", "param_groups"))
    groups = need_list(saved["param_groups"], "optimizer.param_groups", len(opt.param_groups))
    params, ids = [], {}
    core = ("lr", "weight_decay", "momentum", "nesterov", "dampening", "betas", "eps")
    for i, (g, cur) in enumerate(zip(groups, opt.param_groups)):
        field = f"optimizer.param_groups[{i}]"
        need_dict(g, field, required=["params", *(k for k in core if k in cur)])
        saved_ids = need_list(g["params"], sub(field, "params"), len(cur["params"]))
        for j, (pid, p) in enumerate(zip(saved_ids, cur["params"])):
            need_int(pid, f"{field}.params[{j}]", 0)
            if pid in ids:
                raise StateError(f"{field}.params[{j}]", f"repeats parameter id {pid}")
            ids[pid] = p
        params += cur["params"]
        for k, ref in cur.items():
            if k not in ("params", *DEVICE_SETTINGS) and k in g:
                _same_kind(g[k], ref, sub(field, k))
    state = need_dict(saved["state"], "optimizer.state")
    for pid, entry in state.items():
        field = f"optimizer.state[{pid!r}]"
        if pid not in ids:
            raise StateError(field, "belongs to no parameter of the saved param_groups")
        p = ids[pid]
        for k, v in need_dict(entry, field).items():
            if torch.is_tensor(v):
                if v.ndim:  # a per-parameter buffer (momentum, Adam moments); 0-d: a step count
                    need_tensor(v, sub(field, k), p.shape, p.dtype,
                                " (an optimizer state of another model?)")
            elif v is not None and not _is_number(v):
                raise StateError(sub(field, k), f"should be a tensor or a number, not {describe(v)}")
