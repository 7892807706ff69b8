"""Command line: ``mixtrain train | demo | prepare | models | show | bench | report``. Parses options, calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .errors import MixtrainError

METHODS = "baseline, mixtrain, cutmix, mixup, infobatch"


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {s!r}")


def add_debug_option(p: argparse.ArgumentParser):
    """``--debug`` on a subcommand. Suppressed default: ``mixtrain --debug CMD`` (the top-level
    flag) is not reset to False by the subcommand's parser."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def add_train_options(p: argparse.ArgumentParser, multi: bool = False):
    """Options shared by ``train`` and ``bench`` (``bench`` takes lists for epochs/methods/seeds)."""
    from .data import DATA_HELP
    from .models import MODEL_HELP
    from .strategies import MixOptions
    from .trainer import TrainConfig

    d = TrainConfig()
    m = MixOptions()
    g = p.add_argument_group("run")
    g.add_argument("--data", default=d.data, help=f"dataset: {DATA_HELP}")
    g.add_argument("--model", default=d.model, help=f"model: auto (digitnet for digits, resnet18_224 for folders at >= 128 px, resnet18 otherwise); {MODEL_HELP}")
    g.add_argument("--vit-separation", default=d.vit_separation, help="ViTs: attention (each constituent's tokens attend only to each other, with position embeddings for its own region: exactly as if alone) or pooling (region pooling only)")
    if not multi:
        g.add_argument("--method", default=d.method, help=f"training method: {METHODS}")
        g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (passes over the training set)")
        g.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, plans and augmentation")
        g.add_argument("--out", default=d.out, help="output folder: config.json, metrics.json, checkpoint.pt, logs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images (passes) per step, per process")
    g.add_argument("--device", default=d.device, help="auto (CUDA if available), cpu, cuda or cuda:N (the N-th visible GPU)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (one-cycle schedule in samples seen; the default suits SGD)")
    o.add_argument("--warmup", type=float, default=d.warmup, help="fraction of all samples over which the LR rises from 0 to its peak")
    o.add_argument("--optimizer", default=d.optimizer, help="sgd (with --momentum and --nesterov) or adamw (the usual choice for ViTs: give it its own --lr, e.g. 1e-3, and --weight-decay, e.g. 0.05)")
    o.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    o.add_argument("--nesterov", type=_bool, default=d.nesterov, metavar="on|off", help="Nesterov momentum")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (not on biases and norm weights)")
    o.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing of the cross-entropy")
    o.add_argument("--clip-grad", type=float, default=d.clip_grad, help="clip the global gradient norm to this value before each step, a guard against loss spikes (0: off; on ResNet-18/CIFAR-10 the norm is about 1, so 2 clips only the spikes)")
    o.add_argument("--precision", default=d.precision, help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    o.add_argument("--channels-last", type=_bool, default=d.channels_last, metavar="on|off", help="channels-last memory layout on CUDA")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--cuda-graph", default=d.cuda_graph, help="capture the whole training step as a CUDA graph: auto (on for one CUDA process with resident data and no --compile), on, off")
    a = p.add_argument_group("data handling")
    a.add_argument("--image-size", type=int, default=d.image_size, help="folder data: training resolution (0: 224)")
    a.add_argument("--cache-size", type=int, default=d.cache_size, help="folder data: image size of the decoded cache (shorter side resized, centre crop; 0: the training resolution)")
    a.add_argument("--cache-dir", default=d.cache_dir, help="folder data: where decoded caches live (empty: $MIXTRAIN_CACHE, else ~/.cache/mixtrain/folders)")
    a.add_argument("--placement", default=d.placement, help="folder data: auto (the cache on the GPU when it fits, else streamed), device, host (streamed from host memory)")
    a.add_argument("--pad", type=int, default=d.pad, help="random-crop padding in pixels (-1: the data's default: image size / 8; 0 for folders)")
    a.add_argument("--flip", default=d.flip, help="random horizontal flip: auto (the data's default: off for digits), on, off")
    a.add_argument("--workers", type=int, default=d.workers, help="folder data: processes that decode the images when the cache is built (0: all CPU cores)")
    x = p.add_argument_group("mixing and pruning (mixtrain, cutmix, mixup, infobatch)")
    x.add_argument("--warmup-epochs", type=int, default=m.warmup_epochs, help="first epochs trained unmixed (the loss memory fills)")
    x.add_argument("--final-unmixed-epochs", type=int, default=m.final_unmixed_epochs, help="last epochs trained unmixed (-1: one per 15 epochs of the schedule, at least one: 1 of 10, 2 of 30)")
    x.add_argument("--mix-rule", default=m.rule, help="which samples are mixed: auto (classified right with p(true) >= --confidence), threshold (loss < --mix-threshold), fraction (lowest-loss --mix-fraction), all")
    x.add_argument("--confidence", type=float, default=m.confidence, help="auto rule: true-class probability a sample needs in its last pass to be mixed")
    x.add_argument("--mix-threshold", type=float, default=m.threshold, help="threshold rule: mix samples whose last loss is below this")
    x.add_argument("--mix-fraction", type=float, default=m.fraction, help="fraction rule: mix this fraction of the lowest-loss samples")
    x.add_argument("--quad-confidence", type=float, default=m.quad_confidence, help="> 0: samples with p(true) >= this are mixed four to an image (2x2 grid)")
    x.add_argument("--mix-ratio", default=m.ratio, help="adaptive (area share from previous losses: the harder sample gets more) or fixed (1/2)")
    x.add_argument("--min-share", type=float, default=m.min_share, help="each constituent's area share is clipped to [min, 1-min]")
    x.add_argument("--pairing", default=m.pairing, help="random, or easy-hard (easiest mixable with hardest mixable)")
    x.add_argument("--pair-resize", type=_bool, default=m.pair_resize, metavar="on|off", help="downscale pair constituents into their region instead of cropping")
    x.add_argument("--quad-resize", type=_bool, default=m.quad_resize, metavar="on|off", help="downscale quad constituents into their quadrant instead of cropping")
    x.add_argument("--prune-ratio", type=float, default=m.prune_ratio, help="infobatch: fraction of the samples with below-mean loss left out of each pruned epoch (the kept ones weigh 1/(1-r))")
    x.add_argument("--prune-until", type=float, default=m.prune_until, help="infobatch: prune in the epochs before this fraction of the schedule, then train on all the data")
    x.add_argument("--loss-per", default=m.loss_per, help="batch loss = sum of per-sample losses / samples carried (samples) or / passes (passes: larger steps when more is mixed)")
    r = p.add_argument_group("logging and checkpoints")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs (0: at the end only; never timed)")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size for evaluation")
    r.add_argument("--progress", default=d.progress, help="auto (bar on a terminal, one line per epoch otherwise), bar, line, none")
    r.add_argument("--csv", action="store_true", help="write a per-epoch log to OUT/log.csv")
    r.add_argument("--tensorboard", action="store_true", help="write TensorBoard events to OUT/tb")
    if not multi:
        r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="also checkpoint every N steps (0: at epoch ends only)")
        r.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    r.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact repeats on the CPU)")
    r.add_argument("--save-checkpoints", type=_bool, default=d.save_checkpoints, metavar="on|off", help="write OUT/checkpoint.pt during training (needed for --resume)")


