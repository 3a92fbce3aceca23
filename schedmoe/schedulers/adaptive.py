"""The adaptive scheduler: profile, fit cost models, simulate every candidate, run the best.

Legend: W ranks, E local experts, C capacity, M model dim; n = payload bytes of one chunk.

1. Profiling steps run each (A2A algorithm, codec) candidate at degrees 1 and 4 without overlap
   (every exchange waited at once), so each op's time is its own. The op intervals of a step,
   backward included, are harvested at the next call and become samples (n, seconds) of
   `compress:<codec>`, `decompress:<codec>`, `a2a:<algorithm>:<codec>` and `experts`. What the
   step spends outside the region (routing, encode/decode, the model around the layer: the time
   between two calls minus the region's ops) is kept too, so predictions are whole steps.
2. Tuning fits t = alpha + beta * n per op (the expert's backward is taken as twice its forward),
   predicts the step of every (algorithm, codec, r) with the simulator (predictions maxed over
   ranks, so every rank ranks them alike), and shortlists the best prediction of each degree
   band (r = 1, 2, 3-5, 6-11, 12-16), best bands first, `shortlist` of them. Bands, not the top
   few predictions: the model's error grows with r (on CPUs, communication and compute share
   cores; every chunk adds latencies), so neighbouring degrees tend to be wrong together.
3. Trials run each shortlisted candidate for `trial_steps` steps; a step's time is the time
   between two calls of this layer (slowest rank), so it covers forward, backward and whatever
   the model does around the layer, and it includes effects the two-resource model cannot see.
   The fastest trial (median after its first, warm-up step) wins.
4. Running uses the pipelined schedule with that choice (the sequential one for r = 1). Every
   `check_every` steps the step time is compared with the winner's trial time; beyond `drift`
   (relative) on two checks in a row the models are thrown away and profiling starts again. A
   new capacity bucket (C // 128, Tutel's key) re-tunes from the existing models.

Every decision (step, reason, candidate, predicted, measured) is kept in `decisions` and the
current one is reported in `layer.last_stats.schedule`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from statistics import median

import torch
import torch.distributed as dist

from ..distributed import collective
from ..errors import ConfigError
from ..ops.codec_set import CodecSet, make_codec
from ..registry import register_scheduler, registry
from ..simulator import BACKWARD, FORWARD, CostModel, simulate
from .base import Scheduler, StepContext
from .pipeline import PipelineScheduler, chunk_bounds
from .sequential import SequentialScheduler

PROFILE_DEGREES = (1, 4)
KEEP_MEASURED = 32  # step times kept per decision: its first and the latest


def chunk_bytes(shape_WECM: tuple[int, ...], itemsize: int, degree: int) -> list[float]:
    """Payload bytes n of each of the `degree` chunks that split capacity."""
    world, experts, capacity, model_dim = shape_WECM
    return [world * experts * (hi - lo) * model_dim * itemsize
            for lo, hi in chunk_bounds(capacity, degree)]


@dataclass
class Decision:
    step: int
    reason: str  # "profile", "trial", "tuned", "bucket" (re-tuned), "drift" (re-profiling)
    algorithm: str
    codec: str
    degree: int
    predicted_ms: float | None = None  # the step: region forward + backward, plus outside
    predicted_forward_ms: float | None = None  # the region's forward
    # step times; for a running decision the first (its trial's) and the latest 32
    measured_ms: list[float] = dataclasses.field(default_factory=list)  # step, slowest rank


@register_scheduler("adaptive")
class AdaptiveScheduler(Scheduler):
    def __init__(self, degrees=tuple(range(1, 17)), algorithms=("nccl", "2dh", "pipe"),
                 codecs=("none",), allow_lossy: bool = False, shortlist: int = 5,
                 trial_steps: int = 4, check_every: int = 5, drift: float = 0.5) -> None:
        for name in codecs:
            if not make_codec(name).lossless and not allow_lossy:
                raise ConfigError(f"codec {name!r} is lossy: pass allow_lossy=True to let the "
                                  "adaptive scheduler choose it")
        for name in algorithms:
            registry("a2a").get(name)
        self.degrees, self.algorithms, self.codecs = tuple(degrees), tuple(algorithms), \
            tuple(codecs)
        self.shortlist, self.trial_steps = shortlist, trial_steps
        self.check_every, self.drift = check_every, drift
        self.decisions: list[Decision] = []
        self._trials: list[Decision] = []  # shortlisted candidates still to run
        self._tried: list[Decision] = []  # shortlisted candidates already run
        self._last_call: float | None = None
        self._last_decision: Decision | None = None
        self._drifting = False
        self._plan = self._profile_plan()
        self._samples: dict[str, list[tuple[float, float]]] = {}
        self._outside_ms: list[float] = []  # step time outside the region, profiled steps
        self._pending: list[tuple] = []  # profiled steps whose backward may still be running
        self._a2a: dict = {}
        self._codecs: dict[str, CodecSet] = {}
        self._bucket: int | None = None
        self._step = 0

    def describe(self) -> str:
        return (f"adaptive(degrees={self.degrees}, algorithms={self.algorithms}, "
                f"codecs={self.codecs}, shortlist={self.shortlist}, trials={self.trial_steps}, "
                f"check_every={self.check_every}, drift={self.drift})")

    def run(self, x_WECM: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        self._step += 1
        self._time_last_step()
        self._harvest()
        if self._plan:
            if ctx.rec.events is None:
                ctx.rec.events = []  # a profiled step's op intervals are its measurements
            algorithm, codec, degree = self._plan.pop(0)
            decision = Decision(self._step, "profile", algorithm, codec, degree)
            self.decisions.append(decision)
            y = self._profile(x_WECM, self._context(ctx, algorithm, codec), degree)
            self._pending.append((decision, ctx.rec, x_WECM.shape, x_WECM.element_size()))
        else:
            decision = self._choose(x_WECM, ctx)
            # r = 1 overlaps nothing: the sequential schedule, with autograd's plain backward
            schedule = SequentialScheduler() if decision.degree == 1 else \
                PipelineScheduler(decision.degree)
            y = schedule.run(x_WECM, self._context(ctx, decision.algorithm, decision.codec))
        self._last_decision = decision
        ctx.notes.update(dataclasses.asdict(decision))
        ctx.notes["decisions"] = len(self.decisions)
        return y

    def _time_last_step(self) -> None:
        """The time since the last call is the last step's; it belongs to the last decision."""
        now = time.perf_counter()
        if self._last_call is not None and self._last_decision is not None:
            measured = self._last_decision.measured_ms
            measured.append(1e3 * (now - self._last_call))
            if len(measured) > 2 * KEEP_MEASURED:  # a long run: the first and the latest
                del measured[1:-KEEP_MEASURED]
        self._last_call = now

    # -- running -------------------------------------------------------------------------------

    def _context(self, ctx: StepContext, algorithm: str, codec: str) -> StepContext:
        if algorithm not in self._a2a:
            self._a2a[algorithm] = registry("a2a").get(algorithm)(ctx.a2a.group,
                                                                  ctx.a2a.local_size)
        if codec not in self._codecs:
            self._codecs[codec] = CodecSet.build(codec)
        return dataclasses.replace(ctx, a2a=self._a2a[algorithm], codecs=self._codecs[codec])

    @staticmethod
    def _profile(x_WECM: torch.Tensor, step: StepContext, degree: int) -> torch.Tensor:
        """Chunked but not overlapped: each exchange completes before the next op starts."""
        outs = []
        for i, (lo, hi) in enumerate(chunk_bounds(x_WECM.shape[2], degree)):
            received = step.dispatch(x_WECM[:, :, lo:hi].contiguous(), chunk=i)
            outs.append(step.combine(step.run_experts(received, chunk=i), chunk=i))
        return torch.cat(outs, dim=2)

    # -- learning ------------------------------------------------------------------------------

    def _profile_plan(self) -> list[tuple[str, str, int]]:
        """The (algorithm, codec, degree) of each profiling step still to run."""
        return [(a, c, d) for a in self.algorithms for c in self.codecs for d in PROFILE_DEGREES]

    def _harvest(self) -> None:
        """Turn the op intervals of finished profiling steps into samples."""
        for decision, rec, shape, itemsize in self._pending:
            sizes = chunk_bytes(shape, itemsize, decision.degree)
            codec, a2a = decision.codec, f"a2a:{decision.algorithm}:{decision.codec}"
            region_s = 0.0
            for e in rec.events or []:
                if e.chunk is None:
                    continue
                kind = e.task.split(".")[-1]
                key = {"compress": f"compress:{codec}", "decompress": f"decompress:{codec}",
                       "a2a": a2a, "experts": "experts"}.get(kind)
                if key is not None:
                    self._samples.setdefault(key, []).append((sizes[e.chunk], e.end - e.start))
                    # autograd's expert backward is not an event: twice the forward, as predicted
                    region_s += (3 if key == "experts" else 1) * (e.end - e.start)
            if decision.measured_ms:
                self._outside_ms.append(max(0.0, decision.measured_ms[0] - 1e3 * region_s))
        self._pending.clear()

    def _models(self) -> dict[str, CostModel]:
        return {key: CostModel.fit([n for n, _ in s], [t for _, t in s])
                for key, s in self._samples.items()}

    def _predict(self, models: dict[str, CostModel], sizes: list[int], algorithm: str,
                 codec: str) -> tuple[float, float]:
        """(forward, forward + backward) seconds of the region."""
        def chunk(n: int, stages: tuple[str, str, str], expert_factor: float) -> dict:
            first, expert, second = stages
            costs = {expert: expert_factor * models["experts"](n)}
            for name in (first, second):
                costs[f"{name}.compress"] = models[f"compress:{codec}"](n)
                costs[f"{name}.a2a"] = models[f"a2a:{algorithm}:{codec}"](n)
                costs[f"{name}.decompress"] = models[f"decompress:{codec}"](n)
            return costs

        fwd = simulate([chunk(n, FORWARD, 1.0) for n in sizes], FORWARD)
        bwd = simulate([chunk(n, BACKWARD, 2.0) for n in sizes], BACKWARD)
        return fwd.makespan, fwd.makespan + bwd.makespan

    def _choose(self, x_WECM: torch.Tensor, ctx: StepContext) -> Decision:
        """The decision for this call: the current one, a trial, or a fresh tuning."""
        bucket = x_WECM.shape[2] // 128
        current = self.decisions[-1]
        if current.reason in ("tuned", "bucket") and bucket == self._bucket:
            self._check(current, ctx)  # on drift, profiling starts again with the next call
            return current
        if current.reason == "profile" or bucket != self._bucket:
            reason = "tuned" if current.reason == "profile" else "bucket"
            self._bucket = bucket
            self._trials = [d for d in self._shortlist(self._rank_candidates(x_WECM, ctx))
                            for _ in range(self.trial_steps)]
            self._tried, self._reason = [], reason
        if self._trials:
            trial = self._trials.pop(0)
            if not self._tried or self._tried[-1] is not trial:
                self._tried.append(trial)
                self.decisions.append(trial)
            return trial
        # every trial has run: the fastest wins (median after its first, warm-up step; slowest
        # rank). A trial's first step also carries one-off costs such as building sub-groups.
        medians = torch.tensor([median(d.measured_ms[1:] or d.measured_ms) for d in self._tried],
                               dtype=torch.float64)
        medians = self._all_max(medians, ctx)
        best = self._tried[int(torch.argmin(medians))]
        decision = Decision(self._step, self._reason, best.algorithm, best.codec, best.degree,
                            best.predicted_ms, best.predicted_forward_ms,
                            [float(medians.min())])
        self.decisions.append(decision)
        return decision

    def _rank_candidates(self, x_WECM: torch.Tensor, ctx: StepContext) -> list[Decision]:
        """Every candidate as a trial decision, best predicted first (same order on all ranks)."""
        models = self._models()
        candidates = [(a, c, r) for a in self.algorithms for c in self.codecs
                      for r in self.degrees]
        outside = 1e-3 * median(self._outside_ms) if self._outside_ms else 0.0
        predicted = []
        for a, c, r in candidates:
            sizes = chunk_bytes(x_WECM.shape, x_WECM.element_size(), r)
            forward, step = self._predict(models, sizes, a, c)
            predicted.append((forward, step + outside))
        # The step is as slow as the slowest rank; maxing makes every rank rank alike.
        times = self._all_max(torch.tensor(predicted, dtype=torch.float64), ctx)
        order = sorted(range(len(candidates)), key=lambda i: (float(times[i, 1]), i))
        return [Decision(self._step, "trial", *candidates[i], 1e3 * float(times[i, 1]),
                         1e3 * float(times[i, 0])) for i in order]

    def _shortlist(self, ranked: list[Decision]) -> list[Decision]:
        """The best-predicted candidate of each degree band, best bands first."""
        best: dict[int, Decision] = {}
        for d in ranked:
            best.setdefault(round(math.log2(d.degree)), d)
        return list(best.values())[:self.shortlist]

    def _check(self, decision: Decision, ctx: StepContext) -> None:
        """Every `check_every` steps: the recent step time against the winning trial's."""
        steps_since = self._step - decision.step
        if steps_since == 0 or steps_since % self.check_every or len(decision.measured_ms) < 2:
            return
        recent = torch.tensor([median(decision.measured_ms[-self.check_every:])],
                              dtype=torch.float64)
        recent = float(self._all_max(recent, ctx)[0])
        drifted = abs(recent / decision.measured_ms[0] - 1) > self.drift
        if drifted and self._drifting:
            self._samples.clear()
            self._plan = self._profile_plan()
            self.decisions.append(Decision(self._step, "drift", decision.algorithm,
                                           decision.codec, decision.degree))
        self._drifting = drifted

    @staticmethod
    def _all_max(values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        group = ctx.a2a.group
        if group.distributed:
            with collective("the adaptive scheduler's agreement", group):
                dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group.pg)
        return values
