"""LossMemory, the LR schedule in samples seen, and the two losses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtrain import LossMemory, MixOptions, MixTrain, sample_stats, separated_loss, soft_label_loss
from mixtrain.schedule import onecycle_lr, step_lrs, step_scale_factors

# ---------------------------------------------------------------------------------------------
# LossMemory


def test_memory_writes_only_valid_slots():
    m = LossMemory(6)
    assert m.loss.shape == (7,) and torch.isnan(m.loss).all()
    # the empty slots point at real samples (0 and 5): they must not be written
    index = torch.tensor([2, 0, 4, 5])
    valid = torch.tensor([True, False, True, False])
    m.update(index, valid, torch.tensor([0.5, 9.0, 1.5, 9.0]), torch.tensor([True, True, False, True]))
    assert m.loss.shape == (7,) and m.correct.shape == (7,)
    loss, correct = m.snapshot()
    assert loss.shape == (6,) and correct.shape == (6,)
    np.testing.assert_array_equal(np.isnan(loss), [True, True, False, True, False, True])
    assert loss[2] == 0.5 and loss[4] == 1.5
    assert correct.tolist() == [False, False, True, False, False, False]
    # a later pass overwrites with the latest loss
    m.update(torch.tensor([4, 1]), torch.tensor([True, True]), torch.tensor([0.25, 2.0]), torch.tensor([True, False]))
    loss, correct = m.snapshot()
    assert loss[4] == 0.25 and correct[4] and loss[1] == 2.0 and loss[2] == 0.5


def test_memory_state_dict_round_trip():
    m = LossMemory(5)
    m.update(torch.tensor([1, 3]), torch.tensor([True, True]), torch.tensor([0.1, 0.7]), torch.tensor([True, False]))
    state = m.state_dict()
    m2 = LossMemory(5)
    m2.load_state_dict(state)
    a, b = m.snapshot(), m2.snapshot()
    np.testing.assert_array_equal(a[0], b[0])  # NaNs included
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="5 samples"):
        LossMemory(6).load_state_dict(state)


def test_memory_merge_keeps_its_tensors_in_place(monkeypatch):
    """The merge across ranks writes into the same tensors: a captured CUDA-graph step keeps the
    addresses it was captured with, so a merge that rebound them would freeze the memory the plan
    reads (found on 2x H200: every epoch planned from epoch 1's losses)."""
    import torch.distributed as dist

    mem = LossMemory(4)
    mem.update(torch.tensor([0, 1]), torch.tensor([True, True]), torch.tensor([0.5, 2.0]), torch.tensor([True, False]))
    other_rank = torch.tensor([[0.0, 0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])

    def fake_all_reduce(payload, group=None):  # the other rank wrote sample 2 only
        payload += other_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    ptrs = [t.data_ptr() for t in (mem.loss, mem.correct, mem.touched)]
    mem.all_reduce()
    assert [t.data_ptr() for t in (mem.loss, mem.correct, mem.touched)] == ptrs
    assert torch.allclose(mem.loss[:3], torch.tensor([0.5, 2.0, 0.7])) and mem.loss[3].isnan()
    assert mem.correct[:4].tolist() == [True, False, True, False] and not mem.touched.any()


def test_strategy_state_round_trip_gives_the_same_plan():
    n, grid = 30, (4, 4)
    s = MixTrain(n, grid, 4, opts=MixOptions(first_unmixed_epochs=0))
    r = np.random.default_rng(0)
    s.observe(torch.arange(n), torch.ones(n, dtype=torch.bool), torch.tensor(r.uniform(0, 0.5, n), dtype=torch.float32),
              torch.tensor(r.uniform(size=n) < 0.8))
    s2 = MixTrain(n, grid, 4, opts=MixOptions(first_unmixed_epochs=0))
    s2.load_state_dict(s.state_dict())
    p1, p2 = s.plan_epoch(2, np.random.default_rng(5)), s2.plan_epoch(2, np.random.default_rng(5))
    assert p1.mixed_samples > 0
    for k in p1.arrays():
        np.testing.assert_array_equal(p1.arrays()[k], p2.arrays()[k])


# ---------------------------------------------------------------------------------------------
# Schedule in samples seen


def test_onecycle_shape():
    total, peak = 1000.0, 0.4
    assert onecycle_lr(0.0, total, peak, 0.2) == 0.0
    assert onecycle_lr(200.0, total, peak, 0.2) == pytest.approx(peak)  # the warm-up peak
    assert onecycle_lr(100.0, total, peak, 0.2) == pytest.approx(peak / 2)
    assert onecycle_lr(600.0, total, peak, 0.2) == pytest.approx(peak / 2)
    assert onecycle_lr(total, total, peak, 0.2) == 0.0
    assert onecycle_lr(0.0, total, peak, 0.0) == pytest.approx(peak)  # no warm-up: start at the peak
    lrs = onecycle_lr(np.arange(0, 1001, 10), total, peak, 0.2)
    assert lrs.max() == pytest.approx(peak) and np.argmax(lrs) == 20
    assert (np.diff(lrs[:21]) > 0).all() and (np.diff(lrs[20:]) < 0).all()
    with pytest.raises(ValueError):
        onecycle_lr(0, 0, peak)


def test_step_lrs_depend_on_samples_seen_not_on_the_split():
    total, peak, warm = 600.0, 0.1, 0.15
    # an epoch of 120 samples cut into steps two ways (e.g. baseline vs mixed passes)
    a = np.array([10, 20, 30, 60])
    b = np.array([5, 10, 15, 30, 40, 20])
    for seen in (0.0, 240.0, 480.0):
        la, lb = step_lrs(a, seen, total, peak, warm), step_lrs(b, seen, total, peak, warm)
        # each step's LR is the schedule at the middle of the samples it carries
        np.testing.assert_allclose(la, onecycle_lr(seen + np.cumsum(a) - a / 2, total, peak, warm))
        # a's third step and b's fourth both cover samples 30..60: the same LR
        assert la[2] == pytest.approx(lb[3])
        assert (la > 0).all() and (lb > 0).all()  # never an LR of 0 on a step
    # the last step of the schedule ends at ~0
    last = step_lrs(np.full(60, 2), total - 120, total, peak, warm)
    assert last[-1] < 0.01 * peak
    # steps that carry no samples (padding) do not advance the schedule
    np.testing.assert_allclose(step_lrs(np.array([10, 0, 10]), 0, total, peak, warm)[[0, 2]],
                               step_lrs(np.array([10, 10]), 0, total, peak, warm))


def test_step_scale_factors_follow_samples_per_pass():
    samples, passes = np.array([64, 128, 100, 0]), np.array([64, 64, 40, 0])
    np.testing.assert_allclose(step_scale_factors(samples, passes, "none"), [1, 1, 1, 1])
    np.testing.assert_allclose(step_scale_factors(samples, passes, "linear"), [1, 2, 2.5, 1])
    np.testing.assert_allclose(step_scale_factors(samples, passes, "sqrt"), [1, 2**0.5, 2.5**0.5, 1])


def _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, method, step_scale, optimizer="sgd"):
    """Each step's LR and samples/passes in a one-epoch digits run that mixes from its first step
    (rule all, pairs only: the plan does not depend on what the run learns, so runs compare step by step)."""
    from mixtrain import TrainConfig, train
    from mixtrain.trainer import Trainer

    seen = []
    original = Trainer.train_step

    def recording(self, batch, images, src, lr, scale=1.0):
        samples, passes = int(batch.valid.sum()), int(batch.valid.any(1).sum())
        seen.append((lr, samples / max(1, passes)))
        return original(self, batch, images, src, lr, scale)

    monkeypatch.setattr(Trainer, "train_step", recording)
    mix = MixOptions(rule="all", quad_confidence=0.0, first_unmixed_epochs=0, final_unmixed_epochs=0,
                     step_scale=step_scale)
    train(TrainConfig(data="digits", method=method, epochs=1, batch_size=64, lr=0.05, seed=0, device="cpu",
                      optimizer=optimizer, out=str(tmp_path / f"{method}-{step_scale}-{optimizer}"), progress="none",
                      save_checkpoints=False, mix=mix))
    return np.array(seen)


def test_step_scale_multiplies_each_step_lr_in_the_trainer(tmp_path, monkeypatch):
    plain = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "mixtrain", "none")
    per_pass = plain[:, 1]
    assert per_pass.max() == 2.0 and len(plain) == 12  # 1437 samples in pairs: 719 passes, 12 steps
    for step_scale, power in (("linear", 1.0), ("sqrt", 0.5)):
        scaled = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "mixtrain", step_scale)
        np.testing.assert_array_equal(scaled[:, 1], per_pass)  # the same plan, step by step
        np.testing.assert_allclose(scaled[:, 0], plain[:, 0] * per_pass**power, rtol=1e-12)
    # the default, auto: linear with SGD, none with AdamW
    np.testing.assert_allclose(_step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "mixtrain", "auto")[:, 0],
                               plain[:, 0] * per_pass, rtol=1e-12)
    adam = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "mixtrain", "none", "adamw")
    adam_auto = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "mixtrain", "auto", "adamw")
    np.testing.assert_array_equal(adam_auto, adam)
    # CutMix trains one soft-labelled example per pass: its steps are not scaled
    cut_plain = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "cutmix", "none")
    cut_scaled = _step_lrs_and_samples_per_pass(tmp_path, monkeypatch, "cutmix", "linear")
    np.testing.assert_allclose(cut_scaled[:, 0], cut_plain[:, 0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Losses


def _logits(b, k, c, seed=0):
    return torch.randn(b, k, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_separated_loss_is_mean_over_valid_slots(smoothing):
    logits = _logits(5, 3, 7)
    targets = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    loss, per_slot = separated_loss(logits, targets, valid, smoothing)
    ce = [F.cross_entropy(logits[i, k].float()[None], targets[i, k][None], label_smoothing=smoothing)
          for i in range(5) for k in range(3) if valid[i, k]]
    torch.testing.assert_close(loss, torch.stack(ce).mean(), atol=1e-6, rtol=1e-6)
    assert per_slot.shape == (5, 3)
    full = F.cross_entropy(logits.reshape(15, 7).float(), targets.reshape(-1), reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(per_slot, full.view(5, 3))
    # gradients reach only valid slots
    lg = logits.clone().requires_grad_()
    separated_loss(lg, targets, valid)[0].backward()
    assert (lg.grad[~valid] == 0).all() and (lg.grad[valid].abs().sum(-1) > 0).all()
    # nothing valid: loss 0, not NaN
    assert separated_loss(logits, targets, torch.zeros_like(valid))[0] == 0


def test_soft_label_loss_is_ce_against_mixed_label():
    logits = _logits(4, 1, 6)[:, 0]
    targets = torch.tensor([[1, 4], [2, 2], [5, 0], [3, 3]])
    share = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0], [0.6, 0.4]])
    valid = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)  # a single, a padding item
    loss = soft_label_loss(logits, targets, share, valid)
    per_item = []
    for i in range(3):  # the padding item counts for nothing
        soft = torch.zeros(6, dtype=torch.float64)
        for k in range(2):
            if valid[i, k]:
                soft[targets[i, k]] += share[i, k]
        per_item.append(-(soft * torch.log_softmax(logits[i], -1)).sum())
    torch.testing.assert_close(loss.double(), torch.stack(per_item).mean(), atol=1e-6, rtol=1e-6)
    # equal to PyTorch's own cross-entropy with probability targets
    soft = torch.zeros(3, 6)
    for i in range(3):
        for k in range(2):
            soft[i, targets[i, k]] += share[i, k] * valid[i, k]
    torch.testing.assert_close(loss, F.cross_entropy(logits[:3].float(), soft), atol=1e-6, rtol=1e-6)


