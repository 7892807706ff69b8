"""Reference: how fast is a plain training step of the bare model, without mixtrain around it?

Hardware: one NVIDIA H100 through the device tool (CUDA required).
Times (CUDA events, median of repeats, after warm-up): forward + backward + SGD step of the
CIFAR ResNet-18 on a fixed random batch already on the GPU, in several layouts and precisions,
so the trainer's per-step time can be compared with the model's own floor. Prints the top CUDA
kernels of one configuration (torch.profiler) to show where the time goes.

    python benchmarks/plain_step.py [--batch-size 512] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import os

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _timing helper
from _timing import median_ms  # noqa: E402


def time_steps(model, x, y, amp, repeats=7, inner=20):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_ms(step, torch.device("cuda"), repeats, inner, warmup=10), step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    from mixtrain.models import create_model

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ a
    e1.record()
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (e0.elapsed_time(e1) / 1000) / 1e12:.0f} TFLOP/s")
    del a
    rows = []
    for name, cl, amp, bs, comp in [
        ("resnet18 channels-last bf16", True, True, args.batch_size, False),
        ("resnet18 NCHW bf16", False, True, args.batch_size, False),
        ("resnet18 channels-last bf16 2x batch", True, True, 2 * args.batch_size, False),
        ("resnet18 channels-last bf16 compiled", True, True, args.batch_size, True),
    ]:
        torch.manual_seed(0)
        m = create_model("resnet18", 10, 3, 32).to(dev)
        x = torch.randn(bs, 3, 32, 32, device=dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (bs,), device=dev)
        run = torch.compile(m) if comp else m
        ms, step = time_steps(run, x, y, amp)
        rows.append((name, bs, ms, ms * 50000 / bs / 1000))
        print(f"{name:45s} batch {bs:5d}: {ms:7.3f} ms/step, {ms * 50000 / bs / 1000:.3f} s per 50k images", flush=True)
        if args.profile and name == "resnet18 channels-last bf16":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
