"""The DataLoader-native API (mixtrain.Mixer): sampler, compose, loss, epochs, state, DDP, errors.

Most tests drive the Mixer directly from its sampler's id lists (what a DataLoader would fetch);
one runs a real DataLoader with workers, one two processes under torchrun with gloo.
"""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import mixtrain as mt
from mixtrain import Augment, EpochBatches, MixOptions, Mixer, MixtrainError, MixtrainWarning, Normalizer
from mixtrain.distributed import plan_digest

GRID, SIZE, N = (4, 4), (16, 16), 60


def images(n=N, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, *SIZE), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def confident_half(mixer: Mixer, n=N):
    """A loss memory in which even samples are sure and right (quads) and odd ones not (pairs)."""
    idx = torch.arange(n)
    easy = idx % 2 == 0
    loss = torch.where(easy, torch.tensor(0.01), torch.tensor(2.0))
    mixer.strategy.memory.update(idx, torch.ones(n, dtype=torch.bool), loss, easy)


def mixer(**kw) -> Mixer:
    opts = kw.pop("opts", MixOptions(first_unmixed_epochs=0, final_unmixed_epochs=1, rule="all"))
    args = dict(grid=GRID, image_size=SIZE, num_samples=N, epochs=3, batch_size=8, opts=opts)
    args.update(kw)
    return Mixer(**args)


def fake_logits(step, classes=10):
    """Logits that depend only on the step's sample ids and labels: a deterministic 'model'."""
    sure = (step.index % 7).float()[..., None] * 0.5
    return nn.functional.one_hot(step.targets, classes).float() * sure


def test_compose_equals_the_resident_path_for_pairs_quads_and_padding():
    """Float constituents through compose give the composites that EpochBatches makes from the
    same uint8 images with the same plan and draws (placement only: no padding crop, no flip)."""
    x, y = images()
    m = mixer()
    confident_half(m)
    m.set_epoch(0)
    plan = m.plan
    counts = plan.valid.sum(1)
    assert (counts == 4).any() and (counts == 2).any()  # quads and pairs
    assert plan.items % 8  # the last step is padded
    mine = m.layout.mine  # padded to whole steps
    same = Normalizer((0.0,), (1 / 255,), "cpu")  # uint8 -> the same values as floats
    steps = list(m.sampler)
    assert len(steps) == m.steps == mine.items // 8
    for j, ids in enumerate(steps):
        step = m.compose(x[ids].float(), y[ids])
        rows = mine.take(np.arange(8 * j, 8 * j + 8))  # step j's items, with the step's own draws
        b = EpochBatches(rows, 8, GRID, "cpu", m.layout.generator(j), image_size=SIZE,
                         augment=Augment(pad=0, flip=False)).batch(0)
        want = b.compose(x, same)
        assert step.images.shape == (8, 1, *SIZE)
        torch.testing.assert_close(step.images, want, atol=1e-3, rtol=0)
        assert torch.equal(step.masks, b.pool_masks())
        assert torch.equal(step.index, b.index) and torch.equal(step.valid, b.valid)
        assert torch.equal(step.targets[step.valid], y[b.index][b.valid])
        assert step.samples == int(b.valid.sum())


def test_sampler_yields_each_steps_images_and_every_sample_once():
    x, y = images()
    m = mixer()
    confident_half(m)
    m.set_epoch(0)
    trained = []
    for ids in m.sampler:
        layout = m.layout
        j = m.consumed
        assert len(ids) == layout.counts[j]  # one image per shown slot
        step = m.compose(x[ids].float(), y[ids])
        shown = step.masks.sum((2, 3)) > 0
        assert int(shown.sum()) == len(ids)  # every loaded image lands in a region
        trained.append(step.index[step.valid])
    trained = torch.cat(trained)
    assert sorted(trained.tolist()) == list(range(N))  # the epoch trains every sample once
    assert m.plan.passes < N  # packed


