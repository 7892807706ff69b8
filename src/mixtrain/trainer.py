"""The training loop: one loop for every strategy.

    plan (host, once per epoch) -> fixed-size batches on the device -> augment + compose
    -> body -> region pooling -> head -> loss -> loss memory

Speed rules kept here: data resident on the device where it fits (uint8), fixed batch shapes,
no host synchronisation inside a step (LRs and sample counts are host numbers known from the
plan; losses accumulate on the device and are read once per epoch), bf16 autocast and
channels-last on CUDA, optional ``torch.compile``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed as D
from .batches import EpochBatches
from .compose import Augment, Normalizer
from .data import TensorData, load_data
from .errors import MixtrainError
from .loss import sample_stats, separated_loss, soft_label_loss
from .models import adapt, create_model
from .schedule import step_lrs
from .strategies import MixOptions, create_strategy


@dataclass
class TrainConfig:
    """Every option of a training run, with its default. Saved as ``config.json`` next to results."""

    data: str = "digits"
    model: str = "auto"  # auto: digitnet for digits, resnet18_224 for folders at >= 128 px, resnet18 otherwise
    method: str = "baseline"
    epochs: int = 30
    batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    out: str = "runs/latest"
    lr: float = 0.2  # peak learning rate of the one-cycle schedule
    warmup: float = 0.15  # fraction of all samples over which the LR rises to its peak
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # on CUDA
    compile: bool = False
    image_size: int = 0  # folder: training resolution (0: 224); tensor data keep their size
    pad: int = -1  # random-crop padding in pixels (-1: image size / 8; folder: 0)
    flip: str = "auto"  # auto (off for digits) | on | off
    workers: int = 8
    eval_every: int = 0  # evaluate on the test split every N epochs (0: only at the end)
    eval_batch_size: int = 1024
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: epoch ends only)
    resume: bool = False
    deterministic: bool = False
    progress: str = "auto"  # auto (bar on a terminal, a line per epoch otherwise) | bar | line | none
    csv: bool = False  # write out/log.csv
    tensorboard: bool = False  # write TensorBoard events under out/tb
    save_checkpoints: bool = True
    mix: MixOptions = field(default_factory=MixOptions)

    def resolved_model(self) -> str:
        if self.model != "auto":
            return self.model
        if self.data == "digits":
            return "digitnet"
        # ImageNet-style folders get the ImageNet-style stem; a CIFAR stem at 224 px would cost ~50x
        if self.data.startswith("folder:") and (self.image_size == 0 or self.image_size >= 128):
            return "resnet18_224"
        return "resnet18"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        d = dict(d)
        mix = MixOptions(**d.pop("mix", {}))
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(mix=mix, **{k: v for k, v in d.items() if k in names})

    def check(self):
        if self.epochs < 1:
            raise MixtrainError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MixtrainError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise MixtrainError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.flip not in ("auto", "on", "off"):
            raise MixtrainError(f"--flip must be auto, on or off, got {self.flip!r}")
        if self.progress not in ("auto", "bar", "line", "none"):
            raise MixtrainError(f"--progress must be auto, bar, line or none, got {self.progress!r}")
        self.mix.check()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MixtrainError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise MixtrainError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def versions() -> dict:
    import torchvision

    from . import __version__

    v = {
        "mixtrain": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    try:
        import timm

        v["timm"] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
        v["cuda"] = torch.version.cuda
    else:
        v["cpu"] = platform.processor() or platform.machine()
    return v


class Progress:
    """A tqdm bar on a terminal; one summary line per epoch otherwise."""

    def __init__(self, mode: str, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode if enabled else "none"
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, steps: int):
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="step")

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def end_epoch(self, row: dict, epochs: int):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode in ("bar", "line"):
            acc = f"  test_acc {row['test_accuracy']:.4f}" if "test_accuracy" in row else ""
            print(
                f"epoch {row['epoch']:>3}/{epochs}  passes {row['passes']:>8,}  samples {row['samples']:>8,}"
                f"  mixed {row['mixed_fraction']:.2f}  loss {row['train_loss']:.4f}  {row['seconds']:.2f}s{acc}",
                flush=True,
            )


class Trainer:
    """Runs one configuration; :meth:`fit` returns the metrics dict also written to ``metrics.json``."""

    def __init__(self, cfg: TrainConfig, data=None):
        cfg.check()
        self.cfg = cfg
        self.dist = D.setup(cfg.device)
        self.device = self.dist.device if self.dist.world > 1 else resolve_device(cfg.device)
        self.is_main = self.dist.rank == 0
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
        self.amp = self.device.type == "cuda" and cfg.precision in ("auto", "bf16") or cfg.precision == "bf16"

        self.data = data if data is not None else load_data(cfg.data, cfg.image_size or None, cfg.workers)
        self.data.to(self.device)
        n = self.data.num_train
        world_batch = cfg.batch_size * self.dist.world
        if world_batch > n:
            raise MixtrainError(
                f"batch size {cfg.batch_size} x {self.dist.world} process(es) is larger than the training set ({n} samples)"
            )
        self.image_hw = self.data.image_size
        size = self.image_hw[0]
        pad = cfg.pad if cfg.pad >= 0 else (0 if self.data.streaming else max(1, size // 8))
        flip = cfg.flip == "on" or (cfg.flip == "auto" and cfg.data != "digits")
        self.augment = Augment(pad=pad, flip=flip)
        self.normalize = Normalizer(self.data.mean, self.data.std, self.device)

        torch.manual_seed(cfg.seed)  # model initialisation (the trainer owns this process)
        net = create_model(cfg.resolved_model(), self.data.num_classes, self.data.channels, self.image_hw)
        self.model = adapt(net, self.image_hw, self.data.channels).to(self.device)
        if self.device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.grid = self.model.grid
        self.strategy = create_strategy(cfg.method, n, self.grid, cfg.epochs, self.device, cfg.mix)
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
        self.net = self.dist.wrap(self.model)
        self.forward = torch.compile(self.net, dynamic=False) if cfg.compile else self.net

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.log: list[dict] = []
        self.partial = None  # mid-epoch state when resuming from a step checkpoint
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        if cfg.resume:
            self._load(ckpt.load(self.ckpt_path))

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self, plan_arrays=None, partial=None) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "samples_seen": self.samples_seen,
            "log": self.log,
            "plan": plan_arrays,
            "partial": partial,
            "torch_rng": torch.get_rng_state(),
        }

    def _load(self, state: dict):
        saved = TrainConfig.from_dict(state["config"])
        for key in ("data", "model", "method", "epochs", "batch_size", "seed"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise MixtrainError(
                    f"cannot resume: the checkpoint in {self.cfg.out} was made with --{key.replace('_', '-')} "
                    f"{getattr(saved, key)!r}, this run asks for {getattr(self.cfg, key)!r}"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.samples_seen = state["samples_seen"]
        self.log = state["log"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("plan") is not None:
            from .plan import EpochPlan

            self.partial = (EpochPlan(**state["plan"]), state["partial"])

    def _save(self, plan=None, partial=None):
        if self.is_main and self.cfg.save_checkpoints:
            arrays = plan.arrays() if plan is not None else None
            ckpt.save_atomic(self.state_dict(arrays, partial), self.ckpt_path)

    # ------------------------------------------------------------------------------------------
    # one step

    def _images(self, batch, source):
        images, src = source
        return batch.compose(images, self.normalize, self.augment, self.strategy.blend, src)

    def _train_step(self, batch, x, labels):
        s = self.strategy
        targets = labels[batch.index]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if s.separate:
                masks = None if s.slots == 1 else batch.pool_masks()
                logits = self.forward(x, masks)
                if logits.ndim == 2:
                    logits = logits[:, None]
            else:
                logits = self.forward(x)
        if s.separate:
            loss, _ = separated_loss(logits, targets, batch.valid, self.cfg.label_smoothing)
        else:
            loss = soft_label_loss(logits, targets, batch.share, batch.valid, self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if s.separate:
            nll, correct = sample_stats(logits.detach(), targets)
            s.observe(batch.index.reshape(-1), batch.valid.reshape(-1), nll.reshape(-1), correct.reshape(-1))
        return loss.detach()

    # ------------------------------------------------------------------------------------------
    # epochs

    def _epoch_rngs(self, epoch: int):
        seed = self.cfg.seed
        plan_rng = np.random.default_rng([seed, epoch, 1])
        pad_rng = np.random.default_rng([seed, epoch, 2])
        aug_seed = int(np.random.default_rng([seed, epoch, self.dist.rank, 3]).integers(2**62))
        aug = torch.Generator().manual_seed(aug_seed)
        return plan_rng, pad_rng, aug

    def fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump({**cfg.to_dict(), "resolved_model": cfg.resolved_model(), "grid": list(self.grid),
                           "augment": asdict(self.augment), "world_size": self.dist.world}, f, indent=2)
        progress = Progress(cfg.progress, self.is_main)
        writers = _Writers(cfg, self.is_main)
        n = self.data.num_train
        total = float(cfg.epochs * n)
        labels = self.data.train_y
        self.model.train()

        while self.epoch < cfg.epochs:
            epoch = self.epoch
            plan_rng, pad_rng, aug_gen = self._epoch_rngs(epoch)
            self._sync()
            t0 = time.perf_counter()
            if self.partial is not None:
                plan, partial = self.partial
                self.partial = None
            else:
                plan, partial = self.strategy.plan_epoch(epoch, plan_rng), None
            batches = EpochBatches(plan, cfg.batch_size, self.grid, self.device, aug_gen,
                                   self.dist.rank, self.dist.world, pad_rng)
            lrs = step_lrs(batches.global_samples, self.samples_seen - (partial or {}).get("samples", 0), total, cfg.lr, cfg.warmup)
            loss_sum = torch.zeros((), device=self.device)
            bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
            seconds_before = 0.0
            if partial:
                loss_sum += partial["loss_sum"]
                seconds_before = partial["seconds"]
            source = self._source(batches)
            progress.start_epoch(epoch, cfg.epochs, len(batches) - self.step_in_epoch)
            for j in range(self.step_in_epoch, len(batches)):
                batch = batches.batch(j)
                for g in self.optimizer.param_groups:
                    g["lr"] = float(lrs[j])
                x = self._images(batch, source(j))
                loss = self._train_step(batch, x, labels)
                loss_sum += loss * batch.samples
                bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step, j)
                self.samples_seen += int(batches.global_samples[j])
                self.step_in_epoch = j + 1
                progress.step()
                if cfg.checkpoint_every and (j + 1) % cfg.checkpoint_every == 0 and j + 1 < len(batches):
                    self._check_finite(bad_step, epoch)
                    self._sync()
                    secs = seconds_before + time.perf_counter() - t0
                    done = int(batches.global_samples[: j + 1].sum())
                    self._save(plan, {"loss_sum": loss_sum.item(), "seconds": secs, "samples": done})
            self.strategy.end_epoch(self.dist.world > 1)
            self._sync()
            seconds = seconds_before + time.perf_counter() - t0
            self._check_finite(bad_step, epoch)
            loss_total = self.dist.sum(loss_sum).item()
            row = {
                "epoch": epoch + 1,
                "passes": plan.passes,
                "samples": plan.samples,
                "seconds": seconds,
                "train_loss": loss_total / max(1, plan.samples),
                "mixed_fraction": plan.mixed_samples / n,
                "lr_end": float(lrs[-1]),
            }
            self.epoch += 1
            self.step_in_epoch = 0
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0) and self.epoch < cfg.epochs:
                row["test_accuracy"] = self.evaluate()
            self.log.append(row)
            self._save()
            progress.end_epoch(row, cfg.epochs)
            writers.epoch(row)

        t_eval = time.perf_counter()
        acc = self.evaluate()
        eval_seconds = time.perf_counter() - t_eval
        if self.log:
            self.log[-1]["test_accuracy"] = acc
        metrics = {
            "method": cfg.method,
            "model": cfg.resolved_model(),
            "data": cfg.data,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "world_size": self.dist.world,
            "passes": sum(r["passes"] for r in self.log),
            "samples": sum(r["samples"] for r in self.log),
            "train_seconds": sum(r["seconds"] for r in self.log),
            "eval_seconds": eval_seconds,
            "test_accuracy": acc,
            "grid": list(self.grid),
            "device": str(self.device),
            "versions": versions(),
            "options": self.strategy.options(),
            "epochs_log": self.log,
        }
        metrics["pass_speedup"] = metrics["samples"] / max(1, metrics["passes"])
        if self.is_main:
            _write_json(os.path.join(cfg.out, "metrics.json"), metrics)
        writers.close(metrics)
        return metrics

    def _check_finite(self, bad_step, epoch):
        s = int(bad_step.item())
        if s >= 0:
            last = f"epoch {epoch}" if epoch > 0 else "none (the first epoch had not finished)"
            raise MixtrainError(
                f"non-finite loss at epoch {epoch + 1}, step {s + 1}; stopped. "
                f"Last good checkpoint: {last} in {self.ckpt_path}. Try a lower --lr."
            )

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _source(self, batches):
        """Per-step image source: the resident uint8 tensor, or the folder stream."""
        if not self.data.streaming:
            images = self.data.train_x
            return lambda j: (images, None)
        from .stream import FolderStream

        stream = FolderStream(self.data, batches, self.device, self.cfg.workers, self.step_in_epoch)
        return stream.get

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 accuracy on the test split (plain forward, global pooling)."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        bs = self.cfg.eval_batch_size
        if self.data.streaming:
            chunks = ((x.to(self.device, non_blocking=True), y.to(self.device)) for x, y in
                      self.data.test_loader(bs, self.device.type == "cuda"))
        else:
            tx, ty = self.data.test_x, self.data.test_y
            if self.dist.world > 1:  # each rank scores its share
                tx, ty = tx[self.dist.rank :: self.dist.world], ty[self.dist.rank :: self.dist.world]
            chunks = zip(tx.split(bs), ty.split(bs))
        for x, y in chunks:
            x = self.normalize(x)
            if self.device.type == "cuda" and self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(x)
            correct += (logits.argmax(-1) == y).sum()
            total += len(y)
        self.model.train()
        correct = self.dist.sum(correct.float()).item()
        total = self.dist.sum(torch.tensor(float(total), device=self.device)).item()
        return correct / max(1, total)


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class _Writers:
    """Optional per-epoch logs: CSV and TensorBoard."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.csv = None
        self.tb = None
        if not enabled:
            return
        if cfg.csv:
            self.csv_path = os.path.join(cfg.out, "log.csv")
            self.csv = True
            self.rows_written = 0
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MixtrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"))

    def epoch(self, row: dict):
        if self.csv:
            import csv

            keys = ["epoch", "passes", "samples", "seconds", "train_loss", "mixed_fraction", "lr_end", "test_accuracy"]
            new = not os.path.exists(self.csv_path) or row["epoch"] == 1
            with open(self.csv_path, "w" if row["epoch"] == 1 else "a", newline="") as f:
                w = csv.DictWriter(f, keys, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        if self.tb:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(f"train/{k}", v, row["epoch"])

    def close(self, metrics: dict):
        if self.tb:
            self.tb.add_scalar("test/accuracy", metrics["test_accuracy"], metrics["epochs"])
            self.tb.close()


def train(cfg: TrainConfig | None = None, data=None, **overrides) -> dict:
    """Run one training configuration; returns the metrics (also written to ``cfg.out``)."""
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise MixtrainError(f"unknown training option {k!r}")
        setattr(cfg, k, v)
    return Trainer(cfg, data).fit()
