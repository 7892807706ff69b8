"""MixTrain with your own ``Dataset`` and ``DataLoader``: your transforms, mixtrain's composites.

For a map-style dataset of ``(image, label)`` pairs whose transforms (decode, crop, flip,
normalise) run on the CPU in DataLoader workers. Three pieces, all on one :class:`Mixer`:

* :attr:`Mixer.sampler`, a batch sampler for ``DataLoader(dataset, batch_sampler=...)``: each
  step's sample ids in the epoch plan's order (every constituent of the step's composites, item by
  item, slot by slot). ``set_epoch(e)`` plans epoch ``e`` from the loss memory; under DDP every
  process plans the same epoch and takes its share of each global step;
* :meth:`Mixer.compose` turns the loader's batch (the decoded, augmented float constituents and
  their labels) into the step's composites and their regions, with the region layout of the plan
  (:class:`~mixtrain.plan.EpochPlan` boxes on the model's feature grid, rendered by
  :mod:`mixtrain.compose` in one resampling). Steps that mix nothing pass the images through;
* :meth:`Mixer.loss` takes the model's logits and returns the loss to back-propagate (the
  separated loss, weighted for DDP) while writing the per-sample losses into the loss memory that
  plans the next epochs.

Example (runs on the CPU; the README has a complete one)::

    mixer = mixtrain.Mixer(model, len(train_set), epochs, batch_size=64)
    loader = DataLoader(train_set, batch_sampler=mixer.sampler, num_workers=4)
    for epoch in range(epochs):
        mixer.set_epoch(epoch)
        for images, labels in loader:
            step = mixer.compose(images.to(device), labels.to(device))
            loss = mixer.loss(model(step.images, step.masks), step)
            opt.zero_grad(); loss.backward(); opt.step()

The DataLoader delivers batches in the sampler's order, so the ``j``-th batch of an epoch is step
``j``; :meth:`Mixer.compose` counts the steps and checks that each batch holds as many images as
its step needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from . import plan as P
from .compose import Augment, compose_from, geometry, rand_width
from .errors import MixtrainError, OptionError
from .plan import EpochPlan
from .strategies import MixOptions, Strategy, create_strategy

# the constituents arrive augmented by the user's transforms: the resampling only places them
_PLACE_ONLY = Augment(pad=0, flip=False)


class _AsIs:
    """A normaliser that leaves pixels as they are (the user's transforms normalised them); zero
    padding then reads 0, the mean colour of normalised images, as in the resident path."""

    offset = 0.0

    @staticmethod
    def scale_into(x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class MixStep:
    """One training step of a :class:`Mixer`: composites, regions and what the loss needs.

    Fields: ``images [B, C, H, W]`` the composites (the model's input); ``masks [B, K, gh, gw]``
    each constituent's averaging weights on the feature grid (pass them to the adapted model:
    ``model(step.images, step.masks)``; ``None`` for methods that pool the whole composite);
    ``targets``/``index``/``valid``/``share``/``weight`` ``[B, K]`` each slot's label, sample id,
    whether it carries a sample, its share of the composite and its loss weight; ``samples`` the
    samples this process's step carries and ``global_samples`` those of the whole global step (for
    a learning-rate schedule in samples seen); ``scale`` this process's loss weight under DDP (1 on
    one process); ``epoch`` and ``step`` where it stands; ``lr_factor`` what ``opts.step_scale``
    asks of this step's learning rate (multiply your schedule's LR by it; under the default
    ``auto``, the linear rule for SGD, 1 for other optimizers or none given: see
    ``Mixer(optimizer=...)``).

    >>> step = mixer.compose(images, labels)  # doctest: +SKIP
    >>> step.images.shape, step.masks.shape   # doctest: +SKIP
    (torch.Size([64, 1, 16, 16]), torch.Size([64, 4, 4, 4]))
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    targets: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    share: torch.Tensor
    weight: torch.Tensor
    samples: int
    global_samples: int
    scale: float
    epoch: int
    step: int
    lr_factor: float = 1.0


