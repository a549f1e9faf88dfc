// LayerNorm over the last dim, and its residual-fused variant, forward and backward.
//
// Forward, per row x of C values (mean and rstd are saved in fp32 for the backward):
//     mean = sum(x) / C,  var = sum((x - mean)^2) / C,  rstd = 1 / sqrt(var + eps)
//     y = (x - mean) * rstd * w + b
// The residual-fused variant first forms s = x + residual (rounded to the activation dtype,
// as a separate add would store it), writes s, and normalizes s.
//
// Backward, with xhat = (x - mean) * rstd and g = dy * w:
//     dx = rstd * (g - mean(g) - xhat * mean(g * xhat))        (+ ds for the fused variant)
//     dw = sum over rows of dy * xhat,   db = sum over rows of dy
// The dx formula is the LayerNorm Jacobian applied to g: subtracting mean(g) projects out
// the direction the mean removes, subtracting xhat * mean(g * xhat) the one the variance
// normalization removes.
//
// Layout and tricks:
// - one warp per row; lane l handles the 16-byte packs l, l + 32, ... so each load
//   instruction of the warp reads 512 contiguous bytes;
// - the row is read three times (sum, centered sum of squares, normalize): the two-pass
//   variance is exact where E[x^2] - mean^2 cancels catastrophically, and the re-reads of a
//   row the warp has just read are served by L1/L2, not DRAM;
// - dw/db are deterministic: each warp accumulates its rows' dy * xhat and dy into its own
//   fp32 slice of shared memory (no atomics), the block folds its warps' slices in warp
//   order into one partial row per block, and a second kernel sums the partial rows in
//   block order. The row -> warp -> block assignment depends only on the shapes and the GPU.
#include "common.cuh"
#include "kernels.h"

