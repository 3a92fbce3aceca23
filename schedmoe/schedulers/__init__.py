"""Schedulers decide the order (and overlap) of a call's exchanges and expert compute:
`sequential`, `pipeline` (chunked, overlapped), `adaptive` (profiles, fits cost models,
simulates the candidates, runs the best; `clock.py` makes its steps optimizer steps).

Control plane. May import: `errors`, `registry`, `comm/`, `a2a_algos/`, `ops/`, `plan/`,
`exchange/`, `streams/`, `control/`, `sim/` (the tuner, when it first fits)."""

from .adaptive import AdaptiveScheduler
from .base import Scheduler, StepContext
from .clock import StepClock
from .pipeline import PipelineScheduler
from .sequential import SequentialScheduler

__all__ = ["Scheduler", "StepContext", "SequentialScheduler", "PipelineScheduler",
           "AdaptiveScheduler", "StepClock"]
