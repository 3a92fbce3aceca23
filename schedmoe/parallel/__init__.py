"""Training an MoE model with expert parallelism: the parallel layout (EP, expert-data-parallel
and data-parallel groups on a DeviceMesh), data-parallel recipes that keep experts right (DDP,
FSDP2), global-norm clipping, and checkpoints with global expert identity (DCP, resharding).

    layout = schedmoe.parallel.init_parallel(ep_size=2)
    model = build(group=layout.ep_group)          # MoELayers over the layout's EP group
    model = schedmoe.parallel.data_parallel(model, layout)   # or fully_shard_moe
    ...; loss.backward(); schedmoe.parallel.clip_grad_norm_(model, 1.0, layout); opt.step()
    schedmoe.parallel.save_checkpoint(path, model, opt, layout)
"""

from .checkpoint import (full_state_dict, gather_experts, load_checkpoint, read_manifest,
                         save_checkpoint, verify_checkpoint)
from .identity import ExpertMap, canonical_name
from .data_parallel import clip_grad_norm_, data_parallel, fully_shard_moe
from .mesh import ParallelLayout, init_parallel, moe_layers, named_moe_layers

__all__ = ["ParallelLayout", "init_parallel", "moe_layers", "named_moe_layers", "data_parallel",
           "fully_shard_moe", "clip_grad_norm_", "save_checkpoint", "load_checkpoint",
           "full_state_dict", "gather_experts", "read_manifest", "verify_checkpoint", "ExpertMap",
           "canonical_name"]
