"""The README's usage example runs as written."""

import re
from pathlib import Path


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
