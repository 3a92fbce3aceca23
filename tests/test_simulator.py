"""The schedule simulator, cost models, traces and `schedmoe simulate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schedmoe.recorder import TraceEvent
from schedmoe.simulator import (CostModel, Cluster, Workload, a2a_seconds, predict,
                                search, simulate)
from schedmoe.trace import chrome_trace, save_gantt

TASKS = ["dispatch.compress", "dispatch.a2a", "dispatch.decompress", "experts",
         "combine.compress", "combine.a2a", "combine.decompress"]


def uniform(r: int, **costs: float) -> list[dict[str, float]]:
    return [{t: costs.get(t.replace(".", "_"), 0.0) for t in TASKS} for _ in range(r)]


def test_one_chunk_is_the_sum_of_its_tasks():
    chunk = {t: i + 1.0 for i, t in enumerate(TASKS)}
    tl = simulate([chunk])
    assert tl.makespan == sum(chunk.values())
    assert [e.task for e in tl.events] == ["dispatch.compress", "dispatch.a2a",
                                           "dispatch.decompress", "experts", "combine.compress",
                                           "combine.a2a", "combine.decompress"]


def test_two_chunks_by_hand():
    # a2a 3 s, experts 2 s, coding 0: A1 [0,3] [3,6]; E0 [3,5]; A2^0 [6,9] (channel busy until
    # 6); E1 [6,8]; A2^1 [9,12]; makespan 12 (sequential would be 3+2+3 per chunk = 16).
    chunks = uniform(2, dispatch_a2a=3.0, combine_a2a=3.0, experts=2.0)
    tl = simulate(chunks)
    spans = {(e.task, e.chunk): (e.start, e.end) for e in tl.events}
    assert spans[("dispatch.a2a", 1)] == (3.0, 6.0)
    assert spans[("experts", 0)] == (3.0, 5.0)
    assert spans[("combine.a2a", 0)] == (6.0, 9.0)
    assert spans[("experts", 1)] == (6.0, 8.0)
    assert spans[("combine.a2a", 1)] == (9.0, 12.0)
    assert tl.makespan == 12.0
    assert tl.overlap_efficiency == pytest.approx(12.0 / 12.0)


def test_dispatch_a2as_go_before_any_combine_a2a():
    tl = simulate(uniform(4, dispatch_a2a=1.0, combine_a2a=1.0, experts=0.1,
                          dispatch_compress=0.2, combine_compress=0.2))
    comm = [e.task for e in sorted(tl.events, key=lambda e: e.start) if e.stream == "comm"]
    assert comm == ["dispatch.a2a"] * 4 + ["combine.a2a"] * 4


def test_cost_model_fit():
    sizes = [1e3, 1e4, 1e5, 1e6]
    model = CostModel.fit(sizes, [2e-4 + 3e-9 * n for n in sizes])
    assert model.alpha == pytest.approx(2e-4) and model.beta == pytest.approx(3e-9)
    assert model.r2(sizes, [model(n) for n in sizes]) == pytest.approx(1.0)
    assert CostModel.fit([1, 2], [5.0, 1.0]).beta == 0.0  # never negative
    assert CostModel.fit([1, 2], [0.0, 4.0]).alpha == 0.0


def test_a2a_models_order_as_papers_say():
    cluster = Cluster(nodes=4, ranks_per_node=8)
    for nbytes in (1e5, 1e7, 1e9):
        assert a2a_seconds(cluster, "pipe", nbytes) <= a2a_seconds(cluster, "nccl", nbytes)
    single = Cluster(nodes=1, ranks_per_node=4)
    assert a2a_seconds(single, "pipe", 1e8) == pytest.approx(a2a_seconds(single, "nccl", 1e8))
    with pytest.raises(ValueError, match="no cost model"):
        a2a_seconds(cluster, "smoke-signals", 1.0)


def test_search_prefers_pipelining_when_comm_and_compute_balance():
    ranked = search(Workload(), Cluster(), degrees=[1, 2, 4, 8])
    assert ranked[0].seconds <= predict(Workload(), Cluster(), "nccl", "none", 1).seconds
    assert ranked[0].degree > 1
    assert ranked == sorted(ranked)


def test_chrome_trace_and_gantt(tmp_path):
    events = [TraceEvent("dispatch.a2a", 0, "comm", 0.0, 0.5),
              TraceEvent("experts", 0, "compute", 0.5, 0.7)]
    trace = chrome_trace({"measured": events, "simulated": events})
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 4 and spans[0]["dur"] == pytest.approx(5e5)
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"} \
        == {"measured", "simulated"}
    save_gantt({"measured": events}, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_simulate_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "schedmoe.cli", "simulate", "--nodes", "2", "--ranks-per-node",
         "4", "--num-experts", "16", "--codecs", "none,fp8", "--degrees", "1,2,4", "--trace",
         str(tmp_path / "t.json"), "--gantt", str(tmp_path / "g.png"), "--json",
         str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sequential (nccl, none, r=1)" in proc.stdout and "speedup" in proc.stdout
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(predictions) == 3 * 2 * 3
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert (tmp_path / "g.png").exists()
