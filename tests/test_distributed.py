"""Distributed data parallel: sharding, loss weighting, and two real 2-process gloo runs on the CPU.

The multi-process tests start ``torch.distributed.run`` (torchrun) on localhost with a free port and
ask each rank to record, per epoch, what it trained on (``MIXTRAIN_RECORD_SAMPLES``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mixtrain
from mixtrain import plan as P
from mixtrain.batches import EpochBatches
from mixtrain.distributed import DistInfo, RECORD_ENV, state_digest
from mixtrain.strategies import STRATEGIES, MixOptions, MixTrain

SRC = os.path.dirname(os.path.dirname(os.path.abspath(mixtrain.__file__)))
GRID = (4, 4)


def mixed_plan(n: int, n_pairs: int, seed: int = 0) -> P.EpochPlan:
    """A shuffled plan of ``n`` samples: ``n_pairs`` pairs, the rest alone (2 slots)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)
    a, b, rest = ids[:n_pairs], ids[n_pairs : 2 * n_pairs], ids[2 * n_pairs :]
    share = rng.uniform(0.25, 0.75, n_pairs)
    plan = P.EpochPlan.concat(
        [P.pairs(a, b, share, rng.integers(0, 2, n_pairs), 2, GRID, 0.25), P.singles(rest, 2, GRID)]
    )
    return plan.take(rng.permutation(plan.items))


# ----------------------------------------------------------------------------------------------
# In-process: shards, fixed shapes, loss weights


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_the_plan_once_with_fixed_shapes(world):
    n, batch = 101, 8
    plan = mixed_plan(n, 30)
    shards = [EpochBatches(plan, batch, GRID, "cpu", torch.Generator().manual_seed(r), r, world,
                           np.random.default_rng(7), (32, 32), mixtrain.Augment()) for r in range(world)]
    ids = np.concatenate([s.plan.index[s.plan.valid] for s in shards])
    assert len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))  # every sample once
    assert np.array_equal(np.sort(ids), np.sort(plan.index[plan.valid]))
    steps = {len(s) for s in shards}
    assert len(steps) == 1  # every rank takes the same number of steps
    for s in shards:
        for bt in s:
            assert bt.index.shape == (batch, 2) and bt.geo.xline.shape == (batch, 3, 32)
    # the per-step global counts are the sums of the ranks' counts, the same on every rank
    total = sum(s.local_samples for s in shards)
    for s in shards:
        assert np.array_equal(s.global_samples, total)
        assert np.array_equal(s.global_passes, sum(t.local_passes for t in shards))
    assert int(total.sum()) == n


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_every_strategys_step_state_survives_the_epoch_merge_in_place(method, monkeypatch):
    """A captured DDP step writes to the step-state tensors at the addresses it was captured with:
    the end-of-epoch merge across ranks must update them in place, for every strategy (a merge
    that rebound them froze the loss memory on 2x H200 in session 7)."""
    import torch.distributed as dist

    from mixtrain.strategies import create_strategy

    strategy = create_strategy(method, 8, (4, 4), 4, "cpu", MixOptions())
    if strategy.uses_memory:
        strategy.observe(torch.tensor([1, 2]), torch.tensor([True, True]), torch.tensor([0.3, 0.9]), torch.tensor([True, False]))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t)  # the other rank wrote nothing this epoch
    state = strategy.step_state()
    ptrs = [t.data_ptr() for t in state]
    strategy.end_epoch(distributed=True)
    assert [t.data_ptr() for t in strategy.step_state()] == ptrs
    if strategy.uses_memory:
        assert torch.allclose(strategy.memory.loss[1:3], torch.tensor([0.3, 0.9]))  # merged values, same tensors


