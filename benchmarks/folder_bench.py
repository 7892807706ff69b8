"""Real photos from an image folder: the decoded cache against resident arrays, and ImageNet-style models.

Hardware: one NVIDIA H200 through the device tool (16 CPU cores); versions, device and seeds are in
each bench's ``results.json``. Every number comes from ``mixtrain bench`` runs, baseline and
mixtrain side by side in one process (``bench`` times training only; evaluation is untimed).

Parts (``--part``):

* ``cache-vs-npz``: the folder through its decoded cache (``--data folder:DIR``, random-resized
  crop and flip on the GPU, the cache resident on the GPU) against the same decoded photos as an
  npz resident on the GPU (``--data npz:DIR``, pad-and-crop and flip), same model, epochs and
  seeds. The npz is exported from the cache itself (the decoded pixels, nothing else). Reports
  each path's baseline seconds per epoch (the cache should be within 10 % of the npz) and
  mixtrain's wall-clock speedup against its pass ratio (goal: at least 0.95x).
* ``imagenet-style``: an ImageNet-style model (``--model``, e.g. ``resnet50_224``) at
  ``--image-size`` from a cache of ``--cache-size`` px (for 88 px Imagenette at 176 px: every
  image upscaled 2x by the GPU resampling), baseline vs mixtrain.

    python benchmarks/folder_bench.py --folder data/imagenette --part cache-vs-npz --epochs 30 --seeds 3 --out R
    python benchmarks/folder_bench.py --folder data/imagenette --part imagenet-style --model resnet50_224 \\
        --image-size 176 --cache-size 88 --epochs 30 --seeds 3 --out R
    python benchmarks/folder_bench.py --smoke --out /tmp/fb     # CPU, a generated folder, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def bench(args, data: str, out: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "mixtrain", "bench", "--data", data, "--epochs", str(args.epochs), "--methods",
           args.methods, "--seeds", str(args.seeds), "--batch-size", str(args.batch_size), "--progress", "none",
           "--device", args.device, "--cache-dir", args.cache_dir, "--out", out, *extra]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    results["command"] = " ".join(cmd[1:])
    return results


def export_npz(cache, out: str):
    """The cache's decoded pixels as ``train_0.npz`` + ``test.npz`` (x uint8 NHWC, y int64)."""
    os.makedirs(out, exist_ok=True)
    for split, name in (("train", "train_0.npz"), ("val", "test.npz")):
        x = np.asarray(cache.images(split)).transpose(0, 2, 3, 1)
        np.savez(os.path.join(out, name), x=np.ascontiguousarray(x), y=cache.labels(split))


def summarise(results: dict) -> dict:
    """Per method: medians of seconds per epoch and train seconds, passes, accuracy mean/std."""
    out = {}
    for method in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == method]
        if not runs:
            continue
        acc = [r["test_accuracy"] for r in runs]
        out[method] = {
            "runs": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "train_seconds_median": statistics.median(r["train_seconds"] for r in runs),
            "epoch_seconds_median": statistics.median(e["seconds"] for r in runs for e in r["epochs_log"]),
            "passes": statistics.median(r["passes"] for r in runs),
            "samples": runs[0]["samples"],
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
        }
    if "baseline" in out and "mixtrain" in out:
        b, m = out["baseline"], out["mixtrain"]
        m["speedup"] = b["train_seconds_median"] / m["train_seconds_median"]
        m["pass_ratio"] = b["passes"] / m["passes"]
        m["speedup_over_pass_ratio"] = m["speedup"] / m["pass_ratio"]
        m["accuracy_difference_points"] = 100 * (m["accuracy_mean"] - b["accuracy_mean"])
    return out


