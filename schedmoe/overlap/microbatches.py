"""Several micro-batches' forward and backward interleaved on one rank (DualPipe's overlap of
two micro-batches): while one waits for an exchange, the other computes its attention, experts
or backward, so every A2A of either is in flight behind the other's work.

    losses = interleaved_step(lambda batch: loss_of(model, batch), [batch0, batch1])
    optimizer.step()

The same as `for b in batches: loss_of(model, b).backward()`: the same ops on the same data,
gradients accumulated in the same order (turns.py), so bit for bit the same result (an
`adaptive` layer may chunk a call differently, which can round differently). Any model
works; its MoE layers hand over the turn at each exchange wait. `layer.aux_loss` and
`layer.last_stats` are the calling micro-batch's own inside `step` (layer.py).

The micro-batches run as threads taking turns, so that each keeps its own autograd state. On
CPUs the autograd engine runs a backward on the thread that calls it: backward passes
interleave too. On CUDA it runs them on its own device thread, so there only forward passes
interleave and each micro-batch's backward runs whole in its turn (still the same result).

On GPUs each micro-batch runs on a CUDA stream of its own (`streams/lanes.py:
MicroBatchLanes`): the host hands the turn over at each exchange wait, which blocks nothing
there, so both micro-batches' work is queued and the device overlaps one's exchanges with the
other's compute. Backward passes accumulate into the same `.grad`s, so each starts on the
device after the previous one: one's backward overlaps the other's forward, not its backward.
The caller's stream waits for them all.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, nullcontext
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..streams.lanes import MicroBatchLanes
from .turns import Turns, holding, playing


def interleaved_step(step: Callable[[Any], torch.Tensor], micro_batches: Sequence[Any]
                     ) -> list[torch.Tensor]:
    """`step(micro_batch)` returns a scalar loss; each is backpropagated, the micro-batches
    interleaved. Gradients accumulate into `.grad` as they would one after the other. Returns
    the losses (detached). An exception of any micro-batch is raised here, after all ended."""
    if not callable(step):
        raise ConfigError(f"interleaved_step needs a callable step, got {type(step).__name__}")
    if len(micro_batches) == 0:
        raise ConfigError("interleaved_step needs at least one micro-batch")
    turns, inherited = Turns(len(micro_batches)), _thread_state()
    lanes = MicroBatchLanes(len(micro_batches))  # a stream each on CUDA
    losses: list[torch.Tensor | None] = [None] * len(micro_batches)
    errors: list[BaseException | None] = [None] * len(micro_batches)

    def run(i: int) -> None:
        try:
            with ExitStack() as stack:
                for context in inherited():
                    stack.enter_context(context)
                stack.enter_context(playing(turns, i))
                stack.enter_context(lanes.run(i))
                loss = step(micro_batches[i])
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ConfigError("interleaved_step's step must return a scalar loss "
                                      f"tensor, micro-batch {i} returned {type(loss).__name__}")
                with lanes.backward(i, loss), holding() if lanes.overlaps else nullcontext():
                    loss.backward()
                losses[i] = loss.detach()
        except BaseException as exc:  # re-raised by the caller's thread
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"micro-batch {i}", daemon=True)
               for i in range(len(micro_batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lanes.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return losses  # type: ignore[return-value]


def _thread_state() -> Callable[[], list]:
    """The caller's thread-local torch state (grad mode, autocast, CUDA device) as context
    managers that a micro-batch thread enters: threads start with torch's defaults."""
    grad = torch.is_grad_enabled()
    autocasts = [(device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device)]
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def contexts() -> list:
        found = [torch.set_grad_enabled(grad)]
        found += [torch.autocast(kind, dtype=dtype) for kind, dtype in autocasts]
        if device is not None:
            found.append(torch.cuda.device(device))
        return found

    return contexts
