"""The fast CIFAR-10 recipe (airbench-class network and optimisation, :mod:`mixtrain.airbench`),
trained as its own baseline or with MixTrain, on data resident on the device.

One run (:func:`train_run`): the whitening layer is set from 5,000 training images, then each
epoch the whole training set is flipped (alternating) and translated once (:class:`FlipTranslate`),
and trained in steps of ``batch_size`` passes with the loss summed over the samples each step
carries. Unmixed epochs (the baseline's, and mixtrain's first and last) are plain steps; mixed
epochs are planned by :class:`mixtrain.MixTrain` and composed by :class:`mixtrain.EpochBatches`
(the augmentation already done, so composing only places each constituent in its region). The
learning rate, the weight average and the stop are all in samples seen: a budget of ``epochs``
is ``ceil(N // batch_size * epochs)`` steps of the baseline, as in the published recipe, and
mixtrain stops when it has carried as many samples. Train time is measured with the device
synchronised, whitening included, evaluation excluded; the test-time-augmented evaluation is
timed on its own (the published script's total counts both).

:func:`run_fast` runs methods x epoch budgets x seeds after an untimed warm-up and writes
``results.json``, ``report.md`` and ``frontier.png`` (``mixtrain fast``, docs/fast-recipe.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .airbench import WIDTHS, AirbenchNet, FlipTranslate, WeightAverage, average_decay, init_whitening, lr_factor
from .airbench import recipe_optimizer, tta_logits
from .batches import EpochBatches
from .compose import Augment, Normalizer
from .errors import MixtrainError, OptionError
from .loss import sample_stats, separated_loss
from .models import SpatialModel
from .options import add_debug_option
from .strategies import Baseline, MixOptions, MixTrain

TARGET = 0.94
METHODS = ("baseline", "mixtrain")


@dataclass
class FastConfig:
    """The recipe's settings (the published values by default)."""

    batch_size: int = 1024
    lr: float = 11.5  # per 1024 samples, decoupled from momentum
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 samples, decoupled from the learning rate
    bias_scale: float = 64.0  # learning-rate factor of the batch-norm biases
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3  # epochs the whitening layer's bias trains before it is frozen
    whiten_images: int = 5000  # training images whose patches set the whitening layer
    translate: int = 2  # pixels of reflect-padded translation
    flip: bool = True  # alternating flip
    tta_level: int = 2  # 0 none, 1 mirror, 2 mirror + one-pixel translations
    pooling: str = "max"  # the head's pooling, and mixtrain's per region: max or avg
    average_every: int = 5  # steps between weight-average updates
    precision: str = "bf16"  # bf16: float32 weights, bf16 autocast on the GPU; fp16: half weights, float batch-norm (as published)
    widths: tuple = WIDTHS  # channels of the three conv groups (smaller for CPU smoke runs)


def recipe_mix_options(**overrides) -> MixOptions:
    """MixTrain's options for the short schedule: the first and the last epoch unmixed, pairs only
    (a 3x3 feature grid has no equal quadrants). ``overrides`` by field name."""
    opts = {"first_unmixed_epochs": 1, "final_unmixed_epochs": 1, "quad_confidence": 0.0}
    opts.update(overrides)
    if opts.get("scatter"):
        raise OptionError("{scatter} needs a ViT separated by attention; the fast recipe trains a CNN")
    return MixOptions(**opts)


