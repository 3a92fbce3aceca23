"""Routers, expert forms and shared experts against references written out token by token."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import schedmoe
from schedmoe.ops.experts.forms import ClampedGLUExpert, SwiGLUExpert
from schedmoe.ops.experts.shared import SharedExperts
from schedmoe.routing import GroupLimitedSigmoidRouter, TopKRouter, TopKSoftmaxRouter

M, E = 6, 8


def _x(tokens: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, M, generator=torch.Generator().manual_seed(seed))


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def _as_dicts(routing) -> list[dict[int, float]]:
    """Per token: chosen expert -> weight (the order of the k choices is not part of the
    contract)."""
    return [{int(e): float(w) for e, w in zip(es, ws)}
            for es, ws in zip(routing.expert_TK, routing.weight_TK)]


def _close(got: list[dict[int, float]], want: list[dict[int, float]]) -> None:
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (t, g, w)
        for e in w:
            assert math.isclose(g[e], w[e], rel_tol=1e-5, abs_tol=1e-6), (t, e, g[e], w[e])


def _logits(x, weight, bias=None):
    return [[sum(float(x[t, m]) * float(weight[e, m]) for m in range(M))
             + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
            for t in range(x.shape[0])]


def _top(values: list[float], k: int, allowed=None) -> list[int]:
    order = [e for e in range(len(values)) if allowed is None or e in allowed]
    return sorted(order, key=lambda e: -values[e])[:k]


@pytest.mark.parametrize("k,normalize,bias,single", [
    (2, True, False, False), (3, False, True, False), (1, True, False, False),
    (1, True, False, True)])
def test_softmax_then_topk(k, normalize, bias, single):
    router = TopKRouter(M, E, k, normalize_weights=normalize, bias=bias, normalize_single=single)
    _randomise(router)
    x = _x()
    want = []
    for row in _logits(x, router.wg_EM, router.bias_E):
        z = sum(math.exp(v) for v in row)
        probs = [math.exp(v) / z for v in row]
        chosen = _top(probs, k)
        total = sum(probs[e] for e in chosen) if normalize and (k > 1 or single) else 1.0
        want.append({e: probs[e] / total for e in chosen})
    _close(_as_dicts(router(x)), want)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_of_logits_then_softmax(k):
    router = TopKSoftmaxRouter(M, E, k)
    _randomise(router)
    x = _x()
    want = []
    for row in _logits(x, router.wg_EM, router.bias_E):
        chosen = _top(row, k)
        z = sum(math.exp(row[e]) for e in chosen)
        want.append({e: math.exp(row[e]) / z for e in chosen})
    _close(_as_dicts(router(x)), want)


@pytest.mark.parametrize("groups,keep,k,normalize,scaling", [
    (1, 1, 2, True, 1.0), (4, 2, 3, True, 2.5), (4, 1, 2, False, 1.5), (2, 2, 4, True, 1.0)])
def test_sigmoid_group_limited_with_selection_bias(groups, keep, k, normalize, scaling):
    router = GroupLimitedSigmoidRouter(M, E, k, normalize_weights=normalize, num_groups=groups,
                                       topk_groups=keep, scaling=scaling)
    _randomise(router)
    assert router.score_bias_E.abs().sum() > 0
    x = _x()
    per_group = E // groups
    want = []
    for row in _logits(x, router.wg_EM):
        scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + float(b) for s, b in zip(scores, router.score_bias_E)]
        group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group])[-2:])
                       for g in range(groups)]
        kept = _top(group_score, keep) if groups > 1 else [0]
        allowed = {e for g in kept for e in range(g * per_group, (g + 1) * per_group)}
        chosen = _top(choice, k, allowed)
        total = sum(scores[e] for e in chosen) + 1e-20 if normalize else 1.0
        want.append({e: scores[e] / total * scaling for e in chosen})
    _close(_as_dicts(router(x)), want)


@pytest.mark.parametrize("gate,options", [
    ("topk", {}), ("topk_softmax", {"bias": True}),
    ("sigmoid_grouped", {"num_groups": 4, "topk_groups": 2})])
@pytest.mark.parametrize("shared", [0, 12])
def test_every_router_takes_an_empty_batch(gate, options, shared):
    """A rank with no tokens (allow_empty, or a rank serving others: hf/generate.py) routes
    nothing and returns an empty output, whatever the router (a grouped router once failed to
    reshape zero tokens)."""
    layer = schedmoe.MoELayer(M, E, 12, top_k=2, gate=gate, gate_options=options,
                              allow_empty=True, shared_hidden_dim=shared)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = layer(torch.zeros(0, M, requires_grad=grad))
        assert y.shape == (0, M) and layer.last_stats.processed == 0


def test_group_limited_router_rejects_impossible_groups():
    with pytest.raises(schedmoe.ConfigError, match="divide"):
        GroupLimitedSigmoidRouter(M, E, 2, num_groups=3)
    with pytest.raises(schedmoe.ConfigError, match="top_k"):
        GroupLimitedSigmoidRouter(M, E, 5, num_groups=4, topk_groups=2)


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def _expert_reference(expert, x, glu) -> torch.Tensor:
    """y[e][t] by loops: h_j = glu(x . w1[:, j] + b1_j, x . w3[:, j] + b3_j), y = h . w2 + b2."""
    num, tokens, _ = x.shape
    hidden = expert.hidden_dim
    out = torch.zeros(num, tokens, M)
    for e in range(num):
        for t in range(tokens):
            h = []
            for j in range(hidden):
                gate = float(x[e, t] @ expert.w1_EMH[e, :, j])
                up = float(x[e, t] @ expert.w3_EMH[e, :, j])
                if expert.b1_EH is not None:
                    gate, up = gate + float(expert.b1_EH[e, j]), up + float(expert.b3_EH[e, j])
                h.append(glu(gate, up))
            for m in range(M):
                y = sum(h[j] * float(expert.w2_EHM[e, j, m]) for j in range(hidden))
                out[e, t, m] = y + (float(expert.b2_EM[e, m]) if expert.b2_EM is not None else 0)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_expert(bias):
    expert = SwiGLUExpert(3, M, 5, bias=bias)
    x = torch.randn(3, 4, M, generator=torch.Generator().manual_seed(2))
    want = _expert_reference(expert, x, lambda g, u: _silu(g) * u)
    torch.testing.assert_close(expert(x), want, rtol=1e-5, atol=1e-5)


def test_clamped_glu_expert():
    expert = ClampedGLUExpert(2, M, 5, alpha=1.702, limit=1.5)
    _randomise(expert)  # large enough values that both clamps bite
    x = torch.randn(2, 4, M, generator=torch.Generator().manual_seed(3))

    def glu(gate, up):
        gate, up = min(gate, 1.5), max(-1.5, min(up, 1.5))
        return gate / (1 + math.exp(-1.702 * gate)) * (up + 1)

    torch.testing.assert_close(expert(x), _expert_reference(expert, x, glu), rtol=1e-5,
                               atol=1e-4)


def test_shared_experts_with_sigmoid_gate():
    shared = SharedExperts(SwiGLUExpert(1, M, 5), gate=True)
    x = _x(5)
    mlp = _expert_reference(shared.mlp, x.unsqueeze(0), lambda g, u: _silu(g) * u)[0]
    scale = torch.tensor([1 / (1 + math.exp(-float(x[t] @ shared.gate_1M[0])))
                          for t in range(5)])
    torch.testing.assert_close(shared(x), mlp * scale.unsqueeze(1), rtol=1e-5, atol=1e-5)


def test_n_shared_experts_are_one_mlp_of_n_times_the_hidden_size():
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, 5, 2, 0.0, expert="swiglu", shared_hidden_dim=3,
                              num_shared_experts=2)
    mlp = layer.shared.mlp
    assert mlp.w1_EMH.shape == (1, M, 6)
    x = _x(4)
    two = sum(_expert_reference(SimpleNamespace(
        hidden_dim=3, w1_EMH=mlp.w1_EMH[:, :, j:j + 3], w3_EMH=mlp.w3_EMH[:, :, j:j + 3],
        w2_EHM=mlp.w2_EHM[:, j:j + 3], b1_EH=None, b2_EM=None), x.unsqueeze(0),
        lambda g, u: _silu(g) * u)[0] for j in (0, 3))
    torch.testing.assert_close(layer.shared(x), two, rtol=1e-5, atol=1e-5)
    with pytest.raises(schedmoe.ConfigError, match="num_shared_experts"):
        schedmoe.MoELayer(M, E, 5, shared_hidden_dim=3, num_shared_experts=0)


def test_layer_adds_shared_experts_and_jitters_only_in_training():
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(M, E, 5, 2, 0.0, expert="swiglu", shared_hidden_dim=7,
                              input_jitter=0.1)
    x = _x(9)
    with torch.no_grad():
        layer.eval()
        y = layer(x)
        shared = layer.shared(x)
        layer.shared = None
        routed = layer(x)
        torch.testing.assert_close(y, routed + shared)
        layer.train()
        assert not torch.allclose(layer(x), routed)  # jitter changes the input in training


# -- balance losses and auxiliary-loss-free balancing ---------------------------------------

def _loss_reference(probs, experts, first_only):
    """E * sum_e mean_t probs[t][e] * (choices of e / all choices), by loops."""
    tokens, num = len(probs), len(probs[0])
    chosen = [row[:1] if first_only else row for row in experts]
    total = sum(len(row) for row in chosen)
    frac = [sum(row.count(e) for row in chosen) / total for e in range(num)]
    return num * sum(sum(probs[t][e] for t in range(tokens)) / tokens * frac[e]
                     for e in range(num))


@pytest.mark.parametrize("kind", ["gshard", "topk", "sequence"])
def test_balance_losses(kind):
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(12, E, generator=gen), -1)
    experts = torch.topk(probs + 0.3 * torch.rand(12, E, generator=gen), 3).indices
    got = schedmoe.routing.balance_loss(kind, probs, experts, sequences=3)
    p, e = probs.tolist(), experts.tolist()
    if kind == "sequence":
        want = sum(_loss_reference(p[4 * s:4 * s + 4], e[4 * s:4 * s + 4], False)
                   for s in range(3)) / 3
    else:
        want = _loss_reference(p, e, kind == "gshard")
    assert math.isclose(float(got), want, rel_tol=1e-5)


def global_loss(rank: int, world: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(rank)
    probs = torch.softmax(torch.randn(10 + 3 * rank, E, generator=gen), -1)
    experts = torch.topk(probs, 2).indices
    got = schedmoe.routing.balance_loss("global", probs, experts,
                                        group=torch.distributed.group.WORLD)
    all_experts = [None] * world
    torch.distributed.all_gather_object(all_experts, experts.tolist())
    chosen = [c for rows in all_experts for row in rows for c in row]
    frac = [chosen.count(e) / len(chosen) for e in range(E)]
    want = E * sum(float(probs[:, e].mean()) * frac[e] for e in range(E))
    return float(got), want


def test_global_balance_loss_counts_every_ranks_choices():
    from schedmoe.tools.testing import run_ranks
    for got, want in run_ranks(global_loss, 2, timeout=60):
        assert math.isclose(got, want, rel_tol=1e-5)


def test_layer_uses_the_configured_balance_loss():
    torch.manual_seed(0)
    x = _x(9).view(3, 3, M)
    for kind in ("gshard", "topk", "sequence"):
        torch.manual_seed(0)
        layer = schedmoe.MoELayer(M, E, 5, 3, 0.0, balance_loss=kind)
        y = layer(x)
        routing = layer.gate(x.reshape(-1, M))
        want = schedmoe.routing.balance_loss(kind, routing.probs_TE, routing.expert_TK, 3)
        torch.testing.assert_close(y.l_aux, want)
    with pytest.raises(schedmoe.ConfigError, match="balance_loss"):
        schedmoe.MoELayer(M, E, 5, balance_loss="switchy")


def test_aux_loss_free_balancing_settles_a_skewed_stream():
    """DeepSeek-V3's update on a stream leaning towards three experts: the per-batch load's
    max/mean falls below 1.2 and stays near it (experiments/aux_free_balance.py plots it)."""
    torch.manual_seed(0)
    router = GroupLimitedSigmoidRouter(32, 16, 2, num_groups=4, topk_groups=2,
                                       bias_update_rate=0.002).train()
    hot = router.wg_EM[:3].detach().sum(0)
    gen = torch.Generator().manual_seed(1)
    ratios = []
    with torch.no_grad():
        for _ in range(300):
            router(torch.randn(4096, 32, generator=gen) + 1.5 * hot / hot.norm())
            load = router.load_E.float()
            ratios.append(float(load.max() / load.mean()))
            assert schedmoe.routing.update_balancing_biases(router) == 1
            assert router.load_E.sum() == 0  # counts reset by the update
    assert ratios[0] > 2.5
    assert min(ratios[:150]) < 1.2
    assert sorted(ratios[-100:])[50] < 1.2
    assert "score_bias_E" in router.state_dict()  # checkpointed; the counts are not
    assert "load_E" not in router.state_dict()
    router.to(torch.bfloat16)
    assert router.load_E.dtype == torch.int64  # counts stay exact in a bf16 model


def test_recompute_and_eval_do_not_count_load():
    router = GroupLimitedSigmoidRouter(M, E, 2, bias_update_rate=0.01)
    x = _x(6).requires_grad_()
    router.eval()
    router(x)
    assert router.load_E.sum() == 0
    router.train()
    out = torch.utils.checkpoint.checkpoint(lambda t: router(t).weight_TK, x, use_reentrant=False)
    out.sum().backward()  # the recompute inside backward routes again
    assert router.load_E.sum() == 12


@pytest.mark.parametrize("scheduler", ["pipeline", "adaptive"])
def test_shared_experts_overlap_the_dispatch_and_match_sequential(scheduler):
    """Same weights, same result as the sequential schedule; in the pipelined schedule the
    shared experts run after the dispatches are issued and before the first is decoded."""
    from schedmoe.schedulers import PipelineScheduler

    results = []
    for name in ("sequential", scheduler):
        torch.manual_seed(0)
        sched = PipelineScheduler(3) if name == "pipeline" else name
        layer = schedmoe.MoELayer(M, E, 5, 2, 1.5, expert="swiglu", shared_hidden_dim=7,
                                  shared_gate=True, scheduler=sched, trace=True)
        x = _x(16).requires_grad_()
        y = layer(x)
        (y.square().sum() + y.l_aux).backward()
        results.append((y, x.grad, [p.grad for p in layer.parameters()]))
        if name == "pipeline":
            tasks = [e.task for e in layer.last_stats.events]
            assert tasks.index("shared") > max(i for i, t in enumerate(tasks)
                                               if t == "dispatch.compress")
            assert tasks.index("shared") < tasks.index("dispatch.decompress")
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_simulator_places_shared_work_while_the_first_exchanges_fly():
    from schedmoe.sim import simulate

    chunk = {"dispatch.compress": 1.0, "dispatch.a2a": 4.0, "dispatch.decompress": 1.0,
             "experts": 2.0, "combine.compress": 1.0, "combine.a2a": 4.0,
             "combine.decompress": 1.0}
    plain = simulate([chunk, chunk])
    with_shared = simulate([chunk, chunk], shared=3.0)
    shared = [e for e in with_shared.events if e.task == "shared"][0]
    assert shared.start == 2.0  # after both compressions, while the A2As run
    assert with_shared.makespan < plain.makespan + 3.0  # hidden in part behind the exchanges


def test_slot_assignment_scales_without_a_one_hot():
    """65,536 tokens x 8 choices over 1,024 experts: a [K, T, E] one-hot would need 4 GiB;
    the sort-based assignment needs O(T*K + E). Slots are dense per expert, in priority order."""
    from schedmoe.routing.capacity import locate

    gen = torch.Generator().manual_seed(0)
    tokens, k, experts = 65536, 8, 1024
    expert_TK = torch.randint(0, experts, (tokens, k), generator=gen)
    slot_TK, counts_E = locate(expert_TK, experts)
    assert int(counts_E.sum()) == tokens * k
    flat_e, flat_s = expert_TK.t().reshape(-1), slot_TK.t().reshape(-1)  # priority order
    for e in (0, 17, 1023):
        slots = flat_s[flat_e == e]
        assert torch.equal(slots, torch.arange(int(counts_E[e])))


@pytest.mark.parametrize("bias,interleaved", [(False, False), (True, False), (True, True)])
def test_fused_swiglu_storage_is_the_same_function(bias, interleaved):
    apart = SwiGLUExpert(3, M, 5, bias=bias)
    fused = SwiGLUExpert(3, M, 5, bias=bias, fused=True, interleaved=interleaved)

    def side_by_side(gate, up):  # gate columns first, or alternating gate, up, gate, ...
        if interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    with torch.no_grad():
        fused.w13_EM2H.copy_(side_by_side(apart.w1_EMH, apart.w3_EMH))
        fused.w2_EHM.copy_(apart.w2_EHM)
        if bias:
            fused.b13_E2H.copy_(side_by_side(apart.b1_EH, apart.b3_EH))
            fused.b2_EM.copy_(apart.b2_EM)
    x = torch.randn(3, 4, M, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused(x), apart(x))
    rows = x.reshape(12, M)
    torch.testing.assert_close(fused.forward_ragged(rows, [5, 0, 7]),
                               apart.forward_ragged(rows, [5, 0, 7]))


def biases_after_updates(rank: int, world: int) -> list[float]:
    """Each rank routes its own skewed batches; the update sums the counts over the ranks, so
    the biases stay identical on every replica of the router."""
    torch.manual_seed(0)
    router = GroupLimitedSigmoidRouter(M, E, 2, bias_update_rate=0.01).train()
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for _ in range(5):
            router(torch.randn(50 + 30 * rank, M, generator=gen) + rank)
            schedmoe.routing.update_balancing_biases(router)
    return router.score_bias_E.tolist()


def test_balancing_biases_agree_across_replicas():
    from schedmoe.tools.testing import run_ranks
    first, second = run_ranks(biases_after_updates, 2, timeout=60)
    assert first == second and any(b != 0 for b in first)
