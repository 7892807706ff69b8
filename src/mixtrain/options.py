"""Every option of a training run, declared once.

:class:`TrainConfig` (a run) and :class:`MixOptions` (the mixing strategies', under ``mix``) are
dataclasses whose fields carry an :class:`Option` each: the help text, the ``--help`` group, the
CLI flag where it is not ``--field-name``, the values it may take, whether a resumed run may change
it and whether ``mixtrain bench`` takes it. Generated from these declarations:

* the flags of ``mixtrain train`` and the shared ones of ``mixtrain bench`` (:func:`add_train_options`),
  and the way back from parsed flags to a config (:func:`config_from_args`);
* :data:`RESUMABLE_CHANGES` (what a resumed run may change) and :data:`NOT_BENCH_SETUP`;
* the table of every option, ``docs/options.md`` (:func:`options_markdown`; a test keeps it current).

Adding an option is one field here (and its use). The library names options by field
(``batch_size must be at least 1``, an :class:`~mixtrain.errors.OptionError`); the command line
names them by flag (:func:`flag_for`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

from .errors import MixtrainError, OptionError

METHODS = "baseline, mixtrain, cutmix, mixup, infobatch, mixprune"
MIN_IMAGE_SIZE = 8  # smallest --image-size for resampled data (a random-resized crop below this is noise)
IMAGENET_STYLE_FROM = 128  # --model auto: ImageNet-style data trained at >= this many pixels gets the ImageNet stem

# the sections of --help, in order
RUN, OPTIMISATION, DATA, MIXING, LOGGING = (
    "run", "optimisation", "data handling", "mixing and pruning (mixtrain, cutmix, mixup, infobatch, mixprune)",
    "logging and checkpoints",
)
GROUPS = (RUN, OPTIMISATION, DATA, MIXING, LOGGING)


@dataclass(frozen=True)
class Option:
    """What a config field is to the user: the metadata ``option(...)`` attaches to it."""

    help: str | Callable[[], str]  # for --help and docs/options.md (a function: text made from a registry)
    group: str  # its section of --help, one of GROUPS
    flag: str = ""  # the CLI flag ("": --field-name)
    choices: tuple = ()  # the values it may take (checked by check(); (): any, or checked there by hand)
    resumable: bool = False  # a resumed run may change it: where and how the run executes, not what it computes
    speed: bool = False  # resumable, yet it changes how fast a run trains: every run of a bench shares it
    bench: bool = True  # mixtrain bench takes the same flag
    bench_list: str = ""  # mixtrain bench's own flag for a list of its values, one run each ("--methods")
    switch: bool = False  # a flag without a value (store_true); other booleans take on|off
    name: str = ""  # filled in: its key in config.json (mixing options: "mix.rule")
    default: Any = None  # filled in: the field's default

    @property
    def dest(self) -> str:
        """The attribute of parsed arguments that holds it."""
        return self.flag[2:].replace("-", "_")

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help


def option(default=MISSING, help: str | Callable[[], str] = "", *, group: str, default_factory=MISSING, **meta):
    """A config field with its :class:`Option` metadata (``meta``: the other fields of :class:`Option`)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"option": Option(help, group, **meta)})


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {s!r}")


