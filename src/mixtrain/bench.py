"""Time-to-accuracy benchmark: ``mixtrain bench`` runs every (method, epochs, seed) in one process
and ``mixtrain report`` renders ``report.md``, ``frontier.png`` and ``mixing.png`` from ``results.json``.

What a run's ``train_seconds`` covers (measured by the trainer, device-synchronised): every epoch's
planning, batch set-up, training steps and end-of-epoch bookkeeping. It leaves out data loading
(done once per bench), model and optimiser construction, evaluation, and file writes. Before the
timed runs, each method pending in this invocation trains once, untimed, on a small slice of the
training set (a few steps of the same batch shape, and at least one mixing epoch for mixing
methods), so that cuDNN autotuning, ``torch.compile`` tracing and code generation, CUDA context and
allocator growth, and other lazy initialisation are paid before any timed run. Every timed run then
starts from a fresh model and optimiser but reuses the warmed process.

The aggregation and comparison are pure functions over plain dicts (:func:`aggregate`,
:func:`interpolate`, :func:`compare`, :func:`render_report`); :func:`run_bench` is the thin loop.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import shlex
import sys
import time

from .errors import DivergedError, MixtrainError
from .options import (METHODS, NOT_BENCH_SETUP, RENAMED, add_debug_option, add_train_options, cli_message, config_from_args,
                      flag_for, upgrade_config)

FORMAT = "mixtrain-bench/1"
RESULTS = "results.json"
REPORT = "report.md"
FRONTIER = "frontier.png"
MIXING = "mixing.png"
WARMUP_STEPS = 3  # steps per warm-up epoch (same batch shape as the timed runs)

TIMING_NOTE = (
    "train seconds = the trainer's device-synchronised wall-clock of all epochs (planning, batch "
    "set-up, training steps, end-of-epoch bookkeeping). Not included: data loading (once per bench "
    "process), model/optimiser construction, evaluation, file writes, and an untimed warm-up run per "
    "method per bench process (a few steps of the same batch shape, with at least one mixing epoch "
    "for mixing methods) that pays cuDNN autotuning, torch.compile tracing/code generation, CUDA "
    "context and allocator growth before any timed run."
)

# options that do not change what is trained or how fast, or that vary by run (the device is
# checked by its name instead): ignored when a resumed bench is checked; declared in options.py
_NOT_SETUP = NOT_BENCH_SETUP


# ----------------------------------------------------------------------------------------------
# parsing the lists


def parse_epochs(text: str) -> list[int]:
    """``"10,20,30"`` -> ``[10, 20, 30]`` (sorted, without repeats)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MixtrainError(f"--epochs must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MixtrainError(f"--epochs needs one or more epoch budgets >= 1, got {text!r}")
    return sorted(set(values))


def split_method(spec: str) -> tuple[str, dict]:
    """``"mixtrain(quad_confidence=0.95;ratio=fixed)"`` -> ``("mixtrain", {...})``.

    A method may carry mixing-option overrides in parentheses, so that variants of one method
    (ablations) run side by side in one bench; each variant is its own line in the report.
    """
    from dataclasses import fields as dc_fields

    from .strategies import STRATEGIES, MixOptions

    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name = name.strip()
    if name not in STRATEGIES:
        raise MixtrainError(f"unknown method {name!r} in --methods; choose from {', '.join(STRATEGIES)}")
    overrides: dict = {}
    if rest:
        if not rest.endswith(")"):
            raise MixtrainError(f"--methods: {spec!r} lacks its closing parenthesis")
        types = {f.name: f.type for f in dc_fields(MixOptions)}
        defaults = MixOptions()
        for item in filter(None, (s.strip() for s in rest[:-1].split(";"))):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            key = RENAMED.get(f"mix.{key}", f"mix.{key}")[4:]  # a spec written before a rename
            if not eq or key not in types:
                raise MixtrainError(f"--methods: {item!r} in {spec!r} is not KEY=VALUE with KEY one of {', '.join(types)}")
            kind = type(getattr(defaults, key))
            try:
                if kind is bool:
                    overrides[key] = value.strip().lower() in ("1", "true", "on", "yes")
                else:
                    overrides[key] = kind(value.strip())
            except ValueError:
                hint = "; separate options with ';', as in mixtrain(confidence=0.4;quad_confidence=0.9)" \
                    if "=" in value else ""
                raise MixtrainError(f"--methods: {key} in {spec!r} needs a {kind.__name__}, got {value!r}{hint}") \
                    from None
    if overrides and not STRATEGIES[name].uses_mix_options:  # a variant that would train as the plain method
        raise MixtrainError(f"--methods: {name} takes no mixing options, got {spec!r}")
    return name, overrides


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in str(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _safe(name: str) -> str:
    """A folder name for a method spec such as ``mixtrain(ratio=fixed)``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def parse_methods(text: str) -> list[str]:
    """``"baseline,mixtrain,mixtrain(ratio=fixed)"`` -> that list (order kept, each checked)."""
    methods = []
    for m in _split_top_level(text):
        split_method(m)
        if m not in methods:
            methods.append(m)
    if not methods:
        raise MixtrainError("--methods needs at least one method")
    return methods


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds ``[0, 1, 2]``; ``"0,5,7"`` (a list, with a comma) -> those seeds."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v.strip()]
        else:
            count = int(text)
            if count < 1:
                raise MixtrainError(f"--seeds must be a count >= 1 or a comma-separated list, got {text!r}")
            seeds = list(range(count))
    except ValueError:
        raise MixtrainError(f"--seeds must be a count (3 -> seeds 0,1,2) or a list like 0,1,2; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise MixtrainError(f"--seeds must be non-negative, got {text!r}")
    return sorted(set(seeds))


def run_key(method: str, epochs: int, seed: int) -> str:
    return f"{method}-e{epochs}-s{seed}"


def planned_runs(methods: list[str], epochs: list[int], seeds: list[int]) -> list[tuple[str, int, int]]:
    """Every combination, seeds outermost, so methods alternate and drift over time hits all alike."""
    return [(m, e, s) for s in seeds for e in epochs for m in methods]


# ----------------------------------------------------------------------------------------------
# aggregation (pure)


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of nothing")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(runs: list[dict], method_order: list[str] | None = None) -> list[dict]:
    """One row per (method, epochs) with the mean (and std) over seeds of time, passes, accuracy."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], int(r["epochs"])), []).append(r)
    order = list(method_order or [])
    for r in runs:
        if r["method"] not in order:
            order.append(r["method"])
    if "baseline" in order:  # the reference first
        order.remove("baseline")
        order.insert(0, "baseline")
    rows = []
    for (method, epochs), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        secs, secs_std = mean_std(r["train_seconds"] for r in rs)
        acc, acc_std = mean_std(r["test_accuracy"] for r in rs)
        passes, _ = mean_std(r["passes"] for r in rs)
        samples, _ = mean_std(r["samples"] for r in rs)
        rows.append({
            "method": method,
            "epochs": epochs,
            "n": len(rs),
            "seeds": sorted(int(r["seed"]) for r in rs),
            "passes": passes,
            "samples": samples,
            "train_seconds": secs,
            "train_seconds_std": secs_std,
            "accuracy": acc,
            "accuracy_std": acc_std,
        })
    return rows


def interpolate(xs, ys, x: float) -> float | None:
    """Linear interpolation of the points (xs, ys) at ``x``; None outside [min(xs), max(xs)].

    Points sharing an x are averaged. Never extrapolates: a value outside the measured range is
    not a measurement.
    """
    merged: dict[float, list[float]] = {}
    for xi, yi in zip(xs, ys):
        merged.setdefault(float(xi), []).append(float(yi))
    pts = sorted((xi, sum(v) / len(v)) for xi, v in merged.items())
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, and x is exactly on it


def compare(rows: list[dict], reference: str = "baseline") -> list[dict]:
    """Add to each row its speedup over the same-epoch baseline and its accuracy gain at equal time.

    ``speedup`` = baseline mean train seconds / method mean train seconds (same epochs);
    ``pass_ratio`` = baseline mean passes / method mean passes (same epochs);
    ``baseline_accuracy_at_time`` = the baseline's mean accuracy vs mean train seconds, linearly
    interpolated across its epoch budgets at this row's mean train seconds (None outside its range);
    ``gain`` = this row's mean accuracy minus that (None where it is None).
    """
    base = {r["epochs"]: r for r in rows if r["method"] == reference}
    bx = [r["train_seconds"] for r in base.values()]
    by = [r["accuracy"] for r in base.values()]
    out = []
    for r in rows:
        r = dict(r)
        b = base.get(r["epochs"])
        r["speedup"] = b["train_seconds"] / r["train_seconds"] if b and r["train_seconds"] > 0 else None
        r["pass_ratio"] = b["passes"] / r["passes"] if b and r["passes"] > 0 else None
        at = interpolate(bx, by, r["train_seconds"]) if base else None
        r["baseline_accuracy_at_time"] = at
        r["gain"] = r["accuracy"] - at if at is not None else None
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# report (pure: results dict -> markdown)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _gain_text(r: dict, rows: list[dict], reference: str) -> str:
    if r["method"] == reference:
        return "(reference)"
    base = [b for b in rows if b["method"] == reference]
    if not base:
        return f"n/a (no {reference} runs)"
    if r["gain"] is None:
        lo = min(b["train_seconds"] for b in base)
        hi = max(b["train_seconds"] for b in base)
        return f"outside baseline range ({r['train_seconds']:.1f} s vs {lo:.1f}-{hi:.1f} s)"
    return f"{100 * r['gain']:+.2f} pt"


def _setup_summary(setup: dict) -> str:
    keys = ["batch_size", "optimizer", "lr", "lr_warmup", "weight_decay", "label_smoothing", "clip_grad", "precision", "channels_last",
            "compile", "pad", "flip", "deterministic"]
    parts = [f"{k}={setup[k]}" for k in keys if k in setup]
    mix = setup.get("mix") or {}
    if mix:
        parts.append("mixing: " + ", ".join(f"{k}={v}" for k, v in mix.items()))
    return ", ".join(parts)


SPIKE_RISE = 0.05  # an epoch's mean training loss this much above the previous epoch's


def loss_spikes(epochs_log: list[dict], rise: float = SPIKE_RISE) -> list[int]:
    """Epochs (1-based) whose mean training loss rose more than ``rise`` over the previous epoch's.

    Training loss normally falls epoch by epoch; a rise means the run diverged for a while (seen
    with mixing at a high learning rate and no gradient clipping). Not counted: the epoch where
    mixing switches on or off, since composites are harder (or easier) than single images.
    """
    out = []
    for prev, cur in zip(epochs_log, epochs_log[1:]):
        switched = (prev.get("mixed_fraction", 0) > 0) != (cur.get("mixed_fraction", 0) > 0)
        if not switched and cur["train_loss"] > prev["train_loss"] * (1 + rise):
            out.append(int(cur["epoch"]))
    return out


def _command_lines(sessions: list[dict], devices_commands: list[str] | None = None) -> list[str]:
    """The report's command lines: the first session's, then each later one as a continuation of
    the same bench or, from another part of a merged bench, as run alongside. A bench run with
    ``--devices`` shows its own commands first and each device's process as a part of them."""
    if devices_commands:
        return ([f"- Command: `{devices_commands[0]}` (one bench process per device, merged)"]
                + [f"- Continued with: `{c}`" for c in devices_commands[1:]]
                + [f"- Part {s.get('part', '?')}: `{s.get('command', '')}`" for s in sessions])
    lines = ["- Command: " + (f"`{sessions[0].get('command', '')}`" if sessions else "n/a")]
    for prev, s in zip(sessions, sessions[1:]):
        how = "Continued with" if s.get("part") == prev.get("part") else "Merged from another bench (mixtrain report --merge)"
        lines.append(f"- {how}: `{s.get('command', '')}`")
    return lines


def render_report(results: dict) -> str:
    """The markdown report of a results dict (see :func:`run_bench` for its fields)."""
    reference = "baseline"
    runs = results.get("runs", [])
    rows = compare(aggregate(runs, results.get("methods")), reference)
    setup = results.get("setup", {})
    first = (results.get("sessions") or [{}])[0]
    device = first.get("device", {})
    versions = first.get("versions", {})
    seeds = sorted({int(r["seed"]) for r in runs})
    lines = [f"# mixtrain bench: {setup.get('data', '?')}, {setup.get('resolved_model', setup.get('model', '?'))}", ""]
    lines += _command_lines(results.get("sessions", []), results.get("devices_commands"))
    lines.append(f"- Device: {device.get('name', '?')} ({device.get('type', '?')})")
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("gpu", "cpu")))
    lines.append(f"- Seeds: {', '.join(map(str, seeds)) or 'none'} (mean ± sample std over seeds, n - 1)")
    lines.append(f"- Setup: {_setup_summary(setup)} (every option in results.json)")
    lines += _report_warnings(results)
    diverged = results.get("diverged", [])
    lines += ["", f"Timing: {results.get('timing', TIMING_NOTE)}", ""]
    lines.append(
        "Speedup = same-epoch baseline train seconds / method train seconds; pass ratio = same-epoch "
        "baseline passes / method passes. Gain at equal time = method accuracy minus the baseline's "
        "accuracy linearly interpolated (across its epoch budgets) at the method's train seconds; "
        "no extrapolation beyond the baseline's measured time range."
    )
    lines += ["", "| method | epochs | seeds | passes | train s (mean) | test acc % (mean ± std) | speedup | pass ratio | gain at equal time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lost = collections.Counter((d["method"], d["epochs"]) for d in diverged)  # beside the seeds that count
    for r in rows:
        acc = _pct(r["accuracy"]) + (f" ± {_pct(r['accuracy_std'])}" if r["accuracy_std"] is not None else "")
        n = f"{r['n']} (+{lost[(r['method'], r['epochs'])]} diverged)" if (r["method"], r["epochs"]) in lost else r["n"]
        lines.append(
            f"| {r['method']} | {r['epochs']} | {n} | {r['passes']:,.0f} | {r['train_seconds']:.1f} | {acc} | "
            f"{_ratio(r['speedup'])} | {_ratio(r['pass_ratio'])} | {_gain_text(r, rows, reference)} |"
        )
    lines += ["", "![test accuracy vs train seconds](frontier.png)", "",
              "![samples trained mixed per epoch, one panel per method](mixing.png)", "", "## Every run", "",
              "| run | train s | passes | samples | test acc % | eval s | loss spikes (epochs) | max grad norm |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    lines += _every_run_rows(runs, diverged)
    return "\n".join(lines) + "\n"


def _report_warnings(results: dict) -> list[str]:
    """The report's warning lines: runs missing, diverged, with loss spikes, or that compiled."""
    runs, lines = results.get("runs", []), []
    missing = missing_runs(results)
    if missing:
        lines.append(f"- **Incomplete**: {len(missing)} of {len(results.get('planned', []))} planned runs missing "
                     f"({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); continue with --resume")
    diverged = results.get("diverged", [])
    if diverged:
        lines.append(f"- **Diverged** (stopped at a non-finite loss or weights; left out of the means, so a method's "
                     f"mean may cover other seeds than the baseline's; not retried by --resume): "
                     + "; ".join(f"{d['key']} ({_diverged_reason(d)})" for d in diverged))
    spiked = [r for r in runs if loss_spikes(r.get("epochs_log", []))]
    if spiked:
        lines.append(f"- **Loss spikes** (an epoch's mean training loss > {100 * SPIKE_RISE:.0f} % above the previous "
                     f"epoch's): {len(spiked)} of {len(runs)} runs ({', '.join(r['key'] for r in spiked[:8])}"
                     f"{', ...' if len(spiked) > 8 else ''}); see the spike column below")
    compiled = [r["key"] for r in runs if r.get("compiled_graphs")]
    if compiled:
        lines.append(f"- **Warning**: torch.compile built new graphs inside timed runs: {', '.join(compiled)}")
    return lines


def _every_run_rows(runs: list[dict], diverged: list[dict]) -> list[str]:
    """The rows of the report's "Every run" table: finished runs, then diverged ones."""
    lines = []
    for r in sorted(runs, key=lambda r: (r["method"], r["epochs"], r["seed"])):
        log = r.get("epochs_log", [])
        spikes = ", ".join(map(str, loss_spikes(log))) or "-"
        norms = [e["grad_norm_max"] for e in log if "grad_norm_max" in e]
        lines.append(f"| {r['key']} | {r['train_seconds']:.2f} | {r['passes']:,} | {r['samples']:,} | "
                     f"{_pct(r['test_accuracy'])} | {r.get('eval_seconds', 0.0):.2f} | {spikes} | "
                     f"{f'{max(norms):.1f}' if norms else '-'} |")
    for d in sorted(diverged, key=lambda d: (d["method"], d["epochs"], d["seed"])):
        lines.append(f"| {d['key']} | diverged: {_diverged_reason(d)} | | | | | | |")
    return lines


def _diverged_reason(d: dict) -> str:
    """Where a diverged run stopped: its error's first clause (``non-finite loss at epoch 9, step 27``)."""
    return d.get("error", "?").split(";")[0]


def plot_frontier(rows: list[dict], path: str, title: str = ""):
    """Test accuracy vs train seconds, one line per method, std error bars, points labelled by epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5 + 0.25 * len({r["method"] for r in rows})), dpi=120)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch for the caller
    ax = fig.add_subplot(1, 1, 1)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["train_seconds"])
        x = [r["train_seconds"] for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        yerr = [100 * (r["accuracy_std"] or 0.0) for r in pts]
        xerr = [r["train_seconds_std"] or 0.0 for r in pts]
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, marker="o", capsize=3, label=m)
        for r, xi, yi in zip(pts, x, y):
            ax.annotate(f"{r['epochs']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("train seconds (mean over seeds)")
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.set_title(title or "accuracy vs training time (labels: epochs)")
    ax.grid(True, alpha=0.3)
    if methods:  # below the axes: long variant names never cover the points
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_mixing(runs: list[dict], path: str, methods: list[str] | None = None):
    """One panel per method: the share of the training set trained mixed in each epoch, one line
    per epoch budget (mean over seeds), from each run's ``epochs_log``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = [m for m in (methods or []) if any(r["method"] == m for r in runs)]
    order += [m for m in dict.fromkeys(r["method"] for r in runs) if m not in order]
    cols = min(4, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle("samples trained mixed per epoch (% of the training set, mean over seeds)", fontsize=9)
    if not order:
        fig.text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
    for i, method in enumerate(order):
        ax = fig.add_subplot(rows, cols, i + 1)
        for n_epochs in sorted({int(r["epochs"]) for r in runs if r["method"] == method}):
            logs = [r.get("epochs_log") or [] for r in runs if r["method"] == method and int(r["epochs"]) == n_epochs]
            logs = [log for log in logs if len(log) == n_epochs]
            if logs:
                mean = [100 * sum(log[e].get("mixed_fraction", 0.0) for log in logs) / len(logs) for e in range(n_epochs)]
                ax.plot(range(1, n_epochs + 1), mean, marker=".", markersize=3, label=f"{n_epochs} epochs")
        ax.set_title(method, fontsize=8)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", frameon=False)
    fig.subplots_adjust(left=0.07 if cols > 1 else 0.15, right=0.98, top=1 - 0.55 / (2.3 * rows + 0.5),
                        bottom=0.45 / (2.3 * rows + 0.5), wspace=0.25, hspace=0.55)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def write_report(out_dir: str, results: dict) -> tuple[str, str]:
    """Write ``report.md``, ``frontier.png`` and ``mixing.png`` into ``out_dir``; returns the paths
    of the report and the frontier plot."""
    report = os.path.join(out_dir, REPORT)
    png = os.path.join(out_dir, FRONTIER)
    _write_text(report, render_report(results))
    rows = aggregate(results.get("runs", []), results.get("methods"))
    setup = results.get("setup", {})
    title = f"{setup.get('data', '')} {setup.get('resolved_model', '')}".strip()
    plot_frontier(rows, png, title + " (labels: epochs)" if title else "")
    plot_mixing(results.get("runs", []), os.path.join(out_dir, MIXING), results.get("methods"))
    return report, png


def load_results(out_dir: str) -> dict:
    path = os.path.join(out_dir, RESULTS)
    if not os.path.exists(path):
        raise MixtrainError(f"no {RESULTS} in {out_dir} (run mixtrain bench --out {out_dir} first)")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise MixtrainError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise MixtrainError(f"{path} is not a mixtrain bench results file (format {FORMAT})")
    if isinstance(results.get("setup"), dict):
        results["setup"] = upgrade_config(results["setup"], saved=True)
    for what, entries, keys in (
            ("run", results.get("runs", []), ("key", "method", "epochs", "seed", "train_seconds", "test_accuracy", "passes", "samples")),
            ("diverged run", results.get("diverged", []), ("key", "method", "epochs", "seed", "error"))):
        for r in entries:
            missing = [k for k in keys if k not in r]
            if missing:
                raise MixtrainError(f"{path}: {what} {r.get('key', '?')} lacks {missing}")
    return results


def _write_text(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# the bench loop (thin)


def device_info(device) -> dict:
    import platform

    import torch

    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def setup_of(cfg) -> dict:
    """The options every run of a bench shares (checked when a bench is continued)."""
    d = {k: v for k, v in cfg.to_record().items() if k not in _NOT_SETUP}
    d["resolved_model"] = cfg.resolved_model()
    return d


def _setup_as_now(saved: dict) -> dict:
    """A bench setup saved by an earlier version, in today's terms: renamed options under their new
    names, options added since at their defaults (what those runs did; :data:`~mixtrain.options.SAVED_BEFORE`
    for those whose default differs), options since removed left out."""
    from .options import TrainConfig

    try:
        now = setup_of(TrainConfig.from_dict({k: v for k, v in saved.items() if k != "resolved_model"}))
    except (TypeError, ValueError):  # a malformed setup: compare it as it is (every difference named)
        return saved
    now["resolved_model"] = saved.get("resolved_model", now["resolved_model"])
    return now


def _diff(a: dict, b: dict, prefix: str = "", labels: tuple[str, str] = ("then", "now")) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.", labels)
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} {labels[0]}, {b.get(k)!r} {labels[1]}")
    return out


def warmup_subset(data, n_train: int, n_test: int):
    """A small slice of ``data`` with the same image shape and statistics (for the untimed warm-up run)."""
    return data.subset(n_train, n_test)


def _git_commit() -> str | None:
    """The source's git commit (with '+dirty' for uncommitted edits), when it runs from a checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _dynamo_graphs() -> int | None:
    """Graphs torch.compile has built so far in this process (to prove timed runs built none)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def source_digest(root: str | None = None) -> str:
    """A short SHA-256 of the library's source (every ``*.py`` under ``root``, default this package,
    by relative path and content). It names the code that ran even where a copy of the checkout
    carries stale git metadata (session 16's GPU machine reported its first commit, ``+dirty``):
    run the same function at a checkout of a commit to see whether that commit is the code."""
    import hashlib

    root = root or os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                   for d, _, names in os.walk(root) for f in names if f.endswith(".py"))
    h = hashlib.sha256()
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]


def _versions_with_commit() -> dict:
    """The library versions, plus the source's git commit when it runs from a checkout and the
    digest of its source (:func:`source_digest`) always."""
    from .trainer import versions

    vers = versions()
    commit = _git_commit()
    if commit:
        vers["mixtrain_commit"] = commit
    vers["mixtrain_source"] = source_digest()
    return vers


def existing_results(out: str, resume: bool) -> dict | None:
    """The results of the bench already in ``out`` when it is continued (``resume``), else None;
    an existing bench without ``resume`` is an error: it is never overwritten."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return None
    if not resume:
        raise MixtrainError(f"{path} already exists: pass --resume to continue that bench, or choose another --out")
    return load_results(out)


def _open_results(out: str, setup: dict, dev: dict, vers: dict, resume: bool) -> dict:
    """The results of the bench in ``out`` when it is continued (``resume``), else new empty ones."""
    results = existing_results(out, resume)
    if results is not None:
        if results.get("devices"):
            raise MixtrainError(f"{out} was run with --devices (one bench process per device, merged): continue it "
                                "with the same --devices and --resume")
        _check_continuable(results, out, setup, dev, vers)
        return results
    return {"format": FORMAT, "setup": setup, "timing": TIMING_NOTE, "methods": [], "planned": [],
            "sessions": [], "runs": []}


def _check_continuable(results: dict, out: str, setup: dict, dev: dict, vers: dict):
    """New runs join old ones only when their timings compare: the same setup, device and torch."""
    diffs = _diff(_setup_as_now(results.get("setup", {})), setup)
    if diffs:
        keys = (d.split(":")[0] for d in diffs)
        flags = ", ".join(dict.fromkeys(flag_for("model" if k == "resolved_model" else k) for k in keys))
        raise MixtrainError(f"cannot continue the bench in {out}: its setup differs: " + "; ".join(diffs)
                            + f". Give {flags} as then to continue it, or bench into another --out")
    then = results["sessions"][0]
    for what, a, b in (("device", then["device"].get("name"), dev["name"]),
                       ("torch version", then["versions"].get("torch"), vers.get("torch"))):
        if a != b:
            raise MixtrainError(f"cannot continue the bench in {out}: it was measured with {what} {a!r}, "
                                f"this process has {b!r}; timings would not be comparable")


def _start_session(results: dict, methods: list[str], plan: list[tuple[str, int, int]], command: str, dev: dict,
                   vers: dict) -> dict:
    """Add this invocation's methods, planned runs and session record to ``results``; returns the session."""
    results["methods"] = list(dict.fromkeys(results["methods"] + methods))
    results["planned"] = list(dict.fromkeys(results["planned"] + [run_key(*p) for p in plan]))
    session = {"command": command, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "device": dev, "versions": vers, "warmup_seconds": {}}
    results["sessions"].append(session)
    return session


def _run_config(base, method: str, n_epochs: int, seed: int, folder: str, **more):
    """``base`` for one run of ``method`` (a name with optional overrides), never checkpointed."""
    name, overrides = split_method(method)
    cfg = dataclasses.replace(base, method=name, epochs=n_epochs, seed=seed, out=folder, resume=False,
                              save_checkpoints=False, checkpoint_every=0, **more)
    cfg.mix = dataclasses.replace(base.mix, **overrides)
    return cfg


def _load_bench_data(base, log):
    from .data import load_data

    log(f"loading {base.data} ...")
    return load_data(base.data, base.image_size or None, base.workers, base.cache_size, base.cache_dir,
                     base.placement)


def _warm_up(base, data, methods, out: str, session: dict, log):
    """Untimed: each of ``methods`` trains a few steps of the timed runs' batch shape, with every
    sample mixable so the mixing path runs too; records the seconds (and compiled graphs) in ``session``."""
    from .trainer import Trainer

    graphs = _dynamo_graphs()
    n_warm = min(data.num_train, base.batch_size * WARMUP_STEPS)
    warm_data = warmup_subset(data, n_warm, base.eval_batch_size)
    for method in methods:
        mix = dataclasses.replace(base.mix, **split_method(method)[1])
        warm_epochs = 1 if method == "baseline" else mix.first_unmixed_epochs + 1
        cfg = _run_config(base, method, warm_epochs, 0, os.path.join(out, "warmup", _safe(method)), progress="none",
                          eval_every=0, csv=False, tensorboard=False)
        cfg.mix.rule = "all"
        cfg.mix.final_unmixed_epochs = 0  # its last epoch mixes
        t0 = time.perf_counter()
        try:
            Trainer(cfg, data=warm_data).fit()
        except DivergedError as e:  # its weights are thrown away; the timed runs are what count
            log(f"warm-up {method} diverged ({cli_message(e).split(';')[0]}); its timed runs may include "
                "set-up the warm-up did not finish")
        session["warmup_seconds"][method] = time.perf_counter() - t0
        log(f"warm-up {method}: {session['warmup_seconds'][method]:.1f} s (untimed)")
    if base.compile and graphs is not None:
        session["warmup_compiled_graphs"] = _dynamo_graphs() - graphs


def _expected_seconds(runs: list[dict], method: str, n_epochs: int) -> float:
    """A run's expected duration: the slowest finished run of its method, scaled to its epochs; for a
    method not run yet, the slowest finished run of any method (the baseline, which makes the most
    passes), so that ``--stop-after`` does not start a variant's first run that the time limit kills."""
    def scaled(rs):
        return max((r["wall_seconds"] * n_epochs / r["epochs"] for r in rs), default=0.0)
    return scaled([r for r in runs if r["method"] == method]) or scaled(runs)


def _timed_run(base, data, method: str, n_epochs: int, seed: int, out: str, session: int) -> dict:
    """Train one run from a fresh model and optimiser; returns its entry of ``results["runs"]``."""
    from .trainer import Trainer

    key = run_key(method, n_epochs, seed)
    cfg = _run_config(base, method, n_epochs, seed, os.path.join(out, "runs", _safe(key)))
    graphs = _dynamo_graphs()
    t0 = time.perf_counter()
    m = Trainer(cfg, data=data).fit()
    wall = time.perf_counter() - t0
    graphs_after = _dynamo_graphs()
    run = {k: m[k] for k in ("method", "epochs", "seed", "passes", "samples", "pass_speedup", "train_seconds",
                             "eval_seconds", "test_accuracy", "grid", "options", "epochs_log")}
    run.update(method=method, base_method=m["method"])  # a variant keeps its own line
    run.update(key=key, wall_seconds=wall, session=session,
               compiled_graphs=(graphs_after - graphs) if base.compile and graphs is not None else 0)
    return run


def _out_of_time(elapsed: float, stop_after: float, results: dict, todo: list, i: int, log) -> bool:
    """Whether ``todo[i]`` would overrun ``stop_after`` (said in the log when so)."""
    method, n_epochs, seed = todo[i]
    expected = _expected_seconds(results["runs"], method, n_epochs)
    if elapsed + expected <= stop_after:
        return False
    log(f"stopping before {run_key(method, n_epochs, seed)}: {elapsed:.0f} s elapsed (+{expected:.0f} s "
        f"expected) of --stop-after {stop_after:.0f} s; {len(todo) - i} runs left, continue with --resume")
    return True


def _run_into(results: dict, path: str, base, data, method: str, n_epochs: int, seed: int, out: str, log):
    """Train one run and add it to ``results`` (written to ``path`` at once, so partial results
    survive a time limit): under ``runs``, or under ``diverged`` if its loss or weights became
    non-finite -- a result of the comparison, not a reason to drop the bench's other runs."""
    session = len(results["sessions"]) - 1
    try:
        run = _timed_run(base, data, method, n_epochs, seed, out, session)
    except DivergedError as e:
        key = run_key(method, n_epochs, seed)
        results.setdefault("diverged", []).append({"key": key, "method": method, "epochs": n_epochs, "seed": seed,
                                                   "session": session, "error": cli_message(e)})
        _write_json(path, results)
        log(f"{key} diverged and is left out of the means (--resume does not retry it): {cli_message(e)}")
        return
    results["runs"].append(run)
    _write_json(path, results)
    log(f"[{len(results['runs']) + len(results.get('diverged', []))}/{len(results['planned'])}] {run['key']}: "
        f"{run['train_seconds']:.1f} s train, {run['passes']:,} passes, test accuracy {run['test_accuracy']:.4f}")


def run_bench(base, methods: list[str], epochs: list[int], seeds: list[int], out: str, command: str = "",
              resume: bool = False, stop_after: float = 0.0, data=None, log=print) -> dict:
    """Train every (method, epochs, seed) with the options of ``base`` (a TrainConfig) into ``out``.

    Writes ``out/results.json`` after every run, then ``report.md``, ``frontier.png`` and ``mixing.png``. With
    ``resume`` it keeps the runs already in ``results.json`` (same setup and device required) and
    trains only the missing ones. ``stop_after`` > 0: start no run once this many seconds have
    passed, or when the run's expected duration (the slowest finished run of its method, or of any
    method before its first, scaled to its epochs) would overrun it; checked again after the data
    loading and warm-up. A run that diverges (:class:`~mixtrain.errors.DivergedError`) is recorded
    under ``diverged`` and the bench goes on.
    Returns the results dict.
    """
    from .trainer import resolve_device

    t_start = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MixtrainError("mixtrain bench runs as one process; start it without torchrun")
    base = copy.deepcopy(base)
    base.check()
    device = resolve_device(base.device)
    setup = setup_of(base)
    dev = device_info(device)
    vers = _versions_with_commit()
    path = os.path.join(out, RESULTS)
    plan = planned_runs(methods, epochs, seeds)
    results = _open_results(out, setup, dev, vers, resume)
    session = _start_session(results, methods, plan, command, dev, vers)
    done = trained_keys(results)
    todo = [p for p in plan if run_key(*p) not in done]
    os.makedirs(out, exist_ok=True)
    if not todo:
        log(f"all {len(plan)} runs are already in {path}")
        _write_json(path, results)
        write_report(out, results)
        return results

    def out_of_time(i: int) -> bool:
        return stop_after > 0 and _out_of_time(time.perf_counter() - t_start, stop_after, results, todo, i, log)

    for i, (method, n_epochs, seed) in enumerate(todo):
        if out_of_time(i):
            break
        if i == 0:  # data and warm-up only once a run will start
            data = _load_bench_data(base, log) if data is None else data
            _warm_up(base, data, dict.fromkeys(m for m, _, _ in todo), out, session, log)
            if out_of_time(i):  # loading and warm-up took time too
                break
        _run_into(results, path, base, data, method, n_epochs, seed, out, log)

    _write_json(path, results)
    report, png = write_report(out, results)
    log(f"wrote {path}, {report}, {png}, {os.path.join(out, MIXING)}")
    return results


# ----------------------------------------------------------------------------------------------
# CLI


def cmd_bench(args):
    methods = parse_methods(args.methods)
    epochs = parse_epochs(args.epoch_list)
    seeds = parse_seeds(args.seeds)
    if args.stop_after < 0:
        raise MixtrainError(f"--stop-after must be >= 0 seconds, got {args.stop_after}")
    base = config_from_args(args, method=split_method(methods[0])[0], epochs=epochs[0], seed=seeds[0], out=args.bench_out,
                            resume=False)
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["mixtrain", *argv])
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if devices:
        return _bench_on_devices(args, argv, command, devices, seeds)
    results = run_bench(base, methods, epochs, seeds, args.bench_out, command, args.bench_resume, args.stop_after)
    missing = missing_runs(results)
    if missing:
        print(f"{len(missing)} runs still missing; continue with the same command plus --resume", flush=True)
    diverged = [d["key"] for d in results.get("diverged", [])]
    if diverged:
        print(f"{len(diverged)} run(s) diverged and are left out of the means: {', '.join(diverged)}", flush=True)


