"""Training strategies: how a method changes what each step trains on and how its loss is computed.

The whole interface is here. A strategy

* plans each epoch (:meth:`Strategy.plan_epoch`): a table of items, each one pass carrying one or
  more samples in regions (see :mod:`mixtrain.plan`);
* says how the model pools and how the loss is formed: ``separate`` strategies pool each
  constituent's region and give it its own prediction and hard-label loss; the others pool the
  whole composite and train it against a soft label (naive CutMix / MixUp);
* observes each step's per-sample losses (:meth:`Strategy.observe`) -- the loss memory.

The baseline is the same loop with a plan that mixes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch

from . import plan as P
from .errors import MixtrainError, OptionError, notice
from .loss import sample_stats, separated_loss, soft_label_loss
from .memory import LossMemory
from .options import MixOptions  # declared with every other option (re-exported here)
from .schedule import step_scale_factors


class Strategy:
    """Base class; the baseline. Subclasses override :meth:`plan_epoch` and the flags."""

    name = "baseline"
    slots = 1  # K: constituents an item can carry
    separate = True  # per-region pooling + per-constituent hard-label loss
    blend = False  # pixels blended over the whole image (MixUp) instead of exclusive regions
    uses_memory = False  # observe() wants per-sample losses (computed only then)
    prunes = False  # plans may leave samples out of an epoch (each epoch then carries fewer than N)
    scatter = False  # constituents on scattered cells of their whole image (MixOptions.scatter; ViTs)
    uses_mix_options = False  # reads MixOptions (a bench variant such as mixtrain(confidence=0.4) needs it)

    def __init__(self, num_samples: int, grid: tuple[int, int], num_epochs: int, device="cpu"):
        self.num_samples = int(num_samples)
        self.grid = tuple(grid)
        self.num_epochs = int(num_epochs)
        self.device = device

    def mixing(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) mixes samples (never, for the baseline)."""
        return False

    def plan_epoch(self, epoch: int, rng: np.random.Generator) -> P.EpochPlan:
        """The plan of ``epoch`` (0-based): which samples each pass carries, in which regions, in
        what order. A pure function of the strategy's state (its loss memory) and ``rng``: give
        every process the same seeded generator and they plan the same epoch.

        >>> plan = method.plan_epoch(epoch, np.random.default_rng([seed, epoch]))  # doctest: +SKIP
        """
        ids = rng.permutation(self.num_samples)
        return P.singles(ids, self.slots, self.grid)

    def forward(self, model, x, batch):
        """The model's predictions for the step: one per constituent, ``[B, K, classes]``, from
        each region's pooled features (``model(x, pool_masks)``; a single slot needs no masks)."""
        if self.slots == 1:
            logits = model(x, None)
        elif batch.geo.scattered:  # each token keeps its place in its whole image
            logits = model(x, batch.pool_masks(), own_positions=True)
        else:
            logits = model(x, batch.pool_masks())
        return logits[:, None] if logits.ndim == 2 else logits

    def averages_over_passes(self, loss_per: str) -> bool:
        """Whether the step's loss is a mean over passes (else over samples): under DDP each
        rank's loss is rescaled by its share of the same count."""
        return loss_per == "passes"

    def lr_factors(self, samples_per_step, passes_per_step, step_scale: str) -> np.ndarray:
        """Each step's learning-rate factor under ``step_scale`` (:func:`mixtrain.schedule.step_scale_factors`):
        by the samples each pass carries, for methods whose constituents are samples of their own;
        1 for soft-label methods (CutMix, MixUp), which train one example per pass."""
        return step_scale_factors(samples_per_step, passes_per_step, step_scale if self.separate else "none")

    def epoch_stats(self, plan: P.EpochPlan) -> dict:
        """Numbers this method adds to an epoch's log row (the trainer logs every method's alike):
        for a method whose plans leave samples out (``prunes``), the fraction left out."""
        return {"pruned_fraction": 1.0 - plan.samples / self.num_samples} if self.prunes else {}

    def step_state(self) -> list:
        """Device tensors the step updates besides the model and optimizer (the loss memory), so
        a CUDA-graph capture can undo its warm-up steps on them."""
        memory = getattr(self, "memory", None)
        return [] if memory is None else memory.tensors()

    def loss(self, batch, logits, targets, label_smoothing: float = 0.0, per: str = "samples"):
        """The step's loss from the model's ``logits`` (``[B, K, C]`` for separating strategies,
        ``[B, C]`` otherwise) and the slots' ``targets [B, K]``: ``(loss, per-slot cross-entropy
        or None)``. The default: the separated loss, each carried sample weighted by the plan's
        loss weight. Runs inside the captured step: no host synchronisation."""
        return separated_loss(logits, targets, batch.valid, label_smoothing, per, batch.weight)

    def observe(self, index, valid, loss, correct):
        """Per-step hook: flat per-slot ``loss``/``correct`` of the samples just trained on."""

    def record(self, batch, logits, targets, nll=None):
        """Feed a step's predictions ``[B, K, classes]`` and labels ``[B, K]`` to :meth:`observe`
        (per-sample loss and correctness; no extra forward pass, no host sync). The trainer's step
        and one's own loop both call this; it does nothing for strategies without a loss memory.
        ``nll``: the per-slot cross-entropy ``[B, K]`` if already computed without label smoothing
        (``separated_loss``'s second result then), so it is not computed twice."""
        if self.uses_memory:
            if nll is None:
                nll, correct = sample_stats(logits.detach(), targets)
            else:
                nll, correct = nll.detach(), logits.detach().argmax(-1) == targets
            flat = (batch.index.reshape(-1), batch.valid.reshape(-1), nll.reshape(-1), correct.reshape(-1))
            memory = getattr(self, "memory", None)
            if getattr(memory, "tier", None) is not None:  # the tier of each slot's pass, from its sample count
                count = batch.valid.sum(1, keepdim=True).expand_as(batch.valid)
                self.observe(*flat, tier=((count >= 2).to(torch.int8) + (count >= 4).to(torch.int8)).reshape(-1))
            else:
                self.observe(*flat)

    def end_epoch(self, distributed: bool = False):
        """Per-epoch hook after the last step. ``distributed``: merge the ranks' observations
        (:meth:`sync`), so the next plan is the same on every rank. Call it on every rank."""
        if distributed:
            self.sync()

    def sync(self):
        """Merge what the ranks observed since the last merge (a collective: every rank calls it)."""

    def options(self) -> dict:
        """The strategy's options as a plain dict (recorded in ``metrics.json``)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must keep to continue exactly (the loss memory, where there is one):
        tensors and plain Python only. Save it with the model's.

        >>> torch.save({"model": model.state_dict(), "method": method.state_dict()}, path)  # doctest: +SKIP
        """
        return {}

    def load_state_dict(self, state: dict):
        """Restore what :meth:`state_dict` returned (before planning the next epoch)."""


