"""How much does a constituent's prediction depend on its partners? Interference per architecture.

Hardware: anything; written to run on the 2-core CPU development machine (CIFAR-10 at 32 px, a
few hundred training steps per model) and on a GPU. Versions and device in
``interference_probe.json``. This measures no time.

Issue 16 asks why some models pay more accuracy for mixing than ResNet-18. One candidate is that
their features cross region borders more: a constituent's pooled features then carry its
partners. This probe measures that directly, per model:

1. The model (built and adapted as training does) is trained briefly on plain images, so its
   features are not those of a random network. AdamW at 1e-3, batch 64, random flip, ``--steps``
   steps. Its BN statistics are then those of plain images, and it runs in eval mode.
2. Composites are built by hand, so that only the partner changes between two composites. A
   **pair** splits the image at the middle column, a grid boundary: each half shows the centre
   crop of one image. A **quad** puts four images, each downscaled 2x, in the four quadrants. Each
   constituent is pooled over its own region of the feature grid, as in training.
3. For constituent A (left half; top-left quadrant):
   * ``leak`` = median over samples of ||z(A | partners) - z(A | other partners)|| /
     ||z(A | partners) - z(A' | partners)||. It is the change in A's logits when its partners are
     replaced, relative to the change when A itself is replaced: 0 means no interference, 1 means
     the partners matter as much as A does.
   * ``agree`` is the share of A's predicted classes that stay the same when the partners are
     replaced.
   * ``acc_alone`` is the plain test accuracy of the briefly trained model. ``acc_mixed`` is the
     accuracy of A's prediction in the composite. Both are on ``--samples`` test images.

A ViT that separates constituents by attention has ``leak`` 0 by construction, which checks the
probe. With ``--vit-separation pooling`` its tokens attend across regions.

``--from-runs DIR,...`` probes the models that finished ``mixtrain train`` runs instead (their
``config.json`` and ``checkpoint.pt``; no brief training): for example a baseline run beside a
mixtrain run, to see whether training under mixing teaches a model to let less in.

    python benchmarks/interference_probe.py --data npz:../shared/data/cifar10 --out R
    python benchmarks/interference_probe.py --from-runs runs/base,runs/mix --data npz:../shared/data/cifar10 --out R
    python benchmarks/interference_probe.py --smoke --out /tmp/ip
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from mixtrain.compose import Normalizer, pool_masks  # noqa: E402
from mixtrain.data import load_data  # noqa: E402
from mixtrain.errors import MixtrainError  # noqa: E402
from mixtrain.models import adapt, create_model  # noqa: E402
from mixtrain.plan import quad_boxes  # noqa: E402
from mixtrain.trainer import resolve_device, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="", help="CIFAR-shaped data spec (npz:DIR); required unless --smoke")
    p.add_argument("--models", default="resnet18,resnet34,resnet50,mobilenetv2,vit_tiny,vit_tiny[pooling]",
                   help="comma-separated; a ViT with [pooling] runs without attention separation")
    p.add_argument("--from-runs", default="", help="comma-separated mixtrain train --out folders: probe their trained models (not --models)")
    p.add_argument("--steps", type=int, default=300, help="plain training steps before probing (batch 64)")
    p.add_argument("--samples", type=int, default=256, help="test images probed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/interference-probe")
    p.add_argument("--smoke", action="store_true", help="synthetic 32 px data, resnet18 and vit_tiny, 1 step, 16 samples")
    return p.parse_args(argv)


def parse_model(spec: str) -> tuple[str, bool]:
    """'vit_tiny[pooling]' -> ('vit_tiny', False); 'resnet18' -> ('resnet18', True)."""
    name, _, tag = spec.partition("[")
    if tag not in ("", "pooling]"):
        raise SystemExit(f"error: --models {spec!r}: the only tag is [pooling]")
    return name, tag == ""


def center_crop_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    left = (x.shape[-1] - width) // 2
    return x[..., left : left + width]


def pair_composite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A's centre crop in the left half, B's in the right half."""
    half = a.shape[-1] // 2
    return torch.cat([center_crop_cols(a, half), center_crop_cols(b, a.shape[-1] - half)], dim=-1)


def quad_composite(imgs: list[torch.Tensor]) -> torch.Tensor:
    """Four images downscaled 2x into the quadrants: [top-left, top-right, bottom-left, bottom-right]."""
    h, w = imgs[0].shape[-2:]
    small = [F.interpolate(t, size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False) for t in imgs]
    return torch.cat([torch.cat(small[:2], dim=-1), torch.cat(small[2:], dim=-1)], dim=-2)


