"""The schedule simulator, cost models, traces and `schedmoe simulate`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from schedmoe.control.recorder import TraceEvent
from schedmoe.errors import ConfigError
from schedmoe.sim import (Cluster, CostModel, Measurement, Workload, a2a_seconds, calibrate,
                          codec_model, exchange_seconds, load_cluster, load_measurements,
                          log_errors, predict, preset_names, search, simulate)
from schedmoe.tools.trace import chrome_trace, save_gantt

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
    with pytest.raises(ConfigError, match="no cost model"):
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
        [sys.executable, "-m", "schedmoe.tools.cli", "simulate", "--nodes", "2", "--ranks-per-node",
         "4", "--num-experts", "16", "--codecs", "none,fp8", "--degrees", "1,2,4", "--trace",
         str(tmp_path / "t.json"), "--gantt", str(tmp_path / "g.png"), "--json",
         str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sequential (nccl, none, r=1)" in proc.stdout and "speedup" in proc.stdout
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(predictions) == 3 * 2 * 3
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert (tmp_path / "g.png").exists()


def test_interference_slows_only_the_overlapped_part():
    # one chunk is sequential: nothing overlaps, so slowdowns change nothing
    chunk = uniform(1, dispatch_a2a=3.0, combine_a2a=3.0, experts=2.0)
    assert simulate(chunk, compute_slowdown=1.0, comm_slowdown=1.0).makespan == 8.0
    # two chunks, both at half speed while both resources are busy: E^0 (2 s of work) overlaps
    # A1^1 from t=3, so E^0 ends at 3 + 4 = 7 with A1^1 at 2 s of 3; A1^1 alone ends at 8.
    tl = simulate(uniform(2, dispatch_a2a=3.0, combine_a2a=3.0, experts=2.0),
                  compute_slowdown=1.0, comm_slowdown=1.0)
    spans = {(e.task, e.chunk): (e.start, e.end) for e in tl.events}
    assert spans[("experts", 0)] == pytest.approx((3.0, 7.0))
    assert spans[("dispatch.a2a", 1)] == pytest.approx((3.0, 8.0))
    # A2^0 starts at 8 (channel busy until 8), E^1 [8, 12] at half speed with it; A2^0 has
    # 3 s of work: 2 done by 12, then 1 alone: ends 13; A2^1 [13, 16]
    assert spans[("experts", 1)] == pytest.approx((8.0, 12.0))
    assert spans[("combine.a2a", 0)] == pytest.approx((8.0, 13.0))
    assert tl.makespan == pytest.approx(16.0)
    assert simulate(uniform(2, dispatch_a2a=3.0, combine_a2a=3.0, experts=2.0)).makespan == 12.0


def test_nic_shared_by_a_node_and_bus_contention():
    one_nic = Cluster(nodes=4, ranks_per_node=4, nics_per_node=1, intra_latency_us=0,
                      inter_latency_us=0)
    own_nic = Cluster(nodes=4, ranks_per_node=4, nics_per_node=4, intra_latency_us=0,
                      inter_latency_us=0)
    inter_only = Cluster(nodes=4, ranks_per_node=1, nics_per_node=1, inter_latency_us=0,
                         memory_gbyte_s=1e12)
    nbytes = 1.6e9
    # four ranks through one NIC take four times as long between nodes as with a NIC each
    m = nbytes / 16
    assert a2a_seconds(one_nic, "pipe", nbytes) == pytest.approx(
        12 * m / (400 / 8 * 1e9 / 4) + m / 2500e9, rel=1e-9)
    assert a2a_seconds(one_nic, "pipe", nbytes) > 3.9 * a2a_seconds(own_nic, "pipe", nbytes) - \
        1e-3
    assert a2a_seconds(inter_only, "nccl", 4e8) == pytest.approx(3 * 1e8 / 50e9, rel=1e-6)
    # a shared bus: pipe's two sets at once are bounded by their joint bus time
    bus = Cluster(nodes=2, ranks_per_node=4, nics_per_node=1, nic_gbit=800, intra_gbyte_s=100,
                  bus_gbyte_s=10, intra_latency_us=0, inter_latency_us=0, memory_gbyte_s=1e12)
    m = 8e8 / 8
    joint = (2 * 4 * 3 * m + 2 * 4 * 4 * m) / 10e9
    assert a2a_seconds(bus, "pipe", 8e8) == pytest.approx(joint, rel=1e-6)
    assert a2a_seconds(bus, "nccl", 8e8) == pytest.approx(joint, rel=1e-6)  # serial: same


def test_size_dependent_efficiency():
    c = Cluster(nodes=2, ranks_per_node=1, nics_per_node=1, inter_latency_us=0,
                inter_knee_mb=1.0, inter_large_efficiency=0.5, memory_gbyte_s=1e12)
    rate = 400 / 8 * 1e9
    small, large = 2e3, 2e10  # per rank: messages of 1 kB and 10 GB
    assert a2a_seconds(c, "nccl", small) == pytest.approx(1e3 / rate, rel=1e-2)
    assert a2a_seconds(c, "nccl", large) == pytest.approx(1e10 / (0.5 * rate), rel=1e-3)
    flat = Cluster(nodes=2, ranks_per_node=1, inter_large_efficiency=0.5, inter_latency_us=0,
                   memory_gbyte_s=1e12)  # no knee: the same efficiency at every size
    assert a2a_seconds(flat, "nccl", small) == pytest.approx(1e3 / (0.5 * rate), rel=1e-6)


def test_codec_models():
    assert codec_model("zfp").wire_fraction(4, 1024) == 0.25  # 8 bits per fp32 value
    assert codec_model("bf16").wire_fraction(2, 1024) == 1.0
    assert codec_model("int8").wire_fraction(4, 1024) == pytest.approx(0.25 + 4 / 4096)
    assert codec_model("zstd", {"zstd": {"ratio": 2.0}}).wire_fraction(2, 64) == 0.5
    assert codec_model("none").seconds(1e9) == 0.0
    custom = codec_model("lz4", {"lz4": {"ratio": 1.5, "gbyte_s": 3.0, "per_call_us": 7}})
    assert custom.seconds(3e9) == pytest.approx(1.0 + 7e-6)
    with pytest.raises(ConfigError, match="no model of codec 'lz4'"):
        codec_model("lz4")
    with pytest.raises(ConfigError, match="unknown fields"):
        codec_model("zfp", {"zfp": {"speed": 1}})
    # a codec's cost lands in the simulated step: slower zfp, slower step
    w = Workload(dtype_bytes=4)
    fast = Cluster(codecs={"zfp": {"gbyte_s": 100.0}})
    slow = Cluster(codecs={"zfp": {"gbyte_s": 1.0}})
    assert predict(w, slow, "nccl", "zfp", 1).seconds > predict(w, fast, "nccl", "zfp", 1).seconds


def test_backward_cost_is_configurable():
    w = Workload(tokens=1024, model_dim=1024, hidden_dim=4096, num_experts=32)
    c2, c3 = Cluster(backward_factor=2.0), Cluster(backward_factor=3.0)
    e2 = predict(w, c2, "nccl", "none", 1).backward.busy("compute")
    e3 = predict(w, c3, "nccl", "none", 1).backward.busy("compute")
    assert e3 > 1.4 * e2


def test_presets_load_and_bad_files_say_what_is_wrong(tmp_path):
    assert {"h100-nvlink", "schemoe-testbed", "emulated-2x2", "emulated-2x1"} <= \
        set(preset_names())
    for name in preset_names():
        c = load_cluster(name)
        assert c.name == name and c.world >= 2
    testbed = load_cluster("schemoe-testbed")
    assert (testbed.nodes, testbed.ranks_per_node, testbed.nics_per_node) == (8, 4, 1)
    with pytest.raises(ConfigError, match="no cluster preset 'dgx9'"):
        load_cluster("dgx9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": 2, "nic_gbits": 100}))
    with pytest.raises(ConfigError, match="unknown fields.*nic_gbits"):
        load_cluster(str(bad))
    bad.write_text(json.dumps({"nodes": 0}))
    with pytest.raises(ConfigError, match="nodes must be >= 1"):
        load_cluster(str(bad))
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_cluster(str(bad))


def test_2dh_pays_off_only_at_large_scale():
    """Tutel's finding on the H100 preset: flat wins on a few nodes, 2dh on hundreds of GPUs."""
    h100 = load_cluster("h100-nvlink")

    def ratio(nodes: int) -> float:
        c = dataclasses.replace(h100, nodes=nodes)
        nbytes = 4096 * 2 * 4096 * 2  # 4,096 tokens, top-2, M 4,096, bf16
        return exchange_seconds(c, "nccl", nbytes) / exchange_seconds(c, "2dh", nbytes)
    assert ratio(2) < 1.0 and ratio(4) < 1.0
    assert ratio(256) > 1.5


