// What the attention kernels share: how they address (B, H, T, D) operands, their argument
// blocks, the bf16 tensor-core helpers both bf16 versions use, and the kernel families'
// entry points (tensor-core bf16: version 1 in attention_bf16.cu, version 2 in
// attention_bf16_v2.cu; CUDA-core fp32 in attention_fp32.cu). attention.cu validates inputs
// and picks one.
//
// Both families are FlashAttention-2 (see attention.cu for the math) and agree on:
// - lse is saved per query row, (B, H, T) fp32, in base 2: lse2 = log2(sum_j 2^(s_j)) where
//   s_j = q.k_j * scale * log2(e), so a probability is one exp2(s_j - lse2);
// - head dims are handled as D_PAD in {32, 64, 128} (the next one >= D); columns
//   D..D_PAD are zero-filled in shared memory, which leaves every dot product unchanged, and
//   are never stored;
// - rows (and keys) at or beyond T are zero-filled and never stored; a padded query row gets
//   lse = +inf in the backward so its probabilities are exactly 0;
// - there are T queries and T_K >= T keys (decoding with a KV cache): query i sits at
//   position i + T_K - T, so it sees keys j <= i + kv_offset() (the causal mask aligned to
//   the bottom-right); T_K == T is ordinary causal attention;
// - with dropout (philox.cuh), the softmax statistics see every probability, the products
//   only the kept ones, and the 1 / (1 - p) scale is applied where the result is stored
//   (O, dV) or where dP meets Delta (dS = P (Z dP - Delta)).
#pragma once

#include "common.cuh"
#include "philox.cuh"

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
  int H, T, T_K, D;  // T queries, T_K keys
  float scale_log2;  // softmax scale * log2(e)
  Dropout dropout;

  __device__ __forceinline__ int kv_offset() const { return T_K - T; }
};

template <typename Elem>
struct AttentionBackwardArgs {
  HeadOperand<const Elem> q, k, v, dout;
  HeadOperand<Elem> dq, dk, dv;
  const float* lse;    // (B, H, T), base 2, from the forward
  const float* delta;  // (B, H, T): rowsum(dout * out)
  int H, T, T_K, D;
  float scale;         // softmax scale (dq and dk are scale * (dS K) and scale * (dS^T Q))
  float scale_log2;
  Dropout dropout;

  __device__ __forceinline__ int kv_offset() const { return T_K - T; }
};

// Longest supported sequence: blocks of the sequence go on grid axis y (at most 65535
// blocks) and the smallest block (the fp32 kernels') covers 8 rows.
constexpr int64_t MAX_SEQ_LEN = 65535LL * 8;

// The smallest supported padded head dim that holds D.
inline int padded_head_dim(int D) { return D <= 32 ? 32 : D <= 64 ? 64 : 128; }

// ----------------------------------------------------------------------------- bf16 mma

// mma.sync.m16n8k16 with bf16 inputs and fp32 accumulators. The PTX ISA fixes which lane
// holds which element of a fragment; with g = lane / 4 and c = lane % 4 (lane c of group g):
//   A (16x16, m x k) regs {a0,a1,a2,a3} = bf16 pairs at (m g, k 2c..2c+1), (m g+8, k 2c..),
//                                          (m g, k 2c+8..), (m g+8, k 2c+8..)
//   B (16x8, k x n)  regs {b0,b1}       = bf16 pairs at (k 2c..2c+1, n g), (k 2c+8.., n g)
//   C (16x8, fp32)   regs {c0,c1,c2,c3} = (m g, n 2c), (m g, n 2c+1), (m g+8, n 2c), (m g+8, n 2c+1)
// In a pair, the element with the lower k (or n) index is in the low 16 bits.
// Consequences both bf16 versions use:
// - a row of a C tile lives in the 4 lanes of one group: a row max / sum is two xor-shuffles;
// - the C fragments of n-tiles 2k and 2k+1 (columns 16k..16k+15), rounded to bf16 pairwise,
//   ARE the A fragment of the 16 x 16 block k of the same rows (c_to_a): a score tile goes
//   from accumulator registers straight into the next product as its left operand.

// D += A * B for one m16n8k16 tile.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The A fragment (16 rows x 16 k) made of the C fragments of n-tiles 2k (lo) and 2k+1 (hi):
// a0 = (m g, k 2c..) = lo's (c0, c1); a1 = (m g+8, k 2c..) = lo's (c2, c3); a2 and a3 the
// same from hi, whose columns are k 8 + 2c...
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack_pair(lo[0], lo[1]);
  a[1] = pack_pair(lo[2], lo[3]);
  a[2] = pack_pair(hi[0], hi[1]);
  a[3] = pack_pair(hi[2], hi[3]);
}

