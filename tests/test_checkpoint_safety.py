"""Checkpoints are data, never code; a checkpoint that does not fit the run is refused by field;
running out of memory is one clear error that leaves the last checkpoint good (issue 21).

CPU only, on the tiny digits fixtures of test_reliability: every case runs in well under a second
except the few that run the real command.
"""

from __future__ import annotations

import copy
import os
import json
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtrain import Trainer
from mixtrain import checkpoint as ckpt
from mixtrain import models as M
from mixtrain.cli import main
from mixtrain.errors import MixtrainError, out_of_memory
from test_errors import assert_clean_error
from test_reliability import Crash, CrashAfter, _cli_env, config, npz_dir, tiny_data  # noqa: F401 (npz_dir: a fixture)

PLAIN = (str, int, float, bool, type(None))


def walk(obj, path="state"):
    """Every (path, leaf) of a loaded checkpoint."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, obj


@pytest.fixture(autouse=True, scope="module")
def _restore_determinism():
    # --deterministic switches a process-wide PyTorch setting; later test modules get it back as it was
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)


@pytest.fixture(scope="module")
def mid_epoch(tmp_path_factory):
    """A mixtrain checkpoint from inside a mixed epoch (plan, partial sums, gradient statistics)."""
    out = tmp_path_factory.mktemp("mid")
    t = CrashAfter(config(out, method="mixtrain", checkpoint_every=4), tiny_data())
    t.crash_at = "epoch 2, step 4"
    with pytest.raises(Crash):
        t.fit()
    return out, ckpt.load(str(out / "checkpoint.pt"))


# ------------------------------------------------------------------------------------------------
# 1. safe loading


def test_checkpoint_holds_only_tensors_and_plain_data(mid_epoch):
    out, state = mid_epoch  # read by ckpt.load: weights_only=True, so numpy arrays would not even load
    leaves = list(walk(state))
    odd = [(p, type(v).__name__) for p, v in leaves if not (torch.is_tensor(v) or type(v) in PLAIN)]
    assert not odd
    assert all(torch.is_tensor(v) for v in state["plan"].values()) and state["plan"]["index"].dtype == torch.int64
    assert all(type(v) in (int, float) for row in state["log"] for v in row.values())
    # and what the run wrote loads with PyTorch's own safe loader, no allow-listed types needed
    torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_host_copy_converts_numpy_and_refuses_other_objects():
    got = ckpt.host_copy({"a": np.arange(3, dtype=np.int16), "b": np.float64(0.5), "c": [np.int64(2), (1, "x")]})
    assert torch.equal(got["a"], torch.arange(3, dtype=torch.int16)) and type(got["b"]) is float
    assert got["c"] == [2, (1, "x")] and type(got["c"][0]) is int
    with pytest.raises(TypeError, match=r"state\.log\[1\]: a pathlib\.PosixPath cannot go into a checkpoint"):
        ckpt.host_copy({"log": [1, Path("/x")]})


class Payload:
    """What the issue's attacker put into checkpoint.pt: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _finished_run(npz_dir, out):
    assert main(["train", "--data", f"npz:{npz_dir}", "--model", "digitnet", "--epochs", "1", "--batch-size", "20",
                 "--device", "cpu", "--progress", "none", "--out", str(out)]) == 0