# option dest -> MixOptions field, where the flag is not --field-name (--mix-rule sets mix.rule)
MIX_DESTS = {"mix_rule": "rule", "mix_threshold": "threshold", "mix_fraction": "fraction", "mix_ratio": "ratio"}


def args_as_config(args, only=None) -> dict:
    """The training options in ``args`` as a dict in ``config.json``'s layout (mixing options under
    ``mix``); ``only``: the option dests to take (None: every one ``args`` holds)."""
    from .strategies import MixOptions
    from .trainer import TrainConfig

    def wanted(dest):
        return hasattr(args, dest) and (only is None or dest in only)

    out = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "mix" and wanted(f.name)}
    dest = {field: d for d, field in MIX_DESTS.items()}
    mix = {f.name: getattr(args, dest.get(f.name, f.name)) for f in fields(MixOptions) if wanted(dest.get(f.name, f.name))}
    if mix:
        out["mix"] = mix
    return out


def _merged(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values over it (the ``mix`` options merged one by one)."""
    out = {**base, **{k: v for k, v in top.items() if k != "mix"}}
    if "mix" in top:
        out["mix"] = {**base.get("mix", {}), **top["mix"]}
    return out


def config_from_args(args, **override):
    """The :class:`~mixtrain.TrainConfig` of parsed ``train`` (or ``bench``) options, ``override`` on top."""
    from .trainer import TrainConfig

    return TrainConfig.from_dict({**args_as_config(args), **override})


def given_options(argv: list[str]) -> set[str]:
    """The dests of the options written on the command line ``argv`` (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func", "debug"}


# written by mixtrain train into OUT; any of them means OUT holds a run
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json")
# what --overwrite removes before the new run starts (so nothing of the old run outlives it)
OVERWRITTEN = RUN_FILES + ("log.csv", "curves.png")
# keys of config.json that describe the run (written by train) but are not options
CONFIG_EXTRAS = ("resolved_model", "grid", "augment", "world_size")


def read_config(path: str, flag: str = "--config") -> dict:
    """A training configuration file -- a run's ``config.json``, or YAML with the same keys (mixing
    options under ``mix``) -- as a dict of options, each checked against the option's type.
    ``resume`` is never read from a file (give ``--resume``); the run-describing keys a
    ``config.json`` also holds are skipped."""
    import json

    from .trainer import TrainConfig

    where = f"{flag} {path}"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise MixtrainError(f"{where}: no such file") from None
    except OSError as e:
        raise MixtrainError(f"{where}: cannot read it ({e.strerror or e})") from e
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise MixtrainError(f"{where}: reading YAML needs PyYAML (pip install pyyaml); or give a JSON config "
                                "such as a run's config.json") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MixtrainError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MixtrainError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); YAML files "
                                "must end in .yaml or .yml") from None
    if not isinstance(d, dict):
        raise MixtrainError(f"{where}: must hold a mapping of option names to values, not {type(d).__name__}")
    defaults = TrainConfig().to_dict()
    mix_defaults = defaults.pop("mix")
    unknown = [k for k in d if k not in defaults and k not in CONFIG_EXTRAS and k != "mix"]
    mix = d.get("mix", {})
    if not isinstance(mix, dict):
        raise MixtrainError(f"{where}: mix must hold a mapping of mixing options, not {type(mix).__name__}")
    unknown += [f"mix.{k}" for k in mix if k not in mix_defaults]
    if unknown:
        raise MixtrainError(f"{where}: unknown option(s) {', '.join(unknown)} (the keys of a run's config.json; "
                            f"mixing options under mix: {', '.join(mix_defaults)})")
    out = {k: v for k, v in d.items() if k in defaults and k != "resume"}
    for key, value in [*out.items(), *((f"mix.{k}", v) for k, v in mix.items())]:
        ref = mix_defaults[key[4:]] if key.startswith("mix.") else defaults[key]
        if isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif isinstance(ref, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(ref, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(ref))
        if not ok:
            raise MixtrainError(f"{where}: {key} should be {type(ref).__name__} (like its default {ref!r}), "
                                f"got {value!r}")
    if mix:
        out["mix"] = dict(mix)
    return out


def train_config(args) -> "TrainConfig":
    """The run ``mixtrain train`` starts, from the defaults, ``--config FILE``, the options on the
    command line (they win), and with ``--resume`` the run's own ``OUT/config.json``: options given
    besides it must match it or be ones a resumed run may change, else the run is refused naming
    the differences. Without ``--resume``, an ``--out`` that holds a run is refused unless
    ``--overwrite`` is given."""
    from .trainer import RESUMABLE_CHANGES, TrainConfig, config_differences

    if args.resume and args.overwrite:
        raise MixtrainError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    given = given_options(args.argv)
    stated = read_config(args.config) if args.config else {}  # the file ...
    stated = _merged(stated, args_as_config(args, only=given))  # ... and the flags over it
    stated.pop("resume", None)
    defaults = TrainConfig().to_dict()
    out = stated.get("out", defaults["out"])
    if args.resume:
        saved_path = os.path.join(out, "config.json")
        if os.path.exists(saved_path):  # without it, the options as given (the checkpoint is checked anyway)
            saved = TrainConfig.from_dict(_merged(defaults, read_config(saved_path, "--resume: the run's")))
            cfg = TrainConfig.from_dict(_merged(saved.to_dict(), stated))
            diff = config_differences(saved, cfg)
            if diff:
                may = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE_CHANGES - {"out", "resume"}))
                raise MixtrainError(
                    f"cannot resume {out}: the command gives other options than the run's config.json "
                    f"({'; '.join(diff)}). Leave them out to continue with the run's own, or train afresh into "
                    f"another --out; a resumed run may change only {may}"
                )
            cfg.out, cfg.resume = out, True
            return cfg
    else:
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if held and not args.overwrite:
            raise MixtrainError(
                f"--out {out} holds a run ({', '.join(held)}): continue it with --resume, train into another --out, "
                "or replace it with --overwrite"
            )
        if held and os.environ.get("RANK", "0") == "0":  # --overwrite: nothing of the old run outlives the new
            for name in OVERWRITTEN:
                try:
                    os.remove(os.path.join(out, name))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise MixtrainError(f"--overwrite: cannot remove {os.path.join(out, name)} ({e.strerror or e})") from e
    cfg = TrainConfig.from_dict(_merged(defaults, stated))
    cfg.resume = bool(args.resume)
    return cfg


