"""Split data folders into parts that each fit one device call, and print the calls.

A device call carries the checkout plus the ignored paths it names, at most 64 MiB counted as
disk usage (4 KiB blocks). The checkout grows with every session's results, so a fixed split
(such as ``../shared/tools/stage-cifar10``'s three parts) stops fitting. This script packs the
folders into one tar stream, cuts it into as few equal parts as fit beside today's checkout, and
prints one call per part: each copies its part to the GPU machine, the last joins and unpacks them.
Calls must follow each other within 30 s (the machine is given back after that, with its disk).

    python3 benchmarks/stage_parts.py ../shared/data/cifar10 data/imagenette --out .stage

puts ``cifar10/`` and ``imagenette/`` under ``--dest`` (default ``/root/data``) on the machine.
Needs only the standard library; writes nothing outside ``--out`` except one line in
``.git/info/exclude`` (so the parts are never committed, and a call carries them only by name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CALL_LIMIT = 64 * 2**20  # what one device call may carry, checkout included
BLOCK = 4096
MARGIN = 2 * 2**20  # slack for files the checkout gains between staging and the calls


def disk_usage(sizes) -> int:
    """Bytes the files of ``sizes`` occupy in whole 4 KiB blocks (how the call limit counts)."""
    return sum(-(-s // BLOCK) * BLOCK for s in sizes)


def checkout_usage(repo: Path) -> int:
    """Disk usage of what a call sends without being asked: the tracked and untracked-not-ignored
    files, a block per folder that holds them, and ``shared/`` where the checkout has one."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    paths = [repo / n for n in out.decode().split("\0") if n]
    shared = repo / "shared"
    if shared.is_dir():
        paths += [Path(d) / f for d, _, files in os.walk(shared) for f in files]
    files = [q for q in paths if q.is_file() and not q.is_symlink()]
    folders = {q.parent for q in files}
    return disk_usage(q.stat().st_size for q in files) + BLOCK * len(folders)


def part_count(total: int, room: int) -> int:
    """Fewest parts of ``total`` bytes each at most ``room`` bytes."""
    if room <= 0:
        raise ValueError("the checkout alone fills a device call; nothing can be carried beside it")
    return max(1, math.ceil(total / room))


def split_file(path: Path, parts: int, out: Path):
    """Cut ``path`` into ``parts`` pieces of (nearly) equal size: ``out/1/p`` ... ``out/N/p``."""
    size = path.stat().st_size
    each = -(-size // parts)
    with open(path, "rb") as src:
        for i in range(1, parts + 1):
            d = out / str(i)
            d.mkdir(parents=True)
            with open(d / "p", "wb") as dst:
                left = min(each, size - (i - 1) * each)
                while left > 0:
                    chunk = src.read(min(left, 2**24))
                    dst.write(chunk)
                    left -= len(chunk)


def calls(out: str, parts: int, dest: str) -> list[tuple[str, str]]:
    """(carry, command) of each call; the last command ends in ``&&``, ready for the work."""
    dest = dest.rstrip("/") or "/"
    q = shlex.quote
    spool = f"{dest}.parts"
    result = []
    for i in range(1, parts + 1):
        cmd = f"mkdir -p {q(spool)} {q(dest)} && cp {q(f'{out}/{i}/p')} {q(f'{spool}/{i}')}"
        if i == parts:
            joined = " ".join(q(f"{spool}/{j}") for j in range(1, parts + 1))
            cmd += f" && cat {joined} | tar xf - -C {q(dest)} && rm -rf {q(spool)} &&"
        result.append((json.dumps([f"{out}/{i}"]), cmd))
    return result


def is_our_output(out: Path) -> bool:
    """Whether ``out`` holds nothing but parts this script wrote (``1/p``, ``2/p``, ...)."""
    for entry in out.iterdir():
        if not (entry.is_dir() and not entry.is_symlink() and entry.name.isdigit()
                and [c.name for c in entry.iterdir()] in ([], ["p"])):
            return False
    return True


def check_out(repo: Path, out_arg: str, folders: list[Path]) -> str:
    """The problem with ``--out`` as one line, or "" when it is a safe place for the parts."""
    out = Path(out_arg)
    if out.is_absolute() or ".." in out.parts or out_arg.strip() in ("", ".") or out == Path("."):
        return f"--out must name a new folder inside the repository, got {out_arg!r}"
    target = (repo / out).resolve()
    for f in folders:
        src = f.resolve()
        if target == src or src in target.parents or target in src.parents:
            return f"--out {out_arg} overlaps the staged folder {f}"
    if target.exists() and not (target.is_dir() and is_our_output(target)):
        return f"--out {out_arg} exists and holds more than staged parts; name a new folder"
    return ""


def exclude(repo: Path, out: str):
    """Add ``/out/`` to the repository's own ignore list (not .gitignore: nothing to commit)."""
    git_dir = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=repo, capture_output=True, text=True)
    if git_dir.returncode:
        return
    ex = (repo / git_dir.stdout.strip() / "info" / "exclude")
    ex.parent.mkdir(parents=True, exist_ok=True)
    line = f"/{out.strip('/')}/"
    if line not in (ex.read_text().splitlines() if ex.exists() else []):
        with open(ex, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="folders to stage; each lands as DEST/<its name>")
    p.add_argument("--out", default=".stage", help="where the parts go, inside the repository (ignored by git)")
    p.add_argument("--dest", default="/root/data", help="folder on the GPU machine that receives the folders")
    p.add_argument("--part-mib", type=float, default=0,
                   help="largest part in MiB (default: what fits beside the checkout in one call)")
    args = p.parse_args(argv)

    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    repo = Path.cwd()
    if top.returncode or Path(top.stdout.strip()).resolve() != repo.resolve():
        print("error: run stage_parts.py from the repository's root (a call carries paths relative to it)",
              file=sys.stderr)
        return 2
    folders = [Path(f) for f in args.folders]
    for f in folders:
        if not f.is_dir():
            print(f"error: {f} is not a folder", file=sys.stderr)
            return 2
    names = [Path(os.path.abspath(f)).name for f in folders]
    if len(set(names)) != len(names):
        print(f"error: two folders share a name ({', '.join(names)}); they would land in the same place",
              file=sys.stderr)
        return 2
    problem = check_out(repo, args.out, folders)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    exclude(repo, str(out))  # first: parts left by an earlier run must not count as checkout
    room = CALL_LIMIT - checkout_usage(repo) - MARGIN
    if args.part_mib > 0:
        if args.part_mib * 2**20 > room:
            print(f"error: --part-mib {args.part_mib:g} is more than fits beside the checkout in one call "
                  f"({room / 2**20:.1f} MiB)", file=sys.stderr)
            return 2
        room = int(args.part_mib * 2**20)
    if out.exists():
        shutil.rmtree(out)

    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "stage.tar"
        with tarfile.open(tar_path, "w", dereference=True) as tar:  # links travel as what they point to
            for f, name in zip(folders, names):
                tar.add(f, arcname=name)
        total = tar_path.stat().st_size
        try:
            n = part_count(total, room - BLOCK)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        split_file(tar_path, n, out)

    print(f"{total / 2**20:.1f} MiB in {n} part(s) of at most {room / 2**20:.1f} MiB under {out}/; "
          f"make these {n} device calls back to back (each within 30 s of the last):")
    for i, (carry, cmd) in enumerate(calls(str(out), n, args.dest), 1):
        print(f"  {i}. carry {carry}\n     command: {cmd}" + (" <the work>" if i == n else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
