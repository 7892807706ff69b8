"""mixtrain.integrations.lightning.MixTrainCallback with a tiny LightningModule on the CPU:
plans and mixes, records the loss, checkpoints and resumes exactly, and refuses misuse."""

from __future__ import annotations

import glob
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

pl = pytest.importorskip("pytorch_lightning")

import mixtrain as mt  # noqa: E402
from mixtrain.integrations.lightning import MixTrainCallback  # noqa: E402

N = 256


class Digits(Dataset):
    """The first N digits as normalised floats: a map-style (image, label) dataset."""

    def __init__(self):
        data = mt.load_data("digits")
        self.x = (data.train_x[:N].float() / 255 - data.mean[0]) / data.std[0]
        self.y = data.train_y[:N]

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Net(pl.LightningModule):
    def __init__(self, mix, compose=True):
        super().__init__()
        torch.manual_seed(0)
        self.model = mt.adapt(mt.create_model("digitnet", 10, 1, 16), 16, 1)
        self.mix, self.compose = mix, compose

    def training_step(self, batch, batch_idx):
        if not self.compose:  # the mistake the callback must catch
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.model(images), labels)
        step = self.mix.compose(batch)
        return self.mix.loss(self.model(step.images, step.masks), step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StopAfter(pl.Callback):
    """Ends the fit after ``epochs`` epochs, as if the job had been stopped there."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def fit(folder, *callbacks, ckpt=None, module=None, loader=None):
    mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1))
    trainer = pl.Trainer(max_epochs=4, callbacks=[mix, *callbacks], default_root_dir=str(folder), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
    net = module(mix) if module else Net(mix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        trainer.fit(net, loader or DataLoader(Digits(), batch_size=32, shuffle=True), ckpt_path=ckpt)
    return net, mix


def weights(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 4-epoch fit that also checkpoints mid-epoch 2 (global step 10: 8 unmixed
    steps, then 2 of the 4 steps of the mixed epoch)."""
    folder = tmp_path_factory.mktemp("whole")
    every = pl.callbacks.ModelCheckpoint(dirpath=str(folder), every_n_train_steps=10, save_top_k=-1)
    net, mix = fit(folder, every)
    return folder, net, mix


def test_the_callback_plans_mixes_and_records(whole):
    _, net, mix = whole
    h = mix.history
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert h[0]["passes"] == N and h[0]["mixed_fraction"] == 0  # warm-up: unmixed, 8 steps of 32
    assert h[1]["passes"] < N and h[1]["mixed_fraction"] == 1.0 and h[1]["steps"] < h[0]["steps"]
    assert h[3]["passes"] == N  # the final epoch unmixed
    assert all(r["samples"] == N for r in h)
    loss, _ = mix.mixer.strategy.memory.snapshot()
    assert (loss == loss).all()  # every sample's loss recorded


@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_a_resumed_fit_continues_exactly(where, whole, tmp_path):
    folder, net, mix = whole
    if where == "epoch end":
        last = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "a"), save_last=True)
        fit(tmp_path / "a", last, StopAfter(2))
        ckpt = str(tmp_path / "a" / "last.ckpt")
    else:  # saved after step 2 of the mixed epoch 2 (of 4): its plan and position are in the checkpoint
        ckpt = glob.glob(str(folder / "*step=10*.ckpt"))[0]
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]["MixTrainCallback"]
        assert state["mixer"]["epoch"] == 1 and state["mixer"]["step"] == 2 and state["mixer"]["plan"] is not None
    resumed, rmix = fit(tmp_path / "b", ckpt=ckpt)
    assert rmix.history == mix.history
    assert torch.equal(weights(resumed), weights(net))


def test_a_training_step_that_does_not_compose_is_refused(tmp_path):
    with pytest.raises(mt.MixtrainError, match="training_step did not call compose on its batch"):
        fit(tmp_path, module=lambda mix: Net(mix, compose=False))


