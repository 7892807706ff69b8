"""Baseline vs MixTrain across model families on CIFAR-10, at one schedule, in one process.

Hardware: written for one NVIDIA H100 80GB GPU (16 CPU cores), CUDA, bf16 autocast and
channels-last (the trainer's CUDA defaults). Versions: each run records mixtrain, Python, torch,
torchvision, timm, CUDA and the GPU name in ``models.json`` (``versions``).

What it times: each run's ``train_seconds`` as the trainer measures it -- the wall-clock of all
epochs (epoch planning, batch set-up, augment + compose, forward/backward/optimiser steps,
end-of-epoch bookkeeping), with the device synchronised at epoch boundaries. Not included: loading
CIFAR-10 onto the GPU (once per process), model and optimiser construction, the final evaluation,
file writes, and an untimed warm-up per model and method (a few steps of the same batch shape on a
slice of the data, with one mixing epoch for mixtrain) that pays cuDNN autotuning, CUDA context and
allocator growth (and torch.compile tracing with ``--compile``) before any timed run. Runs are
interleaved (for each model and seed: baseline, then mixtrain) so drift hits both methods alike.

Usage (CIFAR-10 as ``train_*.npz`` + ``test.npz``, x uint8 [N,32,32,3], y [N]):

    python benchmarks/models.py --data npz:/data/cifar10 --epochs 30 --seeds 0,1,2 --out results/models
    python benchmarks/models.py --smoke --out /tmp/models-smoke     # CPU, synthetic data, seconds

Writes ``OUT/models.json`` (every run and the summary) and ``OUT/models.md`` (the table: model,
method, epochs, seeds, passes, train seconds mean, accuracy mean +- std, speedup, accuracy
difference against the same model's baseline). The table is rewritten after every run, so an
interrupted benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from mixtrain.bench import warmup_subset  # noqa: E402
from mixtrain.data import TensorData, from_arrays, load_data  # noqa: E402
from mixtrain.errors import MixtrainError  # noqa: E402
from mixtrain.strategies import MixOptions  # noqa: E402
from mixtrain.trainer import TrainConfig, Trainer, resolve_device, versions  # noqa: E402

MODELS = ("resnet18", "resnet34", "resnet50", "mobilenetv2", "vit_tiny", "vit_small")
METHODS = ("baseline", "mixtrain")
VITS = {"vit_tiny", "vit_small"}
WARMUP_STEPS = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="", help="CIFAR-10 as npz:DIR or cifar10:DIR (required unless --smoke)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the one schedule (both methods)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak LR for the CNNs (SGD, one-cycle)")
    p.add_argument("--vit-lr", type=float, default=0.05, help="peak LR for the ViTs (one-cycle)")
    p.add_argument("--vit-optimizer", default="sgd", help="optimizer for the ViTs: sgd or adamw (then e.g. --vit-lr 0.001 --vit-weight-decay 0.05)")
    p.add_argument("--vit-weight-decay", type=float, default=TrainConfig.weight_decay, help="weight decay for the ViTs")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--mix", action="append", default=[], metavar="KEY=VALUE",
                   help="a MixOptions field for mixtrain, e.g. --mix quad_confidence=0.95 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default="results/models", help="output folder")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: synthetic 32x32 data (64 train, 32 test), 2 epochs, batch 16")
    return p.parse_args(argv)


def mix_options(pairs: list[str]) -> MixOptions:
    opts = MixOptions()
    types = {f.name: f.type for f in dataclasses.fields(MixOptions)}
    for item in pairs:
        key, _, value = item.partition("=")
        if key not in types:
            raise MixtrainError(f"--mix {item!r}: unknown option; choose from {', '.join(types)}")
        kind = type(getattr(opts, key))
        setattr(opts, key, value.lower() in ("1", "true", "on", "yes") if kind is bool else kind(value))
    opts.check()
    return opts


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> TensorData:
    """Random CIFAR-shaped data whose class shifts one channel: learnable, for the smoke mode."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 160, (n, 32, 32, 3), dtype=np.uint8)
        x[np.arange(n), :, :, y % 3] += (20 * (y + 1)).astype(np.uint8)[:, None, None]
        return x, y

    return from_arrays("synthetic-cifar10", split(n_train), split(n_test), "synthetic", 10)


def mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict], models: list[str], epochs: int) -> list[dict]:
    rows = []
    for model in models:
        base = None
        for method in METHODS:
            done = [r for r in runs if r["model"] == model and r["method"] == method and "error" not in r]
            if not done:
                continue
            t_mean, t_std = mean_std([r["train_seconds"] for r in done])
            a_mean, a_std = mean_std([r["test_accuracy"] for r in done])
            row = {
                "model": model, "method": method, "epochs": epochs, "seeds": [r["seed"] for r in done],
                "passes": statistics.fmean(r["passes"] for r in done),
                "samples": statistics.fmean(r["samples"] for r in done),
                "train_seconds_mean": t_mean, "train_seconds_std": t_std,
                "accuracy_mean": a_mean, "accuracy_std": a_std,
            }
            if method == "baseline":
                base = row
            if base is not None:
                row["speedup"] = base["train_seconds_mean"] / t_mean if t_mean else None
                row["pass_speedup"] = base["passes"] / row["passes"]
                row["accuracy_diff"] = a_mean - base["accuracy_mean"]
            rows.append(row)
    return rows


