"""Epoch plans: who trains alone, who is mixed, in which regions; padding and sharding."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from mixtrain import Augment, Baseline, EpochBatches, MixOptions, MixTrain, MixtrainError, choose_mixed, create_strategy
from mixtrain import plan as P
from mixtrain.strategies import interfered
from test_reliability import crash_then_resume, without_timings

GRID = (4, 4)
N = 40


def _rng(seed=0):
    return np.random.default_rng(seed)


def _each_once(plan, n=N):
    ids = np.sort(plan.index[plan.valid])
    assert np.array_equal(ids, np.arange(n)), "every sample exactly once"


def _boxes_tile_grid(plan):
    """The valid slots of every item cover the grid exactly once (regions never overlap)."""
    for i in range(plan.items):
        cover = np.zeros(GRID, int)
        for s in np.flatnonzero(plan.valid[i]):
            y0, x0, y1, x1 = plan.box[i, s]
            cover[y0:y1, x0:x1] += 1
        if plan.valid[i].any():
            assert (cover == 1).all()


def _observe(strategy, loss, correct):
    n = len(loss)
    strategy.observe(
        torch.arange(n), torch.ones(n, dtype=torch.bool), torch.tensor(loss, dtype=torch.float32), torch.tensor(correct)
    )


def _easy_hard_memory(n=N, seed=0):
    """Losses: a third very easy (right, loss 0.01-0.1), a third right but not confident (1.0),
    a third wrong; two never seen (NaN)."""
    r = np.random.default_rng(seed)
    loss = np.empty(n, np.float32)
    correct = np.zeros(n, bool)
    third = n // 3
    loss[:third] = r.uniform(0.01, 0.1, third)
    correct[:third] = True
    loss[third : 2 * third] = 1.0
    correct[third : 2 * third] = True
    loss[2 * third :] = r.uniform(1.5, 3.0, n - 2 * third)
    loss[-2:] = np.nan
    perm = r.permutation(n)
    return loss[perm], correct[perm]


def test_baseline_plan():
    s = Baseline(N, GRID, 3)
    for epoch in range(3):
        plan = s.plan_epoch(epoch, _rng(epoch))
        _each_once(plan)
        assert plan.passes == plan.samples == plan.items == N
        assert plan.mixed_samples == 0 and plan.slots == 1
        assert (plan.box[:, 0] == (0, 0, 4, 4)).all() and (plan.share[:, 0] == 1).all()
    # a fresh order each epoch
    assert not np.array_equal(s.plan_epoch(0, _rng(0)).index, s.plan_epoch(1, _rng(1)).index)


def test_warmup_and_final_epochs_unmixed():
    s = MixTrain(N, GRID, 6, opts=MixOptions(first_unmixed_epochs=2, final_unmixed_epochs=2, rule="all"))
    _observe(s, *_easy_hard_memory())
    mixed = []
    for epoch in range(6):
        plan = s.plan_epoch(epoch, _rng(epoch))
        _each_once(plan)
        mixed.append(plan.mixed_samples)
        assert s.mixing(epoch) == (plan.mixed_samples > 0)
    assert mixed[:2] == [0, 0] and mixed[-2:] == [0, 0]
    assert mixed[2] == mixed[3] == N  # rule all mixes everyone, N is even
    # unmixed epochs are the baseline: one sample per pass
    plan = s.plan_epoch(0, _rng(0))
    assert plan.passes == plan.samples == N


def test_auto_rule_pairs_mixable_rest_alone():
    s = MixTrain(N, GRID, 5, opts=MixOptions(first_unmixed_epochs=1, confidence=0.75, quad_confidence=0.0))
    loss, correct = _easy_hard_memory()
    # one sample with a low loss but classified wrong (the margin rule must not mix it)
    loss[np.flatnonzero(~correct & ~np.isnan(loss))[0]] = 0.01
    _observe(s, loss, correct)
    plan = s.plan_epoch(1, _rng(1))
    _each_once(plan)
    _boxes_tile_grid(plan)
    mixable = correct & (loss <= -math.log(0.75))
    assert mixable.sum() == N // 3
    in_pairs = plan.valid.sum(1) == 2
    paired_ids = np.sort(plan.index[in_pairs][:, :2].ravel())
    alone_ids = plan.index[plan.valid.sum(1) == 1, 0]
    # all mixable samples are paired (but one, when their count is odd), the rest alone
    assert set(paired_ids) <= set(np.flatnonzero(mixable))
    assert len(paired_ids) == 2 * (mixable.sum() // 2)
    assert set(alone_ids) == set(range(N)) - set(paired_ids)
    assert plan.passes == N - len(paired_ids) // 2
    assert plan.mixed_samples == len(paired_ids)


def test_adaptive_share_gives_harder_sample_more_area_on_grid():
    opts = MixOptions(first_unmixed_epochs=0, rule="all", min_share=0.25, quad_confidence=0.0)  # pairs only
    s = MixTrain(N, GRID, 2, opts=opts)
    r = np.random.default_rng(3)
    loss = r.uniform(0.001, 3.0, N).astype(np.float32)
    loss[:4] = [0.01, 2.0, 1.0, 1.0]  # extreme and even pairs, whatever the pairing draws
    _observe(s, loss, np.ones(N, bool))
    plan = s.plan_epoch(0, _rng(5))
    _each_once(plan)
    _boxes_tile_grid(plan)
    pairs = plan.valid.sum(1) == 2
    assert pairs.sum() == N // 2
    share_a = plan.share[pairs, 0]
    la, lb = loss[plan.index[pairs, 0]], loss[plan.index[pairs, 1]]
    # snapped to whole cells of the 4-cell split axis, clipped to [1/4, 3/4]
    assert np.allclose(share_a * 4, np.rint(share_a * 4))
    assert share_a.min() >= 0.25 and share_a.max() <= 0.75
    expected = np.clip(np.rint(la / (la + lb) * 4), 1, 3) / 4
    np.testing.assert_allclose(share_a, expected)
    assert (share_a[la > 2 * lb] > 0.5).all() and (share_a[lb > 2 * la] < 0.5).all()
    np.testing.assert_allclose(plan.share[pairs, 0] + plan.share[pairs, 1], 1.0)
    # the share is the area of the box
    area = lambda bx: (bx[..., 2] - bx[..., 0]) * (bx[..., 3] - bx[..., 1])
    np.testing.assert_allclose(area(plan.box[pairs, 0]) / 16, share_a)
    # both split directions occur
    vertical = plan.box[pairs, 0, 2] == 4  # a spans the full height: a left|right split
    assert 0 < vertical.sum() < pairs.sum()


@pytest.mark.parametrize("min_share, lo", [(0.25, 1), (0.3, 2), (0.5, 2)])
def test_min_share_clip(min_share, lo):
    share = P.pairs(np.array([0, 1]), np.array([2, 3]), np.array([0.0, 1.0]), np.array([1, 0]), 2, GRID, min_share).share
    np.testing.assert_allclose(share[:, 0], [lo / 4, (4 - lo) / 4])


def test_fixed_ratio_is_half():
    s = MixTrain(N, GRID, 2, opts=MixOptions(first_unmixed_epochs=0, rule="all", ratio="fixed", quad_confidence=0.0))
    _observe(s, np.random.default_rng(0).uniform(0.01, 3, N), np.ones(N, bool))
    plan = s.plan_epoch(0, _rng(0))
    pairs = plan.valid.sum(1) == 2
    assert pairs.sum() == N // 2
    assert (plan.share[pairs] [:, :2] == 0.5).all()


def test_fraction_and_threshold_rules():
    loss = np.random.default_rng(1).uniform(0, 2, N).astype(np.float32)
    loss[5] = np.nan
    correct = np.zeros(N, bool)  # these rules ignore correctness
    chosen = choose_mixed(loss, correct, MixOptions(rule="fraction", fraction=0.3))
    assert chosen.sum() == 12
    order = np.argsort(np.nan_to_num(loss, nan=np.inf))
    assert set(np.flatnonzero(chosen)) == set(order[:12])
    chosen = choose_mixed(loss, correct, MixOptions(rule="threshold", threshold=0.5))
    assert np.array_equal(chosen, loss < 0.5)
    assert not choose_mixed(loss, correct, MixOptions(rule="auto"))[5]
    s = MixTrain(N, GRID, 2, opts=MixOptions(first_unmixed_epochs=0, rule="fraction", fraction=0.3))
    _observe(s, loss, correct)
    plan = s.plan_epoch(0, _rng(0))
    _each_once(plan)
    assert plan.mixed_samples == 12 and plan.passes == N - 6
    mixed_ids = plan.index[plan.valid.sum(1) == 2][:, :2].ravel()
    assert set(mixed_ids) == set(order[:12])


def test_easy_hard_pairing():
    s = MixTrain(N, GRID, 2, opts=MixOptions(first_unmixed_epochs=0, rule="all", pairing="easy-hard", quad_confidence=0.0))
    loss = np.arange(N, dtype=np.float32) / N + 0.01
    _observe(s, loss, np.ones(N, bool))
    plan = s.plan_epoch(0, _rng(0))
    pairs = plan.valid.sum(1) == 2
    a, b = plan.index[pairs, 0], plan.index[pairs, 1]
    assert np.array_equal(np.sort(a + b), np.full(N // 2, N - 1))  # easiest with hardest, ...


def test_quads_and_pass_count():
    opts = MixOptions(first_unmixed_epochs=0, quad_confidence=0.9)
    s = MixTrain(N, GRID, 2, opts=opts)
    assert s.slots == 4
    loss, correct = _easy_hard_memory()
    _observe(s, loss, correct)
    plan = s.plan_epoch(0, _rng(2))
    _each_once(plan)
    _boxes_tile_grid(plan)
    counts = plan.valid.sum(1)
    q, p = int((counts == 4).sum()), int((counts == 2).sum())
    quadable = correct & (loss <= -math.log(0.9))
    assert q == quadable.sum() // 4 and q > 0
    quad_ids = plan.index[counts == 4].ravel()
    assert set(quad_ids) <= set(np.flatnonzero(quadable))
    quad_items = plan.take(np.flatnonzero(counts == 4))
    assert quad_items.resize.all()
    assert (np.sort(quad_items.box.reshape(-1, 4), 0) >= 0).all()
    assert (quad_items.box[:, :, 2] - quad_items.box[:, :, 0] == 2).all()
    np.testing.assert_allclose(quad_items.share, 0.25)
    # what is mixable but not in a quad goes in pairs
    mixable = correct & (loss <= -math.log(0.75))
    assert p == (mixable.sum() - 4 * q) // 2
    assert plan.passes == N - p - 3 * q
    assert plan.mixed_samples == 2 * p + 4 * q
    assert P.speedup(N, plan.passes) == pytest.approx(N / (N - p - 3 * q))


def test_quads_need_a_2x2_grid_and_bad_options_are_errors():
    with pytest.raises(MixtrainError, match="quads"):
        MixTrain(N, (4, 1), 2, opts=MixOptions(quad_confidence=0.9))
    with pytest.raises(MixtrainError, match="no room"):
        MixTrain(N, (1, 1), 2)
    for bad in (dict(rule="sometimes"), dict(ratio="golden"), dict(min_share=0.7), dict(fraction=1.5),
                dict(pairing="friends"), dict(first_unmixed_epochs=-1)):
        with pytest.raises(MixtrainError):
            MixTrain(N, GRID, 2, opts=MixOptions(**bad))
    with pytest.raises(MixtrainError, match="unknown method"):
        create_strategy("magic", N, GRID, 2)


def test_split_falls_back_to_the_axis_with_room():
    plan = P.pairs(np.array([0]), np.array([1]), np.array([0.5]), np.array([1]), 2, (4, 1), 0.25)
    assert plan.box[0, 0].tolist() == [0, 0, 2, 1] and plan.box[0, 1].tolist() == [2, 0, 4, 1]


def test_same_memory_same_seed_same_plan():
    # every rank builds the same plan from the same memory and seed
    plans = []
    for _ in range(2):
        s = MixTrain(N, GRID, 3, opts=MixOptions(first_unmixed_epochs=0))
        _observe(s, *_easy_hard_memory())
        plans.append(s.plan_epoch(1, np.random.default_rng([7, 1, 1])))
    for k, v in plans[0].arrays().items():
        assert np.array_equal(v, plans[1].arrays()[k]), k


@pytest.mark.parametrize("batch, world", [(4, 1), (3, 2), (5, 3), (7, 4)])
def test_padding_and_sharding_keep_each_sample_once(batch, world):
    s = MixTrain(N, GRID, 3, opts=MixOptions(first_unmixed_epochs=0))
    _observe(s, *_easy_hard_memory())
    plan = s.plan_epoch(1, _rng(1))
    full = plan.padded(batch * world, _rng(9), GRID)
    assert full.items % (batch * world) == 0 and full.items - plan.items < batch * world
    pad = full.take(np.arange(plan.items, full.items))
    assert not pad.valid.any() and (pad.box[:, 0] == (0, 0, 4, 4)).all()
    assert (pad.index[:, 0] >= 0).all() and (pad.index[:, 0] < N).all()
    assert full.passes == plan.passes and full.samples == plan.samples
    shards = [full.shard(r, world, batch) for r in range(world)]
    assert sum(sh.items for sh in shards) == full.items
    _each_once(P.EpochPlan.concat(shards))
    # the batches every rank iterates agree with the shards, and count the global samples
    seen = []
    for r in range(world):
        eb = EpochBatches(plan, batch, GRID, "cpu", torch.Generator().manual_seed(r), r, world, _rng(9),
                          image_size=(16, 16), augment=Augment())
        assert len(eb) == full.items // (batch * world)
        for b in eb:
            assert b.index.shape == (batch, plan.slots)  # fixed shapes, the last batch too
            seen += b.index[b.valid].tolist()
            assert b.samples == int(b.valid.sum())
        assert eb.global_samples.sum() == N
    assert sorted(seen) == list(range(N))


def test_shard_needs_padding_first():
    plan = P.singles(np.arange(10), 1, GRID)
    with pytest.raises(ValueError):
        plan.shard(0, 3, 2)


def test_nothing_seen_nothing_mixed():
    # mixing epochs before any loss was recorded: the auto rule mixes nothing, the plan is still whole
    s = MixTrain(N, GRID, 3, opts=MixOptions(first_unmixed_epochs=0, quad_confidence=0.9))
    plan = s.plan_epoch(0, _rng(0))
    _each_once(plan)
    assert plan.mixed_samples == 0 and plan.passes == N and plan.slots == 4


@pytest.mark.parametrize("epochs, final", [(2, 1), (10, 1), (15, 1), (29, 1), (30, 2), (60, 4)])
def test_default_final_unmixed_epochs_one_per_15_at_least_one(epochs, final):
    s = MixTrain(N, GRID, epochs)
    assert s.opts.final_epochs(epochs) == final
    assert not s.mixing(epochs - 1) and (epochs - final <= 1 or s.mixing(epochs - final - 1))
    assert MixOptions(final_unmixed_epochs=0).final_epochs(epochs) == 0  # asked for none: none


# ----------------------------------------------------------------------------------------------
# the interference watch (interference_margin >= 0)


def test_interfered_flags_mixed_samples_whose_loss_rose_past_the_margin():
    loss = np.array([1.5, 1.5, 1.5, 1.0, np.nan, 0.5, 1.5, 2.0], np.float32)
    alone = np.array([0.5, 0.5, np.nan, 0.75, 0.2, 0.5, 1.0, 0.0], np.float32)
    tier = np.array([0, 1, 2, 2, 1, 2, 2, -1], np.int8)
    # alone last (tier 0), never seen alone, exactly the margin, loss unknown, no rise, never planned
    assert interfered(loss, alone, tier, 0.25).tolist() == [False, True, False, False, False, False, True, False]
    assert interfered(loss, alone, tier, 0.5).tolist() == [False, True] + [False] * 6  # 0.5 over is not more than 0.5
    assert interfered(loss, alone, tier, 0.0).tolist() == [False, True, False, True, False, False, True, False]


# the memory of the interference tests: 40 samples, all right; 0-19 easy enough for quads (p = 0.95),
# 20-39 for pairs (p = 0.74); after the first mixed epoch 0-7 and 20-27 lost more in their mix.
# The runs pin the thresholds these were chosen for (mix from p >= 0.5, quads from p >= 0.9).
INTERFERENCE_THRESHOLDS = dict(confidence=0.5, quad_confidence=0.9)
QUAD_TIER, PAIR_TIER = np.arange(20), np.arange(20, 40)
HURT_QUAD, HURT_PAIR = np.arange(8), np.arange(20, 28)


def _interference_run(opts: MixOptions, epochs: int = 3):
    """A MixTrain with ``opts`` through the epochs 0 (unmixed), 1 and 2 of a 5-epoch schedule,
    its memory written as a trained epoch would between plans; returns it and its plans."""
    opts = dataclasses.replace(opts, **INTERFERENCE_THRESHOLDS)
    s = MixTrain(N, GRID, 5, opts=opts)
    alone = np.where(np.arange(N) < 20, 0.05, 0.3).astype(np.float32)
    plans = [s.plan_epoch(0, _rng(0))]
    _observe_plan(s, alone, plans[0])  # epoch 0: every sample alone
    plans.append(s.plan_epoch(1, _rng(1)))
    mixed = alone.copy()
    mixed[HURT_QUAD] = 0.1  # 0.05 over alone, still p(true) > 0.9: quadable
    mixed[HURT_PAIR] = 0.6  # 0.3 over alone, still p(true) > 0.5: mixable
    _observe_plan(s, mixed, plans[1])  # epoch 1, each sample in the tier the plan gave it
    if epochs > 2:
        plans.append(s.plan_epoch(2, _rng(2)))
    return s, plans


def _tiers(plan):
    """Each sample's tier in ``plan``: 0 alone, 1 in a pair, 2 in a quad (-1: not in it)."""
    tier = np.full(N, -1, np.int8)
    count = np.broadcast_to(plan.valid.sum(1, keepdims=True), plan.valid.shape)
    tier[plan.index[plan.valid]] = (count[plan.valid] >= 2).astype(np.int8) + (count[plan.valid] >= 4)
    return tier


