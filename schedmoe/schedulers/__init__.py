"""Schedulers decide the order (and overlap) of exchanges and expert compute."""

from .adaptive import AdaptiveScheduler
from .base import Scheduler, StepContext
from .clock import StepClock
from .pipeline import PipelineScheduler
from .sequential import SequentialScheduler

__all__ = ["Scheduler", "StepContext", "SequentialScheduler", "PipelineScheduler",
           "AdaptiveScheduler", "StepClock"]