def trained_keys(results: dict) -> set[str]:
    """The keys of the runs a bench has trained: finished ones and diverged ones."""
    return {r["key"] for r in results.get("runs", []) + results.get("diverged", [])}


def missing_runs(results: dict) -> list[str]:
    """The keys of the runs a bench planned and has not trained yet."""
    done = trained_keys(results)
    return [k for k in results.get("planned", []) if k not in done]


def _bench_on_devices(args, argv: list[str], command: str, devices: list[str], seeds: list[int]):
    """``--devices``: one bench process per device (:mod:`mixtrain.bench_devices`), then the parts
    merged into OUT's results and report, also when a device failed or stopped early."""
    from .bench_devices import check_continuable, layout_of, part_dir, run_on_devices

    out = args.bench_out
    layout = layout_of(devices, seeds)
    before = check_continuable(out, layout, args.bench_resume) or {}
    failed = run_on_devices(argv, out, layout)
    problems = ["the bench failed on " + "; ".join(failed)] if failed else []
    folders = [part_dir(out, name) for name in layout]
    done = {f: load_results(f) for f in folders if os.path.exists(os.path.join(f, RESULTS))}
    try:
        if done:
            merged = merge_results(done)
            merged["devices_commands"] = before.get("devices_commands", []) + [command]
            merged["devices"] = layout
            _write_json(os.path.join(out, RESULTS), merged)
            report, _ = write_report(out, merged)
            missing = missing_runs(merged)
            print(f"merged {len(merged['runs'])} runs from {len(done)} devices into {report}"
                  + (f"; {len(missing)} runs still missing, continue with the same command plus --resume" if missing else ""),
                  flush=True)
    except MixtrainError as e:  # e.g. parts measured on different GPU models: say it with any failure
        problems.append(str(e))
    if problems:
        raise MixtrainError("; ".join(problems))