def _words(values) -> str:
    """``a, b or c``."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _check_choices(obj):
    """Raise an :class:`OptionError` for the first field of ``obj`` outside its declared choices."""
    for f in fields(obj):
        opt = f.metadata.get("option")
        value = getattr(obj, f.name)
        if opt is not None and opt.choices and value not in opt.choices:
            raise OptionError("{" + f.name + "} must be {allowed}, got {got!r}", allowed=_words(opt.choices), got=value)


def _finite_at_least_0(obj, *names, note=""):
    for name in names:
        value = getattr(obj, name)
        if not math.isfinite(value) or value < 0:  # also refuses NaN
            raise OptionError("{" + name + "} must be a finite number >= 0{note}, got {got}", note=note, got=value)


def _data_help() -> str:
    from .data import data_help

    return f"dataset: {data_help()}"


def _model_help() -> str:
    from .models import MODEL_HELP

    return f"model: auto (digitnet for digits, resnet18_224 for folders at >= 128 px, resnet18 otherwise); {MODEL_HELP}"


# ----------------------------------------------------------------------------------------------
# the declarations


@dataclass
class MixOptions:
    """Options of the mixing strategies (every default is visible in ``--help`` and the config)."""

    first_unmixed_epochs: int = option(1, "first epochs trained unmixed (the loss memory fills)", group=MIXING)
    final_unmixed_epochs: int = option(
        -1, "last epochs trained unmixed (-1: one per 15 epochs of the schedule, at least one: 1 of 10, 2 of 30)",
        group=MIXING)
    rule: str = option(
        "auto", "which samples are mixed: auto (classified right with p(true) >= --confidence), threshold (loss < "
        "--mix-threshold), fraction (lowest-loss --mix-fraction), all",
        group=MIXING, flag="--mix-rule", choices=("auto", "threshold", "fraction", "all"))
    confidence: float = option(0.5, "auto rule: true-class probability a sample needs in its last pass to be mixed",
                               group=MIXING)
    threshold: float = option(0.3, "threshold rule: mix samples whose last loss is below this", group=MIXING,
                              flag="--mix-threshold")
    fraction: float = option(0.5, "fraction rule: mix this fraction of the lowest-loss samples", group=MIXING,
                             flag="--mix-fraction")
    quad_confidence: float = option(0.8, "> 0: samples with p(true) >= this are mixed four to an image (2x2 grid)",
                                    group=MIXING)
    interference_margin: float = option(
        -1.0, "mixtrain, >= 0: watch for interference: a sample whose loss in its last mixed pass exceeded its last "
        "loss alone by more than this many nats trains one tier lower the next epoch (from a quad: at most in a "
        "pair; from a pair: alone); -1: off", group=MIXING)
    ratio: str = option(
        "adaptive", "adaptive (area share from previous losses: the harder sample gets more) or fixed (1/2)",
        group=MIXING, flag="--mix-ratio", choices=("adaptive", "fixed"))
    min_share: float = option(0.25, "each constituent's area share is clipped to [min, 1-min]", group=MIXING)
    pairing: str = option("random", "random, or easy-hard (easiest mixable with hardest mixable)", group=MIXING,
                          choices=("random", "easy-hard"))
    pair_resize: bool = option(False, "downscale pair constituents into their region instead of cropping", group=MIXING)
    quad_resize: bool = option(True, "downscale quad constituents into their quadrant instead of cropping", group=MIXING)
    scatter: bool = option(
        False, "ViTs separated by attention: each constituent keeps as many patches as its region would have, but "
        "scattered at random over its whole image and at their own positions (packed patch dropout), instead of "
        "a region of the composite; separating methods only", group=MIXING)
    loss_per: str = option(
        "samples", "batch loss = sum of per-sample losses / samples carried (samples) or / passes (passes: larger "
        "steps when more is mixed)", group=MIXING, choices=("samples", "passes"))
    step_scale: str = option(
        "auto", "each step's learning rate times (samples it carries / its passes)^k, so a step of composites moves as "
        "far as the samples it holds: none (k=0), sqrt (k=1/2, the square-root rule, for Adam), linear (k=1, the "
        "linear scaling rule, for SGD; unlike --loss-per passes the clip still sees the per-sample mean gradient), "
        "auto (linear with --optimizer sgd, measured on four CNNs; none with adamw, where sqrt measured no "
        "better on ViT-tiny, and with --loss-per passes)", group=MIXING, choices=("auto", "none", "sqrt", "linear"))
    prune_ratio: float = option(
        0.5, "infobatch: fraction of the samples with below-mean loss left out of each pruned epoch; mixprune: "
        "fraction of the quad tier (p(true) >= --quad-confidence) left out of each mixed epoch (the kept ones weigh "
        "1/(1-r))", group=MIXING)
    prune_until: float = option(
        0.875, "infobatch: prune in the epochs before this fraction of the schedule, then train on all the data",
        group=MIXING)

    def check(self):
        """Raise :class:`~mixtrain.errors.OptionError` naming the first option out of its range."""
        _check_choices(self)
        if not 0.0 < self.min_share <= 0.5:  # comparisons written so that NaN fails them too
            raise OptionError("{min_share} must be in (0, 0.5], got {got}", got=self.min_share)
        if not 0.0 <= self.fraction <= 1.0:
            raise OptionError("{fraction} must be in [0, 1], got {got}", got=self.fraction)
        if not 0.0 < self.confidence <= 1.0:
            raise OptionError("{confidence} is a probability of the true class and must be in (0, 1], got {got}",
                              got=self.confidence)
        if not 0.0 <= self.quad_confidence <= 1.0:
            raise OptionError("{quad_confidence} is a probability of the true class and must be in [0, 1] (0: pairs "
                              "only, no quads), got {got}", got=self.quad_confidence)
        if not (self.interference_margin == -1 or 0.0 <= self.interference_margin < math.inf):  # NaN fails too
            raise OptionError("{interference_margin} is a loss margin in nats and must be a finite number >= 0, or -1 "
                              "(off), got {got}", got=self.interference_margin)
        if not 0.0 <= self.threshold < math.inf:
            raise OptionError("{threshold} is a loss and must be a finite number >= 0, got {got}", got=self.threshold)
        if not 0.0 <= self.prune_ratio < 1.0:
            raise OptionError("{prune_ratio} is the fraction of easy samples left out and must be in [0, 1), got {got}",
                              got=self.prune_ratio)
        if not 0.0 <= self.prune_until <= 1.0:
            raise OptionError("{prune_until} is a fraction of the schedule and must be in [0, 1], got {got}",
                              got=self.prune_until)
        if self.first_unmixed_epochs < 0:
            raise OptionError("{first_unmixed_epochs} must be >= 0, got {got}", got=self.first_unmixed_epochs)
        if self.step_scale in ("sqrt", "linear") and self.loss_per == "passes":
            raise OptionError("{step_scale} {got} and {loss_per} passes both scale a step by the samples it carries; "
                              "take one of them", got=self.step_scale)
        if self.final_unmixed_epochs < -1:
            raise OptionError("{final_unmixed_epochs} must be >= 0, or -1 for one per 15 epochs of the schedule (at "
                              "least one), got {got}", got=self.final_unmixed_epochs)

    def resolved_step_scale(self, optimizer: str | None = "sgd") -> str:
        """``step_scale`` with ``auto`` resolved for ``optimizer`` (``sgd``, ``adamw``, or ``None``
        when it is not known: a Mixer told of none, which then scales nothing): linear for
        SGD (session 10: +0.24 to +1.02 points over none on four CNNs, for 1-3 % of the speedup); none
        for AdamW, whose step does not grow with the loss (sqrt, its candidate, made no difference on
        ViT-tiny in session 11), and
        with ``loss_per="passes"``, which already makes the step grow."""
        if self.step_scale != "auto":
            return self.step_scale
        return "linear" if optimizer == "sgd" and self.loss_per == "samples" else "none"

    def final_epochs(self, num_epochs: int) -> int:
        """Unmixed epochs at the end of a ``num_epochs`` schedule (resolves -1: one per 15 epochs, at
        least one -- batch-norm statistics then end on whole images; measured in the method card)."""
        return max(1, num_epochs // 15) if self.final_unmixed_epochs < 0 else self.final_unmixed_epochs


@dataclass
class TrainConfig:
    """Every option of a training run, with its default. Saved as ``config.json`` next to results."""

    data: str = option("digits", _data_help, group=RUN)
    model: str = option("auto", _model_help, group=RUN)
    vit_separation: str = option(
        "attention", "ViTs: attention (each constituent's tokens attend only to each other, with position embeddings "
        "for its own region: exactly as if alone) or pooling (region pooling only)",
        group=RUN, choices=("attention", "pooling"))
    method: str = option("baseline", f"training method: {METHODS}", group=RUN, bench=False, bench_list="--methods")
    epochs: int = option(30, "epochs (passes over the training set)", group=RUN, bench=False, bench_list="--epochs")
    batch_size: int = option(512, "images (passes) per step, per process", group=RUN)
    seed: int = option(0, "seed for initialisation, plans and augmentation", group=RUN, bench=False,
                       bench_list="--seeds")
    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N (the N-th visible GPU)", group=RUN,
                         resumable=True)
    out: str = option("runs/latest", "output folder: config.json, metrics.json, checkpoint.pt, logs", group=RUN,
                      resumable=True, bench=False)
    lr: float = option(0.2, "peak learning rate (one-cycle schedule in samples seen; the default suits SGD)",
                       group=OPTIMISATION)
    lr_warmup: float = option(0.15, "fraction of all samples over which the LR rises from 0 to its peak",
                           group=OPTIMISATION)
    optimizer: str = option(
        "sgd", "sgd (with --momentum and --nesterov) or adamw (the usual choice for ViTs: give it its own --lr, e.g. "
        "5e-4, and --weight-decay, e.g. 0.05)", group=OPTIMISATION, choices=("sgd", "adamw"))
    momentum: float = option(0.9, "SGD momentum", group=OPTIMISATION)
    nesterov: bool = option(True, "Nesterov momentum", group=OPTIMISATION)
    weight_decay: float = option(5e-4, "weight decay (not on biases and norm weights)", group=OPTIMISATION)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", group=OPTIMISATION)
    clip_grad: float = option(
        2.0, "clip the global gradient norm to this value before each step, a guard against loss spikes (0: off; on "
        "ResNet-18/CIFAR-10 the norm is about 1, so 2 clips only the spikes)", group=OPTIMISATION)
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32", group=OPTIMISATION,
                            choices=("auto", "bf16", "fp32"), resumable=True, speed=True)
    channels_last: bool = option(True, "channels-last memory layout on CUDA", group=OPTIMISATION, resumable=True,
                                 speed=True)
    compile: bool = option(False, "torch.compile the model", group=OPTIMISATION, switch=True, resumable=True,
                           speed=True)
    cuda_graph: str = option(
        "auto", "capture the whole training step as a CUDA graph (under DDP with its gradient all-reduce): auto (on "
        "for CUDA without --compile), on (an error where it cannot be), off",
        group=OPTIMISATION, choices=("auto", "on", "off"), resumable=True, speed=True)
    ddp_bucket_mb: float = option(
        25.0, "several processes: DDP's all-reduce bucket size in MB (PyTorch's default: 25)", group=OPTIMISATION,
        resumable=True, speed=True)
    image_size: int = option(0, "folder data: training resolution (0: 224)", group=DATA)
    cache_size: int = option(
        0, "folder data: image size of the decoded cache (shorter side resized, centre crop; 0: the training "
        "resolution)", group=DATA)
    cache_dir: str = option(
        "", "folder data: where decoded caches live (empty: $MIXTRAIN_CACHE, else ~/.cache/mixtrain/folders)",
        group=DATA, resumable=True, speed=True)
    placement: str = option(
        "auto", "folder data: auto (the cache on the GPU when it fits, else streamed), device, host (streamed from "
        "host memory)", group=DATA, choices=("auto", "device", "host"), resumable=True, speed=True)
    pad: int = option(-1, "random-crop padding in pixels (-1: the data's default: image size / 8; 0 for folders)",
                      group=DATA)
    flip: str = option("auto", "random horizontal flip: auto (the data's default: off for digits), on, off", group=DATA,
                       choices=("auto", "on", "off"))
    workers: int = option(
        0, "folder data: processes that decode the images when the cache is built (0: all CPU cores)", group=DATA,
        resumable=True, speed=True)
    eval_every: int = option(0, "evaluate every N epochs (0: at the end only; never timed)", group=LOGGING,
                             resumable=True)
    eval_batch_size: int = option(1024, "batch size for evaluation", group=LOGGING, resumable=True)
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at epoch ends only)", group=LOGGING,
                                   resumable=True, bench=False)
    resume: bool = option(False, "continue the run in OUT from its checkpoint", group=LOGGING, switch=True,
                          resumable=True, bench=False)
    deterministic: bool = option(False, "deterministic algorithms (bit-exact repeats on the CPU)", group=LOGGING,
                                 switch=True, resumable=True, speed=True)
    progress: str = option("auto", "auto (bar on a terminal, one line per epoch otherwise), bar, line, none "
                           "(mixtrain bench: none, one line per run, unless given)",
                           group=LOGGING, choices=("auto", "bar", "line", "none"), resumable=True)
    csv: bool = option(False, "write a per-epoch log to OUT/log.csv", group=LOGGING, switch=True, resumable=True)
    tensorboard: bool = option(False, "write TensorBoard events to OUT/tb", group=LOGGING, switch=True, resumable=True)
    save_checkpoints: bool = option(True, "write OUT/checkpoint.pt during training (needed for --resume)",
                                    group=LOGGING, resumable=True)
    mix: MixOptions = field(default_factory=MixOptions)

    def resolved_model(self) -> str:
        """The model ``auto`` stands for with this data (or the model named): the data kind's own
        (digitnet for digits), the ImageNet-style ResNet-18 for ImageNet-style data trained at
        >= 128 px (a CIFAR stem at 224 px would cost ~50x), else the CIFAR-style ResNet-18."""
        if self.model != "auto":
            return self.model
        from .data import data_kind

        kind = data_kind(self.data)
        if kind is not None and kind.auto_model:
            return kind.auto_model
        if kind is not None and kind.imagenet_style and (self.image_size or kind.image_size) >= IMAGENET_STYLE_FROM:
            return "resnet18_224"
        return "resnet18"

    def to_dict(self) -> dict:
        """Every option as plain data (``config.json``'s layout: mixing options under ``mix``)."""
        return asdict(self)

    def resolved_step_scale(self) -> str:
        """``mix.step_scale`` with ``auto`` resolved for this run's ``optimizer``."""
        return self.mix.resolved_step_scale(self.optimizer)

    def to_record(self) -> dict:
        """:meth:`to_dict` as a run records it (config.json, a checkpoint, a bench's setup) and
        compares it: ``mix.step_scale`` ``auto`` as what it resolves to for ``optimizer``, so the
        record says what ran, and a later version whose ``auto`` differs cannot mistake it."""
        d = self.to_dict()
        d["mix"]["step_scale"] = self.resolved_step_scale()
        return d

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        """The config of a :meth:`to_dict` dict (keys it does not know are ignored; the old names
        of renamed options are read as the new ones)."""
        d = upgrade_config(d)
        mix = MixOptions(**d.pop("mix", {}))
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(mix=mix, **{k: v for k, v in d.items() if k in names})

    def check(self):
        """Raise :class:`~mixtrain.errors.OptionError` naming the first option out of its range
        (before any data loads); an unknown method or model is a :class:`MixtrainError`."""
        from .data import DATA_KINDS, data_kind

        _check_choices(self)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise OptionError("{" + name + "} must be at least 1, got {got}", got=getattr(self, name))
        for name in ("checkpoint_every", "eval_every", "workers", "seed"):
            if getattr(self, name) < 0:
                raise OptionError("{" + name + "} must be >= 0, got {got}", got=getattr(self, name))
        _finite_at_least_0(self, "lr", "momentum", "weight_decay")
        if not self.momentum < 1.0:
            raise OptionError("{momentum} must be in [0, 1), got {got}", got=self.momentum)
        if not self.ddp_bucket_mb > 0 or not math.isfinite(self.ddp_bucket_mb):
            raise OptionError("{ddp_bucket_mb} must be a finite number of MB > 0, got {got}", got=self.ddp_bucket_mb)
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise OptionError("{nesterov} on needs {momentum} > 0; give {nesterov} off for plain SGD without momentum")
        if not 0.0 <= self.label_smoothing < 1.0:  # also refuses NaN
            raise OptionError("{label_smoothing} must be in [0, 1), got {got}", got=self.label_smoothing)
        _finite_at_least_0(self, "clip_grad", note=" (0: off)")
        if not 0.0 <= self.lr_warmup <= 1.0:
            raise OptionError("{lr_warmup} is a fraction of all samples and must be in [0, 1], got {got}", got=self.lr_warmup)
        if self.pad < -1:
            raise OptionError("{pad} must be >= 0, or -1 for image size / 8, got {got}", got=self.pad)
        if self.cache_size < 0:
            raise OptionError("{cache_size} must be >= 0 (0: the training resolution), got {got}", got=self.cache_size)
        kind = data_kind(self.data)
        size = kind.image_size if kind is not None else 0  # > 0: the data are resampled (from a cache)
        resampled = " or ".join(k.form for k in DATA_KINDS.values() if k.image_size)
        if self.placement != "auto" and not size:
            raise OptionError("{placement} applies only to {forms} data; {spec!r} is resident as it is",
                              forms=resampled, spec=self.data)
        if self.cache_size and not size:
            raise OptionError("{cache_size} applies only to {forms} data; {spec!r} is used as it is",
                              forms=resampled, spec=self.data)
        if self.image_size != 0:
            if not size:
                raise OptionError("{image_size} applies only to {forms} data (it sets their training resolution); "
                                  "{spec!r} keeps its own image size, so leave {image_size} at 0",
                                  forms=resampled, spec=self.data)
            if self.image_size < MIN_IMAGE_SIZE:
                raise OptionError("{image_size} must be at least {least} pixels (or 0 for {size}), got {got}",
                                  least=MIN_IMAGE_SIZE, size=size, got=self.image_size)
        from .models import check_model_name
        from .strategies import STRATEGIES

        if self.method not in STRATEGIES:  # checked here so a typo fails before the data loads
            raise MixtrainError(f"unknown method {self.method!r}; choose from {', '.join(STRATEGIES)}")
        check_model_name(self.resolved_model())
        try:
            self.mix.check()
        except OptionError as e:
            raise e.within("mix") from None


# options renamed since 0.1.0's first configs, old key -> new key: "warmup" meant four things
# (the LR ramp, the first unmixed epochs, a bench's untimed run, a graph capture's eager steps)
RENAMED = {"warmup": "lr_warmup", "mix.warmup_epochs": "mix.first_unmixed_epochs"}


# options added with a default unlike the behaviour before them: a config that mixtrain saved (a
# run's config.json, a checkpoint's, a bench's setup) without one predates it and ran as this value
SAVED_BEFORE = {"mix.step_scale": "none"}


def upgrade_config(d: dict, saved: bool = False) -> dict:
    """A copy of a config dict (``config.json``, a checkpoint's or a bench's setup) with the old
    names of renamed options (:data:`RENAMED`) read as the new ones; with ``saved`` (a config that
    mixtrain wrote in full, never a user's partial file), the options of :data:`SAVED_BEFORE` it
    lacks as what its runs did."""
    d = dict(d)
    if isinstance(d.get("mix"), dict):
        d["mix"] = dict(d["mix"])

    def holder(name: str):  # (the dict that holds option ``name``, or None; its key there)
        *outer, key = name.split(".")
        where = d.get("mix") if outer else d
        return (where if isinstance(where, dict) else None), key

    for old, new in RENAMED.items():
        (where, key_old), (_, key_new) = holder(old), holder(new)
        if where is not None and key_old in where and key_new not in where:
            where[key_new] = where.pop(key_old)
    for name, value in SAVED_BEFORE.items() if saved else ():
        where, key = holder(name)
        if where is not None and key not in where:
            where[key] = value
    return d


# ----------------------------------------------------------------------------------------------
# what the declarations give


def _declared(cls, prefix: str = ""):
    for f in fields(cls):
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):  # a nested group: mix
            yield from _declared(f.default_factory, f"{prefix}{f.name}.")
            continue
        opt = f.metadata.get("option")
        if opt is None:
            raise TypeError(f"{cls.__name__}.{f.name} is declared without option(...)")
        default = f.default if f.default is not MISSING else f.default_factory()
        yield replace(opt, name=prefix + f.name, default=default, flag=opt.flag or "--" + f.name.replace("_", "-"))