def test_a_module_without_an_adapted_model_is_refused(tmp_path):
    class Plain(Net):
        def __init__(self, mix):
            super().__init__(mix)
            self.model = self.model.model  # the bare digitnet

    with pytest.raises(mt.MixtrainError, match="holds no adapted model: wrap yours with mixtrain.adapt"):
        fit(tmp_path, module=Plain)


def test_compose_outside_a_fit_is_refused():
    with pytest.raises(mt.MixtrainError, match="outside a fit"):
        MixTrainCallback().compose((torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long)))


def test_the_callback_told_not_to_scale_the_lr_says_it_leaves_step_scale_to_the_module():
    from types import SimpleNamespace

    trainer = SimpleNamespace(max_epochs=4, global_rank=0, world_size=1)
    loader = DataLoader(Digits(), batch_size=32)
    scaled = MixTrainCallback(opts=mt.MixOptions(step_scale="linear"), scale_lr=False)
    with pytest.warns(mt.MixtrainWarning, match="multiply its LR by step.lr_factor"):
        mixer = scaled._make_mixer(loader, trainer, Net(scaled))
    assert mixer.step_scale == "linear"
    for plain in (MixTrainCallback(), MixTrainCallback(opts=mt.MixOptions())):
        with warnings.catch_warnings():
            warnings.simplefilter("error", mt.MixtrainWarning)
            # the default (auto) was not asked for: no warning; this trainer has no optimizer to resolve it for
            assert plain._make_mixer(loader, trainer, Net(plain)).step_scale == "none"


class AdamNet(Net):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_the_callback_tells_the_mixer_its_optimizer(tmp_path):
    # step_scale auto: step.lr_factor is the linear rule for SGD, 1 for AdamW
    _, sgd = fit(tmp_path / "sgd")
    _, adam = fit(tmp_path / "adam", module=AdamNet)
    assert (sgd.mixer.step_scale, adam.mixer.step_scale) == ("linear", "none")


