"""Training with expert parallelism against single-process training of the same model.

The reference (`reference_step`) is written out here in plain torch: attention, the MoE (every
expert over every token, weighted by the renormalised top-k probabilities) and the global-batch
balance loss, on the global batch, with torch's AdamW and clip_grad_norm_. The ranks train the
schedmoe model (dropless, "global" balance loss over the world) under each recipe and return
their plain state dicts; the experts are assembled here from each rank's `expert_range`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import schedmoe.parallel as par
from schedmoe.errors import CheckpointError, ConfigError
from schedmoe.overlap import GradSync, interleaved_step
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.data import CharCorpus, shard
from schedmoe.tools.train.model import MoELM, lm_loss

DIM, LAYERS, HEADS, SEQ, HIDDEN, EXPERTS, TOP_K, BATCH = 16, 2, 2, 16, 32, 8, 2, 8
AUX, LR, CLIP, STEPS = 0.01, 1e-3, 0.5, 10


def build(layout: par.ParallelLayout, seed: int = 0, **overrides) -> MoELM:
    torch.manual_seed(seed)
    options = dict(dim=DIM, layers=LAYERS, heads=HEADS, seq=SEQ, hidden_dim=HIDDEN,
                   num_experts=EXPERTS, top_k=TOP_K, capacity_factor=0, balance_loss="global",
                   group=layout.ep_group, balance_group=layout.dp_group)
    options.update(overrides)
    return MoELM(len(CharCorpus().vocab), **options)


def _full(v: torch.Tensor) -> torch.Tensor:
    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()


def plain_state(model) -> dict:
    return {k: _full(v) for k, v in model.state_dict().items()}


def plain_grads(model) -> dict:
    """The gradients under the state dict's names, with its expert_range entries."""
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    grads.update({k: v for k, v in model.state_dict().items() if k.endswith("expert_range")})
    return grads


def train_steps(model, wrapped, opt, layout, rank, world, steps, grads=None, sync=None
                ) -> list[float]:
    """Train on `steps`' global batches; `grads` (a dict) gets the first step's clipped
    gradients. With `sync` (a GradSync), the rank's share in `sync.micro_batches`
    micro-batches, interleaved."""
    data, losses = CharCorpus(), []
    for step in steps:
        x, y = data.batch(step, BATCH, SEQ)
        x, y = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        if sync is None:
            loss, ce, _ = lm_loss(wrapped, x, y, AUX)
            loss.backward()
        else:
            micro, ces = sync.micro_batches, []

            def micro_loss(part):
                loss, ce, _ = lm_loss(wrapped, *part, AUX)
                ces.append(ce.detach())
                return loss / micro

            interleaved_step(micro_loss, list(zip(x.chunk(micro), y.chunk(micro))))
            sync.finish()
            ce = sum(ces) / micro
        par.clip_grad_norm_(wrapped, CLIP, layout)
        if grads is not None and not grads:
            grads.update(plain_grads(model))
        opt.step()
        losses.append(float(ce.detach()))
    return losses


MICRO_BATCHES = {"gradsync": 1, "interleaved": 2}  # GradSync recipes, no wrapper


def wrap(model, layout, recipe):
    if recipe in MICRO_BATCHES:
        return model
    return par.data_parallel(model, layout) if recipe == "ddp" else \
        par.fully_shard_moe(model, layout)


def train_parallel(rank: int, world: int, ep_size: int, recipe: str, options: dict
                   ) -> tuple[dict, dict, dict]:
    layout = par.init_parallel(ep_size, ep_contiguous=options.pop("ep_contiguous", True))
    model = build(layout, **options)
    wrapped = wrap(model, layout, recipe)
    sync = GradSync(model, layout, micro_batches=MICRO_BATCHES[recipe], chunk_bytes=4096) \
        if recipe in MICRO_BATCHES else None
    initial, grads = plain_state(model), {}
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    train_steps(model, wrapped, opt, layout, rank, world, range(STEPS), grads, sync)
    return initial, grads, plain_state(model)


def assemble(states: list[dict]) -> dict:
    """Global tensors from every rank's plain state dict: experts placed by expert_range
    (replicas must agree), dense tensors equal on every rank."""
    out: dict = {}
    for state in states:
        for key, value in state.items():
            if key.endswith("expert_range"):
                continue
            prefix = key.split("experts.")[0]
            if "experts." in key:
                first, count, total = state[prefix + "expert_range"].tolist()
                full = out.setdefault(key, torch.full((total, *value.shape[1:]), math.nan))
                rows = full[first:first + count]
                assert rows.isnan().all() or torch.equal(rows, value), f"{key}: replicas differ"
                rows.copy_(value)
            else:
                assert key not in out or torch.equal(out[key], value), f"{key} differs by rank"
                out[key] = value
    assert not any(v.isnan().any() for v in out.values())
    return out