# every option by its config.json key ("lr", "mix.rule"), in declaration order
OPTIONS: dict[str, Option] = {o.name: o for o in _declared(TrainConfig)}


def _check_declarations():
    flags = [o.flag for o in OPTIONS.values()]
    for o in OPTIONS.values():
        if o.group not in GROUPS:
            raise TypeError(f"option {o.name}: group {o.group!r} is not one of {GROUPS}")
        if flags.count(o.flag) > 1:
            raise TypeError(f"option {o.name}: flag {o.flag} is declared twice")
        if o.speed and not o.resumable:
            raise TypeError(f"option {o.name}: speed=True is for resumable options")
        if o.switch and o.default is not False:
            raise TypeError(f"option {o.name}: a switch (a flag without a value) must default to False")


_check_declarations()

# Options a resumed run may change: where and how it runs, not what it computes. Every other
# option (including any added later) must match the checkpoint's.
RESUMABLE_CHANGES = frozenset(o.name for o in OPTIONS.values() if o.resumable)

# options that do not change what is trained or how fast, or that vary from run to run of a bench:
# left out of a bench's setup, which every run of it shares (the device is checked by its name)
NOT_BENCH_SETUP = frozenset(o.name for o in OPTIONS.values() if o.bench_list or (o.resumable and not o.speed))