namespace gptk {
namespace {

constexpr int FORWARD_WARPS = 8;      // rows per forward block
constexpr int BACKWARD_WARPS = 4;     // warps per backward block (each with its own dw/db slice)
constexpr int MIN_ROWS_PER_WARP = 4;  // fewer, fuller backward blocks: fewer partial rows

template <typename T, typename W, int VEC, bool RESIDUAL>
__global__ void layer_norm_forward_kernel(T* __restrict__ y, T* __restrict__ sum_out,
                                          float* __restrict__ mean_out,
                                          float* __restrict__ rstd_out,
                                          const T* __restrict__ x, const T* __restrict__ residual,
                                          const W* __restrict__ weight,
                                          const W* __restrict__ bias, int64_t rows, int C,
                                          float eps) {
  const int lane = threadIdx.x % WARP_SIZE;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
  if (row >= rows) return;  // the whole warp leaves together
  const int packs = C / VEC;
  const int64_t offset = row * C;

  // Pass 1: sum (forming and storing s = x + residual on the way in the fused variant).
  float sum = 0.f;
  for (int p = lane; p < packs; p += WARP_SIZE) {
    Pack<T, VEC> in = load_pack<VEC>(x + offset + p * VEC);
    if constexpr (RESIDUAL) {
      const Pack<T, VEC> r = load_pack<VEC>(residual + offset + p * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) in.v[j] = from_float<T>(to_float(in.v[j]) + to_float(r.v[j]));
      store_pack(sum_out + offset + p * VEC, in);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += to_float(in.v[j]);
  }
  const float mean = warp_sum(sum) / C;

  // The normalized input: s, which this very lane just wrote, or x.
  const T* src = RESIDUAL ? sum_out + offset : x + offset;

  // Pass 2: centered sum of squares.
  float sum_sq = 0.f;
  for (int p = lane; p < packs; p += WARP_SIZE) {
    const Pack<T, VEC> in = load_pack<VEC>(src + p * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = to_float(in.v[j]) - mean;
      sum_sq += d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(sum_sq) / C + eps);

  // Pass 3: normalize, scale, shift.
  for (int p = lane; p < packs; p += WARP_SIZE) {
    const Pack<T, VEC> in = load_pack<VEC>(src + p * VEC);
    const Pack<W, VEC> w = load_pack<VEC>(weight + p * VEC);
    Pack<W, VEC> b;
    if (bias != nullptr) b = load_pack<VEC>(bias + p * VEC);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float shift = bias != nullptr ? to_float(b.v[j]) : 0.f;
      out.v[j] = from_float<T>((to_float(in.v[j]) - mean) * rstd * to_float(w.v[j]) + shift);
    }
    store_pack(y + offset + p * VEC, out);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx for the rows of this block, and the block's partial dw/db row:
// partial[blockIdx.x] = {dw[0..C), db[0..C)}. Block b owns the contiguous rows
// [b * rows_per_block, (b + 1) * rows_per_block); its warp w takes rows w, w + warps, ...
// Shared memory: per warp 2*C floats, element j of pack p at j * packs + p, so the 32 lanes
// of a warp touch 32 consecutive floats (no bank conflicts) whatever VEC is.
template <typename T, typename W, int VEC>
__global__ void layer_norm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                                           const T* __restrict__ dy, const T* __restrict__ ds,
                                           const T* __restrict__ x, const W* __restrict__ weight,
                                           const float* __restrict__ mean,
                                           const float* __restrict__ rstd, int64_t rows, int C,
                                           int64_t rows_per_block) {
  extern __shared__ float slices[];
  const int warps = blockDim.x / WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int lane = threadIdx.x % WARP_SIZE;
  const int packs = C / VEC;
  float* dw_acc = slices + warp * 2 * C;
  float* db_acc = dw_acc + C;
  for (int i = lane; i < 2 * C; i += WARP_SIZE) dw_acc[i] = 0.f;
  __syncwarp();

  const int64_t first = int64_t(blockIdx.x) * rows_per_block;
  const int64_t last = min(first + rows_per_block, rows);
  for (int64_t row = first + warp; row < last; row += warps) {
    const int64_t offset = row * C;
    const float mu = mean[row];
    const float r = rstd[row];

    // Pass 1: the two row means of the dx formula.
    float sum_g = 0.f, sum_g_xhat = 0.f;
    for (int p = lane; p < packs; p += WARP_SIZE) {
      const Pack<T, VEC> dyv = load_pack<VEC>(dy + offset + p * VEC);
      const Pack<T, VEC> xv = load_pack<VEC>(x + offset + p * VEC);
      const Pack<W, VEC> wv = load_pack<VEC>(weight + p * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_float(dyv.v[j]) * to_float(wv.v[j]);
        sum_g += g;
        sum_g_xhat += g * (to_float(xv.v[j]) - mu) * r;
      }
    }
    const float mean_g = warp_sum(sum_g) / C;
    const float mean_g_xhat = warp_sum(sum_g_xhat) / C;

    // Pass 2: dx, and this row's share of dw and db.
    for (int p = lane; p < packs; p += WARP_SIZE) {
      const Pack<T, VEC> dyv = load_pack<VEC>(dy + offset + p * VEC);
      const Pack<T, VEC> xv = load_pack<VEC>(x + offset + p * VEC);
      const Pack<W, VEC> wv = load_pack<VEC>(weight + p * VEC);
      Pack<T, VEC> dsv;
      if (ds != nullptr) dsv = load_pack<VEC>(ds + offset + p * VEC);
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = to_float(dyv.v[j]);
        const float xhat = (to_float(xv.v[j]) - mu) * r;
        float grad = r * (d * to_float(wv.v[j]) - mean_g - xhat * mean_g_xhat);
        if (ds != nullptr) grad += to_float(dsv.v[j]);
        out.v[j] = from_float<T>(grad);
        dw_acc[j * packs + p] += d * xhat;
        db_acc[j * packs + p] += d;
      }
      store_pack(dx + offset + p * VEC, out);
    }
  }
  __syncthreads();

  // Fold the warps' slices, in warp order, into this block's partial row.
  float* out = partial + int64_t(blockIdx.x) * 2 * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int idx = (c % VEC) * packs + c / VEC;
    float dw = 0.f, db = 0.f;
    for (int w = 0; w < warps; ++w) {
      dw += slices[w * 2 * C + idx];
      db += slices[w * 2 * C + C + idx];
    }
    out[c] = dw;
    out[C + c] = db;
  }
}

// dw[c] = sum over blocks of partial[block][c] (and db likewise), in block order.
// A 32 x 16 thread block owns 32 columns: thread (tx, ty) sums the partial rows ty, ty + 16,
// ..., then the 16 sums of each column are added in ty order through shared memory.
constexpr int PARAM_COLS = 32, PARAM_ROWS = 16;

template <typename W>
__global__ void layer_norm_param_grad_kernel(W* __restrict__ dweight, W* __restrict__ dbias,
                                             const float* __restrict__ partial, int blocks,
                                             int C) {
  __shared__ float dw_sums[PARAM_ROWS][PARAM_COLS];
  __shared__ float db_sums[PARAM_ROWS][PARAM_COLS];
  const int c = blockIdx.x * PARAM_COLS + threadIdx.x;
  float dw = 0.f, db = 0.f;
  if (c < C) {
    for (int b = threadIdx.y; b < blocks; b += PARAM_ROWS) {
      dw += partial[int64_t(b) * 2 * C + c];
      db += partial[int64_t(b) * 2 * C + C + c];
    }
  }
  dw_sums[threadIdx.y][threadIdx.x] = dw;
  db_sums[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int r = 1; r < PARAM_ROWS; ++r) {
      dw += dw_sums[r][threadIdx.x];
      db += db_sums[r][threadIdx.x];
    }
    dweight[c] = from_float<W>(dw);
    dbias[c] = from_float<W>(db);
  }
}

// ----------------------------------------------------------------------------- host

void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_cuda(x, "x");
  check_float_or_bf16(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim, got shape ",
              x.sizes());
  check_cuda(weight, "weight");
  check_same_device(x, "x", weight, "weight");
  check_float_or_bf16(weight, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape (",
              x.size(-1), ",), got ", weight.sizes());
  if (bias) {
    check_same_device(x, "x", *bias, "bias");
    check_contiguous(*bias, "bias");
    TORCH_CHECK(bias->sizes() == weight.sizes(), "bias must have shape (", x.size(-1),
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias must have weight's dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
  }
  TORCH_CHECK(x.size(-1) <= INT32_MAX, "x's last dim is too large: ", x.size(-1));
}

// Runs f(T{}, W{}) for the activation dtype T and the parameter dtype W, which is T or fp32
// (the model may keep fp32 parameters while its activations are bf16).
template <typename F>
void dispatch_layer_norm(const at::Tensor& x, const at::Tensor& weight, F&& f) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "weight must be float32 or x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  dispatch_float_bf16(x.scalar_type(), "layer_norm x", [&](auto t) {
    if (weight.scalar_type() == at::kFloat) f(t, float{});
    else f(t, t);
  });
}

