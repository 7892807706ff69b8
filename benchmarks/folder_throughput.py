"""ImageNet-scale throughput of the folder cache: how close does training from it come to the bare model?

Hardware: written for one NVIDIA H200 with 16 CPU cores and 64 GB of disk (the device tool);
versions and device in ``folder_throughput.json``.

1. Generates an ImageNet-style folder of ``--images`` JPEGs (sides 224-500 px, random aspect;
   smooth random content plus texture, quality 90, so files decode like photographs) on all
   cores, and times it.
2. Prepares the decoded cache at each ``--sizes`` (all cores), timing the build and reporting the
   cache's size on disk.
3. For each model and size:
   * ``bare``: the bare model's eager training step (bf16 autocast, channels-last, fused SGD) on
     one random batch already on the GPU, no mixtrain -- the GPU's floor, in images/s;
   * for ``--placement`` device (the cache resident on the GPU) and host (streamed from
     memory-mapped host memory, gathered ahead in pinned buffers, copied on a side stream), and for
     the baseline and for mixtrain: a real :class:`mixtrain.Trainer` run over the first
     ``--subset`` images for 3 epochs (epoch 1 unmixed, epochs 2-3 everything mixed in pairs:
     the loader's worst case, two images per pass), timing epoch 3 (the trainer's own epoch time:
     plan, batches, gathers, copies, steps as CUDA graphs). Rates: samples/s (images trained on)
     and passes/s (network passes).

Goals from the issue: streamed at least 90 % of resident, resident at least 90 % of the bare step.

    python benchmarks/folder_throughput.py --images 100000 --out R
    python benchmarks/folder_throughput.py --smoke --out /tmp/ft      # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402
from mixtrain.data import FolderData  # noqa: E402
from mixtrain.folder_cache import open_cache  # noqa: E402
from mixtrain.models import adapt, create_model  # noqa: E402
from mixtrain.strategies import MixOptions  # noqa: E402
from mixtrain.trainer import TrainConfig, Trainer, resolve_device, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", default="", help="an existing folder; default: generate one under --work")
    p.add_argument("--work", default="", help="where to generate the folder and caches (default: a temporary folder)")
    p.add_argument("--images", type=int, default=100_000, help="training JPEGs to generate")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--sizes", default="224,160", help="cache sizes = training resolutions")
    p.add_argument("--models", default="resnet50_224,resnet18_224")
    p.add_argument("--placements", default="device,host")
    p.add_argument("--methods", default="baseline,mixtrain")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--subset", type=int, default=256 * 40, help="training images per throughput run")
    p.add_argument("--device", default="auto")
    p.add_argument("--stop-after", type=float, default=540.0, help="start no measurement after this many seconds")
    p.add_argument("--out", default="results/folder_throughput")
    p.add_argument("--smoke", action="store_true", help="CPU: 48 images, size 32, digitnet, batch 8")
    return p.parse_args(argv)


def _write_images(job):
    from PIL import Image

    root, items, seed, learnable = job
    rng = np.random.default_rng(seed)
    texture = rng.normal(0.0, 10.0, (520, 520, 3)).astype(np.float32)
    for path, (h, w) in items:
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        if learnable:  # the class's own coarse pattern under per-image noise: a network can learn it
            label = int(os.path.basename(os.path.dirname(path))[1:])
            template = np.random.default_rng(10_000 + label).integers(0, 256, (6, 8, 3))
            coarse = np.clip(0.6 * template + 0.4 * coarse, 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        y, x = rng.integers(0, 520 - h + 1), rng.integers(0, 520 - w + 1)
        img += texture[y : y + h, x : x + w]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, path), quality=90)
    return len(items)


def generate_folder(root: str, images: int, classes: int, lo: int, hi: int, learnable: bool = False) -> dict:
    """Write train/ and val/ JPEGs (sides lo-hi px). ``learnable``: each class has its own coarse
    pattern (60 %) under random content (40 %), so that training learns and mixing has easy samples
    to mix; otherwise the content is random and a class label carries no information."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    items = []
    for split, n in (("train", images), ("val", max(classes, images // 50))):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"n{c:05d}"), exist_ok=True)
        sides = rng.integers(lo, hi + 1, (n, 2))
        items += [(os.path.join(split, f"n{i % classes:05d}", f"{i:07d}.JPEG"), tuple(sides[i])) for i in range(n)]
    procs = max(1, min(os.cpu_count() or 1, len(items) // 100))
    jobs = [(root, items[i::procs], i, learnable) for i in range(procs)]
    if procs > 1:
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_images, jobs))
    else:
        _write_images(jobs[0])
    size = sum(os.path.getsize(os.path.join(root, p)) for p, _ in items)
    return {"train_images": images, "val_images": len(items) - images, "classes": classes, "sides": [lo, hi],
            "learnable": learnable, "seconds": time.perf_counter() - t0, "jpeg_gb": size / 1e9, "processes": procs}


def bare_step(model_name: str, size: int, batch: int, classes: int, device) -> float:
    """Images/s of the bare model's eager step (bf16, channels-last, fused SGD) on one batch."""
    torch.manual_seed(0)
    model = adapt(create_model(model_name, classes, 3, size), size).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5, fused=cuda)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def step():
        xi = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(xi).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = median_ms(step, device, repeats=5, inner=10 if cuda else 2, warmup=5 if cuda else 1)
    return batch / ms * 1000


def trainer_rate(data, model: str, size: int, method: str, batch: int, device: str, out: str) -> dict:
    cfg = TrainConfig(data=data.name, model=model, image_size=size, method=method, epochs=3, batch_size=batch,
                      device=device, out=out, progress="none", save_checkpoints=False,
                      mix=MixOptions(rule="all", first_unmixed_epochs=1, final_unmixed_epochs=0, quad_confidence=0.0))
    t = Trainer(cfg, data=data)
    m = t.fit()
    last = m["epochs_log"][-1]
    return {"resident": t.data.resident, "cuda_graph": m["cuda_graph"], "epoch_seconds": last["seconds"],
            "samples_per_s": last["samples"] / last["seconds"], "passes_per_s": last["passes"] / last["seconds"],
            "epochs_log": m["epochs_log"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.smoke:
        args.images, args.classes, args.sizes, args.models = 48, 3, "32", "digitnet"
        args.batch_size, args.subset, args.device = 8, 32, "cpu"
    device = resolve_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="mixtrain-ft-")
    result = {"versions": versions(), "device": str(device), "args": vars(args), "rows": [], "bare": [], "caches": []}
    if args.folder:
        folder = args.folder
    else:
        folder = os.path.join(work, "folder")
        lo, hi = (24, 40) if args.smoke else (224, 500)
        result["generated"] = generate_folder(folder, args.images, args.classes, lo, hi)
        print("generated", result["generated"], flush=True)

    def save():
        with open(os.path.join(args.out, "folder_throughput.json"), "w") as f:
            json.dump(result, f, indent=2)
        write_table(args.out, result)

    for size in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        cache = open_cache(folder, size, os.path.join(work, "cache"))
        result["caches"].append({"size": size, "seconds": time.perf_counter() - t0, "gb": cache.nbytes() / 1e9,
                                 "images": cache.manifest["counts"], "build_seconds": cache.manifest["build_seconds"],
                                 "workers": cache.manifest["workers"]})
        print("cache", result["caches"][-1], flush=True)
        for model in args.models.split(","):
            if time.perf_counter() - t_start > args.stop_after:
                result["stopped_early"] = True
                break
            ips = bare_step(model, size, args.batch_size, args.classes, device)
            result["bare"].append({"model": model, "size": size, "images_per_s": ips})
            print(f"bare {model} {size}px: {ips:,.0f} img/s", flush=True)
            for placement in args.placements.split(","):
                data = FolderData(folder, size, cache=cache, placement=placement).subset(args.subset, 512)
                for method in args.methods.split(","):
                    if time.perf_counter() - t_start > args.stop_after:
                        result["stopped_early"] = True
                        break
                    r = trainer_rate(data, model, size, method, args.batch_size, args.device,
                                     os.path.join(work, "runs", f"{model}-{size}-{placement}-{method}"))
                    r.update(model=model, size=size, placement=placement, method=method)
                    result["rows"].append(r)
                    print(f"{model} {size}px {placement} {method}: {r['samples_per_s']:,.0f} samples/s, "
                          f"{r['passes_per_s']:,.0f} passes/s (graph {r['cuda_graph']})", flush=True)
                    save()
                    torch.cuda.empty_cache() if device.type == "cuda" else None
        shutil.rmtree(cache.path, ignore_errors=True)  # disk room for the next size
    save()
    return 0


def write_table(out: str, result: dict):
    bare = {(b["model"], b["size"]): b["images_per_s"] for b in result["bare"]}
    rate = {(r["model"], r["size"], r["placement"], r["method"]): r for r in result["rows"]}
    lines = [f"# Folder-cache throughput ({result['versions'].get('gpu', result['device'])}; torch "
             f"{result['versions']['torch']})", ""]
    if "generated" in result:
        g = result["generated"]
        lines.append(f"Folder: {g['train_images']:,} generated JPEGs ({g['sides'][0]}-{g['sides'][1]} px sides, "
                     f"{g['jpeg_gb']:.1f} GB), {g['classes']} classes; written in {g['seconds']:.0f} s.")
    for c in result["caches"]:
        lines.append(f"- Cache at {c['size']} px: {c['gb']:.1f} GB, prepared in {c['build_seconds']:.0f} s with "
                     f"{c['workers']} processes ({c['images']['train']:,} + {c['images']['val']:,} images).")
    lines += ["", "| model | px | bare step img/s | placement | method | samples/s | passes/s | of bare | streamed / resident |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for (model, size, placement, method), r in rate.items():
        b = bare.get((model, size))
        resident = rate.get((model, size, "device", method))
        of_bare = f"{r['passes_per_s'] / b:.2f}" if b else ""
        vs = f"{r['samples_per_s'] / resident['samples_per_s']:.2f}" if resident and placement == "host" else ""
        lines.append(f"| {model} | {size} | {b:,.0f} | {placement} | {method} | {r['samples_per_s']:,.0f} | "
                     f"{r['passes_per_s']:,.0f} | {of_bare} | {vs} |")
    lines += ["", "of bare: passes/s over the bare model's eager step (images/s). mixtrain's epochs here mix every "
              "sample in pairs (two images per pass).", "", "    python benchmarks/folder_throughput.py " +
              " ".join(f"--{k.replace('_', '-')} {v}" for k, v in result["args"].items()
                       if k in ("images", "sizes", "models", "batch_size", "subset"))]
    with open(os.path.join(out, "folder_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