def parse_budgets(text: str) -> list[float]:
    """``"8,9.9"`` -> ``[8.0, 9.9]`` epoch budgets (fractions allowed), sorted, without repeats."""
    try:
        values = sorted({float(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise MixtrainError(f"--epochs must be comma-separated numbers of epochs (like 8,9.9), got {text!r}") from None
    if not values or values[0] <= 0 or not all(math.isfinite(v) for v in values):
        raise MixtrainError(f"--epochs needs one or more positive epoch budgets, got {text!r}")
    return values


def parse_method(spec: str) -> tuple[str, dict]:
    """``"mixtrain(confidence=0.6)"`` -> ``("mixtrain", {"confidence": 0.6})``; baseline or mixtrain only."""
    from .bench import split_method

    name, overrides = split_method(spec)
    if name not in METHODS:
        raise MixtrainError(f"the fast recipe runs {' or '.join(METHODS)}, not {name!r} (in --methods)")
    for key in ("step_scale", "loss_per"):
        if key in overrides:
            raise MixtrainError(f"--methods {spec!r}: the fast recipe sums each step's loss over the samples it carries, "
                                f"so its steps already grow with them; it takes no {key}")
    return name, overrides


def memory_format(device) -> torch.memory_format:
    """Channels-last on the GPU (tensor-core convolutions); the CPU's batch-norm is far slower in it."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def input_dtype(cfg: FastConfig) -> torch.dtype:
    return torch.float16 if cfg.precision == "fp16" else torch.float32


def autocast_args(cfg: FastConfig, device) -> dict:
    device = torch.device(device)
    return dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and device.type == "cuda")


def build_model(num_classes: int, in_chans: int, image_size, cfg: FastConfig, device) -> SpatialModel:
    if cfg.precision not in ("bf16", "fp16"):
        raise MixtrainError(f"precision must be bf16 or fp16, got {cfg.precision!r}")
    net = AirbenchNet(num_classes, in_chans, tuple(cfg.widths), cfg.pooling).to(device).to(memory_format=memory_format(device))
    if cfg.precision == "fp16":  # the published form: half weights, batch-norm kept in float
        net.half()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.float()
    return SpatialModel(net, image_size, in_chans)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Loop:
    """One run's training state: model, optimizer, weight average, method, and the samples budget."""

    def __init__(self, model, method, data, cfg: FastConfig, budget: int, device):
        self.model, self.method, self.cfg, self.budget, self.device = model, method, cfg, budget, device
        self.opt = recipe_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.bias_scale, cfg.batch_size)
        self.average = WeightAverage(model)
        self.normalize = Normalizer(data.mean, data.std, device)
        self.labels = data.train_y
        self.seen = self.steps = self.passes = 0
        self.autocast, self.dtype = autocast_args(cfg, device), input_dtype(cfg)

    @property
    def done(self) -> bool:
        return self.seen >= self.budget

    def step(self, loss: torch.Tensor, samples: int, passes: int):
        """One optimizer step at the schedule's LR for the middle of the samples it carries."""
        factor = float(lr_factor((self.seen + samples / 2) / self.budget))
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.seen, self.steps, self.passes = self.seen + samples, self.steps + 1, self.passes + passes
        if self.steps % self.cfg.average_every == 0:
            self.average.update(average_decay(min(1.0, self.seen / self.budget)))

    def plain_epoch(self, images: torch.Tensor, generator: torch.Generator):
        """Whole images in a random order, full batches only (the last partial batch is dropped)."""
        b = self.cfg.batch_size
        order = torch.randperm(len(images), generator=generator).to(self.device)
        for j in range(len(order) // b):
            if self.done:
                return
            idx = order[j * b:(j + 1) * b]
            x = self.normalize(images[idx]).to(self.dtype).contiguous(memory_format=memory_format(self.device))
            y = self.labels[idx]
            with torch.autocast(**self.autocast):
                logits = self.model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing, reduction="sum")
            if self.method.uses_memory:  # the loss memory that plans the mixed epochs
                nll, correct = sample_stats(logits.detach()[:, None], y[:, None])
                self.method.observe(idx, torch.ones_like(idx, dtype=torch.bool), nll.view(-1), correct.view(-1))
            self.step(loss, b, b)

    def mixed_epoch(self, epoch: int, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator):
        """The method's plan: hard samples alone, well-learned ones in pairs, each with its own loss."""
        plan = self.method.plan_epoch(epoch, rng)
        batches = EpochBatches(plan, self.cfg.batch_size, self.model.grid, self.device, generator,
                               image_size=tuple(images.shape[-2:]), augment=Augment(pad=0, flip=False))
        for j in range(len(batches)):
            if self.done:
                return
            batch = batches.batch(j)
            x = batch.compose(images, self.normalize).to(self.dtype).contiguous(memory_format=memory_format(self.device))
            y = batch.targets(self.labels)
            with torch.autocast(**self.autocast):
                logits = self.method.forward(self.model, x, batch).float()
            mean, _ = separated_loss(logits, y, batch.valid, self.cfg.label_smoothing)
            self.method.record(batch, logits, y)
            self.step(mean * batch.samples, batch.samples, int(batches.global_passes[j]))


def budget_samples(num_train: int, epochs: float, batch_size: int) -> int:
    """Samples a run of ``epochs`` carries: the baseline's steps (full batches, as published) x batch size."""
    return math.ceil((num_train // batch_size) * epochs) * batch_size


def _train(loop: _Loop, data, epochs: float, seed: int) -> list[dict]:
    """The epochs of one run (timed by the caller); one log row per epoch."""
    cfg, model = loop.cfg, loop.model
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        init_whitening(model.model.whiten, loop.normalize(data.train_x[: cfg.whiten_images]))
    aug = FlipTranslate(data.train_x, cfg.translate, gen, cfg.flip)
    log = []
    for epoch in range(math.ceil(epochs) + 1):  # mixtrain's shorter epochs may need part of one more
        if loop.done:
            break
        model.model.whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
        images = aug.epoch(epoch, gen)
        before = (loop.seen, loop.passes)
        mixed = loop.method.mixing(epoch)
        if mixed:
            loop.mixed_epoch(epoch, images, rng, gen)
        else:
            loop.plain_epoch(images, gen)
        log.append({"epoch": epoch + 1, "mixed": mixed, "samples": loop.seen - before[0], "passes": loop.passes - before[1]})
    loop.average.update(1.0)  # end on the averaged weights
    return log


@torch.no_grad()
def evaluate(model, data, normalize, cfg: FastConfig, device, level: int, batch: int = 2000) -> float:
    """Test accuracy with test-time augmentation ``level`` (0: plain)."""
    model.eval()
    correct = torch.zeros((), device=device)
    autocast, dtype = autocast_args(cfg, device), input_dtype(cfg)
    for i in range(0, len(data.test_x), batch):
        x = normalize(data.test_x[i:i + batch]).to(dtype).contiguous(memory_format=memory_format(device))
        with torch.autocast(**autocast):
            logits = tta_logits(model, x, level)
        correct += (logits.argmax(-1) == data.test_y[i:i + batch]).sum()
    model.train()
    return float(correct) / len(data.test_x)


def train_run(data, method: str, epochs: float, seed: int, cfg: FastConfig, device) -> dict:
    """One timed run of the recipe (``method``: baseline or ``mixtrain(...)``) on resident ``data``."""
    name, overrides = parse_method(method)
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(data.num_classes, data.channels, data.image_size, cfg, device)
    n = data.num_train
    strategy = MixTrain(n, model.grid, math.ceil(epochs), device, recipe_mix_options(**overrides)) \
        if name == "mixtrain" else Baseline(n, model.grid, math.ceil(epochs), device)
    loop = _Loop(model, strategy, data, cfg, budget_samples(n, epochs, cfg.batch_size), device)
    _sync(device)
    t0 = time.perf_counter()
    log = _train(loop, data, epochs, seed)
    _sync(device)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    tta = evaluate(model, data, loop.normalize, cfg, device, cfg.tta_level)
    _sync(device)
    tta_seconds = time.perf_counter() - t1
    plain = evaluate(model, data, loop.normalize, cfg, device, 0)
    return {"method": method, "epochs": epochs, "seed": seed, "train_seconds": train_seconds,
            "tta_seconds": tta_seconds, "recipe_seconds": train_seconds + tta_seconds, "steps": loop.steps,
            "passes": loop.passes, "samples": loop.seen, "tta_accuracy": tta, "accuracy": plain, "epochs_log": log}


# ----------------------------------------------------------------------------------------------
# many runs: summary, frontier, report


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, epochs): means and sample stds over seeds, and the share of runs at 94 %."""
    from .bench import mean_std

    rows = []
    for key in dict.fromkeys((r["method"], r["epochs"]) for r in runs):
        rs = [r for r in runs if (r["method"], r["epochs"]) == key]
        row = {"method": key[0], "epochs": key[1], "runs": len(rs)}
        for field in ("train_seconds", "recipe_seconds", "tta_accuracy", "accuracy", "passes", "samples"):
            row[field], row[field + "_std"] = mean_std([r[field] for r in rs])
        row["at_target"] = sum(r["tta_accuracy"] >= TARGET for r in rs) / len(rs)
        rows.append(row)
    return rows


def time_to_target(rows: list[dict], method: str, target: float = TARGET) -> float | None:
    """Train seconds at which ``method``'s mean TTA accuracy reaches ``target``, interpolated
    linearly between its epoch budgets (None when no budget measured reaches it, or the first does)."""
    pts = sorted((r["train_seconds"], r["tta_accuracy"]) for r in rows if r["method"] == method)
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if a0 < target <= a1:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return pts[0][0] if pts and pts[0][1] >= target and len(pts) == 1 else None


def equal_time_gains(rows: list[dict], reference: str = "baseline") -> list[dict]:
    """Each other row's TTA accuracy minus the reference's, interpolated at the same train seconds."""
    from .bench import interpolate

    ref = [r for r in rows if r["method"] == reference]
    xs, ys = [r["train_seconds"] for r in ref], [r["tta_accuracy"] for r in ref]
    out = []
    for r in rows:
        if r["method"] != reference:
            at = interpolate(xs, ys, r["train_seconds"]) if ref else None
            out.append({"method": r["method"], "epochs": r["epochs"], "train_seconds": r["train_seconds"],
                         "gain": None if at is None else r["tta_accuracy"] - at})
    return out


def _pm(mean, std, scale=1.0, fmt="{:.2f}") -> str:
    return fmt.format(mean * scale) + ("" if std is None else " ± " + fmt.format(std * scale))


def render_report(results: dict) -> str:
    """The markdown report of a :func:`run_fast` results dict (with the published script's runs, if any)."""
    rows = results["summary"]
    lines = [f"# Fast recipe: {results.get('data', '')}", "",
             f"Device: {results.get('device', {}).get('name', '?')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()), "",
             f"Command: `{results.get('command', '')}`", "",
             "| method | epochs | runs | passes | train s | train+TTA s | TTA accuracy % | plain accuracy % | runs >= 94 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['epochs']:g} | {r['runs']} | {r['passes']:,.0f} | "
                     f"{_pm(r['train_seconds'], r['train_seconds_std'])} | {_pm(r['recipe_seconds'], r['recipe_seconds_std'])} | "
                     f"{_pm(r['tta_accuracy'], r['tta_accuracy_std'], 100)} | {_pm(r['accuracy'], r['accuracy_std'], 100)} | "
                     f"{100 * r['at_target']:.0f} % |")
    ref = results.get("reference")
    if ref and ref.get("runs"):
        lines += ["", _reference_line(ref)]
    lines += ["", "Time to 94 % (mean TTA accuracy, interpolated between epoch budgets):", ""]
    for m in dict.fromkeys(r["method"] for r in rows):
        t = time_to_target(rows, m)
        lines.append(f"- {m}: " + ("not reached within the budgets measured" if t is None else f"{t:.2f} s of training"))
    gains = equal_time_gains(rows)
    if gains:
        lines += ["", "At equal train time (against the baseline's time-accuracy line; outside it: not measured):", ""]
        lines += [f"- {g['method']}, {g['epochs']:g} epochs ({g['train_seconds']:.2f} s): "
                  + ("outside the baseline's range" if g["gain"] is None else f"{100 * g['gain']:+.2f} points")
                  for g in gains]
    lines += ["", "Train seconds: whitening + training, device synchronised, evaluation excluded; train+TTA adds the "
              "test-time-augmented evaluation, as the published script's total does.", ""]
    return "\n".join(lines)


def _reference_line(ref: dict) -> str:
    from .bench import mean_std

    accs, secs = [r["tta_accuracy"] for r in ref["runs"]], [r["seconds"] for r in ref["runs"]]
    (a, sa), (t, st) = mean_std(accs), mean_std(secs)
    return (f"Published script (`{ref.get('script', '')}`, {len(accs)} runs, its own timing: whitening, training and "
            f"TTA evaluation): TTA accuracy {_pm(a, sa, 100)} % in {_pm(t, st)} s; "
            f"{100 * sum(x >= TARGET for x in accs) / len(accs):.0f} % of runs >= 94 %.")


def frontier_rows(results: dict) -> list[dict]:
    """Rows for :func:`mixtrain.bench.plot_frontier`: TTA accuracy vs train + TTA seconds (the published
    script's own measure, so its runs sit on the same axis)."""
    from .bench import mean_std

    rows = [{"method": r["method"], "epochs": r["epochs"], "train_seconds": r["recipe_seconds"],
             "train_seconds_std": r["recipe_seconds_std"], "accuracy": r["tta_accuracy"],
             "accuracy_std": r["tta_accuracy_std"]} for r in results["summary"]]
    ref = results.get("reference")
    if ref and ref.get("runs"):
        (a, sa), (t, st) = mean_std([r["tta_accuracy"] for r in ref["runs"]]), mean_std([r["seconds"] for r in ref["runs"]])
        rows.append({"method": "published script", "epochs": ref.get("epochs", 9.9), "train_seconds": t,
                     "train_seconds_std": st, "accuracy": a, "accuracy_std": sa})
    return rows


def write_outputs(out: str, results: dict, plot: bool = True):
    """``OUT/results.json``, ``OUT/report.md`` and (with ``plot``, when there are runs) ``OUT/frontier.png``."""
    from .bench import _write_json, _write_text, plot_frontier

    os.makedirs(out, exist_ok=True)
    results["summary"] = summarize(results["runs"])
    _write_json(os.path.join(out, "results.json"), results)
    _write_text(os.path.join(out, "report.md"), render_report(results))
    if plot and results["runs"]:
        plot_frontier(frontier_rows(results), os.path.join(out, "frontier.png"),
                      "fast recipe: TTA accuracy vs train + TTA-evaluation seconds (labels: epochs)")


def _warm_up(data, methods: list[str], cfg: FastConfig, device):
    """Untimed short runs of every method on a slice of the data (kernels chosen, memory pooled)."""
    small = data.subset(min(data.num_train, 4 * cfg.batch_size), min(len(data.test_x), 2000))
    for m in methods:
        train_run(small, m, 3, 0, cfg, device)


def run_fast(data, methods: list[str], budgets: list[float], seeds: list[int], cfg: FastConfig, device, out: str,
             stop_after: float = 0.0, command: str = "", progress: bool = True, extra: dict | None = None,
             warm_up: bool = True) -> dict:
    """Every method x budget x seed (seeds outermost) on ``data`` (already on ``device``), after a
    warm-up; writes ``out`` after every run. ``stop_after`` (seconds, 0: none): start no run past
    it, nor one that the slowest finished run of its kind says would overrun it. ``warm_up``: False
    only for CPU smoke runs."""
    from .bench import _versions_with_commit, device_info

    device = torch.device(device)
    for m in methods:
        parse_method(m)
    results = {"data": data.name, "setup": asdict(cfg), "device": device_info(device), "versions": _versions_with_commit(),
               "command": command, "methods": methods, "epochs": budgets, "seeds": seeds, "runs": [], "skipped": []}
    results.update(extra or {})
    start = time.perf_counter()
    if warm_up:
        _warm_up(data, methods, cfg, device)
    plan = [(m, e, s) for s in seeds for e in budgets for m in methods]
    bar = _progress(len(plan), progress)
    for m, e, s in plan:
        if _would_overrun(results["runs"], m, e, time.perf_counter() - start, stop_after):
            results["skipped"].append({"method": m, "epochs": e, "seed": s})
        else:
            results["runs"].append(train_run(data, m, e, s, cfg, device))
            write_outputs(out, results, plot=False)  # the plot once at the end (it costs a fraction of a run)
        bar.update(1)
    bar.close()
    write_outputs(out, results)
    return results


def _would_overrun(runs: list[dict], method: str, epochs: float, elapsed: float, stop_after: float) -> bool:
    if stop_after <= 0:
        return False
    same = [r["recipe_seconds"] + 1.0 for r in runs if r["method"] == method and r["epochs"] == epochs]
    return elapsed + (max(same) if same else 0.0) > stop_after


def _progress(total: int, on: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="fast recipe runs", unit="run", disable=not on)


# ----------------------------------------------------------------------------------------------
# command line: mixtrain fast


def cmd_fast(args):
    from .bench import parse_methods, parse_seeds
    from .data import load_data
    from .distributed import resolve_device

    methods, budgets, seeds = parse_methods(args.methods), parse_budgets(args.fast_epochs), parse_seeds(args.seeds)
    for m in methods:
        parse_method(m)
    if args.batch_size < 1:
        raise MixtrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    if os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
        raise MixtrainError(f"--out {args.out} holds results.json of an earlier run: give another --out, or "
                            "--overwrite to replace it")
    if args.pooling not in ("max", "avg"):
        raise MixtrainError(f"--pooling must be max or avg, got {args.pooling!r}")
    device = resolve_device(args.device)
    if args.precision not in ("bf16", "fp16"):
        raise MixtrainError(f"--precision must be bf16 or fp16, got {args.precision!r}")
    cfg = FastConfig(batch_size=args.batch_size, pooling=args.pooling, tta_level=args.tta_level, precision=args.precision)
    data = load_data(args.data).to(device)
    if data.channels != 3 or tuple(data.image_size) != (32, 32):
        raise MixtrainError(f"the fast recipe is for 32x32 RGB images (CIFAR-10 class), got {data.image_size[0]}x"
                            f"{data.image_size[1]}x{data.channels} from --data {args.data}")
    if args.batch_size > data.num_train:
        raise MixtrainError(f"--batch-size {args.batch_size} is larger than the {data.num_train} training images")
    torch.backends.cudnn.benchmark = True
    results = run_fast(data, methods, budgets, seeds, cfg, device, args.out, args.stop_after,
                       "mixtrain " + " ".join(getattr(args, "argv", [])), args.progress != "none")
    print(f"{len(results['runs'])} runs ({len(results['skipped'])} skipped); wrote {os.path.join(args.out, 'report.md')}")


def add_fast_command(sub, fmt):
    f = sub.add_parser(
        "fast", formatter_class=fmt, help="the fast CIFAR-10 recipe (airbench-class), baseline and mixtrain, many seeds",
        description="Train the airbench-class fast recipe (docs/fast-recipe.md) as its own baseline and with MixTrain, "
                    "for every epoch budget and seed, after an untimed warm-up; writes OUT/results.json, OUT/report.md "
                    "and OUT/frontier.png (TTA accuracy vs train + TTA seconds).")
    f.add_argument("--data", default="cifar10", help="32x32 RGB data: cifar10[:DIR] or npz:DIR")
    f.add_argument("--methods", default="baseline,mixtrain",
                   help="comma-separated: baseline, mixtrain, mixtrain(KEY=VALUE;...) with MixOptions fields")
    f.add_argument("--epochs", dest="fast_epochs", default="9.9", help="comma-separated epoch budgets (fractions allowed)")
    f.add_argument("--seeds", default="5", help="number of seeds (5: seeds 0-4) or a comma-separated list")
    f.add_argument("--batch-size", type=int, default=1024, help="passes per step")
    f.add_argument("--pooling", default="max", help="the head's pooling, and each region's: max (published) or avg")
    f.add_argument("--tta-level", type=int, default=2, choices=(0, 1, 2), help="0 none, 1 mirror, 2 mirror + translations")
    f.add_argument("--precision", default="bf16",
                   help="bf16 (float32 weights, bf16 autocast on the GPU) or fp16 (half weights, float batch-norm, as published)")
    f.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    f.add_argument("--out", default="runs/fast", help="output folder")
    f.add_argument("--stop-after", type=float, default=0.0, metavar="SECONDS", help="start no run past this (0: no limit)")
    f.add_argument("--progress", default="bar", choices=("bar", "none"), help="a progress bar over the runs")
    f.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    add_debug_option(f)
    f.set_defaults(func=cmd_fast)
