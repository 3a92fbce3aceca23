"""The fused int8/fp8 CUDA kernels, checked without a GPU by compiling their source for the host
and against the torch path on a GPU when one is present."""

from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess

import numpy as np
import pytest
import torch

from schedmoe.ops import SliceSpec, Wire
from schedmoe.ops.codecs import cuda_kernels
from schedmoe.ops.codecs.codec_set import make_codec
from schedmoe.ops.codecs.compressor import HEADER_BYTES

HOST_SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
struct Dim { unsigned int x = 0, y = 0, z = 0; };
static Dim blockIdx, blockDim;
static thread_local Dim threadIdx;
static std::barrier<>* block_barrier;
#define __syncthreads() block_barrier->arrive_and_wait()
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
using std::isfinite;
"""

HOST_LAUNCHERS = r"""
// A block at a time, each of its THREADS threads a host thread, __syncthreads a barrier.
template <class Body> static void grid(long long blocks, Body body) {
    blockDim.x = THREADS;
    for (long long b = 0; b < blocks; ++b) {
        blockIdx.x = (unsigned)b;
        std::barrier<> bar(THREADS);
        block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < THREADS; ++t)
            threads.emplace_back([&, t] { threadIdx.x = t; body(); });
        for (auto& thread : threads) thread.join();
    }
}
extern "C" void host_pack(const void* x, int dtype, unsigned char* w, const long long* starts,
                          const long long* offsets, int slices, long long rows, long long cols,
                          long long body, int fp8, int vec) {
    grid(rows, [&] { pack_rows(x, dtype, w, starts, offsets, slices, cols, body, fp8, vec); }); }
extern "C" void host_unpack(const unsigned char* w, const long long* starts,
                            const long long* offsets, int slices, long long rows, long long cols,
                            long long body, int fp8, void* out, int dtype, int vec) {
    grid(rows, [&] { unpack_rows(w, starts, offsets, slices, cols, body, fp8, out, dtype, vec); }); }
extern "C" void host_to_e4m3(const float* v, unsigned char* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = float_to_e4m3(v[i]); }
extern "C" void host_to_16(const float* v, unsigned short* out, long long n, int half) {
    for (long long i = 0; i < n; ++i) out[i] = half ? float_to_half(v[i]) : float_to_bf16(v[i]); }
