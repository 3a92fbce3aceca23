"""Fused CUDA kernels for the int8 and fp8 codecs (cupy RawKernel, tensors shared via DLPack).

Legend: N codec rows (all destinations' rows, in order), C values per row, P destinations.

One kernel quantises and packs every destination's rows in one launch: a block per row (128
threads), loads coalesced and vectorised (4 values a thread per load where C % 4 == 0), the
row's max|x| reduced in shared memory, then its scale and quantised values written straight
into its destination's body of the wire (after the header the caller wrote). Input fp32, fp16
or bf16 is read as it is. One kernel unpacks and dequantises every destination's rows, writing
fp32, fp16 or bf16. A row's destination comes from the row offsets of the destinations
(`row_starts_P1`) and their byte offsets in the wire (`slice_offsets_P`), so padded slices and
ragged rows are the same launch. Both compute exactly what the torch path in `quant.py`
computes (the same fp32 operations, rounded to nearest even; explicit `__f*_rn` so that no
multiply-add is fused), so the bytes on the wire do not depend on which path produced them;
`tests/test_cuda_kernels.py` checks that on the CPU by compiling this source with a host shim
(a thread per CUDA thread, a barrier for `__syncthreads`), and against the torch path on a GPU.

`available()` is False without cupy or a GPU; the codecs then use torch ops on CUDA tensors.
cupy-cuda12x and cupy-cuda13x both serve: the source uses no header and no bf16 type of its
own (bf16 and fp16 travel as 16-bit integers through DLPack).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

SOURCE = r"""
#define THREADS 128

struct alignas(16) F4 { float a, b, c, d; };
struct alignas(8) H4 { unsigned short a, b, c, d; };
struct alignas(4) B4 { unsigned char a, b, c, d; };

