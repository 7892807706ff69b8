"""Pictures: ``mixtrain show`` (one planned batch of composites), ``OUT/curves.png`` from ``mixtrain
train``, and the bench report's mixed-fraction panels. The files are valid PNGs of the size the
layout gives, and the region borders drawn are exactly the plan's boxes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import mixtrain.show as S
from mixtrain import bench
from mixtrain import plan as P
from mixtrain.batches import EpochBatches
from mixtrain.checkpoint import load as load_checkpoint
from mixtrain.cli import main
from mixtrain.compose import Augment, Normalizer
from mixtrain.strategies import MixOptions, MixTrain


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking it decodes whole."""
    from PIL import Image

    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    with Image.open(path) as im:
        im.load()  # a truncated or corrupt file fails here
        assert im.size == (width, height)
    return width, height


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# borders = boxes, for a fixed plan


GRID, SIZE = (4, 4), (16, 16)  # 4 image pixels per feature-grid cell


def fixed_plan() -> P.EpochPlan:
    """One sample alone, a left|right pair at 1/4 : 3/4, a top/bottom pair at 3/4 : 1/4, a quad."""
    k = 4
    return P.EpochPlan.concat([
        P.singles(np.array([0]), k, GRID),
        P.pairs(np.array([1, 2]), np.array([3, 4]), np.array([0.25, 0.75]), np.array([1, 0]), k, GRID, 0.25),
        P.quads(np.array([[5, 6, 7, 8]]), k, GRID),
    ])


def grey_images(n=9, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, (n, 1, *SIZE), dtype=np.uint8))
    return x, torch.arange(n) % 10


def compose_fixed(augment: Augment):
    plan = fixed_plan()
    images, labels = grey_images()
    batches = EpochBatches(plan, plan.items, GRID, "cpu", torch.Generator().manual_seed(0), image_size=SIZE,
                           augment=augment)
    normalize = Normalizer((0.4,), (0.3,), "cpu")
    pixels, items = S.batch_items(batches.batch(0), batches.plan, (images, None), normalize, labels, GRID, SIZE)
    return plan, images, labels, pixels, items


def expected_frames(cell_boxes, scale: int, line: int, shape) -> np.ndarray:
    """Pixels within ``line`` of the inside edge of each box, from the grid-cell boxes alone."""
    r = np.arange(shape[0])[:, None]
    c = np.arange(shape[1])[None, :]
    cell = SIZE[0] // GRID[0] * scale  # panel pixels per grid cell
    out = np.zeros(shape, bool)
    for top, left, bottom, right in cell_boxes:
        y0, x0, y1, x1 = top * cell, left * cell, bottom * cell, right * cell
        inside = (r >= y0) & (r < y1) & (c >= x0) & (c < x1)
        near_edge = (r < y0 + line) | (r >= y1 - line) | (c < x0 + line) | (c >= x1 - line)
        out |= inside & near_edge
    return out


@pytest.mark.parametrize("scale, line", [(3, 1), (8, 2)])
def test_drawn_borders_lie_exactly_on_the_plans_boxes(scale, line):
    plan, _, labels, pixels, items = compose_fixed(Augment(pad=2, flip=True))
    assert [it.tier for it in items] == ["alone", "pair", "pair", "quad"]
    for i, item in enumerate(items):
        panel = S.draw_panel(pixels[i], item, scale, line)
        assert panel.shape == (SIZE[0] * scale, SIZE[1] * scale, 3)
        drawn = np.all(panel == np.array(S.COLOURS[item.tier], np.uint8), -1)
        slots = np.flatnonzero(plan.valid[i])
        want = expected_frames([plan.box[i, k] for k in slots], scale, line, drawn.shape)
        assert want.sum() > 0 and np.array_equal(drawn, want)
        # every other pixel is the composite's own (grey, upscaled): drawing touched nothing else
        big = np.repeat(np.repeat(pixels[i], scale, 0), scale, 1)
        assert np.array_equal(panel[~want], big[~want])
        assert np.all(big[..., 0] == big[..., 1])  # grey: a border colour cannot occur by chance
        # what the labels say: each constituent's class and area share, from the plan
        assert item.index == plan.index[i, slots].tolist()
        assert item.label == labels[plan.index[i, slots]].tolist()
        assert item.share == pytest.approx(plan.share[i, slots].tolist())
    assert items[1].share == [0.25, 0.75] and items[2].share == [0.75, 0.25] and items[3].share == [0.25] * 4