// 128-bit packs need C to be a multiple of the pack and every row start 16-byte aligned;
// parameters may be a wider dtype than the activations, so each pointer is checked against
// its own pack size.
template <typename T, typename W>
bool can_vectorize(int64_t C, std::initializer_list<const at::Tensor*> activations,
                   std::initializer_list<const at::Tensor*> params) {
  constexpr int VEC = vec_width<T>();
  if (C % VEC != 0) return false;
  for (const at::Tensor* t : activations)
    if (!is_aligned(t->data_ptr(), sizeof(T) * VEC)) return false;
  for (const at::Tensor* t : params)
    if (!is_aligned(t->data_ptr(), sizeof(W) * VEC)) return false;
  return true;
}

std::vector<at::Tensor> layer_norm_forward_impl(const at::Tensor& x,
                                                const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                double eps) {
  check_layer_norm_inputs(x, weight, bias);
  if (residual) {
    check_same_device(x, "x", *residual, "residual");
    check_contiguous(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype ",
                x.scalar_type(), ", got ", residual->scalar_type());
  }
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = int(x.size(-1));
  const int64_t rows = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  at::Tensor sum = residual ? at::empty_like(x) : at::Tensor();
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, sum, mean, rstd};

  dispatch_layer_norm(x, weight, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    const at::Tensor* bias_ptr = bias ? &*bias : &weight;
    const at::Tensor* residual_ptr = residual ? &*residual : &x;
    const bool vec = can_vectorize<T, W>(C, {&x, residual_ptr, &y, residual ? &sum : &x},
                                         {&weight, bias_ptr});
    const auto launch = [&](auto kernel) {
      const dim3 grid(unsigned(ceil_div(rows, FORWARD_WARPS)));
      kernel<<<grid, FORWARD_WARPS * WARP_SIZE, 0, current_stream()>>>(
          data_as<T>(y), residual ? data_as<T>(sum) : nullptr, data_as<float>(mean),
          data_as<float>(rstd), const_data_as<T>(x),
          residual ? const_data_as<T>(*residual) : nullptr, const_data_as<W>(weight),
          bias ? const_data_as<W>(*bias) : nullptr, rows, C, float(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int VEC = vec_width<T>();
    if (residual) {
      vec ? launch(layer_norm_forward_kernel<T, W, VEC, true>)
          : launch(layer_norm_forward_kernel<T, W, 1, true>);
    } else {
      vec ? launch(layer_norm_forward_kernel<T, W, VEC, false>)
          : launch(layer_norm_forward_kernel<T, W, 1, false>);
    }
  });
  return {y, sum, mean, rstd};
}

}  // namespace

