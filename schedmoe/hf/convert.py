"""`convert`: replace a transformers model's sparse-MoE blocks with MoELayers holding the same
weights; `to_hf_state_dict`: the converted model's weights in the original layout.

Legend: E experts (global), W ranks in the EP group, n = E / W local experts, M model dim.

A converted block (`HFMoEBlock`) keeps the block's calling convention ([B, S, M] in, the same
shape out; GPT-OSS's (hidden, router scores)) and keeps the model's own router module under
its original name, sharing its weight (and DeepSeek-V3's selection bias) with the layer's gate.
The router module is still called when something listens to it (transformers records
`router_logits` for `output_router_logits=True` with forward hooks on that class), so the
model's own aux loss keeps working; otherwise routing is computed once, by the layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..comm.groups import EPGroup
from ..errors import UnsupportedModelError
from ..layer import MoELayer
from ..parallel.checkpoint import gather_experts, model_entries
from ..parallel.identity import ExpertMap, canonical_name
from .families import (FAMILIES, Family, expert_tensors, hf_expert_tensors, hf_shared_tensors,
                       looks_like_moe, shared_tensors)


class HFMoEBlock(nn.Module):
    """A transformers sparse-MoE block served by an MoELayer (`moe`)."""

    def __init__(self, family: Family, router: nn.Module, layer: MoELayer) -> None:
        super().__init__()
        self.family = family
        setattr(self, family.router, router)  # same name as in the block: same state-dict keys
        self.moe = layer

    @property
    def hf_router(self) -> nn.Module:
        """The model's own router module (named `gate` or `router` as in the block)."""
        return getattr(self, self.family.router)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        scores = None
        if self.family.returns_scores or self.hf_router._forward_hooks:
            # The model's router, for whoever listens (router-logit recording) and for the
            # scores GPT-OSS returns; the layer routes by itself with the same weights.
            scores = self.hf_router(hidden_states.reshape(-1, hidden_states.shape[-1]))[1]
        y = self.moe(hidden_states)
        return (y, scores) if self.family.returns_scores else y


def convert(model: nn.Module, group: dist.ProcessGroup | None = None,
            **layer_options) -> nn.Module:
    """Replace, in place, every sparse-MoE block of a supported family (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS) with an `HFMoEBlock`; each EP rank of `group` keeps
    only its experts. `layer_options` go to every MoELayer (scheduler, compressor, a2a, ...;
    the default capacity_factor is 0: dropless, like the original). Returns the model."""
    ep = EPGroup.resolve(group)
    blocks = [(name, module) for name, module in model.named_modules() if looks_like_moe(module)
              and not isinstance(module, HFMoEBlock)]
    unknown = sorted({type(m).__name__ for _, m in blocks} - set(FAMILIES))
    if unknown:
        raise UnsupportedModelError(
            f"schedmoe.hf cannot convert MoE blocks of type {', '.join(unknown)}; supported: "
            f"{', '.join(sorted(FAMILIES))}")
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no sparse-MoE block schedmoe.hf knows "
            f"({', '.join(sorted(FAMILIES))}); nothing to convert")
    for name, block in blocks:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _convert_block(block, FAMILIES[type(block).__name__], group, ep,
                                             layer_options))
    return model


def _convert_block(block: nn.Module, family: Family, group, ep: EPGroup,
                   layer_options: dict) -> HFMoEBlock:
    options = family.options(block)
    router = getattr(block, family.router)
    weight = router.weight
    options = {"capacity_factor": 0.0, **options, **layer_options}
    model_dim = weight.shape[1]
    devices = [weight.device.index or 0] if weight.is_cuda else []
    with torch.random.fork_rng(devices=devices):  # the model's RNG streams stay as they were
        layer = MoELayer(model_dim, options.pop("num_experts"), options.pop("hidden_dim"),
                         options.pop("top_k"), group=group, **options)
    layer.to(device=weight.device, dtype=weight.dtype)
    # The gate shares the model's router parameters (and selection bias).
    layer.gate.wg_EM = weight
    if getattr(router, "bias", None) is not None and layer.gate.bias_E is not None:
        layer.gate.bias_E = router.bias
    for ours, theirs in family.router_buffers.items():
        layer.gate.register_buffer(ours, getattr(router, theirs))
    lo = ep.rank * layer.num_local_experts
    _load(layer.experts, expert_tensors(block.experts, family.layout, lo,
                                        lo + layer.num_local_experts))
    if family.shared is not None:
        _load(layer.shared.mlp, shared_tensors(getattr(block, family.shared)))
    if family.shared_gate is not None:
        _load(layer.shared, {"gate_1M": getattr(block, family.shared_gate).weight})
    return HFMoEBlock(family, router, layer)


@torch.no_grad()
def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        param = getattr(module, name)
        if param.shape != value.shape:
            raise UnsupportedModelError(f"{type(module).__name__}.{name}: expected shape "
                                        f"{tuple(param.shape)}, the model has {tuple(value.shape)}")
        param.copy_(value)


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's state dict in the original transformers layout (every expert,
    gathered over each block's EP group; a collective: call it on every rank). Loads into the
    unconverted model (`load_state_dict`, or `save_pretrained(..., state_dict=...)`)."""
    experts = ExpertMap(model)  # identity and canonical names: wrappers change neither
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, HFMoEBlock] = {}
    for name, module in model.named_modules():
        if isinstance(module, HFMoEBlock):
            blocks.setdefault(canonical_name(model, name), module)
    for fqn, value, _ in model_entries(model, experts):
        if not any(fqn.startswith(f"{name}.moe.") for name in blocks):
            out[fqn] = _whole(value) if isinstance(value, torch.Tensor) else value
    for name, block in blocks.items():
        layer, family = block.moe, block.family
        ours = {n: gather_experts(p.detach(), layer.group)
                for n, p in layer.experts.named_parameters()}
        for key, value in hf_expert_tensors(ours, family.layout).items():
            out[f"{name}.experts.{key}"] = value
        if family.shared is not None:
            mlp = {n: _whole(p) for n, p in layer.shared.mlp.named_parameters()}
            for key, value in hf_shared_tensors(mlp).items():
                out[f"{name}.{family.shared}.{key}"] = value
        if family.shared_gate is not None:
            out[f"{name}.{family.shared_gate}.weight"] = _whole(layer.shared.gate_1M).clone()
    return out


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A detached dense tensor, gathered if FSDP2 sharded it (a collective then)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
