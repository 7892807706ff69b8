"""The fast CIFAR-10 recipe (issue 19): its network, whitening, augmentation, TTA, schedule, the
adapter's region max-pooling, a tiny training run of baseline and mixtrain, and its command's errors."""

import os
import sys

import numpy as np
import pytest
import torch

from mixtrain import adapt
from mixtrain.airbench import (AirbenchNet, FlipTranslate, WeightAverage, init_whitening, lr_factor, patches_of,
                               recipe_optimizer, tta_logits, tta_views)
from mixtrain.cli import main
from mixtrain.errors import MixtrainError
from mixtrain.data import from_arrays
from mixtrain.fast import (FastConfig, budget_samples, equal_time_gains, parse_budgets, recipe_mix_options,
                           summarize, time_to_target, train_run)
from mixtrain.models import create_model, region_max_pool

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from fast_recipe import synthetic  # noqa: E402


def test_the_whitening_layer_whitens_the_patches():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.2], [0.0, 0.6, 0.5], [0.0, 0.0, 0.3]])  # correlated channels
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 3, 16, 16, generator=g))
    net = AirbenchNet(10, 3)
    init_whitening(net.whiten, x)
    w = net.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad and net.whiten.bias.requires_grad
    assert torch.equal(w[12:], -w[:12])  # the filters and their negations
    out = torch.nn.functional.conv2d(x, w[:12])  # the whitened patches (no bias)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.02)
    assert patches_of(x, (2, 2)).shape == (64 * 15 * 15, 12)


def test_the_network_ends_on_a_3x3_grid_and_pools_regions_by_their_maxima():
    for name, pooling in (("airbench", "max"), ("airbench_avg", "avg")):
        model = adapt(create_model(name, 10, 3, 32), 32)
        assert model.grid == (3, 3) and model.pooling == pooling
    model.eval()  # the max-pooled head: one region over the whole grid is the plain model
    model = adapt(create_model("airbench", 10, 3, 32), 32).eval()
    x = torch.randn(2, 3, 32, 32)
    whole = torch.full((2, 1, 3, 3), 1 / 9)
    assert torch.allclose(model(x, whole)[:, 0], model(x), atol=1e-5)
    f = torch.randn(2, 5, 3, 3)
    masks = torch.zeros(2, 2, 3, 3)
    masks[:, 0, :, :1], masks[:, 1, :, 1:] = 1 / 3, 1 / 6
    pooled = region_max_pool(f, masks)
    assert torch.allclose(pooled[:, 0], f[..., :1].amax((2, 3))) and torch.allclose(pooled[:, 1], f[..., 1:].amax((2, 3)))
    g = f.clone()
    g[..., 1:] += 100.0  # what lies outside region 0 does not reach it
    assert torch.equal(region_max_pool(g, masks)[:, 0], pooled[:, 0])
    assert torch.equal(region_max_pool(f, torch.zeros(2, 1, 3, 3)), torch.zeros(2, 1, 5))  # empty region: zeros


def test_tta_is_the_weighted_mean_of_the_flipped_and_translated_views():
    torch.manual_seed(0)
    model = AirbenchNet(10, 3, widths=(8, 8, 8)).eval()
    x = torch.randn(3, 3, 32, 32)
    views = tta_views(x, 2)
    assert len(views) == 6 and sum(w for w, _ in views) == pytest.approx(1.0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :31, :31]) and torch.equal(down_right[..., :31, :31], x[..., 1:, 1:])
    with torch.no_grad():
        want = (0.25 * (model(x) + model(x.flip(-1)))
                + 0.125 * sum(model(v) + model(v.flip(-1)) for v in (up_left, down_right)))
        assert torch.allclose(tta_logits(model, x, 2), want, atol=1e-5)
        assert torch.allclose(tta_logits(model, x, 1), 0.5 * (model(x) + model(x.flip(-1))), atol=1e-5)
        assert torch.equal(tta_logits(model, x, 0), model(x))


def test_alternating_flip_flips_every_image_in_alternate_epochs_and_translation_crops_the_reflection():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    aug = FlipTranslate(images, 0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    e0, e1, e2 = (aug.epoch(e, g) for e in range(3))
    assert torch.equal(e1, e0.flip(-1)) and torch.equal(e2, e0)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(e0, images)])
    assert 0 < flipped.sum() < 40  # a random half starts mirrored
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(e0, images))
    shifted = FlipTranslate(images, 2, torch.Generator().manual_seed(0), flip=False).epoch(0, g)
    padded = torch.nn.functional.pad(images.float(), (2,) * 4, mode="reflect").to(torch.uint8)
    for a, p in zip(shifted, padded):
        assert any(torch.equal(a, p[:, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))


def test_schedule_budget_optimizer_and_weight_average():
    assert budget_samples(50000, 9.9, 1024) == 476 * 1024  # the published run's 476 steps
    assert lr_factor(0.0) == pytest.approx(0.2) and lr_factor(0.23) == pytest.approx(1.0) and lr_factor(1.0) == pytest.approx(0.07)
    net = AirbenchNet(10, 3, widths=(8, 8, 8))
    norm, rest = recipe_optimizer(net).param_groups
    assert norm["lr"] == pytest.approx(64 * rest["lr"]) and len(norm["params"]) == 6
    assert all(p is not net.whiten.weight for p in rest["params"])
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])  # the same decay
    avg = WeightAverage(net)
    before = net.fc.weight.detach().clone()
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    avg.update(1.0)  # decay 1: the network goes back to the slow copy
    assert torch.equal(net.fc.weight, before)
    opts = recipe_mix_options(confidence=0.6)
    assert opts.final_unmixed_epochs == 1 and opts.quad_confidence == 0 and opts.confidence == 0.6
    assert parse_budgets("9.9,8") == [8.0, 9.9]


