"""Command line: ``mixtrain train | demo | prepare | models | show | bench | report``. Parses options, calls the library."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import MixtrainError
from .options import (  # noqa: F401 (add_train_options, config_from_args: re-exported for their old users)
    METHODS,
    RESUMABLE_CHANGES,
    TrainConfig,
    upgrade_config,
    add_debug_option,
    add_train_options,
    args_as_config,
    cli_message,
    config_differences,
    config_from_args,
    flag_for,
)


def _merged(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values over it (the ``mix`` options merged one by one)."""
    out = {**base, **{k: v for k, v in top.items() if k != "mix"}}
    if "mix" in top:
        out["mix"] = {**base.get("mix", {}), **top["mix"]}
    return out


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


def _parse_config_file(path: str, where: str):
    """The JSON or YAML (by the file's ending) content of a config file; one error line if unreadable."""
    import json

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
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MixtrainError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MixtrainError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); YAML files "
                            "must end in .yaml or .yml") from None


def read_config(path: str, flag: str = "--config", saved: bool = False) -> dict:
    """A training configuration file -- a run's ``config.json``, or YAML with the same keys (mixing
    options under ``mix``) -- as a dict of options, each checked against the option's type.
    ``resume`` is never read from a file (give ``--resume``); the run-describing keys a
    ``config.json`` also holds are skipped; old names of renamed options read as the new ones
    (``saved``: a run's own config.json, see :func:`~mixtrain.options.upgrade_config`)."""
    where = f"{flag} {path}"
    d = _parse_config_file(path, where)
    if not isinstance(d, dict):
        raise MixtrainError(f"{where}: must hold a mapping of option names to values, not {type(d).__name__}")
    # a file that holds what only mixtrain writes is a run's own config.json, whatever the flag
    d = upgrade_config(d, saved or any(k in d for k in CONFIG_EXTRAS))
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
        saved_dict = None
        if os.path.exists(saved_path):
            saved_dict = read_config(saved_path, "--resume: the run's", saved=True)
        elif os.path.exists(os.path.join(out, "checkpoint.pt")):  # config.json lost: the checkpoint holds them too
            saved_dict = _checkpoint_config(os.path.join(out, "checkpoint.pt"))
        if saved_dict is not None:
            saved = TrainConfig.from_dict(_merged(defaults, saved_dict))
            cfg = TrainConfig.from_dict(_merged(saved.to_dict(), stated))
            diff = config_differences(saved, cfg)
            if diff:
                may = ", ".join(flag_for(k) for k in sorted(RESUMABLE_CHANGES - {"out", "resume"}))
                raise MixtrainError(
                    f"cannot resume {out}: the command gives other options than the run's config.json "
                    f"({'; '.join(diff)}). Leave them out to continue with the run's own, or train afresh into "
                    f"another --out; a resumed run may change only {may}"
                )
            cfg.out, cfg.resume = out, True
            return cfg
    else:
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if held == ["config.json"]:  # a run that failed before its first checkpoint: nothing to continue
            held = []
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


def _checkpoint_config(path: str) -> dict:
    """The options a checkpoint was trained with (its ``config``), read as data like any checkpoint."""
    from .checkpoint import load

    state = load(path)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise MixtrainError(f"cannot resume: {path} holds no options (not a mixtrain checkpoint)")
    known = TrainConfig().to_dict()
    return {k: v for k, v in upgrade_config(config, saved=True).items() if k in known}


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
    from .bench import _run_config, _safe, parse_methods
    from .trainer import train

    base = TrainConfig(data="digits", batch_size=args.batch_size, lr=args.lr, device=args.device, progress="none")
    configs = []
    for spec in parse_methods(args.methods):  # as bench takes them: mixtrain(KEY=VALUE;...) too
        cfg = _run_config(base, spec, args.epochs, args.seed, os.path.join(args.out, _safe(spec)))
        cfg.check()  # every method's options before the first one trains
        configs.append((spec, cfg))
    rows = []
    for spec, cfg in configs:
        print(f"training {spec} on digits ({args.epochs} epochs, {cfg.device})...", flush=True)
        rows.append((spec, train(cfg)))
    base = rows[0][1]
    width = max(10, *(len(spec) for spec, _ in rows))
    print()
    print(f"{'method':<{width}} {'passes':>8} {'samples':>8} {'fewer passes':>13} {'time (s)':>9} {'test acc':>9}")
    for spec, m in rows:
        fewer = 1 - m["passes"] / base["passes"]
        print(f"{spec:<{width}} {m['passes']:>8,} {m['samples']:>8,} {fewer:>12.0%} {m['train_seconds']:>9.1f} "
              f"{m['test_accuracy']:>9.4f}")


