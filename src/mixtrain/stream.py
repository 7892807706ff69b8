"""Streaming uint8 images from host memory in the order of an epoch plan.

For a store too large to sit on the GPU (a folder cache, memory-mapped): for each step, exactly
the distinct samples that step's items show are gathered on the host into a pinned buffer by a
background thread running several steps ahead, and copied to the GPU on a side CUDA stream one
step ahead, so copies overlap compute. The device then composes them like resident data, using
each slot's position in the loaded batch. Under DDP each rank's batches hold only its share of
the plan, so each rank reads only what it trains on (from the same memory-mapped file: the page
cache is the node-shared host copy).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .plan import box_shows


def step_lists(index: np.ndarray, box: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per step, the distinct samples to load and each slot's position among them.

    ``index [S, B, K]`` and ``box [S, B, K, 4]`` are one epoch's items grouped by step. A slot
    whose box is empty shows nothing (an unused slot): it points at its item's first slot
    instead, so it costs no load of its own. Padding items show a real image (their box is the
    whole grid) and are loaded like any other.
    """
    ids = np.where(box_shows(box), index, index[..., :1])
    lists, local = [], []
    for step in ids:
        uniq, inverse = np.unique(step, return_inverse=True)
        lists.append(uniq.astype(np.int64))
        local.append(inverse.reshape(step.shape).astype(np.int64))
    return lists, local


class HostStream:
    """``get(j)`` -> (uint8 images ``[M, C, H, W]`` on ``device``, slot positions ``[B, K]``).

    ``host``: a CPU uint8 tensor ``[N, C, H, W]`` (for example a memory-mapped cache). Steps must
    be read in order, from ``start`` (a resumed epoch starts mid-way). A thread gathers each
    step's images into one of ``ahead + 1`` host buffers (pinned on CUDA), running up to that many
    steps ahead; the copy of step ``j + 1`` to one of two device buffers is started while step
    ``j`` computes (on CUDA, on a side stream after the step that last read that buffer). Buffers
    hold ``B * K`` rows, the most distinct samples a step can show, and are allocated once. On
    the CPU the same code runs with plain buffers and synchronous copies.
    """

    def __init__(self, host: torch.Tensor, batches, device, start: int = 0, ahead: int = 3, threads: int = 0):
        n, b = batches.num_batches, batches.batch_size
        index = batches.plan.index.reshape(n, b, -1)[start:]
        box = batches.plan.box.reshape(n, b, -1, 4)[start:]
        self.lists, local = step_lists(index, box)
        local = torch.from_numpy(np.stack(local)) if local else torch.zeros(0, b, 1, dtype=torch.int64)
        self.device = torch.device(device)
        self.local = local.to(self.device)  # all steps' slot positions in one copy; a step then takes a view
        self.host = host
        self.start = start
        self.next_j = start
        self.cuda = self.device.type == "cuda"
        self.thread = None
        if not self.lists:
            return
        shape = (index.shape[1] * index.shape[2], *host.shape[1:])
        slots = ahead + 1
        self.staging = [torch.empty(shape, dtype=host.dtype, pin_memory=self.cuda) for _ in range(slots)]
        self.dev = [torch.empty(shape, dtype=host.dtype, device=self.device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copied: dict[int, torch.cuda.Event | None] = {}
        self.free: queue.Queue = queue.Queue()
        for s in range(slots):
            self.free.put((s, None))
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        # one thread copies about 3 GB/s (measured: a host-streamed ResNet-18 at 160 px capped at
        # ~20k images/s), so a step's gather is split over several threads (index_select frees the GIL)
        self.threads = threads or max(1, min(8, (os.cpu_count() or 2) - 2))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mixtrain-gather") if self.threads > 1 else None
        self.thread = threading.Thread(target=self._gather_ahead, name="mixtrain-host-stream", daemon=True)
        self.thread.start()
        self._issue(start)

    def _gather_ahead(self):
        try:
            for i, ids in enumerate(self.lists):
                slot, event = self.free.get()
                if self.stop.is_set():
                    return
                if event is not None:
                    event.synchronize()  # the copy that last read this staging buffer has finished
                self._gather(ids, self.staging[slot])
                self.ready.put((i, slot, None))
        except BaseException as e:  # reported on the training thread at its next get
            self.ready.put((-1, -1, e))

    def _gather(self, ids: np.ndarray, buf: torch.Tensor):
        idx = torch.from_numpy(ids)
        if self.pool is None or len(ids) < 2 * self.threads:
            torch.index_select(self.host, 0, idx, out=buf[: len(ids)])
            return
        bounds = np.linspace(0, len(ids), self.threads + 1).astype(int)
        jobs = [self.pool.submit(torch.index_select, self.host, 0, idx[a:b], out=buf[a:b])
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for job in jobs:
            job.result()

    def _issue(self, j: int):
        """Start copying step ``j``'s images into device buffer ``j % 2``."""
        if j - self.start >= len(self.lists):
            return
        i, slot, error = self.ready.get()
        if error is not None:
            raise error
        m = len(self.lists[i])
        if not self.cuda:
            self.dev[j % 2][:m].copy_(self.staging[slot][:m])
            self.copied[j] = None
            self.free.put((slot, None))
            return
        consumed = torch.cuda.Event()
        consumed.record(torch.cuda.current_stream(self.device))  # after the work that read buffer j % 2 (step j - 2)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(consumed)
            self.dev[j % 2][:m].copy_(self.staging[slot][:m], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.copied[j] = done
        self.free.put((slot, done))

    def get(self, j: int):
        if j != self.next_j:
            raise RuntimeError(f"host stream read out of order: step {j}, expected {self.next_j}")
        self.next_j += 1
        m = len(self.lists[j - self.start])
        done = self.copied.pop(j)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self._issue(j + 1)  # overlaps this step's compute
        return self.dev[j % 2][:m], self.local[j - self.start]

    def close(self):
        """Stop the gathering thread (an epoch ended, or stopped early)."""
        if self.thread is not None:
            self.stop.set()
            self.free.put((0, None))  # wake the thread if it waits for a buffer
            self.thread.join(timeout=10)
            self.thread = None
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False)
            self.pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
