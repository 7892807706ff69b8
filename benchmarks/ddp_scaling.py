"""Baseline vs MixTrain on one GPU and on several (torchrun, DDP over NCCL), at the same global batch.

Hardware: written for ``nvidia-h200-x2`` (two NVIDIA H200 of one host, 32 CPU cores), CUDA,
bf16 autocast and channels-last (the trainer's CUDA defaults). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are forced in every
child's environment). Versions: each run's ``metrics.json`` records mixtrain, Python, torch,
torchvision, timm, CUDA and the GPU; ``ddp_scaling.json`` keeps them.

What it times: every run is a separate ``mixtrain train`` process (one GPU) or ``torchrun
--nproc_per_node N -m mixtrain train`` (N GPUs), exactly as a user starts them. Per run it reports
the trainer's ``train_seconds`` (device-synchronised wall-clock of all epochs: planning, batch
set-up, augment + compose, forward/backward/optimiser steps, the end-of-epoch loss-memory merge
across processes) and the same without epoch 1 (``steady_seconds``: epoch 1 also pays cuDNN
autotuning, CUDA-graph capture on one GPU and NCCL's first collectives). Not timed: process start,
loading the data, evaluation, file writes, and one untimed warm-up process before the timed runs
(``--warmup-epochs``; the first timed run used to pay more in its first epoch). The global batch is the same everywhere:
``--batch-size`` per process = global batch / processes, so the LR schedule and every step's
samples match the one-GPU run. One GPU uses the CUDA-graph step (the trainer's default there);
DDP's step is captured too (the default since session 7; ``--extra "--cuda-graph off"`` for eager
DDP); the variant ``1-eager`` adds a one-GPU run without the graph, and ``N-bMB`` (e.g. ``2-b100``)
runs N processes with DDP's all-reduce buckets at MB megabytes (``--ddp-bucket-mb``; default 25),
to tune the bucket size.

ImageNet-style data without a download: ``--generate-images N`` writes a folder of N generated
JPEGs (224-500 px sides, ``--generate-classes`` classes, each class its own coarse pattern under
random content, so training learns and mixing has easy samples; ``folder_throughput.py``) under
``--work`` unless it is already there, prepares its cache at ``--image-size`` (``mixtrain
prepare``, all cores; not timed) and trains from ``folder:WORK/folder``.

Usage (CIFAR-10 as ``train_*.npz`` + ``test.npz``):

    python benchmarks/ddp_scaling.py --data npz:/data/cifar10 --epochs 30 --seeds 0,1 --variants 1,2 --out results/ddp
    python benchmarks/ddp_scaling.py --generate-images 30000 --work /root/gen --image-size 224 --model resnet50_224 \
        --batch 512 --epochs 6 --seeds 0 --variants 1,2 --extra "--cuda-graph on" --out results/ddp-r50-224
    python benchmarks/ddp_scaling.py --smoke --out /tmp/ddp-smoke     # CPU, gloo, digits, seconds

Writes ``OUT/ddp_scaling.json`` (every run) and ``OUT/ddp_scaling.md`` (the table), rewritten after
every run so that an interrupted benchmark keeps what it finished; runs go to ``OUT/runs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from mixtrain.bench import mean_std  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="", help="data spec for mixtrain train (required unless --smoke)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="baseline,mixtrain", help="comma-separated methods")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--batch", type=int, default=512, help="global batch (passes per step over all processes)")
    p.add_argument("--variants", default="1,2",
                   help="comma-separated: N = N processes (1 = plain one-GPU run), N-eager = without the CUDA graph, "
                        "N-bMB = DDP buckets of MB megabytes")
    p.add_argument("--out", default="results/ddp-scaling")
    p.add_argument("--extra", default="", help="more mixtrain train options, passed to every run (one string)")
    p.add_argument("--generate-images", type=int, default=0, help="generate an ImageNet-style folder of this many training JPEGs under --work and train from it")
    p.add_argument("--generate-classes", type=int, default=100)
    p.add_argument("--random-content", action="store_true",
                   help="generated images carry no class information (session 7's form: nothing is learnt, so mixtrain never mixes)")
    p.add_argument("--work", default="/tmp/ddp-scaling-work", help="where the generated folder and its caches live")
    p.add_argument("--image-size", type=int, default=224, help="training resolution = cache size, for generated folders")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="before the timed runs, one untimed one-process run of the first method for this many epochs "
                        "(0: none). Without it the first timed run paid about 3-10 s more in its first epoch than "
                        "the same run later in the chain (sessions 7-8: CUDA's kernel cache, the page cache of "
                        "freshly written data), which inflated the one-GPU baseline")
    p.add_argument("--smoke", action="store_true", help="tiny CPU check: digits, gloo, 2 epochs, batch 64")
    return p.parse_args(argv)


def parse_variant(v: str) -> tuple[int, bool, float | None]:
    """'2' -> (2 processes, default graph setting, default buckets); '1-eager' -> (1, graph off,
    None); '2-b100' -> (2, default graph setting, 100 MB buckets)."""
    procs, _, tag = v.partition("-")
    try:
        bucket = float(tag[1:]) if tag.startswith("b") else None
    except ValueError:
        bucket = None
    if not procs.isdigit() or int(procs) < 1 or (tag not in ("", "eager") and not (bucket and bucket > 0)):
        raise SystemExit(f"error: --variants {v!r}: expected N (processes), N-eager or N-bMB (bucket megabytes > 0)")
    return int(procs), tag == "eager", bucket


def run_command(args, variant: str, method: str, seed: int, out: str, epochs: int | None = None) -> list[str]:
    """The command of one run (``epochs``: instead of ``--epochs``, for the warm-up)."""
    procs, eager, bucket = parse_variant(variant)
    train = ["-m", "mixtrain", "train", "--data", args.data, "--model", args.model, "--method", method,
             "--epochs", str(args.epochs if epochs is None else epochs), "--seed", str(seed), "--batch-size", str(args.batch // procs),
             "--out", out, "--progress", "none", "--save-checkpoints", "off", *folder_options(args), *shlex.split(args.extra)]
    if eager:
        train += ["--cuda-graph", "off"]
    if bucket:
        train += ["--ddp-bucket-mb", f"{bucket:g}"]
    if procs == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *train]


def folder_options(args) -> list[str]:
    if not args.generate_images:
        return []
    size = str(args.image_size)
    return ["--image-size", size, "--cache-size", size, "--cache-dir", os.path.join(args.work, "cache")]


def generated_folder(args) -> dict:
    """Write the folder unless it exists, then prepare its cache at --image-size; returns what was done."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from folder_throughput import generate_folder

    root = os.path.join(args.work, "folder")
    info = {"folder": root}
    if not os.path.isdir(os.path.join(root, "train")):
        info["generated"] = generate_folder(root, args.generate_images, args.generate_classes, 224, 500,
                                            learnable=not args.random_content)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mixtrain", "prepare", f"folder:{root}", "--size", str(args.image_size),
                    "--cache-dir", os.path.join(args.work, "cache")], env=child_env(), check=True)
    info["prepare_seconds"] = time.perf_counter() - t0
    args.data = f"folder:{root}"
    return info


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NO_MULTICAST)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "4")
    return env