def test_composites_are_un_normalised_to_the_source_pixels():
    # no padding shift, no flip: an item alone is its image, pixel for pixel, after the round trip
    # through Batch.compose's normalisation; a pair's left region is a crop of its first sample
    plan, images, _, pixels, items = compose_fixed(Augment(pad=0, flip=False))
    assert np.array_equal(pixels[0][..., 0], images[0, 0].numpy())
    assert pixels.dtype == np.uint8 and pixels.shape == (4, *SIZE, 3)
    y0, x0, y1, x1 = items[1].box[0]
    assert (y0, x0, y1, x1) == (0, 0, 16, 4)  # 1 of 4 cells wide: 4 px
    crop = pixels[1][y0:y1, x0:x1, 0]
    src = images[1, 0].numpy()
    assert any(np.array_equal(crop, src[:, o : o + 4]) for o in range(13))


def test_one_batch_of_an_epoch_is_laid_out_as_in_the_whole_epoch():
    # show lays out only the batch it draws; its crops and flips must be training's for that batch
    rng = np.random.default_rng(0)
    strategy = MixTrain(300, GRID, 10)
    loss = torch.from_numpy(rng.uniform(0.01, 1.5, 300).astype(np.float32))
    strategy.memory.update(torch.arange(300), torch.ones(300, dtype=torch.bool), loss, torch.ones(300, dtype=torch.bool))
    plan = strategy.plan_epoch(3, np.random.default_rng(1))
    assert plan.mixed_samples > 0
    augment = Augment(pad=2, flip=True)
    whole = EpochBatches(plan, 16, GRID, "cpu", torch.Generator().manual_seed(5), pad_rng=np.random.default_rng(2),
                         image_size=SIZE, augment=augment)
    for j in (0, 3):
        one, rows = S.epoch_batch(plan, j, 16, GRID, torch.Generator().manual_seed(5), np.random.default_rng(2), SIZE,
                                  augment)
        a, b = one.batch(j), whole.batch(j)
        assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)
        for x, y in zip(a.geo.tensors(), b.geo.tensors()):
            assert torch.equal(x, y)
        assert np.array_equal(rows.index, plan.index[16 * j : 16 * (j + 1)])


def test_grid_png_has_the_layouts_size(tmp_path):
    _, _, _, pixels, items = compose_fixed(Augment(pad=2, flip=True))
    out = tmp_path / "grid.png"
    S.render_grid(pixels, items, str(out), [str(i) for i in range(10)], ("what", "when", "why"), columns=3, scale=8)
    # 2 rows of 128-px panels (16 px x 8) under a 62-px header, with 16-px titles and 8-px gaps; 3
    # columns need 8 + 3 x (128 + 8) = 416 px, less than the header's 800
    assert png_size(out) == (800, 62 + 2 * (16 + 128 + 8) + 8)
    S.render_grid(pixels, items[:1], str(out), None, ("what", "when", "why"), columns=3, scale=2)
    assert png_size(out) == (800, 62 + 16 + 32 + 8 + 8)
    wide = np.repeat(pixels[:1], 9, 0)
    S.render_grid(wide, items[:1] * 9, str(out), None, ("what", "when", "why"), columns=9, scale=8)
    assert png_size(out) == (8 + 9 * 136, 62 + 152 + 8)


# ----------------------------------------------------------------------------------------------
# the commands


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 3-epoch mixtrain run on digits through the CLI (its second epoch mixes)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "digits", "--model", "digitnet", "--method", "mixtrain", "--epochs", "3",
                 "--batch-size", "64", "--lr", "0.05", "--eval-every", "1", "--device", "cpu", "--progress", "none",
                 "--out", str(out)]) == 0
    return out


def test_train_writes_the_curves(digits_run):
    assert png_size(digits_run / "curves.png") == (800, 500)
    log = json.loads((digits_run / "metrics.json").read_text())["epochs_log"]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[1]["mixed_fraction"] > 0  # what the curves show


