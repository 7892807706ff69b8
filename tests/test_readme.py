"""The README's own-loop example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(name: str = "own-loop") -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example:{name} -->\s*```python\n(.*?)```\s*<!-- /example -->", text, re.S)
    assert m, f"README lost its {name} example"
    return m.group(1)


def test_readme_own_loop_example_trains(capsys):
    ns: dict = {}
    exec(compile(_example(), str(README), "exec"), ns)
    acc = ns["acc"]
    assert acc > 0.8  # chance is 0.1
    assert ns["samples"] == 5 * ns["data"].num_train  # every sample once per epoch
    assert ns["passes"] < 0.9 * ns["samples"]  # mixed epochs pack samples together
    assert "test accuracy" in capsys.readouterr().out


def test_readme_dataloader_example_trains_from_a_torchvision_style_dataset(capsys):
    """The DataLoader-native loop: a map-style dataset with torchvision transforms, two loader
    workers, mixtrain's batch sampler, compose and loss; it learns and it mixes."""
    ns: dict = {}
    exec(compile(_example("dataloader"), str(README), "exec"), ns)
    assert ns["acc"] > 0.8  # chance is 0.1
    assert ns["samples"] == 5 * len(ns["train_set"])  # every sample once per epoch
    assert ns["passes"] < 0.9 * ns["samples"]  # mixed epochs pack samples together
    loss, _ = ns["mixer"].strategy.memory.snapshot()
    assert len(loss) == len(ns["train_set"]) and (loss == loss).all()  # every sample's loss recorded (no NaN)
    assert "test accuracy" in capsys.readouterr().out


def test_readme_opens_with_the_two_setup_commands():
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [l for l in block.splitlines() if l.strip()]
    assert len(lines) == 2
    assert "mixtrain demo" in lines[0] and "pip install -e ." in lines[0]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = lines[1].split("#")[0].strip()
    assert test_cmd in ci  # CI runs exactly the README's test command
