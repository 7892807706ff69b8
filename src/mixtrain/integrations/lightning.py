"""MixTrain in PyTorch Lightning: one callback (``pip install 'mixtrain[lightning]'``).

:class:`MixTrainCallback` plans every epoch, swaps its batch sampler into the training
DataLoader (same dataset, transforms, workers and collate function; the plan orders the epoch, so
``shuffle`` and Lightning's distributed sampler are not used), and gives ``training_step`` the
step's composites and the separated loss, which it records in the loss memory. Its state (loss
memory, epoch, position and plan) goes into Lightning's checkpoints, so ``fit(ckpt_path=...)``
continues exactly where the checkpoint was taken. Under DDP every process plans the same epoch and
trains its share of each global step.

The LightningModule holds an adapted model (:func:`mixtrain.adapt`) and calls the callback in
``training_step``::

    from mixtrain.integrations.lightning import MixTrainCallback

    mix = MixTrainCallback()

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = mixtrain.adapt(create_my_model(), 32)        # feature grid measured here

        def training_step(self, batch, batch_idx):
            step = mix.compose(batch)                                 # composites and their regions
            return mix.loss(self.model(step.images, step.masks), step)   # separated loss, recorded

    pl.Trainer(max_epochs=30, callbacks=[mix]).fit(Net(), train_loader)

Epochs that mix take fewer steps than ``len(train_loader)``: Lightning's step count for the epoch
(the progress bar, ``estimated_stepping_batches``) is that of an unmixed epoch, and a mixed epoch
simply ends early; prefer learning-rate schedules by epoch or by samples (``step.global_samples``).
Within each optimizer step the callback scales the learning rates by the step's ``lr_factor``
(with SGD, the samples it carries per pass) and restores them after it (``scale_lr``).
"""

from __future__ import annotations

try:  # the standalone package (the extra installs it), else the unified one
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise ImportError(
            "mixtrain.integrations.lightning needs PyTorch Lightning: pip install 'mixtrain[lightning]'"
        ) from e

from torch.utils.data import DataLoader, IterableDataset

from ..errors import MixtrainError, notice
from ..loader import Mixer, MixStep, torch_optimizer
from ..models import SpatialModel
from ..strategies import MixOptions


class _MixedLoader:
    """What Lightning iterates instead of the user's DataLoader: the same loader with the mixer's
    batch sampler. Not a DataLoader, so Lightning leaves its sampler alone; its length is the most
    steps an epoch can take, and a mixed epoch ends early."""

    def __init__(self, mixer: Mixer, loader: DataLoader):
        self.mixer = mixer
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return self.mixer.max_steps

    def __iter__(self):
        # a generator: Lightning creates an epoch's iterator before it announces the epoch, so the
        # plan is made at the first batch (by the sampler), never at iter()
        yield from self.loader

    # the loader is resumable: the callback's checkpoint state holds its epoch, position and plan
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def _loader_like(loader: DataLoader, batch_sampler) -> DataLoader:
    """A DataLoader over ``loader``'s dataset with ``batch_sampler`` and its other settings."""
    kw = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
              timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
              multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
              persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    if getattr(loader, "pin_memory_device", ""):
        kw["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order") and not loader.in_order:
        raise MixtrainError("MixTrainCallback needs the DataLoader's batches in order (in_order=True): the j-th "
                            "batch of an epoch must be its step j")
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, **kw)


