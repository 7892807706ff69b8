"""Pictures of what mixtrain does: one planned batch of composites (``mixtrain show``) and a run's
training curves (``OUT/curves.png``, written by ``mixtrain train``).

The composite grid is made with the library's own pieces: the strategy plans the epoch from its
loss memory (``plan_epoch``, with the trainer's random generators for that epoch), one batch of
the plan becomes an :class:`~mixtrain.batches.EpochBatches` batch, ``Batch.compose`` renders it
exactly as training does, and the plan's grid-cell boxes (``compose.pixel_boxes``) give the region
borders drawn over it. The loss memory comes from a run's checkpoint (``--from DIR``) or from a
short pre-training run: a tiny training run on the CPU.

Everything is drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend
switch). A panel -- one composite -- is an RGB array at a whole-number pixel scale; each region's
border is a frame of ``line`` pixels on the inside of its box, in the colour of the item's tier,
so a border pixel lies exactly on a box edge (tested).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MixtrainError

# tier of an item, by the number of samples it carries
TIERS = {1: "alone", 2: "pair", 4: "quad"}
# border colours (RGB, uint8): none of them is grey, so a grey image never shows one
COLOURS = {
    "alone": (40, 140, 255),
    "pair": (255, 150, 0),
    "quad": (235, 40, 150),
    "blend": (0, 190, 110),
    "padding": (150, 150, 150),
}
PANEL_PIXELS = 128  # a panel's longer side is about this many pixels (whole-number scale, at least 1)

# layout of the grid, in figure pixels (dpi 100)
DPI = 100
GAP = 8  # between panels and around the grid
TITLE = 16  # above each panel: its tier
HEADER = 62  # above the grid: three lines (what and when; the epoch's tiers; the loss memory and the legend)
MIN_WIDTH = 800  # a narrow grid still has room for its header (the panels stay at the left)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_names(data) -> list[str] | None:
    """Class names of ``data`` where known (CIFAR-10, digits, image folders); None otherwise."""
    names = getattr(data, "classes", None)
    if names is None:
        kind = str(getattr(data, "name", "")).partition(":")[0]
        if kind == "cifar10":
            names = CIFAR10_CLASSES
        elif kind == "digits":
            names = [str(i) for i in range(10)]
    if names is None or len(names) != getattr(data, "num_classes", len(names)):
        return None
    return [str(n) for n in names]


# ----------------------------------------------------------------------------------------------
# one batch of a plan


@dataclass
class Item:
    """One composite of the batch: its tier and, per constituent (valid slot), the sample, its
    label, its share of the composite and its region in image pixels (top, left, bottom, right)."""

    tier: str
    index: list[int]
    label: list[int]
    share: list[float]
    box: list[tuple[int, int, int, int]]


def tier_of(valid_slots: int, blend: bool = False) -> str:
    if valid_slots == 0:
        return "padding"
    if blend and valid_slots > 1:
        return "blend"
    return TIERS.get(valid_slots, f"{valid_slots} slots")


def epoch_batch(plan, j: int, batch_size: int, grid, generator: torch.Generator, pad_rng: np.random.Generator,
                image_size, augment, blend: bool = False, src_size=None):
    """Batch ``j`` of ``batch_size`` items of an epoch's ``plan``, as the trainer makes it.

    Only the items up to the end of that batch are laid out: the trainer draws each item's random
    numbers in item order, so with the same (fresh) ``generator`` the batch gets the same crops and
    flips as batch ``j`` of an :class:`~mixtrain.batches.EpochBatches` over the whole plan.
    Returns (that ``EpochBatches``, the batch's plan rows).
    """
    from .batches import EpochBatches

    first = j * batch_size
    if first >= plan.items:
        raise MixtrainError(
            f"--batch {j + 1} is past the end of the epoch: it has {math.ceil(plan.items / batch_size)} "
            f"batches of {batch_size} composites"
        )
    head = plan.take(np.arange(min(first + batch_size, plan.items)))
    batches = EpochBatches(head, batch_size, grid, "cpu", generator, 0, 1, pad_rng, image_size, augment, blend, src_size)
    rows = batches.plan.take(np.arange(first, first + batch_size))
    return batches, rows


def batch_items(batch, rows, source, normalize, labels: torch.Tensor, grid, image_size, blend=False):
    """Composites of the batch as display pixels ``uint8 [B, H, W, 3]`` and their :class:`Item` s.

    ``source`` is (uint8 images, slot positions or None), as the trainer's image source gives it.
    The composites come from ``Batch.compose`` (normalised, as the model sees them) and are
    un-normalised for display.
    """
    from .compose import pixel_boxes
    from .plan import box_shows

    images, src = source
    with torch.no_grad():
        x = batch.compose(images, normalize, src).float()
        pixels = ((x - normalize.bias) / normalize.scale).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pbox = pixel_boxes(torch.from_numpy(rows.box.astype(np.int64)), grid, image_size).to(torch.int64).numpy()
    targets = labels[torch.from_numpy(rows.index)].numpy()
    items = []
    for i in range(rows.items):
        valid = rows.valid[i]
        slots = np.flatnonzero(valid)
        if len(slots) == 0:  # padding: shows an image, carries no sample
            shows = np.flatnonzero(box_shows(rows.box[i]))
            items.append(Item("padding", [], [], [], [tuple(int(v) for v in pbox[i, k]) for k in shows]))
            continue
        items.append(Item(
            tier_of(len(slots), blend),
            [int(rows.index[i, k]) for k in slots],
            [int(targets[i, k]) for k in slots],
            [float(rows.share[i, k]) for k in slots],
            [tuple(int(v) for v in pbox[i, k]) for k in slots],
        ))
    return pixels, items


# ----------------------------------------------------------------------------------------------
# drawing


def frame_mask(shape: tuple[int, int], boxes, line: int) -> np.ndarray:
    """Pixels ``[H, W]`` (bool) of a ``line``-pixel frame on the inside of each box (top, left,
    bottom, right; bottom and right exclusive)."""
    mask = np.zeros(shape, bool)
    for y0, x0, y1, x1 in boxes:
        if y1 <= y0 or x1 <= x0:
            continue
        t = max(1, int(line))
        mask[y0 : min(y0 + t, y1), x0:x1] = True
        mask[max(y1 - t, y0) : y1, x0:x1] = True
        mask[y0:y1, x0 : min(x0 + t, x1)] = True
        mask[y0:y1, max(x1 - t, x0) : x1] = True
    return mask


def default_scale(image_size) -> int:
    """Whole-number upscale that makes a panel's longer side about :data:`PANEL_PIXELS`."""
    return max(1, round(PANEL_PIXELS / max(image_size)))


def line_width(scale: int) -> int:
    return max(2, scale // 4)


def draw_panel(pixels: np.ndarray, item: Item, scale: int, line: int | None = None) -> np.ndarray:
    """One composite ``uint8 [H, W, 3]`` at ``scale`` (nearest neighbour), its regions' borders in
    the tier's colour: ``uint8 [H * scale, W * scale, 3]``."""
    big = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    boxes = [tuple(v * scale for v in b) for b in item.box]
    big[frame_mask(big.shape[:2], boxes, line_width(scale) if line is None else line)] = COLOURS.get(item.tier, (255, 0, 0))
    return big


def grid_size(count: int, columns: int, panel: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``count`` panels of ``panel`` (h, w) pixels."""
    cols = max(1, min(columns, count))
    rows = math.ceil(count / cols)
    ph, pw = panel
    return max(MIN_WIDTH, GAP + cols * (pw + GAP)), HEADER + rows * (TITLE + ph + GAP) + GAP


def _label_text(item: Item, k: int, names: list[str] | None) -> str:
    lab = item.label[k]
    name = names[lab] if names and 0 <= lab < len(names) else str(lab)
    return f"{name}\n{item.share[k]:.0%}"


def _fit(text: str, pixels: float) -> str:
    """``text`` cut to about ``pixels`` wide at the header's font size (about 5.5 px a character)."""
    most = max(8, int(pixels / 5.5))
    return text if len(text) <= most else text[: most - 1] + "\u2026"


def render_grid(pixels: np.ndarray, items: list[Item], path: str, names: list[str] | None = None,
                header: tuple[str, str, str] = ("", "", ""), columns: int = 8, scale: int | None = None):
    """Draw the batch as a grid of panels into ``path`` (PNG): each composite with its region
    borders, each constituent's label and area share, the item's tier above it, and a header of
    three lines (the third shares its line with the tiers' colour legend). Each panel maps 1:1
    onto figure pixels (dpi :data:`DPI`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = pixels.shape[1:3]
    scale = scale or default_scale((h, w))
    ph, pw = h * scale, w * scale
    width, height = grid_size(len(items), columns, (ph, pw))
    cols = max(1, min(columns, len(items)))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    legend = [t for t in ("alone", "pair", "quad", "blend", "padding")
              if t in ("alone", "pair", "quad") or any(it.tier == t for it in items)]
    right = GAP
    for tier in reversed(legend):  # right-aligned on the third line
        fig.text(1 - right / width, 1 - 36 / height, f"\u25a0 {tier}", ha="right", va="top", fontsize=8.5,
                 color=np.array(COLOURS[tier]) / 255)
        right += 7 * len(tier) + 28  # about the label's width at this size, and a gap
    lines = list(header) + [""] * (3 - len(header))
    room = (width - 2 * GAP, width - 2 * GAP, width - GAP - right - 16)
    for n, (text, wide) in enumerate(zip(lines, room)):
        fig.text(GAP / width, 1 - (6 + 15 * n) / height, _fit(text, wide * (0.92 if n == 0 else 1.0)), ha="left",
                 va="top", fontsize=8.5 if n == 0 else 8, weight="bold" if n == 0 else "normal")
    for i, item in enumerate(items):
        r, c = divmod(i, cols)
        left = GAP + c * (pw + GAP)
        top = HEADER + r * (TITLE + ph + GAP) + TITLE
        ax = fig.add_axes([left / width, 1 - (top + ph) / height, pw / width, ph / height])
        ax.imshow(draw_panel(pixels[i], item, scale), interpolation="nearest", extent=(0, pw, ph, 0))
        ax.set_xlim(0, pw)
        ax.set_ylim(ph, 0)
        ax.set_axis_off()
        title = item.tier if item.tier != "padding" else "padding (no sample)"
        fig.text((left + pw / 2) / width, 1 - (top - 3) / height, title, ha="center", va="bottom", fontsize=8,
                 color=np.array(COLOURS.get(item.tier, (0, 0, 0))) / 255 * 0.8)
        inset = line_width(scale) + 1
        for k, (y0, x0, y1, x1) in enumerate(item.box[: len(item.label)]):  # top-left inside each region
            below = sum(b[:2] == (y0, x0) for b in item.box[:k]) * 24  # blends share a region: stack them
            ax.text(x0 * scale + inset, y0 * scale + inset + below, _label_text(item, k, names), ha="left", va="top",
                    fontsize=7, color="white", linespacing=1.0,
                    bbox=dict(facecolor="black", alpha=0.6, pad=1.0, edgecolor="none"))
    _save(fig, path)


def _save(fig, path: str):
    """Save as PNG through a temporary file: ``path`` is either the old file or the whole new one."""
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# mixtrain show


def tier_shares(plan, blend: bool = False) -> dict[str, float]:
    """Fraction of the plan's samples in each tier."""
    counts = plan.valid.sum(1)
    total = max(1, int(counts.sum()))
    return {tier_of(c, blend): float(counts[counts == c].sum()) / total for c in sorted(set(counts.tolist()) - {0})}


def _read_run(folder: str):
    """(TrainConfig, config.json dict, checkpoint state) of the run in ``folder``."""
    from . import checkpoint as ckpt
    from .options import TrainConfig, upgrade_config

    if not os.path.isdir(folder):
        raise MixtrainError(f"--from {folder}: no such run folder")
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MixtrainError(f"--from {folder}: no config.json (is it the --out folder of mixtrain train?)") from None
    except (OSError, ValueError) as e:
        raise MixtrainError(f"{cfg_path} is not readable JSON: {e}") from e
    if not isinstance(raw, dict):
        raise MixtrainError(f"{cfg_path} is not a mixtrain config (not a JSON object)")
    try:
        cfg = TrainConfig.from_dict(upgrade_config(raw, saved=True))
        cfg.check()
    except (TypeError, ValueError, AttributeError) as e:
        raise MixtrainError(f"{cfg_path} is not a mixtrain config: {e}") from e
    path = os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(path):
        raise MixtrainError(
            f"--from {folder}: no checkpoint.pt (the run was trained with --save-checkpoints off, or has not "
            "finished its first epoch); without --from, a short pre-training run fills the loss memory"
        )
    state = ckpt.load(path)
    if not isinstance(state, dict) or "strategy" not in state or "epoch" not in state:
        raise MixtrainError(f"{path} is not a mixtrain checkpoint (keys missing)")
    return cfg, raw, state


def _default_epoch(strategy, after: int) -> int:
    """0-based epoch to show: ``after`` if it mixes, else the nearest mixing epoch (the last one
    before it, or the first after it); ``after`` clipped to the schedule where nothing mixes."""
    mixing = [e for e in range(strategy.num_epochs) if strategy.mixing(e)]
    if not mixing:
        return min(after, strategy.num_epochs - 1)
    if after in mixing:
        return after
    before = [e for e in mixing if e < after]
    return before[-1] if before else mixing[0]


def _pretrain(data, cfg, samples: int, epochs: int, log):
    """Train the model with mixtrain on the CPU on the first ``samples`` training samples of
    ``data`` for ``epochs`` epochs (the first unmixed, the rest mixing); returns (the slice, the
    trained strategy)."""
    from .bench import warmup_subset
    from .strategies import MixOptions
    from .trainer import Trainer

    n = min(samples, data.num_train)
    part = warmup_subset(data, n, 64)  # a few test images: the run's final evaluation costs little
    with tempfile.TemporaryDirectory(prefix="mixtrain-show-") as tmp:
        warm = dataclasses.replace(cfg, method="mixtrain", epochs=epochs, batch_size=min(64, n), lr=0.05, out=tmp,
                                   mix=MixOptions(final_unmixed_epochs=0))
        log(f"pre-training: {epochs} epochs of {warm.resolved_model()} on {n} samples (CPU) to fill the loss memory ...")
        with warnings.catch_warnings():  # "will never mix" would speak of this helper run, not the user's
            warnings.filterwarnings("ignore", message="mixtrain will never mix")
            trainer = Trainer(warm, data=part)
            trainer.fit()
    return part, trainer.strategy


def _check_show_args(out: str, images: int, batch: int, columns: int, epoch: int, train_samples: int,
                     train_epochs: int):
    if not str(out).lower().endswith(".png"):
        raise MixtrainError(f"--out must name a .png file, got {out!r}")
    for name, value, low in (("--images", images, 1), ("--batch", batch, 1), ("--columns", columns, 1),
                             ("--epoch", epoch, 0), ("--train-samples", train_samples, 1),
                             ("--train-epochs", train_epochs, 1)):
        if value < low:
            raise MixtrainError(f"{name} must be at least {low}, got {value}")


def _config_to_show(run: str | None, data: str | None, model: str | None, method: str | None,
                    epochs: int | None, seed: int | None, image_size: int | None = None, cache_dir: str | None = None):
    """(TrainConfig, checkpoint state or None). With ``run``: the run's own options (``data`` and
    ``cache_dir`` may read its dataset from another place; any other option given must agree with
    the run's). Without: the defaults with the options given."""
    from .trainer import TrainConfig

    if run is None:
        cfg = TrainConfig(data=data or "digits", model=model or "auto", method=method or "mixtrain",
                          epochs=30 if epochs is None else epochs, seed=0 if seed is None else seed,
                          image_size=image_size or 0, cache_dir=cache_dir or "")
        return cfg, None
    cfg, raw, state = _read_run(run)
    cfg.model = cfg.resolved_model()  # before --data may change where the data are read from
    if model is not None:
        model = TrainConfig(model=model, data=raw.get("data", cfg.data)).resolved_model()
    for flag, given, saved in (("--model", model, cfg.model), ("--method", method, cfg.method),
                               ("--epochs", epochs, cfg.epochs), ("--seed", seed, cfg.seed),
                               ("--image-size", image_size, cfg.image_size)):
        if given is not None and given != saved:
            raise MixtrainError(f"{flag} {given}: the run in {run} used {saved}; leave {flag} out with --from")
    if data is not None:  # the same dataset, read from another place
        cfg.data = data
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    return cfg, state


def _cpu_trainer(cfg, run: str | None, data: str | None):
    """(the CPU config, a Trainer that never trains). The trainer resolves data, feature grid,
    augmentation and normalisation as training does; batch size 1 fits any data; it writes nothing."""
    from .trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="mixtrain-show-") as tmp:
        cfg = dataclasses.replace(cfg, device="cpu", out=tmp, resume=False, save_checkpoints=False, progress="none",
                                  compile=False, cuda_graph="off", csv=False, tensorboard=False)
        try:
            trainer = Trainer(dataclasses.replace(cfg, batch_size=1))
        except MixtrainError as e:
            where = os.path.expanduser(cfg.data.partition(":")[2])
            if run is not None and data is None and where and where in str(e):
                raise MixtrainError(f"{e} (the run's --data; pass --data to read it from elsewhere)") from e
            raise
    return cfg, trainer


def _loss_memory(trainer, cfg, run: str | None, state: dict | None, train_samples: int, train_epochs: int, log):
    """(dataset, strategy, what its loss memory is, epochs it has seen). The memory comes from the
    run's checkpoint with ``run``, else from a short CPU pre-training run when the method plans from one (the
    dataset is then the pre-training run's slice); a method without one plans as it is."""
    from .strategies import create_strategy

    dataset, strategy = trainer.data, trainer.strategy
    if run is not None:
        try:
            strategy.load_state_dict(state["strategy"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise MixtrainError(f"the loss memory in {run}/checkpoint.pt does not fit {cfg.data}: {e}") from e
        memory_text = f"loss memory from {run} after epoch {int(state['epoch'])} of {cfg.epochs}"
        return dataset, strategy, memory_text, int(state["epoch"])
    if strategy.uses_memory:
        dataset, warm = _pretrain(dataset, cfg, train_samples, train_epochs, log)
        strategy = create_strategy(cfg.method, dataset.num_train, trainer.grid, cfg.epochs, "cpu", cfg.mix)
        strategy.load_state_dict(warm.state_dict())
        memory_text = f"loss memory from a {train_epochs}-epoch pre-training run on {dataset.num_train} samples (CPU)"
        return dataset, strategy, memory_text, train_epochs
    return dataset, strategy, "no loss memory (this method plans without one)", 0


def _compose_batch(trainer, dataset, strategy, e0: int, j: int, images: int):
    """(the plan of epoch ``e0``, batch ``j``'s display pixels, its items, its plan rows): the
    batch of ``images`` composites, planned and composed as training does it."""
    grid = trainer.grid
    plan_rng, pad_rng, aug_gen = trainer.epoch_generators(e0)  # the run's generators for that epoch
    plan = strategy.plan_epoch(e0, plan_rng)
    batches, rows = epoch_batch(plan, j, images, grid, aug_gen, pad_rng, trainer.image_hw, trainer.augment,
                                strategy.blend, dataset.source_size)
    source = dataset.step_images(batches, torch.device("cpu"), j).get(j)
    pixels, items = batch_items(batches.batch(j), rows, source, trainer.normalize, dataset.train_y.cpu(), grid,
                                trainer.image_hw, strategy.blend)
    return plan, pixels, items, rows


def _header(cfg, grid, e0: int, mixing: bool, first: int, shown: int, plan, shares: dict[str, float],
            memory_text: str) -> tuple[str, str, str]:
    """The grid's three header lines: what and when (composites ``first`` on, ``shown`` of them);
    the epoch's tiers; the loss memory."""
    return (
        f"{cfg.data} \u00b7 {cfg.resolved_model()} (feature grid {grid[0]}x{grid[1]}) \u00b7 {cfg.method} \u00b7 "
        f"epoch {e0 + 1} of {cfg.epochs}{'' if mixing else ' (unmixed)'} \u00b7 composites {first}-"
        f"{min(first + shown - 1, plan.items)} of {plan.items:,}",
        "this epoch: " + ", ".join(f"{v:.0%} of samples {'alone' if k == 'alone' else 'in ' + k + 's'}"
                                   for k, v in shares.items())
        + f"; {plan.passes:,} passes for {plan.samples:,} samples",
        memory_text,
    )


def _write_grid(out: str, pixels: np.ndarray, items: list[Item], dataset, header, columns: int):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        render_grid(pixels, items, out, class_names(dataset), header, columns)
    except OSError as e:
        raise MixtrainError(f"cannot write {out}: {e.strerror or e}") from e


def show(out: str, data: str | None = None, model: str | None = None, method: str | None = None,
         run: str | None = None, epoch: int = 0, epochs: int | None = None, seed: int | None = None,
         images: int = 16, batch: int = 1, columns: int = 8, train_samples: int = 1000, train_epochs: int = 3,
         image_size: int | None = None, cache_dir: str | None = None, log=print) -> dict:
    """Render one planned batch of composites into ``out`` (PNG); see ``mixtrain show --help``.

    ``run``: a training run's folder (its config.json and checkpoint.pt give the options and the
    loss memory); without it the options are the defaults with ``data``, ``model``, ``method``,
    ``epochs`` and ``seed``, and for mixtrain a pre-training run of ``train_epochs`` epochs on
    ``train_samples`` samples fills the loss memory. ``epoch`` and ``batch`` are 1-based (``epoch``
    0: chosen as the help says). Everything runs on the CPU. Returns a summary: the epoch, its
    tiers, and the drawn items.
    """
    _check_show_args(out, images, batch, columns, epoch, train_samples, train_epochs)
    cfg, state = _config_to_show(run, data, model, method, epochs, seed, image_size, cache_dir)
    if cfg.mix.scatter:  # its cells are dealt at random over the grid: there are no region borders to draw
        raise MixtrainError(f"the run in {run} trained with --scatter on: mixtrain show draws rectangular regions, "
                            "not scattered cells")
    cfg.check()  # a bad --seed or --epochs fails here, before the pre-training run
    if epoch > cfg.epochs:
        raise MixtrainError(f"--epoch must be in 1..{cfg.epochs} (the schedule's epochs), got {epoch}")
    cfg, trainer = _cpu_trainer(cfg, run, data)
    dataset, strategy, memory_text, after = _loss_memory(trainer, cfg, run, state, train_samples, train_epochs, log)

    e0 = epoch - 1 if epoch else _default_epoch(strategy, after)  # in range: a given one was checked above
    plan, pixels, items, rows = _compose_batch(trainer, dataset, strategy, e0, batch - 1, images)

    grid = trainer.grid
    shares = tier_shares(plan, strategy.blend)
    mixing = strategy.mixing(e0)
    header = _header(cfg, grid, e0, mixing, (batch - 1) * images + 1, len(items), plan, shares, memory_text)
    _write_grid(out, pixels, items, dataset, header, columns)
    return {"path": out, "epoch": e0 + 1, "epochs": cfg.epochs, "mixing": mixing, "tiers": shares,
            "passes": plan.passes, "samples": plan.samples, "grid": list(grid), "image_size": list(trainer.image_hw),
            "items": items, "rows": rows, "memory": memory_text, "header": header}


def cmd_show(args):
    given = {k: getattr(args, k, None)  # None: not given
             for k in ("data", "model", "method", "epochs", "seed", "image_size", "cache_dir")}
    summary = show(args.out, run=args.run, epoch=args.epoch, images=args.images, batch=args.batch, columns=args.columns,
                   train_samples=args.train_samples, train_epochs=args.train_epochs, **given)
    tiers = ", ".join(f"{k} {v:.0%}" for k, v in summary["tiers"].items())
    print(f"wrote {summary['path']}: epoch {summary['epoch']} of {summary['epochs']}, {len(summary['items'])} "
          f"composites; samples this epoch: {tiers}")


def add_show_command(sub, fmt):
    import argparse

    from .options import METHODS, add_debug_option

    s = sub.add_parser(
        "show", help="draw one planned batch of composites (regions, labels, area shares, tiers) as a PNG",
        formatter_class=fmt,
        description="Plan an epoch as training would, compose one batch of it (augmentation included) and draw "
                    "each composite with its region borders, each constituent's label and area share, and its "
                    "tier (alone, pair, quad). The loss memory that decides the tiers comes from a run's "
                    "checkpoint (--from DIR) or, without one, from a short pre-training run on the CPU.")
    s.add_argument("--from", dest="run", metavar="DIR", default=None,
                   help="a mixtrain train --out folder: its config.json gives every option, its checkpoint.pt the loss memory")
    s.add_argument("--data", default=argparse.SUPPRESS,
                   help="dataset, as for train (default: digits; with --from the run's, so give it only to read the same data from elsewhere)")
    s.add_argument("--model", default=argparse.SUPPRESS, help="model, as for train; sets the feature grid (default: auto; with --from the run's)")
    s.add_argument("--method", default=argparse.SUPPRESS, help=f"{METHODS} (default: mixtrain; with --from the run's)")
    s.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                   help="epochs of the schedule, which says which epochs mix (default: 30; with --from the run's)")
    s.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the plans and augmentation (default: 0; with --from the run's)")
    s.add_argument("--image-size", type=int, default=argparse.SUPPRESS,
                   help="folder data: the training resolution (default: 224; with --from the run's)")
    s.add_argument("--cache-dir", default=argparse.SUPPRESS,
                   help="folder data: where decoded caches live, as for train (default: as train's; with --from the run's)")
    s.add_argument("--epoch", type=int, default=0,
                   help="epoch to plan, 1-based (0: with --from the epoch after the checkpoint, or the run's last "
                        "mixing epoch once it is past that; without, the epoch after the pre-training run, or the first "
                        "mixing epoch of a method without a loss memory)")
    s.add_argument("--batch", type=int, default=1, help="which batch of --images composites of the epoch, 1-based")
    s.add_argument("--images", type=int, default=16, help="composites to draw")
    s.add_argument("--columns", type=int, default=8, help="composites per row")
    s.add_argument("--train-samples", type=int, default=1000, help="without --from: the pre-training run trains on this many samples (the first), and the plan covers them")
    s.add_argument("--train-epochs", type=int, default=3,
                   help="without --from: epochs of the pre-training run (the first unmixed, the rest mixing as in training)")
    s.add_argument("--out", default="show.png", help="the PNG to write")
    add_debug_option(s)
    s.set_defaults(func=cmd_show)


# ----------------------------------------------------------------------------------------------
# training curves


def plot_curves(epochs_log: list[dict], path: str, title: str = ""):
    """A run's per-epoch log as four panels: train loss, test accuracy (where evaluated), the
    fraction of samples trained in composites, and passes per epoch (against samples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2, sharex=True)
    ep = [int(r["epoch"]) for r in epochs_log]
    loss, acc, mixed, passes = ax[0, 0], ax[0, 1], ax[1, 0], ax[1, 1]
    loss.plot(ep, [r["train_loss"] for r in epochs_log], marker=".", color="tab:blue")
    loss.set_title("train loss (mean per sample)", fontsize=9)
    evaluated = [(int(r["epoch"]), 100 * r["test_accuracy"]) for r in epochs_log if r.get("test_accuracy") is not None]
    if evaluated:
        acc.plot(*zip(*evaluated), marker=".", color="tab:green")
        last = evaluated[-1]
        acc.annotate(f"{last[1]:.2f} %", last, textcoords="offset points", xytext=(-4, -12), ha="right", fontsize=8)
    acc.set_title("test accuracy % (where evaluated)", fontsize=9)
    mixed.plot(ep, [100 * r.get("mixed_fraction", 0.0) for r in epochs_log], marker=".", color="tab:orange")
    mixed.set_ylim(-3, 103)
    mixed.set_title("samples trained mixed (%)", fontsize=9)
    passes.bar(ep, [r["passes"] for r in epochs_log], color="tab:purple", alpha=0.7, label="passes")
    passes.plot(ep, [r["samples"] for r in epochs_log], color="black", linestyle="--", linewidth=1, label="samples")
    passes.set_ylim(0, max([r["samples"] for r in epochs_log], default=1) * 1.3)
    passes.set_title("passes per epoch (fewer than samples where mixed)", fontsize=9)
    passes.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    for a in ax.flat:
        a.grid(True, alpha=0.3)
        a.tick_params(labelsize=8)
    for a in ax[1]:
        a.set_xlabel("epoch", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.87, bottom=0.1, hspace=0.3, wspace=0.18)  # fixed: no layout pass
    _save(fig, path)


def curves_title(metrics: dict) -> str:
    acc = metrics.get("test_accuracy")
    acc_text = f", test accuracy {100 * acc:.2f} %" if acc is not None else ""
    return (f"{metrics.get('method', '?')} \u00b7 {metrics.get('model', '?')} \u00b7 {metrics.get('data', '?')}: "
            f"{metrics.get('passes', 0):,} passes for {metrics.get('samples', 0):,} samples{acc_text}")


def write_curves(folder: str, metrics: dict) -> str | None:
    """``folder/curves.png`` from a run's metrics (``mixtrain train`` calls it at the end). Never
    raises: a failure to draw prints one ``warning:`` line, since the run itself is done."""
    path = os.path.join(folder, "curves.png")
    try:
        plot_curves(metrics["epochs_log"], path, curves_title(metrics))
        return path
    except Exception as e:  # no working matplotlib, a full disk, an odd log: the run stands
        print(f"warning: could not draw {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
