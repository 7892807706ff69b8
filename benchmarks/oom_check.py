"""Out of GPU memory: one clear error line, and the checkpoint already written stays good (issue 21).

What it shows: ``mixtrain train`` with a batch far too large for the GPU stops with exit status 2
and one line, ``error: out of memory on cuda ...``, naming the batch size and the model and
advising a smaller ``--batch-size`` -- no traceback, and no silent fall-back from the CUDA graph
to the eager step -- at each of the three places where it can happen:

* ``capture``: the first step with the CUDA graph on (``--cuda-graph on``): its eager warm-up
  steps, or the capture itself, run out;
* ``step``: the first step with ``--cuda-graph off``;
* ``eval``: the evaluation after the last of 2 epochs, with an ``--eval-batch-size`` far too large
  while training fits. The checkpoint of epoch 1 is then read back (``weights_only``, as
  ``--resume`` reads it) to show that it is still good.

Hardware: one NVIDIA GPU; written for an H200 (141 GB). By rough estimates from activation
sizes, ResNet-50 at 224 px in bf16 needs some 200 GB for a training step of 4096 images and some
190 GB for an evaluation batch of 49152: both run out. Versions: recorded in the results (Python,
torch, torchvision, timm, GPU, CUDA). Disk: about 8 GB of generated data in a temporary folder.

Data: an npz folder of random 224x224 RGB uint8 images generated here (``--data npz:DIR``; npz
data keep their own image size, ``--image-size`` applies to folder data only). Each case runs the
real command in a fresh process (``python -m mixtrain train ...``) and records its exit status,
its last stderr line and whether a traceback appeared, in ``OUT/oom_check.json`` and
``OUT/oom_check.md``. Exit status 1 if any case did not end as described above.

    python benchmarks/oom_check.py --out benchmarks/results/oom-check-h200
    python benchmarks/oom_check.py --smoke --out DIR   # CPU plumbing check: digitnet, nothing runs out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))  # this checkout's mixtrain, as in the runs it starts
CASES = ("capture", "step", "eval")


def write_npz(folder: str, train: int, test: int, size: int, channels: int, seed: int = 0, train_from: str = ""):
    """``train_0.npz`` (or a hard link to ``train_from``'s) and ``test.npz`` of random images, 10 classes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, (min(max(train, test), 4096), size, size, channels), dtype=np.uint8)

    def images(n):  # tiled from one random block: generating GBs of noise would take longer than the runs
        return np.concatenate([block] * (-(-n // len(block))))[:n]

    if train_from:
        os.link(os.path.join(train_from, "train_0.npz"), os.path.join(folder, "train_0.npz"))
    else:
        y = np.arange(train) % 10
        np.savez(os.path.join(folder, "train_0.npz"), x=images(train), y=y)
    np.savez(os.path.join(folder, "test.npz"), x=images(test), y=np.arange(test) % 10)


def run_case(case: str, args, data: dict, out: str) -> dict:
    cmd = [sys.executable, "-m", "mixtrain", "train", "--model", args.model, "--method", "mixtrain",
           "--device", args.device, "--progress", "none", "--out", out]
    if case == "eval":
        cmd += ["--data", f"npz:{data['eval']}", "--epochs", "2", "--batch-size", str(args.train_batch_size),
                "--eval-batch-size", str(args.eval_batch_size)]
    else:
        cmd += ["--data", f"npz:{data['train']}", "--epochs", "1", "--batch-size", str(args.batch_size)]
    if case != "eval" and not args.smoke:  # eval: the default (auto: on, for one GPU and resident data)
        cmd += ["--cuda-graph", "on" if case == "capture" else "off"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = p.stderr.strip().splitlines()
    row = {
        "case": case,
        "command": " ".join(["python3", "-m", "mixtrain", *cmd[3:]]),
        "exit_code": p.returncode,
        "stderr_last_line": lines[-1] if lines else "",
        "error_lines": sum(line.startswith("error:") for line in lines),
        "traceback": "Traceback" in p.stderr,
        "fell_back_to_eager": "training eagerly" in p.stderr,
        "seconds": round(time.perf_counter() - t, 1),
    }
    if case == "eval":  # the checkpoint written before the failed evaluation: still good?
        from mixtrain import checkpoint as ckpt
        from mixtrain.errors import MixtrainError

        try:
            state = ckpt.load(os.path.join(out, "checkpoint.pt"))
            row["checkpoint"] = f"loads (weights_only): end of epoch {state['epoch']}"
        except MixtrainError as e:
            row["checkpoint"] = f"does not load: {e}"
    row["as_described"] = described(row, args)
    return row


def described(row: dict, args) -> bool:
    """The case ended as the issue asks: one error line naming the batch size and the model and
    advising a smaller one, no traceback, no fall-back; for eval, the epoch-1 checkpoint loads."""
    if args.smoke:  # nothing runs out on the CPU: the run just ends well
        return row["exit_code"] == 0 and not row["traceback"]
    line = row["stderr_last_line"]
    option = "--eval-batch-size" if row["case"] == "eval" else "--batch-size"
    size = args.eval_batch_size if row["case"] == "eval" else args.batch_size
    ok = (row["exit_code"] == 2 and row["error_lines"] == 1 and not row["traceback"] and not row["fell_back_to_eager"]
          and line.startswith("error: out of memory") and f"{option} {size} " in line and args.model in line
          and f"use a smaller {option}" in line)
    if row["case"] == "eval":
        ok = ok and row.get("checkpoint") == "loads (weights_only): end of epoch 1"
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_224")
    p.add_argument("--batch-size", type=int, default=4096, help="capture and step cases: far too large")
    p.add_argument("--train-batch-size", type=int, default=128, help="eval case: a batch that fits")
    p.add_argument("--eval-batch-size", type=int, default=49152, help="eval case: far too large (also the test split size)")
    p.add_argument("--image-size", type=int, default=224, help="of the generated npz images")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--timeout", type=int, default=540, help="seconds per case")
    p.add_argument("--out", default="runs/oom_check")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script (nothing runs out)")
    args = p.parse_args(argv)
    channels = 3
    if args.smoke:
        args.model, args.device, args.image_size, channels = "digitnet", "cpu", 16, 1
        args.batch_size, args.train_batch_size, args.eval_batch_size = 32, 16, 64
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    from mixtrain.trainer import versions

    os.makedirs(args.out, exist_ok=True)
    result = {"versions": versions(), "args": vars(args), "cases": [],
              "command": " ".join(["python3", "benchmarks/oom_check.py", *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory(prefix="oom_check-") as tmp:
        data = {"train": os.path.join(tmp, "train"), "eval": os.path.join(tmp, "eval")}
        t = time.perf_counter()
        write_npz(data["train"], args.batch_size, 256, args.image_size, channels)
        if "eval" in cases:
            write_npz(data["eval"], 0, args.eval_batch_size, args.image_size, channels, train_from=data["train"])
        print(f"data: {args.batch_size} train images of {args.image_size} px ({time.perf_counter() - t:.0f} s)", flush=True)
        for case in cases:
            row = run_case(case, args, data, os.path.join(tmp, f"run-{case}"))
            print(f"{case}: exit {row['exit_code']}, {row['seconds']} s: {row['stderr_last_line']}", flush=True)
            result["cases"].append(row)
    with open(os.path.join(args.out, "oom_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_table(result, os.path.join(args.out, "oom_check.md"))
    return 0 if all(r["as_described"] for r in result["cases"]) else 1


def write_table(result: dict, path: str):
    v = result["versions"]
    where = v.get("gpu") or v.get("cpu", "?")
    lines = [
        f"# Out of memory: one error line ({where})",
        "",
        f"`{result['command']}`; {', '.join(f'{k} {val}' for k, val in v.items())}.",
        "",
        "| case | exit | error lines | traceback | fell back to eager | seconds | as described | last stderr line |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["cases"]:
        line = r["stderr_last_line"].replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['exit_code']} | {r['error_lines']} | {'yes' if r['traceback'] else 'no'} | "
                     f"{'yes' if r['fell_back_to_eager'] else 'no'} | {r['seconds']} | "
                     f"{'yes' if r['as_described'] else '**no**'} | `{line}` |")
    for r in result["cases"]:
        if "checkpoint" in r:
            lines += ["", f"Checkpoint of the {r['case']} case, read back afterwards: {r['checkpoint']}."]
    lines += ["", "Commands:", ""] + [f"- {r['case']}: `{r['command']}`" for r in result["cases"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
