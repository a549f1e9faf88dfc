// Bias + GELU between the MLP's two matmuls (the matmuls themselves run on cuBLAS, through
// torch): out = gelu(pre + bias), where pre = x @ W_fc^T comes out of the first matmul
// without its bias. Adding the bias here saves a pass over the (rows, 4C) hidden tensor, and
// the backward recomputes pre + bias instead of storing it.
//
// Two GELU flavours, chosen at compile time (template parameter TANH):
// GPT-2's tanh approximation, with u = k0 * (h + k1 * h^3), k0 = sqrt(2/pi), k1 = 0.044715:
//     gelu(h)  = 0.5 * h * (1 + tanh(u))
//     gelu'(h) = 0.5 * (1 + tanh(u)) + 0.5 * h * (1 - tanh(u)^2) * k0 * (1 + 3 * k1 * h^2)
// and the exact form (nanoGPT's nn.GELU()), with Phi the normal CDF and phi its density:
//     gelu(h)  = h * Phi(h) = 0.5 * h * (1 + erf(h / sqrt(2)))
//     gelu'(h) = Phi(h) + h * phi(h),   phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
// Backward (dGELU fused with the bias re-add): d pre = d out * gelu'(pre + bias); the bias
// gradient is the column sum of d pre, left to torch's deterministic reduction. (cuBLASLt's
// GELU_AUX_BIAS / DGELU epilogues would fold both passes into the matmuls, as llm.c does,
// but torch exposes neither: its bias+GELU epilogue, torch._addmm_activation, returns no
// pre-activation, so it serves only calls without a backward: kernels/cuda/mlp.py.)
//
// Both kernels are elementwise over 16-byte packs (grid-stride); a pack never straddles two
// rows because H is a multiple of the pack width whenever packs are used.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace gptk {
namespace {

constexpr float GELU_K0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float GELU_K1 = 0.044715f;
constexpr int THREADS = 256;

constexpr float SQRT_HALF = 0.7071067811865476f;
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

template <bool TANH>
__device__ __forceinline__ float gelu(float h) {
  if constexpr (TANH) {
    const float t = tanhf(GELU_K0 * (h + GELU_K1 * h * h * h));
    return 0.5f * h * (1.f + t);
  } else {
    return 0.5f * h * (1.f + erff(h * SQRT_HALF));
  }
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float h) {
  if constexpr (TANH) {
    const float t = tanhf(GELU_K0 * (h + GELU_K1 * h * h * h));
    return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * GELU_K0 * (1.f + 3.f * GELU_K1 * h * h);
  } else {
    return 0.5f * (1.f + erff(h * SQRT_HALF)) + h * INV_SQRT_2PI * expf(-0.5f * h * h);
  }
}

template <typename T, int VEC, bool TANH>
__global__ void bias_gelu_forward_kernel(T* __restrict__ out, const T* __restrict__ pre,
                                         const T* __restrict__ bias, int64_t packs, int H) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = p * VEC;
    const int col = int(i % H);
    const Pack<T, VEC> h = load_pack<VEC>(pre + i);
    Pack<T, VEC> b;
    if (bias != nullptr) b = load_pack<VEC>(bias + col);
    Pack<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      y.v[j] = from_float<T>(gelu<TANH>(to_float(h.v[j]) + (bias != nullptr ? to_float(b.v[j]) : 0.f)));
    store_pack(out + i, y);
  }
}

template <typename T, int VEC, bool TANH>
__global__ void bias_gelu_backward_kernel(T* __restrict__ dpre, const T* __restrict__ dout,
                                          const T* __restrict__ pre, const T* __restrict__ bias,
                                          int64_t packs, int H) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = p * VEC;
    const int col = int(i % H);
    const Pack<T, VEC> h = load_pack<VEC>(pre + i);
    const Pack<T, VEC> g = load_pack<VEC>(dout + i);
    Pack<T, VEC> b;
    if (bias != nullptr) b = load_pack<VEC>(bias + col);
    Pack<T, VEC> d;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float hb = to_float(h.v[j]) + (bias != nullptr ? to_float(b.v[j]) : 0.f);
      d.v[j] = from_float<T>(to_float(g.v[j]) * gelu_grad<TANH>(hb));
    }
    store_pack(dpre + i, d);
  }
}

