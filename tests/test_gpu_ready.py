"""What a GPU step depends on, checked on the CPU: host syncs per call (counted by the package's
auditor, tools/syncs.py), payload checks read later instead of on the hot path, a recorder that
never synchronises the device, collectives whose refusals are not reported as dead peers,
gradient chunks issued in program order whatever the timing, and torch.compile (one graph at
a fixed capacity with padded rows, on one rank and on two).

The counts per call (forward + backward, after warm-up), for every scheduler and GPU codec,
on 1 and 2 ranks; docs/gpu_ready.md has the same table:
- padded rows at a fixed capacity: 0 + 0 (on several ranks the agreement's record rides on the
  first dispatch, in host memory here; a GPU layer all-gathers it on the group's CPU backend
  instead, or, on an NCCL-only group, reads it back once: control/rider.py).
- ragged rows or dropless: 1 + 0 (the copy of the split sizes, routing/route.py).
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.distributed as dist

import schedmoe
import schedmoe.parallel as par
from schedmoe.comm.groups import EPGroup, collective
from schedmoe.control.recorder import StepRecorder
from schedmoe.control.rider import ride_costs_no_sync
from schedmoe.errors import ConfigError, InputError, PeerError
from schedmoe.exchange.send import PendingSend
from schedmoe.ops.codecs.cast import BF16Codec
from schedmoe.ops.codecs.codec_set import make_codec
from schedmoe.ops.codecs.compressor import Compressor, CorruptPayloadError, SliceSpec, Wire
from schedmoe.ops.codecs.fixed import HEADER_CACHE
from schedmoe.overlap import GradSync, interleaved_step
from schedmoe.routing.capacity import layout_hash
from schedmoe.tools.syncs import count_syncs
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.model import MoELM

M, E, H, T = 16, 4, 32, 32
LAYOUTS = {"padded": {"capacity_factor": 1.25, "ragged": False},
           "ragged": {"capacity_factor": 1.25},
           "dropless": {"capacity_factor": 0.0}}
SCHEDULERS = ("sequential", "pipeline", "adaptive")
CODECS = ("none", "fp16", "bf16", "int8", "fp8")
# (forward, backward) host syncs per call, by layout and ranks.
EXPECTED = {("padded", 1): (0, 0), ("padded", 2): (0, 0),
            ("ragged", 1): (1, 0), ("ragged", 2): (1, 0),
            ("dropless", 1): (1, 0), ("dropless", 2): (1, 0)}


def _count(layout: str, scheduler: str, codec: str) -> tuple[int, int, dict]:
    """Host syncs of one call after three warm-up calls: forward, backward, by line."""
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, scheduler=scheduler, compressor=codec, **LAYOUTS[layout])
    x = torch.randn(T, M, requires_grad=True)
    for _ in range(3):
        layer(x).square().sum().backward()
    with count_syncs() as forward:
        y = layer(x)
    with count_syncs() as backward:
        y.square().sum().backward()
    return forward.total, backward.total, {**forward.by_line(), **backward.by_line()}


def test_records_ride_on_gpu_payloads_only_where_the_all_gather_would_sync_too():
    assert ride_costs_no_sync("cpu", "cpu")  # a CPU run: host memory either way
    assert not ride_costs_no_sync("cuda", "cpu")  # gloo beside NCCL: all-gather on the host
    assert ride_costs_no_sync("cuda", "cuda")  # NCCL alone: one read back either way


def test_the_auditor_counts_the_packages_syncs_and_not_the_users():
    expert_TK = torch.tensor([[0, 1], [1, 2]])
    with count_syncs() as audit:
        layout_hash(expert_TK, torch.zeros_like(expert_TK), 4)  # copies the routing to the host
        torch.ones(3).sum().item()  # the user's own sync: not the package's
    assert [op for _, op in audit.calls] == ["to", "numpy"]  # to the host, then read
    assert all(where.startswith("schedmoe/routing/capacity.py:") for where, _ in audit.calls)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_host_syncs_per_call_on_one_rank(layout):
    counts = {(s, c): _count(layout, s, c) for s in SCHEDULERS for c in CODECS}
    for (scheduler, codec), (fwd, bwd, where) in counts.items():
        assert (fwd, bwd) == EXPECTED[(layout, 1)], (scheduler, codec, where)


def _counts_on_ranks(rank: int, world: int, layout: str) -> dict:
    return {(s, c): _count(layout, s, c) for s in SCHEDULERS for c in CODECS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_host_syncs_per_call_on_two_ranks(layout):
    for counts in run_ranks(_counts_on_ranks, 2, layout, timeout=300):
        for (scheduler, codec), (fwd, bwd, where) in counts.items():
            assert (fwd, bwd) == EXPECTED[(layout, 2)], (scheduler, codec, where)


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "fp8"])
def test_ragged_codecs_compress_every_destination_in_one_pass(name):
    """The one-pass wire is byte for byte the destination-by-destination one, and decodes
    alike; a damaged header or a wrong size still raises."""
    codec = make_codec(name)
    x_NM = torch.randn(11, 6, generator=torch.Generator().manual_seed(3))
    rows = [4, 0, 5, 2]
    wire = codec.compress_rows(x_NM, rows)
    alone = Compressor.compress_rows(codec, x_NM, rows)
    assert wire.sizes == alone.sizes and torch.equal(wire.data, alone.data)
    specs = [SliceSpec((n, 6), torch.float32) for n in rows]
    torch.testing.assert_close(codec.decompress_rows(wire, specs),
                               Compressor.decompress_rows(codec, alone, specs), rtol=0, atol=0)
    bad = wire.data.clone()
    bad[wire.sizes[0] + wire.sizes[1] + 1] ^= 0xFF  # slice 2's magic
    with pytest.raises(CorruptPayloadError, match="slice 2"):
        codec.decompress_rows(Wire(bad, wire.sizes), specs)
    with pytest.raises(CorruptPayloadError):
        codec.decompress_rows(Wire(wire.data[:-8], wire.sizes[:-1] + [wire.sizes[-1] - 8]),
                              specs)
    for n in range(HEADER_CACHE + 10):  # new row counts every call: the header cache is bounded
        codec.compress_rows(x_NM[:1].expand(n, 6), [n])
    assert len(codec._headers) <= HEADER_CACHE


def _cuda_syncs(layout: str, codec: str) -> int:
    """Syncs CUDA itself reports (set_sync_debug_mode) in one call after warm-up."""
    import warnings

    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, compressor=codec, **LAYOUTS[layout]).cuda()
    x = torch.randn(T, M, device="cuda", requires_grad=True)
    for _ in range(3):
        layer(x).square().sum().backward()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer(x).square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_agrees_with_the_auditor(codec):
    assert _cuda_syncs("padded", codec) == 0
    assert _cuda_syncs("ragged", codec) == 1


class _Flipping(BF16Codec):
    """bf16 whose third compress on rank 0 damages slice 1's header (for rank 1)."""

    calls = 0

    def compress(self, x_P):
        wire = super().compress(x_P)
        _Flipping.calls += 1
        if dist.get_rank() == 0 and _Flipping.calls == 3:
            data = wire.data.clone()
            data[wire.sizes[0] + 4] ^= 0xFF  # slice 1's version byte
            wire = type(wire)(data, wire.sizes)
        return wire


