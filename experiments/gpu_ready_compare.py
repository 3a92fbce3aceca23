"""`schedmoe bench` before and after the GPU-ready hot path (issue 25): the default layer
(ragged rows, sequential, no codec) and a pipelined bf16 one, 4 gloo ranks, the two trees
interleaved, medians of the repetitions.

    git worktree add /tmp/before bc28b04        # the last commit before the change
    python3 experiments/gpu_ready_compare.py --before /tmp/before

Writes experiments/results/gpu_ready/compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "experiments" / "results" / "gpu_ready"
CONFIGS = {"default": [], "pipeline-bf16": ["--scheduler", "pipeline", "--compressor", "bf16"]}
BENCH = ("import sys; from schedmoe.tools.cli import main; "
         "sys.argv = ['schedmoe', 'bench', *sys.argv[1:]]; sys.exit(main())")


def bench(tree: Path, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-c", BENCH, *args, "--json", str(path)],
                       env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tmp, check=True,
                       capture_output=True, timeout=900)
        return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the old tree")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    runs = {(config, name): [] for config in CONFIGS for name in trees}
    for _ in range(args.repeats):
        for config, extra in CONFIGS.items():
            for name, tree in trees.items():  # interleaved
                runs[(config, name)].append(bench(tree, extra))
    result: dict = {}
    for config in CONFIGS:
        entry = result[config] = {}
        for name in trees:
            measured = runs[(config, name)]
            entry[name] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
                "tokens_per_s_runs": [r["tokens_per_s"] for r in measured],
                "step_ms": statistics.median(r["step_ms"] for r in measured),
            }
        entry["ratio_after_over_before"] = (entry["after"]["tokens_per_s"]
                                            / entry["before"]["tokens_per_s"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(result, indent=2))
    _plot(result)
    for config, entry in result.items():
        print(f"{config}: before {entry['before']['tokens_per_s']:.0f}, after "
              f"{entry['after']['tokens_per_s']:.0f} tokens/s "
              f"(ratio {entry['ratio_after_over_before']:.3f}; runs "
              f"{entry['before']['tokens_per_s_runs']} / {entry['after']['tokens_per_s_runs']})")


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.4
    for i, name in enumerate(("before", "after")):
        ax.bar([k + i * width for k in range(len(result))],
               [entry[name]["tokens_per_s"] for entry in result.values()], width, label=name)
    ax.set_xticks([k + width / 2 for k in range(len(result))], list(result))
    ax.set_ylabel("tokens/s (median of runs, 4 gloo ranks)")
    ax.set_title("schedmoe bench before / after the GPU-ready hot path")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "compare.png", dpi=100)


if __name__ == "__main__":
    main()