def _observe_plan(s, loss, plan):
    """Write ``loss`` (all right) for every sample as trained in ``plan``'s items, as a step's record does."""
    batch = P.EpochPlan.to_torch(plan, "cpu")
    logits_loss = torch.tensor(loss)[batch["index"]]
    valid = batch["valid"]

    class Batch:  # what record() reads of a batch
        index, valid = batch["index"], batch["valid"]

    nll = torch.where(valid, logits_loss, torch.zeros_like(logits_loss))
    s.record(Batch, torch.zeros(*valid.shape, 10), torch.zeros(valid.shape, dtype=torch.long), nll=nll)  # all right


def test_interference_watch_moves_hurt_samples_one_tier_down():
    s, plans = _interference_run(MixOptions(interference_margin=0.02))
    assert (_tiers(plans[0]) == 0).all()
    first = _tiers(plans[1])
    assert (first[QUAD_TIER] == 2).all() and (first[PAIR_TIER] == 1).all()  # 5 quads, 10 pairs
    _each_once(plans[2])
    tier = _tiers(plans[2])
    assert (tier[HURT_PAIR] == 0).all()  # from pairs: alone
    assert (tier[HURT_QUAD] == 1).all()  # from quads: paired (the auto rule still mixes them)
    assert (tier[np.setdiff1d(QUAD_TIER, HURT_QUAD)] == 2).all() and (tier[np.setdiff1d(PAIR_TIER, HURT_PAIR)] == 1).all()
    last_tier, alone_loss = s.memory.tiers()
    assert np.array_equal(last_tier, _tiers(plans[1]))  # the memory's tiers are those of the passes recorded
    np.testing.assert_allclose(alone_loss, np.where(np.arange(N) < 20, 0.05, 0.3))  # from epoch 0 only
    assert s.epoch_stats(plans[2])["interfered_fraction"] == pytest.approx(16 / N)
    # the watch off: the same memory keeps them in their tiers
    _, off = _interference_run(MixOptions())
    tier = _tiers(off[2])
    assert (tier[QUAD_TIER] == 2).all() and (tier[PAIR_TIER] == 1).all()
    # a margin above their rise: nothing moves
    s, wide = _interference_run(MixOptions(interference_margin=0.35))
    assert np.array_equal(_tiers(wide[2]), tier) and s.epoch_stats(wide[2])["interfered_fraction"] == 0


