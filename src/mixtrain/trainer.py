"""The training loop: one loop for every strategy.

    plan (host, once per epoch) -> fixed-size batches on the device -> augment + compose
    -> body -> region pooling -> head -> loss -> loss memory

:meth:`Trainer.fit` runs :meth:`Trainer.train_epoch` (plan, batches, steps, the strategy's end of
epoch) and :meth:`Trainer.end_epoch` (evaluate, log, checkpoint) until the schedule ends; the
clock, step losses, non-finite watch, checkpoints and logs are the components of
:mod:`mixtrain.hooks`, and everything process-wide is set once in :func:`set_up_process`.

Speed rules kept here: data resident on the device where it fits (uint8), fixed batch shapes,
no host synchronisation inside a step (LRs and sample counts are host numbers known from the
plan; losses accumulate on the device and are read once per epoch, plus a non-blocking look for
non-finite ones every few steps), bf16 autocast and channels-last on CUDA, the step as a CUDA
graph, optional ``torch.compile``.
"""

from __future__ import annotations

import json
import os
import platform
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
from .errors import MixtrainError, OptionError, out_of_memory
from .hooks import Checkpoints, EpochClock, FiniteWatch, RunLogs, StepLosses, write_json
from .models import adapt, create_model
from .schedule import step_lrs
from .options import MIN_IMAGE_SIZE, RESUMABLE_CHANGES, MixOptions, TrainConfig, config_differences, upgrade_config  # noqa: F401 (re-exported)
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


