"""How long does training wait for a checkpoint?

Hardware: any; the committed result is from the project's development machine (2 CPU cores, no
GPU). Versions: saved with the results (Python, torch, torchvision, timm; GPU and CUDA where used).

What it times: for a model (ResNet-18 for CIFAR by default) and its SGD state after one step, the
trainer's own ``Trainer.save_checkpoint`` -- the finite-weights check, the state dict and its host copy,
then the hand-off to the background writer -- i.e. how long the training loop is blocked
("blocked ms"), and how long until the file is complete on disk ("written ms": the same plus
``CheckpointWriter.wait``). Median over --repeats saves into a temporary folder. Before the
background writer, training was blocked for the whole write.

    python benchmarks/checkpoint_cost.py --out DIR [--model resnet18] [--device auto] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/checkpoint_cost")
    args = p.parse_args(argv)

    from mixtrain import TrainConfig, Trainer
    from mixtrain.data import TensorData
    from mixtrain.trainer import versions

    g = torch.Generator().manual_seed(0)
    size = 16 if args.model == "digitnet" else 32
    channels = 1 if args.model == "digitnet" else 3
    x = torch.randint(0, 256, (256, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    data = TensorData("synthetic", x, y, x[:32], y[:32], 10, mean=(0.5,) * channels, std=(0.25,) * channels)
    with tempfile.TemporaryDirectory() as folder:
        cfg = TrainConfig(data="synthetic", model=args.model, method="mixtrain", epochs=1, batch_size=32,
                          device=args.device, out=folder, progress="none")
        tr = Trainer(cfg, data)
        for q in tr.model.parameters():  # one optimizer step, so the momentum buffers exist
            q.grad = torch.zeros_like(q)
        tr.optimizer.step()
        blocked, written = [], []
        for i in range(args.repeats):
            tr.sync()
            t0 = time.perf_counter()
            tr.save_checkpoint(f"repeat {i}")
            t1 = time.perf_counter()
            tr.checkpoints.wait()
            t2 = time.perf_counter()
            blocked.append((t1 - t0) * 1000)
            written.append((t2 - t0) * 1000)
        size_mb = os.path.getsize(tr.ckpt_path) / 1e6
    result = {
        "command": " ".join(["python3", "benchmarks/checkpoint_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(tr.device), "versions": versions(), "model": args.model, "checkpoint_mb": size_mb,
        "blocked_ms": blocked, "written_ms": written,
        "blocked_ms_median": statistics.median(blocked), "written_ms_median": statistics.median(written),
    }
    table = (f"Command: `{result['command']}`; device: {result['device']} "
             f"({result['versions'].get('gpu') or result['versions'].get('cpu')}); torch {result['versions']['torch']}.\n\n"
             "| model | checkpoint MB | training blocked ms (median) | written ms (median) | repeats |\n"
             "|---|---:|---:|---:|---:|\n"
             f"| {args.model} | {size_mb:.0f} | {result['blocked_ms_median']:.0f} | {result['written_ms_median']:.0f} | {args.repeats} |\n")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "checkpoint_cost.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "checkpoint_cost.md"), "w") as f:
        f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