def merge_results(parts: dict[str, dict]) -> dict:
    """One bench of the benches ``parts`` (folder -> results) that ran the same setup side by side,
    for instance one per GPU of a host: their runs, planned runs and sessions together. Their runs
    compare only when the setup, the device model and the torch version agree, and a run key may
    come from one part only."""
    for d, r in parts.items():
        if not r.get("sessions"):
            raise MixtrainError(f"cannot merge {d}: its {RESULTS} records no bench session (device, versions)")
    (first_dir, first), *rest = parts.items()
    then = first["sessions"][0]
    for d, r in rest:
        diffs = _diff(_setup_as_now(first.get("setup", {})), _setup_as_now(r.get("setup", {})), labels=(f"in {first_dir}", f"in {d}"))
        if diffs:
            raise MixtrainError(f"cannot merge {d} with {first_dir}: their setups differ: " + "; ".join(diffs))
        now = r["sessions"][0]
        for what, a, b in (("device", then["device"].get("name"), now["device"].get("name")),
                           ("torch version", then["versions"].get("torch"), now["versions"].get("torch"))):
            if a != b:
                raise MixtrainError(f"cannot merge {d} with {first_dir}: measured with {what} {b!r} and {a!r}; "
                                    "timings would not be comparable")
    owner: dict[str, str] = {}
    for d, r in parts.items():
        for run in r["runs"] + r.get("diverged", []):
            if run["key"] in owner:
                raise MixtrainError(f"cannot merge: run {run['key']} is in both {owner[run['key']]} and {d}")
            owner[run["key"]] = d
    merged = {k: v for k, v in first.items() if k not in ("methods", "planned", "sessions", "runs", "diverged")}
    for key in ("methods", "planned"):
        merged[key] = list(dict.fromkeys(x for r in parts.values() for x in r.get(key, [])))
    # each session remembers its part, so the report tells runs side by side from continuations
    merged["sessions"] = [{**s, "part": s.get("part", d)} for d, r in parts.items() for s in r["sessions"]]
    merged["runs"] = [run for r in parts.values() for run in r["runs"]]
    diverged = [run for r in parts.values() for run in r.get("diverged", [])]
    if diverged:
        merged["diverged"] = diverged
    return merged