def cmd_train(args):
    from .show import write_curves
    from .trainer import train

    cfg = train_config(args)
    args.out = cfg.out
    m = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one summary line and the curves, from rank 0
        return
    write_curves(args.out, m)  # OUT/curves.png; a failure to draw only warns
    print(
        f"{m['method']}: {m['passes']:,} passes for {m['samples']:,} samples ({m['pass_speedup']:.2f}x), "
        f"{m['train_seconds']:.1f} s training, test accuracy {m['test_accuracy']:.4f} -> {os.path.join(args.out, 'metrics.json')}"
    )


def cmd_demo(args):
    from .trainer import TrainConfig, train

    rows = []
    for method in args.methods.split(","):
        cfg = TrainConfig(
            data="digits",
            method=method,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            out=os.path.join(args.out, method),
            progress="none",
            save_checkpoints=False,
        )
        print(f"training {method} on digits ({args.epochs} epochs, {cfg.device})...", flush=True)
        m = train(cfg)
        rows.append(m)
    base = rows[0]
    print()
    print(f"{'method':<10} {'passes':>8} {'samples':>8} {'fewer passes':>13} {'time (s)':>9} {'test acc':>9}")
    for m in rows:
        fewer = 1 - m["passes"] / base["passes"]
        print(f"{m['method']:<10} {m['passes']:>8,} {m['samples']:>8,} {fewer:>12.0%} {m['train_seconds']:>9.1f} {m['test_accuracy']:>9.4f}")


