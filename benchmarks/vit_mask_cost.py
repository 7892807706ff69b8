"""The cost of separating ViT constituents by attention, per training step.

Hardware: written for one NVIDIA H200 (the device tool); runs on the CPU with --smoke. Versions are
recorded in ``vit_mask_cost.json``.

For each ViT, one training step (forward with per-region pooling, cross-entropy over the
constituents, backward, SGD; bf16 autocast and channels-last on CUDA) on a fixed batch of pair
composites, timed two ways: ``--vit-separation pooling`` (the composite's tokens attend to each other,
regions pooled at the end) and ``attention`` (each constituent's tokens attend only to each other,
with position embeddings for its region: a boolean mask [B, 1, N, N] in every block and a per-token
position embedding). Median milliseconds over repeats (CUDA events after warm-up); the ratio is
the mask's cost per pass.

    python benchmarks/vit_mask_cost.py --out R
    python benchmarks/vit_mask_cost.py --smoke --out /tmp/vmc
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402
from mixtrain import plan as P  # noqa: E402
from mixtrain.compose import pool_masks  # noqa: E402
from mixtrain.models import adapt, create_model  # noqa: E402
from mixtrain.trainer import resolve_device, versions  # noqa: E402


def step_ms(name: str, size: int, batch: int, separate: bool, device, repeats: int) -> float:
    torch.manual_seed(0)
    model = adapt(create_model(name, 10, 3, size), size, 3, separate_attention=separate).to(device)
    assert model.separates_attention == separate
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=cuda)
    rng = np.random.default_rng(0)
    plan = P.pairs(np.arange(batch), np.arange(batch), rng.uniform(0.25, 0.75, batch), rng.integers(0, 2, batch),
                   2, model.grid, 0.25)
    masks = pool_masks(torch.from_numpy(plan.box).long(), model.grid).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch * 2,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x, masks)
        loss = F.cross_entropy(logits.float().reshape(-1, 10), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_ms(step, device, repeats, inner=10 if cuda else 1, warmup=5 if cuda else 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_tiny:32,vit_small:32,vit_tiny_224:224,vit_small_224:224")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/vit-mask-cost")
    p.add_argument("--smoke", action="store_true", help="CPU: vit_tiny at 16 px, batch 4, 2 repeats")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_size, args.repeats, args.device = "vit_tiny:16", 4, 2, "cpu"
    device = resolve_device(args.device)
    rows = []
    for spec in args.models.split(","):
        name, size = spec.split(":")
        pooled = step_ms(name, int(size), args.batch_size, False, device, args.repeats)
        masked = step_ms(name, int(size), args.batch_size, True, device, args.repeats)
        rows.append({"model": name, "size": int(size), "pooling_ms": pooled, "attention_ms": masked,
                     "ratio": masked / pooled})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vit_mask_cost.json"), "w") as f:
        json.dump({"versions": versions(), "device": str(device), "batch_size": args.batch_size, "rows": rows}, f, indent=2)
    lines = [f"# ViT separation by attention: step time ({versions().get('gpu', device.type)}, batch {args.batch_size} pair composites)",
             "", "| model | px | pooling ms | attention ms | ratio |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['size']} | {r['pooling_ms']:.2f} | {r['attention_ms']:.2f} | {r['ratio']:.3f} |" for r in rows]
    with open(os.path.join(args.out, "vit_mask_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