extern "C" void host_from_16(const unsigned short* v, float* out, long long n, int half) {
    for (long long i = 0; i < n; ++i) out[i] = half ? half_to_float(v[i]) : bf16_to_float(v[i]); }
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the kernels for the host")
    d = tmp_path_factory.mktemp("kernels")
    (d / "k.cpp").write_text(HOST_SHIM + cuda_kernels.SOURCE + HOST_LAUNCHERS)
    subprocess.run(["g++", "-std=c++20", "-O2", "-ffp-contract=off", "-pthread", "-shared",
                    "-fPIC", "-o", str(d / "k.so"), str(d / "k.cpp")], check=True)
    lib = ctypes.CDLL(str(d / "k.so"))
    ll, p, i32 = ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int
    lib.host_pack.argtypes = [p, i32, p, p, p, i32, ll, ll, ll, i32, i32]
    lib.host_unpack.argtypes = [p, p, p, i32, ll, ll, ll, i32, p, i32, i32]
    lib.host_to_e4m3.argtypes = [p, p, ll]
    lib.host_to_16.argtypes = [p, p, ll, i32]
    lib.host_from_16.argtypes = [p, p, ll, i32]
    return lib


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _tricky_floats(n: int = 200_000) -> torch.Tensor:
    """Random floats over many binades, with ties, subnormals, zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g
                                                                  ).float())
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 65504.0, 65520.0, 65519.99, 1e10,
                            float("inf"), float("-inf"), 5.96e-8, 2.98e-8, 1.0 + 2 ** -11])
    return torch.cat([rand, special])
def test_e4m3_conversion_matches_torch(host_kernels):
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # ties: round to even
    near = torch.cat([torch.nextafter(mids, torch.tensor(-1e9)),
                      torch.nextafter(mids, torch.tensor(1e9))])
    values = torch.cat([grid, mids, near, _tricky_floats(), torch.tensor([1e-30, -1e-30])])
    values = values[torch.isfinite(values)]
    values = values.clamp(-448, 448).contiguous()
    out = np.empty(values.numel(), dtype=np.uint8)
    x = values.numpy()
    host_kernels.host_to_e4m3(ptr(x), ptr(out), x.size)
    expected = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("half", [True, False])
def test_16_bit_conversions_match_torch(host_kernels, half):
    dtype = torch.float16 if half else torch.bfloat16
    values = _tricky_floats().contiguous()
    out = np.empty(values.numel(), dtype=np.uint16)
    host_kernels.host_to_16(ptr(values.numpy()), ptr(out), values.numel(), int(half))
    assert np.array_equal(out, values.to(dtype).view(torch.int16).numpy().view(np.uint16))
    every = np.arange(65536, dtype=np.uint16)  # every 16-bit pattern back to float, NaN aside
    back = np.empty(65536, dtype=np.float32)
    host_kernels.host_from_16(ptr(every), ptr(back), 65536, int(half))
    expected = torch.from_numpy(every.view(np.int16)).view(dtype).float().numpy()
    assert np.array_equal(back, expected, equal_nan=True)


def _geometry(rows: list[int], sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array([0, *itertools.accumulate(rows)], dtype=np.int64)
    offsets = np.array([0, *itertools.accumulate(sizes)][:-1], dtype=np.int64)
    return starts, offsets


def _host_pack(lib, x_NC: torch.Tensor, wire: np.ndarray, rows: list[int], sizes: list[int],
               fp8: bool) -> None:
    starts, offsets = _geometry(rows, sizes)
    raw = x_NC.view(torch.int16) if x_NC.dtype != torch.float32 else x_NC
    lib.host_pack(ptr(raw.numpy()), cuda_kernels.DTYPES[x_NC.dtype], ptr(wire), ptr(starts),
                  ptr(offsets), len(rows), x_NC.shape[0], x_NC.shape[1], HEADER_BYTES, int(fp8),
                  int(x_NC.shape[1] % 4 == 0))


def _host_unpack(lib, wire: np.ndarray, rows: list[int], sizes: list[int], cols: int,
                 fp8: bool, dtype: torch.dtype) -> torch.Tensor:
    starts, offsets = _geometry(rows, sizes)
    out = torch.empty(sum(rows), cols, dtype=dtype)
    raw = out.view(torch.int16) if dtype != torch.float32 else out
    lib.host_unpack(ptr(wire), ptr(starts), ptr(offsets), len(rows), sum(rows), cols,
                    HEADER_BYTES, int(fp8), ptr(raw.numpy()), cuda_kernels.DTYPES[dtype],
                    int(cols % 4 == 0))
    return out


def _payload(cols: int, dtype: torch.dtype, n: int = 21) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (n, 1),
                                                                     generator=g).float())
    x[0] = 0.0
    x[3, 2] = float("nan")
    x[5, 0] = float("-inf")
    x[7] = 1e-40  # subnormal fp32
    return x.to(dtype)


CASES = [(name, dtype, cols) for name in ("int8", "fp8")
         for dtype in (torch.float32, torch.float16, torch.bfloat16) for cols in (24, 23)]


@pytest.mark.parametrize("name,dtype,cols", CASES)
def test_padded_slices_same_bytes_and_values_as_torch(host_kernels, name, dtype, cols):
    """One launch over all slices (a block per row, vector loads where cols % 4 == 0)."""
    codec, fp8 = make_codec(name), name == "fp8"
    x = _payload(cols, dtype, 3 * 7).view(3, 7, cols)
    reference = codec.compress(x)  # the torch path
    wire = reference.data.numpy().copy()
    wire.reshape(3, -1)[:, HEADER_BYTES:] = 0
    _host_pack(host_kernels, x.reshape(21, cols), wire, [7] * 3, reference.sizes, fp8)
    assert np.array_equal(wire, reference.data.numpy())
    spec = SliceSpec(tuple(x.shape[1:]), dtype)
    expected = codec.decompress(Wire(reference.data, reference.sizes), spec).reshape(21, cols)
    got = _host_unpack(host_kernels, wire, [7] * 3, reference.sizes, cols, fp8, dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name,dtype,cols", CASES)
def test_ragged_rows_of_every_destination_in_one_launch(host_kernels, name, dtype, cols):
    codec, fp8 = make_codec(name), name == "fp8"
    rows = [5, 0, 9, 7]
    x = _payload(cols, dtype, sum(rows))
    reference = codec.compress_rows(x, rows)  # the torch path, destination by destination
    wire = reference.data.numpy().copy()
    for start, size in zip(_geometry(rows, reference.sizes)[1], reference.sizes):
        wire[start + HEADER_BYTES:start + size] = 0
    _host_pack(host_kernels, x, wire, rows, reference.sizes, fp8)
    assert np.array_equal(wire, reference.data.numpy())
    specs = [SliceSpec((n, cols), dtype) for n in rows]
    expected = codec.decompress_rows(Wire(reference.data, reference.sizes), specs)
    got = _host_unpack(host_kernels, wire, rows, reference.sizes, cols, fp8, dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels.available()),
                    reason="needs a CUDA GPU and cupy")
@pytest.mark.parametrize("name,dtype,cols", CASES)
def test_fused_kernels_on_gpu_match_the_cpu_path(name, dtype, cols):
    codec = make_codec(name)
    x = _payload(cols, dtype, 4 * 300).view(4, 300, cols)
    cpu, gpu = codec.compress(x), codec.compress(x.cuda())
    assert torch.equal(gpu.data.cpu(), cpu.data)
    spec = SliceSpec(tuple(x.shape[1:]), dtype)
    torch.testing.assert_close(codec.decompress(Wire(gpu.data, gpu.sizes), spec).cpu(),
                               codec.decompress(cpu, spec), rtol=0, atol=0, equal_nan=True)
    rows = [500, 0, 301, 399]
    flat = x.reshape(-1, cols)
    cpu, gpu = codec.compress_rows(flat, rows), codec.compress_rows(flat.cuda(), rows)
    assert torch.equal(gpu.data.cpu(), cpu.data)
    specs = [SliceSpec((n, cols), dtype) for n in rows]
    torch.testing.assert_close(codec.decompress_rows(Wire(gpu.data, gpu.sizes), specs).cpu(),
                               codec.decompress_rows(cpu, specs), rtol=0, atol=0,
                               equal_nan=True)