def test_interference_watch_is_off_by_default_and_leaves_plans_as_they_were():
    default, plans = _interference_run(MixOptions())
    assert default.memory.tier is None and default.memory.alone_loss is None
    assert set(default.state_dict()) == {"memory"} and set(default.state_dict()["memory"]) == {"loss", "correct"}
    assert "interfered_fraction" not in default.epoch_stats(plans[2])
    # -1 explicitly, or a watch that never acts (it draws nothing from the generator): the same plans
    for opts in (MixOptions(interference_margin=-1), MixOptions(interference_margin=1e6)):
        _, other = _interference_run(opts)
        for a, b in zip(plans, other):
            for k, v in a.arrays().items():
                assert np.array_equal(v, b.arrays()[k]), (opts, k)
    _, acting = _interference_run(MixOptions(interference_margin=0.0))
    assert not np.array_equal(_tiers(acting[2]), _tiers(plans[2]))  # (this memory does trigger the watch)


def test_interference_watch_state_round_trip_and_bad_states():
    import io

    opts = MixOptions(interference_margin=0.02, **INTERFERENCE_THRESHOLDS)
    ref, _ = _interference_run(opts, epochs=2)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"memory", "interfered_fraction"}
    assert state["memory"]["alone_loss"].dtype == torch.float32 and state["memory"]["tier"].dtype == torch.int8
    restored = MixTrain(N, GRID, 5, opts=opts)
    restored.load_state_dict(state)
    a, b = ref.plan_epoch(2, _rng(2)), restored.plan_epoch(2, _rng(2))
    for k, v in a.arrays().items():
        assert np.array_equal(v, b.arrays()[k]), k
    assert (_tiers(a)[HURT_PAIR] == 0).all()
    # planning is a function of the memory: the same epoch planned again is the same plan
    again = ref.plan_epoch(2, _rng(2))
    assert all(np.array_equal(v, again.arrays()[k]) for k, v in a.arrays().items())
    # a memory saved with the watch off: loaded, the watch starts afresh (knows no loss alone yet)
    fresh = MixTrain(N, GRID, 5, opts=opts)
    fresh.load_state_dict({"memory": {k: state["memory"][k] for k in ("loss", "correct")}})
    tier, alone = fresh.memory.tiers()
    assert np.isnan(alone).all() and (tier == -1).all()
    assert (_tiers(fresh.plan_epoch(2, _rng(2)))[HURT_PAIR] == 1).all()  # nothing to compare with: nothing moves
    for bad in (dict(alone_loss=torch.zeros(N)), dict(tier=torch.zeros(N + 1, dtype=torch.float32)),
                dict(tier=torch.full((N + 1,), 3, dtype=torch.int8)), dict(alone_loss=np.zeros(N + 1, np.float32))):
        target = MixTrain(N, GRID, 5, opts=opts)
        with pytest.raises(ValueError):
            target.load_state_dict({**state, "memory": {**state["memory"], **bad}})
        assert torch.isnan(target.memory.loss).all() and (target.memory.tier == -1).all()  # refused whole


