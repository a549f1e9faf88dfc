// Causal attention, FlashAttention-2 style: the T x T score matrix is never stored.
//
// Forward, for each block of queries, over the key blocks at or below the diagonal, with
// s = q k^T * scale (in base 2: scaled by log2(e) once, so the loop uses exp2):
//     m_new = max(m, rowmax(s));  p = exp2(s - m_new)
//     l = l * exp2(m - m_new) + rowsum(p);  o = o * exp2(m - m_new) + p v
// then o /= l and lse2 = m + log2(l) is saved for the backward.
//
// Backward, with P = exp2(S - lse2) recomputed tile by tile and dP = dO V^T:
//     dV = P^T dO,   dS = P * (dP - Delta),   dQ = scale * dS K,   dK = scale * dS^T Q
// Delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i) (one pass over dO and O, below) is the
// softmax Jacobian's correction. How P is recomputed depends on the kernel version (bf16;
// `version`, from kernels/cuda/attention.py's VERSIONS):
// - version 1 (and fp32): two kernels, one per key block accumulating dK and dV over the
//   query blocks at or after it, one per query block accumulating dQ over the key blocks at
//   or before it: 7 GEMMs, every output tile has one owner, deterministic;
// - version 2 (bf16): one pass per key block computes all three from one recomputation of
//   P (5 GEMMs), adding dQ's partial products atomically into a zeroed fp32 buffer; with
//   `deterministic` that pass leaves dQ to version 1's dQ kernel.
//
// Keys may outnumber queries (decoding with a KV cache: query i sits at position
// i + T_K - T), and there may be dropout: a mask from philox.cuh's definition (the one
// kernels/philox.py writes down), regenerated in the backward instead of stored; see
// attention.cuh for how every kernel applies both.
//
// The kernels read q, k, v (and dout) in place through their strides, e.g. the model's
// permuted views of its (B, T, 3, H, D) qkv projection; the output is allocated as
// (B, T, H, D) and returned as a (B, H, T, D) view, so the model's transpose back to
// (B, T, C) is free.
#include <algorithm>
#include <cmath>

#include "attention.cuh"
#include "kernels.h"