def test_auto_step_scale_follows_the_optimizer_the_mixer_is_told_of():
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    adam = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
    from types import SimpleNamespace

    wrapped = SimpleNamespace(optimizer=sgd)  # as Lightning's or DeepSpeed's wrappers hold one
    for optimizer, expected in ((sgd, "linear"), ("sgd", "linear"), (wrapped, "linear"), (adam, "none"),
                                ("adamw", "none"), (None, "none")):  # unknown: nothing scaled
        assert mixer(optimizer=optimizer).step_scale == expected
    assert mixer(optimizer=adam, opts=MixOptions(step_scale="sqrt")).step_scale == "sqrt"  # asked for: kept
    with pytest.raises(MixtrainError, match="takes a torch.optim.Optimizer or its name"):
        mixer(optimizer=3)


def test_each_step_says_what_step_scale_asks_of_its_learning_rate():
    x, y = images()
    for method, step_scale, power in (("mixtrain", "linear", 1.0), ("mixtrain", "sqrt", 0.5), ("mixtrain", "none", 0.0),
                                      ("mixtrain", "auto", 0.0), ("baseline", "linear", 0.0), ("cutmix", "linear", 0.0)):
        m = mixer(method=method, opts=MixOptions(first_unmixed_epochs=0, final_unmixed_epochs=1, rule="all",
                                                 step_scale=step_scale))
        if method == "mixtrain":
            confident_half(m)  # quads and pairs: steps carry 2 to 4 samples per pass
        m.set_epoch(0)
        ratios = []
        for ids in m.sampler:
            step = m.compose(x[ids].float(), y[ids])
            passes = int(step.valid.any(1).sum())
            ratio = step.global_samples / passes if method == "mixtrain" else 1.0
            assert step.lr_factor == pytest.approx(ratio**power)
            ratios.append(ratio)
        assert method != "mixtrain" or max(ratios) > 2  # the quads were there to be scaled


def test_unmixed_steps_pass_the_images_through_and_baseline_works():
    x, y = images()
    m = mixer(method="baseline", opts=None)
    m.set_epoch(0)
    ids = next(iter(m.sampler))
    batch = x[ids].float()
    step = m.compose(batch, y[ids])
    assert step.images is batch  # nothing to resample
    assert step.masks.shape == (8, 1, *GRID)
    loss = m.loss(torch.randn(8, 1, 10, requires_grad=True), step)
    assert loss.ndim == 0 and loss.requires_grad


def test_loss_is_the_separated_loss_and_records_every_sample():
    x, y = images()
    m = mixer()
    confident_half(m)
    m.set_epoch(0)
    for ids in m.sampler:
        step = m.compose(x[ids].float(), y[ids])
        logits = fake_logits(step).requires_grad_()
        loss = m.loss(logits, step)
        want, _ = mt.separated_loss(logits, step.targets, step.valid)
        torch.testing.assert_close(loss, want)
    recorded, _ = m.strategy.memory.snapshot()
    expect = mt.sample_stats(fake_logits_for_ids(np.arange(N), y), y)[0].numpy()
    np.testing.assert_allclose(recorded, expect, rtol=1e-5)


def fake_logits_for_ids(ids, y):
    sure = torch.as_tensor(ids % 7).float()[:, None] * 0.5
    return nn.functional.one_hot(y, 10).float() * sure


def train_steps(m: Mixer, x, y, epochs, stop=None):
    """Train ``m`` (with the fake model) over ``epochs``; every step's (epoch, step, ids,
    composites). ``stop``: (epoch, steps) after which to return."""
    seen = []
    for epoch in epochs:
        m.set_epoch(epoch)  # a resumed epoch keeps its plan and position
        for ids in m.sampler:
            step = m.compose(x[ids].float(), y[ids])
            m.loss(fake_logits(step), step)
            seen.append((step.epoch, step.step, list(ids), step.images.clone()))
            if stop == (epoch, step.step + 1):
                return seen
    return seen