def _synthetic_records(cluster: Cluster) -> list[Measurement]:
    records = []
    for tokens, m, h in ((256, 256, 512), (1024, 512, 256), (512, 256, 1024)):
        w = Workload(tokens=tokens, model_dim=m, hidden_dim=h, num_experts=8, dtype_bytes=4)
        for a in ("nccl", "pipe"):
            for codec in ("none", "int8"):
                for r in (1, 4):
                    records.append(Measurement(w, a, codec, r,
                                               predict(w, cluster, a, codec, r).seconds))
    return records


def test_calibration_recovers_the_constants_that_made_the_measurements():
    truth = Cluster(nodes=2, ranks_per_node=2, nics_per_node=1, nic_gbit=1.0,
                    gemm_tflops=0.05, memory_gbyte_s=5.0, task_overhead_us=100.0,
                    compute_slowdown=0.3, codecs={"int8": {"gbyte_s": 0.8}})
    records = _synthetic_records(truth)
    start = Cluster(nodes=2, ranks_per_node=2, nics_per_node=1, nic_gbit=5.0,
                    gemm_tflops=0.2, memory_gbyte_s=5.0, task_overhead_us=10.0)
    assert max(abs(e) for e in log_errors(start, records)) > 0.5
    fitted = calibrate(start, records, fit=["nic_gbit", "gemm_tflops", "task_overhead_us",
                                            "compute_slowdown", "codecs.int8.gbyte_s"])
    assert max(abs(e) for e in log_errors(fitted, records)) < 0.02
    assert fitted.nic_gbit == pytest.approx(1.0, rel=0.05)
    assert fitted.gemm_tflops == pytest.approx(0.05, rel=0.05)
    assert fitted.codecs["int8"]["gbyte_s"] == pytest.approx(0.8, rel=0.1)


