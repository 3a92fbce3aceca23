"""The simulator: a model of clusters, codecs and the pipelined schedule, for what-if questions.

- `timeline.py`: the schedule on two resources (compute, communication) with interference.
- `cluster.py`: a cluster's links, NICs, bus and compute; presets in `clusters/*.json`; the
  A2A cost of each algorithm's message pattern.
- `codecs.py`: codecs by ratio, throughput and per-call cost (ours and a ZFP-like one).
- `model.py`: a layer's step on a cluster, and the search over (algorithm, codec, r).
- `calibrate.py`: fit a cluster's constants to measured steps.

Control plane. May import: `errors`, `plan/`, `control/`.
"""

from .calibrate import Measurement, calibrate, load_measurements, log_errors
from .cluster import (ALGORITHMS, Cluster, a2a_seconds, exchange_seconds, issue_seconds,
                      load_cluster, preset_names)
from .codecs import CodecModel, codec_model
from .model import CODECS, Prediction, Workload, chunk_costs, predict, search
from .timeline import BACKWARD, FORWARD, CostModel, Timeline, simulate

__all__ = [
    "ALGORITHMS", "BACKWARD", "CODECS", "FORWARD", "Cluster", "CodecModel", "CostModel",
    "Measurement", "Prediction", "Timeline", "Workload", "a2a_seconds", "calibrate",
    "chunk_costs", "codec_model", "exchange_seconds", "issue_seconds", "load_cluster",
    "load_measurements", "log_errors", "predict", "preset_names", "search", "simulate",
]
