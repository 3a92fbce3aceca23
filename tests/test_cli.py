"""`schedmoe bench` end to end, on small sizes."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_prints_table_and_saves_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "schedmoe.tools.cli", "bench", "--ranks", "2", "--tokens", "64",
         "--model-dim", "32", "--hidden-dim", "64", "--num-experts", "4", "--steps", "3",
         "--warmup", "1", "--capacity-factor", "0.5", "--json", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "median ms" in proc.stdout and "experts" in proc.stdout
    assert "tokens/s" in proc.stdout and "dropped:" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert len(summary["per_rank"][0]["steps"]) == 3
    # capacity factor 0.5 with top-2: C = ceil(0.5 * 2 * 64 / 4) = 16 slots per expert, so at
    # most 64 of the 128 pairs per rank fit and at least half are dropped.
    assert summary["capacity"] == 16
    for rank in summary["per_rank"]:
        for step in rank["steps"]:
            assert step["processed"] + step["dropped"] == 64 * 2
            assert step["dropped"] >= 64
    assert summary["tokens_per_s"] > 0


def test_bench_rejects_bad_option():
    proc = subprocess.run([sys.executable, "-m", "schedmoe.tools.cli", "bench", "--top-k", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