def test_load_measurements_formats(tmp_path):
    w = {"tokens": 256, "model_dim": 64, "hidden_dim": 64, "top_k": 2, "capacity_factor": 1.0}
    bench = {"rows": [{"workload": w, "ms": {"sequential": 9.0, "nccl r=2": 10.0,
                                              "pipe r=4": 8.0}}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    records = load_measurements(tmp_path / "bench.json")
    assert [(m.algorithm, m.degree, m.seconds) for m in records] == [("nccl", 2, 0.01),
                                                                      ("pipe", 4, 0.008)]
    w0 = records[0].workload
    assert (w0.num_experts, w0.dtype_bytes, w0.ragged, w0.model_dim) == (8, 4, True, 64)
    records = load_measurements(tmp_path / "bench.json", workload_defaults={"top_k": 1})
    assert records[0].workload.top_k == 2  # the record's own value wins
    layouts = {"layouts": {"a": {"records": [{"workload": w, "algorithm": "2dh", "codec": "bf16",
                                              "degree": 1, "ms": 5.0}]}, "b": {"records": []}}}
    (tmp_path / "multi.json").write_text(json.dumps(layouts))
    with pytest.raises(ConfigError, match="choose one"):
        load_measurements(tmp_path / "multi.json")
    assert load_measurements(tmp_path / "multi.json", "a")[0].codec == "bf16"
    (tmp_path / "broken.json").write_text(json.dumps([{"workload": w, "degree": 1}]))
    with pytest.raises(ConfigError, match="lacks"):
        load_measurements(tmp_path / "broken.json")


def test_simulate_cli_preset_calibrate_and_save(tmp_path):
    truth = Cluster(nodes=2, ranks_per_node=2, nics_per_node=1, nic_gbit=1.0,
                    gemm_tflops=0.05, memory_gbyte_s=5.0, task_overhead_us=100.0)
    records = [{"workload": vars(m.workload), "algorithm": m.algorithm, "codec": m.codec,
                "degree": m.degree, "ms": 1e3 * m.seconds} for m in _synthetic_records(truth)]
    (tmp_path / "m.json").write_text(json.dumps(records))
    proc = subprocess.run(
        [sys.executable, "-m", "schedmoe.tools.cli", "simulate", "--cluster", "emulated-2x2",
         "--calibrate", str(tmp_path / "m.json"), "--save-cluster", str(tmp_path / "c.json"),
         "--nodes", "8", "--num-experts", "16", "--degrees", "1,2", "--codecs", "none,int8"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated on 24 measured steps" in proc.stdout and "8 nodes x 2 ranks" in proc.stdout
    saved = load_cluster(str(tmp_path / "c.json"))
    assert saved.nodes == 8 and "calibrated" in saved.name
    proc = subprocess.run([sys.executable, "-m", "schedmoe.tools.cli", "simulate", "--cluster",
                           str(tmp_path / "missing.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_skewed_load_and_its_placement_set_the_slowest_rank():
    """A Zipf-skewed load (one expert per rank among 8 ranks): static placement leaves the
    hottest expert's rank the slowest; planned placement with a replica slot a rank evens it."""
    from schedmoe.sim import Cluster, Workload, predict

    cluster = Cluster(nodes=2, ranks_per_node=4)
    load = tuple(1.0 / (i + 1) ** 1.2 for i in range(16))
    base = dict(tokens=2048, model_dim=1024, hidden_dim=2048, num_experts=16,
                capacity_factor=0.0, ragged=True)
    balanced = Workload(**base)
    static = Workload(**base, expert_load=load)
    planned = Workload(**base, expert_load=load, placement="planned")
    replicated = Workload(**base, expert_load=load, placement="planned", redundant=1)
    skews = [w.skew(cluster.world, 4) for w in (balanced, static, planned, replicated)]
    assert skews[0] == 1.0 and skews[1] > skews[2] > skews[3] >= 1.0
    assert skews[3] < 1.15  # replicas of the hot experts even the ranks
    steps = [predict(w, cluster, "nccl", "none", 2).seconds
             for w in (balanced, static, replicated)]
    assert steps[1] > 1.5 * steps[0] and steps[2] < 1.2 * steps[0]
    padded = Workload(**{**base, "capacity_factor": 1.25, "ragged": False}, expert_load=load)
    assert padded.skew(cluster.world) == 1.0  # a capacity drops the excess instead
    with pytest.raises(ConfigError, match="one per expert"):
        Workload(**base, expert_load=(1.0, 2.0)).validate()
    with pytest.raises(ConfigError, match="planned"):
        Workload(**base, expert_load=load, redundant=1).validate()


def test_simulate_cli_takes_the_load_of_a_train_run(tmp_path):
    """`schedmoe simulate --expert-load RECORD.json`: the first layer's load of a
    `schedmoe train --json` record, asked about static and planned placements."""
    record = tmp_path / "train.json"
    tokens = [900.0, 100.0] + [50.0] * 14
    record.write_text(json.dumps({"load": {"blocks.0.moe": {"tokens": tokens}}}))
    said = {}
    for placement in ("static", "planned"):
        extra = ["--redundant", "1"] if placement == "planned" else []
        proc = subprocess.run(
            [sys.executable, "-m", "schedmoe.tools.cli", "simulate", "--nodes", "2",
             "--ranks-per-node", "4", "--num-experts", "16", "--capacity-factor", "0",
             "--ragged", "true", "--expert-load", str(record), "--placement", placement,
             "--degrees", "1", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        said[placement] = float(proc.stdout.split("the busiest rank gets ")[1].split("x")[0])
    assert said["static"] > 3 and said["planned"] < 1.2
    bad = subprocess.run([sys.executable, "-m", "schedmoe.tools.cli", "simulate",
                          "--expert-load", "1,x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected numbers" in bad.stderr
