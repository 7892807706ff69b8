"""Where does a mixed step spend its extra GPU time? Kernel time per operator, method vs baseline.

Hardware: run on one NVIDIA H100 through the device tool (any CUDA GPU; ``--smoke`` runs a tiny CPU
check of the script, whose CPU "device time" is empty).
Versions: printed and saved with the results.

What it measures: one fixed training batch per variant (the variants of ``mixing_cost.py``:
baseline, pairs, quads, four-slot unmixed), built through mixtrain's own Trainer, stepped eagerly
(``Trainer.step`` after ``Batch.compose``: compose, forward, loss, backward, clipping,
optimizer, loss memory) under ``torch.profiler`` for ``--steps`` steps after ``--warmup`` untimed
ones. Reported: GPU kernel time per step, summed per aten operator (each operator's own kernels),
and per operator the difference to the baseline's step. Kernel time is what a CUDA-graph replay
of the same step costs on the GPU (replay removes the host's launch gaps, not the kernels), so the
differences say which operators make a mixed pass dearer than a plain one. Also the graphed step's
time (CUDA events, median of repeats) as the cross-check.

    python benchmarks/step_profile.py --out DIR [--variants baseline,pairs,quads,k4-unmixed] [--top 25]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402
from mixing_cost import VARIANTS, first_batch, make_trainer, synthetic_for, variant_config  # noqa: E402


def kernel_time_per_op(tr, batch, data, steps: int, warmup: int) -> dict[str, float]:
    """Microseconds of GPU kernel time per step, by the aten operator that launched the kernels
    (on the CPU, for the smoke run: each operator's own CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        x = batch.compose(data.train_x, tr.normalize)
        tr.step(batch, x)

    for _ in range(warmup):
        step()
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
    per_op = defaultdict(float)
    on_gpu = tr.device.type == "cuda"
    for e in prof.key_averages():
        t = (getattr(e, "self_device_time_total", 0.0) if on_gpu else e.self_cpu_time_total) or 0.0
        if t > 0 and e.key.startswith("aten::"):
            per_op[e.key] += t / steps
    return dict(per_op)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--num-train", type=int, default=8192, help="synthetic training images (CIFAR-10 shaped)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--top", type=int, default=25, help="operators listed, by largest difference to the baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/step_profile")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    args = p.parse_args(argv)
    args.epochs = 2
    if args.smoke:
        args.num_train, args.batch_size, args.steps, args.warmup, args.repeats, args.model = 256, 32, 2, 1, 1, "digitnet"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        variant_config(v, args.epochs)
    if "baseline" not in names:
        names.insert(0, "baseline")
    from mixtrain.trainer import versions

    data = synthetic_for(args)
    os.makedirs(args.out, exist_ok=True)
    res = {"versions": versions(), "args": vars(args),
           "command": " ".join(["python3", "benchmarks/step_profile.py", *(argv if argv is not None else sys.argv[1:])]),
           "ops_us": {}, "graph_step_ms": {}, "samples_per_pass": {}}
    for v in names:
        tr = make_trainer(data, v, False, args, os.path.join("/tmp/step_profile", v), epochs=2)
        batch = first_batch(tr, args.batch_size)
        res["samples_per_pass"][v] = batch.samples / args.batch_size
        res["ops_us"][v] = kernel_time_per_op(tr, batch, data, args.steps, args.warmup)
        if tr.device.type == "cuda":
            tr.capture_graph(batch, 0.01, data.train_x)
            if tr.graphed is not None:
                res["graph_step_ms"][v] = median_ms(lambda: tr.graphed.step(batch, 0.01), tr.device, args.repeats)
                tr.graphed.release()
        print(v, f"{sum(res['ops_us'][v].values()):.0f} us per step", res["graph_step_ms"].get(v), flush=True)

    base = res["ops_us"]["baseline"]
    total_b = sum(base.values())
    lines = [f"Command: `{res['command']}`; device: {res['versions'].get('gpu') or res['versions'].get('cpu')}; "
             f"torch {res['versions'].get('torch')}. {'GPU kernel' if res['versions'].get('gpu') else 'CPU'} time per training step (eager, profiled), by aten operator.", "",
             "| variant | samples/pass | kernel us/step | vs baseline | graphed step ms | vs baseline |", "|---|---:|---:|---:|---:|---:|"]
    gb = res["graph_step_ms"].get("baseline")
    for v in names:
        tot = sum(res["ops_us"][v].values())
        g = res["graph_step_ms"].get(v)
        gcell = "-" if g is None else f"{g:.3f}"
        gcost = "-" if g is None or not gb else f"{g / gb - 1:+.1%}"
        kcost = f"{tot / total_b - 1:+.1%}" if total_b else "-"
        lines.append(f"| {v} | {res['samples_per_pass'][v]:.2f} | {tot:.0f} | {kcost} | {gcell} | {gcost} |")
    for v in names:
        if v == "baseline":
            continue
        ops = res["ops_us"][v]
        keys = set(ops) | set(base)
        diff = sorted(((ops.get(k, 0.0) - base.get(k, 0.0), k) for k in keys), key=lambda t: -abs(t[0]))
        lines += ["", f"**{v}** minus baseline, largest differences (us of kernel time per step):", "",
                  "| operator | baseline us | variant us | difference us |", "|---|---:|---:|---:|"]
        for d, k in diff[: args.top]:
            lines.append(f"| `{k}` | {base.get(k, 0.0):.1f} | {ops.get(k, 0.0):.1f} | {d:+.1f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "step_profile.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.out, "step_profile.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    main()
