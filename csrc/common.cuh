// Helpers shared by every kernel: dtype conversion, 128-bit packed memory access, warp
// reductions, and the host-side input checks and dtype dispatch.
//
// Conventions of all the kernels in csrc/:
// - activations are float (fp32) or __nv_bfloat16; every statistic and accumulator is fp32;
// - bf16 <-> fp32 goes through explicit intrinsics (torch compiles with
//   __CUDA_NO_BFLOAT16_CONVERSIONS__, so there are no implicit conversions);
// - row offsets are int64: a (B*T, V) logits tensor easily exceeds 2^31 elements.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace gptk {

constexpr int WARP_SIZE = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;

// ----------------------------------------------------------------------------- conversion

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ----------------------------------------------------------------------------- packed access

// N consecutive elements moved as one aligned access. With N * sizeof(T) == 16 a load is a
// single 128-bit LDG.E.128 instead of N narrow loads: the memory-bound kernels move the same
// bytes with a quarter (fp32) or an eighth (bf16) of the load instructions. With N == 1 it
// is a plain scalar access: the fallback for rows that are not 16-byte aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte pack.
template <typename T>
constexpr int vec_width() { return 16 / sizeof(T); }

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// ----------------------------------------------------------------------------- reductions

// Butterfly (xor) reductions: after log2(32) = 5 shuffle steps every lane holds the result,
// and the summation order is fixed, so the result is deterministic.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(FULL_MASK, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, offset));
  return x;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------- host checks

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
}

inline void check_float_or_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

// Runs f(T{}) with T = float or __nv_bfloat16 matching `dtype` (c10::BFloat16 and
// __nv_bfloat16 share their bit layout, so data pointers are reinterpreted).
template <typename F>
void dispatch_float_bf16(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, ": expected float32 or bfloat16, got ", dtype);
  }
}

template <typename T>
T* data_as(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
const T* const_data_as(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

// Device attributes of the current device. (Not through ATen/cuda/CUDAContext.h: it pulls
// in the cuBLAS and cuSPARSE headers, which a bare CUDA toolkit need not have.)
inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

inline int num_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace gptk