__device__ __forceinline__ unsigned char float_to_e4m3(float v) {
    // float32 -> fp8 e4m3fn, round to nearest even; |v| <= 448 (callers clamp), NaN -> 0x7F.
    unsigned int u = __float_as_uint(v);
    unsigned char sign = (unsigned char)((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (unsigned char)(sign | 0x7f);
    if (u < 0x3c800000u) {  // below 2^-6: subnormal, in units of 2^-9
        float scaled = __fmul_rn(__uint_as_float(u), 512.0f);
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
    else if (exponent == 0u) magnitude = __fmul_rn((float)mantissa, 0.001953125f);  // 2^-9
    else magnitude = __uint_as_float(((exponent - 7u + 127u) << 23) | (mantissa << 20));
    return (b & 0x80u) ? -magnitude : magnitude;
}

__device__ __forceinline__ float half_to_float(unsigned short h) {  // exact
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0u) {
        float v = __fmul_rn((float)mantissa, 5.9604644775390625e-8f);  // 2^-24
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ float bf16_to_float(unsigned short h) {  // exact
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {  // as torch: RNE, NaN 0x7FC0
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned short float_to_half(float f) {  // as torch (FP16 library)
    float base = __fmul_rn(__fmul_rn(fabsf(f), 5.192296858534828e+33f), 7.703719777548943e-34f);
    unsigned int w = __float_as_uint(f), shl1_w = w + w, sign = w & 0x80000000u;
    unsigned int bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = __fadd_rn(__uint_as_float((bias >> 1) + 0x07800000u), base);
    unsigned int bits = __float_as_uint(base);
    unsigned int nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (unsigned short)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

// dtype: 0 float32, 1 float16, 2 bfloat16
__device__ __forceinline__ float load1(const void* x, int dtype, long long i) {
    if (dtype == 0) return ((const float*)x)[i];
    unsigned short h = ((const unsigned short*)x)[i];
    return dtype == 1 ? half_to_float(h) : bf16_to_float(h);
}

__device__ __forceinline__ void load4(const void* x, int dtype, long long i, float* v) {
    if (dtype == 0) {
        F4 f = *(const F4*)((const float*)x + i);
        v[0] = f.a; v[1] = f.b; v[2] = f.c; v[3] = f.d;
        return;
    }
    H4 h = *(const H4*)((const unsigned short*)x + i);
    unsigned short raw[4] = {h.a, h.b, h.c, h.d};
    for (int k = 0; k < 4; ++k) v[k] = dtype == 1 ? half_to_float(raw[k]) : bf16_to_float(raw[k]);
}

__device__ __forceinline__ void store1(void* out, int dtype, long long i, float v) {
    if (dtype == 0) ((float*)out)[i] = v;
    else ((unsigned short*)out)[i] = dtype == 1 ? float_to_half(v) : float_to_bf16(v);
}

__device__ __forceinline__ unsigned char quantise(float v, float scale, float qmax, int fp8) {
    float y = fminf(fmaxf(__fdiv_rn(v, scale), -qmax), qmax);
    return fp8 ? float_to_e4m3(y) : (unsigned char)(signed char)rintf(y);
}

__device__ __forceinline__ float dequantise(unsigned char q, float scale, int fp8) {
    return __fmul_rn(fp8 ? e4m3_to_float(q) : (float)(signed char)q, scale);
}

// The destination of row r (the last p with row_starts[p] <= r; P is small).
__device__ __forceinline__ int destination(const long long* row_starts, int slices, long long r) {
    int lo = 0, hi = slices - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (row_starts[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void pack_rows(const void* x, int dtype, unsigned char* wire,
                                     const long long* row_starts, const long long* slice_offsets,
                                     int slices, long long cols, long long body_offset, int fp8,
                                     int vec) {
    __shared__ float top[THREADS];
    __shared__ int bad[THREADS];
    long long r = blockIdx.x;
    int t = threadIdx.x, p = destination(row_starts, slices, r);
    long long rows = row_starts[p + 1] - row_starts[p], i = r - row_starts[p];
    unsigned char* body = wire + slice_offsets[p] + body_offset;
    unsigned char* q = body + rows * 4 + i * cols;
    long long first = r * cols;
    float qmax = fp8 ? 448.0f : 127.0f, amax = 0.0f, v[4];
    int nonfinite = 0;
    if (vec) {
        for (long long g = t; g < cols / 4; g += THREADS) {
            load4(x, dtype, first + 4 * g, v);
            for (int k = 0; k < 4; ++k) {
                float a = fabsf(v[k]);
                if (!isfinite(a)) nonfinite = 1; else amax = fmaxf(amax, a);
            }
        }
    } else {
        for (long long c = t; c < cols; c += THREADS) {
            float a = fabsf(load1(x, dtype, first + c));
            if (!isfinite(a)) nonfinite = 1; else amax = fmaxf(amax, a);
        }
    }
    top[t] = amax;
    bad[t] = nonfinite;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (t < half) {
            top[t] = fmaxf(top[t], top[t + half]);
            bad[t] |= bad[t + half];
        }
        __syncthreads();
    }
    amax = top[0];
    nonfinite = bad[0];
    float scale = nonfinite ? __uint_as_float(0x7fc00000u)
                            : amax > 0.0f ? __fdiv_rn(amax, qmax) : 1.0f;
    if (t == 0) ((float*)body)[i] = scale;
    if (vec) {
        for (long long g = t; g < cols / 4; g += THREADS) {
            B4 o = {0, 0, 0, 0};
            if (!nonfinite) {
                load4(x, dtype, first + 4 * g, v);
                o.a = quantise(v[0], scale, qmax, fp8); o.b = quantise(v[1], scale, qmax, fp8);
                o.c = quantise(v[2], scale, qmax, fp8); o.d = quantise(v[3], scale, qmax, fp8);
            }
            *(B4*)(q + 4 * g) = o;
        }
    } else {
        for (long long c = t; c < cols; c += THREADS)
            q[c] = nonfinite ? 0 : quantise(load1(x, dtype, first + c), scale, qmax, fp8);
    }
}

extern "C" __global__ void unpack_rows(const unsigned char* wire, const long long* row_starts,
                                       const long long* slice_offsets, int slices,
                                       long long cols, long long body_offset, int fp8,
                                       void* out, int dtype, int vec) {
    long long r = blockIdx.x;
    int t = threadIdx.x, p = destination(row_starts, slices, r);
    long long rows = row_starts[p + 1] - row_starts[p], i = r - row_starts[p];
    const unsigned char* body = wire + slice_offsets[p] + body_offset;
    float scale = ((const float*)body)[i];
    const unsigned char* q = body + rows * 4 + i * cols;
    long long first = r * cols;
    if (vec && dtype == 0) {
        for (long long g = t; g < cols / 4; g += THREADS) {
            B4 b = *(const B4*)(q + 4 * g);
            F4 f = {dequantise(b.a, scale, fp8), dequantise(b.b, scale, fp8),
                    dequantise(b.c, scale, fp8), dequantise(b.d, scale, fp8)};
            *(F4*)((float*)out + first + 4 * g) = f;
        }
    } else if (vec) {
        for (long long g = t; g < cols / 4; g += THREADS) {
            B4 b = *(const B4*)(q + 4 * g);
            unsigned char raw[4] = {b.a, b.b, b.c, b.d};
            for (int k = 0; k < 4; ++k)
                store1(out, dtype, first + 4 * g + k, dequantise(raw[k], scale, fp8));
        }
    } else {
        for (long long c = t; c < cols; c += THREADS)
            store1(out, dtype, first + c, dequantise(q[c], scale, fp8));
    }
}
"""

THREADS = 128  # as the source's THREADS
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when cupy imports and sees a GPU."""
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:  # cupy missing, or no driver: the torch path serves
        return False


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels take `x` (a CUDA tensor of a dtype they read, cupy present)."""
    return x.is_cuda and x.dtype in DTYPES and available()


@functools.lru_cache(maxsize=None)
def _kernels():
    import cupy
    module = cupy.RawModule(code=SOURCE, options=("--std=c++14",))
    return module.get_function("pack_rows"), module.get_function("unpack_rows")


def _as_cupy(t: torch.Tensor):
    """`t` for cupy through DLPack; 16-bit floats as int16 (cupy has no bfloat16). Called with
    cupy's current stream torch's, so that DLPack orders nothing more."""
    import cupy
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cupy.from_dlpack(t.detach())


def _launch(kernel, rows: int, tensors: tuple[torch.Tensor, ...],
            args: Callable[[list], tuple]) -> None:
    """One block per row on torch's current stream (the codec lane inside an exchange,
    streams/lanes.py); `args(arrays)` builds the arguments from the tensors as cupy arrays."""
    import cupy
    if rows == 0:
        return
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernel((rows,), (THREADS,), args([_as_cupy(t) for t in tensors]))


def pack_rows(x_NC: torch.Tensor, wire: torch.Tensor, row_starts_P1: torch.Tensor,
              slice_offsets_P: torch.Tensor, body_offset: int, fp8: bool) -> None:
    """Write each row's scale and quantised values into its destination's body of `wire`
    (uint8, contiguous; destination p's rows are [row_starts[p], row_starts[p+1]), its body
    starts `slice_offsets[p] + body_offset` bytes in). `x_NC`: contiguous fp32/fp16/bf16."""
    import cupy
    N, C = x_NC.shape
    _launch(_kernels()[0], N, (x_NC, wire, row_starts_P1, slice_offsets_P), lambda a: (
        a[0], cupy.int32(DTYPES[x_NC.dtype]), a[1], a[2], a[3],
        cupy.int32(slice_offsets_P.numel()), cupy.int64(C), cupy.int64(body_offset),
        cupy.int32(fp8), cupy.int32(C % 4 == 0)))


def unpack_rows(wire: torch.Tensor, row_starts_P1: torch.Tensor, slice_offsets_P: torch.Tensor,
                body_offset: int, rows: int, cols: int, fp8: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """`[rows, cols]` of `dtype` (fp32/fp16/bf16) from the bodies in `wire`, laid out as
    `pack_rows` writes them."""
    import cupy
    out = torch.empty(rows, cols, dtype=dtype, device=wire.device)
    _launch(_kernels()[1], rows, (wire, row_starts_P1, slice_offsets_P, out), lambda a: (
        a[0], a[1], a[2], cupy.int32(slice_offsets_P.numel()), cupy.int64(cols),
        cupy.int64(body_offset), cupy.int32(fp8), a[3], cupy.int32(DTYPES[dtype]),
        cupy.int32(cols % 4 == 0)))
    return out
