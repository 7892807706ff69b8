"""Images per second of the folder streaming path at 224 px: does loading starve the GPU?

Hardware: written for one NVIDIA H100 80GB GPU with 16 CPU cores (the DataLoader workers decode on
those cores). Versions: recorded in ``folder_throughput.json`` (``versions``).

It writes a synthetic ImageNet-style folder (``--images`` JPEGs of ``--source-size`` pixels with
smooth random content plus noise, so files have a realistic size and decode cost) to a temporary
directory, or reads ``--folder DIR``. Then, for each plan and worker count, it times whole epochs
exactly as the trainer runs them: a new :class:`mixtrain.stream.FolderStream` per epoch (DataLoader
with workers and pinned memory, decode + random-resized-crop to ``--size`` in the workers, in plan
order), the copy to the device, and augment + compose on the device. Three modes:

* ``load``: the stream and compose only, no model -- what the input pipeline can deliver;
* ``model``: the training step only (forward, separated loss, backward, SGD step; bf16 autocast and
  channels-last on CUDA) on images already on the device -- what the GPU can consume;
* ``load+model``: both, as in training.

If ``load+model`` runs clearly below ``model``, loading starves the GPU. Plans: ``baseline`` (one
sample per pass) and ``mixed`` (every sample mixed in pairs: two decoded images per pass, the
loader's worst case). Rates are samples/s (images decoded and trained on) and passes/s (network
passes); the first epoch of each measurement is untimed (worker start-up is still timed in the
later epochs, as the trainer starts workers every epoch).

    python benchmarks/folder_throughput.py --images 8192 --workers 8,15 --out results/folder
    python benchmarks/folder_throughput.py --smoke --out /tmp/folder-smoke    # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from mixtrain.batches import EpochBatches  # noqa: E402
from mixtrain.compose import Augment, Normalizer  # noqa: E402
from mixtrain.data import FolderData  # noqa: E402
from mixtrain.loss import separated_loss  # noqa: E402
from mixtrain.models import adapt, create_model  # noqa: E402
from mixtrain.strategies import MixOptions, MixTrain, Strategy  # noqa: E402
from mixtrain.stream import FolderStream  # noqa: E402
from mixtrain.trainer import resolve_device, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", default="", help="an existing folder (train/<class>/*, val/<class>/*); default: generate one")
    p.add_argument("--images", type=int, default=8192, help="training images to generate")
    p.add_argument("--classes", type=int, default=100, help="classes to generate")
    p.add_argument("--source-size", type=int, default=256, help="generated JPEGs are this many pixels square")
    p.add_argument("--size", type=int, default=224, help="training resolution (random-resized-crop in the workers)")
    p.add_argument("--model", default="resnet50_224", help="model for the model step (any --model name)")
    p.add_argument("--batch-size", type=int, default=256, help="passes per step")
    p.add_argument("--workers", default="8", help="comma-separated DataLoader worker counts")
    p.add_argument("--plans", default="baseline,mixed", help="baseline (1 sample per pass), mixed (2 per pass)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is untimed)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default="results/folder_throughput", help="output folder")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: 48 images of 48 px, size 32, digitnet, batch 8, workers 0,2, 2 epochs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# the synthetic folder


def _write_images(job):
    root, names, size, seed = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    for path in names:
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0.0, 12.0, img.shape)  # texture: JPEG size and decode cost like photographs
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, path), quality=90)
    return len(names)


def generate_folder(root: str, images: int, classes: int, size: int) -> dict:
    """``images`` training JPEGs (and a small val split) over ``classes`` class folders."""
    t0 = time.perf_counter()
    paths = []
    for split, n in (("train", images), ("val", max(classes, images // 50))):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c:04d}"), exist_ok=True)
        paths += [os.path.join(split, f"c{i % classes:04d}", f"{i:07d}.jpg") for i in range(n)]
    procs = max(1, min(16, os.cpu_count() or 1, len(paths) // 200))  # no pool for a handful
    chunks = [paths[i::procs] for i in range(procs)]
    jobs = [(root, chunk, size, i) for i, chunk in enumerate(chunks) if chunk]
    if procs > 1:
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_images, jobs))
    else:
        for job in jobs:
            _write_images(job)
    train_bytes = sum(os.path.getsize(os.path.join(root, p)) for p in paths if p.startswith("train"))
    return {"images": images, "classes": classes, "source_size": size, "seconds": time.perf_counter() - t0,
            "mean_jpeg_kb": train_bytes / images / 1024}


# ----------------------------------------------------------------------------------------------
# the measurement


class Step:
    """The trainer's step: forward with region pooling, separated loss, backward, SGD step."""

    def __init__(self, model_name: str, num_classes: int, size: int, device: torch.device):
        torch.manual_seed(0)
        self.model = adapt(create_model(model_name, num_classes, 3, size), size).to(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.grid = self.model.grid

    def __call__(self, batch, x, labels):
        with torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.model(x, batch.pool_masks() if batch.index.shape[1] > 1 else None)
            if logits.ndim == 2:
                logits = logits[:, None]
        loss, _ = separated_loss(logits, labels[batch.index], batch.valid)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def make_plan(kind: str, n: int, grid, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "baseline":
        return Strategy(n, grid, 1).plan_epoch(0, rng)
    return MixTrain(n, grid, 1, "cpu", MixOptions(rule="all", warmup_epochs=0, final_unmixed_epochs=0)).plan_epoch(0, rng)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(data, step, plan_kind, mode, workers, batch_size, epochs, device) -> dict:
    """Time ``epochs`` epochs of one mode; the first is untimed."""
    norm = Normalizer(data.mean, data.std, device)
    augment = Augment(pad=0, flip=True)
    labels = data.train_y
    resident = None
    if mode == "model":  # images already on the device: 2 per pass covers any plan
        g = torch.Generator().manual_seed(0)
        resident = torch.randint(0, 256, (2 * batch_size, 3, data.size, data.size), dtype=torch.uint8, generator=g).to(device)
    timed = []
    samples = passes = 0
    for epoch in range(epochs):
        plan = make_plan(plan_kind, data.num_train, step.grid, epoch)
        batches = EpochBatches(plan, batch_size, step.grid, device, torch.Generator().manual_seed(epoch),
                               image_size=(data.size, data.size), augment=augment)
        sync(device)
        t0 = time.perf_counter()
        stream = FolderStream(data, batches, device, workers) if mode != "model" else None
        for j in range(len(batches)):
            batch = batches.batch(j)
            if stream is not None:
                images, src = stream.get(j)
            else:
                images, src = resident, torch.arange(batch.index.numel(), device=device).view_as(batch.index) % len(resident)
            x = batch.compose(images, norm, src)
            if mode != "load":
                step(batch, x, labels)
        sync(device)
        if epoch > 0 or epochs == 1:
            timed.append(time.perf_counter() - t0)
            samples += plan.samples
            passes += plan.passes
    seconds = sum(timed)
    return {"plan": plan_kind, "mode": mode, "workers": workers if mode != "model" else None,
            "epochs_timed": len(timed), "seconds": seconds, "samples_per_s": samples / seconds,
            "passes_per_s": passes / seconds}


def markdown(rows, session) -> str:
    lines = [
        f"# Folder streaming throughput ({session['device']}, {session['model']}, {session['size']} px, "
        f"batch {session['batch_size']})",
        "",
        f"Folder: {session['folder']}. Samples/s = images decoded and trained on; passes/s = network passes. "
        "load = FolderStream + copy + compose; model = training step on resident images; "
        "load+model = training as the trainer runs it. Versions: " + json.dumps(session["versions"]) + ".",
        "",
        "| plan | mode | workers | samples/s | passes/s | of model-only |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = f"{r['of_model']:.0%}" if r.get("of_model") is not None else "–"
        w = "–" if r["workers"] is None else r["workers"]
        lines.append(f"| {r['plan']} | {r['mode']} | {w} | {r['samples_per_s']:,.0f} | {r['passes_per_s']:,.0f} | {frac} |")
    lines += ["", "A load+model rate well below 100% of model-only means loading starves the GPU."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.images, args.classes, args.source_size, args.size = 48, 4, 48, 32
        args.model, args.batch_size, args.workers, args.epochs, args.device = "digitnet", 8, "0,2", 2, "cpu"
    device = resolve_device(args.device)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    tmp = None
    folder_info = {"folder": args.folder}
    if not args.folder:
        tmp = tempfile.TemporaryDirectory(prefix="mixtrain-folder-")
        folder_info = generate_folder(tmp.name, args.images, args.classes, args.source_size)
        folder_info["folder"] = f"synthetic ({args.images} JPEGs, {args.source_size} px, "  \
                                f"{folder_info['mean_jpeg_kb']:.0f} KB mean, generated in {folder_info['seconds']:.0f} s)"
        print(folder_info["folder"], flush=True)
    try:
        data = FolderData("folder", args.folder or tmp.name, args.size, workers[0]).to(device)
        step = Step(args.model, data.num_classes, args.size, device)
        rows = []
        for plan in plans:
            ceiling = measure(data, step, plan, "model", 0, args.batch_size, args.epochs, device)
            rows.append(ceiling)
            print(f"{plan:8s} model       {ceiling['samples_per_s']:9,.0f} samples/s", flush=True)
            for w in workers:
                for mode in ("load", "load+model"):
                    r = measure(data, step, plan, mode, w, args.batch_size, args.epochs, device)
                    r["of_model"] = r["passes_per_s"] / ceiling["passes_per_s"] if mode == "load+model" else None
                    rows.append(r)
                    print(f"{plan:8s} {mode:11s} {w:2d} workers {r['samples_per_s']:9,.0f} samples/s", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    session = {"benchmark": "folder_throughput", "device": str(device), "model": args.model, "size": args.size,
               "batch_size": args.batch_size, "epochs": args.epochs, "workers": workers, "folder": folder_info["folder"],
               "generated": folder_info if tmp is not None else None, "versions": versions(),
               "cpu_count": os.cpu_count()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "folder_throughput.json"), "w") as f:
        json.dump({**session, "rows": rows}, f, indent=2)
    text = markdown(rows, session)
    with open(os.path.join(args.out, "folder_throughput.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