def test_the_watch_reads_the_passes_that_ran_when_an_epoch_stops_early():
    """A sample planned alone but never reached (an epoch cut short) keeps the tier and loss of
    the pass it really had: its mixed loss never becomes its loss alone."""
    s, plans = _interference_run(MixOptions(interference_margin=0.02))
    # epoch 2 stops before any step: the memory still holds epoch 1's passes
    again = s.plan_epoch(3, _rng(3))
    tier, alone = s.memory.tiers()
    np.testing.assert_allclose(alone, np.where(np.arange(N) < 20, 0.05, 0.3))
    assert (_tiers(again)[HURT_PAIR] == 0).all() and (_tiers(again)[HURT_QUAD] == 1).all()


@pytest.mark.parametrize("value, ok", [(float("nan"), False), (-0.5, False), (float("inf"), False),
                                       (float("-inf"), False), (0, True), (0.3, True), (-1, True), (-1.0, True)])
def test_interference_margin_must_be_finite_and_at_least_0_or_minus_1(value, ok):
    from mixtrain import OptionError
    from mixtrain.options import flag_for

    if ok:
        MixOptions(interference_margin=value).check()
        return
    with pytest.raises(OptionError) as e:
        MixOptions(interference_margin=value).check()
    assert str(e.value).startswith("interference_margin is a loss margin in nats and must be a finite number >= 0")
    assert e.value.render(flag_for).startswith("--interference-margin ")
    with pytest.raises(MixtrainError, match="interference_margin"):
        MixTrain(N, GRID, 5, opts=MixOptions(interference_margin=value))


