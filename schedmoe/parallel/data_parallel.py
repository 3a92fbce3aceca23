"""Data parallelism that keeps experts right: a DDP recipe, an FSDP2 recipe, and global-norm
gradient clipping.

Legend: W ranks = EDP x EP (mesh.py).

Gradient scale rule. Every rank computes the mean loss of its own share of the global batch,
so the global loss is the mean over the W ranks. A dense gradient is then the mean over all W
ranks (what DDP and FSDP do by default). An expert's gradient on one rank already sums the
contributions of the tokens of every rank of its EP group (the backward exchange brings them
home), so the global gradient is the SUM over its EDP group divided by W (= the EDP mean times
1/EP; Megatron's `expert_gradient_scaling_factor = edp / dp`). With it, EP x DP training on the
global batch equals single-process training on it (tests/test_parallel.py). The balance loss
is part of that only if it is one of the global batch: `balance_loss="global"` with
`balance_group` = the whole world (what `schedmoe train` uses).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..ops.experts.forms import mark_expert_parameters
from ..schedulers import SequentialScheduler
from .identity import ExpertMap, ExpertTensor
from .mesh import ParallelLayout, check_layers, local_part


def data_parallel(model: nn.Module, layout: ParallelLayout,
                  **ddp_options) -> DistributedDataParallel:
    """`model` in DDP over every rank for its dense parameters, its expert parameters kept out
    of DDP (which would average every expert with other ranks' different experts) and reduced
    over their EDP group at the end of each backward that DDP syncs (not under `no_sync()`),
    with the scale rule above. Experts start equal across their EDP group (broadcast from its
    first rank, as DDP broadcasts rank 0's dense parameters)."""
    check_layers(model, layout)
    experts = ExpertMap(model)
    names = [n for n, p in model.named_parameters() if p in experts]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    ddp = DistributedDataParallel(model, process_group=layout.dp_group, **ddp_options)
    fix_buckets(ddp)
    broadcast_experts(experts.parameters(), layout)
    ddp.expert_sync = ExpertGradSync(ddp, experts.parameters(), layout)
    return ddp


def fix_buckets(ddp: DistributedDataParallel) -> None:
    """Give DDP its final gradient buckets now. DDP otherwise rebuilds them after its first
    backward, in the order the gradients became ready; an element's place in its bucket decides
    the order in which the ranks' values are summed, so a process's first step would round
    differently from the same step in a longer-running process, and a resumed run would not
    be bit-identical to the uninterrupted one. Buckets in parameter order, rebuilt once here,
    are the same in every process from its first step (a collective: DDP syncs the layout)."""
    if ddp.require_backward_grad_sync and not ddp.static_graph and \
            not ddp.find_unused_parameters:  # the cases in which DDP would rebuild them
        ddp.reducer._push_all_rebuilt_params()
        ddp.reducer._rebuild_buckets()


@torch.no_grad()
def broadcast_parameters(params: list[nn.Parameter], source: int,
                         group: dist.ProcessGroup) -> None:
    """Make `params` equal across `group`: global rank `source`'s."""
    for p in params:
        dist.broadcast(p.data, source, group=group)


def broadcast_experts(experts: list[nn.Parameter], layout: ParallelLayout) -> None:
    """Make the expert parameters equal across their EDP group (its first rank's)."""
    broadcast_parameters(experts, dist.get_global_rank(layout.edp_group, 0), layout.edp_group)


@torch.no_grad()
def reduce_expert_grads(experts: list[nn.Parameter], layout: ParallelLayout) -> None:
    """The scale rule for expert gradients: summed over the EDP group, divided by W (one flat
    all-reduce per dtype; a missing gradient counts as zeros, so the ranks' calls match)."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in experts:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads)
        flat.mul_(1.0 / layout.world_size)
        if layout.edp_size > 1:
            dist.all_reduce(flat, group=layout.edp_group)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


class ExpertGradSync:
    """Reduces the expert gradients over the EDP group once per synced backward
    (`reduce_expert_grads`): queued by the first gradient of the backward pass, run when
    autograd finishes it."""

    def __init__(self, ddp: DistributedDataParallel, params: list[nn.Parameter],
                 layout: ParallelLayout) -> None:
        self.ddp, self.params, self.layout = ddp, params, layout
        self.queued = False
        for p in ddp.module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._queue)

    def _queue(self, _param: torch.Tensor) -> None:
        if not self.queued and self.ddp.require_backward_grad_sync:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce)

    def reduce(self) -> None:
        self.queued = False
        reduce_expert_grads(self.params, self.layout)


def fully_shard_moe(model: nn.Module, layout: ParallelLayout, **fsdp_options) -> nn.Module:
    """FSDP2 (`fully_shard`) for an MoE model: each layer's experts sharded on their own EDP
    mesh (their gradients reduce-scattered there, divided by W: the scale rule), then the rest
    of the model on the whole world. Returns `model` (now an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


    layers = [layer for _, layer in check_layers(model, layout)]
    for layer in layers:
        if not isinstance(layer.scheduler, SequentialScheduler):
            # Measured: the pipelined schedules run each chunk's expert backward inside their
            # own backward, where FSDP2's post-backward hooks lose all but one chunk's gradient.
            raise ConfigError(
                f"the FSDP2 recipe needs scheduler='sequential', this layer has "
                f"{layer.scheduler.describe()}; use data_parallel (the DDP recipe) with "
                "pipelined or adaptive schedules")
    for layer in layers:
        if layer.placed:
            raise ConfigError(
                "the FSDP2 recipe shards each layer's expert rows over its EDP group and cannot "
                "place them: this layer has replica slots or a planned placement; use "
                "data_parallel (the DDP recipe), or redundant_slots=0 and the static placement")
    for layer in layers:
        fully_shard(layer.experts, mesh=layout.mesh["edp"], **fsdp_options)
        register_fsdp_forward_method(layer.experts, "forward_ragged")  # ragged calls use it
        layer.experts.set_gradient_divide_factor(float(layout.world_size))
        if dist.get_backend(layout.edp_group) == "gloo":  # no PREMUL_SUM: sum, then divide
            layer.experts.set_force_sum_reduction_for_comms(True)
    model = fully_shard(model, mesh=layout.world_mesh, **fsdp_options)
    for layer in layers:  # fully_shard replaced the Parameters, and their attributes with them
        mark_expert_parameters(layer.experts)
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Clip every gradient of `model` (DDP or FSDP2 recipe) by the global norm, counting every
    parameter element once: a replicated gradient (dense under DDP, an expert across its EDP
    group) only on the first rank that holds it, a sharded one (FSDP2) on each shard's rank, a
    replicated expert (replica slots; after `sync_replica_grads`) in its first slot only.
    Returns the total norm (the same on every rank), like torch.nn.utils.clip_grad_norm_."""
    experts = ExpertMap(model)
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    owned = [_each_expert_once(local_part(p.grad), experts.get(p)) for p in params
             if _first_holder(p in experts, p.grad, layout)]
    device = grads[0].device if grads else torch.device("cpu")
    if norm_type == math.inf:
        total = torch.stack([g.abs().max().float() for g in owned if g.numel()] or
                            [torch.zeros((), device=device)]).max()
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    else:
        total = torch.stack([g.float().norm(norm_type) ** norm_type for g in owned] or
                            [torch.zeros((), device=device)]).sum()
        dist.all_reduce(total)
        total = total ** (1.0 / norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch's, without a host sync
    for g in grads:
        local_part(g).mul_(coef.to(g.dtype))
    return total


def _each_expert_once(g: torch.Tensor, expert: ExpertTensor | None) -> torch.Tensor:
    """An expert gradient's rows without the second and later replicas of an expert."""
    if expert is None or not expert.layer.config.redundant_slots:
        return g
    return g[expert.first_copies()]


def _first_holder(expert: bool, g: torch.Tensor, layout: ParallelLayout) -> bool:
    """Whether this rank counts `g` (an expert's gradient or not) in the global norm (see
    clip_grad_norm_)."""
    if isinstance(g, DTensor):  # sharded: count each shard; replicated dims: the first rank
        coords = g.device_mesh.get_coordinate()
        return all(c == 0 for c, place in zip(coords, g.placements)
                   if isinstance(place, Replicate))
    if expert:
        return layout.edp_rank == 0
    return dist.get_rank() == 0
