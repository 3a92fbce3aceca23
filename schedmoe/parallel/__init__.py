"""Training an MoE model with expert parallelism: the parallel layout (EP, expert-data-parallel
and data-parallel groups on a DeviceMesh), data-parallel recipes that keep experts right (DDP,
FSDP2), global-norm clipping, and checkpoints with global expert identity (DCP, resharding).

    layout = schedmoe.parallel.init_parallel(ep_size=2)
    model = build(group=layout.ep_group)          # MoELayers over the layout's EP group
    model = schedmoe.parallel.data_parallel(model, layout)   # or fully_shard_moe
    ...; loss.backward(); schedmoe.parallel.clip_grad_norm_(model, 1.0, layout); opt.step()
    schedmoe.parallel.save_checkpoint(path, model, opt, layout)

Built on the layer. May import: `errors`, `registry`, `layer`, `comm/`, `streams/`, `ops/`,
`plan/` (placements), `control/` (the load's statistics), `schedulers/`.
"""

import importlib

from .data_parallel import clip_grad_norm_, data_parallel, fully_shard_moe
from .identity import ExpertMap, canonical_name
from .mesh import ParallelLayout, expert_load, init_parallel, moe_layers, named_moe_layers
from .placement import rebalance, sync_replica_grads

# Checkpoints, imported on first use: `import schedmoe` (which needs `identity.py`) does not load
# torch.distributed.checkpoint.
_CHECKPOINT = ("full_state_dict", "gather_experts", "load_checkpoint", "read_manifest",
               "save_checkpoint", "verify_checkpoint")
__all__ = ["ParallelLayout", "init_parallel", "moe_layers", "named_moe_layers", "expert_load",
           "rebalance", "sync_replica_grads",
           "data_parallel", "fully_shard_moe", "clip_grad_norm_", *_CHECKPOINT, "ExpertMap",
           "canonical_name"]


def __getattr__(name: str):
    if name not in (*_CHECKPOINT, "checkpoint"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.checkpoint")
    value = module if name == "checkpoint" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