def cmd_report(args):
    if args.merge:
        sources = [d.strip() for d in args.merge.split(",") if d.strip()]
        real = [os.path.realpath(d) for d in sources]
        if len(set(real)) < len(real):
            raise MixtrainError(f"--merge names a folder twice: {args.merge}")
        if len(sources) < 2:
            raise MixtrainError("--merge takes two or more bench folders, comma-separated")
        if os.path.exists(os.path.join(args.dir, RESULTS)):  # never over a bench, a part included
            raise MixtrainError(f"{os.path.join(args.dir, RESULTS)} already exists: merge into a new folder")
        merged = merge_results({d: load_results(d) for d in sources})
        os.makedirs(args.dir, exist_ok=True)
        _write_json(os.path.join(args.dir, RESULTS), merged)
        print(f"merged {len(merged['runs'])} runs of {len(sources)} benches into {os.path.join(args.dir, RESULTS)}")
    results = load_results(args.dir)
    report, png = write_report(args.dir, results)
    print(f"wrote {report}, {png} and {os.path.join(args.dir, MIXING)}")


def add_bench_commands(sub, fmt):
    b = sub.add_parser(
        "bench", help="time-to-accuracy benchmark: every method x epochs x seed, one process", formatter_class=fmt,
        description="Train every combination of --methods, --epochs and --seeds on the same data (loaded once, "
                    "kept on the device) after an untimed warm-up per method; writes OUT/results.json after "
                    "every run, then OUT/report.md, OUT/frontier.png and OUT/mixing.png. " + TIMING_NOTE)
    add_train_options(b, multi=True)
    g = b.add_argument_group("bench")
    g.add_argument("--methods", default="baseline,mixtrain", help=f"comma-separated methods ({METHODS})")
    g.add_argument("--epochs", dest="epoch_list", metavar="EPOCHS", default="10,20,30", help="comma-separated epoch budgets")
    g.add_argument("--seeds", metavar="N|LIST", default="3", help="number of seeds (3: seeds 0,1,2) or a comma-separated list")
    g.add_argument("--out", dest="bench_out", metavar="DIR", default="runs/bench", help="output folder")
    g.add_argument("--devices", metavar="LIST", default="",
                   help="run on several devices at once (e.g. cuda:0,cuda:1): the seeds are dealt out to them, one "
                        "bench process per device into OUT/parts/, merged into OUT when all finish (each speedup "
                        "still compares runs of one process); empty: one process on --device")
    g.add_argument("--resume", dest="bench_resume", action="store_true",
                   help="keep the runs already in OUT/results.json (same setup and device) and train the missing ones")
    g.add_argument("--stop-after", type=float, metavar="SECONDS", default=0.0,
                   help="seconds: start no run past this, nor one expected to overrun it (judged by the slowest "
                        "finished run of its method, or of any method before its first, scaled by epochs; data "
                        "loading and warm-up count); 0: no limit")
    b.set_defaults(progress="none")  # one line per run instead of per epoch
    add_debug_option(b)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="re-render OUT/report.md, OUT/frontier.png and OUT/mixing.png from OUT/results.json",
                       formatter_class=fmt, description="Rebuild a bench's report.md, frontier.png and mixing.png from its results.json "
                                   "(with --merge: from several benches' results.json, merged).")
    r.add_argument("dir", help="the bench's output folder (holding results.json)")
    r.add_argument("--merge", metavar="DIR,DIR,...", default="",
                   help="first merge these benches of the same setup, run side by side (e.g. one per GPU, each with "
                        "its own --seeds), into DIR/results.json")
    add_debug_option(r)
    r.set_defaults(func=cmd_report)