def table(name: str, summary: dict) -> list[str]:
    rows = ["| data path | method | runs | passes | train s (median) | s/epoch (median) | test accuracy | speedup | fewer passes |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summary.items():
        sp = f"{s['speedup']:.2f}x" if "speedup" in s else ""
        pr = f"{s['pass_ratio']:.2f}x" if "pass_ratio" in s else ""
        rows.append(f"| {name} | {method} | {s['runs']} | {s['passes']:,.0f} | {s['train_seconds_median']:.1f} | "
                    f"{s['epoch_seconds_median']:.3f} | {100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f} % | {sp} | {pr} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", default="", help="the image folder (train/<class>/*, val/<class>/*)")
    p.add_argument("--part", default="cache-vs-npz", help="cache-vs-npz or imagenet-style")
    p.add_argument("--model", default="resnet18", help="model (cache-vs-npz: both paths)")
    p.add_argument("--image-size", type=int, default=0, help="training resolution (0: the cache size)")
    p.add_argument("--cache-size", type=int, default=88, help="the cache's image size")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="baseline,mixtrain")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default="", help="where the cache goes (default: a folder under --out)")
    p.add_argument("--out", default="results/folder-bench")
    p.add_argument("--smoke", action="store_true", help="CPU check: a generated folder, digitnet, 2 epochs, 1 seed")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        from PIL import Image

        args.folder = os.path.join(tempfile.mkdtemp(prefix="mixtrain-fb-"), "f")
        rng = np.random.default_rng(0)
        for split, n in (("train", 16), ("val", 4)):
            for c in range(2):
                os.makedirs(os.path.join(args.folder, split, f"c{c}"))
                for i in range(n):
                    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                        os.path.join(args.folder, split, f"c{c}", f"{i}.png"))
        args.model, args.cache_size, args.epochs, args.seeds, args.batch_size, args.device = "digitnet", 16, 2, 1, 8, "cpu"
    args.cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    from mixtrain.folder_cache import open_cache

    cache = open_cache(args.folder, args.cache_size, args.cache_dir)
    size = args.image_size or args.cache_size
    # the smoke run's epoch 2 mixes everything, in pairs only (its test counts the passes)
    mix = ["--first-unmixed-epochs", "1", "--final-unmixed-epochs", "0", "--mix-rule", "all",
           "--quad-confidence", "0"] if args.smoke else []
    folder = f"folder:{args.folder}"
    report = {"part": args.part, "cache": {"path": cache.path, "bytes": cache.nbytes(), "manifest": cache.manifest}}
    lines = [f"# {args.part}: {args.folder}, {args.epochs} epochs, {args.seeds} seeds, batch {args.batch_size}", ""]
    if args.part == "cache-vs-npz":
        npz = os.path.join(args.out, "npz")
        export_npz(cache, npz)
        r_npz = bench(args, f"npz:{npz}", os.path.join(args.out, "npz-bench"), "--model", args.model, *mix)
        r_cache = bench(args, folder, os.path.join(args.out, "cache-bench"), "--model", args.model, "--image-size",
                        str(size), "--cache-size", str(args.cache_size), *mix)
        s_npz, s_cache = summarise(r_npz), summarise(r_cache)
        report.update(npz=s_npz, cache_path=s_cache, commands=[r_npz["command"], r_cache["command"]],
                      versions=r_cache["sessions"][-1]["versions"], device=r_cache["sessions"][-1]["device"])
        ratio = s_cache["baseline"]["epoch_seconds_median"] / s_npz["baseline"]["epoch_seconds_median"]
        report["cache_over_npz_baseline_epoch_seconds"] = ratio
        lines += table("npz, resident", s_npz) + table("folder cache", s_cache)[2:] + [
            "",
            f"- Baseline seconds per epoch, cache / npz: **{ratio:.3f}** (goal: within 1.10).",
        ]
        if "mixtrain" in s_cache:
            lines.append(f"- mixtrain from the cache: {s_cache['mixtrain']['speedup']:.2f}x faster for "
                         f"{s_cache['mixtrain']['pass_ratio']:.2f}x fewer passes: "
                         f"**{s_cache['mixtrain']['speedup_over_pass_ratio']:.3f}** of the pass ratio (goal: at least 0.95).")
    else:
        r = bench(args, folder, os.path.join(args.out, "bench"), "--model", args.model, "--image-size", str(size),
                  "--cache-size", str(args.cache_size), *mix)
        s = summarise(r)
        report.update(summary=s, commands=[r["command"]], versions=r["sessions"][-1]["versions"],
                      device=r["sessions"][-1]["device"])
        lines += table(f"{args.model} at {size} px from a {args.cache_size} px cache", s)
    lines += ["", "Commands:", ""] + [f"    python {c}" for c in report["commands"]]
    with open(os.path.join(args.out, "folder_bench.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(args.out, "folder_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