@pytest.mark.parametrize("stop,first_epochs", [((1, 3), range(4)), (None, range(2))], ids=["mid-epoch", "epoch-end"])
def test_state_dict_resumes_exactly(stop, first_epochs):
    x, y = images()

    def make():
        return mixer(epochs=4, opts=MixOptions(first_unmixed_epochs=1, final_unmixed_epochs=1))

    whole = train_steps(make(), x, y, range(4))
    assert {s[0] for s in whole} == {0, 1, 2, 3}
    first = make()
    part = train_steps(first, x, y, first_epochs, stop)
    state = first.state_dict()
    assert state["epoch"] == (1 if stop else 2) and state["step"] == (3 if stop else 0)
    assert all(torch.is_tensor(v) for v in (state["plan"] or {}).values())  # data only, no numpy
    second = make()
    second.load_state_dict(state)
    joined = part + train_steps(second, x, y, range(state["epoch"], 4))
    assert [s[:3] for s in joined] == [s[:3] for s in whole]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(joined, whole))


def test_a_new_pass_of_the_loader_plans_the_next_epoch_without_set_epoch():
    x, y = images()
    m = mixer(opts=MixOptions(first_unmixed_epochs=1, final_unmixed_epochs=0, rule="all"), epochs=2)
    epochs = []
    for _ in range(2):
        for ids in m.sampler:
            step = m.compose(x[ids].float(), y[ids])
            m.loss(fake_logits(step), step)
        epochs.append((m.epoch, m.plan.passes))
    assert epochs[0] == (0, N) and epochs[1][0] == 1 and epochs[1][1] < N