def markdown(rows: list[dict], session: dict) -> str:
    lines = [
        f"# Baseline vs MixTrain per model ({session['data']}, {session['device']})",
        "",
        f"Train seconds: the trainer's device-synchronised wall-clock of all epochs (no data loading, "
        f"model construction, evaluation or warm-up). Speedup: baseline train seconds / method train "
        f"seconds; passes: images pushed through the network. Versions: {json.dumps(session['versions'])}.",
        "",
        "| model | method | epochs | seeds | passes | train s (mean) | accuracy (mean ± std) | speedup | Δ accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}x (passes {r['pass_speedup']:.2f}x)" if r.get("speedup") else "–"
        diff = f"{100 * r['accuracy_diff']:+.2f} pt" if "accuracy_diff" in r else "–"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['epochs']} | {len(r['seeds'])} | {r['passes']:,.0f} | "
            f"{r['train_seconds_mean']:.1f} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | {speed} | {diff} |"
        )
    failed = session.get("failed", [])
    if failed:
        lines += ["", "Failed runs:", *[f"- {f['model']} {f['method']} seed {f['seed']}: {f['error']}" for f in failed]]
    return "\n".join(lines) + "\n"


def write_outputs(out: str, session: dict, runs: list[dict], rows: list[dict]):
    os.makedirs(out, exist_ok=True)
    session = dict(session, failed=[r for r in runs if "error" in r])
    for name, text in (("models.json", json.dumps({**session, "summary": rows, "runs": runs}, indent=2)),
                       ("models.md", markdown(rows, session))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def main(argv=None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    epochs, batch, device, warm = args.epochs, args.batch_size, args.device, not args.no_warmup
    if args.smoke:
        data = synthetic_cifar(64, 32)
        epochs, batch, device = 2, 16, "cpu"
    elif not args.data:
        raise SystemExit("--data npz:DIR (CIFAR-10) is required unless --smoke")
    else:
        data = load_data(args.data)
    mix = mix_options(args.mix)
    if args.smoke:
        mix.rule = "all"  # random-ish data is never learned confidently in two epochs: mix anyway
        mix.final_unmixed_epochs = 0
    dev = str(resolve_device(device))

    def config(model, method, seed, n_epochs, out, mix_all=False, quiet=args.smoke):
        opts = copy.deepcopy(mix)
        if mix_all:  # the warm-up must run the mixed step whatever the (untrained) losses say
            opts.rule, opts.final_unmixed_epochs = "all", 0
        return TrainConfig(
            data=args.data or data.name, model=model, method=method, epochs=n_epochs, batch_size=batch, seed=seed,
            device=dev, out=out, lr=args.vit_lr if model in VITS else args.lr, compile=args.compile,
            progress="none" if quiet else "line", save_checkpoints=False, mix=opts,
            **({"optimizer": args.vit_optimizer, "weight_decay": args.vit_weight_decay} if model in VITS else {}),
        )

    session = {
        "benchmark": "models", "data": args.data or data.name, "device": dev, "epochs": epochs, "seeds": seeds,
        "models": models, "batch_size": batch, "lr": args.lr, "vit_lr": args.vit_lr,
        "vit_optimizer": args.vit_optimizer, "vit_weight_decay": args.vit_weight_decay, "compile": args.compile,
        "mix": dataclasses.asdict(mix), "versions": versions(), "command": " ".join(["benchmarks/models.py", *(sys.argv[1:] if argv is None else argv)]),
        "timing": "train_seconds: device-synchronised wall-clock of all epochs; excludes data loading, model "
                  "construction, evaluation, file writes and the untimed warm-up",
    }
    runs: list[dict] = []
    for model in models:
        if warm:  # untimed: same batch shape, a few steps, one mixing epoch for mixtrain
            n_warm = min(data.num_train, batch * WARMUP_STEPS)
            small = warmup_subset(data, n_warm, n_warm)
            for method in METHODS:
                n = 1 if method == "baseline" else mix.first_unmixed_epochs + 1
                t0 = time.perf_counter()
                cfg = config(model, method, 0, n, os.path.join(args.out, "warmup"), mix_all=True, quiet=True)
                Trainer(cfg, data=small).fit()
                print(f"[{model}] warm-up {method}: {time.perf_counter() - t0:.1f} s (untimed)", flush=True)
        for seed in seeds:
            for method in METHODS:
                out = os.path.join(args.out, "runs", model, method, f"seed{seed}")
                print(f"[{model}] {method} seed {seed}: {epochs} epochs on {dev}", flush=True)
                try:
                    m = Trainer(config(model, method, seed, epochs, out), data=data).fit()
                    run = {k: m[k] for k in ("model", "method", "seed", "epochs", "passes", "samples", "train_seconds",
                                             "test_accuracy", "pass_speedup", "grid", "cuda_graph")}
                    run["epochs_log"] = m["epochs_log"]
                except MixtrainError as e:  # e.g. a diverged ViT: record it, go on with the others
                    run = {"model": model, "method": method, "seed": seed, "error": str(e)}
                    print(f"  failed: {e}", flush=True)
                runs.append(run)
                if dev == "cuda":
                    torch.cuda.empty_cache()
                write_outputs(args.out, session, runs, summarise(runs, models, epochs))
    rows = summarise(runs, models, epochs)
    write_outputs(args.out, session, runs, rows)
    print(markdown(rows, dict(session, failed=[r for r in runs if "error" in r])))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MixtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