def cmd_prepare(args):
    from .folder_cache import build, cache_path, open_cache, status

    kind, _, root = args.data.partition(":")
    if kind != "folder" or not root:
        raise MixtrainError(f"prepare takes folder:DIR, got {args.data!r}")
    root = os.path.expanduser(root)
    if args.size < 8:
        raise MixtrainError(f"--size must be at least 8 pixels, got {args.size}")
    state, why, listings, classes = status(root, args.size, args.cache_dir)
    if state == "valid" and not args.force:
        cache = open_cache(root, args.size, args.cache_dir)
        print(f"up to date: {cache.path}")
    else:
        if state == "stale":
            print(f"rebuilding {cache_path(root, args.size, args.cache_dir)}: {why}", file=sys.stderr)
        cache = build(root, args.size, args.cache_dir, args.workers, listings, classes)
    m = cache.manifest
    print(f"{m['counts']['train']:,} train + {m['counts']['val']:,} val images, {len(m['classes'])} classes, "
          f"{args.size} px ({m['policy']}), {cache.nbytes() / 1e9:.2f} GB on disk, built in {m['build_seconds']:.1f} s; "
          f"{len(m['skipped'])} skipped, {len(m['ignored'])} ignored -> {cache.path}")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="mixtrain",
        description="Faster image-classifier training by input mixing (MixTrain).",
        formatter_class=fmt,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=_version(), help="print the versions of mixtrain and torch and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train one configuration and write OUT/metrics.json", formatter_class=fmt,
                       description="Train one model with one method; writes config.json, metrics.json and checkpoint.pt to --out.")
    add_train_options(t)
    c = t.add_argument_group("configuration and output folder")
    c.add_argument("--config", metavar="FILE", default=None,
                   help="start from this configuration: a run's config.json, or YAML with the same keys (mixing options "
                        "under mix:); options given on the command line override it")
    c.add_argument("--overwrite", action="store_true",
                   help="train into an --out that holds a run, replacing its config.json, checkpoint.pt, metrics.json, "
                        "log.csv and curves.png (without it such an --out is refused; --resume continues it)")
    add_debug_option(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="baseline vs mixtrain on the bundled digits, on the CPU (under a minute on 2 cores)",
                       formatter_class=fmt, description="Train a small CNN on scikit-learn's digits with each method and print a table.")
    d.add_argument("--methods", default="baseline,mixtrain", help=f"comma-separated methods ({METHODS})")
    d.add_argument("--epochs", type=int, default=30, help="epochs per method")
    d.add_argument("--batch-size", type=int, default=64, help="images per step")
    d.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    d.add_argument("--seed", type=int, default=0, help="seed")
    d.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    d.add_argument("--out", default="runs/demo", help="output folder (one subfolder per method)")
    add_debug_option(d)
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prepare", help="decode an image folder once into its cache (train and bench do it on first use)",
                        formatter_class=fmt,
                        description="Decode every image of folder:DIR once, with all CPU cores, into a memory-mapped uint8 "
                                    "cache at SIZE px (shorter side resized, centre crop). Later runs reuse it; a changed "
                                    "folder is detected and the cache rebuilt.")
    pr.add_argument("data", metavar="folder:DIR", help="the ImageNet-style folder (DIR/train/<class>/*, DIR/val/<class>/*)")
    pr.add_argument("--size", type=int, default=224, help="cached image size in pixels (train with --cache-size SIZE, or --image-size SIZE)")
    pr.add_argument("--cache-dir", default="", help="where caches live (empty: $MIXTRAIN_CACHE, else ~/.cache/mixtrain/folders)")
    pr.add_argument("--workers", type=int, default=0, help="decoding processes (0: all CPU cores)")
    pr.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    add_debug_option(pr)
    pr.set_defaults(func=cmd_prepare)

    mo = sub.add_parser("models", help="list the built-in models with their feature grid at an image size",
                        formatter_class=fmt,
                        description="Every built-in --model with its final feature grid (the cells regions are cut "
                                    "into), whether it can mix pairs and quads there, and its size. Built without "
                                    "weights or memory (on PyTorch's meta device).")
    mo.add_argument("names", nargs="*", metavar="MODEL", help="models to list (default: every built-in one; timm:NAME too)")
    mo.add_argument("--image-size", type=int, default=0, help="image size in pixels (0: each model's own: 16 for digitnet, "
                                                               "32 for small-image models, 224 for the *_224 ones)")
    mo.add_argument("--channels", type=int, default=3, help="input channels (digitnet: 1 at its own size)")
    add_debug_option(mo)
    mo.set_defaults(func=cmd_models)

    from .show import add_show_command

    add_show_command(sub, fmt)

    try:
        from .bench import add_bench_commands

        add_bench_commands(sub, fmt)
    except ImportError:
        pass
    return p


