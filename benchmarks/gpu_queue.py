"""Run a queue of `mixtrain bench` jobs on the GPUs of one host until a deadline, one job per GPU at
a time, keeping one tar of all their results current.

Made for the lent GPU machines: a call may run at most ten minutes and the machine is kept while
calls follow each other, so a queue longer than one call is run by the same command in several
calls. Every job runs with ``--resume`` (a bench already finished returns at once, a cut one
continues) and ``--stop-after`` set to the time left, so no run is started that the deadline would
kill; ``timeout`` stops anything that still overruns.

Queue file, one job per line (``#`` starts a comment)::

    GPU  NAME  BENCH ARGUMENTS...

``GPU`` is the index of the GPU that runs the job, or ``any``: a job taken by the first GPU whose
own jobs are done (and, once a run of it has finished there, kept on that GPU in later calls, so
that a bench's runs compare on one device). ``NAME`` is the job's folder under ``--work``. The bench arguments are
those of ``python3 -m mixtrain bench`` without ``--out``, ``--device``, ``--devices``,
``--resume`` and ``--stop-after``, which this script sets; they are parsed and checked (methods
and their options, epochs, seeds) before anything runs.
The script exits 1 if a bench exited non-zero, stopped with runs left (a bench stops itself before
the deadline rather than start a run that would not fit) or could not start.

    PYTHONPATH=src python3 benchmarks/gpu_queue.py QUEUE --seconds 560 --work /root/w --tar $OUT/w.tar

``--tar`` rewrites one tar of the whole work folder (logs and results, no weights) after every job:
the lent machines hand back only a few files per call, and a tar written after each job survives a
call that ends early.

What it times: nothing itself; each bench records its own times. Hardware and versions are in each
bench's results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time

MARGIN_S = 15  # kept free before the deadline for writing results and the tar
START_S = 30  # a bench's own clock starts after Python, torch and CUDA have started: --stop-after leaves this
FRESH_MIN_S = 180  # a bench with no finished run yet knows no run time: start it only with this much left
RESERVED = {"bench_out": "--out", "device": "--device", "devices": "--devices", "bench_resume": "--resume",
            "stop_after": "--stop-after"}


def read_queue(path: str) -> list[tuple[str, str, list[str]]]:
    """``[(gpu, name, bench args)]`` from the queue file. Each line's arguments are parsed by the
    bench's own parser here, so a typo fails now and not on the GPU machine; the options this script
    sets itself are refused, in any spelling argparse accepts (``--out=X``, ``--res``)."""
    from mixtrain import bench
    from mixtrain.cli import build_parser
    from mixtrain.errors import MixtrainError
    from mixtrain.options import MixOptions, cli_message

    parser = build_parser()
    defaults = parser.parse_args(["bench"])
    jobs, names = [], set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if len(words) < 3 or not (words[0] == "any" or words[0].isdigit()):
                raise SystemExit(f"error: {path}:{n}: expected 'GPU NAME BENCH-ARGS...' (GPU a number or 'any')")
            gpu, name, args = words[0], words[1], words[2:]
            if name in names:
                raise SystemExit(f"error: {path}:{n}: the name {name} is used twice: two benches would write one folder")
            names.add(name)
            try:
                parsed = parser.parse_args(["bench", *args])
            except SystemExit:
                raise SystemExit(f"error: {path}:{n}: the bench arguments above do not parse") from None
            taken = [flag for dest, flag in RESERVED.items() if getattr(parsed, dest) != getattr(defaults, dest)]
            if taken:
                raise SystemExit(f"error: {path}:{n}: {', '.join(taken)} is set by this script")
            if "/" in name or name.startswith("."):
                raise SystemExit(f"error: {path}:{n}: the name {name!r} must be a plain folder name")
            try:  # what the bench checks before training: methods and their options, epochs, seeds
                bench.parse_epochs(parsed.epoch_list)
                bench.parse_seeds(parsed.seeds)
                for method in bench.parse_methods(parsed.methods):
                    dataclasses.replace(MixOptions(), **bench.split_method(method)[1]).check()
            except MixtrainError as e:
                raise SystemExit(f"error: {path}:{n}: {cli_message(e)}") from None
            jobs.append((gpu, name, args))
    return jobs


def write_tar(work: str, path: str) -> None:
    """``work`` as one tar at ``path``, replaced atomically: logs and results, no model weights and
    no temporary files. The other GPU's bench writes into ``work`` meanwhile, so a file that
    vanishes between listing and reading is left out (the next tar has it)."""
    if not os.path.isdir(work):
        return
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w") as tar:
        for root, dirs, files in os.walk(work):
            dirs.sort()
            for f in sorted(files):
                if f.endswith((".pt", ".pth", ".tmp")):
                    continue
                full = os.path.join(root, f)
                try:  # read whole first, so the entry's size is the size of what is written (files are small)
                    with open(full, "rb") as fh:
                        st, data = os.fstat(fh.fileno()), fh.read()
                except FileNotFoundError:  # removed meanwhile: the next tar has its successor
                    continue
                info = tarfile.TarInfo(os.path.relpath(full, work))
                info.size, info.mtime, info.mode = len(data), st.st_mtime, st.st_mode & 0o777
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def run_job(gpu: str, name: str, args: list[str], deadline: float, work: str, device: str = "cuda"):
    """Run (or continue) one bench on ``gpu``; returns its exit code, ``"timeout"``, or None if
    too little time was left to start it."""
    left = deadline - time.time() - MARGIN_S
    if left < 90:  # not even a bench's start, data loading and warm-up would fit
        print(f"[gpu {gpu}] {name}: not started, {left:.0f} s left", flush=True)
        return None
    out = os.path.join(work, name)
    if not finished_runs(out) and left < FRESH_MIN_S:
        print(f"[gpu {gpu}] {name}: not started, {left:.0f} s left for a bench with no run yet", flush=True)
        return None
    cmd = [sys.executable, "-m", "mixtrain", "bench", *args, "--device", device, "--out", out, "--resume",
           "--stop-after", f"{left - START_S:.0f}"]
    print(f"[gpu {gpu}] {name}: {shlex.join(cmd)}", flush=True)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=physical_gpu(gpu))
    t0 = time.time()
    with open(os.path.join(work, f"{name}.log"), "a") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[gpu {gpu}] {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    if finished_runs(out):  # timed here: a continued bench stays on this GPU
        with open(os.path.join(work, f"{name}.gpu"), "w") as f:
            f.write(gpu)
    return rc


def _results(out: str) -> dict:
    """The bench folder's results.json, or {} when it has none that can be read."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        return results if isinstance(results, dict) else {}
    except (OSError, ValueError):
        return {}


