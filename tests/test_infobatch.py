"""InfoBatch as a strategy: the pruning rule, the loss rescaling through the plan, the annealing
epochs, the schedule over pruned epochs, and an exact resume mid-epoch."""

import numpy as np
import pytest
import torch

from mixtrain import MixOptions, TrainConfig, Trainer
from mixtrain.infobatch import InfoBatch, prune
from mixtrain.loss import separated_loss
from mixtrain.strategies import create_strategy


def test_prune_leaves_out_a_fraction_of_the_below_mean_samples_and_reweighs_the_rest():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0, 2, 1000).astype(np.float32)
    loss[:50] = np.nan  # never seen: always kept
    ids, weight = prune(loss, 0.3, np.random.default_rng(1))
    seen = ~np.isnan(loss)
    easy = seen & (loss < np.nanmean(loss))
    kept = np.zeros(1000, bool)
    kept[ids] = True
    assert kept[:50].all() and kept[seen & ~easy].all()  # unseen and hard samples all stay
    assert (~kept).sum() == round(0.3 * easy.sum())  # 30 % of the easy ones leave
    assert not (~kept & ~easy).any()
    w = dict(zip(ids.tolist(), weight.tolist()))
    assert all(w[i] == pytest.approx(1 / 0.7) for i in np.flatnonzero(kept & easy))
    assert all(w[i] == 1.0 for i in np.flatnonzero(kept & ~easy))
    assert np.array_equal(ids, np.sort(ids))
    # the expected weight of the easy set is unchanged: kept count x 1/(1-r) ~ easy count
    assert (kept & easy).sum() / 0.7 == pytest.approx(easy.sum(), abs=2)
    all_ids, ones = prune(loss, 0.0, np.random.default_rng(1))
    assert len(all_ids) == 1000 and (ones == 1).all()
    fresh, _ = prune(np.full(10, np.nan, np.float32), 0.5, np.random.default_rng(1))
    assert len(fresh) == 10


def test_plans_prune_until_the_annealing_epochs_and_carry_the_weights():
    s = create_strategy("infobatch", 400, (4, 4), 8, "cpu", MixOptions(prune_ratio=0.5, prune_until=0.75))
    assert isinstance(s, InfoBatch) and s.prunes and s.slots == 1
    first = s.plan_epoch(0, np.random.default_rng(0))  # nothing seen yet: everything, weight 1
    assert first.samples == 400 and (first.weight == 1).all()
    losses = torch.linspace(0.0, 1.0, 400)
    s.observe(torch.arange(400), torch.ones(400, dtype=torch.bool), losses, torch.ones(400, dtype=torch.bool))
    plan = s.plan_epoch(3, np.random.default_rng(0))
    easy = int((losses < losses.mean()).sum())
    assert plan.samples == 400 - round(0.5 * easy) and plan.passes == plan.samples
    assert len(np.unique(plan.index[:, 0])) == plan.samples  # each kept sample once
    kept_easy = losses[plan.index[:, 0]] < losses.mean()
    assert np.allclose(plan.weight[kept_easy.numpy(), 0], 2.0) and np.allclose(plan.weight[~kept_easy.numpy(), 0], 1.0)
    assert s.plan_epoch(6, np.random.default_rng(0)).samples == 400  # 6 >= 0.75 x 8: all the data
    assert (s.plan_epoch(6, np.random.default_rng(0)).weight == 1).all()


def test_plan_weights_scale_each_samples_term_of_the_loss():
    logits = torch.randn(3, 2, 5)
    targets = torch.randint(0, 5, (3, 2))
    valid = torch.tensor([[True, False], [True, True], [True, False]])
    weight = torch.tensor([[2.0, 9.0], [1.0, 0.5], [1.0, 1.0]])
    loss, ce = separated_loss(logits, targets, valid, weight=weight)
    manual = (2 * ce[0, 0] + ce[1, 0] + 0.5 * ce[1, 1] + ce[2, 0]) / 4  # mean over the 4 samples carried
    assert loss.item() == pytest.approx(manual.item())
    plain, ce2 = separated_loss(logits, targets, valid)
    assert torch.equal(ce, ce2) and plain.item() != pytest.approx(loss.item())


def config(out, **kw):
    base = dict(data="digits", model="digitnet", method="infobatch", epochs=8, batch_size=64, lr=0.05, seed=0,
                device="cpu", out=str(out), progress="none", deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def test_infobatch_trains_fewer_samples_and_its_schedule_still_ends_at_zero(tmp_path):
    m = Trainer(config(tmp_path / "ib", save_checkpoints=False)).fit()
    n = m["epochs_log"][0]["samples"]
    log = m["epochs_log"]
    assert all(r["samples"] < n for r in log[1:7]) and log[7]["samples"] == n  # 7 = 0.875 x 8: all data again
    assert log[6]["pruned_fraction"] > 0.2 and log[7]["pruned_fraction"] == 0
    assert m["passes"] == m["samples"] < 8 * n
    # every epoch advances the one-cycle schedule by a whole epoch: it ends where the baseline's does
    base = Trainer(config(tmp_path / "b", method="baseline", save_checkpoints=False)).fit()
    assert [r["lr_end"] for r in log] == pytest.approx([r["lr_end"] for r in base["epochs_log"]], rel=0.05)
    assert log[-1]["lr_end"] < 0.001 and m["test_accuracy"] > 0.9


class _Crash(Exception):
    pass


def test_infobatch_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    ref = Trainer(config(tmp_path / "ref", epochs=4)).fit()

    class CrashAfter(Trainer):
        def on_checkpoint(self, where):
            if where == "epoch 3, step 6":
                raise _Crash(where)

    with pytest.raises(_Crash):
        CrashAfter(config(tmp_path / "run", epochs=4, checkpoint_every=6)).fit()
    left = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert left["plan"]["valid"].sum() < 1437  # a pruned epoch's plan was saved
    assert not torch.equal(left["plan"]["weight"], torch.ones_like(left["plan"]["weight"]))
    resumed = Trainer(config(tmp_path / "run", epochs=4, checkpoint_every=6, resume=True)).fit()
    assert resumed["test_accuracy"] == ref["test_accuracy"] and resumed["samples"] == ref["samples"]
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(resumed["epochs_log"]) == strip(ref["epochs_log"])
