"""The agreement of a call compiled as one graph on several ranks (padded rows at a fixed
capacity, a traceable scheduler, the flat A2A, stateless fixed-size codecs; layer.py decides).

torch.compile cannot trace a collective whose result the host reads, so the call's record goes
through a custom op, opaque to the compiler and run at its place in the graph: it all-gathers
the record on the group's host backend (comm/groups.py) and concludes as an eager call would,
raising the same typed error on every rank. The shapes are those traced from this rank's own
state, so the ranks must agree on them: ranks that traced other capacities (other token
counts) or grad states raise ConfigError, every one of them, instead of re-running. The op's result, a
zero, is added to the payload, so the compiler keeps it and orders it before the exchanges.
"""

from __future__ import annotations

import weakref

import torch

from ..comm.groups import all_gather_ints
from ..errors import ConfigError
from .agreement import Agreed, Agreement, LocalStep, Misguessed

# id -> the agreement of a layer that may compile; weak, so that a layer and its process
# group are freed with the model (a kept group leaks its sockets and threads).
_AGREEMENTS: "weakref.WeakValueDictionary[int, Agreement]" = weakref.WeakValueDictionary()
_defined = False


def register(agreement: Agreement) -> int:
    """Make `agreement` reachable from the op (once per layer, before any trace); its key."""
    _define()
    _AGREEMENTS[id(agreement)] = agreement
    return id(agreement)


def agree(agreement: Agreement, key: int, local: LocalStep,
          device: torch.device) -> tuple[Agreed, torch.Tensor]:
    """What a compiled call agrees (this rank's own state), and the op's zero to add to the
    payload. `key`: `register(agreement)`'s."""
    agreed = Agreed(local.limit, local.input_grad, (local.layout,), local.dtype)
    record = [agreement.options_crc, *local.record()]
    zero = torch.ops.schedmoe.agree(torch.zeros((), device=device), record, key,
                                    local.dtype, local.device_type)
    return agreed, zero


def _define() -> None:
    """Define the op (at the first layer that may compile: `import schedmoe` stays light)."""
    global _defined
    if _defined:
        return
    _defined = True

    @torch.library.custom_op("schedmoe::agree", mutates_args=())
    def agree_op(like: torch.Tensor, record: list[int], key: int, dtype: str,
                 device_type: str) -> torch.Tensor:
        agreement = _AGREEMENTS[key]
        # record = [options crc, *LocalStep.record()]: problem, dtype, device, graph,
        # input grad, limit, layout
        local = LocalStep(dtype=dtype, device_type=device_type, graph=bool(record[4]),
                          input_grad=bool(record[5]), limit=record[6], layout=record[7])
        traced = Agreed(local.limit, local.input_grad, (local.layout,), dtype)
        rows = all_gather_ints(record, agreement.group, "the agreement of a compiled MoELayer")
        try:  # problems and differing options raise here, alike on every rank
            agreement.conclude(rows, local, traced)
        except Misguessed:
            pass  # shapes: decided below from every rank's record, alike everywhere
        limits, grads = sorted({row[6] for row in rows}), sorted({row[5] for row in rows})
        if len(limits) > 1 or len(grads) > 1:
            raise ConfigError(
                f"the ranks of a compiled MoE layer call traced capacity limits {limits} and "
                f"input-grad states {grads}: under torch.compile every rank must call the "
                "layer with the same number of tokens and autograd state (or run it eagerly)")
        return torch.zeros_like(like)

    @agree_op.register_fake
    def _(like, record, key, dtype, device_type):
        return torch.empty_like(like)
