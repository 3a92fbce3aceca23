"""Tools around the library, not part of a layer call.

- `cli.py`: the `schedmoe` command (`bench`, `simulate`, `calibrate`, `train`, `emulate`).
- `bench.py`: the benchmark of one layer on local ranks (`schedmoe bench`).
- `launch.py`: starting local ranks (fork server, signals, fail-fast) or running under torchrun.
- `testing.py`: `run_ranks`, local gloo ranks for tests.
- `emulate.py`: a multi-node cluster emulated with network namespaces and `tc`.
- `trace.py`: Chrome traces and Gantt charts of recorded ops.
- `train/`: `schedmoe train`, a small MoE language model trained with expert parallelism.

May import anything in the package; nothing in the package imports it.
"""
