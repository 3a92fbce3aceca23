"""Lanes: where a call's device work runs and what orders it (CUDA streams on GPUs).

- `lanes.py`: `Lanes` (compute, codec, comm, shared) with `on`/`join`, the only ordering
  between them; CUDA streams as its backend on GPUs; inline on CPUs.
- `checking.py`: a fake backend that runs the CUDA ordering on CPU tensors and checks every
  access the way the CUDA stream sanitizer does (tests, `experiments/gpu_check.py --dry-run`).

Data plane. May import: `errors`. Imported by `exchange/`, `a2a_algos/`, the schedulers, the
layer and `overlap/`.
"""
