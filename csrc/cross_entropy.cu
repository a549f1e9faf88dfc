// Cross-entropy of each row of logits (N, V) against a target class, with its gradient.
//
//     loss = lse - x[t],   lse = log(sum_i exp(x[i]))
//     d loss / d x[i] = softmax(x)[i] - [i == t] = exp(x[i] - lse) - [i == t]
// Rows whose target is ignore_index have loss 0 and gradient 0.
//
// The loss variants (kernels/losses.py; all off at 0): with softcap > 0 every logit is
// replaced by z = softcap * tanh(x / softcap) where it is read, in both passes; label
// smoothing e adds e (lse - mean(z)) and scales the target's term by 1 - e (the forward
// then also sums z over the row); the z-loss c adds c lse^2. The gradient becomes
//     (exp(z[i] - lse) (1 + 2 c lse) - (1 - e) [i == t] - e / V) * (1 - (z[i] / softcap)^2).
//
// One block per row. The forward reads the row once: each thread keeps an online
// (max m, sum s = sum exp(x - m)) pair, rescaling s whenever a larger x arrives, so the
// maximum and the sum come out of the same pass (no separate max pass); the per-thread pairs
// are merged across the block, m + log(s) is the lse. The probabilities are never stored:
// the gradient pass recomputes exp(x[i] - lse) from the logits and writes the gradient, in
// the fused variant straight over the logits (the caller's chunk buffer), while the row is
// still in L2.
//
// Rows of V = 50257 bf16 logits start at any 2-byte boundary, so each row is walked as a
// scalar head up to the first 16-byte boundary, 16-byte packs, and a scalar tail.
// A target outside [0, V) that is not ignore_index gives a NaN loss and NaN gradients
// (checking it on the host would cost a device sync).
#include <cfloat>

#include "common.cuh"
#include "kernels.h"

namespace gptk {
namespace {

constexpr int THREADS = 512;

// The loss variant of a call, as the kernels take it (see the top of the file).
struct LossVariant {
  float smoothing, z_loss, softcap;

  __device__ __forceinline__ float capped(float x) const {
    return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
  }
  // d z / d x at z = capped(x).
  __device__ __forceinline__ float cap_slope(float z) const {
    return softcap > 0.f ? 1.f - (z / softcap) * (z / softcap) : 1.f;
  }
};

// Adds x to the running (m, s). m starts at -FLT_MAX, not -inf, so that a -inf logit
// contributes exp(-inf - m) = 0 instead of exp(-inf + inf) = NaN; a NaN logit makes s NaN.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// log(sum exp) of the whole row from every thread's (m, s), returned to all threads.
__device__ float block_logsumexp(float m, float s) {
  __shared__ float warp_m[THREADS / WARP_SIZE], warp_s[THREADS / WARP_SIZE];
  __shared__ float result;
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1)
    online_merge(m, s, __shfl_xor_sync(FULL_MASK, m, offset), __shfl_xor_sync(FULL_MASK, s, offset));
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / WARP_SIZE;
    m = lane < warps ? warp_m[lane] : -FLT_MAX;
    s = lane < warps ? warp_s[lane] : 0.f;
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1)
      online_merge(m, s, __shfl_xor_sync(FULL_MASK, m, offset), __shfl_xor_sync(FULL_MASK, s, offset));
    if (lane == 0) result = m + logf(s);
  }
  __syncthreads();
  return result;
}

// The sum of every thread's x over the block, returned to all threads.
__device__ float block_sum(float x) {
  __shared__ float warp_x[THREADS / WARP_SIZE];
  __shared__ float result;
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  x = warp_sum(x);
  if (lane == 0) warp_x[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < int(blockDim.x / WARP_SIZE) ? warp_x[lane] : 0.f;
    x = warp_sum(x);
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}

// Elements of a row before its first 16-byte boundary (all of them if the row is shorter).
template <int VEC, typename T>
__device__ __forceinline__ int unaligned_head(const T* row, int n) {
  if constexpr (VEC == 1) return 0;
  const int bytes = int((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16);
  return min(n, bytes / int(sizeof(T)));
}

// f(x[i]) for every element of row[0, n), spread over the block.
template <int VEC, typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int n, F&& f) {
  const int head = unaligned_head<VEC>(row, n);
  const int packs = (n - head) / VEC;
  for (int i = threadIdx.x; i < head; i += blockDim.x) f(to_float(row[i]));
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, VEC> v = load_pack<VEC>(row + head + p * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f(to_float(v.v[j]));
  }
  for (int i = head + packs * VEC + threadIdx.x; i < n; i += blockDim.x) f(to_float(row[i]));
}

// out[i] = f(i, in[i]) for the row; out has the same 16-byte phase as in (or is in).
template <int VEC, typename T, typename F>
__device__ __forceinline__ void transform_row(const T* in, T* out, int n, F&& f) {
  const int head = unaligned_head<VEC>(in, n);
  const int packs = (n - head) / VEC;
  for (int i = threadIdx.x; i < head; i += blockDim.x) out[i] = from_float<T>(f(i, to_float(in[i])));
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const int start = head + p * VEC;
    const Pack<T, VEC> v = load_pack<VEC>(in + start);
    Pack<T, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) g.v[j] = from_float<T>(f(start + j, to_float(v.v[j])));
    store_pack(out + start, g);
  }
  for (int i = head + packs * VEC + threadIdx.x; i < n; i += blockDim.x)
    out[i] = from_float<T>(f(i, to_float(in[i])));
}