def cmd_prepare(args):
    from .folder_cache import build, cache_path, open_built, status

    kind, _, root = args.data.partition(":")
    if kind != "folder" or not root:
        raise MixtrainError(f"prepare takes folder:DIR, got {args.data!r}")
    root = os.path.expanduser(root)
    if args.size < 8:
        raise MixtrainError(f"--size must be at least 8 pixels, got {args.size}")
    state, why, listings, classes = status(root, args.size, args.cache_dir)
    if state == "valid" and not args.force:
        cache = open_built(cache_path(root, args.size, args.cache_dir))  # listed once, by status
        print(f"up to date: {cache.path}")
    else:
        if state == "stale":
            print(f"rebuilding {cache_path(root, args.size, args.cache_dir)}: {why}", file=sys.stderr)
        cache = build(root, args.size, args.cache_dir, args.workers, listings, classes)
    m = cache.manifest
    print(f"{m['counts']['train']:,} train + {m['counts']['val']:,} val images, {len(m['classes'])} classes, "
          f"{args.size} px ({m['policy']}), {cache.nbytes() / 1e9:.2f} GB on disk, built in {m['build_seconds']:.1f} s; "
          f"{len(m['skipped'])} skipped, {len(m['ignored'])} ignored -> {cache.path}")


class OneLineErrors(argparse.ArgumentParser):
    """A parser whose usage errors are one ``error:`` line (and exit code 2) like every other error,
    not the usage text; ``--help`` still prints it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = OneLineErrors(
        prog="mixtrain",
        description="Faster image-classifier training by input mixing (MixTrain).",
        formatter_class=fmt,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=_version(), help="print the versions of mixtrain and torch and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in (_add_train_command, _add_demo_command, _add_prepare_command, _add_models_command):
        add_command(sub, fmt)

    from .show import add_show_command

    add_show_command(sub, fmt)

    from .bench import add_bench_commands

    add_bench_commands(sub, fmt)

    from .fast import add_fast_command

    add_fast_command(sub, fmt)
    return p


def _add_train_command(sub, fmt):
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


def _add_demo_command(sub, fmt):
    d = sub.add_parser("demo", help="baseline vs mixtrain on the bundled digits, on the CPU (under a minute on 2 cores)",
                       formatter_class=fmt, description="Train a small CNN on scikit-learn's digits with each method and print a table.")
    d.add_argument("--methods", default="baseline,mixtrain",
                   help=f"comma-separated methods ({METHODS}), each may carry mixing options: mixtrain(KEY=VALUE;...)")
    d.add_argument("--epochs", type=int, default=30, help="epochs per method")
    d.add_argument("--batch-size", type=int, default=64, help="images per step")
    d.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    d.add_argument("--seed", type=int, default=0, help="seed")
    d.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    d.add_argument("--out", default="runs/demo", help="output folder (one subfolder per method)")
    add_debug_option(d)
    d.set_defaults(func=cmd_demo)


def _add_prepare_command(sub, fmt):
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


def _add_models_command(sub, fmt):
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
    w = max(18, *(len(r["model"]) for r in rows)) if rows else 18  # long timm names keep the columns aligned
    print(f"{'model':<{w}} {'kind':<15} {'image':>9} {'grid':>6}  {'mixes':<13} {'params':>8}")
    for r in rows:
        image = f"{r['image_size']}x{r['image_size']}" + (f"x{r['channels']}" if r["channels"] != 3 else "")
        if "error" in r:
            print(f"{r['model']:<{w}} {r['kind']:<15} {image:>9} {'-':>6}  cannot: {r['error']}")
            continue
        mixes = "pairs, quads" if r["quads"] else "pairs" if r["pairs"] else "no"
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(f"{r['model']:<{w}} {r['kind']:<15} {image:>9} {grid:>6}  {mixes:<13} {r['parameters'] / 1e6:>7.2f}M")
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
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
