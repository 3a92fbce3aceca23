"""Generation with expert parallelism in which every rank has its own prompts: different
lengths, batch sizes and stopping points, or none at all.

Every forward of a converted model calls each MoE layer once, in model order, and every call is
a collective over the layer's EP group. A rank that has finished (or had nothing to generate)
must keep making those calls until every rank of its group is done, or the others would wait
forever at their next exchange. The protocol, with no collective of its own:

- a rank generates its own batch with `model.generate` (transformers' loop, without its
  `synced_gpus` all-reduce), then serves;
- serving is calling every MoE layer in model order, again and again, with no tokens and the
  call marked idle in the layer's agreement record (`MoELayer.serve`): to the working ranks it
  is just another rank with an empty batch;
- a serving rank is always at a forward's boundary when it calls the first layer, and so is
  every working rank; when the first layer's agreement shows every rank idle, all are done,
  and each rank returns.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .convert import HFMoEBlock


def moe_layers_in_order(model: nn.Module) -> list:
    """The converted model's MoE layers in the order a forward calls them (module order)."""
    layers = [module.moe for module in model.modules() if isinstance(module, HFMoEBlock)]
    if not layers:
        raise ConfigError("the model has no converted MoE block; call schedmoe.hf.convert "
                          "first")
    return layers


@torch.no_grad()
def serve(model: nn.Module) -> int:
    """Keep the EP group's exchanges going with no tokens of this rank's own until every rank
    is serving (a collective: the other ranks generate or serve meanwhile). Returns the
    forwards served."""
    layers = moe_layers_in_order(model)
    dtype = next(model.parameters()).dtype
    served = 0
    while True:
        for i, layer in enumerate(layers):
            if layer.serve(dtype) and i == 0:
                return served
        served += 1


def generate(model: nn.Module, input_ids: torch.Tensor | None = None,
             **generate_options) -> torch.Tensor | None:
    """`model.generate(input_ids, **generate_options)` on this rank's own prompts (None, or a
    batch of 0: none), then serving the other ranks until every rank of the EP group is done.
    Call it on every rank; returns this rank's sequences (None if it had no prompts)."""
    if generate_options.get("synced_gpus"):
        raise ConfigError("schedmoe.hf.generate keeps the ranks in step itself; leave out "
                          "synced_gpus (its all-reduce would not match the serving ranks')")
    out = None
    if input_ids is not None and input_ids.shape[0] > 0:
        out = model.generate(input_ids, synced_gpus=False, **generate_options)
    serve(model)
    return out
