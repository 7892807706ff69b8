"""``mixtrain bench --devices A,B,...``: one bench over several devices, one process per device.

The seeds are dealt out to the devices in turn (seeds 0,1,2 over two GPUs: 0 and 2 on the first,
1 on the second). Each device runs an ordinary bench of every method and epoch budget for its
seeds, in its own process, into ``OUT/parts/<i>-<device>``; so each speedup still compares runs of
one process on one device. When they finish, the parts are merged into ``OUT/results.json`` and
one report (:func:`mixtrain.bench.merge_results`: same setup, device model and torch version).

Each child is this same command line with ``--device``, ``--seeds`` and ``--out`` of its part
appended (argparse keeps the last value given) and ``--devices`` emptied; a child for ``cuda:N``
sees only that GPU (``CUDA_VISIBLE_DEVICES``) and trains on ``--device cuda``. ``--resume`` and
``--stop-after`` pass to every child as they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

from .errors import MixtrainError

PARTS = "parts"


def check_devices(devices: list[str]):
    """Every name in ``--devices`` is one ``--device`` takes: a typo is refused before any part
    starts (a device that exists by name but fails in its child is reported after the others finish)."""
    from .distributed import CUDA_DEVICE, DEVICE_NAMES

    bad = [d for d in devices if d not in ("auto", "cpu") and not re.fullmatch(CUDA_DEVICE, d)]
    if bad:
        raise MixtrainError(f"--devices: {', '.join(map(repr, bad))} is not a device; give {DEVICE_NAMES}")


def deal_seeds(seeds: list[int], devices: list[str]) -> list[list[int]]:
    """``seeds`` dealt out to ``devices`` in turn; every device gets at least one."""
    twice = sorted({d for d in devices if d.startswith("cuda") and devices.count(d) > 1})  # cpu,cpu: two processes
    if twice:
        raise MixtrainError(f"--devices names {', '.join(twice)} more than once: two benches on one GPU would time each other")
    if len(devices) > len(seeds):
        raise MixtrainError(f"--devices names {len(devices)} devices but there are {len(seeds)} seeds: each device "
                            "runs whole seeds, so give at least one seed per device (--seeds)")
    check_devices(devices)
    return [seeds[i :: len(devices)] for i in range(len(devices))]


def part_dir(out: str, part: str) -> str:
    """The folder of the part named ``part`` (a key of :func:`layout_of`) of the bench in ``out``."""
    return os.path.join(out, PARTS, part)


def isolate(device: str, visible: str | None) -> tuple[str, dict]:
    """``(--device, environment)`` of the child for ``device``: ``cuda:N`` becomes ``cuda`` in a
    process that sees only that GPU (``CUDA_VISIBLE_DEVICES``, mapped through the one this process
    has, ``visible``), so that no child creates a context on another one's GPU."""
    if not (device.startswith("cuda:") and device[5:].isdigit()):
        return device, {}
    n = int(device[5:])
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None  # "": no GPU
    if ids is not None and n >= len(ids):
        raise MixtrainError(f"--devices: {device} asked for, but CUDA_VISIBLE_DEVICES={visible} shows {len(ids)} GPU(s)")
    return "cuda", {"CUDA_VISIBLE_DEVICES": ids[n] if ids is not None else str(n)}


def child_argv(argv: list[str], device: str, seeds: list[int], out: str) -> list[str]:
    """The command line of one device's bench: ``argv`` with that device, its seeds (as a list,
    so that one seed is not read as a count) and its folder appended; ``--devices`` emptied."""
    seed_list = ",".join(str(s) for s in (seeds if len(seeds) > 1 else seeds * 2))
    return [*argv, "--devices", "", "--device", device, "--seeds", seed_list, "--out", out]


def _relay(stream, prefix: str, tail: list[str]):
    """Print a child's lines as they come, prefixed with its device; keep the last few."""
    for line in stream:
        print(f"{prefix} {line}", end="", flush=True)
        tail.append(line.rstrip())
        del tail[:-5]


def layout_of(devices: list[str], seeds: list[int]) -> dict[str, dict]:
    """Which part (``<i>-<device>``, a folder under ``OUT/parts``) runs which device and seeds; kept
    in the merged results, so that a resumed bench deals them out the same way."""
    dealt = deal_seeds(seeds, devices)
    return {f"{i}-{d.replace(':', '')}": {"device": d, "seeds": own} for i, (d, own) in enumerate(zip(devices, dealt))}


def check_continuable(out: str, layout: dict, resume: bool) -> dict | None:
    """A --devices bench in ``out`` is new, or continued (``resume``) with the same devices and seeds;
    returns its merged results so far (None when new)."""
    from .bench import existing_results

    results = existing_results(out, resume)
    if results is None:
        return None
    before = results.get("devices")
    if before is None:
        raise MixtrainError(f"{out} holds a bench run in one process: continue it without --devices")
    if before != layout:
        was = "; ".join(f"{v['device']} seeds {','.join(map(str, v['seeds']))}" for v in before.values())
        raise MixtrainError(f"{out} was run as {was}: continue it with the same --devices and --seeds")
    return results


def run_on_devices(argv: list[str], out: str, layout: dict[str, dict]) -> list[str]:
    """Run one bench process per part of ``layout`` at once and wait for all; returns the devices
    whose bench failed (each with its exit status and last line). An interrupted wait stops them."""
    isolated = [isolate(v["device"], os.environ.get("CUDA_VISIBLE_DEVICES")) for v in layout.values()]  # errors first
    children = []
    try:
        for (name, part), (own_device, own_env) in zip(layout.items(), isolated):
            folder = part_dir(out, name)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            cmd = [sys.executable, "-m", "mixtrain", *child_argv(argv, own_device, part["seeds"], folder)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **own_env}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                    errors="replace", env=env)
            tail: list[str] = []
            prefix = f"[{part['device']} seeds {','.join(map(str, part['seeds']))}]"
            relay = threading.Thread(target=_relay, args=(proc.stdout, prefix, tail), daemon=True)
            relay.start()
            children.append((part["device"], proc, relay, tail))
        failed = []
        for device, proc, relay, tail in children:
            proc.wait()
            relay.join()
            if proc.returncode != 0:
                failed.append(f"{device} (exit {proc.returncode}: {tail[-1] if tail else 'no output'})")
        return failed
    finally:
        for _, proc, _, _ in children:  # nothing left running after an interrupt or an error here
            if proc.poll() is None:
                proc.terminate()
