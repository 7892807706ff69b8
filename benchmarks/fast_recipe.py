"""The fast CIFAR-10 recipe side by side: the published airbench94 script, mixtrain's implementation of
the recipe as its own baseline, and that recipe with MixTrain (issue 19).

Hardware: written for one NVIDIA H200 (torch 2.11, torchvision 0.26, Python 3.12, no internet);
``--smoke`` runs on the CPU in seconds (synthetic data, narrow network) and is what the tests run.

What it times, in one call:
1. (with ``--reference PATH``) the published script (``legacy/airbench94.py`` of
   KellerJordan/cifar10-airbench, unmodified) in a subprocess: first the data files it reads
   (``cifar10/train.pt`` and ``test.pt`` with keys images [N,32,32,3] uint8, labels, classes) are
   written from our npz files into a work folder so it never tries to download, then a small
   wrapper imports the script without running its own 25-run loop, calls its ``main('warmup')``
   (random labels, untimed) and ``main(run)`` ``--reference-runs`` times, and the accuracy with
   its test-time augmentation and its own time (whitening + training + TTA evaluation, per-epoch
   evaluations excluded) are read from its printed final rows;
2. ours (:func:`mixtrain.fast.run_fast`): every method x epoch budget x seed after an untimed
   warm-up, train seconds (whitening + training, device synchronised) and train + TTA seconds
   (comparable to the script's own total), TTA and plain accuracy, passes.
Writes ``OUT/fast_recipe.json`` (everything), ``OUT/results.json``, ``OUT/report.md`` and
``OUT/frontier.png``. ``--stop-after`` (seconds since start, default 300) starts no run that
would pass it; skipped runs are listed.

    PYTHONPATH=src python benchmarks/fast_recipe.py --data /root/cifar10 --reference .peer/airbench94.py --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from mixtrain.bench import parse_methods, parse_seeds  # noqa: E402
from mixtrain.data import from_arrays, load_npz  # noqa: E402
from mixtrain.fast import FastConfig, parse_budgets, run_fast  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# imports the published script without its own run loop, then runs its main: a warm-up, then N runs
WRAPPER = """
import runpy, sys
script, runs = sys.argv[1], int(sys.argv[2])
g = runpy.run_path(script, run_name="airbench_reference")
g["print_columns"](g["logging_columns_list"], is_head=True)
g["main"]("warmup")
for run in range(runs):
    g["main"](run)
    sys.stdout.flush()
"""


def write_reference_data(data, folder: str):
    """``folder/cifar10/{train,test}.pt`` as the published script stores CIFAR-10 (NHWC uint8)."""
    root = os.path.join(folder, "cifar10")
    os.makedirs(root, exist_ok=True)
    classes = CLASSES if data.num_classes == 10 else [str(i) for i in range(data.num_classes)]
    for name, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        torch.save({"images": x.permute(0, 2, 3, 1).contiguous().cpu(), "labels": y.cpu(), "classes": classes},
                   os.path.join(root, f"{name}.pt"))


def parse_reference_output(text: str) -> list[dict]:
    """The final ('eval') rows of the script's table: TTA accuracy and total seconds; the first is the warm-up's."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "eval":
            rows.append({"tta_accuracy": float(cells[5]), "seconds": float(cells[6])})
    return rows[1:]


def run_reference(script: str, runs: int, data, timeout: float) -> dict:
    """The published script's runs, in a subprocess working in a temporary folder that holds its data."""
    if not os.path.isfile(script):
        raise SystemExit(f"error: --reference {script}: no such file")
    work = tempfile.mkdtemp(prefix="airbench_ref_")
    t0 = time.perf_counter()
    try:
        write_reference_data(data, work)
        cmd = [sys.executable, "-c", WRAPPER, os.path.abspath(script), str(runs)]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=max(1.0, timeout))
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = "timed out", None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = parse_reference_output(out)
    print(f"reference: {len(rows)} runs in {time.perf_counter() - t0:.0f} s (exit {code})", flush=True)
    if code not in (0, None) or not rows:
        print(out[-3000:], err[-3000:], sep="\n", file=sys.stderr)
    return {"script": script, "epochs": 9.9, "runs": rows, "exit_code": code, "wall_seconds": time.perf_counter() - t0,
            "stderr_tail": err[-2000:]}


def synthetic(n: int, seed: int, classes: int = 4):
    """32x32 RGB images whose class is their mean colour plus noise (learnable in a few steps)."""
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    colours = np.random.default_rng(99).integers(40, 215, (classes, 3))
    x = colours[y][:, None, None, :] + r.normal(0, 40, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8), y


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/root/cifar10", help="folder of train_*.npz + test.npz (CIFAR-10)")
    p.add_argument("--reference", default="", help="path of the published airbench94.py (optional)")
    p.add_argument("--reference-runs", type=int, default=20)
    p.add_argument("--methods", default=None, help="default baseline,mixtrain (smoke: baseline,mixtrain(rule=all))")
    p.add_argument("--epochs", default=None, help="epoch budgets of ours (default 8,9.9,11.5; smoke: 2,3)")
    p.add_argument("--seeds", default=None, help="seeds of ours: a count or a list (default 20; smoke: 1)")
    p.add_argument("--pooling", default="max", choices=("max", "avg"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16"),
                   help="ours: bf16 autocast over float32 weights, or fp16 weights with float batch-norm (as published)")
    p.add_argument("--stop-after", type=float, default=300.0,
                   help="seconds since start: start no run (ours or the script's, by its timeout) that would pass this")
    p.add_argument("--out", default="runs/fast_recipe")
    p.add_argument("--smoke", action="store_true", help="CPU, synthetic data, narrow network, seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    start = time.perf_counter()
    if a.smoke:
        device = torch.device("cpu")
        cfg = FastConfig(batch_size=32, widths=(8, 8, 8), whiten_images=64, precision=a.precision)
        data = from_arrays("synthetic", synthetic(128, 0), synthetic(64, 1), "synthetic")
        budgets, seeds = parse_budgets(a.epochs or "3"), parse_seeds(a.seeds or "1")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = FastConfig(pooling=a.pooling, precision=a.precision)
        data = load_npz(a.data)
        budgets, seeds = parse_budgets(a.epochs or "8,9.9,11.5"), parse_seeds(a.seeds or "20")
    methods = parse_methods(a.methods or ("baseline,mixtrain(rule=all)" if a.smoke else "baseline,mixtrain"))
    torch.backends.cudnn.benchmark = True
    os.makedirs(a.out, exist_ok=True)
    reference = None
    if a.reference:
        left = a.stop_after - (time.perf_counter() - start) if a.stop_after > 0 else 3600.0
        reference = run_reference(a.reference, a.reference_runs, data, left)
    command = "python benchmarks/fast_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stop = max(1e-3, a.stop_after - (time.perf_counter() - start)) if a.stop_after > 0 else 0.0
    results = run_fast(data.to(device), methods, budgets, seeds, cfg, device, a.out, stop, command, progress=False,
                       extra={"reference": reference}, warm_up=not a.smoke)
    with open(os.path.join(a.out, "fast_recipe.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(open(os.path.join(a.out, "report.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