def test_pickle_payload_in_checkpoint_is_refused_and_never_runs(npz_dir, tmp_path):
    """The issue's reproduction, as a user runs it: `mixtrain train ... --resume` in a new process."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    _finished_run(npz_dir, out)
    state = ckpt.load(str(out / "checkpoint.pt"))
    state["model"]["extra"] = Payload(marker)  # a real checkpoint, one entry poisoned
    torch.save(state, out / "checkpoint.pt")

    p = subprocess.run([sys.executable, "-m", "mixtrain", "train", "--data", f"npz:{npz_dir}", "--model", "digitnet",
                        "--epochs", "1", "--batch-size", "20", "--device", "cpu", "--progress", "none",
                        "--out", str(out), "--resume"], env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and "Traceback" not in p.stderr, p.stderr
    assert "is refused" in lines[0] and "posix.system" in lines[0] and "never running code" in lines[0]
    assert not marker.exists()

    # the payload is live: the unsafe load that mixtrain used before runs it
    torch.load(out / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_raw_pickle_file_is_refused_and_never_runs(npz_dir, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(pickle.dumps({"config": {}, "model": Payload(marker)}, protocol=2))
    code = main(["train", "--data", f"npz:{npz_dir}", "--model", "digitnet", "--epochs", "1", "--batch-size", "20",
                 "--device", "cpu", "--progress", "none", "--out", str(out), "--resume"])
    assert_clean_error(code, capsys.readouterr().err, "is refused", "posix.system")
    assert not marker.exists()


def test_numpy_in_a_checkpoint_is_refused_with_a_hint(mid_epoch, tmp_path):
    """Mid-epoch checkpoints of earlier versions held the plan as numpy arrays: refused, explained."""
    _, state = mid_epoch
    old = copy.deepcopy(state)
    old["plan"] = {k: v.numpy() for k, v in old["plan"].items()}
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.raises(MixtrainError, match=r"is refused: .*numpy.*an older mixtrain.*train afresh") as e:
        ckpt.load(str(tmp_path / "checkpoint.pt"))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# 2. validated state: fuzzed fields


def _mutations(state):
    """(name, expect, mutate): every field replaced by a string and by None, every tensor and list
    shortened, every tensor given another dtype, every dict key deleted. ``expect`` is "error" (a
    MixtrainError naming the field) or "ok" for the few changes a resume rightly accepts: entries
    that are optional or that PyTorch fills in, and settings taken from where this run trains."""
    overridden = ("foreach", "fused", "capturable")  # set from this run's device
    filled_in = ("maximize", "differentiable", *overridden)  # PyTorch's defaults when absent
    out = []

    def deletable(name):
        last = name.rsplit(".", 1)[-1]
        return (name in ("world_size", "cuda_rng", "partial.grad_stats", "wall_seconds") or name.startswith("optimizer.state[")
                or (".param_groups[" in name and last in filled_in)
                or (name.startswith("log[") and last not in ckpt.LOG_KEYS))

    def none_ok(name):
        return (name in ("cuda_rng", "partial.grad_stats", "wall_seconds") or name.rsplit(".", 1)[-1] in overridden
                or (name.startswith("optimizer.state[") and name.count(".") == 2))  # a buffer not yet made

    def visit(obj, name):
        setter = _setter(name)
        if name:
            out.append((f"{name} <- 'x'", "ok" if name.rsplit(".", 1)[-1] in overridden else "error", setter("x")))
            out.append((f"{name} <- None", "ok" if none_ok(name) else "error", setter(None)))
        if name == "config":
            return  # options: compared with this run's (tests/test_errors.py)
        if isinstance(obj, dict):
            for k, v in obj.items():
                sub = ckpt.sub(name, k)
                out.append((f"{sub} deleted", "ok" if deletable(sub) else "error", _deleter(sub)))
                visit(v, sub)
        elif isinstance(obj, list):
            if obj:
                out.append((f"{name} shortened", "error", setter(obj[:-1])))
            for i, v in enumerate(obj):
                visit(v, ckpt.sub(name, i))
        elif torch.is_tensor(obj):
            if obj.ndim:
                out.append((f"{name} shortened", "error", setter(obj[:-1].clone())))
            other = torch.float32 if obj.dtype == torch.float64 else torch.float64
            out.append((f"{name} <- {other}", "error", setter(obj.to(other))))

    visit(state, "")
    return out


def _keys(name):
    """``optimizer.state[0].momentum_buffer`` -> ["optimizer", "state", 0, "momentum_buffer"]."""
    parts = re.findall(r"\[(\d+)\]|\['([^']*)'\]|\.?([A-Za-z_]\w*)", name)
    return [int(i) if i else (q if q else w) for i, q, w in parts]


def _parent(s, keys):
    for k in keys[:-1]:
        s = s[k]
    return s


def _setter(name):
    """A function of a value: returns the mutation that sets field ``name`` to it."""
    keys = _keys(name)

    def make(value):
        def set_(s):
            _parent(s, keys)[keys[-1]] = value

        return set_

    return make


def _deleter(name):
    keys = _keys(name)
    return lambda s: _parent(s, keys).pop(keys[-1])


def test_fuzzed_checkpoint_fields_give_one_error_naming_the_field(mid_epoch):
    """Each field of a real mid-epoch checkpoint is broken in turn. A break gives a MixtrainError
    (one line) naming the field -- never another exception -- except for the few entries a resume
    does without; those resume."""
    out, state = mid_epoch
    trainer = Trainer(config(out, method="mixtrain", checkpoint_every=4), tiny_data())
    trainer.ckpt_path = str(out / "checkpoint.pt")
    cases = _mutations(state)
    assert len(cases) > 300 and sum(e == "error" for _, e, _ in cases) > 250
    # the fuzz reaches every part of the checkpoint
    for part in ("model[", "optimizer.state[", "optimizer.param_groups[", "strategy.memory.loss", "plan.box",
                 "partial.loss_sum", "partial.grad_stats[", "log[", "torch_rng", "samples_seen", "step_in_epoch"):
        assert any(name.startswith(part) for name, _, _ in cases), part
    failures = []
    for name, expect, mutate in cases:
        broken = copy.deepcopy(state)
        mutate(broken)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.load_checkpoint(broken)
            problem = "accepted" if expect == "error" else None
        except MixtrainError as e:
            field = re.split(r" <- | deleted| shortened", name)[0]
            msg = str(e)
            if expect == "ok":
                problem = f"refused: {msg}"
            elif "\n" in msg or not msg.startswith(f"cannot resume from {out / 'checkpoint.pt'}: "):
                problem = f"not one line about the file: {msg!r}"
            elif field not in msg:
                problem = f"does not name {field}: {msg}"
            else:
                problem = None
        except Exception as e:  # a traceback for the user
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures[:20])
    trainer.load_checkpoint(copy.deepcopy(state))  # and the unbroken state still loads


def _resume_error(state, out, **kw) -> str:
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(MixtrainError) as e:
        Trainer(config(out, method="mixtrain", checkpoint_every=4, resume=True, **kw), tiny_data())
    assert "\n" not in str(e.value)
    return str(e.value)


def test_model_of_another_architecture(mid_epoch, tmp_path):
    _, state = mid_epoch
    other = copy.deepcopy(state)
    other["model"] = M.adapt(M.DigitNet(10, 1, width=16), (16, 16), 1).state_dict()  # same layers, other widths
    msg = _resume_error(other, tmp_path)
    assert "field model['model." in msg and "has shape" in msg and "another model" in msg and "digitnet" in msg

    vit = copy.deepcopy(state)
    vit["model"] = M.adapt(M.create_model("vit_tiny", 10, 1, (16, 16)), (16, 16), 1).state_dict()  # another kind
    msg = _resume_error(vit, tmp_path)
    assert "field model['model." in msg and "is missing (a checkpoint of another model" in msg


def test_optimizer_state_of_another_size(mid_epoch, tmp_path):
    _, state = mid_epoch
    other = copy.deepcopy(state)
    net = M.DigitNet(10, 1, width=16)
    opt = torch.optim.SGD([{"params": [p for p in net.parameters() if p.ndim > 1]},
                           {"params": [p for p in net.parameters() if p.ndim <= 1]}], lr=0.1, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    other["optimizer"]["state"] = opt.state_dict()["state"]
    msg = _resume_error(other, tmp_path)
    assert "field optimizer.state[0].momentum_buffer has shape" in msg and "another model" in msg

    fewer = copy.deepcopy(state)
    fewer["optimizer"]["param_groups"][0]["params"].pop()
    assert "field optimizer.param_groups[0].params has" in _resume_error(fewer, tmp_path)


def test_loss_memory_of_another_dataset_size(mid_epoch, tmp_path):
    _, state = mid_epoch
    other = copy.deepcopy(state)
    other["strategy"]["memory"] = {"loss": torch.zeros(1798), "correct": torch.zeros(1798, dtype=torch.bool)}
    msg = _resume_error(other, tmp_path)
    assert "field strategy.memory.loss has shape [1798]; this run needs [201]" in msg and "200 samples" in msg


def test_plan_of_another_length(mid_epoch, tmp_path):
    _, state = mid_epoch
    other = copy.deepcopy(state)
    other["plan"] = {k: v[:-10].clone() for k, v in other["plan"].items()}
    msg = _resume_error(other, tmp_path)
    assert "field plan carries" in msg and "this dataset has 200 (a plan of another length)" in msg

    wide = copy.deepcopy(state)
    wide["plan"]["box"][0, 0, 2] = 99
    assert "field plan.box holds regions outside this model's 4x4 feature grid" in _resume_error(wide, tmp_path)


def test_model_of_another_architecture_from_the_command_line(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _finished_run(npz_dir, out)
    state = ckpt.load(str(out / "checkpoint.pt"))
    state["model"] = M.adapt(M.DigitNet(10, 1, width=16), (16, 16), 1).state_dict()
    torch.save(state, out / "checkpoint.pt")
    code = main(["train", "--data", f"npz:{npz_dir}", "--model", "digitnet", "--epochs", "1", "--batch-size", "20",
                 "--device", "cpu", "--progress", "none", "--out", str(out), "--resume"])
    assert_clean_error(code, capsys.readouterr().err, "cannot resume from", "field model['model.", "has shape")


# ------------------------------------------------------------------------------------------------
# 3. out of memory


class OomNet(M.DigitNet):
    """A DigitNet that runs out of memory at its ``at``-th training forward (counted in this
    process) or, with ``at_eval``, at its first evaluation forward after training."""

    def __init__(self, num_classes, in_chans, at=None, at_eval=False):
        super().__init__(num_classes, in_chans, width=8)
        self.at, self.at_eval, self.calls = at, at_eval, 0

    def forward_features(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        elif self.at_eval and self.calls:  # (not the one-image probe when the model is built)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return super().forward_features(x)


class _Stream:
    def wait_stream(self, other):
        pass


def _cuda_graph_on_the_cpu(monkeypatch, capture_error=None):
    """The CUDA-graph path with CPU stand-ins for streams and graphs: the trainer captures as on a
    GPU (its warm-up steps run eagerly); ``capture_error`` is raised where the graph is recorded."""
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.use_graph = True

    def graph(g):
        if capture_error is not None:
            raise capture_error
        return nullcontext()

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def _train(npz_dir, out, *extra):
    # 200 samples / batch 20: 10 steps per epoch; the whole test split (100) in one evaluation batch
    return main(["train", "--data", f"npz:{npz_dir}", "--model", "oomnet", "--epochs", "2", "--batch-size", "20",
                 "--lr", "0.05", "--device", "cpu", "--progress", "none", "--deterministic", "--out", str(out), *extra])


def _use(monkeypatch, **kw):
    monkeypatch.setitem(M.MODELS, "oomnet", lambda nc, ic, s: OomNet(nc, ic, **kw))


def _assert_epoch_1_checkpoint(out):
    state = ckpt.load(str(out / "checkpoint.pt"))
    assert (state["epoch"], state["step_in_epoch"], state["plan"]) == (1, 0, None)


def test_out_of_memory_in_step_capture_and_evaluation_leaves_the_checkpoint_good(npz_dir, tmp_path, monkeypatch, capsys):
    """Out of memory at each of the three points: one error line naming the batch size and the
    model, advising a smaller --batch-size; the checkpoint of epoch 1 stays good throughout, and
    the run finally resumed from it ends exactly like a run that never failed."""
    _use(monkeypatch)
    assert _train(npz_dir, tmp_path / "ref") == 0
    ref = (tmp_path / "ref" / "metrics.json").read_text()
    out = tmp_path / "run"
    last_good = f"Last good checkpoint: end of epoch 1, in {out / 'checkpoint.pt'}."

    # a training step: the first of epoch 2 (epoch 1 was checkpointed)
    _use(monkeypatch, at=11)
    code, err = _train(npz_dir, out), capsys.readouterr().err
    assert_clean_error(code, err, "out of memory on cpu in a training step at epoch 2, step 1",
                       "--batch-size 20 images of 16x16 px does not fit with model oomnet",
                       "use a smaller --batch-size (try 10)", last_good)
    _assert_epoch_1_checkpoint(out)

    # the first step of a resumed run: the very first step this process takes
    _use(monkeypatch, at=1)
    code, err = _train(npz_dir, out, "--resume"), capsys.readouterr().err
    assert_clean_error(code, err, "in a training step at epoch 2, step 1", "--batch-size 20", "oomnet", last_good)
    _assert_epoch_1_checkpoint(out)

    # CUDA-graph capture: in its eager warm-up steps, and where the graph is recorded
    for error in (None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")):
        with monkeypatch.context() as m:
            _cuda_graph_on_the_cpu(m, capture_error=error)
            _use(m, at=1 if error is None else None)
            code, err = _train(npz_dir, out, "--resume"), capsys.readouterr().err
        assert_clean_error(code, err, "capturing the CUDA graph of the training step at epoch 2, step 1",
                           "--batch-size 20", "oomnet", "use a smaller --batch-size (try 10)", "--cuda-graph off",
                           last_good)
        assert "training eagerly" not in err  # no silent fallback
        _assert_epoch_1_checkpoint(out)

    # evaluation: after the last epoch, before its checkpoint
    _use(monkeypatch, at_eval=True)
    code, err = _train(npz_dir, out, "--resume"), capsys.readouterr().err
    assert_clean_error(code, err, "evaluating on the test split after epoch 2",
                       "--eval-batch-size 1024 test images of 16x16 px does not fit with model oomnet",
                       "use a smaller --eval-batch-size (try 512) or a smaller --batch-size", last_good)
    _assert_epoch_1_checkpoint(out)

    _use(monkeypatch)
    assert _train(npz_dir, out, "--resume") == 0
    got = (out / "metrics.json").read_text()
    def strip(text):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(text)["epochs_log"]]

    assert strip(got) == strip(ref)


def test_a_capture_failure_that_is_not_out_of_memory_still_falls_back_to_eager(npz_dir, tmp_path, monkeypatch, capsys):
    _use(monkeypatch)
    _cuda_graph_on_the_cpu(monkeypatch, capture_error=RuntimeError("operation not permitted when stream is capturing"))
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*training eagerly"):
        assert _train(npz_dir, tmp_path) == 0


def test_out_of_memory_recognised_through_the_exception_chain():
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    try:  # what a failed allocation inside a capture may surface as
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError:
            raise RuntimeError("operation not permitted when stream is capturing")
    except RuntimeError as e:
        assert out_of_memory(e)
    assert not out_of_memory(RuntimeError("operation not permitted when stream is capturing"))
    assert not out_of_memory(ValueError("out of memory"))
    assert not out_of_memory(MixtrainError("out of memory on cuda:0 ..."))