class Pictures(Dataset):
    """A torchvision-style dataset: uint8 images through a CPU transform, (image, label) pairs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].float() / 255 - 0.5, int(self.y[i])


def test_a_dataloader_with_workers_delivers_the_steps_in_order():
    x, y = images()
    m = mixer()
    confident_half(m)
    loader = DataLoader(Pictures(x, y), batch_sampler=m.sampler, num_workers=2)
    m.set_epoch(0)
    assert len(loader) == m.steps
    n = 0
    for imgs, labels in loader:
        step = m.compose(imgs, labels)  # checks each batch's size against its step
        assert torch.equal(step.targets[step.valid], y[step.index[step.valid]])  # labels follow the ids
        n += 1
    assert n == m.steps


# ------------------------------------------------------------------------------------------------
# errors and notices


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_mixer_errors_are_one_line():
    x, y = images()
    with pytest.raises(MixtrainError, match="needs the adapted model") as e:
        Mixer(nn.Linear(3, 3), N, 3, 8)
    one_line(e)
    with pytest.raises(MixtrainError, match="grid= .* and image_size="):
        Mixer(None, N, 3, 8)
    with pytest.raises(MixtrainError, match="needs batch_size, a whole number >= 1, got None"):
        Mixer(None, N, 3, None, grid=GRID, image_size=SIZE)
    with pytest.raises(MixtrainError, match=r"batch size 40 x 2 process\(es\) is larger than the training set"):
        mixer(batch_size=40, rank=0, world=2)
    m = mixer()
    with pytest.raises(MixtrainError, match="call mixer.set_epoch"):
        m.compose(x[:8].float(), y[:8])
    with pytest.raises(MixtrainError, match="outside the schedule of 3 epochs"):
        m.set_epoch(3)
    m.set_epoch(0)
    ids = next(iter(m.sampler))
    with pytest.raises(MixtrainError, match="one float tensor .* got a torch.uint8 tensor"):
        m.compose(x[ids], y[ids])
    with pytest.raises(MixtrainError, match=r"shows \d+ images but the batch holds 8: build the DataLoader with batch_sampler=mixer.sampler"):
        m.compose(x[:8].float(), y[:8])
    big = torch.zeros(len(ids), 1, 20, 20)
    with pytest.raises(MixtrainError, match="images are 20x20 but the model takes 16x16"):
        m.compose(big, y[ids])
    with pytest.raises(MixtrainError, match="needs the MixStep"):
        m.loss(torch.zeros(8, 4, 10), None)
    for ids in m.sampler:
        m.compose(x[ids].float(), y[ids])
    with pytest.raises(MixtrainError, match="were composed already; call mixer.set_epoch\\(1\\)"):
        m.compose(x[ids].float(), y[ids])
    with pytest.raises(MixtrainError, match="saved mixer state has batch_size 8, this one 4"):
        mixer(batch_size=4).load_state_dict(m.state_dict())


def test_a_schedule_that_never_mixes_is_reported():
    with pytest.warns(MixtrainWarning, match=r"will never mix in this run: of its 2 epoch\(s\), the first 1 and the last"):
        mixer(epochs=2, opts=MixOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixtrainWarning)
        mixer(epochs=3, opts=MixOptions())  # epoch 1 mixes: nothing to say


def test_planning_a_mixing_epoch_from_an_empty_loss_memory_is_reported():
    """The own loop that forgets method.record() would never mix: the plan says so."""
    method = mt.MixTrain(N, GRID, 4)
    method.plan_epoch(0, np.random.default_rng(0))  # warm-up: no memory needed
    with pytest.warns(MixtrainWarning, match=r"plan_epoch\(1\): this epoch should mix, but the loss memory is empty"):
        method.plan_epoch(1, np.random.default_rng(1))
    idx = torch.arange(N)
    method.memory.update(idx, torch.ones(N, dtype=torch.bool), torch.full((N,), 0.01), torch.ones(N, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixtrainWarning)
        assert method.plan_epoch(1, np.random.default_rng(1)).mixed_samples > 0


def test_epoch_batches_need_image_size_and_augment_or_a_data_source():
    x, y = images()
    plan = mt.Baseline(N, GRID, 1).plan_epoch(0, np.random.default_rng(0))
    with pytest.raises(MixtrainError, match="EpochBatches needs image_size and augment") as e:
        EpochBatches(plan, 8, GRID, "cpu")
    one_line(e)
    with pytest.raises(MixtrainError, match="EpochBatches needs augment"):
        EpochBatches(plan, 8, GRID, "cpu", image_size=SIZE)
    data = mt.load_data("digits")
    batches = EpochBatches(plan, 8, GRID, "cpu", data=data)
    assert batches.source_size == data.image_size == (16, 16)
    assert batches.batch(0).compose(data.train_x, Normalizer(data.mean, data.std, "cpu")).shape == (8, 1, 16, 16)
    wrong = EpochBatches(plan, 8, GRID, "cpu", image_size=(32, 32), augment=Augment())
    with pytest.raises(MixtrainError, match="the images are 16x16 but these batches were laid out for 32x32 images"):
        wrong.batch(0).compose(data.train_x, Normalizer(data.mean, data.std, "cpu"))


# ------------------------------------------------------------------------------------------------
# two processes


DDP_LOOP = textwrap.dedent(
    """
    # The README's DataLoader loop under DDP: two processes, gloo, the digits.
    import os, sys
    import numpy as np, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, Dataset
    import mixtrain as mt
    from mixtrain.distributed import plan_digest, state_digest

    class Digits(Dataset):
        def __init__(self, x, y): self.x, self.y = x, y
        def __len__(self): return len(self.x)
        def __getitem__(self, i): return self.x[i].float() / 255 - 0.5, int(self.y[i])

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = mt.load_data("digits")
    torch.manual_seed(0)
    model = mt.adapt(mt.create_model("digitnet", 10, 1, 16), 16, 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mixer = mt.Mixer(model, data.num_train, 2, batch_size=96, opts=mt.MixOptions(final_unmixed_epochs=0, rule="all"))
    loader = DataLoader(Digits(data.train_x, data.train_y), batch_sampler=mixer.sampler)
    for epoch in range(2):
        mixer.set_epoch(epoch)
        plan, trained = mixer.plan, []
        for images, labels in loader:
            step = mixer.compose(images, labels)
            loss = mixer.loss(ddp(step.images, step.masks), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trained.append(step.index[step.valid])
        state = mixer.state_dict()  # on every process: merges the loss memories
        np.savez(os.path.join(out, f"rank{rank}_epoch{epoch}.npz"), ids=torch.cat(trained).numpy(),
                 plan_ids=plan.index[plan.valid], plan_sha=np.array(plan_digest(plan)),
                 strategy_sha=np.array(state_digest(state["strategy"])),
                 batch_shape=np.array([len(trained), 96]), passes=np.array(plan.passes))
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    np.save(os.path.join(out, f"rank{rank}_weights.npy"), w.numpy())
    dist.destroy_process_group()
    """
)


def test_the_dataloader_loop_under_ddp_plans_alike_and_splits_every_step(tmp_path):
    """Same plan and merged memory on both processes, each sample trained once per epoch by one of
    them, mixing from epoch 2, identical weights at the end."""
    from test_distributed import check_epoch_records, torchrun_script

    rec, recs = torchrun_script(DDP_LOOP, tmp_path)
    n = mt.load_data("digits").num_train
    check_epoch_records(recs, 2, n)
    assert int(recs[0, 0]["passes"]) == n and int(recs[0, 1]["passes"]) < 0.6 * n  # epoch 2 packs
    w0, w1 = (np.load(rec / f"rank{r}_weights.npy") for r in range(2))
    assert np.array_equal(w0, w1)


def test_two_ranks_in_process_share_one_plan_and_split_each_step():
    x, y = images()
    ranks = [mixer(rank=r, world=2, batch_size=4) for r in range(2)]
    for m in ranks:
        confident_half(m)
        m.set_epoch(0)
    assert plan_digest(ranks[0].plan) == plan_digest(ranks[1].plan)
    assert ranks[0].steps == ranks[1].steps
    got = []
    for m in ranks:
        for ids in m.sampler:
            step = m.compose(x[ids].float(), y[ids])
            got.append(step.index[step.valid])
    assert sorted(torch.cat(got).tolist()) == list(range(N))


def test_every_public_name_has_a_docstring():
    """mixtrain's public names, their public methods and properties, and the Lightning callback."""
    import inspect

    names = [(n, getattr(mt, n)) for n in mt.__all__]
    try:
        from mixtrain.integrations.lightning import MixTrainCallback

        names.append(("MixTrainCallback", MixTrainCallback))
    except ImportError:
        pass
    missing = []
    for name, obj in names:
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (property, staticmethod))):
                    continue
                if not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{name}.{attr}")
    assert not missing, missing