def _corrupt_then_next_call(rank: int, world: int) -> list[str]:
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, capacity_factor=1.25, ragged=False,
                              compressor={"dispatch": _Flipping(), "combine": "none"})
    x = torch.randn(T, M)
    seen = []
    for _ in range(4):  # the damage is in call 2's dispatch: call 3 raises on every rank
        try:
            with torch.no_grad():
                layer(x)
            seen.append("ok")
        except CorruptPayloadError as exc:
            seen.append("CorruptPayloadError" + (": rank [1]" if "rank(s) [1]" in str(exc)
                                                 else str(exc)))
    return seen


def test_a_corrupt_payload_raises_at_the_next_call_on_every_rank():
    expected = ["ok", "ok", "ok", "CorruptPayloadError: rank [1]"]
    assert run_ranks(_corrupt_then_next_call, 2, timeout=120) == [expected] * 2


def test_a_corrupt_payload_raises_when_the_stats_are_read():
    from schedmoe.ops.codecs import checks

    layer = schedmoe.MoELayer(M, E, H, capacity_factor=1.25, ragged=False, compressor="bf16")
    layer(torch.randn(T, M))
    bad = torch.tensor(True)
    checks.post(bad, lambda: CorruptPayloadError("slice 0: header magic is b'XXXX'"))
    with pytest.raises(CorruptPayloadError, match="magic"):
        layer.last_stats
    assert layer.last_stats is not None  # read once, then forgotten


