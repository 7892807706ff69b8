"""mixtrain bench / report: the pure aggregation and interpolation, and a tiny CPU bench end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mixtrain import bench
from mixtrain.cli import main
from mixtrain.errors import MixtrainError

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


# ----------------------------------------------------------------------------------------------
# pure functions


def test_interpolate_inside_range():
    xs, ys = [40.0, 10.0, 20.0], [0.8, 0.5, 0.7]  # unsorted on purpose
    assert bench.interpolate(xs, ys, 15.0) == pytest.approx(0.6)
    assert bench.interpolate(xs, ys, 30.0) == pytest.approx(0.75)
    assert bench.interpolate(xs, ys, 10.0) == pytest.approx(0.5)  # the ends are measurements
    assert bench.interpolate(xs, ys, 40.0) == pytest.approx(0.8)
    # points sharing a time are averaged
    assert bench.interpolate([10.0, 10.0, 20.0], [0.4, 0.6, 0.9], 15.0) == pytest.approx(0.7)
    assert bench.interpolate([5.0], [0.3], 5.0) == pytest.approx(0.3)


def test_interpolate_outside_range_is_none():
    xs, ys = [10.0, 20.0, 40.0], [0.5, 0.7, 0.8]
    assert bench.interpolate(xs, ys, 9.99) is None
    assert bench.interpolate(xs, ys, 40.01) is None
    assert bench.interpolate([5.0], [0.3], 6.0) is None
    assert bench.interpolate([], [], 1.0) is None


def _run(method, epochs, seed, secs, acc, passes):
    return {"key": bench.run_key(method, epochs, seed), "method": method, "epochs": epochs, "seed": seed,
            "train_seconds": secs, "test_accuracy": acc, "passes": passes, "samples": 100 * epochs}


MADE_UP = [
    _run("baseline", 10, 0, 10.0, 0.80, 1000), _run("baseline", 10, 1, 12.0, 0.82, 1000),
    _run("baseline", 20, 0, 20.0, 0.90, 2000), _run("baseline", 20, 1, 22.0, 0.92, 2000),
    _run("mixtrain", 10, 0, 8.0, 0.85, 800), _run("mixtrain", 10, 1, 8.0, 0.87, 600),
    _run("mixtrain", 20, 0, 15.0, 0.91, 1250),
]


def test_aggregate_means_and_sample_std():
    rows = bench.aggregate(MADE_UP)
    assert [(r["method"], r["epochs"], r["n"]) for r in rows] == [
        ("baseline", 10, 2), ("baseline", 20, 2), ("mixtrain", 10, 2), ("mixtrain", 20, 1)]
    b10 = rows[0]
    assert b10["train_seconds"] == pytest.approx(11.0)
    assert b10["accuracy"] == pytest.approx(0.81)
    assert b10["accuracy_std"] == pytest.approx(np.std([0.80, 0.82], ddof=1))
    assert rows[2]["passes"] == pytest.approx(700)
    assert rows[3]["accuracy_std"] is None  # one seed: no std


def test_compare_speedup_and_gain_at_equal_time():
    rows = {(r["method"], r["epochs"]): r for r in bench.compare(bench.aggregate(MADE_UP))}
    m10, m20 = rows["mixtrain", 10], rows["mixtrain", 20]
    assert m10["speedup"] == pytest.approx(11.0 / 8.0)
    assert m10["pass_ratio"] == pytest.approx(1000 / 700)
    assert m10["gain"] is None  # 8 s is below the baseline's 11..21 s
    # baseline line at 15 s: 0.81 + (0.91 - 0.81) * (15 - 11) / (21 - 11) = 0.85
    assert m20["baseline_accuracy_at_time"] == pytest.approx(0.85)
    assert m20["gain"] == pytest.approx(0.06)
    assert m20["speedup"] == pytest.approx(21.0 / 15.0)
    assert rows["baseline", 20]["speedup"] == pytest.approx(1.0)


def test_render_report_table():
    results = {"format": bench.FORMAT, "setup": {"data": "digits", "resolved_model": "digitnet"},
               "sessions": [{"command": "mixtrain bench x", "device": {"type": "cpu", "name": "test-cpu"},
                             "versions": {"torch": "9.9"}}],
               "planned": [r["key"] for r in MADE_UP] + ["mixtrain-e20-s1"], "runs": MADE_UP}
    text = bench.render_report(results)
    assert "`mixtrain bench x`" in text and "test-cpu" in text and "torch 9.9" in text
    assert "| mixtrain | 20 | 1 | 1,250 | 15.0 | 91.00 | 1.40x | 1.60x | +6.00 pt |" in text
    assert "| mixtrain | 10 | 2 | 700 | 8.0 | 86.00 ± 1.41 | 1.38x | 1.43x | outside baseline range" in text
    assert "1 of 8 planned runs missing (mixtrain-e20-s1)" in text
    no_base = bench.render_report({**results, "runs": [r for r in MADE_UP if r["method"] == "mixtrain"]})
    assert "n/a (no baseline runs)" in no_base


def _part(tmp_path, name, runs, setup=None, gpu="H200", torch_version="2.11"):
    """A bench folder of ``runs`` as one process would have left it."""
    d = tmp_path / name
    d.mkdir()
    results = {"format": bench.FORMAT, "setup": setup or {"data": "npz:/c10", "resolved_model": "resnet50", "lr": 0.2},
               "timing": bench.TIMING_NOTE, "methods": sorted({r["method"] for r in runs}),
               "planned": [r["key"] for r in runs],
               "sessions": [{"command": f"mixtrain bench --out {name}", "device": {"type": "cuda", "name": gpu},
                             "versions": {"torch": torch_version}}], "runs": runs}
    (d / "results.json").write_text(json.dumps(results))
    return str(d)


def test_report_merges_benches_run_side_by_side(tmp_path, capsys):
    # seeds 0 on one GPU, seed 1 on the other: one table over both seeds
    a = _part(tmp_path, "gpu0", [r for r in MADE_UP if r["seed"] == 0])
    b = _part(tmp_path, "gpu1", [r for r in MADE_UP if r["seed"] == 1])
    out = tmp_path / "merged"
    assert main(["report", str(out), "--merge", f"{a},{b}"]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert sorted(r["key"] for r in merged["runs"]) == sorted(r["key"] for r in MADE_UP)
    assert [s["part"] for s in merged["sessions"]] == [a, b]
    report = (out / "report.md").read_text()
    assert report == bench.render_report(merged)
    # the same table as one bench of all the runs would give
    assert "| mixtrain | 10 | 2 | 700 | 8.0 | 86.00 ± 1.41 | 1.38x | 1.43x |" in report
    assert "`mixtrain bench --out gpu0`" in report and "Merged from another bench (mixtrain report --merge): `mixtrain bench --out gpu1`" in report
    capsys.readouterr()

    # what cannot be merged is one error line each, and nothing is written
    cases = [
        (_part(tmp_path, "lr", MADE_UP[1:2], setup={"data": "npz:/c10", "resolved_model": "resnet50", "lr": 0.1}),
         f"setups differ: lr: 0.2 in {a}, 0.1 in {tmp_path / 'lr'}"),
        (_part(tmp_path, "h100", MADE_UP[1:2], gpu="H100"), "measured with device 'H100' and 'H200'"),
        (_part(tmp_path, "again", MADE_UP[:1]), "run baseline-e10-s0 is in both"),
    ]
    for other, message in cases:
        dest = tmp_path / f"into-{os.path.basename(other)}"
        assert main(["report", str(dest), "--merge", f"{a},{other}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not dest.exists()
    bare = _part(tmp_path, "bare", MADE_UP[2:3])
    (tmp_path / "bare" / "results.json").write_text(json.dumps({**json.loads((tmp_path / "bare" / "results.json").read_text()),
                                                                  "sessions": []}))
    assert main(["report", str(tmp_path / "into-bare"), "--merge", f"{a},{bare}"]) == 2
    assert "records no bench session" in capsys.readouterr().err
    assert main(["report", str(out), "--merge", f"{a},{b}"]) == 2  # never over an existing bench
    assert "already exists" in capsys.readouterr().err
    assert main(["report", a, "--merge", f"{a},{b}"]) == 2  # nor over one of its parts
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "m2"), "--merge", f" {a} , {b}"]) == 0  # spaces are no part of a name
    capsys.readouterr()
    assert main(["report", str(tmp_path / "m3"), "--merge", f"{a},{b},{a}/"]) == 2
    assert "names a folder twice" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "one"), "--merge", a]) == 2
    assert "two or more" in capsys.readouterr().err


def _log(losses, mixed):
    return [{"epoch": i + 1, "train_loss": l, "mixed_fraction": m} for i, (l, m) in enumerate(zip(losses, mixed))]


def test_loss_spikes_ignore_the_switch_of_mixing():
    # mixing on from epoch 2 (loss rises: not a spike), a real spike at epoch 4, off again at 6
    log = _log([1.7, 1.9, 1.0, 2.1, 0.9, 0.95], [0, 0.5, 0.5, 0.5, 0.6, 0])
    assert bench.loss_spikes(log) == [4]
    assert bench.loss_spikes(_log([1.0, 1.04, 1.0], [0.5, 0.5, 0.5])) == []  # a 4 % rise is noise
    assert bench.loss_spikes(_log([1.0, 1.06], [0, 0])) == [2]  # the baseline can spike too
    assert bench.loss_spikes([]) == []


def test_render_report_flags_loss_spikes_and_grad_norms():
    spiky = dict(MADE_UP[4], epochs_log=[dict(e, grad_norm_max=g) for e, g in
                                         zip(_log([1.7, 1.0, 2.1, 0.9], [0, 0.5, 0.5, 0.5]), [3.0, 1.2, 9.5, 1.1])])
    results = {"format": bench.FORMAT, "setup": {"data": "digits"}, "sessions": [], "planned": [],
               "runs": MADE_UP[:4] + [spiky] + MADE_UP[5:]}
    text = bench.render_report(results)
    assert "**Loss spikes**" in text and "1 of 7 runs (mixtrain-e10-s0)" in text
    assert f"| {spiky['key']} | 8.00 |" in text and "| 3 | 9.5 |" in text
    assert "**Loss spikes**" not in bench.render_report({**results, "runs": MADE_UP})


def test_parse_lists():
    assert bench.parse_seeds("3") == [0, 1, 2]
    assert bench.parse_seeds("7,2") == [2, 7]
    assert bench.parse_epochs("30,10,20,10") == [10, 20, 30]
    assert bench.parse_methods("baseline, mixtrain") == ["baseline", "mixtrain"]
    for bad in (lambda: bench.parse_seeds("0"), lambda: bench.parse_seeds("two"),
                lambda: bench.parse_epochs("0,10"), lambda: bench.parse_epochs("ten"),
                lambda: bench.parse_methods("baseline,fastest")):
        with pytest.raises(MixtrainError):
            bad()


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a tiny bench on the CPU


def _tiny_npz(folder):
    """192 training and 96 test images of scikit-learn's digits, 16x16, as npz:DIR."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)[..., None]
    folder.mkdir()
    np.savez(folder / "train_0.npz", x=x[:192], y=d.target[:192])
    np.savez(folder / "test.npz", x=x[1000:1096], y=d.target[1000:1096])
    return folder


