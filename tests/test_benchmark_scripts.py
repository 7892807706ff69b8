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


def test_models_benchmark_gives_the_vits_their_own_optimizer(tmp_path):
    bench = load_script("models")
    assert bench.main(["--smoke", "--models", "vit_tiny", "--seeds", "0", "--vit-optimizer", "adamw", "--vit-lr", "0.001",
                       "--vit-weight-decay", "0.05", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "models.json").read_text())
    assert (result["vit_optimizer"], result["vit_lr"], result["vit_weight_decay"]) == ("adamw", 0.001, 0.05)
    assert {r["method"] for r in result["runs"]} == {"baseline", "mixtrain"} and not result["failed"]
    assert all(r["cuda_graph"] is False for r in result["runs"])  # recorded per run (no graph on the CPU)


def test_folder_throughput_smoke(tmp_path):
    bench = load_script("folder_throughput")
    assert bench.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "folder_throughput.json").read_text())
    got = {(r["placement"], r["method"]) for r in result["rows"]}
    assert got == {(p, m) for p in ("device", "host") for m in ("baseline", "mixtrain")}
    for r in result["rows"]:
        assert r["resident"] == (r["placement"] == "device")
        assert r["samples_per_s"] > 0
        # epoch 3 of mixtrain mixes every sample in pairs: two samples per pass
        assert r["samples_per_s"] == pytest.approx((2 if r["method"] == "mixtrain" else 1) * r["passes_per_s"])
    assert result["caches"][0]["images"] == {"train": 48, "val": 3} and result["bare"][0]["images_per_s"] > 0
    assert "| digitnet | 32 |" in (tmp_path / "folder_throughput.md").read_text()


def test_folder_bench_smoke(tmp_path):
    bench = load_script("folder_bench")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "folder_bench.json").read_text())
    for path in ("npz", "cache_path"):
        base, mixed = result[path]["baseline"], result[path]["mixtrain"]
        assert base["passes"] == 64 and mixed["passes"] == 48  # 32 samples, epoch 2 all in pairs
        assert mixed["speedup"] == pytest.approx(base["train_seconds_median"] / mixed["train_seconds_median"])
    assert result["cache_over_npz_baseline_epoch_seconds"] > 0
    assert "| folder cache | mixtrain |" in (tmp_path / "folder_bench.md").read_text()


def test_mixing_cost_smoke(tmp_path):
    bench = load_script("mixing_cost")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "mixing_cost.json").read_text())
    by = {r["variant"]: r for r in result["epochs"] if r["graph"] == "off"}
    base = by["baseline"]["passes_per_epoch"]
    # every sample in pairs: half the passes; in quads: a quarter; quads on but never mixed: all of them
    assert by["pairs"]["passes_per_epoch"] == base / 2 and by["pairs"]["slots"] == 2
    assert by["quads"]["passes_per_epoch"] == base / 4 and by["quads"]["slots"] == 4
    assert by["k4-unmixed"]["passes_per_epoch"] == base and by["k4-unmixed"]["slots"] == 4
    assert all(r["seconds_per_pass"] > 0 for r in result["epochs"])
    steps = result["steps"]["eager"]
    assert [steps[v]["samples_per_pass"] for v in ("baseline", "pairs", "quads", "k4-unmixed")] == [1, 2, 4, 1]
    assert set(result["setup_ms"]) == set(by) and all(t > 0 for t in result["setup_ms"].values())
    table = (tmp_path / "mixing_cost.md").read_text()
    assert "| eager | off (off) | quads | 4 |" in table and "benchmarks/mixing_cost.py --smoke" in table


