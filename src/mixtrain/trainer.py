"""The training loop: one loop for every strategy.

    plan (host, once per epoch) -> fixed-size batches on the device -> augment + compose
    -> body -> region pooling -> head -> loss -> loss memory

Speed rules kept here: data resident on the device where it fits (uint8), fixed batch shapes,
no host synchronisation inside a step (LRs and sample counts are host numbers known from the
plan; losses accumulate on the device and are read once per epoch, plus a non-blocking look for
non-finite ones every ``FINITE_CHECK_EVERY`` steps), bf16 autocast and
channels-last on CUDA, optional ``torch.compile``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import dataclasses
import functools
from dataclasses import asdict

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as D
from .batches import EpochBatches
from .compose import Normalizer
from .distributed import resolve_device
from .data import load_data
from .errors import MixtrainError, out_of_memory
from .models import adapt, create_model
from .schedule import step_lrs
from .options import MIN_IMAGE_SIZE, RESUMABLE_CHANGES, MixOptions, TrainConfig, config_differences  # noqa: F401 (re-exported)
from .strategies import create_strategy


def versions() -> dict:
    import torchvision

    from . import __version__

    v = {
        "mixtrain": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    try:
        import timm

        v["timm"] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
        v["cuda"] = torch.version.cuda
    else:
        v["cpu"] = platform.processor() or platform.machine()
    return v


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


FINITE_CHECK_EVERY = 25  # steps between the early, non-blocking looks at an epoch's step losses


class _FiniteWatch:
    """Notices a non-finite step loss within about ``every`` steps, without a host sync in a step.

    Every ``every`` steps the device computes "all of this epoch's step losses are finite" (the
    buffer is zero, so finite, before a step writes it) and, on CUDA, copies it into a pinned host
    flag with ``non_blocking=True`` behind a recorded event; later steps read the flag only once
    ``event.query()`` (which never blocks) says the copy has landed. One copy is in flight at a
    time, so the flag is never read while being written. On the CPU the copy is synchronous
    anyway: the flag is read at once. ``bad(j)`` only says that a check should run now; the
    trainer's ``_check_finite`` then finds the exact first bad step and stops.
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


def _out_of_memory_guard(doing: str, evaluating: bool = False):
    """Turn running out of memory inside the decorated method into one error naming the batch
    size and the model (:meth:`Trainer._out_of_memory_error`)."""

    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not out_of_memory(e):
                    raise
                raise self._out_of_memory_error(doing, evaluating) from e

        return guarded

    return wrap


