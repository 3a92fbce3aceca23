"""Auxiliary-loss-free balancing on a synthetic skewed stream (issue 11).

    python3 experiments/aux_free_balance.py       # ~20 s on 2 cores

A DeepSeek-V3-style router (16 experts, top-2, 4 groups keeping 2; fixed random weights, no
learning) sees batches of 4096 tokens whose inputs lean towards experts 0-2, so a few experts
are hot. After each batch `update_balancing_biases` moves the selection bias; the curve is
each batch's per-expert load max/mean, for several update rates and without updates.

Writes experiments/results/aux_free_balance.json and .png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from schedmoe.routing import GroupLimitedSigmoidRouter, update_balancing_biases

RESULTS = Path(__file__).resolve().parent / "results"
M, E, K, TOKENS, STEPS = 32, 16, 2, 4096, 400


def curve(rate: float, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    router = GroupLimitedSigmoidRouter(M, E, K, num_groups=4, topk_groups=2,
                                       bias_update_rate=rate).train()
    hot = router.wg_EM[:3].detach().sum(0)
    lean = 1.5 * hot / hot.norm()
    gen = torch.Generator().manual_seed(seed + 1)
    ratios = []
    with torch.no_grad():
        for _ in range(STEPS):
            expert_TK = router(torch.randn(TOKENS, M, generator=gen) + lean).expert_TK
            load = torch.bincount(expert_TK.reshape(-1), minlength=E).float()
            ratios.append(float(load.max() / load.mean()))
            update_balancing_biases(router)
    return ratios


def main() -> None:
    rates = [0.0, 0.001, 0.002, 0.005]
    curves = {str(rate): curve(rate) for rate in rates}
    summary = {}
    for rate, ratios in curves.items():
        below = next((i for i, v in enumerate(ratios) if v < 1.2), None)
        summary[rate] = {"first_step_below_1.2": below, "first": ratios[0],
                         "median_last_100": sorted(ratios[-100:])[50]}
    result = {"command": "python3 experiments/aux_free_balance.py", "experts": E, "top_k": K,
              "tokens_per_step": TOKENS, "steps": STEPS, "summary": summary,
              "max_over_mean_per_step": curves}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aux_free_balance.json").write_text(json.dumps(result, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for rate, ratios in curves.items():
        ax.plot(ratios, label="no update" if float(rate) == 0 else f"rate {rate}", lw=1)
    ax.axhline(1.2, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("step (4096 tokens each)")
    ax.set_ylabel("per-expert load max / mean")
    ax.set_ylim(1, None)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "aux_free_balance.png", dpi=120)
    json.dump(summary, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