def test_the_merge_carries_each_samples_tier_and_loss_alone_from_the_rank_that_trained_it(monkeypatch):
    """With the interference watch, the epoch merge takes each sample's last tier from the rank
    that trained it, and its loss alone where that pass was alone; the rest keep their values."""
    import torch.distributed as dist

    from mixtrain.memory import LossMemory

    ranks = [LossMemory(6, tiers=True) for _ in range(2)]
    for m in ranks:  # epoch 0, merged: every sample alone at loss 0.5
        m.update(torch.arange(6), torch.ones(6, dtype=torch.bool), torch.full((6,), 0.5), torch.ones(6, dtype=torch.bool))
        m.touched.zero_()
    # this epoch: rank 0 pairs 0 and 1 (loss 0.9) and trains 2 alone (0.2); rank 1 trains 3 alone (0.1)
    ranks[0].update(torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool), torch.tensor([0.9, 0.9, 0.2]),
                    torch.ones(3, dtype=torch.bool), torch.tensor([1, 1, 0], dtype=torch.int8))
    ranks[1].update(torch.tensor([3]), torch.ones(1, dtype=torch.bool), torch.tensor([0.1]), torch.ones(1, dtype=torch.bool))
    payloads = [None, None]

    def fake_all_reduce(t, *a, **k):  # each rank's payload is summed with the other's
        me = 0 if payloads[0] is None else 1
        payloads[me] = t.clone()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    originals = [m.touched.clone() for m in ranks]
    for m in ranks:  # collect both payloads first, then merge with their sum
        m.all_reduce()
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.copy_(payloads[0] + payloads[1]))
    for m, touched in zip(ranks, originals):
        m.touched.copy_(touched)
        m.all_reduce()
    for m in ranks:
        tier, alone = m.tiers()
        assert tier.tolist() == [1, 1, 0, 0, 0, 0]
        np.testing.assert_allclose(alone, [0.5, 0.5, 0.2, 0.1, 0.5, 0.5])
        np.testing.assert_allclose(m.loss[:6].numpy(), [0.9, 0.9, 0.2, 0.1, 0.5, 0.5])


def test_loss_scale_makes_the_rank_average_the_global_mean():
    """DDP averages the ranks' gradients; with the scale, that average is the gradient of the mean
    over every sample of the global batch (each sample weighs the same, as in one process)."""
    n, batch, world = 90, 8, 3
    plan = mixed_plan(n, 35, seed=1)
    per_sample = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shards = [EpochBatches(plan, batch, GRID, "cpu", None, r, world, np.random.default_rng(3), (16, 16),
                           mixtrain.Augment()) for r in range(world)]
    for j in range(len(shards[0])):
        rank_terms, all_ids = [], []
        for s in shards:
            bt = s.batch(j)
            ids = bt.index[bt.valid]
            local_mean = per_sample[ids].sum() / max(1, len(ids))
            rank_terms.append(local_mean * s.loss_scale(j))
            all_ids.append(ids)
        ids = torch.cat(all_ids)
        assert torch.allclose(sum(rank_terms) / world, per_sample[ids].mean())
    # one process: no rescaling at all
    single = EpochBatches(plan, batch, GRID, "cpu", image_size=(16, 16), augment=mixtrain.Augment())
    assert all(single.loss_scale(j) == 1.0 for j in range(len(single)))


def test_sync_without_a_process_group_is_harmless():
    s = MixTrain(10, GRID, 3, "cpu", MixOptions())
    s.observe(torch.arange(4), torch.ones(4, dtype=torch.bool), torch.full((4,), 0.5), torch.ones(4, dtype=torch.bool))
    before = state_digest(s.state_dict())
    s.end_epoch(distributed=True)
    assert state_digest(s.state_dict()) == before
    assert DistInfo().first_flag(torch.tensor(-1)) == -1 and DistInfo().first_flag(torch.tensor(4)) == 4


@pytest.mark.parametrize("name,size,chans", [("digitnet", 16, 1), ("resnet18", 32, 3),
                                              ("vit_tiny", 32, 3)])