class Trainer:
    """Runs one configuration; :meth:`fit` returns the metrics dict also written to ``metrics.json``."""

    def __init__(self, cfg: TrainConfig, data=None):
        cfg.check()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = D.setup(cfg.device)  # under torchrun: this process's GPU (LOCAL_RANK) or the CPU
        if self.dist.world > 1:
            self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.record_dir = os.environ.get(D.RECORD_ENV) or None  # debugging aid, off by default
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
        self.amp = self.device.type == "cuda" and cfg.precision in ("auto", "bf16") or cfg.precision == "bf16"

        if data is None:
            first = self.dist.local_rank == 0  # downloads/unpacks first; the node's others then read its copy
            if not first:
                self.dist.barrier()
            data = load_data(cfg.data, cfg.image_size or None, cfg.workers, cfg.cache_size, cfg.cache_dir, cfg.placement)
            if first:
                self.dist.barrier()
        self.data = data
        self.data.to(self.device)
        n = self.data.num_train
        world_batch = cfg.batch_size * self.dist.world
        if world_batch > n:
            raise MixtrainError(
                f"batch size {cfg.batch_size} x {self.dist.world} process(es) is larger than the training set ({n} samples)"
            )
        self.image_hw = self.data.image_size
        default = self.data.default_augment()  # the data source's own defaults
        pad = cfg.pad if cfg.pad >= 0 else default.pad
        flip = cfg.flip == "on" or (cfg.flip == "auto" and default.flip)
        self.augment = dataclasses.replace(default, pad=pad, flip=flip)
        self.normalize = Normalizer(self.data.mean, self.data.std, self.device)

        torch.manual_seed(cfg.seed)  # model initialisation (the trainer owns this process)
        net = create_model(cfg.resolved_model(), self.data.num_classes, self.data.channels, self.image_hw)
        self.model = adapt(net, self.image_hw, self.data.channels,
                           separate_attention=cfg.vit_separation == "attention").to(self.device)
        if self.device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.grid = self.model.grid
        self.strategy = create_strategy(cfg.method, n, self.grid, cfg.epochs, self.device, cfg.mix)
        self.loss_per = cfg.mix.loss_per
        # soft-label losses average over passes; the DDP loss weights must match the normalisation
        self.per_pass = self.strategy.averages_over_passes(self.loss_per)
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
        graphable = self.device.type == "cuda" and self.dist.world == 1 and not cfg.compile
        if cfg.cuda_graph == "on" and not graphable:
            raise MixtrainError("--cuda-graph on needs one CUDA process and no --compile")
        self.use_graph = graphable and cfg.cuda_graph != "off"
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # one kernel per step instead of several
        if cfg.optimizer == "adamw":  # the usual choice for ViTs
            # capturable: its step counters stay on the GPU, so the CUDA graph can capture the step
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused, capturable=self.use_graph)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
        self.net = self.dist.wrap(self.model)
        self.forward = torch.compile(self.net, dynamic=False) if cfg.compile else self.net
        # with --clip-grad: per epoch, sum and max of the (unclipped) gradient norm and the count of
        # clipped steps, accumulated on the device in place (so the CUDA graph updates them too)
        self.grad_stats = torch.zeros(3, device=self.device) if cfg.clip_grad > 0 else None
        self.graphed = None  # the captured step, made at the first step
        self.graph_used = False

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.log: list[dict] = []
        self.wall_before, self.fit_started = 0.0, None  # wall seconds of earlier processes of this run; fit's start
        self.partial = None  # mid-epoch state when resuming from a step checkpoint
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        self.checkpoints = ckpt.CheckpointWriter()  # writes in a background thread
        self.last_good = None  # where the latest checkpoint written or loaded stands, for messages
        if cfg.resume:
            self._load(ckpt.load(self.ckpt_path))

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self, plan_arrays=None, partial=None) -> dict:
        """The checkpoint: tensors and plain Python data only (it loads with ``weights_only=True``);
        the plan's numpy arrays become tensors here and numpy arrays again in :meth:`_load`."""
        plan = None if plan_arrays is None else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in plan_arrays.items()}
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": _portable(self.optimizer.state_dict()),
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "samples_seen": self.samples_seen,
            "world_size": self.dist.world,
            "log": self.log,
            "plan": plan,
            "partial": partial,
            # The epoch's plan/padding/augmentation generators are re-derived from (seed, epoch,
            # rank) and need no saving; the global generators (dropout, drop-path) do.
            "torch_rng": torch.get_rng_state(),
            "wall_seconds": self.wall_before + (time.perf_counter() - self.fit_started if self.fit_started else 0.0),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _load(self, state: dict):
        """Resume from ``state`` (read by :func:`checkpoint.load`: data only). Every field is checked
        against this run first (:func:`checkpoint.check_state`); a field that does not fit gives one
        error naming it, and nothing is applied."""
        try:
            ckpt.check_config(state, TrainConfig().to_dict(), RESUMABLE_CHANGES)
            saved = TrainConfig.from_dict(state["config"])
        except ckpt.StateError as e:
            raise MixtrainError(f"cannot resume from {self.ckpt_path}: {e}") from e
        except TypeError as e:  # e.g. an option of the mixing options that this version does not know
            raise MixtrainError(f"cannot resume from {self.ckpt_path}: field config: {ckpt.one_line(e)}") from e
        diff = config_differences(saved, self.cfg)
        world = state.get("world_size", 1)
        if world != self.dist.world:  # the global batch (batch size x processes) defines the run
            diff.append(f"processes: {world!r} -> {self.dist.world}")
        if diff:
            raise MixtrainError(
                f"cannot resume: the checkpoint {self.ckpt_path} was made with other options "
                f"({'; '.join(diff)}); resume with the checkpoint's options, or train afresh into another --out"
            )
        cuda = self.device.type == "cuda"
        expected = ckpt.Expected(
            model=self.model.state_dict(), model_name=self.cfg.resolved_model(), optimizer=self.optimizer,
            strategy=self.strategy.state_dict(), num_train=self.data.num_train, slots=self.strategy.slots,
            grid=tuple(self.grid), epochs=self.cfg.epochs, batch_size=self.cfg.batch_size, world=self.dist.world,
            torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(self.device) if cuda else None,
            prunes=self.strategy.prunes,
        )
        try:
            ckpt.check_state(state, expected)
        except ckpt.StateError as e:
            raise MixtrainError(f"cannot resume from {self.ckpt_path}: {e}") from e
        for key in ("model", "optimizer", "strategy"):
            try:
                if key == "model":
                    self.model.load_state_dict(state["model"])
                elif key == "optimizer":
                    self.optimizer.load_state_dict(state["optimizer"])
                    for name in ("capturable", "fused", "foreach"):  # where this run trains, not where the checkpoint was made
                        if name in self.optimizer.defaults:
                            for g in self.optimizer.param_groups:
                                g[name] = self.optimizer.defaults[name]
                else:
                    self.strategy.load_state_dict(state["strategy"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise MixtrainError(f"cannot resume from {self.ckpt_path}: field {key} does not fit this run "
                                    f"({ckpt.one_line(e)})") from e
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.samples_seen = state["samples_seen"]
        self.log = [dict(row) for row in state["log"]]
        # the run's wall time so far (checkpoints before it was saved: at least its training time)
        wall = state.get("wall_seconds")
        self.wall_before = float(wall) if wall is not None else float(sum(row["seconds"] for row in self.log))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and cuda:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("plan") is not None:  # mid-epoch: the process count was checked above
            from .plan import EpochPlan

            plan = EpochPlan(**{k: v.numpy() for k, v in state["plan"].items()})
            self.partial = (plan, state["partial"])
            self.last_good = f"epoch {self.epoch + 1}, step {self.step_in_epoch}"
        else:
            self.last_good = f"end of epoch {self.epoch}"

    def _weights_finite(self) -> bool:
        """All floating parameters and buffers (e.g. batch-norm statistics) are finite: one sync."""
        flags = [torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def _save(self, where: str, plan=None, partial=None):
        """Checkpoint (main process), after checking that the weights are worth keeping."""
        if not self._weights_finite():
            raise MixtrainError(
                f"non-finite weights at {where}; stopped. Last good checkpoint: {self._last_good()}. Try a lower --lr."
            )
        if self.is_main and self.cfg.save_checkpoints:
            arrays = plan.arrays() if plan is not None else None
            self.checkpoints.save(self.state_dict(arrays, partial), self.ckpt_path)
        self.last_good = where

    def _out_of_memory_error(self, doing: str, evaluating: bool = False) -> MixtrainError:
        """The error for a batch that does not fit: where, which batch size and model, what to try."""
        cfg = self.cfg
        h, w = self.image_hw
        if evaluating:
            where = f"{doing} after epoch {self.epoch}"
            what = f"a batch of --eval-batch-size {cfg.eval_batch_size} test images"
            advice = f"use a smaller --eval-batch-size (try {max(1, cfg.eval_batch_size // 2)}) or a smaller --batch-size"
        else:
            where = f"{doing} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
            what = f"a batch of --batch-size {cfg.batch_size} images"
            advice = f"use a smaller --batch-size (try {max(1, cfg.batch_size // 2)})"
            if "graph" in doing:
                advice += ", or --cuda-graph off if the step fits without the graph's own memory pool"
        return MixtrainError(
            f"out of memory on {self.device} {where}: {what} of {h}x{w} px does not fit with model "
            f"{cfg.resolved_model()}; {advice}. Last good checkpoint: {self._last_good()}."
        )

    def _last_good(self) -> str:
        if not self.cfg.save_checkpoints:
            return "none (checkpoints are off)"
        if self.last_good is None:
            return "none (the run stopped before its first checkpoint)"
        return f"{self.last_good}, in {self.ckpt_path}"

    # ------------------------------------------------------------------------------------------
    # one step

    @_out_of_memory_guard("capturing the CUDA graph of the training step")
    def _capture(self, batch, lr: float, images: torch.Tensor, src: torch.Tensor | None):
        """Capture the whole step as a CUDA graph (see graphs.py); on failure keep training eagerly.

        Resident data: the step gathers from the whole training split by sample id. Streamed data:
        the step reads a static buffer of ``B * K`` images and their slot positions, into which
        each step's streamed images are copied before the replay.
        """
        from .graphs import GraphedStep

        labels = self.data.train_y
        if src is None:
            def step(b):
                return self._train_step(b, b.compose(images, self.normalize), labels)
            extra = ()
        else:
            rows = batch.index.numel()  # the most distinct images a step can show
            extra = (torch.zeros((rows, *images.shape[1:]), dtype=images.dtype, device=images.device),
                     torch.zeros_like(src))

            def step(b, static_images, static_src):
                return self._train_step(b, b.compose(static_images, self.normalize, static_src), labels)

        g = GraphedStep(step, self.optimizer, self.model, self.strategy.step_state(), extra)
        before = None if self.grad_stats is None else self.grad_stats.clone()
        if g.capture(batch, lr, () if src is None else (images, src)):
            self.graphed = g
            self.graph_used = True
        else:
            self.use_graph = False
        if before is not None:  # the capture's warm-up steps do not count
            self.grad_stats.copy_(before)

    def _train_step(self, batch, x, labels, scale: float = 1.0):
        """One step; ``scale`` weighs this rank's mean loss under DDP (EpochBatches.loss_scale)."""
        s = self.strategy
        targets = batch.targets(labels)
        # no autocast weight cache inside a CUDA graph capture (its casts must be recorded each step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.use_graph):
            logits = s.forward(self.forward, x, batch)  # the strategy pools (per region, or globally)
        loss, ce = s.loss(batch, logits, targets, self.cfg.label_smoothing, self.loss_per)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1.0 else loss * scale).backward()
        if self.grad_stats is not None:  # on the device, no host sync (so also inside the CUDA graph)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad, foreach=True)
            st = self.grad_stats
            st[0].add_(norm)
            st[1].copy_(torch.maximum(st[1], norm))
            st[2].add_((norm > self.cfg.clip_grad).float())
        self.optimizer.step()
        # the loss memory (only for strategies that use one), from the losses just computed when
        # they are the plain cross-entropy
        plain = ce is not None and self.cfg.label_smoothing == 0
        s.record(batch, logits, targets, ce if plain else None)
        return loss.detach()

    # ------------------------------------------------------------------------------------------
    # epochs

    def _epoch_rngs(self, epoch: int):
        seed = self.cfg.seed
        plan_rng = np.random.default_rng([seed, epoch, 1])
        pad_rng = np.random.default_rng([seed, epoch, 2])
        aug_seed = int(np.random.default_rng([seed, epoch, self.dist.rank, 3]).integers(2**62))
        aug = torch.Generator().manual_seed(aug_seed)
        return plan_rng, pad_rng, aug

    def fit(self) -> dict:
        """Train (or continue) the run; returns the metrics also written to ``OUT/metrics.json``."""
        started = self.fit_started = time.perf_counter()
        try:
            return self._fit(started)
        except BaseException as e:
            # the checkpoint in flight is the "last good" one an error message names: let it land
            self.checkpoints.wait(raise_error=False)
            if out_of_memory(e):  # a training step (capture and evaluation raise their own error)
                raise self._out_of_memory_error("in a training step") from e
            raise

    def _fit(self, started: float) -> dict:
        cfg = self.cfg
        if self.is_main:
            try:
                os.makedirs(cfg.out, exist_ok=True)
                ckpt.remove_stale_temporaries(cfg.out)  # left by a run killed while saving
                with open(os.path.join(cfg.out, "config.json"), "w") as f:
                    json.dump({**cfg.to_dict(), "resolved_model": cfg.resolved_model(), "grid": list(self.grid),
                               "augment": asdict(self.augment), "world_size": self.dist.world}, f, indent=2)
            except OSError as e:
                raise MixtrainError(f"cannot write to the output folder {cfg.out}: {e.strerror or e}") from e
        progress = Progress(cfg.progress, self.is_main)
        writers = _Writers(cfg, self.is_main)
        if cfg.resume:
            writers.restart(self.log)  # a kill between checkpoint and log write may have lost a row
        n = self.data.num_train
        total = float(cfg.epochs * n)
        labels = self.data.train_y
        self.model.train()
        acc, eval_seconds = None, 0.0
        # Early stop on a non-finite loss, long before the epoch ends, on one process only: under
        # DDP every rank must stop at the same check (a rank that stops alone leaves the others
        # waiting in their next collective), and agreeing would take a collective, i.e. a host
        # sync, per check. There the epoch-end (and --checkpoint-every) check stays the only one.
        watch = _FiniteWatch(self.device) if self.dist.world == 1 else None

        while self.epoch < cfg.epochs:
            epoch = self.epoch
            plan_rng, pad_rng, aug_gen = self._epoch_rngs(epoch)
            self._sync()
            t0 = time.perf_counter()
            if self.partial is not None:
                plan, partial = self.partial
                self.partial = None
            else:
                plan, partial = self.strategy.plan_epoch(epoch, plan_rng), None
            batches = EpochBatches(plan, cfg.batch_size, self.grid, self.device, aug_gen,
                                   self.dist.rank, self.dist.world, pad_rng, self.image_hw, self.augment,
                                   self.strategy.blend, self.data.source_size)
            # the schedule's position: every epoch advances it by the dataset's size, so an epoch that
            # carries fewer samples (pruning) spreads the same stretch of the schedule over its steps;
            # an epoch that carries all of them (every other strategy) advances it by its samples
            stretch = n / max(1, plan.samples)
            lrs = step_lrs(batches.global_samples * stretch, float(epoch * n), total, cfg.lr, cfg.warmup)
            # each step's loss goes into one device buffer: no host sync per step; read at the end
            # (and watched for non-finite values without blocking, see _FiniteWatch)
            step_loss = torch.zeros(len(batches), device=self.device)
            if watch is not None:
                watch.start(step_loss)
            seconds_before, loss_before = 0.0, 0.0
            save_seconds = 0.0  # checkpoint writes inside the epoch are not training time
            if partial:
                if self.is_main:  # saved as the sum over all ranks: add it back once
                    loss_before = partial["loss_sum"]
                seconds_before = partial["seconds"]
            source = self.data.step_images(batches, self.device, self.step_in_epoch)
            # the gradient-norm statistics cover the epoch from here, or from its start when resumed
            # from a checkpoint that saved them
            first_step = self.step_in_epoch
            saved_stats = (partial or {}).get("grad_stats")
            if self.grad_stats is not None and saved_stats is not None:
                self.grad_stats.copy_(torch.tensor(saved_stats))
                first_step = 0
            progress.start_epoch(epoch, cfg.epochs, len(batches) - self.step_in_epoch)
            for j in range(self.step_in_epoch, len(batches)):
                batch = batches.batch(j)
                lr = float(lrs[j])
                images, src = source.get(j)
                if self.graphed is None and self.use_graph:
                    self._capture(batch, lr, images, src)
                if self.graphed is not None:
                    step_loss[j] = self.graphed.step(batch, lr, () if src is None else (images, src))
                else:
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    x = batch.compose(images, self.normalize, src)
                    step_loss[j] = self._train_step(batch, x, labels, batches.loss_scale(j, per_pass=self.per_pass))
                self.samples_seen += int(batches.global_samples[j])
                self.step_in_epoch = j + 1
                progress.step()
                if watch is not None and watch.bad(j):
                    self._check_finite(step_loss, epoch)  # raises, naming the first non-finite step
                if cfg.checkpoint_every and (j + 1) % cfg.checkpoint_every == 0 and j + 1 < len(batches):
                    losses = self._check_finite(step_loss[: j + 1], epoch)
                    self._sync()
                    t_save = time.perf_counter()
                    secs = seconds_before + t_save - t0 - save_seconds
                    memory = getattr(self.strategy, "memory", None)
                    if self.dist.world > 1 and memory is not None:
                        memory.all_reduce()  # only rank 0 saves: it must hold every rank's losses so far
                    done = int(batches.global_samples[: j + 1].sum())
                    so_far = self._loss_sum(losses, batches.local_samples[: j + 1], loss_before)
                    partial_state = {"loss_sum": so_far, "seconds": secs, "samples": done}
                    if self.grad_stats is not None:  # so a resumed epoch logs the whole epoch's norms
                        partial_state["grad_stats"] = self.grad_stats.tolist()
                    self._save(f"epoch {epoch + 1}, step {j + 1}", plan, partial_state)
                    save_seconds += time.perf_counter() - t_save
            source.close()
            self.strategy.end_epoch(self.dist.world > 1)
            if self.record_dir:
                D.record_epoch(self.record_dir, self.dist, epoch, plan, batches, self.strategy, self.samples_seen)
            self._sync()
            seconds = seconds_before + time.perf_counter() - t0 - save_seconds
            losses = self._check_finite(step_loss, epoch)
            loss_total = self._loss_sum(losses, batches.local_samples, loss_before)
            row = {
                "epoch": epoch + 1,
                "passes": plan.passes,
                "samples": plan.samples,
                "seconds": seconds,
                "train_loss": loss_total / max(1, plan.samples),
                "mixed_fraction": plan.mixed_samples / n,
                "lr_end": float(lrs[-1]),
            }
            if self.strategy.prunes:
                row["pruned_fraction"] = 1.0 - plan.samples / n
            if self.grad_stats is not None:  # this process's steps of the epoch (read after the sync above)
                norm_sum, norm_max, clipped = self.grad_stats.tolist()
                row.update(grad_norm_mean=norm_sum / max(1, len(batches) - first_step), grad_norm_max=norm_max,
                           clipped_steps=int(clipped))
                self.grad_stats.zero_()
            self.epoch += 1
            self.step_in_epoch = 0
            # the last epoch is always scored, before its row is logged (log.csv, TensorBoard, line)
            if self.epoch == cfg.epochs or (cfg.eval_every and self.epoch % cfg.eval_every == 0):
                t_eval = time.perf_counter()
                row["test_accuracy"] = acc = self.evaluate()
                eval_seconds = time.perf_counter() - t_eval
            self.log.append(row)
            self._save(f"end of epoch {self.epoch}")
            progress.end_epoch(row, cfg.epochs)
            writers.epoch(row)

        if self.graphed is not None:  # free the graph's memory pool before the next run in this process
            self.graphed.release()
            self.graphed = None
        if acc is None:  # resumed a finished run: nothing trained in this process
            t_eval = time.perf_counter()
            acc = self.evaluate()
            eval_seconds = time.perf_counter() - t_eval
            if self.log:
                self.log[-1]["test_accuracy"] = acc
        self.checkpoints.wait()  # the last checkpoint is on disk before the run reports done
        metrics = {
            "method": cfg.method,
            "model": cfg.resolved_model(),
            "data": cfg.data,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "world_size": self.dist.world,
            "cuda_graph": self.graph_used,
            "passes": sum(r["passes"] for r in self.log),
            "samples": sum(r["samples"] for r in self.log),
            "train_seconds": sum(r["seconds"] for r in self.log),
            "eval_seconds": eval_seconds,
            # everything fit spent, in this process and the earlier ones of a resumed run: training,
            # evaluation, checkpoints, logs
            "wall_seconds": self.wall_before + time.perf_counter() - started,
            "test_accuracy": acc,
            "test_samples": self.test_samples,
            "grid": list(self.grid),
            "device": str(self.device),
            "versions": versions(),
            "options": self.strategy.options(),
            "epochs_log": self.log,
        }
        metrics["pass_speedup"] = metrics["samples"] / max(1, metrics["passes"])
        if self.is_main:
            try:
                _write_json(os.path.join(cfg.out, "metrics.json"), metrics)
            except OSError as e:
                raise MixtrainError(f"cannot write {os.path.join(cfg.out, 'metrics.json')}: {e.strerror or e}") from e
        writers.close(metrics)
        return metrics

    def _loss_sum(self, losses: np.ndarray, samples: np.ndarray, before: float) -> float:
        """Sum over the world of per-step mean loss x samples carried (``before``: resumed part)."""
        local = float((losses * samples).sum()) + before
        return self.dist.sum(torch.tensor(local, dtype=torch.float64, device=self.device)).item()

    def _check_finite(self, step_loss: torch.Tensor, epoch: int) -> np.ndarray:
        """Host copy of the step losses so far (one host sync per check); stops the run at the
        first non-finite one, every rank together."""
        losses = step_loss.double().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        s = self.dist.first_flag(torch.tensor(int(bad[0]) if len(bad) else -1, device=self.device))
        if s >= 0:
            raise MixtrainError(
                f"non-finite loss at epoch {epoch + 1}, step {s + 1}; stopped. "
                f"Last good checkpoint: {self._last_good()}. Try a lower --lr."
            )
        return losses

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @_out_of_memory_guard("evaluating on the test split", evaluating=True)
    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 accuracy on the test split (plain forward, global pooling).

        Under DDP each rank scores every ``world``-th test sample with rank 0's weights and
        batch-norm statistics, and the counts are summed: each test sample is counted once.
        """
        self.dist.broadcast_buffers(self.model)
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        chunks = self.data.test_batches(self.cfg.eval_batch_size, self.device, self.dist.rank, self.dist.world)
        for x, y in chunks:
            x = self.normalize(x)
            if self.device.type == "cuda" and self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(x)
            correct += (logits.argmax(-1) == y).sum()
            total += len(y)
        self.model.train()
        counts = self.dist.sum(torch.stack([correct.double(), torch.tensor(float(total), dtype=torch.float64, device=self.device)]))
        correct, total = counts.tolist()
        self.test_samples = int(total)  # each test sample once, over all ranks
        return correct / max(1, total)


def _portable(opt_state: dict) -> dict:
    """Optimizer state with plain-number learning rates (CUDA-graph mode keeps them as tensors)."""
    for g in opt_state["param_groups"]:
        if torch.is_tensor(g.get("lr")):
            g["lr"] = float(g["lr"])
    return opt_state


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class _Writers:
    """Optional per-epoch logs: CSV and TensorBoard."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.csv = None
        self.tb = None
        if not enabled:
            return
        if cfg.csv:
            self.csv_path = os.path.join(cfg.out, "log.csv")
            self.csv = True
            self.rows_written = 0
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MixtrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"))

    CSV_KEYS = ["epoch", "passes", "samples", "seconds", "train_loss", "mixed_fraction", "lr_end", "test_accuracy"]

    def restart(self, log: list[dict]):
        """A resumed run: rewrite the CSV from the checkpoint's log, so it holds each epoch once."""
        if self.csv:
            import csv

            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, self.CSV_KEYS, extrasaction="ignore")
                w.writeheader()
                w.writerows(log)

    def epoch(self, row: dict):
        if self.csv:
            import csv

            new = not os.path.exists(self.csv_path) or row["epoch"] == 1
            with open(self.csv_path, "w" if row["epoch"] == 1 else "a", newline="") as f:
                w = csv.DictWriter(f, self.CSV_KEYS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        if self.tb:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(f"train/{k}", v, row["epoch"])

    def close(self, metrics: dict):
        if self.tb:
            self.tb.add_scalar("test/accuracy", metrics["test_accuracy"], metrics["epochs"])
            self.tb.close()


def train(cfg: TrainConfig | None = None, data=None, **overrides) -> dict:
    """Run one training configuration; returns the metrics (also written to ``cfg.out``)."""
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise MixtrainError(f"unknown training option {k!r}")
        setattr(cfg, k, v)
    return Trainer(cfg, data).fit()