def _bench_argv(data, out, *extra):
    return ["bench", "--data", f"npz:{data}", "--model", "digitnet", "--flip", "off", "--batch-size", "32", "--lr", "0.05",
            "--mix-rule", "all", "--final-unmixed-epochs", "0", "--device", "cpu", "--epochs", "1,2",
            "--methods", "baseline,mixtrain", "--out", str(out), *extra]


def _bench(data, out, *extra):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mixtrain", *_bench_argv(data, out, *extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _bench_refused(capsys, data, out, *extra):
    """The bench command run in this process, for commands refused before any training (saves
    a Python start per call); returns (exit code, stderr)."""
    from mixtrain.cli import main

    capsys.readouterr()
    code = main(_bench_argv(data, out, *extra))
    return code, capsys.readouterr().err


def test_bench_end_to_end_report_and_resume(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "data")
    out = tmp_path / "bench"
    p = _bench(data, out, "--seeds", "2")
    assert p.returncode == 0, p.stderr
    assert "warm-up baseline" in p.stdout and "warm-up mixtrain" in p.stdout

    results = json.loads((out / "results.json").read_text())
    keys = {r["key"] for r in results["runs"]}
    assert keys == {f"{m}-e{e}-s{s}" for m in ("baseline", "mixtrain") for e in (1, 2) for s in (0, 1)}
    assert "--seeds 2" in results["sessions"][0]["command"]
    assert results["sessions"][0]["device"]["type"] == "cpu" and "torch" in results["sessions"][0]["versions"]
    assert results["setup"]["batch_size"] == 32 and results["setup"]["resolved_model"] == "digitnet"
    by = {r["key"]: r for r in results["runs"]}
    for r in results["runs"]:
        assert r["train_seconds"] > 0 and 0.0 <= r["test_accuracy"] <= 1.0
        assert len(r["epochs_log"]) == r["epochs"]
    # rule 'all' mixes every sample of epoch 2: fewer passes than the baseline, same samples
    assert by["mixtrain-e2-s0"]["passes"] < by["baseline-e2-s0"]["passes"] == 384
    assert by["mixtrain-e2-s0"]["samples"] == 384

    report = (out / "report.md").read_text()
    rows = bench.compare(bench.aggregate(results["runs"]))
    assert "| method | epochs | seeds | passes | train s (mean) |" in report
    for r in rows:
        assert f"| {r['method']} | {r['epochs']} | 2 | {r['passes']:,.0f} | {r['train_seconds']:.1f} |" in report
        if r["method"] == "mixtrain":
            expect = "outside baseline range" if r["gain"] is None else f"{100 * r['gain']:+.2f} pt"
            assert expect in report
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # `mixtrain report DIR` rebuilds both from results.json alone
    (out / "report.md").unlink()
    (out / "frontier.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report
    assert (out / "frontier.png").read_bytes()[:8] == png[:8]

    # without --resume an existing bench is not overwritten; a changed setup cannot be continued
    assert main(["bench", "--data", f"npz:{data}", "--out", str(out), "--device", "cpu"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["bench", "--data", f"npz:{data}", "--model", "digitnet", "--flip", "off", "--batch-size", "32",
                 "--lr", "0.1", "--mix-rule", "all", "--final-unmixed-epochs", "0", "--device", "cpu", "--out", str(out), "--resume"]) == 2
    assert "setup differs: lr: 0.05 then, 0.1 now" in capsys.readouterr().err

    # --stop-after with no time left starts nothing (no data loaded, no warm-up)
    args = ["bench", "--data", f"npz:{data}", "--model", "digitnet", "--flip", "off", "--batch-size", "32",
            "--lr", "0.05", "--mix-rule", "all", "--final-unmixed-epochs", "0", "--device", "cpu", "--epochs", "1,2", "--seeds", "2",
            "--out", str(out), "--resume", "--stop-after", "0.001"]
    # a bench cut off by a time limit: drop two runs, as if they had never finished
    cut = dict(results, runs=[r for r in results["runs"] if r["key"] not in ("baseline-e2-s1", "mixtrain-e2-s1")])
    (out / "results.json").write_text(json.dumps(cut))
    assert main(args) == 0
    assert "stopping before baseline-e2-s1" in capsys.readouterr().out
    assert "2 of 8 planned runs missing" in (out / "report.md").read_text()
    stopped = json.loads((out / "results.json").read_text())
    assert len(stopped["runs"]) == 6 and stopped["sessions"][-1]["warmup_seconds"] == {}

    # --resume trains only the missing runs and keeps the others as they were (in this process)
    assert main(args[:-2]) == 0
    printed = capsys.readouterr().out
    assert "baseline-e1-s0" not in printed and "baseline-e2-s1" in printed
    again = json.loads((out / "results.json").read_text())
    assert sorted(r["key"] for r in again["runs"]) == sorted(keys) and len(again["sessions"]) == 3
    for r in again["runs"]:
        if r["key"] not in ("baseline-e2-s1", "mixtrain-e2-s1"):
            assert r["train_seconds"] == by[r["key"]]["train_seconds"]  # kept, not rerun
    assert "| baseline | 2 | 2 |" in (out / "report.md").read_text()
    assert "missing" not in (out / "report.md").read_text()


def test_bench_on_two_devices_deals_out_the_seeds_and_merges(tmp_path, capsys):
    """--devices: one bench process per device, seeds dealt out in turn, one merged report; a
    second invocation needs --resume, and --resume with every run done changes nothing."""
    data = _tiny_npz(tmp_path / "data")
    out = tmp_path / "bench"
    p = _bench(data, out, "--seeds", "3", "--epochs", "1", "--devices", "cpu,cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[cpu seeds 0,2] warm-up baseline" in p.stdout and "[cpu seeds 1] warm-up baseline" in p.stdout
    parts = {d: json.loads((out / "parts" / d / "results.json").read_text()) for d in ("0-cpu", "1-cpu")}
    assert sorted(r["key"] for r in parts["0-cpu"]["runs"]) == ["baseline-e1-s0", "baseline-e1-s2", "mixtrain-e1-s0", "mixtrain-e1-s2"]
    assert sorted(r["key"] for r in parts["1-cpu"]["runs"]) == ["baseline-e1-s1", "mixtrain-e1-s1"]
    merged = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in merged["runs"]) == [0, 0, 1, 1, 2, 2]
    assert sorted(merged["planned"]) == sorted(r["key"] for r in merged["runs"])
    report = (out / "report.md").read_text()
    assert "| mixtrain | 1 | 3 |" in report and "missing" not in report
    # the report names this command, and each child's: this command line with their device, seeds
    # and folder last (one seed as a list)
    assert len(merged["devices_commands"]) == 1 and "--devices cpu,cpu" in merged["devices_commands"][0]
    assert f"- Command: `{merged['devices_commands'][0]}` (one bench process per device, merged)" in report
    commands = [s["command"] for s in merged["sessions"]]
    assert commands[1].endswith(f"--devices '' --device cpu --seeds 1,1 --out {out / 'parts' / '1-cpu'}")
    assert f"- Part {out / 'parts' / '1-cpu'}: `{commands[1]}`" in report

    code, err = _bench_refused(capsys, data, out, "--seeds", "3", "--epochs", "1", "--devices", "cpu,cpu")
    assert code == 2 and err.count("error:") == 1 and "pass --resume" in err
    p = _bench(data, out, "--seeds", "3", "--epochs", "1", "--devices", "cpu,cpu", "--resume")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all 4 runs are already in" in p.stdout and "all 2 runs are already in" in p.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == merged["runs"] and len(again["devices_commands"]) == 2
    assert "- Continued with: `" in (out / "report.md").read_text()
    # continued only as it was dealt out: the same devices and seeds, and with --devices
    code, err = _bench_refused(capsys, data, out, "--seeds", "3", "--epochs", "1", "--devices", "cpu", "--resume")
    assert code == 2 and "was run as cpu seeds 0,2; cpu seeds 1: continue it with the same --devices" in err
    code, err = _bench_refused(capsys, data, out, "--seeds", "3", "--epochs", "1", "--resume")
    assert code == 2 and "was run with --devices" in err and err.count("\n") == 1

    code, err = _bench_refused(capsys, data, tmp_path / "b2", "--seeds", "1", "--devices", "cpu,cuda:0")
    assert code == 2 and "2 devices but there are 1 seeds" in err and err.count("\n") == 1
    code, err = _bench_refused(capsys, data, tmp_path / "b2", "--seeds", "2", "--devices", "cuda:0,cuda:0")
    assert code == 2 and "names cuda:0 more than once" in err
    code, err = _bench_refused(capsys, data, tmp_path / "b3", "--seeds", "2", "--devices", "cpu,bogus")
    assert code == 2 and "'bogus' is not a device" in err and err.count("\n") == 1
    assert not (tmp_path / "b3" / "parts").exists()  # refused before the cpu part started
    from mixtrain.bench_devices import check_devices

    check_devices(["auto", "cpu", "cuda", "cuda:1"])  # every name --device takes passes


def test_a_device_bench_child_sees_only_its_gpu():
    from mixtrain.bench_devices import isolate

    assert isolate("cuda:1", None) == ("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    assert isolate("cuda:1", "4,6") == ("cuda", {"CUDA_VISIBLE_DEVICES": "6"})  # numbered as this process sees them
    assert isolate("cpu", "4,6") == ("cpu", {}) and isolate("cuda", None) == ("cuda", {})
    with pytest.raises(MixtrainError, match="cuda:2 asked for, but CUDA_VISIBLE_DEVICES=4,6 shows 2 GPU"):
        isolate("cuda:2", "4,6")
    with pytest.raises(MixtrainError, match="shows 0 GPU"):  # no GPU allowed stays so
        isolate("cuda:0", "")


def test_bench_devices_names_the_device_that_failed(tmp_path):
    data = _tiny_npz(tmp_path / "data")
    p = _bench(data, tmp_path / "bench", "--seeds", "2", "--epochs", "1", "--devices", "cpu,cuda:7")
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the bench failed on cuda:7 (exit 2: error:"), err
    assert (tmp_path / "bench" / "results.json").exists()  # the device that worked is merged all the same


def test_warm_up_runs_the_mixed_step_at_the_default_options(tmp_path):
    # the untimed warm-up must run a mixing epoch (its shapes, its kernels) whatever the defaults
    # leave unmixed at the end of a short schedule
    data = _tiny_npz(tmp_path / "data")
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "mixtrain", "bench", "--data", f"npz:{data}", "--model", "digitnet",
                        "--batch-size", "32", "--device", "cpu", "--epochs", "1", "--methods", "mixtrain",
                        "--seeds", "1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    warm = json.loads((out / "warmup" / "mixtrain" / "metrics.json").read_text())
    assert warm["epochs_log"][-1]["mixed_fraction"] > 0


def test_a_bench_whose_first_method_is_a_variant_runs(tmp_path):
    # the bench's shared config once took the first method spec, parentheses and all, as its method
    data = _tiny_npz(tmp_path / "data")
    out = tmp_path / "bench"
    p = _bench(data, out, "--seeds", "1", "--epochs", "1", "--methods", "mixtrain(quad_confidence=0),baseline")
    assert p.returncode == 0, p.stderr
    results = json.loads((out / "results.json").read_text())
    assert {r["key"] for r in results["runs"]} == {"mixtrain(quad_confidence=0)-e1-s0", "baseline-e1-s0"}
    variant = next(r for r in results["runs"] if r["method"] != "baseline")
    assert variant["base_method"] == "mixtrain" and variant["options"]["quad_confidence"] == 0.0


def test_a_bench_saved_before_options_were_added_or_renamed_continues(tmp_path, capsys):
    # its setup lacks today's ddp_bucket_mb and names lr_warmup and first_unmixed_epochs by their old names
    data = _tiny_npz(tmp_path / "data")
    out = tmp_path / "bench"
    p = _bench(data, out, "--seeds", "1", "--epochs", "1")
    assert p.returncode == 0, p.stderr
    path = out / "results.json"
    results = json.loads(path.read_text())
    setup = results["setup"]
    del setup["ddp_bucket_mb"]
    setup["warmup"] = setup.pop("lr_warmup")
    setup["mix"]["warmup_epochs"] = setup["mix"].pop("first_unmixed_epochs")
    path.write_text(json.dumps(results))
    p = _bench(data, out, "--seeds", "2", "--epochs", "1", "--resume")
    assert p.returncode == 0, p.stderr
    assert {r["key"] for r in json.loads(path.read_text())["runs"]} == {
        f"{m}-e1-s{s}" for m in ("baseline", "mixtrain") for s in (0, 1)}
    # a real difference is still refused, by name
    code, err = _bench_refused(capsys, data, out, "--seeds", "2", "--epochs", "1", "--resume", "--lr", "0.07")
    assert code != 0 and "lr: 0.05 then, 0.07 now" in err
    # runs saved before --step-scale existed trained with none, unlike today's default (auto)
    results = json.loads(path.read_text())
    del results["setup"]["mix"]["step_scale"]
    path.write_text(json.dumps(results))
    code, err = _bench_refused(capsys, data, out, "--seeds", "2", "--epochs", "1", "--resume")
    assert code != 0 and "mix.step_scale: 'none' then, 'linear' now" in err and "Give --step-scale as then" in err, err


def test_expected_seconds_of_a_method_not_run_yet_is_the_slowest_run():
    """--stop-after judges a variant's first run by the slowest run so far (not 0 s), so a time
    limit does not kill it halfway; a method already run is judged by its own runs."""
    runs = [{"method": "baseline", "epochs": 10, "wall_seconds": 100.0},
            {"method": "mixtrain", "epochs": 10, "wall_seconds": 60.0}]
    assert bench._expected_seconds(runs, "mixtrain", 20) == 120.0
    assert bench._expected_seconds(runs, "mixtrain(confidence=0.4)", 20) == 200.0
    assert bench._expected_seconds([], "baseline", 20) == 0.0


def test_a_diverged_run_is_recorded_and_the_bench_goes_on(tmp_path, monkeypatch, capsys):
    """Runs whose loss turns NaN (seed 1) are recorded as diverged, left out of the means and
    named in the report; the bench's other runs still train, --resume does not retry them, and a
    merge keeps them."""
    import torch

    from mixtrain import models as M

    class NanOnSeed1(M.DigitNet):
        def __init__(self, nc, ic):
            super().__init__(nc, ic, width=8)
            self.poisoned = torch.initial_seed() == 1  # the trainer seeds torch with the run's seed

        def forward_features(self, x):
            f = super().forward_features(x)
            return f * float("nan") if self.training and self.poisoned else f

    monkeypatch.setitem(M.MODELS, "nanseed1", lambda nc, ic, s: NanOnSeed1(nc, ic))
    data = _tiny_npz(tmp_path / "data")
    argv = [*_bench_argv(data, tmp_path / "b", "--seeds", "2", "--epochs", "3", "--progress", "none"), "--model", "nanseed1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "baseline-e3-s1 diverged" in out and "mixtrain-e3-s1 diverged" in out and "non-finite loss" in out
    assert "2 run(s) diverged and are left out of the means: baseline-e3-s1, mixtrain-e3-s1" in out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert sorted(r["key"] for r in results["runs"]) == ["baseline-e3-s0", "mixtrain-e3-s0"]
    assert sorted(d["key"] for d in results["diverged"]) == ["baseline-e3-s1", "mixtrain-e3-s1"]
    assert bench.missing_runs(results) == []
    report = (tmp_path / "b" / "report.md").read_text()
    assert "**Diverged**" in report and "mixtrain-e3-s1 (non-finite loss at epoch 1" in report
    assert "| mixtrain | 3 | 1 (+1 diverged) |" in report  # the mean is over the one finite seed
    assert "| baseline-e3-s1 | diverged: non-finite loss at epoch 1" in report
    assert "Try a lower --lr" in results["diverged"][0]["error"]  # as the command line names it

    assert main([*argv, "--resume"]) == 0
    assert "all 4 runs are already in" in capsys.readouterr().out
    merged = bench.merge_results({"b": results})
    assert merged["diverged"] == results["diverged"]


def test_source_digest_names_the_code_not_the_checkout(tmp_path):
    import shutil

    from mixtrain.bench import _versions_with_commit, source_digest

    src = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(bench.__file__), src, ignore=shutil.ignore_patterns("__pycache__"))
    d = source_digest(str(src))
    assert d == source_digest() and len(d) == 12  # the same files, elsewhere: the same digest
    (src / "notes.txt").write_text("not code")
    assert source_digest(str(src)) == d
    (src / "__pycache__").mkdir()
    (src / "plan.py").write_text((src / "plan.py").read_text() + "\n# one more line\n")
    assert source_digest(str(src)) != d  # one edited line: another digest
    assert _versions_with_commit()["mixtrain_source"] == d


def test_a_comma_between_method_options_gets_a_hint_to_use_semicolons():
    from mixtrain.bench import split_method

    with pytest.raises(MixtrainError, match=r"needs a float, got '0.4,quad_confidence=0.8'; separate options with ';'"):
        split_method("mixtrain(confidence=0.4,quad_confidence=0.8)")


def test_a_variant_of_a_method_that_reads_no_mixing_options_is_refused():
    from mixtrain.bench import split_method

    with pytest.raises(MixtrainError, match=r"baseline takes no mixing options, got 'baseline\(confidence=0.4\)'"):
        split_method("baseline(confidence=0.4)")  # it would train as the plain baseline under another name
    assert split_method("infobatch(prune_ratio=0.3)") == ("infobatch", {"prune_ratio": 0.3})
    assert split_method("cutmix(min_share=0.3)") == ("cutmix", {"min_share": 0.3})