def flag_for(name: str) -> str:
    """The CLI flag of the option at config key ``name`` (``mix.rule`` or ``rule``: ``--mix-rule``);
    a name that is no option stays as it is."""
    o = OPTIONS.get(name) or OPTIONS.get(f"mix.{name}")
    return o.flag if o is not None else name


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """``key: saved -> current`` for every run-defining option that differs."""
    a, b = saved.to_record(), current.to_record()
    a["model"], b["model"] = saved.resolved_model(), current.resolved_model()
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        if key == "mix":
            ma, mb = a.get("mix", {}), b.get("mix", {})
            out += [f"mix.{k}: {ma.get(k)!r} -> {mb.get(k)!r}" for k in sorted(set(ma) | set(mb))
                    if ma.get(k) != mb.get(k) and f"mix.{k}" not in RESUMABLE_CHANGES]
        elif a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


# ----------------------------------------------------------------------------------------------
# the command line


def add_debug_option(p: argparse.ArgumentParser):
    """``--debug`` on a subcommand. Suppressed default: ``mixtrain --debug CMD`` (the top-level
    flag) is not reset to False by the subcommand's parser."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def add_train_options(p: argparse.ArgumentParser, multi: bool = False):
    """Every option as a flag of ``p``, in its group, with its help and default. ``multi``: the
    options of ``bench``, which leaves out those it takes as lists (its own ``--methods``,
    ``--epochs``, ``--seeds``) or not at all."""
    for title in GROUPS:
        group = None
        for o in OPTIONS.values():
            if o.group != title or (multi and not o.bench):
                continue
            group = group or p.add_argument_group(title)
            kw: dict = {"dest": o.dest, "default": o.default, "help": o.help_text()}
            if o.switch:
                kw["action"] = "store_true"
            elif isinstance(o.default, bool):  # a string default goes through type=, so --help shows on/off
                kw.update(type=_bool, metavar="on|off", default="on" if o.default else "off")
            elif isinstance(o.default, (int, float)):
                kw["type"] = type(o.default)
            group.add_argument(o.flag, **kw)


def args_as_config(args, only=None) -> dict:
    """The options in parsed ``args`` as a dict in ``config.json``'s layout (mixing options under
    ``mix``); ``only``: the dests to take (None: every one ``args`` holds)."""
    out: dict = {}
    for o in OPTIONS.values():
        if hasattr(args, o.dest) and (only is None or o.dest in only):
            section, _, key = o.name.rpartition(".")
            (out.setdefault(section, {}) if section else out)[key] = getattr(args, o.dest)
    return out


def config_from_args(args, **override) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``train`` (or ``bench``) options, ``override`` on top."""
    return TrainConfig.from_dict({**args_as_config(args), **override})


