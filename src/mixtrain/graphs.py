"""The whole training step as one CUDA graph.

On a fast GPU a small model's eager step is bound by the host launching hundreds of kernels
(measured on an H100 for the CIFAR ResNet-18 at batch 512: the bare eager step already costs as
much host time as device time). The step has fixed shapes and no host synchronisation, so it can
be captured once -- compose, forward, loss, backward, optimizer, loss-memory update -- and
replayed: per step the host then copies the batch's plan slices into static buffers, sets the
learning rate and launches the graph.

Capturing needs a few eager warm-up steps (cuDNN algorithm choice, gradient and momentum
buffers). They run on a snapshot: model, optimizer and loss memory are restored afterwards, so the
run's results are those of the eager loop.
"""

from __future__ import annotations

import warnings

import torch

from .batches import Batch
from .compose import Geometry
from .errors import MixtrainError, out_of_memory


class GraphedStep:
    """``step(batch, lr) -> loss`` replaying one captured training step.

    ``eager_step(batch) -> loss`` is the trainer's own step function, composing from resident
    images (it must read everything it needs from ``batch``; the same code runs for warm-up and
    capture). The optimizer's learning
    rates become device tensors, read by the fused SGD kernel at replay.
    """

    def __init__(self, eager_step, optimizer: torch.optim.Optimizer, model: torch.nn.Module, state=(),
                 extra: tuple[torch.Tensor, ...] = (), eager_steps: int = 3, fallback: bool = True, stream=None):
        self.eager_step = eager_step
        # static inputs besides the batch (streamed images and their slot positions): each step's
        # values are copied into their leading rows before the replay; eager_step(batch, *extra)
        self.extra = extra
        self.optimizer = optimizer
        self.model = model
        # tensors the step updates besides the model and optimizer (a strategy's loss memory:
        # Strategy.step_state()); the warm-up steps are undone on them too
        self.state = tuple(state)
        self.eager_steps = eager_steps
        # False under DDP: the ranks capture together, and one rank training eagerly while the others
        # replay would pair its all-reduces with nothing; a failed capture is then an error
        self.fallback = fallback
        # the stream for the eager steps and the capture (None: a new side stream, and the graph's
        # own). Under DDP the stream DDP was built on: its gradient accumulators belong to that
        # stream, and a capture on another one can fail
        self.stream = stream
        self.graph = None
        self.static: Batch | None = None
        self.loss = None
        for g in optimizer.param_groups:
            if not torch.is_tensor(g["lr"]):
                g["lr"] = torch.tensor(float(g["lr"]), device=next(model.parameters()).device)

    # -- buffers --------------------------------------------------------------------------------

    @staticmethod
    def _clone_batch(b: Batch) -> Batch:
        geo = Geometry(*(t.clone() for t in b.geo.tensors()), exclusive=b.geo.exclusive)
        return Batch(b.index.clone(), b.valid.clone(), b.share.clone(), geo, b.samples, b.single,
                     None if b.weight is None else b.weight.clone())

    def _load(self, b: Batch):
        s = self.static
        if b.geo.exclusive != s.geo.exclusive:  # a different compose structure than the one captured
            raise RuntimeError("this batch's regions overlap (or not) unlike the captured step's")
        s.index.copy_(b.index, non_blocking=True)
        s.valid.copy_(b.valid, non_blocking=True)
        s.share.copy_(b.share, non_blocking=True)
        if s.weight is not None:
            s.weight.copy_(b.weight, non_blocking=True)
        for dst, src in zip(s.geo.tensors(), b.geo.tensors()):
            dst.copy_(src, non_blocking=True)
        s.samples = b.samples

    def _load_extra(self, values: tuple[torch.Tensor, ...]):
        for dst, src in zip(self.extra, values):
            dst[: src.shape[0]].copy_(src, non_blocking=True)

    def _set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"].fill_(lr)

    # -- capture --------------------------------------------------------------------------------

    def _snapshot(self):
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in self.optimizer.state.items()}
        return model, opt, [t.clone() for t in self.state]

    @torch.no_grad()
    def _restore(self, snap):
        model, opt, mem = snap
        for k, v in self.model.state_dict().items():
            v.copy_(model[k])
        for p, st in self.optimizer.state.items():
            saved = opt.get(id(p))
            for k, v in st.items():
                if torch.is_tensor(v):
                    if saved is not None and k in saved:
                        v.copy_(saved[k])
                    else:  # a buffer the warm-up created: as if never used (SGD's first step sets buf = grad)
                        v.zero_()
        for t, saved in zip(self.state, mem):
            t.copy_(saved)

    def capture(self, batch: Batch, lr: float, extra: tuple[torch.Tensor, ...] = ()) -> bool:
        """Warm up on ``batch`` and capture; returns False (and warns) if capture is not possible.
        Running out of memory (in the warm-up steps or the capture) is raised, not a fallback."""
        self.static = self._clone_batch(batch)
        self._load_extra(extra)
        self._set_lr(lr)
        snap = self._snapshot()
        side = self.stream if self.stream is not None else torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side), warnings.catch_warnings():
                # a capturable optimizer (AdamW) warns when stepped outside a capture: here on purpose
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(self.eager_steps):
                    self.eager_step(self.static, *self.extra)
            torch.cuda.current_stream().wait_stream(side)
            self._restore(snap)
            torch.cuda.synchronize()
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, **({} if self.stream is None else {"stream": self.stream})):
                self.loss = self.eager_step(self.static, *self.extra)
            self.graph = graph
            return True
        except Exception as e:  # keep training, eagerly -- unless the step does not fit in memory
            if out_of_memory(e):
                # falling back to the eager step would only run out of memory again, later and less
                # clearly: the caller turns this into an error naming the batch size
                self.graph = None
                raise
            if not self.fallback:
                self.graph = None
                raise MixtrainError(f"capturing the training step as a CUDA graph failed under DDP ({type(e).__name__}: "
                                    f"{e}); train without it: cuda_graph='off' (--cuda-graph off)") from e
            torch.cuda.synchronize()
            self._restore(snap)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); training eagerly", RuntimeWarning)
            self.graph = None
            return False

    def release(self):
        """Free the graph's private memory pool (activations, gradients, static buffers).

        Without this, every run in one process (a benchmark) keeps its pool: 24 ResNet runs in one
        process once held 71 GB of an 80 GB GPU.
        """
        if self.graph is not None:
            self.graph.reset()
        self.graph = None
        self.static = None
        self.extra = ()
        self.loss = None
        self.optimizer.zero_grad(set_to_none=True)  # the gradients live in the pool too
        for g in self.optimizer.param_groups:  # back to plain numbers for any later eager use
            if torch.is_tensor(g["lr"]):
                g["lr"] = float(g["lr"])

    def step(self, batch: Batch, lr: float, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        self._load(batch)
        self._load_extra(extra)
        self._set_lr(lr)
        self.graph.replay()
        return self.loss
