"""Schedule traces: Chrome trace JSON (opens in Perfetto / chrome://tracing) and Gantt charts.

An event is (task, chunk, stream, start, end), times in seconds: `StepRecorder.events` for a
measured step (MoELayer(trace=True)), `simulator.Timeline.events` for a simulated one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..control.recorder import TraceEvent


def chrome_trace(runs: Mapping[str, Iterable[TraceEvent]]) -> dict:
    """One process per run (e.g. "measured", "simulated"), one thread per stream."""
    events = []
    for pid, (label, run) in enumerate(runs.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        streams: dict[str, int] = {}
        for e in run:
            tid = streams.setdefault(e.stream, len(streams))
            name = e.task if e.chunk is None else f"{e.task}[{e.chunk}]"
            events.append({"name": name, "cat": e.stream, "ph": "X", "pid": pid, "tid": tid,
                           "ts": 1e6 * e.start, "dur": 1e6 * (e.end - e.start),
                           "args": {"chunk": e.chunk}})
        for stream, tid in streams.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": stream}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save_chrome_trace(runs: Mapping[str, Iterable[TraceEvent]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(chrome_trace({k: list(v) for k, v in runs.items()})))


def save_gantt(runs: Mapping[str, Sequence[TraceEvent]], path: str | Path,
               title: str = "") -> None:
    """One panel per run, one row per stream, one colour per task type, chunk numbers on bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({_kind(e.task) for run in runs.values() for e in run})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 1.6 + 1.2 * len(runs)), squeeze=False,
                             sharex=True)
    for ax, (label, run) in zip(axes[:, 0], runs.items()):
        streams = sorted({e.stream for e in run})
        for e in run:
            y = streams.index(e.stream)
            ax.barh(y, 1e3 * (e.end - e.start), left=1e3 * e.start, height=0.6,
                    color=colours[_kind(e.task)], edgecolor="black", linewidth=0.3)
            if e.chunk is not None and e.end - e.start > 0:
                ax.text(1e3 * (e.start + e.end) / 2, y, str(e.chunk), ha="center",
                        va="center", fontsize=6)
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels(streams)
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    fig.legend(handles, kinds, loc="upper right", fontsize=7, ncol=min(len(kinds), 6))
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kind(task: str) -> str:
    """'dispatch.compress' -> 'compress', 'combine.bwd.a2a' -> 'a2a', 'experts.bwd' -> 'experts'."""
    parts = [p for p in task.split(".") if p not in ("bwd", "dispatch", "combine")]
    return parts[-1] if parts else task
