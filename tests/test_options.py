"""Every option declared once (mixtrain.options): the docs table, the errors that name fields in the
library and flags on the command line, and what ``bench`` takes."""

from __future__ import annotations

import json
import pickle
from dataclasses import fields
from pathlib import Path

import pytest

from mixtrain import MixOptions, OptionError, TrainConfig
from mixtrain.cli import build_parser, main
from mixtrain.options import (NOT_BENCH_SETUP, OPTIONS, REGENERATE_DOCS, RESUMABLE_CHANGES, config_from_args, flag_for,
                              options_markdown, upgrade_config)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def test_docs_options_md_is_generated_from_the_declarations():
    assert DOCS.read_text() == options_markdown(), f"docs/options.md is out of date; regenerate it: {REGENERATE_DOCS}"
    text = DOCS.read_text()
    for o in OPTIONS.values():
        assert f"| `{o.name}` | `{o.flag}" in text, o.name


def test_every_field_is_declared_with_its_own_flag():
    paths = [f.name for f in fields(TrainConfig) if f.name != "mix"] + [f"mix.{f.name}" for f in fields(MixOptions)]
    assert list(OPTIONS) == paths
    flags = [o.flag for o in OPTIONS.values()]
    assert len(set(flags)) == len(flags)
    assert (flag_for("mix.rule"), flag_for("rule"), flag_for("batch_size"), flag_for("no_such")) == (
        "--mix-rule", "--mix-rule", "--batch-size", "no_such")
    # what a resumed run may change is where and how it runs; what it computes is not among them
    assert {"device", "out", "csv", "checkpoint_every", "precision"} <= RESUMABLE_CHANGES
    assert not {"data", "model", "method", "epochs", "seed", "lr", "batch_size", "image_size"} & RESUMABLE_CHANGES
    assert not any(name.startswith("mix.") for name in RESUMABLE_CHANGES)
    # a bench's setup leaves out what varies by run or changes neither results nor speed, never the speed options
    assert {"method", "epochs", "seed", "out", "progress"} <= NOT_BENCH_SETUP
    assert not {"precision", "compile", "cuda_graph", "deterministic", "lr", "data"} & NOT_BENCH_SETUP


@pytest.mark.parametrize("cfg,library,cli", [
    (TrainConfig(batch_size=0), "batch_size must be at least 1, got 0", "--batch-size must be at least 1, got 0"),
    (TrainConfig(precision="fp8"), "precision must be auto, bf16 or fp32, got 'fp8'",
     "--precision must be auto, bf16 or fp32, got 'fp8'"),
    (TrainConfig(momentum=0.0), "nesterov on needs momentum > 0; give nesterov off for plain SGD without momentum",
     "--nesterov on needs --momentum > 0; give --nesterov off for plain SGD without momentum"),
    (TrainConfig(image_size=32), "image_size applies only to folder:DIR data (it sets their training resolution); "
     "'digits' keeps its own image size, so leave image_size at 0", "--image-size applies only to folder:DIR data"),
    (TrainConfig(mix=MixOptions(rule="most")), "mix.rule must be auto, threshold, fraction or all, got 'most'",
     "--mix-rule must be auto, threshold, fraction or all, got 'most'"),
    (TrainConfig(mix=MixOptions(threshold=float("inf"))),
     "mix.threshold is a loss and must be a finite number >= 0, got inf",
     "--mix-threshold is a loss and must be a finite number >= 0, got inf"),
])
def test_library_errors_name_fields_and_the_command_line_names_flags(cfg, library, cli):
    with pytest.raises(OptionError) as e:
        cfg.check()
    assert str(e.value) == library
    assert e.value.render(flag_for).startswith(cli)
    assert "--" not in str(e.value)
    again = pickle.loads(pickle.dumps(e.value))  # e.g. from a worker process: still renders either way
    assert (str(again), again.render(flag_for)) == (str(e.value), e.value.render(flag_for))


def test_mix_options_alone_name_their_own_fields():
    with pytest.raises(OptionError, match=r"^min_share must be in \(0, 0.5\], got 0.7$") as e:
        MixOptions(min_share=0.7).check()
    assert e.value.options == ["min_share"] and e.value.within("mix").options == ["mix.min_share"]
    assert e.value.render(flag_for) == "--min-share must be in (0, 0.5], got 0.7"


def test_an_option_error_keeps_its_values_literal():
    e = OptionError("{data} {got!r} has {{braces}}", got="{x}")
    assert str(e) == "data '{x}' has {braces}" and e.options == ["data"]
    assert e.render(flag_for) == "--data '{x}' has {braces}"


def test_the_device_error_names_the_option(monkeypatch):
    from mixtrain.distributed import resolve_device

    with pytest.raises(OptionError, match=r"^device must be auto, cpu, cuda or cuda:N \(N = 0, 1, ...\), got 'gpu0'$"):
        resolve_device("gpu0")


def test_bench_takes_the_shared_options_and_not_those_it_runs_as_lists(tmp_path, capsys):
    parser = build_parser()
    argv = ["bench"]
    shared = {name: o for name, o in OPTIONS.items() if o.bench}
    for o in shared.values():  # each a value other than its default
        if o.switch:
            argv.append(o.flag)
        elif isinstance(o.default, bool):
            argv += [o.flag, "off" if o.default else "on"]
        elif o.choices:
            argv += [o.flag, next(c for c in o.choices if c != o.default)]
        else:
            argv += [o.flag, str(o.default + 1) if isinstance(o.default, (int, float)) else "x"]
    args, unknown = parser.parse_known_args(argv)
    assert not unknown
    cfg, default = config_from_args(args).to_dict(), TrainConfig().to_dict()
    for name in shared:
        section, _, key = name.rpartition(".")
        got, was = (cfg[section][key], default[section][key]) if section else (cfg[key], default[key])
        assert got != was, name
    for name, o in OPTIONS.items():
        if not o.bench:
            assert not hasattr(args, o.dest), name  # bench's --epochs, --out, --resume are its own
    assert {o.bench_list for o in OPTIONS.values() if o.bench_list} == {"--methods", "--epochs", "--seeds"}
    assert main(["bench", "--methods", "baseline", "--batch-size", "0", "--out", str(tmp_path)]) == 2
    assert "error: --batch-size must be at least 1, got 0" in capsys.readouterr().err


