"""One exchange of the data path: compress -> all-to-all -> decompress, differentiable.

- `send.py`: `exchange` (autograd), `start_send` / `PendingSend` (issue now, wait later) for
  padded payloads and ragged rows; the agreement record may ride on a call's first dispatch
  (any object with `attach`/`detach`, control/rider.py).
- `events.py`: the hooks through which an exchange tells the features above it that it started,
  waits or arrived (micro-batch turns and the gradient link of `overlap/` subscribe).

Data plane. May import: `errors`, `comm/`, `streams/`, `a2a_algos/`, `ops/` (the codecs).
"""