def region_masks(grid: tuple[int, int], kind: str, n: int, device) -> torch.Tensor:
    """Pooling weights [n, K, gh, gw] of the pair's halves or the quad's quadrants (each sums to 1):
    the training step's own :func:`~mixtrain.compose.pool_masks` of those boxes (grid cells)."""
    gh, gw = grid
    mx = gw // 2
    boxes = [(0, 0, gh, mx), (0, mx, gh, gw)] if kind == "pair" else quad_boxes(grid)  # the plan's own quadrants
    m = pool_masks(torch.tensor(boxes, dtype=torch.float32, device=device), grid)
    return m.expand(n, *m.shape).contiguous()


def train_briefly(model, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    """AdamW 1e-3, batch 64, random flip: just enough for features that are not a random network's."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb = x[idx.to(x.device)]
        flip = (torch.rand(64, generator=g) < 0.5).to(x.device)
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(model(xb), y[idx.to(y.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def logits_of_first(model, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 64):
        out.append(model(x[i : i + 64], masks[i : i + 64])[:, 0].float())
    return torch.cat(out)


@torch.no_grad()
def probe(model, x: torch.Tensor, y: torch.Tensor, kind: str, seed: int) -> dict:
    """leak, agreement and A's accuracy for ``kind`` composites of the n images ``x``."""
    n = len(x)
    g = torch.Generator().manual_seed(seed + 1)
    perms = [torch.randperm(n, generator=g).to(x.device) for _ in range(7)]
    a, a_other = x, x[perms[0]]
    if kind == "pair":
        partners, others = [x[perms[1]]], [x[perms[2]]]
        build = lambda first, rest: pair_composite(first, rest[0])  # noqa: E731
    else:
        partners, others = [x[p] for p in perms[1:4]], [x[p] for p in perms[4:7]]
        build = lambda first, rest: quad_composite([first, *rest])  # noqa: E731
    masks = region_masks(model.grid, kind, n, x.device)
    z = logits_of_first(model, build(a, partners), masks)
    z_partners_changed = logits_of_first(model, build(a, others), masks)
    z_self_changed = logits_of_first(model, build(a_other, partners), masks)
    leak = (z - z_partners_changed).norm(dim=1) / (z - z_self_changed).norm(dim=1).clamp_min(1e-12)
    return {
        "leak_median": float(leak.median()),
        "leak_mean": float(leak.mean()),
        "agree": float((z.argmax(1) == z_partners_changed.argmax(1)).float().mean()),
        "acc_mixed": float((z.argmax(1) == y).float().mean()),
    }


def measure(model, label: str, test_x, test_y, seed: int) -> dict:
    """The row of one model (in eval mode): plain accuracy, then pairs and quads."""
    with torch.no_grad():
        plain = torch.cat([model(test_x[i : i + 64]).float() for i in range(0, len(test_x), 64)])
    row = {"model": label, "grid": list(model.grid), "acc_alone": float((plain.argmax(1) == test_y).float().mean()),
           "separates_attention": bool(getattr(model, "separates_attention", False))}
    for kind in ("pair", "quad"):
        row[kind] = probe(model, test_x, test_y, kind, seed)
    return row


def probe_model(spec: str, images, num_classes: int, args, device) -> dict:
    """Build ``spec`` as training does, train it briefly on plain images, probe it."""
    train_x, train_y, test_x, test_y = images
    name, separate = parse_model(spec)
    torch.manual_seed(args.seed)
    size, chans = train_x.shape[-1], train_x.shape[1]
    model = adapt(create_model(name, num_classes, chans, size), size, chans, separate_attention=separate).to(device)
    t0 = time.perf_counter()
    train_briefly(model, train_x, train_y, args.steps, args.seed)
    return {**measure(model, spec, test_x, test_y, args.seed), "steps": args.steps, "train_seconds": time.perf_counter() - t0}


def read_run(folder: str):
    """(TrainConfig, checkpoint state) of a finished ``mixtrain train`` run, read as ``mixtrain show`` does."""
    from mixtrain.show import _read_run

    try:
        cfg, _, state = _read_run(folder)
    except MixtrainError as e:  # its messages name show's --from
        raise MixtrainError(str(e).replace("--from ", "--from-runs ", 1)) from None
    return cfg, state


def probe_run(folder: str, images, num_classes: int, args, device) -> dict:
    """The finished model of a ``mixtrain train`` run (its options and last checkpoint), probed."""
    cfg, state = read_run(folder)
    test_x, test_y = images[2], images[3]
    size, chans = test_x.shape[-1], test_x.shape[1]
    model = adapt(create_model(cfg.resolved_model(), num_classes, chans, size), size, chans,
                  separate_attention=cfg.vit_separation == "attention")
    model.load_state_dict(state["model"])
    model.to(device).eval()
    label = f"{cfg.resolved_model()} {cfg.method} ({os.path.basename(os.path.normpath(folder))}, {int(state['epoch'])} epochs)"
    return {**measure(model, label, test_x, test_y, args.seed), "run": folder, "steps": 0, "train_seconds": 0.0}


def load_images(args, device):
    """((train x, train y, test x, test y), classes): normalised float images on ``device``."""
    if args.smoke and not args.data:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (96,), generator=g)
        return (x[:64].to(device), y[:64].to(device), x[64:].to(device), y[64:].to(device)), 10
    data = load_data(args.data)
    normalize = Normalizer(data.mean, data.std, device)  # as training normalises

    def norm(t):
        return normalize(t.to(device))

    g = torch.Generator().manual_seed(args.seed)
    test = torch.randperm(len(data.test_y), generator=g)[: args.samples]
    images = (norm(data.train_x), data.train_y.long().to(device), norm(data.test_x[test]), data.test_y[test].long().to(device))
    return images, data.num_classes


