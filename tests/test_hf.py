"""schedmoe.hf against the unconverted transformers models: logits, gradients, greedy
generation, router-logit outputs and the aux loss, and the state-dict round trip, on 1, 2 and
4 gloo ranks (each rank its own batch; the reference runs every rank's batch itself)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import schedmoe  # noqa: E402
import schedmoe.hf as hf  # noqa: E402
from schedmoe.hf.families import FAMILIES as BLOCKS, expert_tensors, shared_tensors  # noqa: E402
from schedmoe.tools.testing import run_ranks  # noqa: E402

from hf_models import FAMILIES, tiny_model, token_ids  # noqa: E402

RTOL = 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _loss(model, ids):
    return model(ids).logits.float().square().mean()


def _moe_blocks(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in BLOCKS]


def compare(rank: int, world: int, family: str, scheduler="sequential") -> dict[str, float]:
    """Relative errors of the converted model against the reference, on this rank."""
    reference = tiny_model(family)
    converted = hf.convert(copy.deepcopy(reference), scheduler=scheduler)
    ids = token_ids(rank)
    errors = {"logits": _rel(converted(ids).logits, reference(ids).logits)}

    # Gradients: non-expert parameters see this rank's batch only; an expert sees every rank's
    # tokens, so its reference gradient is that of the sum of every rank's loss.
    _loss(converted, ids).backward()
    ref_grads = []
    for r in range(world):
        reference.zero_grad()
        _loss(reference, token_ids(r)).backward()
        ref_grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    mine = ref_grads[rank]
    total = {n: sum(g[n] for g in ref_grads) for n in mine}
    embed = "model.embed_tokens.weight"
    errors["embedding grad"] = _rel(converted.get_parameter(embed).grad, mine[embed])
    for (name, block), (_, ours) in zip(_moe_blocks(reference), _converted_blocks(converted)):
        spec = BLOCKS[type(block).__name__]
        router = getattr(ours, spec.router).weight
        errors[f"{name} router grad"] = _rel(router.grad, mine[f"{name}.{spec.router}.weight"])
        layer = ours.moe
        lo = layer.expert_offset
        grads = SimpleNamespace(**{k.rpartition(".")[2]: v for k, v in total.items()
                                   if k.startswith(f"{name}.experts.")})
        want = expert_tensors(grads, spec.layout, lo, lo + layer.num_local_experts)
        for key, value in want.items():
            errors[f"{name} expert {key} grad"] = _rel(getattr(layer.experts, key).grad, value)
        if spec.shared is not None:
            shared = {k.split(".")[-2]: SimpleNamespace(weight=v) for k, v in mine.items()
                      if k.startswith(f"{name}.{spec.shared}.")}
            for key, value in shared_tensors(SimpleNamespace(**shared)).items():
                errors[f"{name} shared {key} grad"] = _rel(
                    getattr(layer.shared.mlp, key).grad, value)
        if spec.shared_gate is not None:
            errors[f"{name} shared gate grad"] = _rel(
                layer.shared.gate_1M.grad, mine[f"{name}.{spec.shared_gate}.weight"])

    # Greedy generation: the same tokens (every rank takes the same number of steps).
    with torch.no_grad():
        steps = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
        same = torch.equal(converted.generate(ids, **steps), reference.generate(ids, **steps))
    errors["generate differs"] = float(not same)

    # The model's own router-logit outputs and aux loss.
    with torch.no_grad():
        got = converted(ids, output_router_logits=True)
        want = reference(ids, output_router_logits=True)
    errors["router logits"] = max(_rel(a, b) for a, b in zip(got.router_logits,
                                                               want.router_logits))
    errors["router logits count differs"] = float(len(got.router_logits) !=
                                                  len(want.router_logits))
    if want.aux_loss is None:  # DeepSeek-V3 computes none
        errors["aux loss differs"] = float(got.aux_loss is not None)
    else:
        errors["aux loss"] = _rel(got.aux_loss, want.aux_loss)

    # The state dict in the original layout, bit-exact, loadable by the plain model.
    state = hf.to_hf_state_dict(converted)
    original = reference.state_dict()
    errors["state keys differ"] = float(set(state) != set(original))
    errors["state values differ"] = float(not all(torch.equal(state[k], original[k])
                                                  for k in original if k in state))
    return errors


def _converted_blocks(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, hf.HFMoEBlock)]


def _check(errors: dict[str, float], what: str) -> None:
    bad = {k: v for k, v in errors.items() if v > RTOL}
    assert not bad, (what, bad)
    assert len(errors) > 8, errors  # the comparisons did run


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_model_matches_the_original_on_one_rank(family):
    _check(compare(0, 1, family), family)


@pytest.mark.parametrize("family,world,scheduler", [
    ("mixtral", 2, "sequential"), ("qwen2_moe", 2, "pipeline"), ("qwen3_moe", 2, "sequential"),
    ("olmoe", 2, "sequential"), ("deepseek_v3", 2, "adaptive"), ("gpt_oss", 2, "sequential"),
    ("deepseek_v3", 4, "pipeline"), ("qwen2_moe", 4, "sequential"), ("gpt_oss", 4, "pipeline"),
    ("mixtral", 4, "pipeline"), ("qwen3_moe", 4, "adaptive"), ("olmoe", 4, "sequential")])
def test_converted_model_matches_the_original_on_several_ranks(family, world, scheduler):
    for rank, errors in enumerate(run_ranks(compare, world, family, scheduler, timeout=300)):
        _check(errors, f"{family} {scheduler} rank {rank}")


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {"num_experts_per_tok": 1}), ("qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", {"num_experts_per_tok": 3}), ("gpt_oss", {"num_experts_per_tok": 1}),
    ("deepseek_v3", {"n_group": 2, "topk_group": 1, "norm_topk_prob": False}),
    ("qwen2_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True})])
def test_other_configurations_convert_exactly(family, overrides):
    reference = tiny_model(family, seed=3, **overrides)
    converted = hf.convert(copy.deepcopy(reference))
    ids = token_ids(5)
    assert _rel(converted(ids).logits, reference(ids).logits) < RTOL


def test_trained_model_saves_into_plain_transformers(tmp_path):
    """One optimiser step on the converted model and on the original: the saved weights load
    into plain transformers and give the stepped original's logits."""
    reference = tiny_model("deepseek_v3")
    converted = hf.convert(copy.deepcopy(reference))
    ids = token_ids(0)
    for model in (reference, converted):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _loss(model, ids).backward()
        opt.step()
    converted.save_pretrained(tmp_path, state_dict=hf.to_hf_state_dict(converted))
    loaded = type(reference).from_pretrained(tmp_path).eval()
    assert _rel(loaded(ids).logits, reference(ids).logits) < RTOL


class _UnknownSparseMoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unsupported_blocks_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), _UnknownSparseMoeBlock())
    with pytest.raises(schedmoe.UnsupportedModelError, match="_UnknownSparseMoeBlock"):
        hf.convert(model)
    with pytest.raises(schedmoe.UnsupportedModelError, match="no sparse-MoE block"):
        hf.convert(nn.Sequential(nn.Linear(4, 4)))
