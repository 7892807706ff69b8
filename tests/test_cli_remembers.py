"""A CLI that remembers: --resume from OUT/config.json alone, --out that holds a run, --config,
--version, ``mixtrain models``, and the notices (a run that never mixes, clamped workers)."""

from __future__ import annotations

import builtins
import json
import os
import warnings

import pytest

from mixtrain import MixtrainWarning, Trainer
from mixtrain.cli import main
from mixtrain.folder_cache import _cpu_count, decoding_workers
from mixtrain.models import MODELS
from test_errors import assert_clean_error, write_npz

# a small run's options: every one of them is remembered by OUT/config.json
RUN = ["--method", "mixtrain", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--seed", "2",
       "--mix-rule", "fraction", "--device", "cpu", "--progress", "none", "--deterministic"]


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out


def test_resume_with_only_out_continues_the_run_with_its_own_options(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    def stop(self, where):  # the job is killed right after epoch 1's checkpoint
        if where == "end of epoch 1":
            self.checkpoints.wait()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "on_checkpoint", stop)
    assert main(["train", *RUN, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    assert main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    got, ref = metrics(out), metrics(whole)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in got["epochs_log"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in ref["epochs_log"]]
    assert got["test_accuracy"] == ref["test_accuracy"] and got["passes"] < got["samples"]
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["batch_size"], config["seed"], config["mix"]["rule"], config["resume"]) == (
        0.05, 64, 2, "fraction", True)
    # the default step_scale (auto) is recorded as what ran with SGD
    assert config["mix"]["step_scale"] == got["options"]["step_scale"] == "linear"
    # wall time counts both processes of the run
    assert got["wall_seconds"] >= got["train_seconds"] + got["eval_seconds"]


def test_resume_accepts_the_same_options_and_those_that_may_change(whole, capsys):
    assert main(["train", "--out", str(whole), "--resume", "--lr", "0.05", "--epochs", "3", "--csv",
                 "--eval-batch-size", "100"]) == 0, capsys.readouterr().err
    m = metrics(whole)
    assert m["wall_seconds"] >= m["train_seconds"]  # a finished run re-evaluated: its earlier time counts


def test_resume_with_other_options_is_refused_naming_each(whole, capsys):
    code = main(["train", "--out", str(whole), "--resume", "--lr", "0.3", "--seed", "5", "--mix-rule", "auto"])
    assert_clean_error(code, capsys.readouterr().err, f"cannot resume {whole}", "other options than the run's config.json",
                       "lr: 0.05 -> 0.3", "seed: 2 -> 5", "mix.rule: 'fraction' -> 'auto'", "--checkpoint-every")


def test_resume_with_an_unreadable_config_json_or_with_overwrite_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"lr": 0.1')
    code = main(["train", "--out", str(tmp_path), "--resume"])
    assert_clean_error(code, capsys.readouterr().err, f"--resume: the run's {tmp_path / 'config.json'}: not valid JSON")
    code = main(["train", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert_clean_error(code, capsys.readouterr().err, "--resume continues the run in --out and --overwrite replaces it")


def test_an_out_that_holds_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    npz = write_npz(tmp_path / "d")
    out = tmp_path / "o"
    base = ["train", "--data", f"npz:{npz}", "--model", "digitnet", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--progress", "none", "--out", str(out)]
    assert main([*base, "--csv"]) == 0
    assert (out / "log.csv").exists()
    before = (out / "metrics.json").read_text()
    code = main([*base, "--lr", "0.1"])
    assert_clean_error(code, capsys.readouterr().err, f"--out {out} holds a run (config.json, checkpoint.pt, metrics.json)",
                       "--resume", "--overwrite")
    assert (out / "metrics.json").read_text() == before  # untouched
    assert main([*base, "--lr", "0.1", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1
    assert not (out / "log.csv").exists()  # nothing of the old run outlives it


def test_config_file_json_or_yaml_with_flags_over_it(whole, tmp_path, capsys):
    out = tmp_path / "from-json"
    assert main(["train", "--config", str(whole / "config.json"), "--out", str(out), "--epochs", "1"]) == 0
    c = json.loads((out / "config.json").read_text())
    assert (c["lr"], c["seed"], c["batch_size"], c["mix"]["rule"], c["epochs"], c["resume"]) == (
        0.05, 2, 64, "fraction", 1, False)  # the file's options, the flag over them, resume never from a file
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("method: mixtrain\nepochs: 1\nbatch_size: 32\nlr: 0.02\nprogress: none\n"
                                     "device: cpu\nmix:\n  rule: all\n  quad_confidence: 0.0\n")
    out = tmp_path / "from-yaml"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--lr", "0.03"]) == 0
    c = json.loads((out / "config.json").read_text())
    assert (c["batch_size"], c["lr"], c["mix"]["rule"], c["mix"]["quad_confidence"], c["mix"]["confidence"]) == (
        32, 0.03, "all", 0.0, 0.5)


@pytest.mark.parametrize("name,text,needle", [
    ("missing.json", None, "no such file"),
    ("bad.json", '{"lr": 0.1,}', "not valid JSON (line 1, column 12"),
    ("bad.yaml", "lr: [1\n", "not valid YAML"),
    ("list.json", "[1, 2]", "must hold a mapping of option names to values, not list"),
    ("typo.json", '{"epoch": 3, "mix": {"rul": "all"}}', "unknown option(s) epoch, mix.rul"),
    ("type.json", '{"lr": "fast"}', "lr should be float (like its default 0.2), got 'fast'"),
    ("bool.json", '{"epochs": true}', "epochs should be int (like its default 30), got True"),
])
def test_bad_config_files_give_one_error_line(name, text, needle, tmp_path, capsys):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "o")])
    assert_clean_error(code, capsys.readouterr().err, f"--config {path}: {needle}")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from mixtrain import __version__

    assert capsys.readouterr().out.startswith(f"mixtrain {__version__} (torch ")


def test_models_lists_every_built_in_model_with_its_grid(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.split()[0] in MODELS}
    assert set(rows) == set(MODELS)
    assert " 4x4 " in rows["resnet18"] and " 32x32 " in rows["resnet18"]
    assert " 7x7 " in rows["resnet18_224"] and " 14x14 " in rows["vit_tiny_224"]
    assert "16x16x1" in rows["digitnet"] and "pairs, quads" in rows["digitnet"]
    assert main(["models", "--image-size", "64", "resnet18_224", "vit_tiny"]) == 0
    out = capsys.readouterr().out
    assert " 2x2 " in out.splitlines()[1] and " 16x16 " in out.splitlines()[2]
    assert main(["models", "--image-size", "30", "vit_tiny"]) == 0  # cannot at this size: said in its row
    assert "cannot: VisionTransformer: its 49 output tokens do not lie on a known patch grid" in capsys.readouterr().out


def test_models_errors(capsys):
    assert_clean_error(main(["models", "resnet19"]), capsys.readouterr().err, "unknown model 'resnet19'")
    assert_clean_error(main(["models", "--image-size", "-1"]), capsys.readouterr().err,
                       "--image-size must be >= 0 and --channels >= 1")


def test_a_run_that_will_never_mix_says_so(tmp_path, capsys):
    npz = write_npz(tmp_path / "d")
    code = main(["train", "--data", f"npz:{npz}", "--model", "digitnet", "--method", "mixtrain", "--epochs", "2",
                 "--batch-size", "8", "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: mixtrain will never mix in this run: of its 2 epoch(s), the first 1 and the last 1 are " \
           "unmixed" in err and "train at least 3 epochs" in err


def test_workers_beyond_the_cores_are_clamped_saying_so_once():
    cores = _cpu_count()
    assert decoding_workers(0) == cores and decoding_workers(1) == 1
    with pytest.warns(MixtrainWarning, match=rf"--workers {cores + 7}: .* {cores} CPU core\(s\); decoding with {cores} process"):
        assert decoding_workers(cores + 7) == cores
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixtrainWarning)
        assert decoding_workers(cores + 7) == cores  # said once


def test_resuming_a_finished_run_in_a_read_only_folder_is_one_error_line(whole, monkeypatch, capsys):
    real_open = builtins.open

    def read_only(path, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and os.path.abspath(str(path)).startswith(str(whole)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", read_only)
    code = main(["train", "--out", str(whole), "--resume"])
    assert_clean_error(code, capsys.readouterr().err, f"cannot write to the output folder {whole}: Permission denied")


def test_a_run_from_before_step_scale_resumes_as_it_trained(tmp_path, monkeypatch, capsys):
    """--step-scale's default became auto (linear for SGD); a run whose config.json and checkpoint
    predate the option trained with none, and resumes with none, neither refused nor switched."""
    from mixtrain import checkpoint as ckpt

    out = tmp_path / "old"

    def stop(self, where):
        if where == "end of epoch 1":
            self.checkpoints.wait()
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "on_checkpoint", stop)
    assert main(["train", *RUN, "--step-scale", "none", "--out", str(out)]) == 130
    monkeypatch.undo()
    config = json.loads((out / "config.json").read_text())
    del config["mix"]["step_scale"]
    (out / "config.json").write_text(json.dumps(config))
    state = ckpt.load(str(out / "checkpoint.pt"))
    del state["config"]["mix"]["step_scale"]
    ckpt.save_atomic(state, str(out / "checkpoint.pt"))
    assert main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["mix"]["step_scale"] == "none"
    assert metrics(out)["passes"] < metrics(out)["samples"]