def reference_loss(P: dict, x, y):
    """The model on the global batch, from its parameters alone."""
    seq = x.shape[1]
    h = F.embedding(x, P["embed.weight"]) + P["pos_SM"][:seq]
    mask = torch.triu(torch.full((seq, seq), float("-inf")), 1)
    aux = 0.0
    for i in range(LAYERS):
        b = f"blocks.{i}."
        a = F.layer_norm(h, (DIM,), P[b + "norm1.weight"], P[b + "norm1.bias"])
        q, k, v = (a @ P[b + "attn.in_proj_weight"].t() + P[b + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.reshape(*t.shape[:2], HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS) + mask, -1) @ v
        att = att.transpose(1, 2).reshape(h.shape)
        h = h + att @ P[b + "attn.out_proj.weight"].t() + P[b + "attn.out_proj.bias"]
        t = F.layer_norm(h, (DIM,), P[b + "norm2.weight"], P[b + "norm2.bias"]).reshape(-1, DIM)
        probs = torch.softmax(t @ P[b + "moe.gate.wg_EM"].t(), -1)
        top_p, top_e = torch.topk(probs, TOP_K, -1)
        weight = top_p / top_p.sum(-1, keepdim=True)
        moe = torch.zeros_like(t)
        e_ = b + "moe.experts."
        for e in range(EXPERTS):
            w_e = (weight * (top_e == e)).sum(-1, keepdim=True)
            ffn = F.gelu(t @ P[e_ + "w1_EMH"][e] + P[e_ + "b1_EH"][e]) @ P[e_ + "w2_EHM"][e]
            moe = moe + w_e * (ffn + P[e_ + "b2_EM"][e])
        counts = torch.bincount(top_e.reshape(-1), minlength=EXPERTS).float()
        aux = aux + EXPERTS * (probs.mean(0) * counts / top_e.numel()).sum()
        h = h + moe.view(h.shape)
    logits = F.layer_norm(h, (DIM,), P["norm.weight"], P["norm.bias"]) @ P["head.weight"].t() \
        + P["head.bias"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return ce + AUX * aux, ce


def reference_training(initial: dict, steps, micro: int = 1, world: int = 4
                       ) -> tuple[dict, dict]:
    """(parameters after `steps`, clipped gradients of the first step). With `micro`, the
    mean loss of micro-batches: micro-batch i is part i of every rank's share."""
    P = {k: v.clone().requires_grad_() for k, v in initial.items()}
    opt = torch.optim.AdamW(P.values(), lr=LR)
    data, first = CharCorpus(), {}
    for step in steps:
        batch = data.batch(step, BATCH, SEQ)
        parts = [[torch.cat([shard(t, r, world).chunk(micro)[i] for r in range(world)])
                  for t in batch] for i in range(micro)]
        loss = sum(reference_loss(P, *part)[0] for part in parts) / micro
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(P.values(), CLIP)
        first = first or {k: v.grad.clone() for k, v in P.items()}
        opt.step()
    return {k: v.detach() for k, v in P.items()}, first


def close(ours: torch.Tensor, ref: torch.Tensor, key: str, rel: float = 1e-5) -> None:
    """Equal within `rel`, relative to the tensor's norm (a near-tie in a top-k somewhere in
    ten steps moves single elements by a few 1e-6 of the tensor's largest magnitude)."""
    err = float(torch.linalg.vector_norm(ours - ref))
    assert err <= rel * float(torch.linalg.vector_norm(ref)) + 1e-12, \
        f"{key}: error {err:.3g}, norm {float(torch.linalg.vector_norm(ref)):.3g}"


def key_bias_free(key: str, value: torch.Tensor) -> torch.Tensor:
    """The key projection's bias has no effect on attention (softmax is invariant to adding the
    same q.b to every score): its true gradient is 0, so Adam turns rounding noise into steps
    of either sign. It is compared as a gradient (~0), not as a trained parameter."""
    return torch.cat([value[:DIM], value[2 * DIM:]]) if key.endswith("in_proj_bias") else value


@pytest.mark.parametrize("ep_size,recipe,options", [
    (2, "ddp", {}), (4, "ddp", {}), (1, "ddp", {}), (2, "fsdp", {}),
    (2, "ddp", {"ep_contiguous": False, "scheduler": "pipeline"}),  # EP groups {0,2}, {1,3}
    (2, "gradsync", {}), (4, "interleaved", {"scheduler": "pipeline"}),
])
def test_ep_x_dp_training_equals_single_process_training(ep_size, recipe, options):
    per_rank = run_ranks(train_parallel, 4, ep_size, recipe, options, timeout=240)
    initial, grads, final = (assemble([r[i] for r in per_rank]) for i in range(3))
    ref, ref_grads = reference_training(initial, range(STEPS), MICRO_BATCHES.get(recipe, 1))
    assert final.keys() == ref.keys() == grads.keys()
    for key in ref:  # the scale rule: gradients, which Adam's updates would not show
        close(grads[key], ref_grads[key], key + " (gradient)")
    for key in ref:
        ours, want = key_bias_free(key, final[key]), key_bias_free(key, ref[key])
        assert not torch.equal(want, key_bias_free(key, initial[key])), f"{key} did not train"
        close(ours, want, key)


# -- checkpoints ----------------------------------------------------------------------------

def save_then_step(rank: int, world: int, path: str) -> tuple[float, dict]:
    """EP 4: three steps, a checkpoint (with the optimizer state), then the next step."""
    layout = par.init_parallel(4)
    model = build(layout)
    wrapped = par.data_parallel(model, layout)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    train_steps(model, wrapped, opt, layout, rank, world, range(3))
    par.save_checkpoint(path, wrapped, opt, layout, extra={"step": 3})
    loss = train_steps(model, wrapped, opt, layout, rank, world, [3])
    return loss[0], plain_state(model)


def load_then_step(rank: int, world: int, path: str, ep_size: int, recipe: str
                   ) -> tuple[float, dict, dict]:
    layout = par.init_parallel(ep_size)
    model = build(layout, seed=123)  # other weights: the checkpoint must replace them all
    wrapped = wrap(model, layout, recipe)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    extra = par.load_checkpoint(path, wrapped, opt, layout)
    loss = train_steps(model, wrapped, opt, layout, rank, world, [extra["step"]])
    return loss[0], plain_state(model), extra


@pytest.fixture(scope="module")
def ep4_checkpoint(tmp_path_factory) -> tuple[str, list]:
    """A checkpoint saved at EP 4 after three steps, and what the next step gave there."""
    path = str(tmp_path_factory.mktemp("ep4") / "ckpt")
    return path, run_ranks(save_then_step, 4, path, timeout=120)


@pytest.mark.parametrize("world,ep_size,recipe", [(4, 2, "ddp"), (4, 1, "ddp"), (2, 2, "ddp"),
                                                  (4, 2, "fsdp")])
def test_checkpoint_at_ep4_resumes_at_another_layout(ep4_checkpoint, world, ep_size, recipe):
    path, saved = ep4_checkpoint
    resumed = run_ranks(load_then_step, world, path, ep_size, recipe, timeout=120)
    assert {r[2]["step"] for r in resumed} == {3}
    # the global batch's loss: the mean of the ranks' (equal shares)
    loss, resumed_loss = (sum(r[0] for r in runs) / len(runs) for runs in (saved, resumed))
    assert abs(resumed_loss - loss) <= 1e-6 * loss, (resumed_loss, loss)
    expected = assemble([s[1] for s in saved])
    got = assemble([r[1] for r in resumed])
    for key in expected:
        close(key_bias_free(key, got[key]), key_bias_free(key, expected[key]), key)


def load_mismatched(rank: int, world: int, path: str, what: str) -> str:
    layout = par.init_parallel(2)
    overrides = {"num_experts": 4} if what == "experts" else {"hidden_dim": 2 * HIDDEN}
    model = build(layout, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    try:
        par.load_checkpoint(path, model, opt, layout)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


@pytest.mark.parametrize("what", ["experts", "hidden"])
def test_checkpoint_into_another_expert_shape_is_a_clear_error(ep4_checkpoint, what):
    path, _ = ep4_checkpoint
    messages = run_ranks(load_mismatched, 4, path, what, timeout=120)
    for message in messages:
        assert "global shape" in message and "num_experts" in message, message
    mine = "(4, 16, 32)" if what == "experts" else "(8, 16, 64)"
    assert "experts.w1_EMH" in messages[0] and "(8, 16, 32)" in messages[0], messages[0]
    assert f"this model's is {mine}" in messages[0], messages[0]


def plain_state_dicts(rank: int, world: int) -> dict:
    """One rank's plain state dict cannot load into another rank's experts; the gathered one
    loads everywhere, each rank taking its rows."""
    layout = par.init_parallel(2)
    model = build(layout)
    mine = model.state_dict()
    other = [None] * world
    torch.distributed.all_gather_object(other, mine)
    outcome = {}
    try:
        build(layout, seed=5).load_state_dict(other[(rank + 1) % world])
        outcome["other rank's"] = "loaded"
    except CheckpointError as exc:
        outcome["other rank's"] = str(exc)
    full = par.full_state_dict(model)
    layout1 = par.init_parallel(1)
    fresh = build(layout1, seed=5)  # EP 1: every expert on every rank
    fresh.load_state_dict(full)
    outcome["full at EP 1"] = all(torch.equal(fresh.state_dict()[k], v)
                                  for k, v in full.items())
    fresh2 = build(layout, seed=5)
    fresh2.load_state_dict(full)
    outcome["full at EP 2"] = all(torch.equal(fresh2.state_dict()[k], mine[k]) for k in mine)
    return outcome


def test_plain_state_dict_never_loads_into_the_wrong_experts():
    for outcome in run_ranks(plain_state_dicts, 4, timeout=120):
        assert "this rank needs" in outcome["other rank's"], outcome
        assert outcome["full at EP 1"] and outcome["full at EP 2"]


def fsdp_with_pipeline(rank: int, world: int) -> str:
    layout = par.init_parallel(2)
    try:
        par.fully_shard_moe(build(layout, scheduler="pipeline"), layout)
    except ConfigError as exc:
        return str(exc)
    return "wrapped"


def test_fsdp_recipe_refuses_pipelined_schedules_clearly():
    for message in run_ranks(fsdp_with_pipeline, 2, timeout=60):
        assert "scheduler='sequential'" in message and "pipeline" in message, message
