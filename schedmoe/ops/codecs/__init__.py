"""Payload codecs ("compressors"), each registered by name: `none`, `fp16`, `bf16`, `fp8`,
`int8` (+ error feedback `+ef`), `zstd` (lossless, byte-shuffled); the per-slice checksum
wrapper (`verify`), and `CodecSet`, the codec of each of a layer's four exchanges.

`compressor.py` holds the interface, the wire header and `none`; `fixed.py` the codecs whose
slices have one size for their shape (headers made once, ragged rows in one pass); `checks.py`
the device-side payload checks, read later.

Data plane. May import: `errors`, `registry`, `comm` (host copies that never stall the device).
zstandard and numba load when a zstd codec is first used; cupy (GPU kernels) when a CUDA
payload is first quantised.
"""