def test_a_failure_to_draw_the_curves_only_warns(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("no canvas today")

    monkeypatch.setattr(S, "plot_curves", broken)
    code = main(["train", "--data", "digits", "--model", "digitnet", "--epochs", "1", "--batch-size", "128",
                 "--device", "cpu", "--progress", "none", "--save-checkpoints", "off", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "metrics.json").exists() and not (tmp_path / "curves.png").exists()
    assert "warning: could not draw" in captured.err and "no canvas today" in captured.err
    assert "test accuracy" in captured.out


def test_show_from_a_run_draws_the_plan_of_its_loss_memory(digits_run, tmp_path, capsys):
    out = tmp_path / "show.png"
    assert main(["show", "--from", str(digits_run), "--images", "6", "--columns", "3", "--out", str(out)]) == 0
    assert "epoch 2 of 3" in capsys.readouterr().out  # the run's one mixing epoch (it has finished)
    assert png_size(out) == (800, 62 + 2 * 152 + 8)

    summary = S.show(str(tmp_path / "again.png"), run=str(digits_run), images=6, batch=2, log=lambda *a: None)
    # the plan made independently: the checkpoint's loss memory, the run's options, the trainer's
    # plan generator for epoch 2 (0-based 1)
    config = json.loads((digits_run / "config.json").read_text())
    strategy = MixTrain(1437, tuple(config["grid"]), 3, opts=MixOptions(**config["mix"]))
    strategy.load_state_dict(load_checkpoint(str(digits_run / "checkpoint.pt"))["strategy"])
    plan = strategy.plan_epoch(1, np.random.default_rng([config["seed"], 1, 1]))
    rows = slice(6, 12)  # batch 2 of 6
    drawn = summary["items"]
    assert summary["epoch"] == 2 and summary["mixing"] and len(drawn) == 6
    for item, index, valid in zip(drawn, plan.index[rows], plan.valid[rows]):
        assert item.index == index[valid].tolist()
        assert item.tier == {1: "alone", 2: "pair", 4: "quad"}[int(valid.sum())]
    assert summary["tiers"] == pytest.approx(S.tier_shares(plan))
    assert summary["passes"] == plan.passes


def test_show_without_a_run_warms_up_on_the_cpu(tmp_path):
    out = tmp_path / "warm.png"
    summary = S.show(str(out), data="digits", model="digitnet", images=4, columns=4, train_samples=300, train_epochs=2,
                     log=lambda *a: None)
    assert "2-epoch pre-training run on 300 samples" in summary["memory"]
    assert summary["epoch"] == 3 and summary["samples"] == 300  # the epoch after the pre-training run, over its samples
    assert all(i < 300 for it in summary["items"] for i in it.index)
    assert png_size(out) == (800, 62 + 152 + 8)


def test_show_bad_input_is_one_error_line(digits_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"  # digits-shaped npz data with 40 samples: not the run's 1437
    small.mkdir()
    x, y = np.zeros((40, 16, 16, 1), np.uint8), np.arange(40) % 10
    np.savez(small / "train_0.npz", x=x, y=y)
    np.savez(small / "test.npz", x=x[:10], y=y[:10])
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "config.json").write_text((digits_run / "config.json").read_text())
    scattered = tmp_path / "scattered"  # the same run, as if trained with --scatter on
    scattered.mkdir()
    config = json.loads((digits_run / "config.json").read_text())
    config["mix"]["scatter"] = True
    (scattered / "config.json").write_text(json.dumps(config))
    (scattered / "checkpoint.pt").write_bytes((digits_run / "checkpoint.pt").read_bytes())
    cases = [
        (["--from", str(tmp_path / "missing")], "no such run folder"),
        (["--from", str(empty)], "no config.json"),
        (["--from", str(tmp_path / "nockpt")], "no checkpoint.pt"),
        (["--from", str(scattered)], "draws rectangular regions, not scattered cells"),
        (["--from", str(digits_run), "--epoch", "4"], "--epoch must be in 1..3"),
        (["--from", str(digits_run), "--model", "resnet18"], "the run in"),
        (["--from", str(digits_run), "--batch", "999"], "past the end of the epoch"),
        (["--from", str(digits_run), "--images", "0"], "--images must be at least 1"),
        (["--out", str(tmp_path / "x.jpg")], "must name a .png file"),
        (["--data", "npz:" + str(tmp_path / "nodata")], "not found"),
        (["--from", str(digits_run), "--data", f"npz:{small}"], "does not fit"),
    ]
    for args, needle in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "x.png")]
        assert main(["show", *args, *out]) == 2, args
        assert needle in one_error_line(capsys.readouterr().err), args
    assert not (tmp_path / "x.png").exists()