def _version() -> str:
    import platform

    from . import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = "not installed"
    return f"mixtrain {__version__} (torch {torch_version}, python {platform.python_version()})"


def model_rows(names: list[str], image_size: int = 0, channels: int = 3) -> list[dict]:
    """For each model name: its kind, image size, final feature grid, which tiers it can mix and
    its parameter count, measured on PyTorch's meta device (no weights, no memory); a model that
    cannot be built at that size gets the reason instead."""
    import torch

    from .models import MODELS, adapt, create_model

    rows = []
    for name in names or list(MODELS):
        own = 16 if name == "digitnet" else 224 if name.endswith("_224") else 32
        size = image_size or own
        chans = 1 if name == "digitnet" and not image_size and channels == 3 else channels
        kind = ("timm" if name.startswith("timm:") else "digits" if name == "digitnet"
                else "ImageNet-style" if name.endswith("_224") else "small-image")
        row = {"model": name, "kind": kind, "image_size": size, "channels": chans}
        try:
            with torch.device("meta"):
                m = adapt(create_model(name, 10, chans, size), size, chans)
        except MixtrainError as e:
            row["error"] = str(e)
        except Exception as e:  # a model that fails at this size for its own reasons
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        else:
            gh, gw = m.grid
            row.update(grid=[gh, gw], pairs=gh >= 2 or gw >= 2, quads=gh >= 2 and gw >= 2,
                       parameters=sum(p.numel() for p in m.parameters()))
        rows.append(row)
    return rows


