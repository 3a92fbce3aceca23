"""The control plane of a layer call: what the ranks agree on, and what the call records.

- `options.py`: the layer's options (`MoEConfig`), canonical strings that are equal on two
  ranks iff the options mean the same there, and the objects built from them.
- `agreement.py`: the per-call record every rank swaps (options hash, input state, problems,
  capacity limit), the typed errors raised on every rank alike, and the call protocol: swap
  beforehand (all-gather) or let the record ride on the first dispatch (guess, misguess,
  resync).
- `rider.py`: the rider's wire format (the record after every slice of the first dispatch).
- `compiled.py`: the record of a call compiled as one graph on several ranks, checked by a
  custom op.
- `recorder.py`: the timing of a call's ops (`StepRecorder`, `TraceEvent`).
- `stats.py`: `LayerStats`, what the last call did on this rank.
- `load.py`: `ExpertLoad`, pairs per expert over a window of calls, and `LoadStats`, the load
  summed over the ranks read against the placement (balancedness).
- `validation.py`: checks of user-given numbers, choices and JSON files (CLI flags, cluster
  files), raising `ConfigError` with one line.

Control plane. May import: `errors`, `registry`, `comm/`, `streams/`, `routing/`, `ops/`,
`a2a_algos/`, `plan/` (placements, for the expert load).
The schedulers (`schedulers/`) and the simulator (`sim/`) are the rest of the control plane.
"""
