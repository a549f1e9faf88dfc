// What the attention kernels share: how they address (B, H, T, D) operands, their argument
// blocks, and the two kernel families' entry points (tensor-core bf16 in attention_bf16.cu,
// CUDA-core fp32 in attention_fp32.cu). attention.cu validates inputs and picks one.
//
// Both families are FlashAttention-2 (see attention.cu for the math) and agree on:
// - lse is saved per query row, (B, H, T) fp32, in base 2: lse2 = log2(sum_j 2^(s_j)) where
//   s_j = q.k_j * scale * log2(e), so a probability is one exp2(s_j - lse2);
// - head dims are handled as D_PAD in {32, 64, 128} (the next one >= D); columns
//   D..D_PAD are zero-filled in shared memory, which leaves every dot product unchanged, and
//   are never stored;
// - rows (and keys) at or beyond T are zero-filled and never stored; a padded query row gets
//   lse = +inf in the backward so its probabilities are exactly 0.
#pragma once

#include "common.cuh"

namespace gptk {

// A (B, H, T, D) operand with a unit stride on D: element (b, h, t, d) is
// ptr[b * stride_b + h * stride_h + t * stride_t + d].
template <typename Elem>
struct HeadOperand {
  Elem* ptr;
  int64_t stride_b, stride_h, stride_t;

  __device__ __forceinline__ Elem* head(int b, int h) const {
    return ptr + b * stride_b + h * stride_h;
  }
};

template <typename Elem>
struct AttentionForwardArgs {
  HeadOperand<const Elem> q, k, v;
  HeadOperand<Elem> out;
  float* lse;        // (B, H, T), base 2
  int H, T, D;
  float scale_log2;  // softmax scale * log2(e)
};

template <typename Elem>
struct AttentionBackwardArgs {
  HeadOperand<const Elem> q, k, v, dout;
  HeadOperand<Elem> dq, dk, dv;
  const float* lse;    // (B, H, T), base 2, from the forward
  const float* delta;  // (B, H, T): rowsum(dout * out)
  int H, T, D;
  float scale;         // softmax scale (dq and dk are scale * (dS K) and scale * (dS^T Q))
  float scale_log2;
};

// The smallest supported padded head dim that holds D.
inline int padded_head_dim(int D) { return D <= 32 ? 32 : D <= 64 ? 64 : 128; }

void attention_forward_bf16(const AttentionForwardArgs<__nv_bfloat16>& args, int batch_heads,
                            cudaStream_t stream);
void attention_backward_bf16(const AttentionBackwardArgs<__nv_bfloat16>& args, int batch_heads,
                             cudaStream_t stream);
void attention_forward_fp32(const AttentionForwardArgs<float>& args, int batch_heads,
                            cudaStream_t stream);
void attention_backward_fp32(const AttentionBackwardArgs<float>& args, int batch_heads,
                             cudaStream_t stream);

}  // namespace gptk