def cmd_models(args):
    if args.image_size < 0 or args.channels < 1:
        raise MixtrainError(f"--image-size must be >= 0 and --channels >= 1, got {args.image_size} and {args.channels}")
    from .models import check_model_name

    for name in args.names:
        check_model_name(name)  # an unknown name is an error; one that cannot work at this size is a row
    rows = model_rows(args.names, args.image_size, args.channels)
    print(f"{'model':<18} {'kind':<15} {'image':>9} {'grid':>6}  {'mixes':<13} {'params':>8}")
    for r in rows:
        image = f"{r['image_size']}x{r['image_size']}" + (f"x{r['channels']}" if r["channels"] != 3 else "")
        if "error" in r:
            print(f"{r['model']:<18} {r['kind']:<15} {image:>9} {'-':>6}  cannot: {r['error']}")
            continue
        mixes = "pairs, quads" if r["quads"] else "pairs" if r["pairs"] else "no"
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(f"{r['model']:<18} {r['kind']:<15} {image:>9} {grid:>6}  {mixes:<13} {r['parameters'] / 1e6:>7.2f}M")
    if not args.names:
        print("timm:NAME: any timm model whose body is spatial (mixtrain models timm:NAME --image-size S measures one)")


def _plain_warnings():
    """mixtrain's warnings (a run that will never mix, clamped workers, skipped images) as one
    ``warning:`` line each."""
    import warnings

    from .errors import MixtrainWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MixtrainWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv=None) -> int:
    _plain_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, recorded by bench
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except MixtrainError as e:
        if getattr(args, "debug", False):
            if e.worker_traceback:
                print(e.worker_traceback, file=sys.stderr)
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
