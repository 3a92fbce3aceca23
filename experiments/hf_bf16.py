"""Converted vs unconverted transformers models in bf16 (issue 11): how far apart they are.

    python3 experiments/hf_bf16.py        # ~20 s

For each family's tiny random model (tests/hf_models.py; 8 experts) in bf16 on one rank: the
largest and the median relative difference of the logits, the share of positions whose argmax
differs, and the share of (token, layer) routing decisions whose expert set differs. In fp32
the converted models match to ~1e-7 (tests/test_hf.py). In bf16 transformers computes the router
logits in bf16 (all but DeepSeek-V3's), schedmoe in fp32, and the expert GEMMs accumulate in
another order, so some tokens pick another expert.

Writes experiments/results/hf_bf16.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import FAMILIES, tiny_model, token_ids  # noqa: E402

import schedmoe.hf as hf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def routing_sets(model, ids) -> list[list[frozenset]]:
    """Per MoE block, the expert set of every token, read from the model's router module."""
    sets: list[list[frozenset]] = []

    def hook(module, args, output):
        sets.append([frozenset(row) for row in output[2].tolist()])

    routers = [m for name, m in model.named_modules()
               if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
    handles = [r.register_forward_hook(hook) for r in routers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return sets


def ours(converted, ids) -> list[list[frozenset]]:
    sets = []
    for m in converted.modules():
        if isinstance(m, hf.HFMoEBlock):
            def hook(module, args, output):
                sets.append([frozenset(row) for row in output.expert_TK.tolist()])
            m.moe.gate.register_forward_hook(hook)
    with torch.no_grad():
        converted(ids)
    return sets


def compare(family: str) -> dict:
    reference = tiny_model(family, dtype=torch.bfloat16)
    # transformers' grouped_mm path needs 16-byte strides the tiny sizes lack on CPU; its
    # eager path computes the same function (fp32: identical logits, shared/REFERENCE.md)
    reference.set_experts_implementation("eager")
    converted = hf.convert(copy.deepcopy(reference))
    ids = torch.cat([token_ids(r, batch=4, length=16) for r in range(4)])
    with torch.no_grad():
        want = reference(ids).logits.float()
        got = converted(ids).logits.float()
    rel = (got - want).abs() / want.abs().amax(dim=-1, keepdim=True)
    theirs, mine = routing_sets(reference, ids), ours(converted, ids)
    decisions = sum(len(layer) for layer in theirs)
    differ = sum(a != b for lt, lm in zip(theirs, mine) for a, b in zip(lt, lm))
    return {"logits_max_rel_diff": float(rel.max()), "logits_median_rel_diff": float(rel.median()),
            "argmax_differs": float((got.argmax(-1) != want.argmax(-1)).float().mean()),
            "routing_sets_differ": differ / decisions, "routing_decisions": decisions}


def main() -> None:
    result = {"command": "python3 experiments/hf_bf16.py", "dtype": "bfloat16",
              "tokens": 256, "families": {family: compare(family) for family in FAMILIES}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hf_bf16.json").write_text(json.dumps(result, indent=1))
    json.dump(result["families"], sys.stdout, indent=1)


if __name__ == "__main__":
    main()