def test_sample_stats():
    logits = _logits(4, 2, 5)
    targets = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    nll, correct = sample_stats(logits, targets)
    ce = F.cross_entropy(logits.reshape(8, 5).float(), targets.reshape(-1), reduction="none").view(4, 2)
    torch.testing.assert_close(nll, ce)
    assert torch.equal(correct, logits.argmax(-1) == targets)


def test_record_reuses_the_separated_loss_per_slot_cross_entropy():
    # the trainer hands record() the per-slot losses separated_loss already computed; the memory
    # must hold what it holds when record() computes them itself
    from types import SimpleNamespace

    logits = _logits(4, 2, 5)
    targets = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    valid = torch.tensor([[True, True], [True, False], [True, True], [False, False]])
    batch = SimpleNamespace(index=torch.tensor([[0, 1], [2, 7], [3, 4], [5, 6]]), valid=valid)
    _, ce = separated_loss(logits, targets, valid)
    a, b = (MixTrain(8, (4, 4), 3) for _ in range(2))
    a.record(batch, logits, targets)
    b.record(batch, logits, targets, ce)
    la, ca = a.memory.snapshot()
    lb, cb = b.memory.snapshot()
    np.testing.assert_allclose(la, lb, rtol=1e-6, equal_nan=True)
    assert np.array_equal(ca, cb) and np.isnan(la[[5, 6, 7]]).all() and not np.isnan(la[:5]).any()
