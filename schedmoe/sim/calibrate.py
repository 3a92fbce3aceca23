"""Calibration: fit a cluster's constants to measured step times.

A user measures the small cluster they have (`experiments/sim_validation.py --measure`,
`experiments/schedule_bench.py`, or their own records), fits, and asks the simulator about the
cluster they do not have with the fitted rates. The fit minimises the mean squared log error
of predicted vs measured steps over the chosen fields (Levenberg-Marquardt with a numerical
Jacobian, on transformed fields so that every value stays in its range: rates as logs, fields
that may be 0 as log(1 + x), efficiencies and the backward factor as logits within bounds).
Fields the records cannot tell apart (the intra-node link of a layout with one rank per node,
say) keep values that are not measurements: read a calibrated cluster as a whole, not field
by field.

Records: `{"workload": {Workload fields}, "algorithm", "codec", "degree", "ms"}`. Accepted
files: a list of records; `{"records": [...]}`; sim_validation's `{"layouts": {name: {"records":
...}}}` (pick one with `layout`); schedule_bench's `{"rows": [{"workload", "ms": {"nccl r=2":
...}}]}` (codec none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError
from ..control.validation import number, one_of, read_json
from .cluster import ALGORITHMS, Cluster
from .codecs import FIELDS as CODEC_FIELDS
from .model import MAX_DEGREE, Workload, predict

# Fields fitted by default: compute and link rates, per-message, per-task and per-exchange
# costs, the inter-node link's size-dependent efficiency, interference; and, for every codec
# and algorithm the records use, its throughput and per-call cost.
DEFAULT_FIELDS = ("gemm_tflops", "gemm_half_rows", "memory_gbyte_s", "task_overhead_us",
                  "intra_gbyte_s", "intra_latency_us", "nic_gbit", "inter_latency_us",
                  "inter_knee_mb", "inter_large_efficiency", "compute_slowdown", "comm_slowdown",
                  "backward_factor")
MAY_BE_ZERO = ("compute_slowdown", "comm_slowdown", "gemm_half_rows", "intra_latency_us",
               "inter_latency_us", "task_overhead_us", "per_call_us", "a2a_call_us")
RANGES = {"intra_large_efficiency": (0.0, 1.0), "inter_large_efficiency": (0.0, 1.0),
          "backward_factor": (1.0, 4.0)}  # fitted inside these bounds (logit)


@dataclass(frozen=True)
class Measurement:
    workload: Workload
    algorithm: str
    codec: str
    degree: int
    seconds: float


def _record(raw: dict, source: str) -> Measurement:
    try:
        known = {f.name for f in fields(Workload)}
        workload = Workload(**{k: v for k, v in raw["workload"].items() if k in known})
        algorithm, codec, degree, ms = (raw["algorithm"], raw.get("codec", "none"),
                                        raw["degree"], raw["ms"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{source}: a record lacks {exc}; records need workload, algorithm, "
                          "degree and ms (codec optional)") from None
    workload.validate()
    one_of(source, "a record's algorithm", algorithm, ALGORITHMS)
    if not isinstance(codec, str):
        raise ConfigError(f"{source}: a record's codec must be a name, got {codec!r}")
    number(source, "a record's degree", degree, integer=True, low=1, high=MAX_DEGREE)
    number(source, "a record's ms", ms, above=0)
    return Measurement(workload, algorithm, codec, degree, ms / 1e3)


def load_measurements(path: str | Path, layout: str | None = None,
                      workload_defaults: dict | None = None) -> list[Measurement]:
    """Records from a results file (formats in the module docstring). `workload_defaults` fills
    Workload fields the records leave out."""
    data = read_json(path, "measurements file")
    if isinstance(data, dict) and isinstance(data.get("layouts"), dict):
        names = sorted(data["layouts"])
        if layout is None and len(names) == 1:
            layout = names[0]
        if layout not in data["layouts"]:
            raise ConfigError(f"{path} holds layouts {names}; choose one (--layout)")
        data = data["layouts"][layout]
    if isinstance(data, dict) and "rows" in data:  # schedule_bench: 8 experts, fp32, ragged
        known = {"num_experts": 8, "dtype_bytes": 4, "ragged": True}
        try:
            data = [{"workload": {**known, **row["workload"]}, "algorithm": key.split(" r=")[0],
                     "codec": "none", "degree": int(key.split(" r=")[1]), "ms": ms}
                    for row in data["rows"] for key, ms in row["ms"].items() if " r=" in key]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: a schedule_bench row is malformed ({exc!r})") from None
    if isinstance(data, dict):
        data = data.get("records")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: no measurement records found")
    records = []
    for raw in data:
        if workload_defaults:
            raw = dict(raw, workload={**workload_defaults, **raw["workload"]})
        records.append(_record(raw, str(path)))
    return records


def _get(c: Cluster, name: str) -> float:
    if name.startswith("codecs."):
        _, codec, key = name.split(".")
        return getattr(c.codec(codec), key)
    if name.startswith("a2a_call_us."):
        return c.a2a_call_us.get(name.split(".")[1], 0.0)
    return getattr(c, name)


def _set(c: Cluster, name: str, value: float) -> Cluster:
    if name.startswith("codecs."):
        _, codec, key = name.split(".")
        codecs = {k: dict(v) for k, v in c.codecs.items()}
        codecs.setdefault(codec, {})[key] = value
        return replace(c, codecs=codecs)
    if name.startswith("a2a_call_us."):
        return replace(c, a2a_call_us={**c.a2a_call_us, name.split(".")[1]: value})
    return replace(c, **{name: value})


def _check_field(c: Cluster, name: str) -> None:
    parts = name.split(".")
    if parts[0] == "codecs":
        if len(parts) != 3 or parts[2] not in CODEC_FIELDS:
            raise ConfigError(f"cannot fit {name!r}: codec fields are codecs.NAME.FIELD with "
                              f"FIELD in {CODEC_FIELDS}")
        c.codec(parts[1])
        return
    if parts[0] == "a2a_call_us":
        if len(parts) != 2 or parts[1] not in ALGORITHMS:
            raise ConfigError(f"cannot fit {name!r}: write a2a_call_us.ALGORITHM with "
                              f"ALGORITHM in {ALGORITHMS}")
        return
    value = getattr(c, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"cannot fit {name!r}: not a numeric cluster field")


def _kind(name: str) -> str:
    """The field a name stands for when choosing its transform: `codecs.zstd.gbyte_s` is a
    `gbyte_s`, `a2a_call_us.pipe` an `a2a_call_us`."""
    return name.split(".")[-1] if name.startswith("codecs.") else name.split(".")[0]


def _encode(name: str, value: float) -> float:
    key = _kind(name)
    if key in RANGES:
        lo, hi = RANGES[key]
        v = min(max((value - lo) / (hi - lo), 1e-6), 1 - 1e-6)
        return math.log(v / (1 - v))
    if key in MAY_BE_ZERO:
        return math.log1p(max(value, 0.0))
    if name.endswith("knee_mb") and value <= 0:
        return 0.0  # a knee at 1 MB to start from
    return math.log(max(value, 1e-12))


def _decode(name: str, u: float) -> float:
    key = _kind(name)
    u = min(max(u, -50.0), 50.0)
    if key in RANGES:
        lo, hi = RANGES[key]
        return lo + (hi - lo) / (1 + math.exp(-u))
    if key in MAY_BE_ZERO:
        return max(math.expm1(u), 0.0)
    return math.exp(u)


def log_errors(cluster: Cluster, records: Sequence[Measurement]) -> list[float]:
    """log(predicted / measured) per record."""
    return [math.log(predict(m.workload, cluster, m.algorithm, m.codec, m.degree).seconds
                     / m.seconds) for m in records]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b (Gaussian elimination with partial pivoting; a is small and damped)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def levenberg_marquardt(residuals: Callable[[list[float]], list[float]], x0: list[float],
                        iterations: int = 60, step: float = 1e-4) -> list[float]:
    """Minimise sum(residuals(x)^2) from x0 with a forward-difference Jacobian."""
    x, lam = list(x0), 1e-2
    r = residuals(x)
    cost = sum(v * v for v in r)
    for _ in range(iterations):
        jac = []  # columns: d r / d x_j
        for j in range(len(x)):
            xj = x[:]
            xj[j] += step
            jac.append([(a - b) / step for a, b in zip(residuals(xj), r)])
        jtj = [[sum(a * b for a, b in zip(ci, cj)) for cj in jac] for ci in jac]
        jtr = [sum(a * b for a, b in zip(ci, r)) for ci in jac]
        improved = converged = False
        while lam < 1e10:
            damped = [[v + (lam * (jtj[i][i] + 1e-9) if i == j else 0.0)
                       for j, v in enumerate(row)] for i, row in enumerate(jtj)]
            delta = _solve(damped, [-v for v in jtr])
            trial = [a + d for a, d in zip(x, delta)]
            rt = residuals(trial)
            ct = sum(v * v for v in rt)
            if ct < cost:
                x, r, lam, improved = trial, rt, max(lam / 3, 1e-9), True
                converged = cost - ct < 1e-10 * max(cost, 1e-30)
                cost = ct
                break
            lam *= 4
        if not improved or converged:
            break
    return x


def calibrate(cluster: Cluster, records: Sequence[Measurement],
              fit: Sequence[str] | None = None, robust: float = 0.02) -> Cluster:
    """The cluster with the `fit` fields (default: DEFAULT_FIELDS, and the per-call cost of
    every algorithm and the throughput and per-call cost of every codec in the records) that
    best explain the records."""
    if not records:
        raise ConfigError("no measurements to calibrate on")
    names = list(fit or DEFAULT_FIELDS)
    if fit is None:
        names += sorted({f"a2a_call_us.{m.algorithm}" for m in records})
        for codec in sorted({m.codec for m in records} - {"none"}):
            names += [f"codecs.{codec}.gbyte_s", f"codecs.{codec}.per_call_us"]
    for name in names:
        _check_field(cluster, name)

    def with_values(u: list[float]) -> Cluster:
        c = cluster
        for name, x in zip(names, u):
            c = _set(c, name, _decode(name, x))
        return c

    def residuals(u: list[float]) -> list[float]:
        # soft-L1: quadratic below `robust`, linear above, so that a few configurations the
        # model cannot express (or noisy steps) do not pull every other prediction off
        return [math.copysign(math.sqrt(2 * (math.sqrt(1 + (e / robust) ** 2) - 1)) * robust, e)
                for e in log_errors(with_values(u), records)]

    u = levenberg_marquardt(residuals, [_encode(n, _get(cluster, n)) for n in names])
    return replace(with_values(u), name=f"{cluster.name} (calibrated)")
