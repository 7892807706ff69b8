"""Where a method's extra time per pass goes: per-step cost against per-epoch fixed cost.

Reads a ``mixtrain bench`` results.json (no GPU needed: it re-analyses timings already measured)
and, for each method at each epoch budget, fits every epoch's seconds (epoch 1 left out: it pays
autotuning and graph capture) as ``seconds = step_ms * steps + fixed_ms``, where ``steps`` is the
epoch's number of batches (passes / batch size, rounded up: the last batch is padded). Mixtrain's
epochs differ in length (mixing varies), so the fit separates what each step costs from what each
epoch costs once (planning, batch set-up, the end-of-epoch sync); the baseline's epochs all have the
same length, so for it only the mean seconds per step (fixed cost included) is given. Also
reported: the method's epochs with no mixing (warm-up and final unmixed epochs), which show the cost
of its step layout on single images.

    python benchmarks/epoch_cost_fit.py benchmarks/results/cifar10-resnet18-clip [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import numpy as np


def epochs_of(runs: list[dict], method: str, epochs: int, batch_size: int):
    """(steps, seconds, mixed) of every epoch after the first, over all seeds."""
    out = []
    for r in runs:
        if r["method"] == method and r["epochs"] == epochs:
            for e in r["epochs_log"][1:]:
                out.append((math.ceil(e["passes"] / batch_size), e["seconds"], e.get("mixed_fraction", 0.0) > 0))
    return out


def fit(rows):
    """Least-squares ``seconds = a * steps + b`` -> (ms per step, fixed ms per epoch), or None if
    every epoch has the same length (no slope to fit)."""
    steps = np.array([s for s, _, _ in rows], dtype=float)
    secs = np.array([t for _, t, _ in rows])
    if len(set(steps.tolist())) < 2:
        return None
    (a, b), *_ = np.linalg.lstsq(np.vstack([steps, np.ones_like(steps)]).T, secs, rcond=None)
    return 1000 * a, 1000 * b


def analyse(results: dict) -> list[dict]:
    bs = int(results.get("setup", {}).get("batch_size", 512))
    runs = results["runs"]
    out = []
    for epochs in sorted({r["epochs"] for r in runs}):
        base = epochs_of(runs, "baseline", epochs, bs)
        if not base:
            continue
        base_step = 1000 * statistics.fmean(t / s for s, t, _ in base)
        for method in sorted({r["method"] for r in runs if r["method"] != "baseline"}):
            rows = epochs_of(runs, method, epochs, bs)
            if not rows:
                continue
            row = {"method": method, "epochs": epochs, "baseline_ms_per_step": base_step, "epochs_fitted": len(rows)}
            f = fit(rows)
            if f:
                row.update(ms_per_step=f[0], fixed_ms_per_epoch=f[1], step_cost=f[0] / base_step - 1)
            mixed = [r for r in rows if r[2]]
            fm = fit(mixed) if mixed else None
            if fm:
                row.update(mixed_ms_per_step=fm[0], mixed_fixed_ms_per_epoch=fm[1])
            unmixed = [t / s for s, t, m in rows if not m]
            if unmixed:
                row["unmixed_ms_per_step"] = 1000 * statistics.fmean(unmixed)
                row["unmixed_step_cost"] = row["unmixed_ms_per_step"] / base_step - 1
            out.append(row)
    return out


def pct(x):
    return None if x is None else 100 * x


def markdown(rows: list[dict], source: str, command: str) -> str:
    def f(x, spec, unit=""):
        return "-" if x is None else format(x, spec) + unit

    lines = [f"# Per-step and per-epoch cost, from `{source}`", "",
             "Fit of each epoch's seconds (epoch 1 left out) as ms per step x steps + fixed ms per epoch; steps = "
             "batches of the epoch. Baseline: mean ms per step (its fixed cost included). Unmixed: the method's "
             "epochs without mixing (same step layout, single images).", "",
             "| method | epochs | epochs fitted | baseline ms/step | ms/step | fixed ms/epoch | step cost | mixed epochs: ms/step | fixed ms | unmixed epochs: ms/step | cost |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['epochs']} | {r['epochs_fitted']} | {r['baseline_ms_per_step']:.2f} | {f(r.get('ms_per_step'), '.2f')} "
            f"| {f(r.get('fixed_ms_per_epoch'), '.1f')} | {f(pct(r.get('step_cost')), '+.1f', '%')} "
            f"| {f(r.get('mixed_ms_per_step'), '.2f')} | {f(r.get('mixed_fixed_ms_per_epoch'), '.1f')} "
            f"| {f(r.get('unmixed_ms_per_step'), '.2f')} | {f(pct(r.get('unmixed_step_cost')), '+.1f', '%')} |")
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a mixtrain bench output folder (holding results.json)")
    p.add_argument("--out", default="", help="write the table here too (markdown)")
    args = p.parse_args(argv)
    path = os.path.join(args.folder, "results.json")
    try:
        with open(path) as fh:
            results = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    rows = analyse(results)
    command = " ".join(["python3", "benchmarks/epoch_cost_fit.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(rows, path, command)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