def test_checkpoint_cost_smoke(tmp_path):
    bench = load_script("checkpoint_cost")
    assert bench.main(["--model", "digitnet", "--device", "cpu", "--repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "checkpoint_cost.json").read_text())
    assert len(result["blocked_ms"]) == len(result["written_ms"]) == 2
    assert all(0 < b <= w for b, w in zip(result["blocked_ms"], result["written_ms"]))  # written = blocked + wait
    assert result["checkpoint_mb"] > 0 and "checkpoint_cost.py" in (tmp_path / "checkpoint_cost.md").read_text()


def test_ddp_scaling_smoke(tmp_path):
    """One process and torchrun with two (gloo on CPU) train the same global batch; the table
    compares them, and each run records the command that started it."""
    bench = load_script("ddp_scaling")
    assert bench.main(["--smoke", "--methods", "mixtrain", "--seeds", "0", "--variants", "1,2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ddp_scaling.json").read_text())
    one, two = result["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["batch_size"], two["batch_size"]) == (64, 32)  # per process: the global batch is 64 in both
    assert "torch.distributed.run" in two["command"] and "--nproc_per_node 2" in two["command"]
    assert "torch.distributed.run" not in one["command"]
    assert abs(one["samples"] - two["samples"]) == 0 and one["samples"] == 2 * 1437
    for r in (one, two):
        assert 0 < r["steady_seconds"] < r["train_seconds"] and 0 <= r["test_accuracy"] <= 1
    row = {r["variant"]: r for r in result["summary"]}["2"]
    assert row["scaling_vs_one_gpu"] == pytest.approx(one["train_seconds"] / two["train_seconds"])
    assert row["accuracy_diff_vs_one_gpu"] == pytest.approx(two["test_accuracy"] - one["test_accuracy"])
    table = (tmp_path / "ddp_scaling.md").read_text()
    assert "| 2 | mixtrain | off | 0 |" in table and "benchmarks/ddp_scaling.py --smoke" in table
    # the untimed warm-up ran first, one process, one epoch, and is no row of the table
    warm = result["session"]["warmup"]
    assert "--epochs 1 " in warm["command"] and "torch.distributed.run" not in warm["command"]
    assert json.loads((tmp_path / "runs" / "warmup" / "metrics.json").read_text())["epochs"] == 1
    assert "Before the timed runs, untimed" in table


def _nearest_centroid_accuracy(root, classes):
    """Leave-one-out nearest class mean on 6x8 thumbnails of the generated training images."""
    import numpy as np
    from PIL import Image

    xs, ys = [], []
    for c in range(classes):
        d = os.path.join(root, "train", f"n{c:05d}")
        for name in sorted(os.listdir(d)):
            xs.append(np.asarray(Image.open(os.path.join(d, name)).convert("RGB").resize((8, 6)), dtype=np.float32).ravel())
            ys.append(c)
    x, y = np.stack(xs), np.array(ys)
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        means = np.stack([x[keep & (y == c)].mean(0) for c in range(classes)])
        hits += int(np.argmin(((means - x[i]) ** 2).sum(1)) == y[i])
    return hits / len(y)


def test_generated_folders_carry_their_class_only_when_learnable(tmp_path):
    """ddp_scaling's generated folder must be learnable (else mixtrain never mixes and its speedup
    cannot show); the random form carries no class information."""
    gen = load_script("folder_throughput").generate_folder
    info = gen(str(tmp_path / "l"), 60, 4, 40, 60, learnable=True)
    assert info["learnable"] and info["train_images"] == 60
    assert _nearest_centroid_accuracy(str(tmp_path / "l"), 4) >= 0.9
    gen(str(tmp_path / "r"), 60, 4, 40, 60)
    assert _nearest_centroid_accuracy(str(tmp_path / "r"), 4) <= 0.6


def test_ddp_scaling_trains_from_a_generated_folder(tmp_path):
    bench = load_script("ddp_scaling")
    assert bench.main(["--generate-images", "96", "--generate-classes", "4", "--work", str(tmp_path / "w"),
                       "--image-size", "32", "--model", "digitnet", "--batch", "16", "--epochs", "2", "--seeds", "0",
                       "--variants", "1", "--methods", "mixtrain", "--extra", "--device cpu --lr 0.05",
                       "--warmup-epochs", "0", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "ddp_scaling.json").read_text())
    assert result["session"]["data"] == f"folder:{tmp_path / 'w' / 'folder'}" and result["session"]["image_size"] == 32
    assert result["session"]["folder"]["generated"]["learnable"]
    (run,) = result["runs"]
    assert run["samples"] == 2 * 96 and "--cache-size 32" in run["command"]


def test_ddp_scaling_rejects_a_batch_that_does_not_split(tmp_path):
    bench = load_script("ddp_scaling")
    with pytest.raises(SystemExit, match="does not split evenly over 3 processes"):
        bench.main(["--smoke", "--variants", "1,3", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before the warm-up or any run started


def test_epoch_cost_fit_recovers_step_and_epoch_costs(tmp_path):
    """Epoch seconds made from a known per-step and per-epoch cost are split back into them."""
    fit = load_script("epoch_cost_fit")

    def run(method, seed, epochs_passes, step_ms, fixed_ms):
        log = [{"epoch": i + 1, "passes": p, "mixed_fraction": 0.0 if p == 1024 else 0.5,
                "seconds": (-(-p // 128) * step_ms + fixed_ms) / 1000} for i, p in enumerate(epochs_passes)]
        return {"method": method, "epochs": len(log), "seed": seed, "epochs_log": log}

    runs = [run("baseline", 0, [1024] * 4, 10.0, 0.0),
            run("mixtrain", 0, [1024, 700, 500, 1024], 10.4, 3.0), run("mixtrain", 1, [1024, 640, 380, 1024], 10.4, 3.0)]
    (tmp_path / "results.json").write_text(json.dumps({"setup": {"batch_size": 128}, "runs": runs}))
    out = tmp_path / "fit.md"
    assert fit.main([str(tmp_path), "--out", str(out)]) == 0
    (row,) = fit.analyse(json.loads((tmp_path / "results.json").read_text()))
    assert row["baseline_ms_per_step"] == pytest.approx(10.0)
    assert row["ms_per_step"] == pytest.approx(10.4) and row["fixed_ms_per_epoch"] == pytest.approx(3.0, abs=1e-6)
    assert row["step_cost"] == pytest.approx(0.04)
    assert row["unmixed_ms_per_step"] == pytest.approx((8 * 10.4 + 3.0) / 8)  # the final epochs: 8 steps each
    assert "| mixtrain | 4 | 6 | 10.00 | 10.40 | 3.0 | +4.0% |" in out.read_text()
    assert fit.main([str(tmp_path / "nowhere")]) == 2


def test_step_profile_smoke(tmp_path):
    # on the CPU the profile sums each operator's own CPU time; the structure is the GPU run's
    bench = load_script("step_profile")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "step_profile.json").read_text())
    assert result["samples_per_pass"] == {"baseline": 1.0, "pairs": 2.0, "quads": 4.0, "k4-unmixed": 1.0}
    ops = result["ops_us"]
    assert all(sum(o.values()) > 0 for o in ops.values())
    # one-slot batches resample in 2-D; several slots render in one 3-D resampling of a K-deep volume
    assert "aten::grid_sampler_2d" in ops["baseline"] and "aten::grid_sampler_3d" not in ops["baseline"]
    assert "aten::grid_sampler_3d" in ops["quads"] and "aten::grid_sampler_2d" not in ops["quads"]
    table = (tmp_path / "step_profile.md").read_text()
    assert "**quads** minus baseline" in table and "| `aten::" in table


def test_oom_check_smoke(tmp_path):
    # on the CPU nothing runs out: the case trains 2 epochs, and its checkpoint is read back
    bench = load_script("oom_check")
    assert bench.main(["--smoke", "--cases", "eval", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "oom_check.json").read_text())
    (row,) = result["cases"]
    assert row["case"] == "eval" and row["exit_code"] == 0 and not row["traceback"] and row["as_described"]
    assert row["checkpoint"] == "loads (weights_only): end of epoch 2"
    assert "--eval-batch-size 64" in row["command"] and "npz:" in row["command"]
    table = (tmp_path / "oom_check.md").read_text()
    assert "| eval | 0 | 0 | no | no |" in table and "benchmarks/oom_check.py --smoke" in table


def test_vit_mask_cost_smoke(tmp_path):
    bench = load_script("vit_mask_cost")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vit_mask_cost.json").read_text())
    (row,) = result["rows"]
    assert row["model"] == "vit_tiny" and row["pooling_ms"] > 0 and row["attention_ms"] > 0
    assert row["ratio"] == pytest.approx(row["attention_ms"] / row["pooling_ms"])
    assert "| vit_tiny | 16 |" in (tmp_path / "vit_mask_cost.md").read_text()
    calls = result["attention_calls"]  # one attention call per mask form and kernel, the model's own shape
    assert {(c["mask"], c["kernel"]) for c in calls} == {(m, k) for m in ("none", "bool", "additive")
                                                         for k in bench.KERNELS}
    assert all((c["heads"], c["head_dim"], c["tokens"], c["depth"]) == (3, 64, 16, 12) for c in calls)
    auto = {c["mask"]: c["ms"] for c in calls if c["kernel"] == "auto"}
    assert all(ms > 0 for ms in auto.values())  # PyTorch's own choice always runs


def test_vit_mask_cost_times_the_mask_the_model_builds():
    """The benchmark's mask is the step's: pair composites split the token grid into two groups
    that attend only within themselves."""
    import torch
    from mixtrain.models import adapt, create_model, separation_mask, token_owner

    bench = load_script("vit_mask_cost")
    model = adapt(create_model("vit_tiny", 10, 3, 32), 32, 3)
    owner = token_owner(bench.pair_pool_masks(model, 6, torch.device("cpu")) > 0)
    assert owner.shape == (6, 64) and set(owner.unique().tolist()) == {0, 1}
    mask = separation_mask(owner)[:, 0]
    assert mask.shape == (6, 64, 64) and bool(mask.diagonal(dim1=1, dim2=2).all())
    sizes = torch.stack([(owner == s).sum(1) for s in (0, 1)], 1)  # tokens per constituent
    assert bool((sizes >= 16).all()) and bool((sizes.sum(1) == 64).all())  # shares clipped to [0.25, 0.75]
    assert torch.equal(mask.sum(2), sizes.gather(1, owner))  # each token sees exactly its own constituent
    assert not bool(mask[owner[:, :, None] != owner[:, None, :]].any())


FAKE_AIRBENCH = '''
import os, torch
logging_columns_list = ["run   ", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]
def print_columns(cols, is_head=False, is_final_entry=False):
    print("".join("|  %s  " % c for c in cols) + "|")
def main(run):  # reads the data files the benchmark wrote, prints its final row as the published script does
    d = torch.load(os.path.join("cifar10", "train.pt"))
    assert d["images"].shape[1:] == (32, 32, 3) and d["images"].dtype == torch.uint8 and len(d["classes"]) == 4
    print_columns(["", "eval", "", "", "", "0.1000" if run == "warmup" else "0.9410", "2.5000"])
if __name__ == "__main__":
    raise SystemExit("the benchmark must not run the script's own loop")
'''


def test_fast_recipe_smoke(tmp_path):
    """Ours (baseline and mixtrain) and a stand-in for the published script, in one call."""
    fake = tmp_path / "airbench94.py"
    fake.write_text(FAKE_AIRBENCH)
    bench = load_script("fast_recipe")
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--reference", str(fake), "--reference-runs", "2", "--out", str(out)]) == 0
    result = json.loads((out / "fast_recipe.json").read_text())
    ref = result["reference"]
    assert ref["exit_code"] == 0 and ref["runs"] == [{"tta_accuracy": 0.941, "seconds": 2.5}] * 2  # warm-up row dropped
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"baseline", "mixtrain(rule=all)"} and not result["skipped"]
    assert runs["mixtrain(rule=all)"]["passes"] < runs["baseline"]["passes"]
    assert (out / "frontier.png").exists() and not (out / "reference_work").exists()
    report = (out / "report.md").read_text()
    assert "Published script" in report and "| baseline | 3 | 1 |" in report and "Time to 94 %" in report


def test_interference_probe_sees_none_through_attention_separation(tmp_path):
    """The probe's anchor: a ViT separated by attention has exactly no interference; the same ViT
    pooling only, and a CNN, have some; the table and the JSON say so."""
    probe = load_script("interference_probe")
    assert probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "interference_probe.json").read_text())["rows"]}
    assert rows["vit_tiny"]["separates_attention"] and not rows["vit_tiny[pooling]"]["separates_attention"]
    for kind in ("pair", "quad"):
        assert rows["vit_tiny"][kind]["leak_median"] < 1e-4 and rows["vit_tiny"][kind]["agree"] == 1.0
        assert rows["vit_tiny[pooling]"][kind]["leak_median"] > 0.01
        assert rows["resnet18"][kind]["leak_median"] > 0.01
    assert "| vit_tiny | 8x8 |" in (tmp_path / "interference_probe.md").read_text()


def test_interference_probe_composites_change_only_the_partner():
    """A pair is A's centre crop left and B's right; a quad is four 2x-downscaled images; each
    region's pooling weights sum to one."""
    import torch

    probe = load_script("interference_probe")
    a, b = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    a[..., 2:6] = 5.0  # A's centre columns
    pair = probe.pair_composite(a, b)
    assert torch.equal(pair[..., :4], a[..., 2:6]) and torch.equal(pair[..., 4:], b[..., 2:6])
    quad = probe.quad_composite([torch.full((1, 3, 8, 8), float(v)) for v in range(4)])
    assert [float(quad[0, 0, y, x]) for y, x in ((0, 0), (0, 7), (7, 0), (7, 7))] == [0.0, 1.0, 2.0, 3.0]
    for kind, k in (("pair", 2), ("quad", 4)):
        m = probe.region_masks((4, 4), kind, 3, "cpu")
        assert m.shape == (3, k, 4, 4) and torch.allclose(m.sum((-2, -1)), torch.ones(3, k))
        assert torch.equal((m[0] > 0).sum(0), torch.ones(4, 4, dtype=torch.long))  # the regions tile the grid


def test_ddp_scaling_variants_name_processes_graph_and_buckets():
    bench = load_script("ddp_scaling")
    assert bench.parse_variant("2") == (2, False, None)
    assert bench.parse_variant("1-eager") == (1, True, None)
    assert bench.parse_variant("2-b100") == (2, False, 100.0)
    for bad in ("0", "2-b", "2-bx", "2-b0", "2-fast"):
        with pytest.raises(SystemExit, match="expected N"):
            bench.parse_variant(bad)
    args = bench.parse_args(["--data", "digits", "--batch", "64"])
    cmd = bench.run_command(args, "2-b50", "mixtrain", 0, "/tmp/x")
    assert cmd[cmd.index("--ddp-bucket-mb") + 1] == "50" and cmd[cmd.index("--batch-size") + 1] == "32"
    assert "--ddp-bucket-mb" not in bench.run_command(args, "2", "mixtrain", 0, "/tmp/x")


def test_interference_probe_reads_a_finished_run(tmp_path):
    """--from-runs probes a run's own trained model: its plain accuracy over the whole test set is
    the run's reported test accuracy (same weights, same normalisation); a folder that is no run
    is one error line."""
    import subprocess
    import sys

    run = tmp_path / "mix"
    subprocess.run([sys.executable, "-m", "mixtrain", "train", "--data", "digits", "--method", "mixtrain", "--epochs", "3",
                    "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--progress", "none", "--out", str(run)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    probe = load_script("interference_probe")
    assert probe.main(["--from-runs", str(run), "--samples", "100000", "--out", str(tmp_path / "p")]) == 0
    (row,) = json.loads((tmp_path / "p" / "interference_probe.json").read_text())["rows"]
    reported = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert row["acc_alone"] == pytest.approx(reported, abs=1e-6) and reported > 0.5
    assert row["model"].startswith("digitnet mixtrain (mix, 3 epochs)") and row["steps"] == 0
    assert 0 < row["pair"]["leak_median"] < 10 and 0 < row["quad"]["leak_median"] < 10
    with pytest.raises(SystemExit, match="^error: --from-runs .*no such run folder"):
        probe.main(["--from-runs", str(tmp_path / "none"), "--out", str(tmp_path / "q")])


def _stage_repo(tmp_path, monkeypatch):
    """A git checkout with one tracked file and a data folder of six incompressible files."""
    import random
    import subprocess

    repo = tmp_path / "repo"
    (repo / "data" / "photos" / "cat").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "README.md").write_text("checkout\n")
    subprocess.run(["git", "add", "README.md"], cwd=repo, check=True)
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text("/data/\n")  # data stays out of the checkout, as here
    rng = random.Random(0)
    files = {f"photos/cat/{i}.jpg": rng.randbytes(40_000) for i in range(6)}
    for name, blob in files.items():
        (repo / "data" / name).write_bytes(blob)
    monkeypatch.chdir(repo)
    return repo, files


def _run_printed_calls(printed, repo, work="true"):
    import subprocess

    commands = [line.split("command: ", 1)[1].replace(" <the work>", f" {work}") for line in printed.splitlines()
                if "command: " in line]
    for cmd in commands:
        subprocess.run(["bash", "-c", cmd], cwd=repo, check=True)
    return commands


def test_stage_parts_splits_folders_into_calls_that_rebuild_them(tmp_path, monkeypatch, capsys):
    import subprocess

    stage = load_script("stage_parts")
    repo, files = _stage_repo(tmp_path, monkeypatch)
    other = tmp_path / "npz"
    other.mkdir()
    (other / "train.npz").write_bytes(b"x" * 70_000)
    (repo / "data" / "linked").symlink_to(other)  # a folder given as a link travels as its content
    dest = tmp_path / "my data"  # a space: the printed commands must quote

    assert stage.main(["data/photos/", "data/linked", "--out", ".stage", "--dest", str(dest),
                       "--part-mib", "0.1"]) == 0
    printed = capsys.readouterr().out
    parts = sorted((repo / ".stage").glob("*/p"))
    total = sum(p.stat().st_size for p in parts)
    assert len(parts) == stage.part_count(total, int(0.1 * 2**20) - stage.BLOCK) >= 3
    assert max(p.stat().st_size for p in parts) <= 0.1 * 2**20
    assert "/.stage/" in (repo / ".git" / "info" / "exclude").read_text()
    assert ".stage" not in subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                                          text=True).stdout
    # run the printed calls in order, as the GPU machine would (the last one's work: `true`)
    assert len(_run_printed_calls(printed, repo)) == len(parts)
    for name, blob in files.items():
        assert (dest / name).read_bytes() == blob
    assert (dest / "linked" / "train.npz").read_bytes() == b"x" * 70_000
    assert not (tmp_path / "my data.parts").exists()

    # staging again replaces its own parts; one part is one call that unpacks at once
    assert stage.main(["data/photos", "--out", ".stage", "--dest", str(tmp_path / "again")]) == 0
    assert sorted(p.relative_to(repo).as_posix() for p in (repo / ".stage").rglob("*")) == [".stage/1", ".stage/1/p"]
    assert len(_run_printed_calls(capsys.readouterr().out, repo)) == 1
    assert (tmp_path / "again" / "photos" / "cat" / "0.jpg").read_bytes() == files["photos/cat/0.jpg"]


def test_stage_parts_sizes_parts_by_what_the_checkout_leaves(tmp_path, monkeypatch, capsys):
    stage = load_script("stage_parts")
    assert stage.disk_usage([1, 4096, 4097]) == 4096 * 4
    assert stage.part_count(100, 50) == 2 and stage.part_count(101, 50) == 3 and stage.part_count(1, 50) == 1
    with pytest.raises(ValueError):
        stage.part_count(100, 0)

    repo, _ = _stage_repo(tmp_path, monkeypatch)
    (repo / "notes.txt").write_text("untracked, not ignored: travels with every call\n")
    checkout = stage.checkout_usage(repo)
    assert checkout == 2 * stage.BLOCK + stage.BLOCK  # two small files, one folder
    monkeypatch.setattr(stage, "CALL_LIMIT", checkout + stage.MARGIN + 100_000)
    assert stage.main(["data/photos", "--out", ".stage"]) == 0
    parts = sorted((repo / ".stage").glob("*/p"))
    assert len(parts) >= 3
    assert all(stage.disk_usage([p.stat().st_size]) + checkout <= stage.CALL_LIMIT - stage.MARGIN for p in parts)
    capsys.readouterr()
    # a --part-mib that cannot fit beside the checkout is refused, not printed as calls that fail
    assert stage.main(["data/photos", "--out", ".stage", "--part-mib", "1"]) == 2
    assert "more than fits" in capsys.readouterr().err


@pytest.mark.parametrize("out", [".", "", "data", "data/photos", "data/photos/deeper", "keep"])
def test_stage_parts_never_deletes_what_it_did_not_write(tmp_path, monkeypatch, capsys, out):
    stage = load_script("stage_parts")
    repo, files = _stage_repo(tmp_path, monkeypatch)
    (repo / "keep").mkdir()
    (repo / "keep" / "mine.txt").write_text("not a part")
    assert stage.main(["data/photos", "--out", out, "--part-mib", "0.1"]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
    assert (repo / "keep" / "mine.txt").read_text() == "not a part" and (repo / ".git").is_dir()
    assert all((repo / "data" / name).read_bytes() == blob for name, blob in files.items())


def test_stage_parts_runs_from_the_repository_root_only(tmp_path, monkeypatch, capsys):
    stage = load_script("stage_parts")
    repo, _ = _stage_repo(tmp_path, monkeypatch)
    monkeypatch.chdir(repo / "data")
    assert stage.main(["photos", "--out", ".stage"]) == 2
    assert "repository's root" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # not a checkout at all
    assert stage.main([str(repo / "data" / "photos"), "--out", ".stage"]) == 2
    assert "repository's root" in capsys.readouterr().err
