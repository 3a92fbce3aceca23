"""The transformers MoE blocks schedmoe converts, and how their weights map onto a layer.

Legend: E experts (global), M model dim, I expert hidden dim (intermediate size), n local
experts of one EP rank.

Each family names its block class, where the router and the experts live in it, the layer
options that reproduce its routing and expert maths, and its expert storage:
- `gate_rows`: `gate_up_proj [E, 2I, M]`, gate rows first, `down_proj [E, M, I]` (Linear-style,
  transposed relative to ours): Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3; loaded into the fused
  SwiGLU storage (`w13_EM2H`, one GEMM for gate and up).
- `interleaved`: `gate_up_proj [E, M, 2I]`, gate and up interleaved on the last dim (even: gate,
  odd: up), with `gate_up_proj_bias [E, 2I]`; `down_proj [E, I, M]` and `down_proj_bias [E, M]`:
  GPT-OSS; our fused, interleaved storage as it is.
Shared experts are `*MLP` modules with `gate_proj`/`up_proj`/`down_proj` Linears (no bias), and
Qwen2-MoE's `shared_expert_gate` is a `Linear(M, 1)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    block: str  # class name of the transformers sparse-MoE block
    options: Callable[[nn.Module], dict]  # the MoELayer options that reproduce the block
    layout: str = "gate_rows"  # expert storage, see the module docstring
    router: str = "gate"  # attribute of the router module in the block
    shared: str | None = None  # attribute of the shared-experts MLP
    shared_gate: str | None = None  # attribute of the shared experts' sigmoid gate Linear
    returns_scores: bool = False  # forward returns (hidden, router scores)
    router_buffers: dict[str, str] = field(default_factory=dict)  # ours -> the router's


def _softmax_topk(block: nn.Module, normalize: bool | None = None) -> dict:
    router = block.gate
    return {"gate": "topk", "top_k": router.top_k,
            "normalize_weights": router.norm_topk_prob if normalize is None else normalize,
            "gate_options": {"normalize_single": True}}


def _swiglu(block: nn.Module) -> dict:
    experts = block.experts
    return {"expert": "swiglu", "hidden_dim": experts.intermediate_dim,
            "num_experts": experts.num_experts, "activation": experts.act_fn,
            "expert_options": {"fused": True}}


def _mixtral(block):
    return {**_softmax_topk(block, normalize=True), **_swiglu(block),
            "input_jitter": float(block.jitter_noise)}


def _qwen_olmoe(block):
    return {**_softmax_topk(block), **_swiglu(block)}


def _qwen2(block):
    shared = block.shared_expert
    return {**_qwen_olmoe(block), "shared_hidden_dim": shared.intermediate_size,
            "shared_gate": True}


def _deepseek_v3(block):
    router = block.gate
    return {"gate": "sigmoid_grouped", "top_k": router.top_k,
            "normalize_weights": router.norm_topk_prob,
            "gate_options": {"num_groups": router.num_group, "topk_groups": router.topk_group,
                             "scaling": float(router.routed_scaling_factor)},
            **_swiglu(block), "shared_hidden_dim": block.config.moe_intermediate_size,
            "num_shared_experts": block.config.n_shared_experts}


def _gpt_oss(block):
    router, experts = block.router, block.experts
    return {"gate": "topk_softmax", "top_k": router.top_k, "gate_options": {"bias": True},
            "expert": "clamped_glu", "hidden_dim": experts.intermediate_size,
            "num_experts": experts.num_experts,
            "expert_options": {"alpha": float(experts.alpha), "limit": float(experts.limit),
                               "fused": True, "interleaved": True}}


FAMILIES = {f.block: f for f in (
    Family("mixtral", "MixtralSparseMoeBlock", _mixtral),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2, shared="shared_expert",
           shared_gate="shared_expert_gate"),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen_olmoe),
    Family("olmoe", "OlmoeSparseMoeBlock", _qwen_olmoe),
    Family("deepseek_v3", "DeepseekV3MoE", _deepseek_v3, shared="shared_experts",
           router_buffers={"score_bias_E": "e_score_correction_bias"}),
    Family("gpt_oss", "GptOssMLP", _gpt_oss, layout="interleaved", router="router",
           returns_scores=True),
)}


def looks_like_moe(module: nn.Module) -> bool:
    """A block with experts and a router: what `convert` must either know or refuse."""
    return hasattr(module, "experts") and (hasattr(module, "gate") or hasattr(module, "router"))


# -- expert weights: transformers' layout <-> ours -----------------------------------------------

def expert_tensors(experts: nn.Module, layout: str, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Our expert parameters (w1/w3/w2 and biases) for experts [lo, hi) of a transformers
    experts module."""
    if layout == "gate_rows":  # into the fused SwiGLU storage: one GEMM for gate and up
        return {"w13_EM2H": experts.gate_up_proj[lo:hi].transpose(1, 2),
                "w2_EHM": experts.down_proj[lo:hi].transpose(1, 2)}
    # interleaved: GPT-OSS's layout is our fused, interleaved storage as it is
    return {"w13_EM2H": experts.gate_up_proj[lo:hi], "b13_E2H": experts.gate_up_proj_bias[lo:hi],
            "w2_EHM": experts.down_proj[lo:hi], "b2_EM": experts.down_proj_bias[lo:hi]}


def hf_expert_tensors(ours: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """transformers' expert tensors (names under `experts.`) from ours for all E experts."""
    if layout == "gate_rows":
        return {"gate_up_proj": ours["w13_EM2H"].transpose(1, 2).contiguous(),
                "down_proj": ours["w2_EHM"].transpose(1, 2).contiguous()}
    return {"gate_up_proj": ours["w13_EM2H"].contiguous(),
            "gate_up_proj_bias": ours["b13_E2H"].contiguous(),
            "down_proj": ours["w2_EHM"].contiguous(), "down_proj_bias": ours["b2_EM"].contiguous()}


def shared_tensors(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """Our one-expert fused MLP's parameters from a transformers `*MLP` (Linear weights are
    [out, in]): gate and up side by side in w13."""
    w13_M2H = torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)
    return {"w13_EM2H": w13_M2H.unsqueeze(0), "w2_EHM": mlp.down_proj.weight.t().unsqueeze(0)}


def hf_shared_tensors(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gate_MH, up_MH = ours["w13_EM2H"][0].chunk(2, dim=1)
    return {"gate_proj.weight": gate_MH.t().contiguous(), "up_proj.weight": up_MH.t().contiguous(),
            "down_proj.weight": ours["w2_EHM"][0].t().contiguous()}