class MixTrainCallback(pl.Callback):
    """PyTorch Lightning callback for MixTrain (see the module docstring for a complete example).

    ``epochs``: the schedule's length (default: the Trainer's ``max_epochs``); ``batch_size``:
    images (passes) per step and process (default: the training DataLoader's). ``method``,
    ``opts``, ``seed``, ``label_smoothing``: as for :class:`mixtrain.Mixer`. ``model``: the adapted
    model, when the LightningModule holds more than one (default: the first
    :class:`~mixtrain.SpatialModel` among its modules). ``scale_lr``: during each optimizer step,
    multiply the (first) optimizer's learning rates by the step's ``lr_factor`` and restore them
    after it, as the trainer's ``--step-scale`` does (under the default ``auto``: the linear rule
    with SGD, 1 with other optimizers; with gradient accumulation, the mean factor of the
    accumulated batches). Your schedule and scheduler never see the scaled values; ``False``
    leaves the learning rate to you.

    In ``training_step`` call :meth:`compose` on the batch and return :meth:`loss` of the model's
    logits. :attr:`history` has one row per trained epoch (passes, samples, mixed fraction, steps),
    also logged as ``mixtrain/passes`` and ``mixtrain/mixed_fraction``.

    >>> trainer = pl.Trainer(max_epochs=30, callbacks=[MixTrainCallback()])   # doctest: +SKIP
    """

    def __init__(self, epochs: int | None = None, batch_size: int | None = None, *, method: str = "mixtrain",
                 opts: MixOptions | None = None, seed: int = 0, label_smoothing: float = 0.0, model=None,
                 scale_lr: bool = True):
        self.epochs, self.batch_size = epochs, batch_size
        self.method, self.opts, self.seed, self.label_smoothing = method, opts, seed, label_smoothing
        self.model, self.scale_lr = model, scale_lr
        self._factors: list[float] = []  # lr_factor of each step composed since the last optimizer step
        self._unscaled: list | None = None  # the learning rates an optimizer step scaled, to restore
        self._lr_hooks: list = []
        self._optimizer = None  # the optimizer whose learning rates are scaled (scale_lr)
        self._unwrap = None  # gives the strategy back its own optimizer_step
        self._scaled: list | None = None
        self._warned_changed = False
        self.mixer: Mixer | None = None
        self.history: list[dict] = []
        self._saved = None  # state restored before the mixer exists (Lightning restores callbacks first)
        self._step_before = None

    # -- what training_step calls ---------------------------------------------------------------

    def compose(self, batch, labels=None) -> MixStep:
        """This step's composites from the batch (``(images, labels)``, as the DataLoader gives it),
        on the batch's device: see :meth:`mixtrain.Mixer.compose`."""
        if self.mixer is None:
            raise MixtrainError("MixTrainCallback.compose outside a fit: pass the callback to the Trainer "
                                "(Trainer(callbacks=[mix])) and call compose in training_step")
        if labels is None:
            try:
                images, labels = batch
            except (TypeError, ValueError):
                raise MixtrainError("MixTrainCallback.compose takes the batch as (images, labels), or the two "
                                    "as two arguments") from None
        else:
            images = batch
        step = self.mixer.compose(images, labels)
        self._scale_lrs(step.lr_factor)
        return step

    # -- the learning rate of each optimizer step (scale_lr) ------------------------------------
    # Lightning runs training_step (compose) inside the optimizer step, as its closure: compose
    # scales the learning rates, and they are restored as soon as the strategy's optimizer step
    # returns (taken, or skipped by the AMP scaler) and again by the optimizer's post-step hook (a
    # torch optimizer stepped directly), so the update uses the scaled ones and the scheduler,
    # which steps after, never sees them.

    def _hook_optimizer(self, trainer):
        optimizer = _first_optimizer(trainer)
        if optimizer is not self._optimizer:
            self._unhook()  # a fit before this one (ended by an error, or another optimizer)
        if not self.scale_lr or optimizer is None or self._optimizer is not None:
            return
        self._optimizer = optimizer
        self._lr_hooks = [optimizer.register_step_post_hook(lambda *_: self._end_step())]
        strategy = getattr(trainer, "strategy", None)
        step = getattr(strategy, "optimizer_step", None)
        if step is not None:
            def optimizer_step(opt, *args, **kwargs):
                try:
                    return step(opt, *args, **kwargs)
                finally:
                    if torch_optimizer(opt) is self._optimizer:
                        self._end_step()

            had_own = "optimizer_step" in vars(strategy)
            strategy.optimizer_step = optimizer_step
            self._unwrap = (lambda: setattr(strategy, "optimizer_step", step)) if had_own else (
                lambda: vars(strategy).pop("optimizer_step", None))

    def _unhook(self):
        self._restore_lrs()
        for hook in self._lr_hooks:
            hook.remove()
        if self._unwrap is not None:
            self._unwrap()
        self._lr_hooks, self._optimizer, self._unwrap = [], None, None
        self._factors.clear()

    def _scale_lrs(self, factor: float):
        if self._optimizer is None:
            return
        self._factors.append(factor)
        groups = self._optimizer.param_groups
        if self._unscaled is None:
            self._unscaled = [g["lr"] for g in groups]
        mean = sum(self._factors) / len(self._factors)  # accumulated batches share one step
        self._scaled = [lr * mean for lr in self._unscaled]
        for g, lr in zip(groups, self._scaled):
            g["lr"] = lr

    def _restore_lrs(self):
        if self._unscaled is None:
            return
        groups = self._optimizer.param_groups
        if not self._warned_changed and any(g["lr"] is not lr for g, lr in zip(groups, self._scaled)):
            self._warned_changed = True
            notice("the learning rate changed between MixTrainCallback.compose and the optimizer step, which the "
                   "callback scales by step.lr_factor (scale_lr=True): if your module also multiplies by "
                   "step.lr_factor, remove that or pass MixTrainCallback(scale_lr=False); the callback restores "
                   "the rate it found before the step")
        for g, lr in zip(groups, self._unscaled):
            g["lr"] = lr
        self._unscaled = self._scaled = None

    def _end_step(self):
        self._restore_lrs()
        self._factors.clear()

    def loss(self, logits, step: MixStep):
        """The loss to return from ``training_step``; records the per-sample losses: see
        :meth:`mixtrain.Mixer.loss`."""
        if self.mixer is None:
            raise MixtrainError("MixTrainCallback.loss outside a fit")
        return self.mixer.loss(logits, step)

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str):
        """Route the training DataLoader through the mixer's batch sampler (fit only)."""
        if stage != "fit":
            return
        try:
            source = trainer.fit_loop._data_source
            original = getattr(source, "_mixtrain_original", None) or source.dataloader
        except AttributeError as e:  # a Lightning whose loops are laid out otherwise
            raise MixtrainError(f"MixTrainCallback does not know this Lightning version ({pl.__version__}): "
                                f"{e}") from e

        def dataloader():
            return self._wrap(original(), trainer, pl_module)

        source._mixtrain_original = original
        source.dataloader = dataloader

    def teardown(self, trainer, pl_module, stage: str):
        """Give the training data source back its own ``dataloader``, and the optimizer its step."""
        self._unhook()
        source = getattr(trainer.fit_loop, "_data_source", None)
        if stage == "fit" and getattr(source, "_mixtrain_original", None) is not None:
            del source.dataloader
            del source._mixtrain_original

    def _wrap(self, loader, trainer, pl_module):
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise MixtrainError(
                f"MixTrainCallback needs one training DataLoader over a map-style dataset, got {type(loader).__name__}"
            )
        if self.mixer is None:
            self.mixer = self._make_mixer(loader, trainer, pl_module)
            if self._saved is not None:
                self._restore(self._saved)
                self._saved = None
        elif len(loader.dataset) != self.mixer.num_samples:
            raise MixtrainError(f"the training set changed size ({self.mixer.num_samples} -> {len(loader.dataset)} "
                                "samples): a MixTrainCallback plans one dataset")
        self._hook_optimizer(trainer)  # this fit's optimizer (a callback may serve more than one fit)
        return _MixedLoader(self.mixer, _loader_like(loader, self.mixer.sampler))

    def _make_mixer(self, loader, trainer, pl_module) -> Mixer:
        model = self.model
        if model is None:
            model = next((m for m in pl_module.modules() if isinstance(m, SpatialModel)), None)
        if model is None:
            raise MixtrainError(f"{type(pl_module).__name__} holds no adapted model: wrap yours with "
                                "mixtrain.adapt(model, image_size, channels), or pass MixTrainCallback(model=...)")
        batch_size = self.batch_size or loader.batch_size
        if not batch_size:
            raise MixtrainError("the training DataLoader has no batch_size (a batch sampler of its own?): "
                                "give MixTrainCallback(batch_size=...)")
        epochs = self.epochs or trainer.max_epochs
        if not epochs or epochs < 1:
            raise MixtrainError("MixTrainCallback needs the schedule's length: give Trainer(max_epochs=...) "
                                "or MixTrainCallback(epochs=...)")
        if trainer.max_epochs and 0 < trainer.max_epochs < epochs:
            notice(f"MixTrainCallback plans a {epochs}-epoch schedule, but the Trainer stops after "
                   f"{trainer.max_epochs} (max_epochs): its final unmixed epochs will not be reached")
        if not self.scale_lr and self.opts is not None and self.opts.step_scale in ("sqrt", "linear"):
            notice(f"MixTrainCallback(scale_lr=False) does not set learning rates: step_scale={self.opts.step_scale!r} "
                   "reaches the optimizer only if you multiply its LR by step.lr_factor before each optimizer step "
                   "(e.g. in the LightningModule's on_before_optimizer_step)")
        return Mixer(model, len(loader.dataset), epochs, batch_size, method=self.method, opts=self.opts,
                     seed=self.seed, rank=trainer.global_rank, world=trainer.world_size, device=pl_module.device,
                     label_smoothing=self.label_smoothing, optimizer=_first_optimizer(trainer))

    def on_train_epoch_start(self, trainer, pl_module):
        """Check that the mixer serves the epoch Lightning trains."""
        if self.mixer is not None and self.mixer.epoch != trainer.current_epoch:
            raise MixtrainError(
                f"Lightning trains epoch {trainer.current_epoch} but MixTrainCallback's plan is for epoch "
                f"{self.mixer.epoch}: resume from a checkpoint saved with this callback, with the same callbacks"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Note where the mixer stands, to check that ``training_step`` composes this batch."""
        self._step_before = None if self.mixer is None else (self.mixer.epoch, self.mixer.consumed)

    def on_exception(self, trainer, pl_module, exception):
        """A fit ended by an error (Lightning calls no teardown then): the learning rates as found,
        the optimizer and the strategy without the callback's hooks."""
        self._unhook()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Refuse a ``training_step`` that did not compose its batch (it would train unmixed and
        leave the loss memory empty); the learning rates unscaled after a batch that took no
        optimizer step (accumulating, or skipped by the AMP scaler)."""
        self._restore_lrs()
        if self._step_before is not None and self._step_before == (self.mixer.epoch, self.mixer.consumed):
            raise MixtrainError(
                "training_step did not call compose on its batch: the batch holds the step's constituents, not its "
                "composites. Use step = mix.compose(batch) and return mix.loss(model(step.images, step.masks), step)"
            )

    def on_train_epoch_end(self, trainer, pl_module):
        """Log the epoch's plan and move on to the next epoch."""
        m = self.mixer
        if m is None or m.plan is None:
            return
        plan = m.plan
        row = {"epoch": m.epoch, "passes": plan.passes, "samples": plan.samples,
               "mixed_fraction": plan.mixed_samples / m.num_samples, "steps": m.consumed}
        self.history.append(row)
        pl_module.log_dict({"mixtrain/passes": float(row["passes"]), "mixtrain/mixed_fraction": row["mixed_fraction"]},
                           on_step=False, on_epoch=True)
        m.finish_epoch()

    def state_dict(self) -> dict:
        """The mixer's state (under DDP a collective: Lightning calls it on every process) and the history."""
        if self.mixer is None:
            return dict(self._saved or {})
        return {"mixer": self.mixer.state_dict(), "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict):
        """Restore from a checkpoint (applied when the mixer is made, at the first training epoch)."""
        if self.mixer is None:
            self._saved = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: dict):
        if "mixer" in state:
            self.mixer.load_state_dict(state["mixer"])
        self.history = [dict(r) for r in state.get("history", [])]


def _first_optimizer(trainer):
    """The Trainer's first optimizer when it is (or wraps) a torch optimizer, else None: what
    ``step_scale="auto"`` resolves for (none: ``step.lr_factor`` stays 1)."""
    return torch_optimizer(next(iter(getattr(trainer, "optimizers", None) or []), None))