std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, double eps) {
  auto out = layer_norm_forward_impl(x, std::nullopt, weight, bias, eps);
  return {out[0], out[2], out[3]};
}

std::vector<at::Tensor> add_layer_norm_forward(const at::Tensor& x, const at::Tensor& residual,
                                               const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               double eps) {
  auto out = layer_norm_forward_impl(x, residual, weight, bias, eps);
  return {out[1], out[0], out[2], out[3]};
}

std::vector<at::Tensor> layer_norm_backward(const at::Tensor& dy,
                                            const std::optional<at::Tensor>& ds,
                                            const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& mean, const at::Tensor& rstd) {
  check_layer_norm_inputs(x, weight, std::nullopt);
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, std::pair{ds ? &*ds : &dy, "ds"}}) {
    check_same_device(x, "x", *t, name);
    check_contiguous(*t, name);
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), name,
                " must match x (", x.scalar_type(), " ", x.sizes(), "), got ", t->scalar_type(),
                " ", t->sizes());
  }
  const int C = int(x.size(-1));
  const int64_t rows = x.numel() / C;
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    check_same_device(x, "x", *t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == rows && t->is_contiguous(),
                name, " must be a contiguous float32 tensor of ", rows, " rows");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = at::empty_like(weight);
  if (rows == 0) return {dx, dweight.zero_(), dbias.zero_()};

  // Each warp needs 2*C floats of shared memory; use fewer warps per block for wide rows.
  const int max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  int warps = BACKWARD_WARPS;
  while (warps > 1 && size_t(warps) * 2 * C * sizeof(float) > size_t(max_smem)) warps /= 2;
  const size_t smem = size_t(warps) * 2 * C * sizeof(float);
  TORCH_CHECK(smem <= size_t(max_smem), "layer_norm backward: C = ", C,
              " is too wide for the cuda kernel (its dw/db slice of ", smem,
              " bytes exceeds the ", max_smem, " bytes of shared memory per block)");

  dispatch_layer_norm(x, weight, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    const bool vec = can_vectorize<T, W>(C, {&x, &dy, &dx, ds ? &*ds : &x}, {&weight});
    const auto launch = [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
      int blocks_per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks_per_sm, kernel, warps * WARP_SIZE, smem));
      const int64_t max_blocks = int64_t(std::max(blocks_per_sm, 1)) * num_sms();
      const int64_t blocks =
          std::max<int64_t>(1, std::min(max_blocks, ceil_div(rows, warps * MIN_ROWS_PER_WARP)));
      const int64_t rows_per_block = ceil_div(rows, blocks);
      at::Tensor partial = at::empty({blocks, 2, C}, x.options().dtype(at::kFloat));
      const auto stream = current_stream();
      kernel<<<unsigned(blocks), warps * WARP_SIZE, smem, stream>>>(
          data_as<T>(dx), data_as<float>(partial), const_data_as<T>(dy),
          ds ? const_data_as<T>(*ds) : nullptr, const_data_as<T>(x), const_data_as<W>(weight),
          const_data_as<float>(mean), const_data_as<float>(rstd), rows, C, rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 param_grid(unsigned(ceil_div(C, PARAM_COLS)));
      layer_norm_param_grad_kernel<W><<<param_grid, dim3(PARAM_COLS, PARAM_ROWS), 0, stream>>>(
          data_as<W>(dweight), data_as<W>(dbias),
          const_data_as<float>(partial), int(blocks), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int VEC = vec_width<T>();
    vec ? launch(layer_norm_backward_kernel<T, W, VEC>) : launch(layer_norm_backward_kernel<T, W, 1>);
  });
  return {dx, dweight, dbias};
}

}  // namespace gptk