// grad = scale * d loss / d logits (see the top of the file), or zeros for an ignored row.
template <int VEC, typename T>
__device__ __forceinline__ void write_row_gradient(T* grad, const T* logits, int V,
                                                   int64_t target, bool ignored, float lse,
                                                   float scale, const LossVariant& variant) {
  if (ignored) {
    transform_row<VEC>(logits, grad, V, [](int, float) { return 0.f; });
  } else {
    const float softmax_scale = 1.f + 2.f * variant.z_loss * lse;
    const float target_weight = 1.f - variant.smoothing, uniform = variant.smoothing / float(V);
    transform_row<VEC>(logits, grad, V, [&](int i, float x) {
      const float z = variant.capped(x);
      const float g = expf(z - lse) * softmax_scale - (i == target ? target_weight : 0.f) - uniform;
      return g * variant.cap_slope(z) * scale;
    });
  }
}

// losses[row] (and lse[row]); with WRITE_GRAD also
// grad = row_weight[row * row_weight_stride] * d loss / d logits, where grad may be logits
// itself (a stride of 0 weighs every row alike).
template <typename T, typename Index, int VEC, bool WRITE_GRAD>
__global__ void cross_entropy_forward_kernel(float* __restrict__ losses, float* __restrict__ lse_out,
                                             T* grad, const T* logits,
                                             const Index* __restrict__ targets,
                                             const float* __restrict__ row_weight,
                                             int64_t row_weight_stride, int V,
                                             int64_t ignore_index, const LossVariant variant) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  const int64_t target = int64_t(targets[row]);
  const bool ignored = target == ignore_index;
  const bool in_range = 0 <= target && target < V;
  if (ignored) {
    if (threadIdx.x == 0) {
      losses[row] = 0.f;
      if (lse_out != nullptr) lse_out[row] = 0.f;
    }
    if constexpr (WRITE_GRAD)
      write_row_gradient<VEC>(grad + row * V, x, V, target, true, 0.f, 0.f, variant);
    return;
  }
  // Read the target's logit before any thread can overwrite it with its gradient (the block
  // reduction below separates this read from the gradient pass).
  const float target_z = threadIdx.x == 0 && in_range ? variant.capped(to_float(x[target])) : NAN;

  float m = -FLT_MAX, s = 0.f, z_sum = 0.f;
  const bool smoothing = variant.smoothing != 0.f;  // (then -inf logits make z_sum -inf)
  for_each_in_row<VEC>(x, V, [&](float v) {
    const float z = variant.capped(v);
    online_add(m, s, z);
    if (smoothing) z_sum += z;
  });
  const float lse = block_logsumexp(m, s);
  if (smoothing) z_sum = block_sum(z_sum);
  if (threadIdx.x == 0) {
    float loss = lse - target_z;
    if (smoothing) loss = (1.f - variant.smoothing) * loss + variant.smoothing * (lse - z_sum / float(V));
    losses[row] = loss + variant.z_loss * lse * lse;
    if (lse_out != nullptr) lse_out[row] = lse;
  }
  if constexpr (WRITE_GRAD) {
    const float scale = in_range ? row_weight[row * row_weight_stride] : NAN;
    write_row_gradient<VEC>(grad + row * V, x, V, target, false, lse, scale, variant);
  }
}

template <typename T, typename Index, int VEC>
__global__ void cross_entropy_backward_kernel(T* __restrict__ grad, const T* __restrict__ logits,
                                              const Index* __restrict__ targets,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ dlosses, int V,
                                              int64_t ignore_index, const LossVariant variant) {
  const int64_t row = blockIdx.x;
  const int64_t target = int64_t(targets[row]);
  const bool ignored = target == ignore_index;
  const float scale = 0 <= target && target < V ? dlosses[row] : NAN;
  write_row_gradient<VEC>(grad + row * V, logits + row * V, V, target, ignored, lse[row], scale,
                          variant);
}

void check_logits_targets(const at::Tensor& logits, const at::Tensor& targets) {
  check_cuda(logits, "logits");
  check_float_or_bf16(logits, "logits");
  check_contiguous(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.size(1) <= INT32_MAX,
              "logits must be (rows, vocab) with 0 < vocab < 2^31, got shape ", logits.sizes());
  TORCH_CHECK(logits.size(0) <= INT32_MAX, "too many rows: ", logits.size(0));
  check_same_device(logits, "logits", targets, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "targets must be int64 or int32, got ", targets.scalar_type());
  check_contiguous(targets, "targets");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "targets must have shape (",
              logits.size(0), ",), got ", targets.sizes());
}