// Stores a warp's 16 x D_PAD accumulator (C fragments of D_PAD / 8 n-tiles) times `factor0`
// (rows g) and `factor1` (rows g + 8) to rows row0.. of a head matrix, skipping rows >= T and
// columns >= D.
template <int D_PAD>
__device__ __forceinline__ void store_rows(__nv_bfloat16* head, int64_t stride_t,
                                           const float (&acc)[D_PAD / 8][4], int row0, int T,
                                           int D, float factor0, float factor1) {
  const int g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
#pragma unroll
  for (int dt = 0; dt < D_PAD / 8; ++dt) {
    const int col = dt * 8 + 2 * c;  // D is a multiple of 8: col < D implies col + 1 < D
    if (col >= D) continue;
    if (row0 + g < T)
      *reinterpret_cast<uint32_t*>(head + (row0 + g) * stride_t + col) =
          pack_pair(acc[dt][0] * factor0, acc[dt][1] * factor0);
    if (row0 + g + 8 < T)
      *reinterpret_cast<uint32_t*>(head + (row0 + g + 8) * stride_t + col) =
          pack_pair(acc[dt][2] * factor1, acc[dt][3] * factor1);
  }
}

// Dropout's keep bits for a warp's C fragments: bit (nt * 4 + e) of a 16 x 16 block stands
// for element e of n-tile nt (nt = 0, 1: columns 0..7, 8..15). A kernel computes a tile's
// bits before its score products, while few registers are live (the Philox rounds need a
// dozen), and applies them after the softmax with `kept`. Bits of 4 consecutive 16-column
// blocks fill a uint32 (block kk at << 8 kk). `keeps` reads an element's number from its
// counter's words by the element's position in the 16 x 16 tile (the tile's starts are
// multiples of 16, so the position has the bits that pick the word and the half).

// A block with queries as rows (the forward and the dQ kernels): rows row16 + g and
// row16 + g + 8, keys key16 + 0..15 (both starts multiples of 16). One Philox call decides
// all 8 of the lane's elements (philox.cuh).
__device__ __forceinline__ uint32_t keep_bits_rows(const Dropout& d, int bh, int row16, int key16) {
  const int g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const uint4 w = dropout_words(d, bh, row16 + g, key16 + 2 * c);
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)  // row g + 8 (e / 2), key 8 nt + 2c + (e & 1)
      bits |= uint32_t(keeps(d, w, g + 8 * (e / 2), 8 * nt + 2 * c + (e & 1))) << (nt * 4 + e);
  return bits;
}

// A transposed block (the backward's dK/dV products): rows = keys key16 + g and
// key16 + g + 8, columns = queries q16 + 8 nt + 2c + lo. The queries q16 + 2c + lo and
// q16 + 8 + 2c + lo share a counter, which decides both of the lane's keys: 2 calls per
// block, 4 of each call's 8 numbers.
__device__ __forceinline__ uint32_t keep_bits_transposed(const Dropout& d, int bh, int key16,
                                                         int q16) {
  const int g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  uint32_t bits = 0;
#pragma unroll
  for (int lo = 0; lo < 2; ++lo) {
    const uint4 w = dropout_words(d, bh, q16 + 2 * c + lo, key16 + g);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)  // element 2r + lo of n-tile nt: key g + 8r, query 8 nt + 2c + lo
        bits |= uint32_t(keeps(d, w, 8 * nt + 2 * c + lo, g + 8 * r)) << (nt * 4 + 2 * r + lo);
  }
  return bits;
}

// Whether element e of n-tile nt (of up to 8 n-tiles: 64 columns) is kept.
__device__ __forceinline__ bool kept(uint32_t bits, int nt, int e) { return bits >> (nt * 4 + e) & 1u; }

// ----------------------------------------------------------------------------- entry points

// Version 1 (attention_bf16.cu).
void attention_forward_bf16(const AttentionForwardArgs<__nv_bfloat16>& args, int batch_heads,
                            cudaStream_t stream);
void attention_backward_bf16(const AttentionBackwardArgs<__nv_bfloat16>& args, int batch_heads,
                             cudaStream_t stream);
// Version 1's dQ kernel alone (one owner per dQ tile, no atomics): the deterministic dQ of
// version 2.
void attention_backward_dq_bf16(const AttentionBackwardArgs<__nv_bfloat16>& args,
                                int batch_heads, cudaStream_t stream);

// Version 2 (attention_bf16_v2.cu). attention_bf16_v2_runs says whether it takes a call of
// head dim D on this device: its backward covers D <= 64, and its tiles need more shared
// memory than some GPUs give a block (sm_86/sm_89: 99 KiB); version 1 runs the others.
// dq_accum: a zeroed fp32 (B, H, T, D) buffer for the atomic dQ, or nullptr for the
// deterministic dQ (version 1's kernel).
bool attention_bf16_v2_runs(int D, bool backward, bool atomic_dq);
void attention_forward_bf16_v2(const AttentionForwardArgs<__nv_bfloat16>& args, int batch_heads,
                               cudaStream_t stream);
void attention_backward_bf16_v2(const AttentionBackwardArgs<__nv_bfloat16>& args,
                                int batch_heads, float* dq_accum, cudaStream_t stream);
void attention_forward_fp32(const AttentionForwardArgs<float>& args, int batch_heads,
                            cudaStream_t stream);
void attention_backward_fp32(const AttentionBackwardArgs<float>& args, int batch_heads,
                             cudaStream_t stream);

}  // namespace gptk