def finished_runs(out: str) -> int:
    """Runs (finished or diverged) in the bench folder ``out``."""
    results = _results(out)
    return len(results.get("runs", [])) + len(results.get("diverged", []))


def planned_runs(args: list[str]) -> int:
    """Runs a bench with these arguments plans: methods x epochs x seeds (parsed as the bench does)."""
    from mixtrain import bench
    from mixtrain.cli import build_parser

    parsed = build_parser().parse_args(["bench", *args])
    return (len(bench.parse_methods(parsed.methods)) * len(bench.parse_epochs(parsed.epoch_list))
            * len(bench.parse_seeds(parsed.seeds)))


def runs_left(out: str, args: list[str]) -> int:
    """Planned runs of the bench in ``out`` that have not finished (a bench that stops itself before
    ``--stop-after`` exits 0 with runs left: only this count says whether it is done)."""
    return max(0, planned_runs(args) - finished_runs(out))


def diverged_runs(out: str) -> int:
    """Runs of the bench folder ``out`` that stopped at a non-finite loss or weights."""
    return len(_results(out).get("diverged", []))


def physical_gpu(index: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of GPU ``index`` as this process sees it (index i of a
    parent that sees ``2,3`` is its i-th entry, not physical GPU i)."""
    seen = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return seen[int(index)] if "CUDA_VISIBLE_DEVICES" in os.environ and int(index) < len(seen) else index


def pinned_gpu(work: str, name: str) -> str | None:
    """The GPU a bench started on in an earlier call (each bench's runs compare on one device)."""
    try:
        with open(os.path.join(work, f"{name}.gpu")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("queue")
    p.add_argument("--seconds", type=float, required=True, help="deadline: this many seconds from now")
    p.add_argument("--work", required=True, help="folder of the benches (kept on the machine between calls)")
    p.add_argument("--tar", help="after every job, write the work folder (no weights) as one tar here (e.g. $OUT/w.tar)")
    p.add_argument("--gpus", help="the GPU indices to use, e.g. 0,1 (default: every GPU torch sees; with --device cpu, "
                                  "the indices the queue names)")
    p.add_argument("--device", default="cuda", help="--device of every bench (cpu for a dry run)")
    a = p.parse_args(argv)
    deadline = time.time() + a.seconds
    jobs = read_queue(a.queue)
    named = sorted({j[0] for j in jobs if j[0] != "any"}, key=int)
    if a.gpus:
        gpus = [g.strip() for g in a.gpus.split(",") if g.strip()]
    else:
        gpus = (visible_gpus() if a.device == "cuda" else named) or ["0"]
    missing = [g for g in named if g not in gpus]
    if missing:
        raise SystemExit(f"error: the queue names GPU {', '.join(missing)}, but only {', '.join(gpus)} are used (--gpus)")
    shared = [j for j in jobs if j[0] == "any"]
    pins = {n: pinned_gpu(a.work, n) for _, n, _ in shared}
    stranded = [(n, g) for n, g in pins.items() if g not in (None, *gpus)]
    if stranded:
        raise SystemExit("error: " + ", ".join(f"{n} was started on GPU {g}" for n, g in stranded)
                         + f", which is not among the GPUs used ({', '.join(gpus)}): give --gpus, or move its NAME.gpu")
    lock, tar_lock = threading.Lock(), threading.Lock()
    outcomes: dict[str, object] = {}

    def job(gpu: str, name: str, args: list[str]) -> None:
        try:
            outcomes[name] = run_job(gpu, name, args, deadline, a.work, a.device)
        except Exception as e:  # noqa: BLE001 -- one job's failure must not idle its GPU for the rest of the call
            outcomes[name] = f"failed: {e!r}"
            print(f"[gpu {gpu}] {name}: {outcomes[name]}", flush=True)
        if a.tar:
            with tar_lock:
                try:
                    write_tar(a.work, a.tar)
                except Exception as e:  # noqa: BLE001
                    print(f"[gpu {gpu}] tar failed: {e!r}", flush=True)

    def next_shared(gpu: str):
        with lock:
            for i, (_, name, args) in enumerate(shared):
                if pinned_gpu(a.work, name) in (None, gpu):
                    del shared[i]
                    return name, args
        return None

    def worker(gpu: str) -> None:
        for _, name, args in [j for j in jobs if j[0] == gpu]:
            job(gpu, name, args)
        while (taken := next_shared(gpu)) is not None:
            job(gpu, *taken)

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = {n: o for n, o in outcomes.items() if o not in (0, None)}
    waiting = [n for n, o in outcomes.items() if o is None] + [n for _, n, _ in shared]
    diverged = [n for n in outcomes if diverged_runs(os.path.join(a.work, n))]
    args_of = {n: args for _, n, args in jobs}
    left = {n: runs_left(os.path.join(a.work, n), args_of[n]) for n, o in outcomes.items() if o == 0}
    unfinished = {n: k for n, k in left.items() if k}
    print(f"done: {sum(k == 0 for k in left.values())} benches complete"
          + (f"; stopped with runs left (run the same command again): "
             f"{', '.join(f'{n} ({k} left)' for n, k in unfinished.items())}" if unfinished else "")
          + (f"; not started for lack of time: {', '.join(waiting)}" if waiting else "")
          + (f"; with diverged runs: {', '.join(diverged)}" if diverged else "")
          + (f"; problems: {', '.join(f'{n} ({o})' for n, o in bad.items())}" if bad else ""), flush=True)
    return 1 if bad or unfinished or waiting else 0


if __name__ == "__main__":
    raise SystemExit(main())
