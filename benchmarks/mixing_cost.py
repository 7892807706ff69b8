"""What does mixing cost per pass, against a plain pass?

Hardware: run on one NVIDIA H100 through the device tool (any CUDA GPU works; CPU for --smoke).
Versions: printed and saved with the results (torch, torchvision, timm, GPU, CUDA).

What it times, side by side in one process, on the same resident data, for these variants:
- ``baseline``: one sample per pass (K = 1 slot);
- ``pairs``: mixtrain with every sample in pairs from the first epoch (rule all, warm-up 0,
  quads off: K = 2), so the pass count halves;
- ``quads``: mixtrain with every sample in quads (K = 4, each constituent downscaled into its
  quadrant), so the pass count quarters. The loss memory is made to read "confidently right" for
  every sample, so each epoch plans quads whatever the synthetic data's losses are (this measures
  cost, not learning);
- ``k4-unmixed``: mixtrain with quads on but never mixing (warm-up covers the schedule): one
  sample per pass carried in four slots, as in the default's unmixed warm-up and final epochs.

1. Training epochs through mixtrain's own Trainer (planning, batching, augment+compose, forward,
   backward, optimizer, loss memory -- everything an epoch does; evaluation excluded). Reported:
   median seconds per epoch and per pass over epochs 2..E (epoch 1 holds cuDNN autotuning and
   graph capture), and the per-pass cost = (s/pass of the variant) / (s/pass of the baseline) - 1.
2. Epoch set-up: the host-side planning plus the batch layout of one epoch (``plan_epoch`` +
   ``EpochBatches``, device-synchronised), median of repeats. The GPU waits for it at every epoch
   boundary, so it weighs more in the shorter mixed epochs.
3. Step time of one fixed batch (CUDA events, median of repeats): eager and replayed as a CUDA
   graph, and the augment+compose op alone.
Data: synthetic uint8 images of CIFAR-10's shape (content does not change the cost), or --data.

    python benchmarks/mixing_cost.py --out DIR [--compile both] [--epochs 4] [--variants baseline,pairs,quads,k4-unmixed]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _timing helper
from _timing import median_ms  # noqa: E402

VARIANTS = ("baseline", "pairs", "quads", "k4-unmixed")


def variant_config(variant: str, epochs: int):
    """(method, MixOptions, force_quads) of a variant."""
    from mixtrain.strategies import MixOptions

    if variant == "baseline":
        return "baseline", MixOptions(), False
    if variant == "pairs":
        return "mixtrain", MixOptions(first_unmixed_epochs=0, final_unmixed_epochs=0, rule="all", quad_confidence=0.0), False
    if variant == "quads":
        return "mixtrain", MixOptions(first_unmixed_epochs=0, final_unmixed_epochs=0, rule="all", quad_confidence=0.9), True
    if variant == "k4-unmixed":
        return "mixtrain", MixOptions(first_unmixed_epochs=epochs, final_unmixed_epochs=0, quad_confidence=0.9), False
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def force_quads(trainer):
    """Make the loss memory read 'right with p(true) = 1' for every sample: every epoch plans quads."""
    n = trainer.data.num_train
    trainer.strategy.memory.snapshot = lambda: (np.zeros(n, np.float32), np.ones(n, bool))


def make_trainer(data, variant, compile_, args, out, graph="auto", epochs=None):
    from mixtrain.trainer import TrainConfig, Trainer

    epochs = epochs or args.epochs
    method, mix, quads = variant_config(variant, epochs)
    cfg = TrainConfig(
        data="synthetic", model=args.model, method=method, epochs=epochs, batch_size=args.batch_size,
        device=args.device, out=out, compile=compile_, cuda_graph=graph, progress="none",
        save_checkpoints=False, mix=mix,
    )
    tr = Trainer(cfg, data=data)
    if quads:
        force_quads(tr)
    return tr


def synthetic(n: int, size: int, classes: int = 10, seed: int = 0):
    from mixtrain.data import TensorData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    xt = torch.randint(0, 256, (1000, 3, size, size), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, classes, (1000,), generator=g)
    return TensorData("synthetic", x, y, xt, yt, classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def synthetic_for(args):
    """The synthetic data of a run: CIFAR-10 shaped, or for ``--smoke`` 16 px single-channel (the
    digitnet's input), so the CPU check is quick."""
    data = synthetic(args.num_train, 16 if args.smoke else 32)
    if args.smoke:
        data.train_x = data.train_x[:, :1].contiguous()
        data.test_x = data.test_x[:, :1].contiguous()
        data.mean, data.std = (0.5,), (0.25,)
    return data


def first_batch(tr, batch_size: int):
    """The first batch of the trainer's strategy's epoch-0 plan (fixed seeds), on its device."""
    from mixtrain.batches import EpochBatches

    plan = tr.strategy.plan_epoch(0, np.random.default_rng(0))
    eb = EpochBatches(plan, batch_size, tr.grid, tr.device, torch.Generator().manual_seed(0),
                      image_size=tr.image_hw, augment=tr.augment, blend=tr.strategy.blend)
    return eb.batch(0)


def epoch_times(data, variant, compile_, args, out, graph="auto"):
    tr = make_trainer(data, variant, compile_, args, os.path.join(out, f"{variant}-{'compiled' if compile_ else 'eager'}"), graph)
    m = tr.fit()
    log = m["epochs_log"][1:] if len(m["epochs_log"]) > 1 else m["epochs_log"]
    sec = statistics.median(r["seconds"] for r in log)
    passes = statistics.median(r["passes"] for r in log)
    return {"variant": variant, "method": m["method"], "slots": tr.strategy.slots, "compiled": compile_, "graph": graph,
            "cuda_graph_used": m["cuda_graph"], "epoch_seconds": sec, "passes_per_epoch": passes,
            "seconds_per_pass": sec / passes, "all_epoch_seconds": [r["seconds"] for r in m["epochs_log"]]}


def epoch_setup_ms(data, variant, args) -> float:
    """Median milliseconds to plan one (mixed, where the variant mixes) epoch and lay out its batches."""
    from mixtrain.batches import EpochBatches

    tr = make_trainer(data, variant, False, args, "/tmp/mixing_cost_setup", "off", epochs=2)
    dev = tr.device
    times = []
    for r in range(args.repeats):
        tr.sync()
        t = time.perf_counter()
        plan = tr.strategy.plan_epoch(1 if variant == "k4-unmixed" else 0, np.random.default_rng(r))
        EpochBatches(plan, args.batch_size, tr.grid, dev, torch.Generator().manual_seed(r),
                     image_size=tr.image_hw, augment=tr.augment, blend=tr.strategy.blend)
        tr.sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def step_times(data, args, compile_, variants):
    """Median time of one training step (fixed batch) per variant, eager and (on CUDA, without
    compile) replayed as a CUDA graph, and of the augment+compose op alone."""
    res = {}
    for variant in variants:
        tr = make_trainer(data, variant, compile_, args, "/tmp/mixing_cost_step", epochs=2)
        dev = tr.device
        batch = first_batch(tr, args.batch_size)

        def step():
            x = batch.compose(data.train_x, tr.normalize)
            tr.step(batch, x)

        def comp():
            batch.compose(data.train_x, tr.normalize)

        r = {"slots": tr.strategy.slots, "samples_per_pass": batch.samples / args.batch_size,
             "step_ms": median_ms(step, dev, args.repeats), "compose_ms": median_ms(comp, dev, args.repeats)}
        if dev.type == "cuda" and not compile_:
            tr.capture_graph(batch, 0.01, data.train_x)
            if tr.graphed is not None:
                r["graph_step_ms"] = median_ms(lambda: tr.graphed.step(batch, 0.01), dev, args.repeats)
                tr.graphed.release()
        res[variant] = r
    base = res.get("baseline")
    if base:
        for variant, r in res.items():
            r["step_cost"] = r["step_ms"] / base["step_ms"] - 1
            if "graph_step_ms" in r and "graph_step_ms" in base:
                r["graph_step_cost"] = r["graph_step_ms"] / base["graph_step_ms"] - 1
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
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_train, args.batch_size, args.epochs, args.repeats, args.model = 512, 64, 2, 2, "digitnet"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        variant_config(v, args.epochs)  # an unknown name stops here, before any work
    if "baseline" not in names:
        names.insert(0, "baseline")  # every cost is against it
    from mixtrain.data import load_data
    from mixtrain.trainer import versions

    data = synthetic_for(args) if args.data == "synthetic" else load_data(args.data)
    os.makedirs(args.out, exist_ok=True)
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {"versions": versions(), "args": vars(args), "command": " ".join(["python3", "benchmarks/mixing_cost.py", *(argv if argv is not None else sys.argv[1:])]),
               "epochs": [], "setup_ms": {}, "steps": {}}
    for c in compiled:
        for graph in (["off", "auto"] if not c else ["off"]):
            for v in names:
                r = epoch_times(data, v, c, args, os.path.join(args.out, f"graph-{graph}"), graph)
                results["epochs"].append(r)
                print(json.dumps(r), flush=True)
        results["steps"]["compiled" if c else "eager"] = step_times(data, args, c, names)
        print(json.dumps(results["steps"]), flush=True)
    for v in names:
        results["setup_ms"][v] = epoch_setup_ms(data, v, args)
    print(json.dumps(results["setup_ms"]), flush=True)

    lines = [f"Command: `{results['command']}`; device: {results['versions'].get('gpu') or results['versions'].get('cpu')}.", "",
             "| model | CUDA graph | variant | slots | s/epoch | passes/epoch | us/pass | cost per pass | epoch set-up ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in compiled:
        for graph in ("off", "auto"):
            rows = [r for r in results["epochs"] if r["compiled"] == c and r["graph"] == graph]
            if not rows:
                continue
            base = next(r for r in rows if r["variant"] == "baseline")
            for r in rows:
                cost = r["seconds_per_pass"] / base["seconds_per_pass"] - 1
                used = "on" if r["cuda_graph_used"] else "off"
                lines.append(f"| {'compiled' if c else 'eager'} | {graph} ({used}) | {r['variant']} | {r['slots']} | {r['epoch_seconds']:.3f} | "
                             f"{r['passes_per_epoch']:.0f} | {1e6 * r['seconds_per_pass']:.1f} | {cost:+.1%} | {results['setup_ms'][r['variant']]:.1f} |")
    lines += ["", "| model | variant | slots | samples/pass | step ms | step cost | graphed step ms | graphed cost | compose ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, steps in results["steps"].items():
        for v, r in steps.items():
            lines.append(f"| {name} | {v} | {r['slots']} | {r['samples_per_pass']:.2f} | {r['step_ms']:.3f} | {fmt(r.get('step_cost'), '+.1%')} | "
                         f"{fmt(r.get('graph_step_ms'), '.3f')} | {fmt(r.get('graph_step_cost'), '+.1%')} | {r['compose_ms']:.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "mixing_cost.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "mixing_cost.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    main()