def interfering_logits(step, classes=10):
    """Like ``fake_logits``, but a sample that shares its image is less sure: mixing "hurts" it."""
    shared = step.valid.sum(1, keepdim=True) > 1
    sure = (step.index % 7).float() * 0.5 + 1.0 - shared.float() * 0.8
    return nn.functional.one_hot(step.targets, classes).float() * sure[..., None]


def test_a_state_saved_before_an_epochs_first_step_keeps_the_plan():
    """A state saved between planning an epoch and its first step carries the plan, so the resumed
    mixer serves that very plan, and the run continues exactly, the interference watch's tiers and
    losses alone included."""
    x, y = images()

    def make():
        opts = MixOptions(first_unmixed_epochs=1, final_unmixed_epochs=0, confidence=0.3, quad_confidence=0.0,
                          interference_margin=0.0)
        return mixer(epochs=5, opts=opts)

    def run(m, epochs):
        seen = []
        for epoch in epochs:
            m.set_epoch(epoch)
            for ids in m.sampler:
                step = m.compose(x[ids].float(), y[ids])
                m.loss(interfering_logits(step), step)
                seen.append((step.epoch, step.step, list(ids)))
        return seen

    whole_mixer = make()
    whole = run(whole_mixer, range(2))
    whole_mixer.set_epoch(2)
    assert whole_mixer.strategy.interfered_fraction > 0  # epoch 2 is planned with the watch acting
    whole += run(whole_mixer, range(2, 5))
    first = make()
    part = run(first, range(2))
    first.set_epoch(2)  # planned, no step yet
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (2, 0) and state["plan"] is not None
    second = make()
    second.load_state_dict(state)
    joined = part + run(second, range(2, 5))
    assert joined == whole
    for a, b in zip(second.strategy.memory.tiers(), whole_mixer.strategy.memory.tiers()):
        np.testing.assert_array_equal(a, b)
