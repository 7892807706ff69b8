"""The README's own-loop example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example:own-loop -->\s*```python\n(.*?)```\s*<!-- /example -->", text, re.S)
    assert m, "README lost its own-loop example"
    return m.group(1)


def test_readme_own_loop_example_trains(capsys):
    ns: dict = {}
    exec(compile(_example(), str(README), "exec"), ns)
    acc = ns["acc"]
    assert acc > 0.8  # chance is 0.1
    assert ns["samples"] == 5 * ns["data"].num_train  # every sample once per epoch
    assert ns["passes"] < 0.9 * ns["samples"]  # mixed epochs pack samples together
    assert "test accuracy" in capsys.readouterr().out


def test_readme_opens_with_the_two_setup_commands():
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [l for l in block.splitlines() if l.strip()]
    assert len(lines) == 2
    assert "mixtrain demo" in lines[0] and "pip install -e ." in lines[0]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = lines[1].split("#")[0].strip()
    assert test_cmd in ci  # CI runs exactly the README's test command
