"""The emulated cluster: runs a real multi-node job under root, explains itself otherwise."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from schedmoe.tools import emulate

REASON = emulate.can_emulate()


def test_non_root_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(emulate.EmulationError, match="needs root"):
        with emulate.EmulatedCluster(emulate.ClusterSpec()):
            pass


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("smoe")}


@pytest.mark.skipif(REASON is not None, reason=f"cannot emulate a cluster here: {REASON}")
@pytest.mark.parametrize("a2a", ["pipe", "2dh"])
def test_bench_on_emulated_two_nodes(tmp_path, a2a):
    before = namespaces()
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "schedmoe.tools.cli", "bench", "--emulate-nodes", "2", "--ranks", "2",
         "--inter-node-rate", "500mbit", "--tokens", "64", "--model-dim", "32",
         "--hidden-dim", "64", "--num-experts", "4", "--steps", "2", "--warmup", "1",
         "--a2a", a2a, "--json", str(out), "--timeout", "120"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "emulated 2 nodes x 2 ranks at 500mbit" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 4 and summary["config"]["a2a"] == a2a
    assert namespaces() == before, "the emulated cluster left namespaces behind"


@pytest.mark.skipif(REASON is not None, reason=f"cannot emulate a cluster here: {REASON}")
def test_failed_node_is_reported_and_cleaned_up():
    before = namespaces()
    with pytest.raises(emulate.EmulationError, match="node 0 exited"):
        with emulate.EmulatedCluster(emulate.ClusterSpec(nodes=2, ranks_per_node=1)) as c:
            assert len(namespaces() - before) == 3  # two nodes and the switch
            c.launch(["schedmoe.no_such_module"], timeout=60)
    assert namespaces() == before


def intervals(trace: dict, name_start: str) -> list[tuple[float, float, str]]:
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace["traceEvents"]
            if e.get("ph") == "X" and e["name"].startswith(name_start)]


@pytest.mark.skipif(REASON is not None, reason=f"cannot emulate a cluster here: {REASON}")
def test_pipelined_trace_overlaps_a2a_with_experts(tmp_path):
    """Chunk i+1's exchanges are in flight while chunk i's experts run, forward and backward."""
    prefix = tmp_path / "trace"
    proc = subprocess.run(
        [sys.executable, "-m", "schedmoe.tools.cli", "bench", "--emulate-nodes", "2", "--ranks", "2",
         "--inter-node-rate", "500mbit", "--tokens", "256", "--model-dim", "64",
         "--hidden-dim", "128", "--num-experts", "4", "--steps", "1", "--warmup", "1",
         "--scheduler", "pipeline", "--degree", "3", "--trace", str(prefix),
         "--timeout", "120"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads(prefix.with_suffix(".json").read_text())
    assert prefix.with_suffix(".png").stat().st_size > 0
    for a2a, experts in (("dispatch.a2a", "experts["), ("combine.bwd.a2a", "experts.bwd[")):
        overlapping = {(x[2], y[2]) for x in intervals(trace, a2a)
                       for y in intervals(trace, experts) if x[0] < y[1] and y[0] < x[1]}
        assert overlapping, f"no {a2a} interval overlaps an {experts} interval"


@pytest.mark.skipif(REASON is not None, reason=f"cannot emulate a cluster here: {REASON}")
def test_pinned_nodes_run_on_cores_of_their_own(tmp_path):
    """2 nodes x 1 rank with pin_cores: each node's rank sees only its share of the cores."""
    (tmp_path / "affinity_probe.py").write_text(
        "import os\nprint('cores', sorted(os.sched_getaffinity(0)))\n")
    spec = emulate.ClusterSpec(nodes=2, ranks_per_node=1, pin_cores=True)
    with emulate.EmulatedCluster(spec) as c:
        outputs = c.launch(["affinity_probe"], timeout=60, env={"PYTHONPATH": str(tmp_path)})
    seen = [ast.literal_eval(line.split("cores", 1)[1]) for out in outputs
            for line in out.splitlines() if line.startswith("cores")]
    assert seen == [spec.cores(0), spec.cores(1)]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(seen[0]) & set(seen[1]), "two nodes share a core"