template <typename F>
void dispatch_logits_targets(const at::Tensor& logits, const at::Tensor& targets, F&& f) {
  dispatch_float_bf16(logits.scalar_type(), "cross_entropy", [&](auto t) {
    if (targets.scalar_type() == at::kLong) f(t, int64_t{});
    else f(t, int32_t{});
  });
}

// The gradient is written through 16-byte packs placed by the logits' alignment: the
// destination must sit at the same offset from a 16-byte boundary.
bool same_phase(const at::Tensor& a, const at::Tensor& b) {
  return (reinterpret_cast<uintptr_t>(a.data_ptr()) - reinterpret_cast<uintptr_t>(b.data_ptr())) % 16 == 0;
}

LossVariant loss_variant(double smoothing, double z_loss, double softcap) {
  TORCH_CHECK(smoothing >= 0 && smoothing <= 1, "label_smoothing must be in [0, 1], got ", smoothing);
  TORCH_CHECK(z_loss >= 0, "z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: none), got ", softcap);
  return {float(smoothing), float(z_loss), float(softcap)};
}

}  // namespace

std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                              int64_t ignore_index, double smoothing,
                                              double z_loss, double softcap) {
  const LossVariant variant = loss_variant(smoothing, z_loss, softcap);
  check_logits_targets(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  const int V = int(logits.size(1));
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {losses, lse};
  dispatch_logits_targets(logits, targets, [&](auto t_tag, auto i_tag) {
    using T = decltype(t_tag);
    using Index = decltype(i_tag);
    cross_entropy_forward_kernel<T, Index, vec_width<T>(), false>
        <<<unsigned(rows), THREADS, 0, current_stream()>>>(
            data_as<float>(losses), data_as<float>(lse), nullptr, const_data_as<T>(logits),
            const_data_as<Index>(targets), nullptr, 0, V, ignore_index, variant);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& dlosses, const at::Tensor& logits,
                                  const at::Tensor& targets, const at::Tensor& lse,
                                  int64_t ignore_index, double smoothing, double z_loss,
                                  double softcap) {
  const LossVariant variant = loss_variant(smoothing, z_loss, softcap);
  check_logits_targets(logits, targets);
  const int64_t rows = logits.size(0);
  for (const auto& [t, name] : {std::pair{&dlosses, "dlosses"}, std::pair{&lse, "lse"}}) {
    check_same_device(logits, "logits", *t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows &&
                    t->is_contiguous(),
                name, " must be a contiguous float32 tensor of shape (", rows, ",), got ",
                t->scalar_type(), " ", t->sizes());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  if (rows == 0) return grad;
  const int V = int(logits.size(1));
  dispatch_logits_targets(logits, targets, [&](auto t_tag, auto i_tag) {
    using T = decltype(t_tag);
    using Index = decltype(i_tag);
    const auto launch = [&](auto kernel) {
      kernel<<<unsigned(rows), THREADS, 0, current_stream()>>>(
          data_as<T>(grad), const_data_as<T>(logits), const_data_as<Index>(targets),
          const_data_as<float>(lse), const_data_as<float>(dlosses), V, ignore_index, variant);
    };
    same_phase(grad, logits) ? launch(cross_entropy_backward_kernel<T, Index, vec_width<T>()>)
                             : launch(cross_entropy_backward_kernel<T, Index, 1>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

std::vector<at::Tensor> cross_entropy_forward_backward_(at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        const at::Tensor& row_weight,
                                                        int64_t ignore_index, double smoothing,
                                                        double z_loss, double softcap) {
  const LossVariant variant = loss_variant(smoothing, z_loss, softcap);
  check_logits_targets(logits, targets);
  check_same_device(logits, "logits", row_weight, "row_weight");
  TORCH_CHECK(row_weight.scalar_type() == at::kFloat && row_weight.dim() == 1 &&
                  row_weight.size(0) == logits.size(0),
              "row_weight must be a float32 tensor of shape (", logits.size(0), ",), got ",
              row_weight.scalar_type(), " ", row_weight.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {losses, lse};
  const int V = int(logits.size(1));
  dispatch_logits_targets(logits, targets, [&](auto t_tag, auto i_tag) {
    using T = decltype(t_tag);
    using Index = decltype(i_tag);
    cross_entropy_forward_kernel<T, Index, vec_width<T>(), true>
        <<<unsigned(rows), THREADS, 0, current_stream()>>>(
            data_as<float>(losses), data_as<float>(lse), data_as<T>(logits),
            const_data_as<T>(logits), const_data_as<Index>(targets),
            const_data_as<float>(row_weight), row_weight.stride(0), V, ignore_index, variant);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, lse};
}

}  // namespace gptk