def test_show_options_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--from DIR", "--epoch", "--batch", "--images", "--columns", "--train-samples", "--train-epochs"):
        assert flag in text
    assert "(default: 16)" in text and "(default: show.png)" in text and "default: digits" in text


# ----------------------------------------------------------------------------------------------
# bench


def test_bench_report_adds_the_mixed_fraction_per_method(tmp_path):
    def run(method, epochs, seed, mixed):
        log = [{"epoch": e + 1, "train_loss": 1.0, "mixed_fraction": m} for e, m in enumerate(mixed)]
        return {"key": f"{method}-e{epochs}-s{seed}", "method": method, "epochs": epochs, "seed": seed,
                "train_seconds": 1.0 + epochs, "test_accuracy": 0.9, "passes": 100, "samples": 150, "epochs_log": log}

    runs = [run("baseline", 3, 0, [0, 0, 0]), run("mixtrain", 3, 0, [0, 0.5, 0]), run("mixtrain", 3, 1, [0, 0.7, 0]),
            run("cutmix", 3, 0, [0, 1, 0])]
    results = {"format": bench.FORMAT, "setup": {"data": "digits"}, "sessions": [], "planned": [],
               "methods": ["baseline", "mixtrain", "cutmix"], "runs": runs}
    bench.write_report(str(tmp_path), results)
    assert png_size(tmp_path / "mixing.png") == (900, 280)  # three panels of 3 x 2.3 in (+0.5 in title), 100 dpi
    assert "![samples trained mixed per epoch, one panel per method](mixing.png)" in (tmp_path / "report.md").read_text()
    bench.plot_mixing([], str(tmp_path / "none.png"))  # a bench with no finished run yet still gets its picture
    assert png_size(tmp_path / "none.png") == (300, 280)


# ----------------------------------------------------------------------------------------------
# the README's pictures


def test_readme_shows_each_picture_with_the_command_that_made_it():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = " ".join((root / "README.md").read_text().split())  # commands may wrap across lines
    for picture, command in (("docs/show-digits.png", "mixtrain show --train-epochs 4 --out docs/show-digits.png"),
                             ("docs/curves-digits.png", "mixtrain train --data digits --method mixtrain --epochs 30")):
        assert f"]({picture})" in text and command in text
        width, height = png_size(root / picture)
        assert width <= 1200 and height <= 600 and (root / picture).stat().st_size < 150_000  # kept small
    # the grid's size follows from the layout: 8 columns and 2 rows of 128-px digits panels
    assert png_size(root / "docs/show-digits.png") == (8 + 8 * 136, 62 + 2 * 152 + 8)
    assert png_size(root / "docs/curves-digits.png") == (800, 500)


def test_show_reads_an_image_folder_at_the_size_and_cache_it_is_given(tmp_path, capsys):
    from test_folder_cache import make_folder

    root = make_folder(tmp_path / "photos", classes=3, per_class=6, val_per_class=2)
    cache = tmp_path / "cache"
    out = tmp_path / "folder.png"
    assert main(["show", "--data", f"folder:{root}", "--image-size", "32", "--cache-dir", str(cache),
                 "--model", "digitnet", "--train-samples", "18", "--train-epochs", "2", "--images", "4",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.exists() and any(cache.iterdir())  # the cache went where it was told, not ~/.cache
    summary = S.show(str(tmp_path / "b.png"), data=f"folder:{root}", model="digitnet", image_size=40,
                     cache_dir=str(cache), train_samples=18, train_epochs=2, images=4, log=lambda *_: None)
    assert summary["image_size"] == [40, 40]