def test_interference_watch_logs_its_fraction_in_a_digits_bench(tmp_path):
    import json

    from mixtrain.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--methods", "mixtrain(interference_margin=0.2)", "--epochs", "5", "--seeds", "1",
                 "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--progress", "none", "--deterministic",
                 "--save-checkpoints", "off", "--out", str(out)]) == 0
    log = json.loads((out / "results.json").read_text())["runs"][0]["epochs_log"]
    assert all("interfered_fraction" in row for row in log)
    assert max(row["interfered_fraction"] for row in log if row["mixed_fraction"] > 0) > 0
    assert log[0]["interfered_fraction"] == log[-1]["interfered_fraction"] == 0  # unmixed epochs move nobody


def test_interference_watch_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    from mixtrain import TrainConfig, Trainer

    def config(out, **kw):
        base = dict(data="digits", model="digitnet", method="mixtrain", epochs=5, batch_size=64, lr=0.05, seed=0,
                    device="cpu", out=str(out), progress="none", deterministic=True,
                    mix=MixOptions(interference_margin=0.2))
        return TrainConfig(**{**base, **kw})

    ref = Trainer(config(tmp_path / "ref")).fit()
    assert ref["epochs_log"][3]["interfered_fraction"] > 0

    # crash in the epoch the watch acts in: its fraction comes from the checkpoint
    resumed = crash_then_resume(lambda **kw: config(tmp_path / "run", checkpoint_every=5, **kw), "epoch 4, step 5")
    assert resumed["test_accuracy"] == ref["test_accuracy"]
    assert without_timings(resumed["epochs_log"]) == without_timings(ref["epochs_log"])
