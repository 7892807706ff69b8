"""Distributed data parallel under torchrun: NCCL on GPUs, gloo on CPUs.

Every rank builds the same epoch plan (same seed, same merged loss memory), takes its own share
of each global batch, and merges its loss-memory writes with the others once per epoch.

What is global and what is per rank:

* global: the epoch plan, the loss memory (after each merge), the LR schedule (samples seen by
  all ranks), the model weights (DDP averages gradients), the metrics;
* per rank: its share of each global batch (``--batch-size`` items), the augmentation draws, the
  composition of its items' pixels, its forward/backward pass.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import MixtrainError, OptionError

# Set to a folder to make each rank write what it trained on each epoch (a debugging aid, and
# what the tests check): ``rank{r}_epoch{e}.npz`` with the rank's sample ids and plan hashes.
RECORD_ENV = "MIXTRAIN_RECORD_SAMPLES"


def ddp_options(graphed: bool, bucket_mb: float = 25.0) -> dict:
    """DDP's keyword arguments. Every parameter takes part in every step (body, region pooling,
    head; empty slots pool to zero vectors but still go through the head), so no search for unused
    parameters. ``bucket_mb``: the all-reduce bucket size. For a captured step (``graphed``) the
    gradients are views into the buckets (no copy in or out, and fixed addresses the replayed
    all-reduce reads) and the graph is static (the same buckets in the same order every step)."""
    opts = {"find_unused_parameters": False, "bucket_cap_mb": float(bucket_mb)}
    if graphed:
        opts.update(gradient_as_bucket_view=True, static_graph=True)
    return opts


# eager DDP steps before a capture: DDP settles its buckets and hooks over its first iterations
# (PyTorch's CUDA-graph notes ask for at least 11 before capturing a DDP step)
DDP_EAGER_STEPS = 11


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    capture_stream: object = None  # the CUDA stream DDP was built on for a captured step (wrap sets it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model, graphed: bool = False, bucket_mb: float = 25.0):
        """``model`` in DDP when there are several processes (the trainer calls the wrapper).
        ``graphed``: the step will be captured as a CUDA graph, all-reduce included (see
        :func:`ddp_options`); DDP is then built on a side stream, as capture requires."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs = dict(device_ids=ids, output_device=ids[0] if ids else None, **ddp_options(graphed, bucket_mb))
        if not (graphed and self.device.type == "cuda"):
            return DDP(model, **kwargs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            wrapped = DDP(model, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.capture_stream = side  # the capture must run on it too (GraphedStep's stream)
        return wrapped

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def first_flag(self, step: torch.Tensor) -> int:
        """The smallest non-negative value of ``step`` over the ranks, or -1 if none has one.

        Used for the first non-finite step: every rank must agree, or one rank would stop while
        the others wait for it in the next collective.
        """
        if self.world == 1:
            return int(step.item())
        big = torch.iinfo(torch.long).max
        t = torch.where(step >= 0, step, torch.full_like(step, big))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        v = int(t.item())
        return -1 if v == big else v

    @torch.no_grad()
    def broadcast_buffers(self, module: torch.nn.Module):
        """Rank 0's buffers (batch-norm statistics) on every rank, as DDP does before each forward:
        each rank's last training step updated its own copy, and rank 0's is the one saved."""
        if self.world > 1:
            for b in module.buffers():
                dist.broadcast(b, 0)

    def barrier(self):
        if self.world > 1:
            dist.barrier()


CUDA_DEVICE = r"cuda(?::(\d+))?"  # the --device names of GPUs: cuda, cuda:N
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The ``device`` option (auto, cpu, cuda, cuda:N) as a device; an :class:`OptionError` for what
    cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(CUDA_DEVICE, name)
    if not m:
        raise OptionError("{device} must be " + DEVICE_NAMES + " (N = 0, 1, ...), got {got!r}", got=name)
    if not torch.cuda.is_available():
        raise OptionError("{device} {got} asked for, but PyTorch sees no CUDA GPU", got=name)
    if m.group(1) is not None:
        index, count = int(m.group(1)), torch.cuda.device_count()
        if index >= count:
            raise OptionError("{device} {got}: no such GPU; PyTorch sees {count} (cuda:0 to cuda:{last})",
                              got=name, count=count, last=count - 1)
        return torch.device("cuda", index)
    return torch.device("cuda")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or run alone.

    A process group that already exists (one's own script called ``init_process_group``) is
    used as it is; one created here is destroyed when the process exits.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    if not dist.is_available():
        raise MixtrainError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    resolve_device(device_pref)  # the same checks as for one process
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        use_cuda = dist.get_backend() != "gloo" and device_pref != "cpu" and torch.cuda.is_available()
    else:
        try:
            rank = int(os.environ["RANK"])
        except (KeyError, ValueError):
            raise MixtrainError("WORLD_SIZE > 1 but RANK is not set: start multi-process runs with torchrun") from None
        use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise MixtrainError(
                f"process with LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} visible; "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
        except (ValueError, RuntimeError) as e:
            raise MixtrainError(f"could not join the process group (start with torchrun): {e}") from e
        atexit.register(_destroy)
        world = dist.get_world_size()
    return DistInfo(rank, world, local, device)


def _destroy():
    if dist.is_initialized():
        try:  # leave together: a rank tearing its group down while another still talks can abort it
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Debugging aid: what each rank trained on


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def plan_digest(plan) -> str:
    """A hash of an epoch plan: equal on two ranks iff they planned the same epoch."""
    return _digest(plan.arrays().values())


def state_digest(state) -> str:
    """A hash of the tensors and arrays in a (nested) state dict, in key order."""
    leaves = []

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k])
        elif isinstance(x, (torch.Tensor, np.ndarray)):
            leaves.append(x)

    walk(state)
    return _digest(leaves)


def record_epoch(folder: str, info: DistInfo, epoch: int, plan, batches, strategy, samples_seen: int):
    """Write ``folder/rank{r}_epoch{e}.npz``: the sample ids this rank trained on (in order), the
    global plan's sample ids, hashes of the plan and of the strategy state after the epoch's merge,
    the shape of this rank's batches ``[steps, batch size, slots]``, and the global samples seen."""
    os.makedirs(folder, exist_ok=True)
    shard = batches.plan
    np.savez(
        os.path.join(folder, f"rank{info.rank}_epoch{epoch}.npz"),
        ids=shard.index[shard.valid],
        plan_ids=plan.index[plan.valid],
        plan_sha=np.array(plan_digest(plan)),
        strategy_sha=np.array(state_digest(strategy.state_dict())),
        batch_shape=np.array(batches.index.shape),
        samples_seen=np.array(samples_seen),
        world=np.array(info.world),
    )
