"""The README's code blocks run as written: every python block (those headed
`# torchrun ... FILE.py` saved as FILE.py and run by that command), every shell line (the pip
and pytest commands aside: CI runs exactly those), and the TOML block parses."""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = [(lang, body, README[:m.start()].count("\n") + 1)
          for m in re.finditer(r"```(\w+)\n(.*?)```", README, re.S)
          for lang, body in [(m.group(1), m.group(2))]]


def _blocks(lang: str) -> list:
    return [pytest.param(body, id=f"line-{line}") for kind, body, line in BLOCKS
            if kind == lang]


def _run(command: list[str] | str, cwd: Path, timeout: float = 400) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, shell=isinstance(command, str),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_readme_usage_example_runs(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "class Block" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    block, y = namespace["block"], namespace["y"]
    assert y.shape == (2, 16, 64)
    assert block.moe.experts.w1_EMH.grad is not None
    assert "LayerStats" in capsys.readouterr().out


@pytest.mark.parametrize("body", _blocks("python"))
def test_every_python_block_runs(body, tmp_path):
    if "transformers" in body:
        pytest.importorskip("transformers")
    first = body.splitlines()[0]
    if first.startswith("# torchrun"):
        command = shlex.split(first.lstrip("# "))
        (tmp_path / command[-1]).write_text(body)
        _run(command, tmp_path)
    else:
        _run([sys.executable, "-c", body], tmp_path)


def _shell_lines(body: str) -> list[str]:
    """The commands of a shell block, comments cut, pip installs and the test run left out."""
    lines = []
    for line in body.splitlines():
        line = re.split(r"\s+#", line)[0].strip()
        parts = [p.strip() for p in line.split("&&")
                 if p.strip() and "pip install" not in p and "pytest" not in p]
        if parts:
            lines.append(" && ".join(parts))
    return lines


@pytest.mark.parametrize("body", _blocks("bash"))
def test_every_shell_line_runs(body, tmp_path):
    for line in _shell_lines(body):  # in order, in one directory: a resume follows its run
        _run(line, tmp_path)


def test_the_shell_blocks_leave_out_only_installs_and_the_test_run():
    every = [line for _, body, _ in BLOCKS for line in body.splitlines() if line.strip()]
    kept = [line for kind, body, _ in BLOCKS if kind == "bash" for line in _shell_lines(body)]
    assert "schedmoe bench" in kept and len(kept) >= 5, kept
    assert sum("pytest" in line for line in every) == 1


@pytest.mark.parametrize("body", _blocks("toml"))
def test_toml_blocks_parse(body):
    assert tomllib.loads(body)