def markdown(rows: list[dict], session: dict) -> str:
    lines = [
        "# Interference per architecture: how much a constituent's logits depend on its partners",
        "",
        f"Data: {session['data']}; "
        + ("trained models of mixtrain train runs, " if not session["steps"] else
           f"{session['steps']} plain training steps per model (AdamW 1e-3, batch 64), ") +
        f"{session['samples']} test images probed; device {session['device']}; seed {session['seed']}.",
        "",
        "leak: median ||z(A | partners) - z(A | other partners)|| / ||z(A | partners) - z(A' | partners)||; "
        "agree: A's predicted class unchanged when its partners change; acc: plain and in-composite accuracy of A.",
        "",
        "| model | grid | acc alone % | pair leak | pair agree % | pair acc % | quad leak | quad agree % | quad acc % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, q = r["pair"], r["quad"]
        lines.append(f"| {r['model']} | {r['grid'][0]}x{r['grid'][1]} | {100 * r['acc_alone']:.1f} "
                     f"| {p['leak_median']:.3f} | {100 * p['agree']:.1f} | {100 * p['acc_mixed']:.1f} "
                     f"| {q['leak_median']:.3f} | {100 * q['agree']:.1f} | {100 * q['acc_mixed']:.1f} |")
    v = session["versions"]
    lines += ["", f"Versions: {', '.join(f'{k} {val}' for k, val in v.items())}", "", f"Command: `{session['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        return run(parse_args(argv), argv)
    except MixtrainError as e:
        raise SystemExit(f"error: {e}") from None


def run(args, argv) -> int:
    runs = [r for r in args.from_runs.split(",") if r]
    if args.smoke:
        args.models, args.steps, args.samples = "resnet18,vit_tiny,vit_tiny[pooling]", 1, 16
    if runs and not args.data:
        args.data = read_run(runs[0])[0].data  # the first run's data, unless --data says where it is here
    if not args.data and not args.smoke:
        raise SystemExit("error: --data is required (or --from-runs, or --smoke)")
    specs = [] if runs else [m for m in args.models.split(",") if m]
    for s in specs:
        parse_model(s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images, num_classes = load_images(args, device)
    os.makedirs(args.out, exist_ok=True)
    session = {"data": args.data or "synthetic (smoke)", "steps": 0 if runs else args.steps, "samples": len(images[3]),
               "seed": args.seed, "device": str(device), "versions": versions(),
               "command": " ".join(["python3", "benchmarks/interference_probe.py", *(argv if argv is not None else sys.argv[1:])])}
    rows = []
    jobs = [(r, probe_run) for r in runs] + [(s, probe_model) for s in specs]
    for what, fn in jobs:
        rows.append(fn(what, images, num_classes, args, device))
        r = rows[-1]
        print(f"[interference] {r['model']}: acc {r['acc_alone']:.3f}, pair leak {r['pair']['leak_median']:.3f}, "
              f"quad leak {r['quad']['leak_median']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
        with open(os.path.join(args.out, "interference_probe.json"), "w") as f:
            json.dump({"session": session, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "interference_probe.md"), "w") as f:
            f.write(markdown(rows, session))
    return 0


if __name__ == "__main__":
    sys.exit(main())