def test_cli_and_bench_import_one_way():
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "mixtrain"

    def imports(name):
        tree = ast.parse((src / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert "cli" not in imports("bench") and "cli" not in imports("show") and "cli" not in imports("options")
    assert "bench" in imports("cli") and "options" in imports("bench")


def test_renamed_options_read_from_old_configs_checkpoints_and_bench_specs(tmp_path):
    """`warmup` (the LR ramp) and `mix.warmup_epochs` were renamed: files written before still read."""
    from mixtrain.bench import split_method
    from mixtrain.cli import read_config

    old = {"warmup": 0.3, "lr": 0.1, "mix": {"warmup_epochs": 2, "rule": "all"}}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.lr_warmup, cfg.lr, cfg.mix.first_unmixed_epochs, cfg.mix.rule) == (0.3, 0.1, 2, "all")
    assert old == {"warmup": 0.3, "lr": 0.1, "mix": {"warmup_epochs": 2, "rule": "all"}}  # not changed in place
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert read_config(str(path)) == {"lr_warmup": 0.3, "lr": 0.1, "mix": {"first_unmixed_epochs": 2, "rule": "all"}}
    assert split_method("mixtrain(warmup_epochs=2)") == ("mixtrain", {"first_unmixed_epochs": 2})
    # a config holding both names keeps the new one
    assert TrainConfig.from_dict({"warmup": 0.3, "lr_warmup": 0.05}).lr_warmup == 0.05


def test_step_scale_and_loss_per_passes_are_one_correction_taken_once():
    with pytest.raises(OptionError, match="take one of them"):
        MixOptions(step_scale="linear", loss_per="passes").check()
    MixOptions(step_scale="sqrt").check()
    MixOptions(loss_per="passes").check()  # the default auto steps aside for it


def test_step_scale_auto_is_linear_for_sgd_only():
    assert MixOptions().step_scale == "auto"
    assert MixOptions().resolved_step_scale("sgd") == "linear"
    assert MixOptions().resolved_step_scale("adamw") == "none"
    assert MixOptions(loss_per="passes").resolved_step_scale("sgd") == "none"
    for asked in ("none", "sqrt", "linear"):
        assert MixOptions(step_scale=asked).resolved_step_scale("adamw") == asked


def test_a_saved_config_without_step_scale_reads_as_none_a_users_file_as_the_default(tmp_path):
    from mixtrain.cli import read_config

    saved = TrainConfig().to_dict()
    del saved["mix"]["step_scale"]
    assert TrainConfig.from_dict(upgrade_config(saved, saved=True)).mix.step_scale == "none"
    assert TrainConfig.from_dict(saved).mix.step_scale == "auto"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lr": 0.1, "mix": {"rule": "all"}}))
    assert read_config(str(path), saved=True)["mix"] == {"rule": "all", "step_scale": "none"}
    assert read_config(str(path))["mix"] == {"rule": "all"}
    # --config given a run's own config.json (it holds what only mixtrain writes): as saved
    path.write_text(json.dumps({"lr": 0.1, "resolved_model": "resnet18", "mix": {"rule": "all"}}))
    assert read_config(str(path))["mix"] == {"rule": "all", "step_scale": "none"}


def test_a_run_records_and_compares_step_scale_as_what_it_resolves_to():
    from mixtrain.options import config_differences

    assert TrainConfig().to_record()["mix"]["step_scale"] == "linear"
    assert TrainConfig(optimizer="adamw").to_record()["mix"]["step_scale"] == "none"
    assert TrainConfig().to_dict()["mix"]["step_scale"] == "auto"  # the options themselves keep auto
    linear, none = TrainConfig(mix=MixOptions(step_scale="linear")), TrainConfig(mix=MixOptions(step_scale="none"))
    assert config_differences(linear, TrainConfig()) == []  # what ran is what auto gives
    assert config_differences(TrainConfig(optimizer="adamw", mix=MixOptions(step_scale="none")),
                              TrainConfig(optimizer="adamw")) == []
    assert config_differences(none, TrainConfig()) == ["mix.step_scale: 'none' -> 'linear'"]


def test_train_takes_mixing_options_as_a_dict_and_leaves_the_config_alone(tmp_path):
    from mixtrain import MixtrainError, TrainConfig, train

    cfg = TrainConfig(epochs=1, batch_size=256, device="cpu", progress="none", save_checkpoints=False,
                      out=str(tmp_path / "o"))
    m = train(cfg, method="mixtrain", mix={"quad_confidence": 0.9, "confidence": 0.4})
    assert m["method"] == "mixtrain"
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["mix"]["quad_confidence"] == 0.9 and saved["mix"]["confidence"] == 0.4
    assert cfg.method == TrainConfig().method and cfg.mix.quad_confidence == TrainConfig().mix.quad_confidence
    with pytest.raises(MixtrainError, match="unknown mixing option.*'quad'"):
        train(cfg, mix={"quad": 0.9})