def _collective_errors(rank: int, world: int) -> list[str]:
    group = EPGroup.resolve(None)
    seen = []
    for what in (lambda: dist.all_gather([torch.zeros(2)], torch.zeros(2)),  # wrong list size
                 lambda: (_ for _ in ()).throw(RuntimeError("Connection closed by peer"))):
        try:
            with collective("a probe", group):
                what()
        except (ConfigError, PeerError) as exc:
            seen.append(type(exc).__name__)
    return seen


def test_a_refused_collective_is_a_config_error_not_a_dead_peer():
    assert run_ranks(_collective_errors, 2, timeout=60) == [["ConfigError", "PeerError"]] * 2


class _FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: a host clock, and a count of waits."""

    waits = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        _FakeEvent.waits += 1

    def elapsed_time(self, other: "_FakeEvent") -> float:
        return 1e3 * (other.at - self.at)


def test_the_recorder_never_synchronises_and_reads_events_only_when_asked(monkeypatch):
    def forbidden():
        raise AssertionError("the recorder synchronised the device")

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    _FakeEvent.waits = 0
    rec = StepRecorder(torch.device("cuda"), trace=True)
    with rec("experts", 0):
        pass
    issued = rec.now()
    rec.interval("dispatch.a2a", issued, 0, stream="comm")
    assert _FakeEvent.waits == 0  # nothing read yet
    assert set(rec.seconds) == {"experts", "dispatch.a2a"}
    assert _FakeEvent.waits == 4  # each event once, when the times were asked for
    assert [(e.task, e.stream) for e in rec.events] == [("experts", "compute"),
                                                         ("dispatch.a2a", "comm")]


# -- collectives in program order ------------------------------------------------------------

VOCAB, SEQ = 50, 8


class _LateWork:
    """A collective's work whose completion comes late, at random: `is_completed()` says no
    at random and `wait()` sleeps first (as a slow link or another rank's lateness would)."""

    def __init__(self, work, delays: random.Random) -> None:
        self._work, self._delays = work, delays

    def is_completed(self) -> bool:
        return self._delays.random() < 0.3 and self._work.is_completed()

    def wait(self, *args, **kwargs):
        time.sleep(self._delays.uniform(0, 0.01))
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _issue_order(rank: int, world: int, delay_seed: int | None, micro_batches: int) -> dict:
    """Two steps of EP 2 x DP (world / 2) training with GradSync, one backward pass or
    `micro_batches` interleaved ones a step. With `delay_seed`, each exchange's wait sleeps a random 0-20 ms and every
    collective completes late at random (`_LateWork`). Returns the collectives this rank
    issued, in order, and the trained parameters."""
    layout = par.init_parallel(2)
    torch.manual_seed(0)
    model = MoELM(VOCAB, dim=M, layers=2, heads=2, seq=SEQ, hidden_dim=32, num_experts=4,
                  top_k=2, capacity_factor=1.25, ragged=False, scheduler="pipeline",
                  group=layout.ep_group)
    sync = GradSync(model, layout, micro_batches=micro_batches, chunk_bytes=256, window=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    issued: list[str] = []
    delays = random.Random(delay_seed * 100 + rank if delay_seed is not None else 0)
    all_reduce, all_to_all, wait = dist.all_reduce, dist.all_to_all_single, PendingSend.wait

    def late(work):
        return _LateWork(work, delays) if work is not None and delay_seed is not None else work

    def logged_all_reduce(tensor, *args, **kwargs):
        issued.append(f"all_reduce {tensor.numel()}")
        return late(all_reduce(tensor, *args, **kwargs))

    def logged_all_to_all(out, x, *args, **kwargs):
        issued.append(f"all_to_all {x.numel()}")
        return late(all_to_all(out, x, *args, **kwargs))

    def delayed_wait(self):
        if delay_seed is not None:
            time.sleep(delays.uniform(0, 0.02))
        return wait(self)

    dist.all_reduce, dist.all_to_all_single = logged_all_reduce, logged_all_to_all
    PendingSend.wait = delayed_wait
    try:
        for step in range(2):
            gen = torch.Generator().manual_seed(100 * step + rank)
            batches = [torch.randint(VOCAB, (2, SEQ), generator=gen)
                       for _ in range(micro_batches)]

            def loss_of(tokens):
                logits, aux = model(tokens)
                return logits.square().mean() + 0.1 * aux

            if micro_batches == 1:
                loss_of(batches[0]).backward()
            else:
                interleaved_step(loss_of, batches)
            assert sync.finish()
            opt.step()
            opt.zero_grad()
    finally:
        dist.all_reduce, dist.all_to_all_single, PendingSend.wait = all_reduce, all_to_all, wait
        sync.close()
    return {"issued": issued, "params": {n: p.detach().clone()
                                         for n, p in model.named_parameters()}}


@pytest.mark.parametrize("world,micro_batches", [(2, 1), (4, 1), (4, 2)])
def test_every_rank_issues_its_collectives_in_one_order_whatever_the_delays(world,
                                                                            micro_batches):
    calm = run_ranks(_issue_order, world, None, micro_batches, timeout=240)
    delayed = run_ranks(_issue_order, world, 7, micro_batches, timeout=240)
    issued = calm[0]["issued"]
    chunk_then_a2a = any(a.startswith("all_reduce") and b.startswith("all_to_all")
                         for a, b in zip(issued, issued[1:]))
    # One backward pass leaves the link idle between exchanges: gradient chunks go out among
    # them, so their order against the A2As is what is at stake.
    assert chunk_then_a2a or micro_batches > 1
    for rank in range(world):
        assert delayed[rank]["issued"] == calm[0]["issued"], f"rank {rank}"
        for name, value in calm[rank]["params"].items():
            torch.testing.assert_close(delayed[rank]["params"][name], value, rtol=0, atol=0,
                                       msg=f"rank {rank}: {name}")


# -- torch.compile -----------------------------------------------------------------------------

def _compiled_equals_eager(kwargs: dict, dtype: torch.dtype, backend: str, tol: float) -> None:
    torch.manual_seed(0)
    eager = schedmoe.MoELayer(M, E, H, **kwargs).to(dtype)
    torch.manual_seed(0)
    twin = schedmoe.MoELayer(M, E, H, **kwargs).to(dtype)
    compiled = torch.compile(twin, backend=backend)
    for step in range(3):
        x = torch.randn(T, M, dtype=dtype, generator=torch.Generator().manual_seed(step))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = eager(x1), compiled(x2)
        (y1.float().square().sum() + y1.l_aux).backward()
        (y2.float().square().sum() + y2.l_aux).backward()
        torch.testing.assert_close(y2, y1, rtol=tol, atol=tol)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=tol, atol=tol)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("layout", ["padded", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_compiles_and_equals_eager(layout, dtype):
    torch._dynamo.reset()
    # fp32: within 1e-5 (a traced bias gradient sums in another order); bf16: exactly.
    _compiled_equals_eager(LAYOUTS[layout], dtype, "aot_eager",
                           1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("scheduler,codec", [("pipeline", "bf16"), ("sequential", "int8"),
                                             ("pipeline", "fp8"), ("adaptive", "fp16")])
def test_schedulers_and_codecs_compile_and_equal_eager(scheduler, codec):
    torch._dynamo.reset()
    _compiled_equals_eager({**LAYOUTS["padded"], "scheduler": scheduler, "compressor": codec},
                           torch.float32, "aot_eager", 1e-5)


def test_the_padded_layer_compiles_with_inductor_within_1e_5():
    torch._dynamo.reset()
    _compiled_equals_eager(LAYOUTS["padded"], torch.float32, "inductor", 1e-5)


def _compiled_on_ranks(rank: int, world: int, layout: str) -> str:
    _compiled_equals_eager(LAYOUTS[layout], torch.float32, "aot_eager", 1e-5)
    return "equal"


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_the_layer_compiles_and_equals_eager_on_two_ranks(layout):
    assert run_ranks(_compiled_on_ranks, 2, layout, timeout=180) == ["equal"] * 2


def _one_graph_on_ranks(rank: int, world: int, scheduler: str, codec: str) -> tuple:
    """compiled == eager over three calls, and the graph breaks of a fresh compiled layer."""
    kwargs = {**LAYOUTS["padded"], "scheduler": scheduler, "compressor": codec}
    _compiled_equals_eager(kwargs, torch.float32, "aot_eager", 1e-5)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, **kwargs)
    x = torch.randn(T, M)
    return torch._dynamo.explain(layer)(x).graph_break_count


@pytest.mark.parametrize("scheduler,codec", [("sequential", "none"), ("pipeline", "bf16"),
                                             ("sequential", "int8"), ("adaptive", "none")])
def test_a_compiled_call_on_two_ranks_is_one_graph(scheduler, codec):
    """The agreement as a custom op, the exchanges as functional collectives: no break."""
    assert run_ranks(_one_graph_on_ranks, 2, scheduler, codec, timeout=240) == [0, 0]


def _compiled_with_other_tokens(rank: int, world: int) -> str:
    torch.manual_seed(0)
    layer = torch.compile(schedmoe.MoELayer(M, E, H, **LAYOUTS["padded"]), backend="aot_eager")
    try:
        layer(torch.randn(T + 8 * rank, M))
    except ConfigError as exc:
        return "ConfigError: same number of tokens" if "same number of tokens" in str(exc) \
            else str(exc)
    return "no error"


def test_a_compiled_call_whose_ranks_disagree_raises_on_every_rank():
    assert run_ranks(_compiled_with_other_tokens, 2, timeout=240) == \
        ["ConfigError: same number of tokens"] * 2


def _compiled_with_a_bad_input(rank: int, world: int) -> list[str]:
    torch.manual_seed(0)
    layer = torch.compile(schedmoe.MoELayer(M, E, H, **LAYOUTS["padded"]), backend="aot_eager")
    seen = []
    for call in range(3):  # the second call: a wrong model dim on rank 1
        x = torch.randn(T, M + (3 if call == 1 and rank == 1 else 0))
        try:
            layer(x)
            seen.append("ok")
        except InputError:
            seen.append("InputError")
    return seen


def test_a_bad_input_under_compile_raises_on_every_rank():
    """The rank with the problem concludes eagerly, the others in the compiled graph's op:
    the same all-gather, the same typed error, and the next call runs again."""
    assert run_ranks(_compiled_with_a_bad_input, 2, timeout=240) == \
        [["ok", "InputError", "ok"]] * 2


@pytest.mark.parametrize("layout,scheduler,codec,breaks", [
    *(("padded", "sequential", codec, 0) for codec in CODECS),
    ("padded", "pipeline", "none", 0), ("padded", "pipeline", "int8", 0),
    ("padded", "adaptive", "bf16", 0), ("ragged", "sequential", "none", 1),
    ("ragged", "pipeline", "fp8", 1)])
def test_graph_breaks(layout, scheduler, codec, breaks):
    """Padded at a fixed capacity: one graph, no break (the adaptive scheduler runs its tuned
    decision there). Ragged: one break, at the copy of the split sizes; the exchanges then run
    eagerly (docs/gpu_ready.md)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, scheduler=scheduler, compressor=codec,
                              **LAYOUTS[layout])
    x = torch.randn(T, M)
    layer(x)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == breaks, explained.break_reasons
