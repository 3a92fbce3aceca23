"""Fused CUDA kernels for the int8 and fp8 codecs (cupy RawKernel, tensors shared via DLPack).

One kernel quantises and packs: each thread takes one row, finds max|row|, writes the row's
scale and its quantised values straight into the slice's body of the wire buffer (after the
header the caller wrote). One kernel unpacks and dequantises. Both compute exactly what the torch
path in `quant.py` computes (same fp32 operations, round-to-nearest-even), so the bytes on the
wire do not depend on which path produced them; `tests/test_cuda_kernels.py` checks that on the
CPU by compiling this source with a host shim, and against the torch path on a GPU when present.

`available()` is False without cupy or a GPU; the codecs then use torch ops on CUDA tensors.
"""

from __future__ import annotations

import functools

import torch

SOURCE = r"""
__device__ __forceinline__ unsigned char float_to_e4m3(float v) {
    // float32 -> fp8 e4m3fn, round to nearest even; |v| <= 448 (callers clamp), NaN -> 0x7F.
    unsigned int u = __float_as_uint(v);
    unsigned char sign = (unsigned char)((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (unsigned char)(sign | 0x7f);
    if (u < 0x3c800000u) {  // below 2^-6: subnormal, in units of 2^-9
        float scaled = __uint_as_float(u) * 512.0f;
        return (unsigned char)(sign | (unsigned int)rintf(scaled));
    }
    unsigned int exponent = (u >> 23) - 127u + 7u;
    unsigned int mantissa = u & 0x7fffffu;
    unsigned int kept = mantissa >> 20, rest = mantissa & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (kept & 1u))) {
        kept += 1u;
        if (kept == 8u) { kept = 0u; exponent += 1u; }
    }
    return (unsigned char)(sign | (exponent << 3) | kept);
}

__device__ __forceinline__ float e4m3_to_float(unsigned char b) {
    unsigned int exponent = (b >> 3) & 0xfu, mantissa = b & 0x7u;
    float magnitude;
    if (exponent == 15u && mantissa == 7u) magnitude = __uint_as_float(0x7fc00000u);
    else if (exponent == 0u) magnitude = (float)mantissa * 0.001953125f;  // 2^-9
    else magnitude = __uint_as_float(((exponent - 7u + 127u) << 23) | (mantissa << 20));
    return (b & 0x80u) ? -magnitude : magnitude;
}

extern "C" __global__ void pack_rows(const float* x, unsigned char* wire, long long total_rows,
                                     long long rows, long long cols, long long slice_bytes,
                                     long long body_offset, int fp8) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= total_rows) return;
    long long p = r / rows, i = r % rows;
    const float* row = x + r * cols;
    unsigned char* body = wire + p * slice_bytes + body_offset;
    float* scales = (float*)body;
    unsigned char* q = body + rows * 4 + i * cols;
    float qmax = fp8 ? 448.0f : 127.0f;
    float amax = 0.0f;
    bool finite = true;
    for (long long c = 0; c < cols; ++c) {
        float a = fabsf(row[c]);
        if (!isfinite(a)) finite = false; else amax = fmaxf(amax, a);
    }
    if (!finite) {
        scales[i] = __uint_as_float(0x7fc00000u);
        for (long long c = 0; c < cols; ++c) q[c] = 0;
        return;
    }
    float scale = amax > 0.0f ? amax / qmax : 1.0f;
    scales[i] = scale;
    for (long long c = 0; c < cols; ++c) {
        float y = fminf(fmaxf(row[c] / scale, -qmax), qmax);
        q[c] = fp8 ? float_to_e4m3(y) : (unsigned char)(signed char)rintf(y);
    }
}

extern "C" __global__ void unpack_rows(const unsigned char* wire, float* out,
                                       long long total_rows, long long rows, long long cols,
                                       long long slice_bytes, long long body_offset, int fp8) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= total_rows) return;
    long long p = r / rows, i = r % rows;
    const unsigned char* body = wire + p * slice_bytes + body_offset;
    float scale = ((const float*)body)[i];
    const unsigned char* q = body + rows * 4 + i * cols;
    float* row = out + r * cols;
    for (long long c = 0; c < cols; ++c)
        row[c] = (fp8 ? e4m3_to_float(q[c]) : (float)(signed char)q[c]) * scale;
}
"""

THREADS = 256


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when cupy imports and sees a GPU."""
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:  # cupy missing, or no driver: the torch path serves
        return False


@functools.lru_cache(maxsize=None)
def _kernels():
    import cupy
    module = cupy.RawModule(code=SOURCE, options=("--std=c++14",))
    return module.get_function("pack_rows"), module.get_function("unpack_rows")


def _launch(kernel, rows_total: int, args: tuple) -> None:
    import cupy
    if rows_total == 0:
        return
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with stream:
        kernel(((rows_total + THREADS - 1) // THREADS,), (THREADS,), args)


def pack_rows(x_PRC: torch.Tensor, wire_PB: torch.Tensor, body_offset: int, fp8: bool) -> None:
    """Write scales and quantised rows into the bodies of `wire_PB` (uint8 [P, slice bytes],
    contiguous), each body starting `body_offset` bytes into its slice."""
    import cupy
    P, R, C = x_PRC.shape
    x = cupy.from_dlpack(x_PRC.float().contiguous())
    _launch(_kernels()[0], P * R, (x, cupy.from_dlpack(wire_PB), cupy.int64(P * R),
                                   cupy.int64(R), cupy.int64(C), cupy.int64(wire_PB.stride(0)),
                                   cupy.int64(body_offset), cupy.int32(fp8)))


def unpack_rows(body_PB: torch.Tensor, rows: int, cols: int, fp8: bool) -> torch.Tensor:
    """float32 [P, rows, cols] from the bodies `body_PB` (a row-strided uint8 view)."""
    import cupy
    P = body_PB.shape[0]
    out = torch.empty(P, rows, cols, dtype=torch.float32, device=body_PB.device)
    _launch(_kernels()[1], P * rows, (cupy.from_dlpack(body_PB), cupy.from_dlpack(out),
                                      cupy.int64(P * rows), cupy.int64(rows), cupy.int64(cols),
                                      cupy.int64(body_PB.stride(0)), cupy.int64(0),
                                      cupy.int32(fp8)))
    return out