def set_up_process(cfg: TrainConfig) -> tuple[D.DistInfo, torch.device]:
    """Everything a run sets for its whole process, in one place: the process group under
    torchrun (this process's GPU, ``LOCAL_RANK``), deterministic algorithms (``--deterministic``),
    cuDNN autotuning, and the seed of the global generator (the model's initialisation, dropout).
    A :class:`Trainer` calls it once; it owns the process while it trains."""
    device = resolve_device(cfg.device)
    dist = D.setup(cfg.device)
    if dist.world > 1:
        device = dist.device
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.manual_seed(cfg.seed)
    return dist, device


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
    """Runs one configuration: :meth:`fit` trains (or continues) it and returns the metrics also
    written to ``OUT/metrics.json``.

    Its parts, in the order of a step: the data source (``data``: where the images come from), the
    strategy (``strategy``: what each epoch trains on, how the model pools, the loss, its own
    state), the model (``model``: body, region pooling, head) and the optimizer; around the steps,
    the components of :mod:`mixtrain.hooks` (``checkpoints``, and each epoch's clock, step losses
    and logs). Public hooks for tools and tests: :meth:`train_step`, :meth:`step`,
    :meth:`capture_graph`, :meth:`save_checkpoint` and :meth:`on_checkpoint`,
    :meth:`load_checkpoint`, :meth:`evaluate`, :meth:`epoch_generators` and :meth:`sync`.
    """

    def __init__(self, cfg: TrainConfig, data=None):
        cfg.check()
        self.cfg = cfg
        self.dist, self.device = set_up_process(cfg)
        self.is_main = self.dist.is_main
        self.record_dir = os.environ.get(D.RECORD_ENV) or None  # debugging aid, off by default
        self.amp = self.device.type == "cuda" and cfg.precision in ("auto", "bf16") or cfg.precision == "bf16"
        self.data = self._load_data(data)
        self._build_model()
        self.strategy = create_strategy(cfg.method, self.data.num_train, self.grid, cfg.epochs, self.device, cfg.mix)
        if self.strategy.scatter and not self.model.separates_attention:
            raise OptionError("{mix.scatter} needs a ViT separated by attention ({vit_separation} attention; a "
                              f"timm-style ViT without class token): {cfg.resolved_model()} is not one, and without "
                              "the mask scattered constituents would mix in every layer")
        self.loss_per = cfg.mix.loss_per
        # soft-label losses average over passes; the DDP loss weights must match the normalisation
        self.per_pass = self.strategy.averages_over_passes(self.loss_per)
        self._build_optimizer()
        self.graphed = None  # the captured step, made at the first step
        self.graph_used = False
        # where the run stands
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.log: list[dict] = []
        self.wall_before, self.fit_started = 0.0, None  # wall seconds of earlier processes of this run; fit's start
        self.partial = None  # (plan, partial state) of a mid-epoch checkpoint being resumed
        self.test_accuracy, self.eval_seconds, self.test_samples = None, 0.0, 0
        self.checkpoints = Checkpoints(cfg.out, cfg.save_checkpoints, self.is_main)
        self.ckpt_path = self.checkpoints.path
        if cfg.resume:
            self.load_checkpoint(ckpt.load(self.ckpt_path))

    # ------------------------------------------------------------------------------------------
    # set-up

    def _load_data(self, data):
        cfg = self.cfg
        if data is None:
            first = self.dist.local_rank == 0  # downloads/unpacks first; the node's others then read its copy
            if not first:
                self.dist.barrier()
            data = load_data(cfg.data, cfg.image_size or None, cfg.workers, cfg.cache_size, cfg.cache_dir, cfg.placement)
            if first:
                self.dist.barrier()
        data.to(self.device)
        n = data.num_train
        if cfg.batch_size * self.dist.world > n:
            raise MixtrainError(
                f"batch size {cfg.batch_size} x {self.dist.world} process(es) is larger than the training set ({n} samples)"
            )
        return data

    def _build_model(self):
        """The augmentation (the data source's defaults, then the options), the normalisation and
        the adapted model on its device."""
        cfg, data = self.cfg, self.data
        self.image_hw = data.image_size
        default = data.default_augment()
        pad = cfg.pad if cfg.pad >= 0 else default.pad
        if pad >= min(self.image_hw):  # a crop of such a padded image may hold no pixel of the image at all
            raise OptionError("{pad} {got} must be below the image size, {size} px", got=pad, size=min(self.image_hw))
        flip = cfg.flip == "on" or (cfg.flip == "auto" and default.flip)
        self.augment = dataclasses.replace(default, pad=pad, flip=flip)
        self.normalize = Normalizer(data.mean, data.std, self.device)
        net = create_model(cfg.resolved_model(), data.num_classes, data.channels, self.image_hw)
        self.model = adapt(net, self.image_hw, data.channels,
                           separate_attention=cfg.vit_separation == "attention").to(self.device)
        if self.device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.grid = self.model.grid

    def _build_optimizer(self):
        """The optimizer (no weight decay on biases and norms), the DDP wrapper or compiled model
        the step calls, whether the step runs as a CUDA graph, and the gradient-norm statistics."""
        cfg = self.cfg
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
        graphable = self.device.type == "cuda" and not cfg.compile
        if cfg.cuda_graph == "on" and not graphable:
            raise OptionError("{cuda_graph} on needs CUDA and no {compile}")
        # auto = on: measured on 2x H200, the captured DDP step made two GPUs 1.5-1.9x one (eager: 1.04x)
        self.use_graph = graphable and cfg.cuda_graph != "off"
        # under DDP each step weighs this rank's mean loss by its share of the global batch: a
        # device scalar, so that a captured step reads each step's weight (set before the replay)
        self.loss_weight = torch.ones((), device=self.device) if self.dist.world > 1 and self.use_graph else None
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # one kernel per step instead of several
        if cfg.optimizer == "adamw":  # the usual choice for ViTs
            # capturable: its step counters stay on the GPU, so the CUDA graph can capture the step
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused, capturable=self.use_graph)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
        self.net = self.dist.wrap(self.model, graphed=self.use_graph, bucket_mb=cfg.ddp_bucket_mb)
        self.forward = torch.compile(self.net, dynamic=False) if cfg.compile else self.net
        # with --clip-grad: per epoch, sum and max of the (unclipped) gradient norm and the count of
        # clipped steps, accumulated on the device in place (so the CUDA graph updates them too)
        self.grad_stats = torch.zeros(3, device=self.device) if cfg.clip_grad > 0 else None

    # ------------------------------------------------------------------------------------------
    # the epoch loop

    def fit(self) -> dict:
        """Train (or continue) the run; returns the metrics also written to ``OUT/metrics.json``."""
        started = self.fit_started = time.perf_counter()
        try:
            self._write_config()
            logs = RunLogs(self.cfg.out, self.cfg.progress, self.cfg.csv, self.cfg.tensorboard, self.is_main)
            if self.cfg.resume:
                logs.restart(self.log)  # a kill between checkpoint and log write may have lost a row
            self.model.train()
            # Early stop on a non-finite loss, long before the epoch ends, on one process only: under
            # DDP every rank must stop at the same check (a rank that stops alone leaves the others
            # waiting in their next collective), and agreeing would take a collective, i.e. a host
            # sync, per check. There the epoch-end (and --checkpoint-every) check stays the only one.
            watch = FiniteWatch(self.device) if self.dist.world == 1 else None
            while self.epoch < self.cfg.epochs:
                row = self.train_epoch(logs, watch)
                self.end_epoch(row, logs)
            return self._finish(started, logs)
        except BaseException as e:
            # the checkpoint in flight is the "last good" one an error message names: let it land
            self.checkpoints.wait(raise_error=False)
            try:  # a bench goes on after a diverged run: its pool must not stay behind
                self._release_graph()
            except Exception:  # noqa: BLE001 -- e.g. after a sticky CUDA error: the first error is the one to report
                pass
            if out_of_memory(e):  # a training step (capture and evaluation raise their own error)
                raise self._out_of_memory_error("in a training step") from e
            raise

    def train_epoch(self, logs: RunLogs, watch: FiniteWatch | None = None) -> dict:
        """One epoch (or the rest of a resumed one): plan, batches, steps -- each recording its
        samples' losses -- and the strategy's end of epoch. Returns the epoch's log row."""
        cfg, epoch = self.cfg, self.epoch
        plan_rng, pad_rng, aug_gen = self.epoch_generators(epoch)
        resumed_plan, partial = self.partial or (None, None)
        self.partial = None
        clock = EpochClock(self.sync, partial["seconds"] if partial else 0.0)  # planning is training time
        plan = resumed_plan if resumed_plan is not None else self.strategy.plan_epoch(epoch, plan_rng)
        batches = EpochBatches(plan, cfg.batch_size, self.grid, self.device, aug_gen, self.dist.rank, self.dist.world,
                               pad_rng, self.image_hw, self.augment, self.strategy.blend, self.data.source_size,
                               scatter=self.strategy.scatter)
        lrs = self._learning_rates(plan, batches)
        # each step's loss goes into one device buffer: no host sync per step (see hooks.StepLosses)
        losses = StepLosses(len(batches), self.device, self.dist, partial["loss_sum"] if partial and self.is_main else 0.0)
        if watch is not None:
            watch.start(losses.values)
        first_step = self._restore_grad_stats(partial)
        source = self.data.step_images(batches, self.device, self.step_in_epoch)
        logs.start_epoch(epoch, cfg.epochs, len(batches) - self.step_in_epoch)
        try:  # a streamed source's gathering thread must stop even when a step raises
            for j in range(self.step_in_epoch, len(batches)):
                images, src = source.get(j)
                scale = batches.loss_scale(j, per_pass=self.per_pass)
                losses.values[j] = self.train_step(batches.batch(j), images, src, float(lrs[j]), scale)
                self.samples_seen += int(batches.global_samples[j])
                self.step_in_epoch = j + 1
                logs.step()
                if watch is not None and watch.bad(j):
                    losses.checked(len(batches), epoch, self.checkpoints.describe_last_good())  # raises, naming the step
                if cfg.checkpoint_every and (j + 1) % cfg.checkpoint_every == 0 and j + 1 < len(batches):
                    self._checkpoint_mid_epoch(j, plan, batches, losses, clock)
        finally:
            source.close()
        self.strategy.end_epoch(self.dist.world > 1)
        if self.record_dir:
            D.record_epoch(self.record_dir, self.dist, epoch, plan, batches, self.strategy, self.samples_seen)
        return self._epoch_row(plan, batches, lrs, losses, clock.stop(), first_step)

    def _recorded_options(self) -> dict:
        """The strategy's options for ``metrics.json``, ``step_scale`` as what ran (not ``auto``)."""
        opts = self.strategy.options()
        if "step_scale" in opts:
            opts["step_scale"] = self.cfg.resolved_step_scale()
        return opts

    def _learning_rates(self, plan, batches) -> np.ndarray:
        """The LR of each step of the epoch, from the one-cycle schedule in samples seen. Every
        epoch advances the schedule by the dataset's size: an epoch that carries fewer samples
        (pruning) spreads the same stretch over its steps; one that carries all of them (every other
        strategy) advances it by exactly its samples. ``--step-scale`` then scales each step by the
        samples it carries per pass."""
        n = self.data.num_train
        stretch = n / max(1, plan.samples)
        total = float(self.cfg.epochs * n)
        lrs = step_lrs(batches.global_samples * stretch, float(self.epoch * n), total, self.cfg.lr, self.cfg.lr_warmup)
        return lrs * self.strategy.lr_factors(batches.global_samples, batches.global_passes, self.cfg.resolved_step_scale())

    def _restore_grad_stats(self, partial: dict | None) -> int:
        """The first step the epoch's gradient-norm statistics cover: this one, or the epoch's
        first when resumed from a checkpoint that saved them."""
        saved = (partial or {}).get("grad_stats")
        if self.grad_stats is not None and saved is not None:
            self.grad_stats.copy_(torch.tensor(saved))
            return 0
        return self.step_in_epoch

    def _checkpoint_mid_epoch(self, j: int, plan, batches, losses: StepLosses, clock: EpochClock):
        """``--checkpoint-every``: the state after step ``j``, with the epoch's plan and its sums so far."""
        so_far = losses.checked(j + 1, self.epoch, self.checkpoints.describe_last_good())
        with clock.paused() as seconds:  # checkpoint writes are not training time
            if self.dist.world > 1:
                self.strategy.sync()  # only rank 0 saves: it must hold every rank's losses so far
            partial = {"loss_sum": losses.total(so_far, batches.local_samples), "seconds": seconds,
                       "samples": int(batches.global_samples[: j + 1].sum())}
            if self.grad_stats is not None:  # so a resumed epoch logs the whole epoch's norms
                partial["grad_stats"] = self.grad_stats.tolist()
            self.save_checkpoint(f"epoch {self.epoch + 1}, step {j + 1}", plan, partial)

    def _epoch_row(self, plan, batches, lrs, losses: StepLosses, seconds: float, first_step: int) -> dict:
        n = self.data.num_train
        step_losses = losses.checked(len(batches), self.epoch, self.checkpoints.describe_last_good())
        row = {
            "epoch": self.epoch + 1,
            "passes": plan.passes,
            "samples": plan.samples,
            "seconds": seconds,
            "train_loss": losses.total(step_losses, batches.local_samples) / max(1, plan.samples),
            "mixed_fraction": plan.mixed_samples / n,
            "lr_end": float(lrs[-1]),
        }
        row.update(self.strategy.epoch_stats(plan))  # what the method adds to the epoch's log
        if self.grad_stats is not None:  # this process's steps of the epoch (read after the clock's sync)
            norm_sum, norm_max, clipped = self.grad_stats.tolist()
            row.update(grad_norm_mean=norm_sum / max(1, len(batches) - first_step), grad_norm_max=norm_max,
                       clipped_steps=int(clipped))
            self.grad_stats.zero_()
        return row

    def end_epoch(self, row: dict, logs: RunLogs):
        """After an epoch: evaluate when due (always after the last), log the row, checkpoint."""
        self.epoch += 1
        self.step_in_epoch = 0
        # the last epoch is always scored, before its row is logged (log.csv, TensorBoard, line)
        if self.epoch == self.cfg.epochs or (self.cfg.eval_every and self.epoch % self.cfg.eval_every == 0):
            self._timed_evaluation()
            row["test_accuracy"] = self.test_accuracy
        self.log.append(row)
        self.save_checkpoint(f"end of epoch {self.epoch}")
        logs.end_epoch(row, self.cfg.epochs)

    def _timed_evaluation(self):
        t = time.perf_counter()
        self.test_accuracy = self.evaluate()
        self.eval_seconds = time.perf_counter() - t

    def _release_graph(self):
        """Free the captured step's memory pool before the next run in this process."""
        if self.graphed is not None:
            graphed, self.graphed = self.graphed, None
            graphed.release()

    def _finish(self, started: float, logs: RunLogs) -> dict:
        self._release_graph()
        if self.test_accuracy is None:  # resumed a finished run: nothing trained in this process
            self._timed_evaluation()
            if self.log:
                self.log[-1]["test_accuracy"] = self.test_accuracy
        self.checkpoints.wait()  # the last checkpoint is on disk before the run reports done
        metrics = self.metrics(time.perf_counter() - started)
        if self.is_main:
            path = os.path.join(self.cfg.out, "metrics.json")
            try:
                write_json(path, metrics)
            except OSError as e:
                raise MixtrainError(f"cannot write {path}: {e.strerror or e}") from e
        logs.close(metrics)
        return metrics

    def metrics(self, fit_seconds: float = 0.0) -> dict:
        """The run's results so far: totals over the log, the last test accuracy, where it ran."""
        cfg = self.cfg
        m = {
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
            "eval_seconds": self.eval_seconds,
            # everything fit spent, in this process and the earlier ones of a resumed run: training,
            # evaluation, checkpoints, logs
            "wall_seconds": self.wall_before + fit_seconds,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.test_samples,
            "grid": list(self.grid),
            "device": str(self.device),
            "versions": versions(),
            "options": self._recorded_options(),
            "epochs_log": self.log,
        }
        m["pass_speedup"] = m["samples"] / max(1, m["passes"])
        return m

    def _write_config(self):
        """``OUT/config.json``: every resolved option (main process), after clearing temporaries a
        run killed while saving left behind."""
        cfg = self.cfg
        if not self.is_main:
            return
        try:
            os.makedirs(cfg.out, exist_ok=True)
            ckpt.remove_stale_temporaries(cfg.out)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump({**cfg.to_record(), "resolved_model": cfg.resolved_model(), "grid": list(self.grid),
                           "augment": asdict(self.augment), "world_size": self.dist.world}, f, indent=2)
        except OSError as e:
            raise MixtrainError(f"cannot write to the output folder {cfg.out}: {e.strerror or e}") from e

    def epoch_generators(self, epoch: int):
        """The epoch's random generators, derived from (seed, epoch, rank): the plan's, the padding
        items', and the augmentation draws' (a CPU torch generator). A resumed epoch redraws them."""
        seed = self.cfg.seed
        plan_rng = np.random.default_rng([seed, epoch, 1])
        pad_rng = np.random.default_rng([seed, epoch, 2])
        aug_seed = int(np.random.default_rng([seed, epoch, self.dist.rank, 3]).integers(2**62))
        aug = torch.Generator().manual_seed(aug_seed)
        return plan_rng, pad_rng, aug

    def sync(self):
        """Wait for the device's queued work (timing points only; never inside a step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------------
    # one step

    def train_step(self, batch, images: torch.Tensor, src: torch.Tensor | None, lr: float, scale: float = 1.0):
        """One training step on ``batch``, its images read from ``images`` (by ``src``, or by sample
        id): replayed as a CUDA graph where possible (captured at the first call), else eagerly.
        ``scale`` weighs this rank's mean loss under DDP. Returns the loss (on the device)."""
        if self.loss_weight is not None:  # read by the captured step: a kernel launch, no host synchronisation
            self.loss_weight.fill_(scale)
        if self.graphed is None and self.use_graph:
            self.capture_graph(batch, lr, images, src)
        if self.graphed is not None:
            return self.graphed.step(batch, lr, () if src is None else (images, src))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return self.step(batch, batch.compose(images, self.normalize, src), scale)

    @_out_of_memory_guard("capturing the CUDA graph of the training step")
    def capture_graph(self, batch, lr: float, images: torch.Tensor, src: torch.Tensor | None = None):
        """Capture the whole step as a CUDA graph (see graphs.py); on failure keep training eagerly.

        Resident data: the step gathers from the whole training split by sample id. Streamed data:
        the step reads a static buffer of ``B * K`` images and their slot positions, into which
        each step's streamed images are copied before the replay.
        """
        from .graphs import GraphedStep

        weight = 1.0 if self.loss_weight is None else self.loss_weight  # read at each replay under DDP
        if src is None:
            def step(b):
                return self.step(b, b.compose(images, self.normalize), weight)
            extra = ()
        else:
            rows = batch.index.numel()  # the most distinct images a step can show
            extra = (torch.zeros((rows, *images.shape[1:]), dtype=images.dtype, device=images.device),
                     torch.zeros_like(src))

            def step(b, static_images, static_src):
                return self.step(b, b.compose(static_images, self.normalize, static_src), weight)

        several = self.dist.world > 1  # all ranks capture at the same step; a rank alone cannot fall back
        g = GraphedStep(step, self.optimizer, self.model, self.strategy.step_state(), extra,
                        eager_steps=D.DDP_EAGER_STEPS if several else 3, fallback=not several,
                        stream=self.dist.capture_stream)
        before = None if self.grad_stats is None else self.grad_stats.clone()
        if g.capture(batch, lr, () if src is None else (images, src)):
            self.graphed = g
            self.graph_used = True
        else:
            self.use_graph = False
        if before is not None:  # the capture's warm-up steps do not count
            self.grad_stats.copy_(before)

    def step(self, batch, x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """One eager step on composed images ``x``: the strategy's forward and loss, backward,
        gradient clipping, the optimizer, and the strategy's record of each sample's loss. Fixed
        shapes, no host synchronisation: this is what the CUDA graph captures."""
        s = self.strategy
        targets = batch.targets(self.data.train_y)
        # no autocast weight cache inside a CUDA graph capture (its casts must be recorded each step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.use_graph):
            logits = s.forward(self.forward, x, batch)  # the strategy pools (per region, or globally)
        loss, ce = s.loss(batch, logits, targets, self.cfg.label_smoothing, self.loss_per)
        self.optimizer.zero_grad(set_to_none=True)
        # scale: a float, or under a captured DDP step a device scalar (never compared on the host)
        (loss * scale if torch.is_tensor(scale) or scale != 1.0 else loss).backward()
        if self.grad_stats is not None:  # on the device, no host sync (so also inside the CUDA graph)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad, foreach=True)
            st = self.grad_stats
            st[0].add_(norm)
            st[1].copy_(torch.maximum(st[1], norm))
            st[2].add_((norm > self.cfg.clip_grad).float())
        self.optimizer.step()
        # the loss memory (strategies that keep one), from the losses just computed when they are
        # the plain cross-entropy
        plain = ce is not None and self.cfg.label_smoothing == 0
        s.record(batch, logits, targets, ce if plain else None)
        return loss.detach()

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

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self, plan_arrays=None, partial=None) -> dict:
        """The checkpoint: tensors and plain Python data only (it loads with ``weights_only=True``);
        the plan's numpy arrays become tensors here and numpy arrays again in :meth:`load_checkpoint`."""
        plan = None if plan_arrays is None else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in plan_arrays.items()}
        return {
            "config": self.cfg.to_record(),
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

    def save_checkpoint(self, where: str, plan=None, partial=None):
        """Checkpoint the run as it stands (``where``: e.g. "end of epoch 3"; ``plan``/``partial``:
        the epoch's plan and sums when mid-epoch), then call :meth:`on_checkpoint`."""
        self.checkpoints.save(where, self.model, lambda: self.state_dict(plan.arrays() if plan is not None else None, partial))
        self.on_checkpoint(where)

    def on_checkpoint(self, where: str):
        """Called after each checkpoint has been handed to the writer; a subclass may act on it
        (the reliability tests stop a run here, as a kill at that moment would)."""

    def load_checkpoint(self, state: dict):
        """Resume from ``state`` (read by :func:`checkpoint.load`: data only). Every field is checked
        against this run first; a field that does not fit gives one error naming it, and nothing is
        applied."""
        self._check_resumable(state)
        self._apply(state)

    def _check_resumable(self, state: dict):
        try:
            ckpt.check_config(state, TrainConfig().to_dict(), RESUMABLE_CHANGES)
            saved = TrainConfig.from_dict(upgrade_config(state["config"], saved=True))
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

    def _apply(self, state: dict):
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
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("plan") is not None:  # mid-epoch: the process count was checked above
            from .plan import EpochPlan

            plan = EpochPlan(**{k: v.numpy() for k, v in state["plan"].items()})
            self.partial = (plan, state["partial"])
            self.checkpoints.last_good = f"epoch {self.epoch + 1}, step {self.step_in_epoch}"
        else:
            self.checkpoints.last_good = f"end of epoch {self.epoch}"

    def _out_of_memory_error(self, doing: str, evaluating: bool = False) -> MixtrainError:
        """The error for a batch that does not fit: where, which batch size and model, what to try."""
        cfg = self.cfg
        h, w = self.image_hw
        if evaluating:
            where, n = f"{doing} after epoch {self.epoch}", cfg.eval_batch_size
            what = "a batch of {eval_batch_size} {n} test images"
            advice = "use a smaller {eval_batch_size} (try {half}) or a smaller {batch_size}"
        else:
            where, n = f"{doing} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1}", cfg.batch_size
            what = "a batch of {batch_size} {n} images"
            advice = "use a smaller {batch_size} (try {half})"
            if "graph" in doing:
                advice += ", or {cuda_graph} off if the step fits without the graph's own memory pool"
        return OptionError(
            "out of memory on {dev} {where}: " + what + " of {h}x{w} px does not fit with model {model}; " + advice
            + ". Last good checkpoint: {last_good}.", dev=str(self.device), where=where, n=n, half=max(1, n // 2), h=h,
            w=w, model=cfg.resolved_model(), last_good=self.checkpoints.describe_last_good())


def _portable(opt_state: dict) -> dict:
    """Optimizer state with plain-number learning rates (CUDA-graph mode keeps them as tensors)."""
    for g in opt_state["param_groups"]:
        if torch.is_tensor(g.get("lr")):
            g["lr"] = float(g["lr"])
    return opt_state


def train(cfg: TrainConfig | None = None, data=None, **overrides) -> dict:
    """Run one training configuration; returns the metrics (also written to ``cfg.out``).

    ``overrides`` set options of ``cfg`` (a copy; ``cfg`` itself is left as it is), e.g.
    ``train(epochs=5, method="mixtrain", mix={"quad_confidence": 0.9})``: ``mix`` may be a
    :class:`MixOptions` or a dict of some of its fields. Unlike ``mixtrain train``, which refuses an
    ``--out`` that holds a run unless ``--overwrite`` is given, this writes into ``cfg.out``
    whatever is there (``resume=True`` continues the run there instead).
    """
    cfg = dataclasses.replace(cfg) if cfg is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise MixtrainError(f"unknown training option {k!r}")
        if k == "mix" and isinstance(v, dict):
            unknown = sorted(set(v) - {f.name for f in dataclasses.fields(MixOptions)})
            if unknown:
                raise MixtrainError(f"unknown mixing option(s) {', '.join(map(repr, unknown))} in mix=")
            v = dataclasses.replace(cfg.mix, **v)
        setattr(cfg, k, v)
    return Trainer(cfg, data).fit()
