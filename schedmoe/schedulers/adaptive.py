"""The adaptive scheduler: profile, fit cost models, simulate every candidate, run the best.

Legend: W ranks, E local experts, C capacity, M model dim; n = payload bytes of one chunk.

1. Profiling steps run each (A2A algorithm, codec) candidate at degrees 1 and 4 without overlap
   (every exchange waited at once), so each op's time is its own. The op intervals of a step,
   backward included, are harvested at the next call and become samples (n, seconds) of
   `compress:<codec>`, `decompress:<codec>`, `a2a:<algorithm>:<codec>` and `experts`.
2. Tuning fits t = alpha + beta * n per op (the expert's backward is taken as twice its forward),
   predicts forward + backward of every (algorithm, codec, r) with the simulator, and takes the
   candidate whose prediction, maxed over ranks, is smallest: every rank picks the same one.
3. Running uses the pipelined schedule with that choice. Every `check_every` steps the measured
   forward (slowest rank) is compared with the prediction; beyond `drift` (relative) the models
   are thrown away and profiling starts again. A new capacity bucket (C // 128, Tutel's key)
   re-tunes from the existing models.

Every decision (step, reason, candidate, predicted, measured) is kept in `decisions` and the
current one is reported in `layer.last_stats.schedule`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import collective
from ..errors import ConfigError
from ..ops.codec_set import CodecSet, make_codec
from ..registry import register_scheduler, registry
from ..simulator import BACKWARD, FORWARD, CostModel, simulate
from .base import Scheduler, StepContext
from .pipeline import PipelineScheduler, chunk_bounds

PROFILE_DEGREES = (1, 4)


@dataclass
class Decision:
    step: int
    reason: str  # "profile", "tuned", "bucket", "drift"
    algorithm: str
    codec: str
    degree: int
    predicted_ms: float | None = None  # forward + backward of the region
    predicted_forward_ms: float | None = None
    measured_ms: list[float] = dataclasses.field(default_factory=list)  # forward, slowest rank


@register_scheduler("adaptive")
class AdaptiveScheduler(Scheduler):
    def __init__(self, degrees=tuple(range(1, 17)), algorithms=("nccl", "2dh", "pipe"),
                 codecs=("none",), allow_lossy: bool = False, check_every: int = 5,
                 drift: float = 0.5) -> None:
        for name in codecs:
            if not make_codec(name).lossless and not allow_lossy:
                raise ConfigError(f"codec {name!r} is lossy: pass allow_lossy=True to let the "
                                  "adaptive scheduler choose it")
        for name in algorithms:
            registry("a2a").get(name)
        self.degrees, self.algorithms, self.codecs = tuple(degrees), tuple(algorithms), \
            tuple(codecs)
        self.check_every, self.drift = check_every, drift
        self.decisions: list[Decision] = []
        self._plan = [(a, c, d) for a in self.algorithms for c in self.codecs
                      for d in PROFILE_DEGREES]
        self._samples: dict[str, list[tuple[float, float]]] = {}
        self._pending: list[tuple] = []  # profiled steps whose backward may still be running
        self._a2a: dict = {}
        self._codecs: dict[str, CodecSet] = {}
        self._bucket: int | None = None
        self._step = 0

    def describe(self) -> str:
        return (f"adaptive(degrees={self.degrees}, algorithms={self.algorithms}, "
                f"codecs={self.codecs}, check_every={self.check_every}, drift={self.drift})")

    def run(self, x_WECM: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        self._step += 1
        self._harvest()
        if ctx.rec.events is None:
            ctx.rec.events = []  # the op intervals are this scheduler's measurements
        if self._plan:
            algorithm, codec, degree = self._plan.pop(0)
            decision = Decision(self._step, "profile", algorithm, codec, degree)
            self.decisions.append(decision)
            step = self._context(ctx, algorithm, codec)
            y = self._profile(x_WECM, step, degree)
            self._pending.append((ctx.rec, x_WECM.shape, x_WECM.element_size(), algorithm,
                                  codec, degree))
        else:
            decision = self._choose(x_WECM, ctx)
            start = time.perf_counter()
            y = PipelineScheduler(decision.degree).run(
                x_WECM, self._context(ctx, decision.algorithm, decision.codec))
            self._check(decision, time.perf_counter() - start, ctx)
        ctx.notes.update(dataclasses.asdict(decision))
        ctx.notes["decisions"] = len(self.decisions)
        return y

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

    def _harvest(self) -> None:
        """Turn the op intervals of finished profiling steps into samples."""
        for rec, shape, itemsize, algorithm, codec, degree in self._pending:
            world, experts, capacity, model_dim = shape
            sizes = [world * experts * (hi - lo) * model_dim * itemsize
                     for lo, hi in chunk_bounds(capacity, degree)]
            for e in rec.events or []:
                if e.chunk is None:
                    continue
                kind = e.task.split(".")[-1]
                key = {"compress": f"compress:{codec}", "decompress": f"decompress:{codec}",
                       "a2a": f"a2a:{algorithm}:{codec}", "experts": "experts"}.get(kind)
                if key is not None:
                    self._samples.setdefault(key, []).append((sizes[e.chunk], e.end - e.start))
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
        world, experts, capacity, model_dim = x_WECM.shape
        bucket = capacity // 128
        current = self.decisions[-1] if self.decisions else None
        if current is not None and current.reason != "profile" and bucket == self._bucket:
            return current
        reason = "tuned" if current is None or current.reason == "profile" else "bucket"
        self._bucket = bucket
        models = self._models()
        candidates = [(a, c, r) for a in self.algorithms for c in self.codecs
                      for r in self.degrees]
        predicted = []
        for a, c, r in candidates:
            sizes = [world * experts * (hi - lo) * model_dim * x_WECM.element_size()
                     for lo, hi in chunk_bounds(capacity, r)]
            predicted.append(self._predict(models, sizes, a, c))
        # The step is as slow as the slowest rank; maxing makes every rank choose the same.
        times = self._all_max(torch.tensor(predicted, dtype=torch.float64), ctx)
        best = int(torch.argmin(times[:, 1]))
        a, c, r = candidates[best]
        decision = Decision(self._step, reason, a, c, r, 1e3 * float(times[best, 1]),
                            1e3 * float(times[best, 0]))
        self.decisions.append(decision)
        return decision

    def _check(self, decision: Decision, seconds: float, ctx: StepContext) -> None:
        """Every `check_every` steps: compare the measured forward with the prediction."""
        steps_since = self._step - decision.step
        if steps_since == 0 or steps_since % self.check_every:
            return
        measured = float(self._all_max(torch.tensor([seconds], dtype=torch.float64), ctx)[0])
        decision.measured_ms.append(1e3 * measured)
        if abs(1e3 * measured / decision.predicted_forward_ms - 1) > self.drift:
            self._samples.clear()
            self._plan = [(a, c, d) for a in self.algorithms for c in self.codecs
                          for d in PROFILE_DEGREES]
            self.decisions.append(Decision(self._step, "drift", decision.algorithm,
                                           decision.codec, decision.degree))

    @staticmethod
    def _all_max(values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        group = ctx.a2a.group
        if group.distributed:
            with collective("the adaptive scheduler's agreement", group):
                dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group.pg)
        return values
