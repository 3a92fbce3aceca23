"""The fused int8/fp8 CUDA kernels, checked without a GPU by compiling their source for the host,
and against the torch path on a GPU when one is present."""

from __future__ import annotations

import ctypes
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
#include <cmath>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
struct Dim { unsigned int x = 0, y = 0, z = 0; };
static Dim threadIdx, blockIdx, blockDim;
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
using std::isfinite;
"""

HOST_LAUNCHERS = r"""
// Run every thread of a 256-wide grid in turn (the kernels use no shared memory or barriers).
#define GRID(total, call) { blockDim.x = 256; \
    for (long long b = 0; b * 256 < (total); ++b) for (unsigned t = 0; t < 256; ++t) { \
        blockIdx.x = (unsigned)b; threadIdx.x = t; call; } }
extern "C" void host_pack(const float* x, unsigned char* w, long long total, long long rows,
                          long long cols, long long slice, long long off, int fp8) {
    GRID(total, pack_rows(x, w, total, rows, cols, slice, off, fp8)) }
extern "C" void host_unpack(const unsigned char* w, float* out, long long total, long long rows,
                            long long cols, long long slice, long long off, int fp8) {
    GRID(total, unpack_rows(w, out, total, rows, cols, slice, off, fp8)) }
extern "C" void host_to_e4m3(const float* v, unsigned char* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = float_to_e4m3(v[i]); }
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the kernels for the host")
    d = tmp_path_factory.mktemp("kernels")
    (d / "k.cpp").write_text(HOST_SHIM + cuda_kernels.SOURCE + HOST_LAUNCHERS)
    subprocess.run(["g++", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o",
                    str(d / "k.so"), str(d / "k.cpp")], check=True)
    lib = ctypes.CDLL(str(d / "k.so"))
    ll = ctypes.c_longlong
    for name in ("host_pack", "host_unpack"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ll, ll, ll, ll, ll,
                                       ctypes.c_int]
    lib.host_to_e4m3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ll]
    return lib


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_e4m3_conversion_matches_torch(host_kernels):
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # ties: round to even
    near = torch.cat([torch.nextafter(mids, torch.tensor(-1e9)),
                      torch.nextafter(mids, torch.tensor(1e9))])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-14, 9, (200_000,),
                                                                       generator=g).float())
    values = torch.cat([grid, mids, near, rand, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    values = values.clamp(-448, 448).contiguous()
    out = np.empty(values.numel(), dtype=np.uint8)
    x = values.numpy()
    host_kernels.host_to_e4m3(ptr(x), ptr(out), x.size)
    expected = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_fused_kernels_write_the_same_bytes_as_torch(host_kernels, name):
    codec = make_codec(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 37, 24, generator=g) * torch.exp2(torch.randint(-20, 20, (3, 2, 37, 1),
                                                                         generator=g).float())
    x[0, 0, 3] = 0.0
    x[1, 1, 5, 7] = float("nan")
    x[2, 0, 9, 0] = float("-inf")
    x[2, 1, 11] = 1e-40  # subnormal fp32
    reference = codec.compress(x)  # the torch path
    P, size = x.shape[0], reference.sizes[0]
    wire = np.zeros((P, size), dtype=np.uint8)
    wire[:, :HEADER_BYTES] = reference.data.view(P, size)[:, :HEADER_BYTES].numpy()
    xs = x.reshape(P, 2 * 37, 24).contiguous().numpy()
    host_kernels.host_pack(ptr(xs), ptr(wire), P * 74, 74, 24, size, HEADER_BYTES,
                           int(name == "fp8"))
    assert np.array_equal(wire.reshape(-1), reference.data.numpy())

    out = np.empty((P, 74, 24), dtype=np.float32)
    host_kernels.host_unpack(ptr(wire), ptr(out), P * 74, 74, 24, size, HEADER_BYTES,
                             int(name == "fp8"))
    decoded = codec.decompress(Wire(reference.data, reference.sizes),
                               SliceSpec(tuple(x.shape[1:]), x.dtype)).reshape(P, 74, 24)
    assert torch.equal(torch.from_numpy(out).view(torch.int32), decoded.view(torch.int32))


@pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels.available()),
                    reason="needs a CUDA GPU and cupy")
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_fused_kernels_on_gpu_match_the_cpu_path(name):
    codec = make_codec(name)
    x = torch.randn(4, 2, 300, 512)
    x[1, 0, 7, 3] = float("inf")
    cpu = codec.compress(x)
    gpu = codec.compress(x.cuda())
    assert torch.equal(gpu.data.cpu(), cpu.data)
    spec = SliceSpec(tuple(x.shape[1:]), x.dtype)
    y_gpu = codec.decompress(Wire(gpu.data, gpu.sizes), spec)
    y_cpu = codec.decompress(cpu, spec)
    assert torch.equal(y_gpu.cpu().view(torch.int32), y_cpu.view(torch.int32))
