"""The benchmark scripts run end to end in their CPU smoke mode and write their tables."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_models_benchmark_smoke(tmp_path):
    bench = load_script("models")
    assert bench.main(["--smoke", "--models", "mobilenetv2", "--seeds", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "models.json").read_text())
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"baseline", "mixtrain"} and not result["failed"]
    # mixing every sample after the warm-up epoch: 64 + 32 passes for 128 samples
    assert runs["baseline"]["passes"] == 128 and runs["mixtrain"]["passes"] == 96
    base, mixed = result["summary"]
    assert (base["method"], mixed["method"]) == ("baseline", "mixtrain")
    assert mixed["speedup"] == pytest.approx(base["train_seconds_mean"] / mixed["train_seconds_mean"])
    assert mixed["accuracy_diff"] == pytest.approx(mixed["accuracy_mean"] - base["accuracy_mean"])
    assert mixed["pass_speedup"] == pytest.approx(128 / 96)
    assert "torch" in result["versions"]
    table = (tmp_path / "models.md").read_text()
    assert "| mobilenetv2 | mixtrain | 2 | 1 | 96 |" in table


def test_folder_throughput_smoke(tmp_path):
    bench = load_script("folder_throughput")
    assert bench.main(["--smoke", "--plans", "mixed", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "folder_throughput.json").read_text())
    got = {(r["mode"], r["workers"]) for r in result["rows"]}
    assert got == {("model", None), ("load", 0), ("load+model", 0), ("load", 2), ("load+model", 2)}
    for r in result["rows"]:
        assert r["samples_per_s"] > 0
        assert r["samples_per_s"] == pytest.approx(2 * r["passes_per_s"])  # every pass carries a pair
    assert "| mixed | load+model | 2 |" in (tmp_path / "folder_throughput.md").read_text()


def test_mixing_cost_smoke(tmp_path):
    bench = load_script("mixing_cost")
    bench.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "mixing_cost.json").read_text())
    by = {r["method"]: r for r in result["epochs"]}
    # everything mixed in pairs from the first epoch: half the passes of the baseline
    assert by["mixtrain"]["passes_per_epoch"] == by["baseline"]["passes_per_epoch"] / 2
    assert all(r["seconds_per_pass"] > 0 for r in result["epochs"])
    assert "| eager | off | mixtrain |" in (tmp_path / "mixing_cost.md").read_text()
