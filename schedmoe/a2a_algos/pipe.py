"""Pipe-A2A (ScheMoE): the flat exchange's intra-node pairs and inter-node pairs, in flight at
the same time on two communicators.

No reshaping: intra-node rows go with one all_to_all_single on the intra-node group (the rows
for and from this node are contiguous), inter-node rows as point-to-point sends and receives on
a second communicator over the whole EP group, straight from and into the output. On GPUs each
communicator has its own stream; on CPUs gloo runs each group on its own threads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm.groups import collective
from ..registry import register_a2a
from .base import A2AAlgorithm, A2AHandle
from .segments import offsets


@register_a2a("pipe")
class PipeA2A(A2AAlgorithm):
    """Intra-node and inter-node pairs at once, on node positions (`group_peer` maps back)."""

    uses_topology = True

    def _start(self, x: torch.Tensor, send: list[int], recv: list[int],
               even: bool) -> A2AHandle:
        topo = self.topology
        out = x.new_empty((sum(recv), *x.shape[1:]))
        send_at, recv_at = offsets(send), offsets(recv)
        lo, hi = topo.node * topo.local_size, (topo.node + 1) * topo.local_size
        works = []
        with collective("pipe all-to-all", self.group):
            if topo.local_size > 1:
                works.append(dist.all_to_all_single(
                    out[recv_at[lo]:recv_at[hi]], x[send_at[lo]:send_at[hi]], recv[lo:hi],
                    send[lo:hi], group=topo.intra.pg, async_op=True))
            else:
                out[recv_at[lo]:recv_at[hi]] = x[send_at[lo]:send_at[hi]]
            ops = []
            for peer in range(self.group.size):
                if topo.same_node(peer):
                    continue
                rank = topo.order[peer]
                if send[peer]:
                    ops.append(dist.P2POp(dist.isend, x[send_at[peer]:send_at[peer + 1]],
                                          group=topo.spare.pg, group_peer=rank))
                if recv[peer]:
                    ops.append(dist.P2POp(dist.irecv, out[recv_at[peer]:recv_at[peer + 1]],
                                          group=topo.spare.pg, group_peer=rank))
            if ops:
                works.extend(dist.batch_isend_irecv(ops))

        def wait() -> torch.Tensor:
            with collective("pipe all-to-all", self.group):
                for work in works:
                    work.wait()
            return out

        return A2AHandle(wait)
