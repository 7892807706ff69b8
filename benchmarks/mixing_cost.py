"""What does mixing cost per pass, against a plain pass?

Hardware: run on one NVIDIA H100 through the device tool (any CUDA GPU works; CPU for --smoke).
Versions: printed and saved with the results (torch, torchvision, timm, GPU, CUDA).

What it times, side by side in one process, on the same resident data:
1. Training epochs through mixtrain's own Trainer (planning, batching, augment+compose, forward,
   backward, optimizer, loss memory -- everything an epoch does; evaluation excluded), for
   - baseline: one sample per pass;
   - mixtrain with every sample mixed in pairs from the first epoch (rule all, warm-up 0), so
     every pass is a composite of 2 and the pass count halves.
   Reported: median seconds per epoch and per pass over epochs 2..E (epoch 1 holds cuDNN autotuning
   and compilation), and the per-pass cost of mixing = (s/pass mixed) / (s/pass plain) - 1.
2. Step time of one fixed batch (CUDA events, median of repeats): plain pass vs mixed pass, and the
   augment+compose op alone for K=1 and K=2.
Data: synthetic uint8 images of CIFAR-10's shape (content does not change the cost), or --data.

    python benchmarks/mixing_cost.py --out DIR [--compile both] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _timing helper
from _timing import median_ms  # noqa: E402


def synthetic(n: int, size: int, classes: int = 10, seed: int = 0):
    from mixtrain.data import TensorData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    xt = torch.randint(0, 256, (1000, 3, size, size), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, classes, (1000,), generator=g)
    return TensorData("synthetic", x, y, xt, yt, classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def epoch_times(data, method, compile_, args, out, graph="auto"):
    from mixtrain.strategies import MixOptions
    from mixtrain.trainer import TrainConfig, Trainer

    mix = MixOptions(warmup_epochs=0, rule="all")
    cfg = TrainConfig(
        data="synthetic", model=args.model, method=method, epochs=args.epochs, batch_size=args.batch_size,
        device=args.device, out=os.path.join(out, f"{method}-{'compiled' if compile_ else 'eager'}"),
        compile=compile_, cuda_graph=graph, progress="none", save_checkpoints=False, mix=mix,
    )
    m = Trainer(cfg, data=data).fit()
    log = m["epochs_log"][1:] if len(m["epochs_log"]) > 1 else m["epochs_log"]
    sec = statistics.median(r["seconds"] for r in log)
    passes = statistics.median(r["passes"] for r in log)
    return {"method": method, "compiled": compile_, "graph": graph, "epoch_seconds": sec, "passes_per_epoch": passes,
            "seconds_per_pass": sec / passes, "all_epoch_seconds": [r["seconds"] for r in m["epochs_log"]]}


def step_times(data, args, compile_):
    """Median time of one training step (fixed batch) for a plain and a mixed pass, eager and (on
    CUDA, without compile) replayed as a CUDA graph."""
    from mixtrain.batches import EpochBatches
    from mixtrain.strategies import MixOptions
    from mixtrain.trainer import TrainConfig, Trainer, resolve_device

    dev = resolve_device(args.device)
    res = {}
    for method in ("baseline", "mixtrain"):
        cfg = TrainConfig(data="synthetic", model=args.model, method=method, epochs=1, batch_size=args.batch_size,
                          device=args.device, out="/tmp/mixing_cost_step", compile=compile_, progress="none",
                          save_checkpoints=False, mix=MixOptions(warmup_epochs=0, rule="all"))
        tr = Trainer(cfg, data=data)
        plan = tr.strategy.plan_epoch(0, np.random.default_rng(0))
        eb = EpochBatches(plan, cfg.batch_size, tr.grid, dev, torch.Generator().manual_seed(0),
                          image_size=tr.image_hw, augment=tr.augment, blend=tr.strategy.blend)
        batch = eb.batch(0)
        labels = data.train_y
        source = (data.train_x, None)

        def step():
            x = tr._images(batch, source)
            tr._train_step(batch, x, labels)

        def comp():
            tr._images(batch, source)

        r = {"step_ms": median_ms(step, dev, args.repeats), "compose_ms": median_ms(comp, dev, args.repeats)}
        if dev.type == "cuda" and not compile_:
            tr._capture(batch, 0.01)
            if tr.graphed is not None:
                r["graph_step_ms"] = median_ms(lambda: tr.graphed.step(batch, 0.01), dev, args.repeats)
                tr.graphed.release()
        res[method] = r
    res["mixing_cost_per_pass"] = res["mixtrain"]["step_ms"] / res["baseline"]["step_ms"] - 1
    if "graph_step_ms" in res["baseline"] and "graph_step_ms" in res["mixtrain"]:
        res["graph_mixing_cost_per_pass"] = res["mixtrain"]["graph_step_ms"] / res["baseline"]["graph_step_ms"] - 1
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="synthetic (CIFAR-10 shaped) or a mixtrain --data spec")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-train", type=int, default=50000, help="synthetic training images")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/mixing_cost")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_train, args.batch_size, args.epochs, args.repeats, args.model = 512, 64, 2, 2, "digitnet"
    from mixtrain.data import load_data
    from mixtrain.trainer import versions

    data = synthetic(args.num_train, 16 if args.smoke else 32) if args.data == "synthetic" else load_data(args.data)
    if args.smoke:
        data.train_x = data.train_x[:, :1].contiguous()
        data.test_x = data.test_x[:, :1].contiguous()
        data.mean, data.std = (0.5,), (0.25,)
    os.makedirs(args.out, exist_ok=True)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {"versions": versions(), "args": vars(args), "epochs": [], "steps": {}}
    for c in variants:
        for graph in (["off", "auto"] if not c else ["off"]):
            for method in ("baseline", "mixtrain"):
                r = epoch_times(data, method, c, args, os.path.join(args.out, f"graph-{graph}"), graph)
                results["epochs"].append(r)
                print(json.dumps(r), flush=True)
        results["steps"]["compiled" if c else "eager"] = step_times(data, args, c)
        print(json.dumps(results["steps"]), flush=True)
    lines = ["| variant | CUDA graph | method | s/epoch | passes/epoch | us/pass | mixing cost per pass |", "|---|---|---|---|---|---|---|"]
    for c in variants:
        for graph in ("off", "auto"):
            rows = [r for r in results["epochs"] if r["compiled"] == c and r["graph"] == graph]
            if not rows:
                continue
            base = next(r for r in rows if r["method"] == "baseline")
            for r in rows:
                cost = r["seconds_per_pass"] / base["seconds_per_pass"] - 1
                lines.append(f"| {'compiled' if c else 'eager'} | {graph} | {r['method']} | {r['epoch_seconds']:.3f} | "
                             f"{r['passes_per_epoch']:.0f} | {1e6 * r['seconds_per_pass']:.1f} | {cost:+.1%} |")
    lines += ["", "| variant | plain step ms | mixed step ms | step cost | graphed plain ms | graphed mixed ms | graphed cost | compose K=1 ms | compose K=2 ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, s in results["steps"].items():
        gb, gm = s["baseline"].get("graph_step_ms"), s["mixtrain"].get("graph_step_ms")
        gc = s.get("graph_mixing_cost_per_pass")
        lines.append(f"| {name} | {s['baseline']['step_ms']:.3f} | {s['mixtrain']['step_ms']:.3f} | {s['mixing_cost_per_pass']:+.1%} | "
                     f"{gb if gb is None else f'{gb:.3f}'} | {gm if gm is None else f'{gm:.3f}'} | {gc if gc is None else f'{gc:+.1%}'} | "
                     f"{s['baseline']['compose_ms']:.3f} | {s['mixtrain']['compose_ms']:.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "mixing_cost.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "mixing_cost.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