Baseline = Strategy


class _Mixing(Strategy):
    """Shared schedule of the mixing strategies: the first and the final epochs unmixed."""

    slots = 2
    uses_mix_options = True

    def __init__(self, num_samples, grid, num_epochs, device="cpu", opts: MixOptions | None = None):
        super().__init__(num_samples, grid, num_epochs, device)
        self.opts = opts or MixOptions()
        self.opts.check()
        P.check_grid_can_mix(self.grid)
        if self.opts.scatter and not self.separate:
            raise OptionError("{scatter} needs a method with a loss per constituent (mixtrain, mixprune); "
                              f"{self.name} trains the whole composite against a soft label")
        self.scatter = bool(self.opts.scatter)
        if not any(self.mixing(e) for e in range(self.num_epochs)):  # nothing silent: say so now
            o, n = self.opts, self.num_epochs
            notice(f"{self.name} will never mix in this run: of its {n} epoch(s), the first {o.first_unmixed_epochs} "
                   f"and the last {o.final_epochs(n)} are unmixed (first_unmixed_epochs, final_unmixed_epochs; "
                   f"--first-unmixed-epochs, --final-unmixed-epochs); train at least "
                   f"{o.first_unmixed_epochs + o.final_epochs(n) + 1} epochs or lower those", stacklevel=3)

    def mixing(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is one that mixes: after the first unmixed epochs, before the final ones."""
        o = self.opts
        return o.first_unmixed_epochs <= epoch < self.num_epochs - o.final_epochs(self.num_epochs)

    def options(self) -> dict:
        return asdict(self.opts)

    def _random_pairs(self, ids, rng):
        ids = rng.permutation(ids)
        half = len(ids) // 2
        return ids[:half], ids[half : 2 * half], ids[2 * half :]


class _SoftLabel(_Mixing):
    """Naive mixing: one prediction per composite against the share-weighted soft label."""

    separate = False

    def forward(self, model, x, batch):
        return model(x)  # one prediction per composite, from the model's own global pooling

    def averages_over_passes(self, loss_per: str) -> bool:
        return True  # the soft-label loss is a mean over composites

    def loss(self, batch, logits, targets, label_smoothing: float = 0.0, per: str = "samples"):
        return soft_label_loss(logits, targets, batch.share, batch.valid, label_smoothing), None


class CutMix(_SoftLabel):
    """Naive mixing, CutMix-style: pair every sample, pool globally, area-weighted soft label."""

    name = "cutmix"

    def plan_epoch(self, epoch, rng):
        if not self.mixing(epoch):
            return super().plan_epoch(epoch, rng)
        a, b, rest = self._random_pairs(np.arange(self.num_samples), rng)
        axis = rng.integers(0, 2, len(a))
        share = rng.uniform(self.opts.min_share, 1 - self.opts.min_share, len(a))
        items = [P.pairs(a, b, share, axis, self.slots, self.grid, self.opts.min_share)]
        items.append(P.singles(rest, self.slots, self.grid))
        plan = P.EpochPlan.concat(items)
        return plan.take(rng.permutation(plan.items))


class MixUp(_SoftLabel):
    """Naive mixing, MixUp-style: pair every sample, blend the images, soft label."""

    name = "mixup"
    blend = True

    def plan_epoch(self, epoch, rng):
        if not self.mixing(epoch):
            return super().plan_epoch(epoch, rng)
        a, b, rest = self._random_pairs(np.arange(self.num_samples), rng)
        lam = rng.uniform(0.0, 1.0, len(a)).astype(np.float32)
        plan = P.EpochPlan.concat([P.blends(a, b, lam, self.slots, self.grid), P.singles(rest, self.slots, self.grid)])
        return plan.take(rng.permutation(plan.items))


def choose_mixed(loss: np.ndarray, correct: np.ndarray, opts: MixOptions) -> np.ndarray:
    """Which samples are well learned enough to be mixed this epoch (bool per sample).

    Samples never seen (NaN loss) are never mixed, except under rule ``all``.
    """
    seen = ~np.isnan(loss)
    if opts.rule == "all":
        return np.ones_like(seen)
    if opts.rule == "auto":
        # classified right, with the true class at probability >= confidence: exp(-loss) = p(true)
        return seen & correct & (loss <= -math.log(opts.confidence))
    if opts.rule == "threshold":
        return seen & (loss < opts.threshold)
    # fraction: the lowest-loss part of the seen samples
    order = np.argsort(np.where(seen, loss, np.inf), kind="stable")
    m = min(int(round(opts.fraction * len(loss))), int(seen.sum()))
    out = np.zeros(len(loss), bool)
    out[order[:m]] = True
    return out


def adaptive_share(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Area share of a: l_a / (l_a + l_b) -- the harder sample gets more; 1/2 when unknown."""
    total = la + lb
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, la / total, 0.5)
    return np.where(np.isnan(share), 0.5, share)


