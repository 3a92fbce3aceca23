"""The adaptive scheduler: profile, fit cost models, simulate every candidate, run the best.

Legend: W ranks, E local experts, C capacity, M model dim, P the payload in the call's layout
(`[W, E, C, M]` padded, `[N, M]` ragged rows; plan/layout.py); n = payload bytes of one chunk.

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
   The fastest trial (median after its first, warm-up step) wins. With a `StepClock` (clock.py)
   shared by a model's adaptive layers, a step is an optimizer step instead, timed whole, and
   the layers tune one at a time (the others hold: sequential before their turn, their winner
   after), so that trials of different layers do not confound each other.
4. Running uses the pipelined schedule with that choice (the sequential one for r = 1). Every
   `check_every` steps the step time is compared with the winner's trial time; beyond `drift`
   (relative) on two checks in a row the models are thrown away and profiling starts again.
5. Capacity buckets (C // 128, Tutel's key) remember their winners: a bucket seen before gets
   its winner back without trials, a new one re-tunes from the existing models. A capacity
   within a quarter bucket of the current bucket's edges stays in it (hysteresis), so a
   dropless capacity wandering around an edge does not flip buckets.

The codecs tried are the layer's own compressor unless `codecs=` names others. An activation
checkpoint's recompute repeats the schedule of the forward it recomputes and changes nothing.
The latest `MAX_DECISIONS` decisions (step, reason, candidate, predicted, measured) are kept in
`decisions`; the current one is reported in `layer.last_stats.schedule`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from statistics import median
from typing import Callable

import torch
import torch.distributed as dist

from ..comm.groups import collective, collective_device
from ..errors import ConfigError
from ..ops.codecs.codec_set import CodecSet, make_codec
from ..registry import register_scheduler, registry
from ..plan.layout import chunk_bounds
from .base import Scheduler, StepContext
from .clock import StepClock
from .pipeline import PipelineScheduler
from .sequential import SequentialScheduler

PROFILE_DEGREES = (1, 4)
KEEP_MEASURED = 32  # step times kept per decision: its first and the latest
MAX_DECISIONS = 256  # decisions kept in `decisions`
HYSTERESIS = 0.25  # of a bucket: how far past its edges a capacity still counts as in it


def chunk_bytes(x_P: torch.Tensor, ctx: StepContext, degree: int) -> list[float]:
    """Payload bytes n of each of the `degree` chunks that split capacity."""
    return [ctx.layout.chunk_bytes(tuple(x_P.shape), x_P.element_size(), lo, hi)
            for lo, hi in chunk_bounds(ctx.layout.capacity, degree)]


def _timeline():
    """The simulator's timeline, imported when the tuner first fits its models, so that
    `import schedmoe` does not load the simulator."""
    from ..sim import timeline
    return timeline


@dataclass
class Decision:
    step: int
    reason: str  # "profile", "trial", "tuned", "bucket" (re-tuned or remembered), "drift"
    algorithm: str
    codec: str
    degree: int
    predicted_ms: float | None = None  # the step: region forward + backward, plus outside
    predicted_forward_ms: float | None = None  # the region's forward
    # step times; for a running decision the first (its trial's) and the latest 32
    measured_ms: list[float] = dataclasses.field(default_factory=list)  # step, slowest rank


@register_scheduler("adaptive")
class AdaptiveScheduler(Scheduler):
    carries_agreement = True
    follows_clock = True
    traceable = True  # inside a compiled graph: its tuned decision, nothing learnt (run)

    def __init__(self, degrees=tuple(range(1, 17)), algorithms=("nccl", "2dh", "pipe"),
                 codecs=None, allow_lossy: bool = False, shortlist: int = 5,
                 trial_steps: int = 4, check_every: int = 5, drift: float = 0.5,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """`codecs`: codec names to choose from; None uses the layer's compressor (chosen by
        the user, so lossy or not). Lossy names in `codecs` need `allow_lossy=True`. `timer`:
        the clock (seconds) that times steps between calls (tests inject one)."""
        for name in codecs or ():
            if not make_codec(name).lossless and not allow_lossy:
                raise ConfigError(f"codec {name!r} is lossy: pass allow_lossy=True to let the "
                                  "adaptive scheduler choose it")
        for name in algorithms:
            registry("a2a").get(name)
        self.degrees, self.algorithms = tuple(degrees), tuple(algorithms)
        self.codecs = None if codecs is None else tuple(codecs)
        self.shortlist, self.trial_steps = shortlist, trial_steps
        self.check_every, self.drift, self.timer = check_every, drift, timer
        self.decisions: deque[Decision] = deque(maxlen=MAX_DECISIONS)
        # capacity bucket -> its trials still to run, those already run, the winner's reason;
        # kept per bucket, so that alternating buckets each finish their own trials
        self._trials: dict[int, _Trials] = {}
        self._last_call: float | None = None
        self._last_decision: Decision | None = None
        self._attempt: Decision | None = None  # the latest call's decision
        self._abandoned = False  # the latest call raised before it returned
        self._drifting = False
        self._plan: list[tuple[str, str, int]] | None = None  # built at the first call
        self._samples: dict[str, list[tuple[float, float]]] = {}
        self._outside_ms: list[float] = []  # step time outside the region, profiled steps
        self._pending: list[tuple] = []  # profiled steps whose backward may still be running
        self._a2a: dict = {}
        self._codecs: dict[str, CodecSet] = {}
        self._bucket: int | None = None
        self._running: Decision | None = None  # the tuned decision in force
        self._winners: dict[int, Decision] = {}  # capacity bucket -> its tuned decision
        self._replays: OrderedDict = OrderedDict()  # x shape -> what ran, for recomputes
        self._step = 0
        self.clock: StepClock | None = None  # set by StepClock.add: steps are optimizer steps
        self._clock_step = -1  # the clock's step of this scheduler's latest decision
        self._ran: Decision | None = None  # what ran since the clock's last tick

    # What a checkpoint keeps (pickled together, so a trial listed in several places stays one
    # object); the rest is rebuilt (sub-groups, codecs, the clock) or restarts (step timing).
    RUNTIME = ("decisions", "_trials", "_plan", "_samples", "_outside_ms",
               "_bucket", "_running", "_winners", "_step", "_drifting", "_attempt",
               "_last_decision")

    def runtime_state(self) -> dict:
        return {name: getattr(self, name) for name in self.RUNTIME if hasattr(self, name)}

    def load_runtime_state(self, state: dict) -> None:
        for name, value in state.items():
            if name in self.RUNTIME:
                setattr(self, name, value)
        self._last_call, self._pending, self._abandoned = None, [], False

    @property
    def tuning(self) -> bool:
        """Whether this scheduler has no tuned decision in force (profiling, trials, or not
        started)."""
        return self._running is None

    def describe(self) -> str:
        codecs = "the layer's" if self.codecs is None else self.codecs
        return (f"adaptive(degrees={self.degrees}, algorithms={self.algorithms}, "
                f"codecs={codecs}, shortlist={self.shortlist}, trials={self.trial_steps}, "
                f"check_every={self.check_every}, drift={self.drift})")

    def run(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._run_traced(x_P, ctx)
        if ctx.quiet:
            return self._run_quiet(x_P, ctx)
        if ctx.recompute:
            return self._replay(x_P, ctx)
        decision = self._retry(x_P, ctx) if self._abandoned else self._decide(x_P, ctx)
        self._abandoned = True  # until the call returns: an exception abandons it
        y = self._execute(x_P, ctx, decision)
        self._abandoned = False
        self._replays[tuple(x_P.shape)] = decision
        self._replays.move_to_end(tuple(x_P.shape))
        while len(self._replays) > 16:
            self._replays.popitem(last=False)
        self._last_decision = self._ran = decision
        ctx.notes.update(dataclasses.asdict(decision))
        ctx.notes["decisions"] = len(self.decisions)
        return y

    def _decide(self, x_P: torch.Tensor, ctx: StepContext) -> Decision:
        """This call's decision: a profiling step, or what `_choose` says (with a clock: the
        same for every call of one step, and a hold while another layer tunes)."""
        if self.clock is not None:
            if self._clock_step == self.clock.steps and self._attempt is not None:
                return self._attempt  # another micro-batch of the same optimizer step
            self._clock_step = self.clock.steps
        self._step += 1
        if self.clock is None:
            self._time_last_step()
        self._harvest()
        if self._plan is None:
            self._plan = self._profile_plan(ctx)
        if self.clock is not None and self.tuning and self.clock.holder() is not self:
            decision = Decision(self._step, "hold", "the layer's", ctx.codecs.describe(), 1)
        elif self._plan:
            algorithm, codec, degree = self._plan.pop(0)
            decision = Decision(self._step, "profile", algorithm, codec, degree)
            self.decisions.append(decision)
            self._measure(decision, x_P, ctx)
        else:
            decision = self._choose(x_P, ctx)
        self._attempt = decision
        return decision

    def _retry(self, x_P: torch.Tensor, ctx: StepContext) -> Decision:
        """The call after an abandoned one (an error, or the layer's wrong capacity guess, at
        its first dispatch: every rank alike): the abandoned call's decision again, nothing
        decided or learnt twice; a profiling step measures this call instead."""
        if self._attempt.reason == "profile":
            self._pending.pop()
            self._measure(self._attempt, x_P, ctx)
        return self._attempt

    def _measure(self, decision: Decision, x_P: torch.Tensor, ctx: StepContext) -> None:
        """Keep a profiled step's op intervals: they become samples at the next call."""
        if ctx.rec.events is None:
            ctx.rec.events = []
        self._pending.append((decision, ctx.rec, chunk_bytes(x_P, ctx, decision.degree)))

    def _time_last_step(self) -> None:
        """The time since the last call is the last step's; it belongs to the last decision."""
        now = self.timer()
        if self._last_call is not None and self._last_decision is not None:
            _record(self._last_decision, 1e3 * (now - self._last_call))
        self._last_call = now

    def end_step(self, elapsed_ms: float | None) -> None:
        """The clock's tick: `elapsed_ms` (None at the first tick) was the step of what ran."""
        ran, self._ran = self._ran, None
        if elapsed_ms is not None and ran is not None and ran.reason != "hold":
            _record(ran, elapsed_ms)

    # -- running -------------------------------------------------------------------------------

    def _execute(self, x_P: torch.Tensor, ctx: StepContext, decision: Decision) -> torch.Tensor:
        if decision.reason == "hold":  # another layer's turn to tune: the layer's own A2A
            return SequentialScheduler().run(x_P, ctx)
        step = self._context(ctx, decision.algorithm, decision.codec)
        if decision.reason == "profile":
            return self._profile(x_P, step, decision.degree)
        # r = 1 overlaps nothing: the sequential schedule, with autograd's plain backward
        schedule = SequentialScheduler() if decision.degree == 1 else \
            PipelineScheduler(decision.degree)
        return schedule.run(x_P, step)

    def _run_traced(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Inside a compiled graph, which cannot time its own ops or set up other exchanges:
        the tuned decision's chunking (sequential until one is tuned) through the layer's own
        A2A and codecs, with nothing decided or learnt. Tune in eager calls, then compile."""
        degree = 1 if self._running is None else self._running.degree
        schedule = SequentialScheduler() if degree == 1 else PipelineScheduler(degree)
        return schedule.run(x_P, ctx)

    def _run_quiet(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """An inference call: the tuned decision (sequential until one is tuned), with nothing
        profiled, tried or timed: what inference runs does not bias the training's tuning."""
        running = self._running
        if running is None:
            return SequentialScheduler().run(x_P, ctx)
        step = self._context(ctx, running.algorithm, running.codec)
        schedule = SequentialScheduler() if running.degree == 1 else \
            PipelineScheduler(running.degree)
        return schedule.run(x_P, step)

    def _replay(self, x_P: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """A recompute: the schedule of the latest forward of this shape, nothing learnt."""
        decision = self._replays.get(tuple(x_P.shape), self._last_decision)
        if decision is None:
            raise ConfigError("the adaptive scheduler was asked to recompute a forward it never "
                              "ran; run the layer's forward before its backward")
        ctx.notes.update(dataclasses.asdict(decision), recompute=True)
        return self._execute(x_P, ctx, decision)

    def _context(self, ctx: StepContext, algorithm: str, codec: str) -> StepContext:
        if algorithm not in self._a2a:
            self._a2a[algorithm] = registry("a2a").get(algorithm)(ctx.a2a.group,
                                                                  ctx.a2a.local_size)
        if codec not in self._codecs:  # the layer's own (named by its description), or built
            self._codecs[codec] = ctx.codecs if codec == ctx.codecs.describe() else \
                CodecSet.build(codec, verify=ctx.codecs.verify)
        return dataclasses.replace(ctx, a2a=self._a2a[algorithm], codecs=self._codecs[codec])

    @staticmethod
    def _profile(x_P: torch.Tensor, step: StepContext, degree: int) -> torch.Tensor:
        """Chunked but not overlapped: each exchange completes before the next op starts."""
        outs = []
        for i in range(len(step.chunks(degree))):
            received = step.dispatch(step.slice(x_P, i), chunk=i)
            outs.append(step.combine(step.run_experts(received, chunk=i), chunk=i))
        return step.cat(outs)

    # -- learning ------------------------------------------------------------------------------

    def _codec_names(self, ctx: StepContext) -> tuple[str, ...]:
        """The codecs to choose from: the user's list, else the layer's own compressor."""
        if self.codecs is not None:
            return self.codecs
        self._codecs.setdefault(ctx.codecs.describe(), ctx.codecs)
        return (ctx.codecs.describe(),)

    def _profile_plan(self, ctx: StepContext) -> list[tuple[str, str, int]]:
        """The (algorithm, codec, degree) of each profiling step still to run."""
        return [(a, c, d) for a in self.algorithms for c in self._codec_names(ctx)
                for d in PROFILE_DEGREES]

    def _harvest(self) -> None:
        """Turn the op intervals of finished profiling steps into samples."""
        for decision, rec, sizes in self._pending:
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
                    # the experts' backward (experts.bwd) counts as twice the forward, as predicted
                    region_s += (3 if key == "experts" else 1) * (e.end - e.start)
            if decision.measured_ms:
                self._outside_ms.append(max(0.0, decision.measured_ms[0] - 1e3 * region_s))
        self._pending.clear()

    def _models(self) -> dict:
        """op -> its fitted cost model (sim/timeline.py's CostModel)."""
        cost_model = _timeline().CostModel
        return {key: cost_model.fit([n for n, _ in s], [t for _, t in s])
                for key, s in self._samples.items()}

    def _predict(self, models: dict, sizes: list[int], algorithm: str,
                 codec: str) -> tuple[float, float]:
        """(forward, forward + backward) seconds of the region."""
        timeline = _timeline()
        FORWARD, BACKWARD = timeline.FORWARD, timeline.BACKWARD  # noqa: N806
        def chunk(n: int, stages: tuple[str, str, str], expert_factor: float) -> dict:
            first, expert, second = stages
            costs = {expert: expert_factor * models["experts"](n)}
            for name in (first, second):
                costs[f"{name}.compress"] = models[f"compress:{codec}"](n)
                costs[f"{name}.a2a"] = models[f"a2a:{algorithm}:{codec}"](n)
                costs[f"{name}.decompress"] = models[f"decompress:{codec}"](n)
            return costs

        fwd = timeline.simulate([chunk(n, FORWARD, 1.0) for n in sizes], FORWARD)
        bwd = timeline.simulate([chunk(n, BACKWARD, 2.0) for n in sizes], BACKWARD)
        return fwd.makespan, fwd.makespan + bwd.makespan

    def _choose(self, x_P: torch.Tensor, ctx: StepContext) -> Decision:
        """The decision for this call: the one in force, a remembered winner, the next trial of
        this capacity bucket, or the winner of its trials just run. Each bucket runs its own
        trials once (at most shortlist x trial_steps calls), also when calls alternate between
        buckets; after that it only ever gets its winner back."""
        bucket = self._bucket_for(ctx.layout.capacity)
        changed, self._bucket = bucket != self._bucket, bucket
        if self.decisions[-1].reason == "profile":  # fresh models: earlier trials are stale
            self._trials.clear()
        elif self._running is not None and not changed:
            running = self._running
            self._check(running, ctx)  # on drift, profiling starts again next call
            return running
        elif bucket in self._winners:
            winner = self._winners[bucket]
            remembered = dataclasses.replace(winner, step=self._step, reason="bucket",
                                             measured_ms=winner.measured_ms[:1])
            self.decisions.append(remembered)
            self._running = self._winners[bucket] = remembered
            return remembered
        self._running = None
        if bucket not in self._trials:
            shortlist = self._shortlist(self._rank_candidates(x_P, ctx))
            reason = "tuned" if self.decisions[-1].reason == "profile" else "bucket"
            self._trials[bucket] = _Trials([d for d in shortlist for _ in range(self.trial_steps)],
                                           [], reason)
        trials = self._trials[bucket]
        if trials.left:
            trial = trials.left.pop(0)
            if not trials.tried or trials.tried[-1] is not trial:
                trials.tried.append(trial)
                self.decisions.append(trial)
            return trial
        # every trial has run: the fastest wins (median after its first, warm-up step; slowest
        # rank). A trial's first step also carries one-off costs such as building sub-groups.
        medians = torch.tensor([median(d.measured_ms[1:] or d.measured_ms or [math.inf])
                                for d in trials.tried], dtype=torch.float64)
        medians = self._all_max(medians, ctx)
        best = trials.tried[int(torch.argmin(medians))]
        decision = Decision(self._step, trials.reason, best.algorithm, best.codec, best.degree,
                            best.predicted_ms, best.predicted_forward_ms,
                            [float(medians.min())])
        self.decisions.append(decision)
        del self._trials[bucket]
        self._running = self._winners[bucket] = decision
        return decision

    def _bucket_for(self, capacity: int) -> int:
        """Tutel's bucket C // 128, except that a capacity within HYSTERESIS of a bucket past
        the current bucket's edges stays in the current bucket."""
        bucket = capacity // 128
        if self._bucket is None or bucket == self._bucket:
            return bucket
        margin = HYSTERESIS * 128
        if self._bucket * 128 - margin <= capacity < (self._bucket + 1) * 128 + margin:
            return self._bucket
        return bucket

    def _rank_candidates(self, x_P: torch.Tensor, ctx: StepContext) -> list[Decision]:
        """Every candidate as a trial decision, best predicted first (same order on all ranks)."""
        models = self._models()
        candidates = [(a, c, r) for a in self.algorithms for c in self._codec_names(ctx)
                      for r in self.degrees]
        outside = 1e-3 * median(self._outside_ms) if self._outside_ms else 0.0
        predicted = []
        for a, c, r in candidates:
            sizes = chunk_bytes(x_P, ctx, r)
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
        if self.clock is not None and self.clock.holder() is not None:
            return  # another layer's trials change the step time: not a drift of this one
        recent = torch.tensor([median(decision.measured_ms[-self.check_every:])],
                              dtype=torch.float64)
        recent = float(self._all_max(recent, ctx)[0])
        drifted = abs(recent / decision.measured_ms[0] - 1) > self.drift
        if drifted and self._drifting:
            # Everything learnt under the old conditions goes: models, bucket winners, the
            # running choice; the next call profiles again.
            self._samples.clear()
            self._winners.clear()
            self._trials.clear()
            self._running = None
            self._plan = None
            self.decisions.append(Decision(self._step, "drift", decision.algorithm,
                                           decision.codec, decision.degree))
        self._drifting = drifted

    @staticmethod
    def _all_max(values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The maximum over the EP group, on the host (decisions are made there); reduced on
        the device the group's backend serves (an NCCL-only group refuses CPU tensors)."""
        group = ctx.a2a.group
        if group.distributed:
            on = values.to(collective_device(group.pg))
            with collective("the adaptive scheduler's agreement", group):
                dist.all_reduce(on, op=dist.ReduceOp.MAX, group=group.pg)
            values = on.cpu()  # a host sync, needed: the decision is taken on the host
        return values


@dataclass
class _Trials:
    """One capacity bucket's trials."""

    left: list[Decision]  # still to run (each candidate trial_steps times in a row)
    tried: list[Decision]  # run, in order
    reason: str  # of the winner: "tuned" (after profiling) or "bucket"


def _record(decision: Decision, step_ms: float) -> None:
    """A step time of `decision`; a long run keeps the first and the latest KEEP_MEASURED."""
    measured = decision.measured_ms
    measured.append(step_ms)
    if len(measured) > 2 * KEEP_MEASURED:
        del measured[1:-KEEP_MEASURED]