def cli_message(e: MixtrainError) -> str:
    """An error as the command line says it: options named by their flags."""
    return e.render(flag_for) if isinstance(e, OptionError) else str(e)


# ----------------------------------------------------------------------------------------------
# docs/options.md


REGENERATE_DOCS = ("python3 -c 'import mixtrain.options as o; print(o.options_markdown(), end=\"\")' "
                   "> docs/options.md")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_markdown() -> str:
    """``docs/options.md``: every option in a table per ``--help`` group (:data:`REGENERATE_DOCS`
    writes it; ``tests/test_options.py`` checks it is current)."""
    lines = [
        "# Options",
        "",
        "Every option of a training run: its key in `config.json` and in `mixtrain.TrainConfig` (mixing options",
        "sit under `mix`, `mixtrain.MixOptions`), its flag for `mixtrain train`, its default and what it does.",
        "Generated from the declarations in `src/mixtrain/options.py`, which `tests/test_options.py` checks;",
        f"after a change there, regenerate it: `{REGENERATE_DOCS}`.",
        "",
        "- **resume**: *may change*: a resumed run (`--resume`) may give it otherwise (where and how it",
        "  runs); *must match*: it defines what the run computes, so it must match the run's `config.json`.",
        "- **bench**: *yes*: `mixtrain bench` takes the same flag, and all its runs share the value; a flag:",
        "  bench takes a comma-separated list there and trains each value; *no*: not a bench option (bench",
        "  has its own `--out` and `--resume`, see `mixtrain bench --help`).",
        "- `mixtrain train` also takes `--config FILE` (start from a `config.json` or YAML with these keys)",
        "  and `--overwrite` (replace the run in `--out`); they are not saved with the run.",
    ]
    for title in GROUPS:
        lines += ["", f"## {title}", "", "| key | flag | default | resume | bench | meaning |", "|---|---|---|---|---|---|"]
        for o in OPTIONS.values():
            if o.group != title:
                continue
            flag = o.flag if o.switch or not isinstance(o.default, bool) else f"{o.flag} on\\|off"
            resume = "may change" if o.resumable else "must match"
            bench = f"`{o.bench_list}` (a list)" if o.bench_list else "yes" if o.bench else "no"
            lines.append(f"| `{o.name}` | `{flag}` | `{json.dumps(o.default)}` | {resume} | {bench} | {_cell(o.help_text())} |")
    return "\n".join(lines) + "\n"

