"""Fault injection: ranks that disagree, hostile payloads, leaks, autograd, codec and scheduler
semantics, initialisation. Every case either raises the same typed error on every rank within
the timeout or gives the result of an independent reference."""

from __future__ import annotations

import itertools

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import schedmoe
from schedmoe.errors import ConfigMismatchError, InputError, StepError
from schedmoe.ops.codecs.codec_set import CodecSet, ErrorFeedback, make_codec
from schedmoe.ops.codecs.compressor import CorruptPayloadError, SliceSpec, Wire
from schedmoe.schedulers import AdaptiveScheduler, PipelineScheduler
from schedmoe.routing import TopKRouter
from schedmoe.registry import register_gate
from schedmoe.tools.testing import run_ranks

M, E, H, T = 8, 4, 16, 12


def outcome(fn) -> tuple[str, str]:
    """(exception type name or "ok", message) of `fn()`."""
    try:
        fn()
        return "ok", ""
    except Exception as exc:  # noqa: BLE001 - the type is what the test checks
        return type(exc).__name__, str(exc)


def _gelu_a(x):
    return F.gelu(x)


@register_gate("fails-on-rank-1")
class FailingGate(TopKRouter):
    def forward(self, x_TM):
        if dist.get_rank() == 1:
            raise RuntimeError("custom gate broke")
        return super().forward(x_TM)


# -- 1. ranks that disagree ------------------------------------------------------------------

def disagreements(rank: int, world: int) -> dict[str, tuple[str, str]]:
    def layer(**options):
        torch.manual_seed(0)
        return schedmoe.MoELayer(M, E, H, 2, 1.25, **options)

    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    mine = rank == 1
    cases = {
        "dtype f64 vs f32": lambda: layer()(x.double() if mine else x),
        "dtype f16 vs bf16": lambda: layer()(x.half() if mine else x.bfloat16()),
        "dtype int8 codec": lambda: layer(compressor="int8")(x.double() if mine else x),
        "dtype zstd codec": lambda: layer(compressor="zstd")(x.double() if mine else x),
        "meta input": lambda: layer()(x.to("meta") if mine else x),
        "grad mode": lambda: _maybe_no_grad(layer(), x, mine),
        "lambda activations": lambda: layer(activation=(lambda t: t.relu()) if mine
                                            else (lambda t: t.sigmoid()))(x),
        "capacity factor": lambda: schedmoe.MoELayer(M, E, H, 2, 1.0 if mine else 1.25)(x),
        # nodes from the hosts vs an explicit count: the same here, not in general
        "local_size": lambda: layer(local_size=None if mine else world)(x),
        "gate fails on one rank": lambda: layer(gate="fails-on-rank-1")(x),
        # equivalent spellings must agree
        "pipeline spellings": lambda: layer(scheduler="pipeline" if mine
                                            else PipelineScheduler(2))(x),
        "a2a spellings": lambda: layer(a2a="nccl" if mine else
                                       schedmoe.a2a_algos.FlatA2A)(x),
        "activation spellings": lambda: layer(activation="gelu" if mine else F.gelu)(x),
        "same function": lambda: layer(activation=_gelu_a)(x),
        "int vs float factor": lambda: schedmoe.MoELayer(M, E, H, 2, 1 if mine else 1.0)(x),
        "after errors": lambda: layer()(x),  # the group still works after all of the above
    }
    return {name: outcome(case) for name, case in cases.items()}


def _maybe_no_grad(layer, x, mine):
    with torch.set_grad_enabled(not mine):
        layer(x)


def test_disagreements_raise_the_same_typed_error_on_every_rank():
    per_rank = run_ranks(disagreements, 2, timeout=120)
    expected = {
        "dtype f64 vs f32": (InputError.__name__, "dtype differs"),
        "dtype f16 vs bf16": (InputError.__name__, "dtype differs"),
        "dtype int8 codec": (InputError.__name__, "dtype differs"),
        "dtype zstd codec": (InputError.__name__, "dtype differs"),
        "meta input": (InputError.__name__, "'meta'"),
        "grad mode": (InputError.__name__, "autograd state"),
        "lambda activations": (ConfigMismatchError.__name__, "activation differs"),
        "capacity factor": (ConfigMismatchError.__name__, "1.25"),
        "local_size": (ConfigMismatchError.__name__, "local_size"),
        "gate fails on one rank": (StepError.__name__, "custom gate broke"),
    }
    for name in per_rank[0]:
        for rank, results in enumerate(per_rank):
            kind, message = results[name]
            want, fragment = expected.get(name, ("ok", ""))
            assert kind == want, (name, rank, kind, message)
            assert fragment in message, (name, rank, message)