class _EpochLayout:
    """This process's steps of one planned epoch, on the host: per step the sample ids to load
    (every shown slot, item by item) and where each slot's image lands in the loaded batch."""

    def __init__(self, plan: EpochPlan, batch_size: int, grid, rank: int, world: int, pad_rng, draw_seed: int):
        full = plan.padded(batch_size * world, pad_rng, grid)
        live = full.valid.reshape(-1, world * batch_size, full.slots)
        self.global_samples = live.sum((1, 2))
        self.global_passes = live.any(2).sum(1)
        self.plan = plan
        mine = full.shard(rank, world, batch_size) if world > 1 else full
        self.mine = mine
        self.batch_size = batch_size
        self.world = world
        self.steps = mine.items // batch_size
        k = mine.slots
        shown = P.box_shows(mine.box)  # slots whose region shows an image (padding items show one too)
        per_step = shown.reshape(self.steps, batch_size * k)
        self.counts = per_step.sum(1)
        self.src = np.where(per_step, np.cumsum(per_step, 1) - 1, 0).reshape(self.steps, batch_size, k)
        self.ids = np.split(mine.index[shown], np.cumsum(self.counts)[:-1])
        valid = mine.valid.reshape(self.steps, batch_size, k)
        self.local_samples = valid.sum((1, 2))
        self.local_passes = valid.any(2).sum(1)
        # a step whose items are all one whole image each needs no resampling
        full_box = np.all(mine.box[:, 0] == np.array([0, 0, grid[0], grid[1]], mine.box.dtype), -1)
        whole = (shown.sum(1) == 1) & full_box & ~mine.resize[:, 0]
        self.whole = whole.reshape(self.steps, batch_size).all(1)
        self.draw_seed = draw_seed

    def rows(self, j: int) -> slice:
        return slice(j * self.batch_size, (j + 1) * self.batch_size)

    def generator(self, j: int) -> torch.Generator:
        """Step ``j``'s generator of region offsets: a function of (seed, epoch, rank, step) alone."""
        return torch.Generator().manual_seed(int(np.random.default_rng([self.draw_seed, j]).integers(2**62)))

    def rand(self, j: int) -> torch.Tensor:
        """Step ``j``'s uniform draws ``[B, K, R]`` for :func:`mixtrain.compose.geometry`."""
        return torch.rand((self.batch_size, self.mine.slots, rand_width(_PLACE_ONLY)), generator=self.generator(j))

    def loss_scale(self, j: int, per_pass: bool) -> float:
        """Factor for this process's mean loss of step ``j`` under DDP (1.0 on one process), as in
        :meth:`mixtrain.batches.EpochBatches.loss_scale`: every sample (or pass, with ``per_pass``)
        of the global step then weighs the same, as in one process."""
        if self.world == 1:
            return 1.0
        local, total = ((self.local_passes, self.global_passes) if per_pass
                        else (self.local_samples, self.global_samples))
        return float(local[j]) * self.world / max(1, int(total[j]))


class MixSampler(Sampler):
    """The batch sampler of a :class:`Mixer`: each step's sample ids, in the epoch plan's order.

    Give it to ``DataLoader(dataset, batch_sampler=mixer.sampler)`` (not ``batch_size`` or
    ``shuffle``: the plan orders the epoch). Each list holds the ids of every image the step's
    composites show, item by item and slot by slot, so a composite of two samples loads two
    images. ``len()`` is this epoch's number of steps once planned, else the most an epoch can take
    (an unmixed one).

    >>> loader = DataLoader(train_set, batch_sampler=mixer.sampler, num_workers=4)  # doctest: +SKIP
    """

    def __init__(self, mixer: "Mixer"):
        self.mixer = mixer

    def set_epoch(self, epoch: int):
        """Plan ``epoch`` (as :meth:`Mixer.set_epoch`)."""
        self.mixer.set_epoch(epoch)

    def __len__(self) -> int:
        m = self.mixer
        return m.layout.steps if m.layout is not None else m.max_steps

    def __iter__(self):
        m = self.mixer
        layout = m._layout_for_iteration()
        for j in range(m.consumed, layout.steps):
            yield layout.ids[j].tolist()


def torch_optimizer(obj) -> torch.optim.Optimizer | None:
    """``obj`` when it is a torch optimizer, the one it wraps (``obj.optimizer``: Lightning's,
    DeepSpeed's, ... wrappers), else None."""
    for o in (obj, getattr(obj, "optimizer", None)):
        if isinstance(o, torch.optim.Optimizer):
            return o
    return None


def _optimizer_name(optimizer) -> str | None:
    """What :meth:`MixOptions.resolved_step_scale` resolves ``auto`` for: the optimizer's name
    (``sgd`` for SGD), or ``None`` when none is given (``auto`` then scales nothing)."""
    if optimizer is None or isinstance(optimizer, str):
        return None if optimizer is None else optimizer.lower()
    inner = torch_optimizer(optimizer)
    if inner is not None:
        return "sgd" if isinstance(inner, torch.optim.SGD) else type(inner).__name__.lower()
    raise MixtrainError(f"Mixer(optimizer=...) takes a torch.optim.Optimizer or its name, got {type(optimizer).__name__}")


