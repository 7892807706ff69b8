"""Run a queue of `mixtrain bench` jobs on the GPUs of one host until a deadline, one job per GPU at
a time, and copy each job's results out as soon as it stops.

Made for the lent GPU machines: a call may run at most ten minutes and the machine is kept while
calls follow each other, so a queue longer than one call is run by the same command in several
calls. Every job runs with ``--resume`` (a bench already finished returns at once, a cut one
continues) and ``--stop-after`` set to the time left, so no run is started that the deadline would
kill; ``timeout`` stops anything that still overruns.

Queue file, one job per line (``#`` starts a comment)::

    GPU  NAME  BENCH ARGUMENTS...

``GPU`` is the index of the GPU that runs the job, or ``any``: a job taken by the first GPU whose
own jobs are done. ``NAME`` is the job's folder under ``--work`` (and under ``--copy-to``). The
bench arguments are those of ``python3 -m mixtrain bench`` without ``--out``, ``--device``,
``--resume`` and ``--stop-after``, which this script sets.

    PYTHONPATH=src python3 benchmarks/gpu_queue.py QUEUE --seconds 560 --work /root/w --tar $OUT/w.tar

``--tar`` rewrites one tar of the whole work folder (logs and results, no weights) after every job:
the lent machines hand back only a few files per call, and a tar written after each job survives a
call that ends early.

What it times: nothing itself; each bench records its own times. Hardware and versions are in each
bench's results.json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time

MARGIN_S = 15  # kept free before the deadline for writing results and copying them out


def read_queue(path: str) -> list[tuple[str, str, list[str]]]:
    """``[(gpu, name, bench args)]`` from the queue file; refuses what this script sets itself."""
    jobs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if len(words) < 3 or not (words[0] == "any" or words[0].isdigit()):
                raise SystemExit(f"error: {path}:{n}: expected 'GPU NAME BENCH-ARGS...' (GPU a number or 'any')")
            taken = {"--out", "--device", "--devices", "--resume", "--stop-after"} & set(words[2:])
            if taken:
                raise SystemExit(f"error: {path}:{n}: {', '.join(sorted(taken))} is set by this script")
            jobs.append((words[0], words[1], words[2:]))
    return jobs


def copy_results(src: str, dst: str) -> None:
    """The bench folder without model weights (checkpoints stay on the machine)."""
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt", "*.pth"))


def write_tar(work: str, path: str) -> None:
    """``work`` (without model weights) as one tar at ``path``, replaced atomically."""
    if not os.path.isdir(work):
        return
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w") as tar:
        tar.add(work, arcname=".", filter=lambda m: None if m.name.endswith((".pt", ".pth")) else m)
    os.replace(tmp, path)


def run_job(gpu: str, name: str, args: list[str], deadline: float, work: str, copy_to: str | None,
            device: str = "cuda") -> None:
    left = deadline - time.time() - MARGIN_S
    if left < 60:  # not even a bench's data loading and warm-up would fit
        print(f"[gpu {gpu}] {name}: skipped, {left:.0f} s left", flush=True)
        return
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "mixtrain", "bench", *args, "--device", device, "--out", out, "--resume",
           "--stop-after", f"{left - 5:.0f}"]
    print(f"[gpu {gpu}] {name}: {shlex.join(cmd)}", flush=True)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    t0 = time.time()
    with open(os.path.join(work, f"{name}.log"), "a") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[gpu {gpu}] {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    if copy_to:
        copy_results(out, os.path.join(copy_to, name))
        shutil.copy(os.path.join(work, f"{name}.log"), os.path.join(copy_to, f"{name}.log"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("queue")
    p.add_argument("--seconds", type=float, required=True, help="deadline: this many seconds from now")
    p.add_argument("--work", required=True, help="folder of the benches (kept on the machine between calls)")
    p.add_argument("--copy-to", help="folder to copy each bench's results and log to when it stops (e.g. $OUT)")
    p.add_argument("--tar", help="after every job, write the work folder (no weights) as one tar here (e.g. $OUT/w.tar)")
    p.add_argument("--device", default="cuda", help="--device of every bench (cpu for a dry run)")
    a = p.parse_args(argv)
    deadline = time.time() + a.seconds
    jobs = read_queue(a.queue)
    shared = [j for j in jobs if j[0] == "any"]
    lock = threading.Lock()
    tar_lock = threading.Lock()

    def job(gpu: str, name: str, args: list[str]) -> None:
        run_job(gpu, name, args, deadline, a.work, a.copy_to, a.device)
        if a.tar:
            with tar_lock:
                write_tar(a.work, a.tar)

    gpus = sorted({j[0] for j in jobs if j[0] != "any"}) or ["0"]

    def worker(gpu: str) -> None:
        for _, name, args in [j for j in jobs if j[0] == gpu]:
            job(gpu, name, args)
        while True:
            with lock:
                if not shared:
                    return
                _, name, args = shared.pop(0)
            job(gpu, name, args)

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