def test_every_parameter_gets_a_gradient_with_pool_masks(name, size, chans):
    """DDP runs without searching for unused parameters: a region-pooled step, with an empty slot
    as warm-up epochs and padding have, must reach every parameter."""
    torch.manual_seed(0)
    model = mixtrain.adapt(mixtrain.create_model(name, 10, chans, size), (size, size), chans)
    gh, gw = model.grid
    box = torch.tensor([[[0, 0, gh, gw], [0, 0, 0, 0]], [[0, 0, gh, gw // 2], [0, gw // 2, gh, gw]]])
    logits = model(torch.randn(2, chans, size, size), mixtrain.pool_masks(box, model.grid))
    assert logits.shape == (2, 2, 10)
    logits.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: parameters without a gradient: {unused}"


# ----------------------------------------------------------------------------------------------
# Two processes, gloo, on the CPU


TEARDOWN_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], tmp_path, record_dir=None, timeout=240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", RECORD_ENV)}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    if record_dir:
        env[RECORD_ENV] = str(record_dir)
    # --standalone: torchrun binds a free port itself (a port picked here could be taken before it binds)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    for attempt in range(2):
        r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        # torch 2.14 on the CPU: now and then a gloo worker thread aborts the process as it exits, after
        # destroy_process_group and all the script's work (docs/distributed.md). That teardown crash,
        # and only it, is run once more; any other failure fails at once.
        if r.returncode == 0 or TEARDOWN_ABORT not in r.stderr:
            break
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def torchrun_script(source: str, tmp_path, epochs: int = 2):
    """Run ``source`` under torchrun (2 processes), its first argument a record folder: that folder
    and the records the processes wrote there."""
    script = tmp_path / "script.py"
    script.write_text(source)
    rec = tmp_path / "rec"
    rec.mkdir()
    torchrun([str(script), str(rec)], tmp_path)
    return rec, load_records(rec, epochs)


def load_records(folder, epochs: int, world: int = 2):
    recs = {}
    for e in range(epochs):
        for r in range(world):
            with np.load(os.path.join(folder, f"rank{r}_epoch{e}.npz")) as f:
                recs[r, e] = {k: f[k] for k in f.files}
    assert len(glob.glob(os.path.join(folder, "*.npz"))) == epochs * world
    return recs


def check_epoch_records(recs, epochs: int, n: int, world: int = 2):
    """The plan is the same on every rank; the ranks' samples are the plan, each exactly once."""
    for e in range(epochs):
        ranks = [recs[r, e] for r in range(world)]
        assert len({str(x["plan_sha"]) for x in ranks}) == 1, f"epoch {e}: ranks planned differently"
        assert len({str(x["strategy_sha"]) for x in ranks}) == 1, f"epoch {e}: loss memories differ after the merge"
        plan_ids = ranks[0]["plan_ids"]
        assert all(np.array_equal(x["plan_ids"], plan_ids) for x in ranks)
        trained = np.concatenate([x["ids"] for x in ranks])
        assert len(trained) == len(plan_ids) == n  # no duplicates, nothing missing
        assert np.array_equal(np.sort(trained), np.sort(plan_ids))
        assert np.array_equal(np.sort(trained), np.arange(n))
        assert len({tuple(x["batch_shape"]) for x in ranks}) == 1  # same steps and batch shape


def test_torchrun_two_processes_train_mixtrain_on_digits(tmp_path):
    """``torchrun --nproc_per_node 2 -m mixtrain train`` with gloo: global plan and loss memory,
    each sample once per epoch, mixing from epoch 2, rank-0 outputs, global LR and evaluation."""
    from mixtrain.data import load_digits

    out, rec = tmp_path / "run", tmp_path / "rec"
    epochs, batch = 2, 64
    r = torchrun(["-m", "mixtrain", "train", "--data", "digits", "--method", "mixtrain", "--epochs", str(epochs),
                  "--batch-size", str(batch), "--lr", "0.05", "--device", "cpu", "--out", str(out),
                  "--first-unmixed-epochs", "1", "--final-unmixed-epochs", "0", "--mix-rule", "fraction", "--mix-fraction", "0.5", "--progress", "line"],
                 tmp_path, record_dir=rec)
    data = load_digits()
    n = data.num_train

    recs = load_records(rec, epochs)
    check_epoch_records(recs, epochs, n)
    for (rank, e), x in recs.items():
        assert int(x["samples_seen"]) == (e + 1) * n  # the LR schedule counts every rank's samples
        assert tuple(x["batch_shape"])[1] == batch  # --batch-size is per process

    # epoch 1 unmixed, epoch 2 mixed (half the samples, in pairs)
    m = json.loads((out / "metrics.json").read_text())
    log = m["epochs_log"]
    assert log[0]["mixed_fraction"] == 0 and log[0]["passes"] == n
    assert log[1]["mixed_fraction"] > 0.4 and log[1]["passes"] < n and log[1]["samples"] == n
    assert m["world_size"] == 2 and json.loads((out / "config.json").read_text())["world_size"] == 2
    assert log[-1]["lr_end"] < 0.05 * 0.2  # the schedule reached its end in global samples

    # rank 0 alone prints the summary and writes the outputs
    assert r.stdout.count("passes for") == 1
    assert len(re.findall(r"^epoch\s+2/2", r.stdout, re.M)) == 1
    assert {"checkpoint.pt", "config.json", "metrics.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    # the loss memory is global: after the merges rank 0's checkpoint knows every sample's loss
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # data only
    assert state["samples_seen"] == epochs * n
    assert torch.isfinite(state["strategy"]["memory"]["loss"][:n]).all()

    # evaluation counts each test sample once, and agrees with rank 0's saved model on one process
    assert m["test_samples"] == len(data.test_y)
    model = mixtrain.adapt(mixtrain.create_model("digitnet", 10, 1, 16), (16, 16), 1)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        x = mixtrain.Normalizer(data.mean, data.std, "cpu")(data.test_x)
        correct = int((model(x).argmax(-1) == data.test_y).sum())
    assert abs(correct - m["test_accuracy"] * len(data.test_y)) <= 1


OWN_LOOP = textwrap.dedent(
    """
    # The docs/distributed.md recipe: one's own loop under DDP with the public API.
    import os, sys
    import numpy as np, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from mixtrain import (Augment, EpochBatches, MixOptions, MixTrain, Normalizer, adapt, create_model,
                          load_data, separated_loss)
    from mixtrain.distributed import plan_digest, state_digest

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    data = load_data("digits").to(device)
    torch.manual_seed(0)
    model = adapt(create_model("digitnet", data.num_classes, data.channels, 16), data.image_size, data.channels)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epochs, batch_size, seed = 2, 96, 0
    strategy = MixTrain(data.num_train, model.grid, epochs, device, MixOptions(first_unmixed_epochs=1, final_unmixed_epochs=0, rule="all"))
    normalize, augment = Normalizer(data.mean, data.std, device), Augment(pad=2, flip=False)
    for epoch in range(epochs):
        plan = strategy.plan_epoch(epoch, np.random.default_rng([seed, epoch]))
        batches = EpochBatches(plan, batch_size, model.grid, device,
                               generator=torch.Generator().manual_seed(1000 * epoch + rank),
                               rank=rank, world=world, pad_rng=np.random.default_rng([seed, epoch, 1]),
                               image_size=data.image_size, augment=augment)
        trained = []
        for j, batch in enumerate(batches):
            x = batch.compose(data.train_x, normalize)
            targets = batch.targets(data.train_y)
            logits = ddp(x, batch.pool_masks())
            loss, _ = separated_loss(logits, targets, batch.valid)
            opt.zero_grad(set_to_none=True)
            (loss * batches.loss_scale(j)).backward()
            opt.step()
            strategy.record(batch, logits, targets)
            trained.append(batch.index[batch.valid])
        strategy.end_epoch(distributed=True)
        shard = batches.plan
        np.savez(os.path.join(out, f"rank{rank}_epoch{epoch}.npz"), ids=torch.cat(trained).numpy(),
                 plan_ids=plan.index[plan.valid], plan_sha=np.array(plan_digest(plan)),
                 strategy_sha=np.array(state_digest(strategy.state_dict())),
                 batch_shape=np.array(batches.index.shape), passes=np.array(plan.passes))
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    np.save(os.path.join(out, f"rank{rank}_weights.npy"), w.numpy())
    dist.destroy_process_group()
    """
)


def test_torchrun_two_processes_train_from_one_folder_cache(tmp_path):
    """Under torchrun the node's first process builds the folder cache, the other waits and reads
    it; streamed from host memory, each rank trains exactly its share of the plan."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "f"
    for split, per in (("train", 12), ("val", 3)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per):
                a = rng.integers(0, 90, (20, 24, 3), dtype=np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(root / split / f"c{c}" / f"{i}.png")
    out, rec = tmp_path / "run", tmp_path / "rec"
    r = torchrun(["-m", "mixtrain", "train", "--data", f"folder:{root}", "--image-size", "16", "--model", "digitnet",
                  "--placement", "host", "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--method",
                  "mixtrain", "--epochs", "2", "--batch-size", "6", "--lr", "0.05", "--device", "cpu", "--out", str(out),
                  "--first-unmixed-epochs", "1", "--final-unmixed-epochs", "0", "--mix-rule", "all", "--progress", "none"],
                 tmp_path, record_dir=rec)
    assert r.stderr.count("preparing the folder cache") == 1  # built once, by the first process
    check_epoch_records(load_records(rec, 2), 2, 36)
    m = json.loads((out / "metrics.json").read_text())
    assert [e["samples"] for e in m["epochs_log"]] == [36, 36] and m["epochs_log"][1]["passes"] < 36
    assert m["test_samples"] == 9


def test_own_loop_under_ddp_with_the_public_api(tmp_path):
    """The documented recipe: same plans and merged memories on both ranks, each sample once per
    epoch, pool masks through the DDP wrapper, identical weights on both ranks at the end."""
    rec, recs = torchrun_script(OWN_LOOP, tmp_path)
    n = mixtrain.load_data("digits").num_train
    check_epoch_records(recs, 2, n)
    assert int(recs[0, 0]["passes"]) == n and int(recs[0, 1]["passes"]) == (n + 1) // 2  # epoch 2: all in pairs
    w0, w1 = (np.load(rec / f"rank{r}_weights.npy") for r in range(2))
    assert np.array_equal(w0, w1)


def test_ddp_options_for_a_captured_step_are_what_ddp_takes(tmp_path):
    """A step captured under DDP needs gradients as views of fixed buckets and a static graph; the
    wrapper passes them (and the bucket size) and this PyTorch's DDP accepts and trains with them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mixtrain.distributed import ddp_options

    assert ddp_options(False, 10) == {"find_unused_parameters": False, "bucket_cap_mb": 10.0}
    assert ddp_options(True, 5) == {"find_unused_parameters": False, "bucket_cap_mb": 5.0,
                                    "gradient_as_bucket_view": True, "static_graph": True}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        info = DistInfo(rank=0, world=2, device=torch.device("cpu"))  # world > 1: the wrapper wraps
        net = info.wrap(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), graphed=True, bucket_mb=1)
        assert isinstance(net, DDP) and net.gradient_as_bucket_view and net.static_graph
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):  # DDP's static graph settles over its first iterations
            opt.zero_grad(set_to_none=True)
            net(torch.randn(5, 3)).square().sum().backward()
            opt.step()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    finally:
        dist.destroy_process_group()


def _digits_trainer_and_first_batch(out):
    """A CPU trainer on digits (batch 16) and the first batch of its first epoch's plan."""
    from mixtrain import EpochBatches, Trainer, TrainConfig

    cfg = TrainConfig(data="digits", model="digitnet", device="cpu", batch_size=16, lr=0.1, progress="none",
                      save_checkpoints=False, out=str(out))
    tr = Trainer(cfg)
    batch = EpochBatches(tr.strategy.plan_epoch(0, np.random.default_rng(0)), 16, tr.grid, tr.device,
                         torch.Generator().manual_seed(0), image_size=tr.image_hw, augment=tr.augment).batch(0)
    return tr, batch


def test_a_device_scalar_loss_weight_steps_exactly_as_its_float(tmp_path):
    """Under a captured DDP step each rank's loss weight is a device scalar set before the replay:
    a step with it must equal the step with the same weight as a float (and no host comparison)."""
    def params_after_one_step(scale):
        torch.manual_seed(0)
        tr, batch = _digits_trainer_and_first_batch(tmp_path / "run")
        tr.step(batch, batch.compose(tr.data.train_x, tr.normalize), scale)
        return [p.detach().clone() for p in tr.model.parameters()]

    as_float, as_tensor, unweighted = params_after_one_step(0.5), params_after_one_step(torch.tensor(0.5)), \
        params_after_one_step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(as_float, as_tensor))
    assert not all(torch.equal(a, b) for a, b in zip(as_float, unweighted))


def test_a_ddp_capture_runs_on_ddps_stream_and_fails_loudly(tmp_path, monkeypatch):
    """Under DDP the eager steps and the capture run on the stream DDP was built on (its gradient
    accumulators belong to it), and a failed capture is an error, not one rank falling back alone."""
    from contextlib import nullcontext

    from mixtrain import MixtrainError
    from mixtrain.graphs import GraphedStep

    class Stream:
        def wait_stream(self, other):
            pass

    used = {}
    ddp_stream = Stream()

    def graph(g, stream=None):
        used["capture"] = stream
        raise RuntimeError("operation not permitted when stream is capturing")

    def stream_context(s):
        used.setdefault("eager", s)
        return nullcontext()

    for name, value in (("Stream", lambda *a: Stream()), ("current_stream", lambda *a: Stream()),
                        ("stream", stream_context), ("synchronize", lambda *a: None), ("CUDAGraph", lambda: None),
                        ("graph", graph)):
        monkeypatch.setattr(torch.cuda, name, value)
    tr, batch = _digits_trainer_and_first_batch(tmp_path / "run")
    g = GraphedStep(lambda b: tr.step(b, b.compose(tr.data.train_x, tr.normalize)), tr.optimizer, tr.model,
                    tr.strategy.step_state(), eager_steps=1, fallback=False, stream=ddp_stream)
    with pytest.raises(MixtrainError, match="failed under DDP.*--cuda-graph off"):
        g.capture(batch, 0.05)
    assert used["eager"] is ddp_stream and used["capture"] is ddp_stream