class Mixer:
    """MixTrain for a training loop that reads a map-style ``Dataset`` through a ``DataLoader``.

    ``model``: the adapted model (:func:`mixtrain.adapt`), which gives the feature grid and the
    image size (or give ``grid`` and ``image_size``); ``num_samples``: ``len(dataset)``;
    ``epochs``: the schedule's length (the last epochs train unmixed); ``batch_size``: images
    (passes) per step and process. ``method``: ``mixtrain`` (default), ``baseline``, ``cutmix``,
    ``mixup``, ``infobatch`` or ``mixprune``, with ``opts`` (:class:`~mixtrain.MixOptions`). ``seed`` fixes the
    plans and region offsets (the same on every process). ``rank``/``world``: this process under
    DDP (default: from ``torch.distributed`` when it is initialised). ``device``: where the loss
    memory lives (default: the model's device; it follows the logits). ``label_smoothing`` applies
    to the training loss, not to the losses the memory records. ``optimizer`` (a
    ``torch.optim.Optimizer`` or ``"sgd"``/``"adamw"``) is what ``step.lr_factor`` is for:
    ``MixOptions(step_scale="auto")``, the default, is the linear rule for SGD and 1 for any other
    optimizer, or without one.

    Use :attr:`sampler` as the DataLoader's ``batch_sampler``, call :meth:`set_epoch` at the start
    of each epoch, :meth:`compose` on each batch and :meth:`loss` on the model's logits. Checkpoint
    :meth:`state_dict` (on every process under DDP) with your model; :meth:`load_state_dict`
    continues exactly where it was saved, mid-epoch too.

    >>> mixer = Mixer(model, len(train_set), epochs=30, batch_size=256)  # doctest: +SKIP
    """

    def __init__(self, model=None, num_samples: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, *, method: str = "mixtrain", opts: MixOptions | None = None,
                 seed: int = 0, rank: int | None = None, world: int | None = None, device=None,
                 label_smoothing: float = 0.0, grid=None, image_size=None, optimizer=None):
        model = getattr(model, "module", model)  # a DDP-wrapped model
        if model is not None:
            if not hasattr(model, "grid") or not hasattr(model, "image_size"):
                raise MixtrainError(
                    f"Mixer needs the adapted model (mixtrain.adapt(model, image_size, channels)), "
                    f"got {type(model).__name__}"
                )
            grid = grid or model.grid
            image_size = image_size or model.image_size
            if device is None:
                p = next(model.parameters(), None)
                device = p.device if p is not None else "cpu"
        if grid is None or image_size is None:
            raise MixtrainError("Mixer needs the adapted model, or both grid= (the feature grid) and image_size=")
        for name, value in (("num_samples", num_samples), ("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise MixtrainError(f"Mixer needs {name}, a whole number >= 1, got {value!r}")
        if rank is None or world is None:
            import torch.distributed as dist

            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world = (dist.get_world_size() if on else 1) if world is None else world
        if not 0 <= rank < world:
            raise MixtrainError(f"Mixer: rank {rank} is not one of the {world} process(es)")
        if batch_size * world > num_samples:
            raise MixtrainError(
                f"batch size {batch_size} x {world} process(es) is larger than the training set ({num_samples} samples)"
            )
        self.grid = tuple(int(g) for g in grid)
        self.image_size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(s) for s in image_size)
        self.num_samples, self.epochs, self.batch_size = int(num_samples), int(epochs), int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.label_smoothing = float(label_smoothing)
        opts = opts or MixOptions()
        opts.check()  # a baseline's strategy never reads them, yet lr_factor does
        self.strategy: Strategy = create_strategy(method, self.num_samples, self.grid, self.epochs, device or "cpu", opts)
        if self.strategy.scatter:  # its pixels and positions are the trainer's (EpochBatches, SpatialModel)
            raise OptionError("{scatter} (scattered cells for ViTs) runs in the trainer (mixtrain train, mixtrain "
                              "bench, mixtrain.train); Mixer composes rectangular regions only")
        self.loss_per = opts.loss_per
        self.step_scale = opts.resolved_step_scale(_optimizer_name(optimizer))
        # losses averaged over passes (soft labels, or loss_per="passes") are weighed by passes under DDP
        self.per_pass = self.strategy.averages_over_passes(self.loss_per)
        self.sampler = MixSampler(self)
        self.max_steps = -(-self.num_samples // (self.batch_size * self.world))
        self.epoch = 0  # the epoch being trained (or next to be)
        self.consumed = 0  # steps of it composed so far
        self.layout: _EpochLayout | None = None
        self._recorded = False  # losses recorded since the processes' memories were last merged

    # -- epochs ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int):
        """Plan ``epoch`` (0-based) from the loss memory, for the sampler's next pass over the data.

        Call it on every process at the start of each epoch (under DDP it first merges the
        processes' loss memories, a collective). Setting the epoch that is under way (a resumed
        one) keeps its plan and position; without a call, each new pass of the loader after a
        finished epoch plans the next one.
        """
        epoch = int(epoch)
        if epoch == self.epoch and self.layout is not None and self.consumed < self.layout.steps:
            return  # this epoch is under way (or resumed): keep its plan and position
        self.epoch, self.consumed, self.layout = epoch, 0, None
        self._plan()

    def finish_epoch(self):
        """End the epoch under way, even if not all of its steps were composed (a loop that stops an
        epoch early): the sampler's next pass plans the next epoch. Plans nothing itself."""
        self.epoch, self.consumed, self.layout = self.epoch + 1, 0, None

    @property
    def steps(self) -> int:
        """Steps of the planned epoch on this process (``len(loader)``)."""
        return len(self.sampler)

    @property
    def plan(self) -> EpochPlan | None:
        """The planned epoch (all processes' items, before padding), or ``None`` before planning."""
        return None if self.layout is None else self.layout.plan

    def _rngs(self, epoch: int):
        plan_rng = np.random.default_rng([self.seed, epoch, 1])  # the same on every process
        pad_rng = np.random.default_rng([self.seed, epoch, 2])
        draw_seed = int(np.random.default_rng([self.seed, epoch, self.rank, 3]).integers(2**62))  # this process's
        return plan_rng, pad_rng, draw_seed

    def _plan(self, plan: EpochPlan | None = None):
        if not 0 <= self.epoch < self.epochs:
            raise MixtrainError(
                f"epoch {self.epoch} is outside the schedule of {self.epochs} epochs (0 to {self.epochs - 1}); "
                "give Mixer(epochs=...) the number of epochs you train"
            )
        plan_rng, pad_rng, draw_seed = self._rngs(self.epoch)
        if plan is None:
            self._merge()  # every process plans from the same loss memory
            plan = self.strategy.plan_epoch(self.epoch, plan_rng)
        self.layout = _EpochLayout(plan, self.batch_size, self.grid, self.rank, self.world, pad_rng, draw_seed)

    def _merge(self):
        """Under DDP, merge the processes' loss-memory writes since the last merge (a collective;
        every process records the same number of steps, so all of them merge or none)."""
        if self.world > 1 and self._recorded:
            self.strategy.sync()
        self._recorded = False

    def _layout_for_iteration(self) -> _EpochLayout:
        """The epoch a new pass of the sampler serves: the current one, or the next once it is done."""
        if self.layout is None:
            self._plan()
        elif self.consumed >= self.layout.steps:
            self.epoch, self.consumed, self.layout = self.epoch + 1, 0, None
            self._plan()
        return self.layout

    # -- steps ----------------------------------------------------------------------------------

    def compose(self, images: torch.Tensor, labels) -> MixStep:
        """The next step's composites from the loader's batch.

        ``images [M, C, H, W]``: the decoded, augmented float constituents, in the order the
        sampler gave their ids (``H, W``: the model's image size); ``labels [M]``: their classes.
        Composites are built where ``images`` are (move them to the GPU first to compose there).
        """
        layout, j = self._checked_step(images)
        dev = images.device
        labels = torch.as_tensor(labels, device=dev)
        rows = layout.rows(j)
        mine = layout.mine
        src = torch.from_numpy(layout.src[j]).to(dev, non_blocking=True)
        index = torch.from_numpy(mine.index[rows]).to(dev, non_blocking=True)
        valid = torch.from_numpy(mine.valid[rows]).to(dev, non_blocking=True)
        share = torch.from_numpy(mine.share[rows]).to(dev, non_blocking=True)
        weight = torch.from_numpy(mine.weight[rows]).to(dev, non_blocking=True)
        s = self.strategy
        box = torch.from_numpy(mine.box[rows]).to(dev, non_blocking=True)
        geo = geometry(box, torch.from_numpy(mine.resize[rows]).to(dev, non_blocking=True), share,
                       layout.rand(j).to(dev, non_blocking=True), self.grid, self.image_size, _PLACE_ONLY, s.blend)
        if layout.whole[j]:
            x = images  # one whole image per item, in item order: nothing to resample
        else:
            x = compose_from(images, src, geo, _AsIs(), single=src.shape[1] == 1 and not s.blend)
        self.consumed = j + 1
        return MixStep(x, geo.pool if s.separate else None, labels[src], index, valid, share, weight,
                       int(layout.local_samples[j]), int(layout.global_samples[j]), layout.loss_scale(j, self.per_pass),
                       self.epoch, j,
                       float(s.lr_factors(layout.global_samples[j], layout.global_passes[j], self.step_scale)))

    def _checked_step(self, images) -> tuple[_EpochLayout, int]:
        """(the epoch's layout, the step to compose), once ``images`` are known to be that step's
        batch: one float tensor of its count of images at the model's size."""
        layout = self.layout
        if layout is None:
            raise MixtrainError("Mixer.compose before any epoch was planned: call mixer.set_epoch(epoch) first "
                                "(or iterate a DataLoader built with batch_sampler=mixer.sampler)")
        j = self.consumed
        if j >= layout.steps:
            raise MixtrainError(
                f"all {layout.steps} steps of epoch {self.epoch} were composed already; call mixer.set_epoch("
                f"{self.epoch + 1}) and iterate the loader again for the next epoch"
            )
        if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
            what = f"{images.dtype} tensor of shape {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise MixtrainError(
                f"Mixer.compose takes the batch's images as one float tensor [M, C, H, W] (your transforms' output, "
                f"e.g. ending in ToDtype(float32, scale=True) and Normalize), got a {what}"
            )
        want = int(layout.counts[j])
        if images.shape[0] != want:
            raise MixtrainError(
                f"step {j + 1} of epoch {self.epoch} shows {want} images but the batch holds {images.shape[0]}: build "
                "the DataLoader with batch_sampler=mixer.sampler (no batch_size, shuffle or sampler), keep its order, "
                "and call compose once per batch"
            )
        h, w = images.shape[-2:]
        if (h, w) != self.image_size:
            raise MixtrainError(
                f"the batch's images are {h}x{w} but the model takes {self.image_size[0]}x{self.image_size[1]} "
                "(its feature grid was measured there): make the transforms produce that size, or adapt the model "
                "to this one"
            )
        return layout, j


    def loss(self, logits: torch.Tensor, step: MixStep) -> torch.Tensor:
        """The loss to back-propagate for ``step``, from the model's ``logits`` (``[B, K, classes]``
        for the separated loss, ``[B, classes]`` for soft-label methods), weighted by ``step.scale``
        under DDP; the per-sample losses go into the loss memory (no extra pass, no host sync)."""
        if not isinstance(step, MixStep):
            raise MixtrainError(f"Mixer.loss needs the MixStep that compose() returned, got {type(step).__name__}")
        s = self.strategy
        if s.separate and logits.ndim == 2:
            logits = logits[:, None]
        memory = getattr(s, "memory", None)
        if memory is not None and memory.loss.device != logits.device:
            memory.to(logits.device)
        loss, ce = s.loss(step, logits, step.targets, self.label_smoothing, self.loss_per)
        plain = ce is not None and self.label_smoothing == 0
        s.record(step, logits, step.targets, ce if plain else None)
        self._recorded = True
        return loss if step.scale == 1.0 else loss * step.scale

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Loss memory, epoch, position in it and (for an epoch planned and not finished) its
        plan: tensors and plain Python only. Under DDP call it on every process: it merges their
        loss memories first."""
        self._merge()
        # an epoch planned and not finished keeps its plan, even before its first step: the resumed
        # run then serves exactly the plan it saved
        mid = self.layout is not None and self.consumed < self.layout.steps
        plan = None
        if mid:
            plan = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.layout.plan.arrays().items()}
        done = self.layout is not None and self.consumed >= self.layout.steps
        return {
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch + 1 if done else self.epoch,
            "step": self.consumed if mid else 0,
            "plan": plan,
            "world": self.world,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict):
        """Continue from :meth:`state_dict`: the next pass of the sampler serves the saved epoch
        from the saved step, with the saved plan (same processes and batch size)."""
        try:
            for key, mine in (("num_samples", self.num_samples), ("batch_size", self.batch_size), ("world", self.world)):
                if state[key] != mine:
                    raise MixtrainError(f"the saved mixer state has {key} {state[key]}, this one {mine}")
            self.strategy.load_state_dict(state["strategy"])
            self.epoch, self.consumed, self.layout = int(state["epoch"]), 0, None
            if state.get("plan") is not None:
                plan = EpochPlan(**{k: v.numpy() for k, v in state["plan"].items()})
                self._plan(plan)
                self.consumed = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise MixtrainError(f"cannot load the mixer state: {type(e).__name__}: {e}") from e