def launch(cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd`` to its end: the finished process and its record (command, wall-clock seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    return r, {"command": " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python3"),
               "process_seconds": time.perf_counter() - t0}


def warm_up(args, method: str, seed: int) -> dict:
    """The untimed warm-up: ``method`` on one process for ``--warmup-epochs`` epochs; its record is
    kept in the session, never in the table."""
    r, rec = launch(run_command(args, "1", method, seed, os.path.join(args.out, "runs", "warmup"), args.warmup_epochs))
    if r.returncode != 0:
        raise SystemExit(f"error: the warm-up run failed: {((r.stderr or r.stdout).strip().splitlines() or ['no output'])[-1]}")
    return rec


def one_run(args, variant: str, method: str, seed: int) -> dict:
    out = os.path.join(args.out, "runs", f"{method}-{variant}-s{seed}")
    r, launched = launch(run_command(args, variant, method, seed, out))
    rec = {"variant": variant, "processes": parse_variant(variant)[0], "method": method, "seed": seed, **launched}
    if r.returncode != 0:
        rec["error"] = (r.stderr or r.stdout)[-2000:]
        return rec
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    logs = m["epochs_log"]
    rec.update({k: m[k] for k in ("passes", "samples", "train_seconds", "test_accuracy", "world_size",
                                  "cuda_graph", "batch_size", "versions", "device")})
    rec["steady_seconds"] = sum(e["seconds"] for e in logs[1:])
    return rec


def summarise(runs: list[dict], methods: list[str], variants: list[str]) -> list[dict]:
    rows = {}
    for variant in variants:
        for method in methods:
            done = [r for r in runs if r["variant"] == variant and r["method"] == method and "error" not in r]
            if not done:
                continue
            t, _ = mean_std([r["train_seconds"] for r in done])
            s, _ = mean_std([r["steady_seconds"] for r in done])
            a, a_sd = mean_std([r["test_accuracy"] for r in done])
            a_sd = a_sd or 0.0  # one seed: no spread
            rows[variant, method] = {
                "variant": variant, "method": method, "seeds": [r["seed"] for r in done],
                "cuda_graph": done[0]["cuda_graph"], "passes": statistics.fmean(r["passes"] for r in done),
                "train_seconds_mean": t, "steady_seconds_mean": s, "accuracy_mean": a, "accuracy_std": a_sd,
            }
    for (variant, method), row in rows.items():
        base = rows.get((variant, "baseline"))
        if base:
            row["speedup_vs_baseline"] = base["train_seconds_mean"] / row["train_seconds_mean"]
            row["steady_speedup_vs_baseline"] = base["steady_seconds_mean"] / row["steady_seconds_mean"]
            row["accuracy_diff_vs_baseline"] = row["accuracy_mean"] - base["accuracy_mean"]
        one = rows.get(("1", method))
        if one and variant != "1":
            row["scaling_vs_one_gpu"] = one["train_seconds_mean"] / row["train_seconds_mean"]
            row["steady_scaling_vs_one_gpu"] = one["steady_seconds_mean"] / row["steady_seconds_mean"]
            row["accuracy_diff_vs_one_gpu"] = row["accuracy_mean"] - one["accuracy_mean"]
    return list(rows.values())


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], runs: list[dict], session: dict) -> str:
    lines = [
        f"# Baseline vs MixTrain on 1 and N GPUs ({session['data']}{', ' + str(session['image_size']) + ' px' if 'image_size' in session else ''}, {session['model']}, {session['epochs']} epochs, global batch {session['batch']})",
        "",
        "Train s: the trainer's device-synchronised wall-clock of all epochs; steady s: the same without epoch 1 "
        "(autotuning, graph capture, first collectives). Speedup: the same variant's baseline seconds / these. "
        "Scaling: the one-GPU run's seconds of the same method / these. Accuracy: final test accuracy, mean +- std over seeds.",
        "",
        "| GPUs | method | CUDA graph | seeds | passes | train s | steady s | accuracy % | speedup (steady) | acc. vs baseline | scaling from 1 GPU (steady) | acc. vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "-" if "speedup_vs_baseline" not in r else f"{r['speedup_vs_baseline']:.2f}x ({r['steady_speedup_vs_baseline']:.2f}x)"
        sc = "-" if "scaling_vs_one_gpu" not in r else f"{r['scaling_vs_one_gpu']:.2f}x ({r['steady_scaling_vs_one_gpu']:.2f}x)"
        lines.append(
            f"| {r['variant']} | {r['method']} | {'on' if r['cuda_graph'] else 'off'} | {','.join(map(str, r['seeds']))} "
            f"| {r['passes']:,.0f} | {r['train_seconds_mean']:.1f} | {r['steady_seconds_mean']:.1f} "
            f"| {100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} | {sp} "
            f"| {fmt(r.get('accuracy_diff_vs_baseline') and 100 * r['accuracy_diff_vs_baseline'], '+.2f')} | {sc} "
            f"| {fmt(r.get('accuracy_diff_vs_one_gpu') and 100 * r['accuracy_diff_vs_one_gpu'], '+.2f')} |")
    lines += ["", "## Every run", "", "| GPUs | method | seed | train s | steady s | accuracy % | process s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['method']} | {r['seed']} | failed | | | {r['process_seconds']:.0f} |")
        else:
            lines.append(f"| {r['variant']} | {r['method']} | {r['seed']} | {r['train_seconds']:.1f} | {r['steady_seconds']:.1f} "
                         f"| {100 * r['test_accuracy']:.2f} | {r['process_seconds']:.0f} |")
    v = next((r["versions"] for r in runs if "versions" in r), {})
    lines += ["", f"Versions: {', '.join(f'{k} {val}' for k, val in v.items())}", "",
              f"Command: `{session['command']}`", "", "Each run's own command is in ddp_scaling.json (`command`)."]
    if "warmup" in session:
        lines += ["", f"Before the timed runs, untimed ({session['warmup']['process_seconds']:.0f} s): `{session['warmup']['command']}`"]
    errors = [r for r in runs if "error" in r]
    if errors:
        lines += ["", "## Failed runs", ""] + [f"- {r['variant']} {r['method']} seed {r['seed']}: `{r['error'][-300:]}`" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.data, args.model, args.epochs, args.batch = "digits", "digitnet", 2, 64
        args.extra = (args.extra + " --device cpu --lr 0.05").strip()
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:  # every refusal before the folder is generated and the warm-up runs
        procs = parse_variant(v)[0]
        if args.batch % procs:
            raise SystemExit(f"error: --batch {args.batch} does not split evenly over {procs} processes")
    folder = generated_folder(args) if args.generate_images else None
    if not args.data:
        raise SystemExit("error: --data is required (or --generate-images, or --smoke)")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    session = {"data": args.data, "model": args.model, "epochs": args.epochs, "batch": args.batch,
               "command": " ".join(["python3", "benchmarks/ddp_scaling.py", *(argv if argv is not None else sys.argv[1:])])}
    if folder:
        session.update(folder=folder, image_size=args.image_size)
    if args.warmup_epochs > 0:
        session["warmup"] = warm_up(args, methods[0], seeds[0])
        print(f"[ddp_scaling] warm-up (untimed): {session['warmup']['process_seconds']:.1f} s", flush=True)
    runs = []
    for seed in seeds:  # interleaved, so drift hits every variant and method alike
        for method in methods:
            for variant in variants:
                rec = one_run(args, variant, method, seed)
                runs.append(rec)
                status = "FAILED" if "error" in rec else f"{rec['train_seconds']:.1f} s, acc {rec['test_accuracy']:.4f}"
                print(f"[ddp_scaling] {variant} GPU(s) {method} seed {seed}: {status}", flush=True)
                rows = summarise(runs, methods, variants)
                with open(os.path.join(args.out, "ddp_scaling.json"), "w") as f:
                    json.dump({"session": session, "runs": runs, "summary": rows}, f, indent=1)
                with open(os.path.join(args.out, "ddp_scaling.md"), "w") as f:
                    f.write(markdown(rows, runs, session))
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