def test_a_tiny_run_learns_and_mixtrain_makes_fewer_passes():
    data = from_arrays("synthetic", synthetic(128, 0), synthetic(64, 1), "synthetic")
    cfg = FastConfig(batch_size=32, widths=(8, 8, 8), whiten_images=64)
    base = train_run(data, "baseline", 3, 0, cfg, "cpu")
    mixed = train_run(data, "mixtrain(rule=all)", 3, 0, cfg, "cpu")
    assert base["tta_accuracy"] > 0.4 and base["accuracy"] > 0.3  # 4 classes: chance is 0.25
    assert base["steps"] == 12 and base["passes"] == base["samples"] == 384
    assert mixed["samples"] >= 384 and mixed["passes"] < base["passes"]
    assert [e["mixed"] for e in mixed["epochs_log"]][:3] == [False, True, False]
    assert mixed["train_seconds"] > 0 and mixed["recipe_seconds"] > mixed["train_seconds"]


def test_time_to_94_and_gains_at_equal_time():
    runs = [dict(method=m, epochs=e, seed=0, train_seconds=t, recipe_seconds=t + 0.2, tta_accuracy=a, accuracy=a,
                 passes=1, samples=1)
            for m, e, t, a in (("baseline", 8, 2.0, 0.93), ("baseline", 10, 2.5, 0.945),
                               ("mixtrain", 8, 1.5, 0.92), ("mixtrain", 10, 2.2, 0.941))]
    rows = summarize(runs)
    assert time_to_target(rows, "baseline") == pytest.approx(2.0 + 0.5 * 10 / 15)
    assert time_to_target(rows, "mixtrain") == pytest.approx(1.5 + 0.7 * 20 / 21)
    gains = {g["epochs"]: g["gain"] for g in equal_time_gains(rows)}
    assert gains[8] is None and gains[10] == pytest.approx(0.941 - (0.93 + 0.015 * 0.2 / 0.5))
    assert rows[1]["at_target"] == 1.0 and rows[0]["at_target"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--data", "digits"], "32x32 RGB"),
    (["--methods", "cutmix"], "runs baseline or mixtrain"),
    (["--epochs", "abc"], "--epochs must be"),
    (["--methods", "baseline(confidence=0.3)"], "takes no mixing options"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),  # was a ZeroDivisionError
])
def test_the_fast_command_refuses_bad_input_with_one_error_line(argv, message, capsys, tmp_path):
    assert main(["fast", "--device", "cpu", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_debug_after_fast_shows_the_traceback(tmp_path):
    from mixtrain import MixtrainError

    with pytest.raises(MixtrainError, match="--batch-size must be at least 1"):
        main(["fast", "--device", "cpu", "--out", str(tmp_path), "--batch-size", "-5", "--debug"])


def test_the_fast_command_keeps_earlier_results_unless_told(capsys, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    assert main(["fast", "--device", "cpu", "--out", str(tmp_path), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds results.json" in err and "--overwrite" in err
    assert main(["fast", "--device", "cpu", "--out", str(tmp_path), "--data", "digits", "--overwrite"]) == 2
    assert "32x32 RGB" in capsys.readouterr().err  # past the guard: refused for the data, as digits should be


def test_the_published_precision_half_weights_and_float_batch_norm_trains_too():
    data = from_arrays("synthetic", synthetic(96, 0), synthetic(32, 1), "synthetic")
    cfg = FastConfig(batch_size=32, widths=(8, 8, 8), whiten_images=32, precision="fp16")
    run = train_run(data, "mixtrain(rule=all)", 3, 0, cfg, "cpu")
    assert run["passes"] < run["samples"] and 0 <= run["tta_accuracy"] <= 1
    with pytest.raises(Exception, match="precision must be bf16 or fp16"):
        train_run(data, "baseline", 1, 0, FastConfig(precision="fp32"), "cpu")


@pytest.mark.parametrize("spec", ["mixtrain(step_scale=linear)", "mixtrain(loss-per=passes)"])
def test_the_fast_recipe_refuses_a_second_step_scaling(spec):
    from mixtrain.fast import parse_method

    with pytest.raises(MixtrainError, match="already grow with them"):
        parse_method(spec)
    assert parse_method("mixtrain(confidence=0.6)") == ("mixtrain", {"confidence": 0.6})