def one_rank_needs_grad(rank: int, world: int, scheduler) -> dict:
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H, 2, 1.25, scheduler=scheduler)
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(rank))
    grads = {}
    for label, needs in (("both", True), ("rank 0 only", rank == 0)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(needs)
        layer(xi).square().sum().backward()
        grads[label] = [p.grad.clone() for p in layer.experts.parameters()]
    return grads


@pytest.mark.parametrize("scheduler", ["sequential", "pipeline", "adaptive"])
def test_input_grad_on_one_rank_only_gives_the_same_gradients(scheduler):
    for grads in run_ranks(one_rank_needs_grad, 2, scheduler, timeout=120):
        for a, b in zip(grads["both"], grads["rank 0 only"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_huge_capacity_factor_runs_without_drops():
    torch.manual_seed(0)
    x = torch.randn(T, M)
    huge = schedmoe.MoELayer(M, E, H, 2, 1e13)
    dropless = schedmoe.MoELayer(M, E, H, 2, 0.0)
    dropless.load_state_dict(huge.state_dict())
    torch.testing.assert_close(huge(x), dropless(x))
    assert huge.last_stats.dropped == 0 and huge.last_stats.capacity <= T


def test_callable_without_identity_is_refused():
    class Act:
        def __call__(self, t):
            return t.relu()
    with pytest.raises(schedmoe.errors.ConfigError, match="no identity"):
        schedmoe.MoELayer(M, E, H, activation=Act())


# -- 2. payloads -------------------------------------------------------------------------------

BOMB_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, zstandard
    from schedmoe.ops.codecs.compressor import CorruptPayloadError, SliceSpec, Wire, header_bytes
    from schedmoe.ops.codecs.zstd import ZstdCodec
    codec = ZstdCodec()
    spec = SliceSpec((256, 256), torch.float32)  # 256 KiB expected
    def attempt(frame):
        raw = header_bytes(codec.codec_id, spec, len(frame)) + frame
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        try:
            codec.decompress(Wire(data, [len(raw)]), spec)
            return "decoded"
        except CorruptPayloadError:
            return "CorruptPayloadError"
        except Exception as exc:
            return type(exc).__name__
    good = codec.compress(torch.randn(1, 256, 256))
    codec.decompress(good, spec)  # warm up
    zeros = bytes(1 << 30)
    declared = zstandard.ZstdCompressor(write_content_size=True).compress(zeros)
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(zeros)
    cobj = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=1 << 40)
    huge = cobj.compress(bytes(1 << 20)) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    del zeros
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = [attempt(f) for f in (declared, undeclared, huge, b"\\x28\\xb5\\x2f\\xfd" + bytes(8))]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(results, (after - before) // 1024)
""")


def test_zstd_bombs_raise_without_allocating():
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip().splitlines()[-1]
    results, growth_mib = out.rsplit(" ", 1)
    assert results == str(["CorruptPayloadError"] * 4)
    assert int(growth_mib) < 64, out


@pytest.mark.parametrize("sizes", [[-1, 129], [64, 63], [0, 128], [32, 32, 64]])
def test_none_codec_validates_every_split(sizes):
    spec = SliceSpec((4, 4), torch.float32)  # 64 bytes a slice, 128 bytes in all
    wire = Wire(torch.zeros(128, dtype=torch.uint8), sizes)
    with pytest.raises(CorruptPayloadError):
        make_codec("none").decompress(wire, spec)


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8", "fp8", "zstd", "int8+ef"])
def test_verify_catches_every_bit_flip(name):
    codecs = CodecSet.build(name, verify=True)
    codec = codecs.stream("dispatch", 0)
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    spec = SliceSpec((5, 7), x.dtype)
    wire = codec.compress(x)
    torch.testing.assert_close(codec.decompress(Wire(wire.data.clone(), wire.sizes), spec),
                               make_codec(name).decompress(make_codec(name).compress(x), spec)
                               if name != "int8+ef" else codec.decompress(wire, spec))
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        data = wire.data.clone()
        byte = int(torch.randint(data.numel(), (1,), generator=gen))
        data[byte] ^= 1 << int(torch.randint(8, (1,), generator=gen))
        with pytest.raises(CorruptPayloadError):
            codec.decompress(Wire(data, wire.sizes), spec)


# -- 3. leaks ------------------------------------------------------------------------------------

def group_cycles(rank: int, world: int, algorithm: str) -> tuple[int, int, int, int]:
    def counts():
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    def cycle():
        group = dist.new_group(list(range(world)))
        torch.manual_seed(0)
        layer = schedmoe.MoELayer(M, E, H, group=group, a2a=algorithm, local_size=2)
        layer(torch.randn(T, M)).sum().backward()
        del layer
        dist.destroy_process_group(group)

    for _ in range(3):
        cycle()
    fds, threads = counts()
    for _ in range(50):
        cycle()
    return (fds, threads, *counts())


@pytest.mark.parametrize("algorithm", ["nccl", "2dh", "pipe"])
def test_group_cycles_do_not_leak(algorithm):
    for fds, threads, fds_after, threads_after in run_ranks(group_cycles, 4, algorithm,
                                                            timeout=300):
        assert fds_after - fds <= 5 and threads_after - threads <= 5, \
            (fds, fds_after, threads, threads_after)


def test_adaptive_decision_history_is_bounded():
    from schedmoe.schedulers.adaptive import MAX_DECISIONS
    torch.manual_seed(0)
    sched = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), trial_steps=1,
                              check_every=1, drift=0.0)  # drift 0: re-profiles all the time
    layer = schedmoe.MoELayer(M, E, H, scheduler=sched)
    x = torch.randn(T, M)
    for _ in range(3 * MAX_DECISIONS):
        layer(x)
    assert len(sched.decisions) == MAX_DECISIONS


# -- 4. autograd ---------------------------------------------------------------------------------

SCHEDULERS = {
    "sequential": lambda: "sequential",
    "pipeline2": lambda: PipelineScheduler(2),
    "pipeline3": lambda: PipelineScheduler(3),
    "adaptive": lambda: AdaptiveScheduler(degrees=(1, 2, 3), algorithms=("nccl", "pipe"),
                                          shortlist=2, trial_steps=1),
}


def autograd_cases(rank: int, world: int, name: str) -> list[str]:
    """Every way of differentiating the layer, against the sequential schedule."""
    torch.manual_seed(0)
    ref = schedmoe.MoELayer(M, E, H, 2, 1.25)
    layer = schedmoe.MoELayer(M, E, H, 2, 1.25, scheduler=SCHEDULERS[name]())
    layer.load_state_dict(ref.state_dict())
    params, ref_params = list(layer.experts.parameters()), list(ref.experts.parameters())
    checked = []
    for step in range(8):  # adaptive: through profiling, trials and a tuned choice
        x = torch.randn(T, M, generator=torch.Generator().manual_seed(10 * step + rank))
        xr = x.clone().requires_grad_()
        ref.zero_grad()
        ref(xr).square().sum().backward()
        want = [p.grad for p in ref_params] + [xr.grad]

        xa = x.clone().requires_grad_()
        got = torch.autograd.grad(layer(xa).square().sum(), params + [xa])
        _close(got, want, "autograd.grad")

        layer.zero_grad()
        xb = x.clone().requires_grad_()
        loss = layer(xb).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
        _close([p.grad for p in params] + [xb.grad], [2 * w for w in want], "retain_graph")

        for reentrant in (False, True):
            layer.zero_grad()
            xc = x.clone().requires_grad_()
            checkpoint(layer, xc, use_reentrant=reentrant).square().sum().backward()
            _close([p.grad for p in params] + [xc.grad], want, f"checkpoint {reentrant}")
        checked.append(step)

    packed = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: packed.append(1) or t, lambda t: t):
        y = layer(torch.randn(T, M))
    assert y.grad_fn is None and not packed, "graph built under no_grad"
    with torch.inference_mode():
        layer(torch.randn(T, M))
    return checked


def _close(got, want, what):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_is_an_autograd_citizen(name):
    assert run_ranks(autograd_cases, 2, name, timeout=240) == [list(range(8))] * 2


def test_router_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(64, 8, 32)
    x = torch.randn(64, 64)
    seen = []
    layer.gate.register_forward_hook(lambda mod, inp, out: seen.append(out.probs_TE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    want = torch.softmax(x @ layer.gate.wg_EM.t(), dim=-1)
    torch.testing.assert_close(seen[0], want, rtol=1e-6, atol=1e-7)


# -- 5. codec and scheduler semantics --------------------------------------------------------

def test_adaptive_uses_the_layers_compressor():
    torch.manual_seed(0)
    sched = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), trial_steps=1)
    layer = schedmoe.MoELayer(M, E, H, compressor="bf16", scheduler=sched)
    for _ in range(8):
        layer(torch.randn(T, M)).sum().backward()
        for name, (raw, wire) in layer.last_stats.wire_bytes.items():
            assert wire < raw, (name, raw, wire)
    assert {d.codec for d in sched.decisions} == {layer.codecs.describe()}


def test_error_feedback_is_per_stream_and_reset_with_the_layout():
    codecs = CodecSet.build("int8+ef")
    first, second = codecs.stream("combine_grad", 0), codecs.stream("combine_grad", 1)
    assert isinstance(first, ErrorFeedback) and first is not second
    assert codecs.stream("combine_grad", 0) is first
    x = torch.randn(2, 3, 5)
    codecs.observe_layout("a")
    first.compress(x)
    assert first.residual is not None and second.residual is None
    codecs.observe_layout("a")
    assert first.residual is not None
    codecs.observe_layout("b")
    assert first.residual is None


def test_dropless_adaptive_settles_when_capacity_wanders_over_a_bucket_edge():
    torch.manual_seed(0)
    ticks = itertools.count()  # every step 10 ms: the machine's load cannot look like drift
    sched = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), trial_steps=1,
                              timer=lambda: 0.01 * next(ticks))
    layer = schedmoe.MoELayer(M, 2, H, 1, 0.0, scheduler=sched)
    x = torch.randn(260, M)
    for step in range(60):
        # all tokens to one expert: C = T, around the edge of bucket 1 (128..255)
        with torch.no_grad():
            layer.gate.wg_EM.zero_()
            layer.gate.wg_EM[0] = 1.0
        layer(x[:120 if step % 2 else 132].abs())
    trials = [d for d in sched.decisions if d.reason == "trial"]
    assert len(trials) <= 4, [(d.step, d.reason) for d in sched.decisions]


def test_bucket_winners_are_remembered():
    torch.manual_seed(0)
    ticks = itertools.count()  # every step 10 ms: the machine's load cannot look like drift
    sched = AdaptiveScheduler(degrees=(1, 2), algorithms=("nccl",), trial_steps=1,
                              timer=lambda: 0.01 * next(ticks))
    layer = schedmoe.MoELayer(M, 2, H, 1, 0.0, scheduler=sched)
    with torch.no_grad():
        layer.gate.wg_EM.zero_()
        layer.gate.wg_EM[0] = 1.0
    x = torch.randn(600, M).abs()
    for tokens in [100] * 8 + [500] * 6 + [100] * 3 + [500] * 3:
        layer(x[:tokens])
    reasons = [d.reason for d in sched.decisions]
    assert reasons.count("trial") <= 4 and reasons[-1] == "bucket", reasons


# -- 6. initialisation -------------------------------------------------------------------------

def init_per_rank(rank: int, world: int):
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, H)
    after = torch.rand(3)  # the global RNG must stay in step across ranks
    return layer.gate.wg_EM.detach(), layer.experts.w1_EMH.detach(), after


def test_experts_differ_across_ranks_and_the_gate_does_not():
    (g0, w0, r0), (g1, w1, r1) = run_ranks(init_per_rank, 2, timeout=60)
    assert torch.equal(g0, g1) and torch.equal(r0, r1)
    assert not torch.equal(w0, w1)
