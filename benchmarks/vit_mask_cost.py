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

Then, per model, one attention call alone (``F.scaled_dot_product_attention`` forward and backward,
bf16 on CUDA, the model's heads, head size and tokens, batch ``--batch-size``): without a mask (a
plain pass), with the step's boolean mask, and with the same mask as an additive bias, each under
PyTorch's own choice of kernel and under each kernel forced (``torch.nn.attention.sdpa_kernel``;
"refused" where a kernel does not take that input). The mask is the one the model builds
(:func:`mixtrain.models.separation_mask`) for the same pair composites. Multiplied by the depth,
the difference to the plain call is what the mask costs a step in attention alone.

    python benchmarks/vit_mask_cost.py --out R
    python benchmarks/vit_mask_cost.py --smoke --out /tmp/vmc
"""

from __future__ import annotations

import argparse
import contextlib
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
from mixtrain.models import adapt, create_model, separation_mask, token_owner  # noqa: E402
from mixtrain.trainer import resolve_device, versions  # noqa: E402


def pair_pool_masks(model, batch: int, device) -> torch.Tensor:
    """The pool masks of ``batch`` pair composites with random area splits (seeded)."""
    rng = np.random.default_rng(0)
    plan = P.pairs(np.arange(batch), np.arange(batch), rng.uniform(0.25, 0.75, batch), rng.integers(0, 2, batch),
                   2, model.grid, 0.25)
    return pool_masks(torch.from_numpy(plan.box).long(), model.grid).to(device)


def step_ms(name: str, size: int, batch: int, separate: bool, device, repeats: int) -> float:
    torch.manual_seed(0)
    model = adapt(create_model(name, 10, 3, size), size, 3, separate_attention=separate).to(device)
    assert model.separates_attention == separate
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=cuda)
    masks = pair_pool_masks(model, batch, device)
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


KERNELS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
           "math": "MATH"}


def attention_rows(name: str, size: int, batch: int, device, repeats: int) -> list[dict]:
    """One attention call (forward + backward) of the model's shape: no mask, the boolean mask and
    the additive mask, under each kernel; ``ms`` None where the kernel refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = adapt(create_model(name, 10, 3, size), size, 3)
    attn = model.model.blocks[0].attn
    heads, dim, depth = attn.num_heads, attn.head_dim, len(model.model.blocks)
    n = model.grid[0] * model.grid[1]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    allowed = separation_mask(token_owner(pair_pool_masks(model, batch, device) > 0))
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad = torch.randn(batch, heads, n, dim, device=device, dtype=dtype, generator=g)
    rows = []
    for form, mask in (("none", None), ("bool", allowed), ("additive", bias)):
        for kernel, backend in KERNELS.items():
            def call():  # forward + backward, gradients returned (none accumulated between calls)
                with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
                    torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), grad)
            try:
                ms = median_ms(call, device, repeats, inner=10 if cuda else 1, warmup=3 if cuda else 1)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # this kernel does not take this input (or this device)
                ms = None
            rows.append({"model": name, "heads": heads, "head_dim": dim, "tokens": n, "depth": depth, "mask": form,
                         "kernel": kernel, "ms": ms})
    return rows


def attention_table(rows: list[dict]) -> list[str]:
    """Markdown: each call's time and its excess over the plain call (no mask, automatic kernel)
    times the depth, i.e. per training step."""
    lines = ["", "One attention call, forward + backward (ms); per step = (call - plain call) x depth.", "",
             "| model | heads x dim, tokens | mask | kernel | ms | per step vs plain, ms |", "|---|---|---|---|---:|---:|"]
    plain = {r["model"]: r["ms"] for r in rows if r["mask"] == "none" and r["kernel"] == "auto"}
    for r in rows:
        base = plain[r["model"]]
        extra = "" if r["ms"] is None or base is None else f"{(r['ms'] - base) * r['depth']:+.3f}"
        ms = "refused" if r["ms"] is None else f"{r['ms']:.4f}"
        lines.append(f"| {r['model']} | {r['heads']} x {r['head_dim']}, {r['tokens']} | {r['mask']} | {r['kernel']} | {ms} | {extra} |")
    return lines


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
    rows, calls = [], []
    for spec in args.models.split(","):
        name, size = spec.split(":")
        pooled = step_ms(name, int(size), args.batch_size, False, device, args.repeats)
        masked = step_ms(name, int(size), args.batch_size, True, device, args.repeats)
        rows.append({"model": name, "size": int(size), "pooling_ms": pooled, "attention_ms": masked,
                     "ratio": masked / pooled})
        print(rows[-1], flush=True)
        calls += attention_rows(name, int(size), args.batch_size, device, args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vit_mask_cost.json"), "w") as f:
        json.dump({"versions": versions(), "device": str(device), "batch_size": args.batch_size, "rows": rows,
                   "attention_calls": calls}, f, indent=2)
    lines = [f"# ViT separation by attention: step time ({versions().get('gpu', device.type)}, batch {args.batch_size} pair composites)",
             "", "| model | px | pooling ms | attention ms | ratio |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['size']} | {r['pooling_ms']:.2f} | {r['attention_ms']:.2f} | {r['ratio']:.3f} |" for r in rows]
    lines += attention_table(calls)
    with open(os.path.join(args.out, "vit_mask_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
