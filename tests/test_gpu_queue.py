"""benchmarks/gpu_queue.py: the queue file is read as documented and bad lines are refused."""

import importlib.util
import os
import pathlib

import pytest

spec = importlib.util.spec_from_file_location("gpu_queue", pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_queue.py")
gpu_queue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_queue)


def test_queue_lines_and_refusals(tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("# a comment\n\n0 r50 --model resnet50 --methods 'baseline,mixtrain(step_scale=sqrt)'  # why\n"
                 "any extra --model resnet18\n")
    assert gpu_queue.read_queue(str(q)) == [
        ("0", "r50", ["--model", "resnet50", "--methods", "baseline,mixtrain(step_scale=sqrt)"]),
        ("any", "extra", ["--model", "resnet18"])]
    for bad, says in (("gpu0 x --model a", "expected 'GPU NAME"), ("0 x", "expected 'GPU NAME"),
                      ("1 x --model a --resume", "--resume is set by this script"),
                      ("1 x --out=/tmp/y", "--out is set by this script"),
                      ("1 x --stop-a 30", "--stop-after is set by this script"),  # an abbreviation argparse accepts
                      ("1 x --devices=cuda:0,cuda:1", "--devices is set by this script"),
                      ("1 x --no-such-flag 3", "do not parse"),
                      ("1 x --methods 'mixtrain(confidense=0.4)'", "not KEY=VALUE"),
                      ("1 x --methods 'mixtrain(confidence=1.5)'", "confidence"),
                      ("1 x --epochs 3O", "epochs"),
                      ("1 a/b --model a", "plain folder name"),
                      ("0 x --model a\n1 x --model b", "the name x is used twice")):
        q.write_text(bad + "\n")
        with pytest.raises(SystemExit, match=says):
            gpu_queue.read_queue(str(q))


def test_tar_of_the_work_folder_leaves_out_weights(tmp_path):
    import tarfile

    work = tmp_path / "w"
    (work / "bench" / "runs" / "r").mkdir(parents=True)
    (work / "bench" / "results.json").write_text("{}")
    (work / "bench" / "runs" / "r" / "checkpoint.pt").write_bytes(b"x" * 100)
    (work / "bench.log").write_text("log")
    gpu_queue.write_tar(str(work), str(tmp_path / "w.tar"))
    with tarfile.open(tmp_path / "w.tar") as tar:
        names = set(tar.getnames())
    assert {"bench/results.json", "bench.log"} <= names and not any(n.endswith(".pt") for n in names)
    assert not (tmp_path / "w.tar.tmp").exists()


def test_tar_while_another_bench_replaces_its_files(tmp_path):
    """A bench on the other GPU rewrites its results (temporary file, then rename) while the tar is
    written: the tar never fails and never holds a temporary file."""
    import tarfile
    import threading

    work = tmp_path / "w"
    (work / "b").mkdir(parents=True)
    stop = threading.Event()

    def rewrite():
        i = 0
        while not stop.is_set():
            tmp = work / "b" / "results.json.tmp"
            tmp.write_text("x" * (1000 + i % 7))
            os.replace(tmp, work / "b" / "results.json")
            i += 1

    t = threading.Thread(target=rewrite)
    t.start()
    try:
        for _ in range(100):
            gpu_queue.write_tar(str(work), str(tmp_path / "w.tar"))
    finally:
        stop.set()
        t.join()
    with tarfile.open(tmp_path / "w.tar") as tar:
        assert not any(n.endswith(".tmp") for n in tar.getnames())
        for m in tar.getmembers():  # every entry whole: its size is what was written
            assert set(tar.extractfile(m).read().decode()) == {"x"}


def test_a_bench_pinned_to_a_gpu_not_used_is_refused(tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("any late --model resnet18\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "late.gpu").write_text("2")
    with pytest.raises(SystemExit, match="late was started on GPU 2, which is not among the GPUs used"):
        gpu_queue.main([str(q), "--seconds", "1", "--work", str(tmp_path / "w"), "--gpus", "0,1"])


def test_physical_gpu_follows_the_parents_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_queue.physical_gpu("1") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_queue.physical_gpu("1") == "1"


def test_runs_left_counts_what_a_bench_planned_and_has_not_finished(tmp_path):
    import json

    args = ["--methods", "baseline,mixtrain", "--epochs", "30,60", "--seeds", "2,2", "--model", "resnet50"]
    assert gpu_queue.planned_runs(args) == 4  # 2 methods x 2 schedules x 1 seed
    out = tmp_path / "b"
    assert gpu_queue.runs_left(str(out), args) == 4  # no folder yet
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"runs": [{"key": "baseline-e30-s2"}, {"key": "mixtrain-e30-s2"}],
                                                  "diverged": [{"key": "baseline-e60-s2"}]}))
    assert gpu_queue.runs_left(str(out), args) == 1  # a diverged run is finished too (not retried)
    assert gpu_queue.runs_left(str(out), ["--methods", "baseline", "--seeds", "1"]) == 0