class RecordingSGD(torch.optim.SGD):
    """SGD that notes the learning rate each step is taken with."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.lrs = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning's closure: training_step and backward
        self.lrs.append(self.param_groups[0]["lr"])
        super().step()
        return loss


class FactorNet(Net):
    """Notes each step's lr_factor; its optimizer notes each step's learning rate."""

    def __init__(self, mix):
        super().__init__(mix)
        self.factors = []

    def training_step(self, batch, batch_idx):
        step = self.mix.compose(batch)
        self.factors.append(step.lr_factor)
        return self.mix.loss(self.model(step.images, step.masks), step)

    def configure_optimizers(self):
        self.opt = RecordingSGD(self.parameters(), lr=0.05, momentum=0.9)
        return self.opt


def test_the_callback_scales_each_optimizer_steps_lr_and_restores_it(tmp_path):
    net, mix = fit(tmp_path / "scaled", module=FactorNet)
    factors, lrs = np.array(net.factors), np.array(net.opt.lrs)
    assert factors.max() > 1.5 and len(lrs) == len(factors)  # mixed steps carry more samples than passes
    np.testing.assert_allclose(lrs, 0.05 * factors, rtol=1e-12)
    assert net.opt.param_groups[0]["lr"] == 0.05  # restored after every step: the schedule never sees it
    assert not net.opt._optimizer_step_post_hooks  # and the hook leaves with the fit
    plain_mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1), scale_lr=False)
    trainer = pl.Trainer(max_epochs=4, callbacks=[plain_mix], default_root_dir=str(tmp_path / "plain"), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         enable_checkpointing=False)
    plain = FactorNet(plain_mix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(plain, DataLoader(Digits(), batch_size=32))
    assert max(plain.factors) > 1.5 and set(plain.opt.lrs) == {0.05}  # scale_lr=False: the LR is left alone


def test_accumulated_batches_share_one_step_at_their_mean_factor(tmp_path):
    mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1))
    trainer = pl.Trainer(max_epochs=4, callbacks=[mix], default_root_dir=str(tmp_path), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         enable_checkpointing=False, accumulate_grad_batches=2)
    net = FactorNet(mix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, DataLoader(Digits(), batch_size=32))
    # each epoch's steps, in pairs of batches (Lightning steps on an epoch's odd last batch too)
    expected, i = [], 0
    for row in mix.history:
        steps = net.factors[i: i + row["steps"]]
        expected += [0.05 * np.mean(steps[j: j + 2]) for j in range(0, len(steps), 2)]
        i += row["steps"]
    assert max(net.factors) > 1.5
    np.testing.assert_allclose(net.opt.lrs, expected, rtol=1e-12)
    assert net.opt.param_groups[0]["lr"] == 0.05


class ScheduledNet(FactorNet):
    """FactorNet with a per-step exponential schedule; ``boom_at``: the global step that raises."""

    def __init__(self, mix, boom_at=None):
        super().__init__(mix)
        self.boom_at = boom_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.boom_at:
            raise RuntimeError("boom")
        return loss

    def configure_optimizers(self):
        self.opt = RecordingSGD(self.parameters(), lr=0.05, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.9)
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


def _fit_quietly(trainer, net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, DataLoader(Digits(), batch_size=32))


def _trainer(mix, folder, **kw):
    return pl.Trainer(max_epochs=4, callbacks=[mix], default_root_dir=str(folder), logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      enable_checkpointing=False, **kw)


def test_a_step_the_amp_scaler_skips_leaves_the_schedule_exact(tmp_path):
    from pytorch_lightning.plugins.precision import Precision

    class SkipsOneMixedStep(Precision):
        """What the fp16 scaler does on an infinite gradient, without fp16's slow CPU kernels: the
        closure (training_step, backward) runs, the optimizer does not step."""

        def __init__(self, net):
            super().__init__()
            self.net, self.skipped = net, False

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            if not self.skipped and self.net.global_step >= 8:  # the mixed epoch
                closure()
                self.skipped = True
                return None
            return super().optimizer_step(optimizer, model, closure, **kwargs)

    mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1))
    net = ScheduledNet(mix)
    precision = SkipsOneMixedStep(net)
    _fit_quietly(_trainer(mix, tmp_path, plugins=[precision]), net)
    assert precision.skipped and len(net.opt.lrs) == len(net.factors) - 1 and max(net.factors) > 1.5
    # the scheduler stepped on the restored rate every time: no scaled value leaked into it
    assert net.opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9 ** net.sched.last_epoch, rel=1e-12)
    np.testing.assert_allclose(net.opt.lrs[:8], 0.05 * 0.9 ** np.arange(8), rtol=1e-12)  # unmixed: factor 1


def test_a_fit_ended_by_an_error_leaves_the_rate_as_found_and_the_callback_reusable(tmp_path):
    mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1))
    broken = ScheduledNet(mix, boom_at=10)
    with pytest.raises(RuntimeError, match="boom"):
        _fit_quietly(_trainer(mix, tmp_path / "a"), broken)
    assert broken.factors[-1] > 1 and broken.opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**10, rel=1e-12)
    assert not broken.opt._optimizer_step_post_hooks
    retry = FactorNet(MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1)))
    retry.mix = mix  # the same callback, a new optimizer
    mix.mixer = None  # a fresh plan, as for a new fit from scratch
    _fit_quietly(_trainer(mix, tmp_path / "b"), retry)
    np.testing.assert_allclose(retry.opt.lrs, 0.05 * np.array(retry.factors), rtol=1e-12)


def test_a_module_that_also_scales_is_told(tmp_path):
    class AlsoScales(FactorNet):  # what the README advised before the callback scaled by itself
        def on_before_optimizer_step(self, optimizer):
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.factors[-1]

    mix = MixTrainCallback(opts=mt.MixOptions(rule="all", final_unmixed_epochs=1))
    with pytest.warns(mt.MixtrainWarning, match="also multiplies by step.lr_factor"):
        _trainer(mix, tmp_path).fit(AlsoScales(mix), DataLoader(Digits(), batch_size=32))
