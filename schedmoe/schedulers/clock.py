"""A model-wide step clock for the adaptive scheduler: one optimizer step is one tuning step.

Timing a layer by the gap between two of its calls confounds layers: with several adaptive
layers in a model each gap holds the other layers' profiling and trials too, and with gradient
accumulation a gap is a micro-batch, not a step. A `StepClock` is shared by the adaptive layers
of a model and ticks once per optimizer step (`clock.step()`, or a post-hook on the optimizer).
It times whole steps and gives the layers turns: one layer at a time profiles and runs its
trials while the others hold (the sequential schedule before their turn, their winner after),
so two trials of a layer differ only by that layer's choice. Each layer keeps its own decision,
and within a step every call of a layer (every micro-batch) runs the same one.

Every rank must tick its clock at the same steps (as every rank steps its optimizer).
"""

from __future__ import annotations

import time

from torch import nn

from ..errors import ConfigError
from .base import Scheduler


class StepClock:
    """Ticks once per optimizer step for every adaptive scheduler attached to it."""

    def __init__(self) -> None:
        self.steps = 0  # optimizer steps finished
        self.members: list[Scheduler] = []  # in model order: the order of turns
        self._began: float | None = None

    @classmethod
    def attach(cls, model: nn.Module, optimizer=None) -> "StepClock":
        """A clock for every MoE layer of `model` whose scheduler follows one (the adaptive
        scheduler, `follows_clock`), in model order; with `optimizer`, ticked by its step
        post-hook, else call `step()` after each step."""
        clock = cls()
        for module in model.modules():
            scheduler = getattr(module, "scheduler", None)
            if isinstance(scheduler, Scheduler) and scheduler.follows_clock:
                clock.add(scheduler)
        if not clock.members:
            raise ConfigError("StepClock.attach found no MoE layer with the adaptive scheduler "
                              "in the model; build the layers with scheduler='adaptive'")
        if optimizer is not None:
            optimizer.register_step_post_hook(lambda *args, **kwargs: clock.step())
        return clock

    def add(self, scheduler: Scheduler) -> None:
        if scheduler.clock is not None and scheduler.clock is not self:
            raise ConfigError("this adaptive scheduler already follows another StepClock")
        if any(member is scheduler for member in self.members):
            raise ConfigError("the same adaptive scheduler instance serves two layers here; "
                              "give every layer its own (each keeps its own decision)")
        scheduler.clock = self
        self.members.append(scheduler)

    def step(self) -> None:
        """End the current step: its time (since the previous tick) goes to the decision each
        member ran in it. The first tick only starts the clock."""
        now = time.perf_counter()
        elapsed_ms = None if self._began is None else 1e3 * (now - self._began)
        self._began = now
        self.steps += 1
        for member in self.members:
            member.end_step(elapsed_ms)

    def holder(self) -> Scheduler | None:
        """The member whose turn it is to tune: the first one without a tuned decision."""
        return next((m for m in self.members if m.tuning), None)