void check_bias(const at::Tensor& pre, const std::optional<at::Tensor>& bias) {
  check_cuda(pre, "pre");
  check_float_or_bf16(pre, "pre");
  check_contiguous(pre, "pre");
  TORCH_CHECK(pre.dim() >= 1 && pre.size(-1) > 0 && pre.size(-1) <= INT32_MAX,
              "pre must have a non-empty last dim, got shape ", pre.sizes());
  if (!bias) return;
  check_same_device(pre, "pre", *bias, "bias");
  check_contiguous(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == pre.size(-1), "bias must have shape (",
              pre.size(-1), ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == pre.scalar_type(), "bias must have pre's dtype ",
              pre.scalar_type(), ", got ", bias->scalar_type());
}

// Launches kernel<T, VEC> (or <T, 1> where the tensors do not allow 16-byte packs) over
// `numel` elements with a grid that covers the GPU a few times over.
template <typename T, typename Launch>
void launch_elementwise(int64_t numel, int H, std::initializer_list<const at::Tensor*> tensors,
                        Launch&& launch) {
  constexpr int VEC = vec_width<T>();
  bool vec = H % VEC == 0;
  for (const at::Tensor* t : tensors) vec = vec && is_aligned(t->data_ptr(), 16);
  const int64_t packs = numel / (vec ? VEC : 1);
  const int64_t blocks = std::min<int64_t>(ceil_div(packs, THREADS), int64_t(num_sms()) * 16);
  launch(vec, packs, dim3(unsigned(blocks)));
}

// Runs f(std::bool_constant<TANH>{}) for the GELU flavour.
template <typename F>
void dispatch_gelu(bool approximate_tanh, F&& f) {
  if (approximate_tanh) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

at::Tensor bias_gelu_forward(const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                             bool approximate_tanh) {
  check_bias(pre, bias);
  const c10::cuda::CUDAGuard guard(pre.device());
  at::Tensor out = at::empty_like(pre);
  if (pre.numel() == 0) return out;
  const int H = int(pre.size(-1));
  dispatch_float_bf16(pre.scalar_type(), "bias_gelu", [&](auto tag) {
    using T = decltype(tag);
    dispatch_gelu(approximate_tanh, [&](auto tanh_tag) {
      constexpr bool TANH = decltype(tanh_tag)::value;
      launch_elementwise<T>(pre.numel(), H, {&pre, &out, bias ? &*bias : &pre},
                            [&](bool vec, int64_t packs, dim3 grid) {
        const auto stream = current_stream();
        const T* b = bias ? const_data_as<T>(*bias) : nullptr;
        if (vec)
          bias_gelu_forward_kernel<T, vec_width<T>(), TANH><<<grid, THREADS, 0, stream>>>(
              data_as<T>(out), const_data_as<T>(pre), b, packs, H);
        else
          bias_gelu_forward_kernel<T, 1, TANH><<<grid, THREADS, 0, stream>>>(
              data_as<T>(out), const_data_as<T>(pre), b, packs, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor bias_gelu_backward(const at::Tensor& dout, const at::Tensor& pre,
                              const std::optional<at::Tensor>& bias, bool approximate_tanh) {
  check_bias(pre, bias);
  check_same_device(pre, "pre", dout, "dout");
  check_contiguous(dout, "dout");
  TORCH_CHECK(dout.sizes() == pre.sizes() && dout.scalar_type() == pre.scalar_type(),
              "dout must match pre (", pre.scalar_type(), " ", pre.sizes(), "), got ",
              dout.scalar_type(), " ", dout.sizes());
  const c10::cuda::CUDAGuard guard(pre.device());
  at::Tensor dpre = at::empty_like(pre);
  if (pre.numel() == 0) return dpre;
  const int H = int(pre.size(-1));
  dispatch_float_bf16(pre.scalar_type(), "bias_gelu backward", [&](auto tag) {
    using T = decltype(tag);
    dispatch_gelu(approximate_tanh, [&](auto tanh_tag) {
      constexpr bool TANH = decltype(tanh_tag)::value;
      launch_elementwise<T>(pre.numel(), H, {&pre, &dout, &dpre, bias ? &*bias : &pre},
                            [&](bool vec, int64_t packs, dim3 grid) {
        const auto stream = current_stream();
        const T* b = bias ? const_data_as<T>(*bias) : nullptr;
        if (vec)
          bias_gelu_backward_kernel<T, vec_width<T>(), TANH><<<grid, THREADS, 0, stream>>>(
              data_as<T>(dpre), const_data_as<T>(dout), const_data_as<T>(pre), b, packs, H);
        else
          bias_gelu_backward_kernel<T, 1, TANH><<<grid, THREADS, 0, stream>>>(
              data_as<T>(dpre), const_data_as<T>(dout), const_data_as<T>(pre), b, packs, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dpre;
}

}  // namespace gptk
