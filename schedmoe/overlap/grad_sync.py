"""Data-parallel gradients sent in chunks while no MoE exchange needs the link (FlowMoE's
scheduled all-reduce), instead of DDP's buckets, which compete with the A2As or wait for the
end of the backward pass.

Legend: W ranks = EDP x EP (parallel/mesh.py).

    sync = GradSync(model, layout)                # instead of data_parallel(model, layout)
    loss.backward()                               # or interleaved_step(...): micro_batches=2
    sync.finish()
    optimizer.step(); optimizer.zero_grad()

A step that raised on a rank (a typed error of its MoE layers, raised on every rank of its EP
group, say) is dropped there with `sync.discard()` instead of `finish()`. A last, one-element
chunk, sent by `finish()` or `discard()` only, counts the ranks that dropped the step: if any
did, `finish()` drops it too (the gradients become None, so `optimizer.step()` changes
nothing) and returns False. Either way the next step starts clean.

    try:
        loss.backward()
        if sync.finish():
            optimizer.step()
    except SchedMoEError:
        sync.discard()
    optimizer.zero_grad()

The dense parameters, in reverse order of registration (about the order backward produces
their gradients), are cut into chunks of `chunk_bytes` (a large parameter spans several). A
chunk is ready once each parameter in it has received its gradient from each of the step's
`micro_batches` backward passes.
Chunks go out strictly in chunk order (the same on every rank, whatever order they get ready
in) as async all-reduces on a process group of their own (so that they never queue in front of
an A2A in the EP group's worker threads), at most `window` at a moment, and only while no
exchange is in flight (link.py): the A2As have priority, a chunk waits for the next idle
moment. A moment is any gradient arriving or exchange finishing: points of the program, so
every rank sends each chunk at the same place among its exchanges whatever the timing (no
decision reads whether a collective has completed).
`finish()` sends what is left, waits, and applies data_parallel.py's scale rule: the dense
gradients become the mean over all W ranks, the expert gradients the sum over their EDP group
divided by W. The result equals the DDP recipe's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..parallel.data_parallel import (broadcast_experts, broadcast_parameters,
                                      reduce_expert_grads)
from ..parallel.identity import ExpertMap
from ..parallel.mesh import ParallelLayout, check_layers
from . import link


@dataclass
class _Chunk:
    pieces: list[tuple[nn.Parameter, int, int]]  # elements [lo, hi) of each parameter's
    arrived: int = 0  # gradients received this step, over all its parameters
    flat: torch.Tensor | None = None  # the gradients, flattened once the chunk is ready
    work: dist.Work | None = field(default=None, repr=False)  # its all-reduce, once sent


class GradSync:
    """Scheduled gradient synchronisation of `model` over `layout` (see the module doc)."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, *, micro_batches: int = 1,
                 chunk_bytes: int = 1 << 20, window: int = 2,
                 wait_for_link: bool = True) -> None:
        for name, value in (("micro_batches", micro_batches), ("chunk_bytes", chunk_bytes),
                            ("window", window)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"GradSync's {name} must be a positive int, got {value!r}")
        check_layers(model, layout)
        self.layout, self.micro_batches, self.window = layout, micro_batches, window
        self.wait_for_link = wait_for_link  # False: chunks go out as soon as ready (ablation)
        params = [p for p in model.parameters() if p.requires_grad]
        experts = ExpertMap(model)
        self.experts = [p for p in params if p in experts]
        self.dense = dense = [p for p in params if p not in experts]
        ranks = dist.get_process_group_ranks(layout.dp_group)
        self.group = dist.new_group(ranks, backend=dist.get_backend(layout.dp_group))
        broadcast_parameters(dense, ranks[0], self.group)  # start equal, as DDP does
        broadcast_experts(self.experts, layout)
        # The last chunk holds no gradient: it counts the ranks that dropped the step.
        self.chunks = _cut(dense[::-1], chunk_bytes) + [_Chunk([])]
        self._chunks_of: dict[int, list[_Chunk]] = {}
        for chunk in self.chunks:
            for p, _, _ in chunk.pieces:
                self._chunks_of.setdefault(id(p), []).append(chunk)
        self._next = 0  # the first chunk not yet sent
        self._hooks = [p.register_post_accumulate_grad_hook(self._arrived) for p in dense]
        link.listen(self._pump)

    def _arrived(self, p: torch.Tensor) -> None:
        for chunk in self._chunks_of.get(id(p), []):
            if chunk.flat is not None:
                raise ConfigError(
                    "a gradient arrived after its chunk was sent: GradSync(micro_batches="
                    f"{self.micro_batches}) must equal the backward passes per step, "
                    "finish() must follow the last of them, and a step that raised must be "
                    "dropped with discard() before the next one")
            chunk.arrived += 1
            if chunk.arrived == len(chunk.pieces) * self.micro_batches:
                self._ready(chunk)
        self._pump()

    def _ready(self, chunk: _Chunk, dropped: bool = False) -> None:
        """The chunk's gradients, flat (zeros if `dropped`); the last chunk: 1 if this rank
        dropped the step, else 0."""
        if chunk is self.chunks[-1]:
            like = self.dense[0] if self.dense else torch.zeros(())
            chunk.flat = like.new_full((1,), float(dropped), dtype=torch.float32)
            return
        pieces = []
        for p, lo, hi in chunk.pieces:
            if dropped:
                pieces.append(p.new_zeros(hi - lo))
                continue
            if p.grad is None:  # no gradient this step (unused): zeros, so the ranks match
                p.grad = torch.zeros_like(p)
            pieces.append(p.grad.view(-1)[lo:hi])
        chunk.flat = torch.cat(pieces)

    def _pump(self) -> None:
        """At a moment (a gradient arrived, the link went idle): send the next chunks that are
        ready, at most `window` of them, unless an exchange is in flight. Every input to this
        decision follows from the program (the order of the backward's gradients and of the
        exchanges' waits), never from timing, so every rank issues its all-reduces at the
        same points among its A2As: NCCL needs that order across communicators."""
        sent = 0
        while (self._next < len(self.chunks) and self.chunks[self._next].flat is not None
               and sent < self.window and not (self.wait_for_link and link.busy())):
            self._send_next()
            sent += 1

    def _send_next(self) -> None:
        chunk = self.chunks[self._next]
        chunk.work = dist.all_reduce(chunk.flat, group=self.group, async_op=True)
        self._next += 1

    @torch.no_grad()
    def finish(self) -> bool:
        """Send what is left, wait for every chunk, write the results into `.grad`; True. If
        a rank dropped the step (`discard()`), drop it here too: gradients None, False."""
        if self._complete(dropped=False):
            return False
        scale = 1.0 / self.layout.world_size
        for chunk in self.chunks:
            chunk.flat.mul_(scale)
            at = 0
            for p, lo, hi in chunk.pieces:
                p.grad.view(-1)[lo:hi].copy_(chunk.flat[at:at + hi - lo])
                at += hi - lo
        self._reset()
        reduce_expert_grads(self.experts, self.layout)
        return True

    @torch.no_grad()
    def discard(self) -> None:
        """Drop this step here (it raised on this rank, between its first forward and
        `finish()`): the chunks not yet sent go out as zeros, so that the ranks' all-reduces
        stay paired whatever each had sent, and tell the others (their `finish()` drops the
        step too); the gradients become None and the next step starts clean."""
        self._complete(dropped=True)

    def _complete(self, dropped: bool) -> bool:
        """Send the chunks not yet sent and wait for all; whether any rank dropped the step
        (then the gradients are dropped here too and the state reset)."""
        while self._next < len(self.chunks):
            chunk = self.chunks[self._next]
            if dropped or chunk.flat is None:
                self._ready(chunk, dropped)
            self._send_next()
        for chunk in self.chunks:
            chunk.work.wait()
        # A host sync on GPUs, which the algorithm needs: whether to write the gradients.
        if not dropped and float(self.chunks[-1].flat[-1]) == 0:
            return False
        self._reset()
        for p in self.dense + self.experts:
            p.grad = None
        return True

    def _reset(self) -> None:
        for chunk in self.chunks:
            chunk.arrived, chunk.flat, chunk.work = 0, None, None
        self._next = 0

    def close(self) -> None:
        """Stop listening to the model's gradients and the link."""
        for hook in self._hooks:
            hook.remove()
        link.unlisten(self._pump)


def _cut(params: list[nn.Parameter], chunk_bytes: int) -> list[_Chunk]:
    """The parameters' elements, in order, in chunks of `chunk_bytes` (one dtype each)."""
    chunks: list[_Chunk] = []
    room = 0  # elements left in the last chunk
    for p in params:
        lo = 0
        while lo < p.numel():
            if room == 0 or chunks[-1].pieces[0][0].dtype != p.dtype:
                chunks.append(_Chunk([]))
                room = max(1, chunk_bytes // p.element_size())
            hi = min(p.numel(), lo + room)
            chunks[-1].pieces.append((p, lo, hi))
            room -= hi - lo
            lo = hi
    return chunks
