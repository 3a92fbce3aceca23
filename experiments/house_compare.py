"""The package before and after its reorganisation (issue 24): `schedmoe bench` (default layer,
4 gloo ranks) and `import schedmoe`, interleaved, medians of the repetitions.

    git worktree add /tmp/before 0637aa1        # the last commit before the reorganisation
    python3 experiments/house_compare.py --before /tmp/before

Writes experiments/results/house/compare.json and compare.png.
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
OUT = HERE / "experiments" / "results" / "house"
# The entry point moved from schedmoe.cli to schedmoe.tools.cli.
BENCH = ("import sys; sys.argv = ['schedmoe', 'bench', '--json', sys.argv[1]]\n"
         "try:\n    from schedmoe.tools.cli import main\n"
         "except ImportError:\n    from schedmoe.cli import main\n"
         "sys.exit(main())")
IMPORT = ("import sys, time; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
          "import schedmoe; t2 = time.perf_counter(); "
          "print(t1 - t, t2 - t1, sum(m.startswith('schedmoe') for m in sys.modules), "
          "len(sys.modules))")


def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree))


def bench(tree: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-c", BENCH, str(path)], env=_env(tree), cwd=tmp,
                       check=True, capture_output=True, timeout=900)
        return json.loads(path.read_text())


def import_time(tree: Path) -> tuple[float, float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", IMPORT], env=_env(tree), cwd=tmp,
                             check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]), int(out[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the old tree")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    imports: dict[str, list] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():  # interleaved
            runs[name].append(bench(tree))
            for _ in range(2):
                imports[name].append(import_time(tree))
    result = {}
    for name in trees:
        ops = sorted({op for run in runs[name] for op in run["op_ms"]})
        result[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[name]),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in runs[name]],
            "step_ms": statistics.median(r["step_ms"] for r in runs[name]),
            "op_ms": {op: statistics.median(r["op_ms"].get(op, 0.0) for r in runs[name])
                      for op in ops},
            "import_torch_s": statistics.median(i[0] for i in imports[name]),
            "import_schedmoe_after_torch_s": statistics.median(i[1] for i in imports[name]),
            "schedmoe_modules": imports[name][0][2],
            "modules_total": imports[name][0][3],
        }
    result["tokens_per_s_ratio_after_over_before"] = (result["after"]["tokens_per_s"]
                                                      / result["before"]["tokens_per_s"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(result, indent=2))
    _plot(result)
    for name in trees:
        r = result[name]
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_ms']:.1f} ms, import "
              f"schedmoe {r['import_schedmoe_after_torch_s']:.2f} s after torch, "
              f"{r['schedmoe_modules']} schedmoe modules")


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in result["after"]["op_ms"] if op in result["before"]["op_ms"]
           or op == "experts.bwd"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.4
    for i, name in enumerate(("before", "after")):
        ax.bar([k + i * width for k in range(len(ops))],
               [result[name]["op_ms"].get(op, 0.0) for op in ops], width, label=name)
    ax.set_xticks([k + width / 2 for k in range(len(ops))], ops, rotation=60, ha="right")
    ax.set_ylabel("median ms per step (rank 0)")
    ax.set_title("schedmoe bench before / after the reorganisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "compare.png", dpi=100)


if __name__ == "__main__":
    main()