def interfered(loss: np.ndarray, alone_loss: np.ndarray, tier: np.ndarray, margin: float) -> np.ndarray:
    """Which samples mixing interfered with (bool per sample): last trained mixed (``tier`` >= 1:
    in a pair or a quad), with a loss there (``loss``) above their latest loss alone
    (``alone_loss``) by more than ``margin`` nats. A loss not known (NaN) never counts: a sample
    never seen alone has nothing to compare with (a comparison with NaN is false)."""
    return (tier >= 1) & (loss - alone_loss > margin)


class MixTrain(_Mixing):
    """The MixTrain method: separated loss, adaptive ratio, loss-based choice of what is mixed.

    Usable in any training loop: call :meth:`plan_epoch` at the start of each epoch and
    :meth:`record` after each step with the step's predictions (it feeds :meth:`observe`, the
    loss memory; see the README).

    With ``interference_margin >= 0`` it also watches for interference (:func:`interfered`): a
    sample whose last mixed pass lost more than its last pass alone trains one tier lower the next
    epoch. The loss memory then also keeps each sample's latest tier and loss alone, written in
    the step with the loss, so planning stays a function of the memory.
    """

    name = "mixtrain"
    uses_memory = True
    interfered_fraction = 0.0  # of the samples, those the watch moved down a tier in the latest plan

    def __init__(self, num_samples, grid, num_epochs, device="cpu", opts: MixOptions | None = None):
        super().__init__(num_samples, grid, num_epochs, device, opts)
        if self.opts.quad_confidence > 0:
            P.check_grid_can_mix(self.grid, quads_too=True)
            self.slots = 4
        self.memory = LossMemory(num_samples, device, tiers=self.opts.interference_margin >= 0)

    def plan_epoch(self, epoch, rng):
        n = self.num_samples
        self.interfered_fraction = 0.0
        if not self.mixing(epoch):
            return super().plan_epoch(epoch, rng)
        o = self.opts
        loss, correct = self.memory.snapshot()
        if epoch > 0 and o.rule != "all" and np.isnan(loss).all():  # never written: nothing would ever mix
            notice(f"plan_epoch({epoch}): this epoch should mix, but the loss memory is empty: no step's losses were recorded, so it "
                   "trains unmixed. Call method.record(batch, logits, targets) after each step (Mixer.loss does it), "
                   "or load the method's state_dict when resuming", stacklevel=2)
        mixable = choose_mixed(loss, correct, o)
        quadable = mixable & correct & (loss <= -math.log(o.quad_confidence)) if o.quad_confidence > 0 else None
        if self.watching:
            mixable, quadable = self._step_down(loss, mixable, quadable)
        items = []
        if quadable is not None:
            q = rng.permutation(np.flatnonzero(quadable))
            nq = len(q) // 4
            if nq:
                items.append(P.quads(q[: 4 * nq].reshape(nq, 4), self.slots, self.grid, o.quad_resize))
            mixable = mixable.copy()
            mixable[q[: 4 * nq]] = False
        items.append(self.pair_items(np.flatnonzero(mixable), loss, rng))
        return self.with_singles(items, np.ones(n, bool), rng)

    @property
    def watching(self) -> bool:
        """Whether the interference watch is on (its loss memory keeps tiers)."""
        return self.memory.tier is not None

    def _step_down(self, loss, mixable, quadable):
        """``mixable`` and ``quadable`` less the samples mixing interfered with (:func:`interfered`):
        out of quads for those last in one, not mixed for those last in a pair. Counts those it
        moves (``interfered_fraction``)."""
        tier, alone_loss = self.memory.tiers()
        lower = interfered(loss, alone_loss, tier, self.opts.interference_margin)
        from_pair, from_quad = lower & (tier == 1), lower & (tier == 2)
        moved = from_pair & mixable
        mixable = mixable & ~from_pair
        if quadable is not None:
            moved |= from_quad & quadable
            quadable = quadable & ~from_pair & ~from_quad
        self.interfered_fraction = float(moved.sum()) / self.num_samples
        return mixable, quadable

    def pair_items(self, pool: np.ndarray, loss: np.ndarray, rng) -> P.EpochPlan:
        """The pairs of the samples in ``pool`` (by the pairing rule; an odd one out stays unpaired),
        each pair's area split by the ratio rule."""
        o = self.opts
        if o.pairing == "easy-hard":
            order = pool[np.argsort(np.nan_to_num(loss[pool], nan=0.0), kind="stable")]
            half = len(order) // 2
            a, b = order[:half], order[len(order) - half :][::-1]
        else:
            a, b, _ = self._random_pairs(pool, rng)
        share = adaptive_share(loss[a], loss[b]) if o.ratio == "adaptive" else np.full(len(a), 0.5)
        axis = rng.integers(0, 2, len(a))
        return P.pairs(a, b, share, axis, self.slots, self.grid, o.min_share, o.pair_resize)

    def with_singles(self, items: list, trained: np.ndarray, rng) -> P.EpochPlan:
        """The epoch's plan: ``items`` plus every sample marked in ``trained`` that no item holds,
        alone; items in a random order."""
        alone = trained.copy()
        for it in items:
            alone[it.index[it.valid]] = False
        items = items + [P.singles(np.flatnonzero(alone), self.slots, self.grid)]
        plan = P.EpochPlan.concat(items)
        return plan.take(rng.permutation(plan.items))

    def observe(self, index, valid, loss, correct, tier=None):
        """Record a step's flat per-slot losses; ``tier``: each slot's pass tier (int8: 0 alone,
        1 pair, 2 quad), kept when the interference watch is on (None: passes alone)."""
        self.memory.update(index, valid, loss, correct, tier)

    def sync(self):
        self.memory.all_reduce()

    def epoch_stats(self, plan):
        stats = super().epoch_stats(plan)
        if self.watching:  # how much the interference watch acted in planning this epoch
            stats["interfered_fraction"] = self.interfered_fraction
        return stats

    def state_dict(self):
        state = {"memory": self.memory.state_dict()}
        if self.watching:  # a run resumed mid-epoch reuses its plan: its log row needs the fraction
            state["interfered_fraction"] = float(self.interfered_fraction)
        return state

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
        if self.watching:
            self.interfered_fraction = float(state.get("interfered_fraction", 0.0))


from .infobatch import InfoBatch  # noqa: E402  (a strategy module of its own; it builds on the classes above)
from .mixprune import MixPrune  # noqa: E402

STRATEGIES = {"baseline": Baseline, "mixtrain": MixTrain, "cutmix": CutMix, "mixup": MixUp, "infobatch": InfoBatch,
              "mixprune": MixPrune}


def create_strategy(method: str, num_samples, grid, num_epochs, device="cpu", opts: MixOptions | None = None) -> Strategy:
    """The strategy named ``method`` (baseline, mixtrain, cutmix, mixup, infobatch, mixprune) for
    ``num_samples`` training samples, a model with feature ``grid``, a schedule of ``num_epochs``.

    >>> method = create_strategy("mixtrain", len(train_set), model.grid, 30, "cuda")  # doctest: +SKIP
    """
    if method not in STRATEGIES:
        raise MixtrainError(f"unknown method {method!r}; choose from {', '.join(STRATEGIES)}")
    cls = STRATEGIES[method]
    if cls is Baseline:
        return Baseline(num_samples, grid, num_epochs, device)
    return cls(num_samples, grid, num_epochs, device, opts)