namespace gptk {
namespace {

constexpr int DELTA_WARPS = 8;

// delta[row] = sum_d dout[row, d] * out[row, d]; one warp per (b, h, t) row.
template <typename Elem>
__global__ void attention_delta_kernel(float* __restrict__ delta, HeadOperand<const Elem> out,
                                       HeadOperand<const Elem> dout, int64_t rows, int H, int T,
                                       int D) {
  const int64_t row = int64_t(blockIdx.x) * DELTA_WARPS + threadIdx.x / WARP_SIZE;
  if (row >= rows) return;
  const int lane = threadIdx.x % WARP_SIZE;
  const int bh = int(row / T), t = int(row % T);
  const Elem* o = out.head(bh / H, bh % H) + t * out.stride_t;
  const Elem* g = dout.head(bh / H, bh % H) + t * dout.stride_t;
  float sum = 0.f;
  for (int d = lane; d < D; d += WARP_SIZE) sum += to_float(o[d]) * to_float(g[d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_cuda(*t, name);
    check_float_or_bf16(*t, name);
    TORCH_CHECK(t->dim() == 4, name, " must be 4-D (batch, heads, seq, head_dim), got shape ",
                t->sizes());
  }
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && k.size(2) >= q.size(2),
              "the cuda attention kernel needs q of shape (B, H, T, D) and k, v of one shape "
              "(B, H, T_K, D) with T_K >= T, got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  const int64_t D = q.size(3);
  TORCH_CHECK(D > 0 && D <= 128 && D % 8 == 0,
              "the cuda attention kernel needs a head_dim that is a multiple of 8 and at most "
              "128, got ", D);
  // Grids are (batch * heads, sequence blocks): axis x allows 2^31 - 1 blocks, axis y
  // 65535, and the smallest block (the fp32 kernels') covers 8 rows.
  TORCH_CHECK(q.size(0) * q.size(1) <= INT32_MAX, "batch * heads must be below 2^31, got ",
              q.size(0) * q.size(1));
  TORCH_CHECK(k.size(2) <= int64_t(MAX_SEQ_LEN), "the cuda attention kernel supports sequences "
              "up to ", MAX_SEQ_LEN, ", got ", k.size(2));
}

// A call's dropout for the kernels: seed and offset as kernels/philox.py draws or is given
// them (the seed's 64 bits in an int64), and its threshold, round(p * 2^16) at most
// 2^16 - 1, as kernels/philox.py's threshold() computes it (both round half to even).
Dropout dropout_of(double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(offset >= 0 && offset <= int64_t(UINT32_MAX), "the dropout offset must be in "
              "[0, 2^32), got ", offset);
  if (p == 0) return {0, 0, 0, 0, 1.f, false};
  const uint64_t bits = uint64_t(seed);
  const double threshold = std::min(std::nearbyint(p * 65536.0), 65535.0);
  return {uint32_t(bits), uint32_t(bits >> 32), uint32_t(offset), uint32_t(threshold),
          float(1.0 / (1.0 - p)), true};
}

// The kernels move 16-byte chunks of rows: they need a unit stride on D and 16-byte aligned
// rows. A view that does not qualify is copied (a fresh allocation always does).
at::Tensor vector_friendly(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && is_aligned(t.data_ptr(), 16);
  for (int i = 0; i < 3; ++i) ok = ok && (t.stride(i) * t.element_size()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename Elem>
HeadOperand<Elem> operand(const at::Tensor& t) {
  return {reinterpret_cast<Elem*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

constexpr double LOG2E = 1.4426950408889634;

// The bf16 kernel versions (fp32 has one, which serves every version).
void check_version(int64_t version) {
  TORCH_CHECK(version == 1 || version == 2,
              "the cuda attention kernel has versions 1 and 2, got ", version);
}

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in, double scale, int64_t version,
                                          double dropout_p, int64_t seed, int64_t offset) {
  check_version(version);
  check_qkv(q_in, k_in, v_in);
  const Dropout dropout = dropout_of(dropout_p, seed, offset);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int B = int(q_in.size(0)), H = int(q_in.size(1)), T = int(q_in.size(2)),
            T_K = int(k_in.size(2)), D = int(q_in.size(3));
  at::Tensor out = at::empty({B, T, H, D}, q_in.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({B, H, T}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = vector_friendly(q_in), k = vector_friendly(k_in), v = vector_friendly(v_in);
  const auto stream = current_stream();
  dispatch_float_bf16(q.scalar_type(), "causal_attention", [&](auto tag) {
    using Elem = decltype(tag);
    const AttentionForwardArgs<Elem> args{operand<const Elem>(q), operand<const Elem>(k),
                                          operand<const Elem>(v),  operand<Elem>(out),
                                          data_as<float>(lse),     H, T, T_K, D,
                                          float(scale * LOG2E),    dropout};
    if constexpr (std::is_same_v<Elem, float>) attention_forward_fp32(args, B * H, stream);
    else if (version == 2 && attention_bf16_v2_runs(D, false, false))
      attention_forward_bf16_v2(args, B * H, stream);
    else attention_forward_bf16(args, B * H, stream);  // version 1, or a call version 2 does not take
  });
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                           const at::Tensor& k_in, const at::Tensor& v_in,
                                           const at::Tensor& out_in, const at::Tensor& lse,
                                           double scale, int64_t version, bool deterministic,
                                           double dropout_p, int64_t seed, int64_t offset) {
  check_version(version);
  check_qkv(q_in, k_in, v_in);
  const Dropout dropout = dropout_of(dropout_p, seed, offset);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    check_same_device(q_in, "q", *t, name);
    TORCH_CHECK(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type(), name,
                " must match q (", q_in.scalar_type(), " ", q_in.sizes(), "), got ",
                t->scalar_type(), " ", t->sizes());
  }
  const int B = int(q_in.size(0)), H = int(q_in.size(1)), T = int(q_in.size(2)),
            T_K = int(k_in.size(2)), D = int(q_in.size(3));
  check_same_device(q_in, "q", lse, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({B, H, T}),
              "lse must be the forward's contiguous float32 (B, H, T) tensor, got ",
              lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty_like(q_in, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k_in, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v_in, at::MemoryFormat::Contiguous);
  if (dq.numel() == 0) return {dq, dk, dv};
  const at::Tensor q = vector_friendly(q_in), k = vector_friendly(k_in), v = vector_friendly(v_in),
                   out = vector_friendly(out_in), dout = vector_friendly(dout_in);
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  const auto stream = current_stream();
  dispatch_float_bf16(q.scalar_type(), "causal_attention backward", [&](auto tag) {
    using Elem = decltype(tag);
    const int64_t rows = int64_t(B) * H * T;
    attention_delta_kernel<Elem><<<unsigned(ceil_div(rows, DELTA_WARPS)), DELTA_WARPS * WARP_SIZE,
                                 0, stream>>>(data_as<float>(delta), operand<const Elem>(out),
                                              operand<const Elem>(dout), rows, H, T, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const AttentionBackwardArgs<Elem> args{
        operand<const Elem>(q), operand<const Elem>(k), operand<const Elem>(v),
        operand<const Elem>(dout), operand<Elem>(dq), operand<Elem>(dk), operand<Elem>(dv),
        const_data_as<float>(lse), const_data_as<float>(delta), H, T, T_K, D, float(scale),
        float(scale * LOG2E), dropout};
    if constexpr (std::is_same_v<Elem, float>) {
      attention_backward_fp32(args, B * H, stream);
    } else if (version == 2 && attention_bf16_v2_runs(D, true, !deterministic)) {
      at::Tensor dq_accum;  // fp32 (B, H, T, D), zeroed: the atomic dQ's sums
      if (!deterministic) dq_accum = at::zeros({B, H, T, D}, q.options().dtype(at::kFloat));
      attention_backward_bf16_v2(args, B * H, deterministic ? nullptr : data_as<float>(dq_accum),
                                 stream);
    } else {
      attention_backward_bf16(args, B * H, stream);
    }
  });
  return {dq, dk, dv};
}

}  // namespace gptk
