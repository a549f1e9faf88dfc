// bf16 causal attention on the tensor cores, version 1: mma.sync.m16n8k16 (bf16 inputs, fp32
// accumulators), FlashAttention-2 style (the math is in attention.cu). Version 2
// (attention_bf16_v2.cu: ldmatrix, cp.async pipeline, single-pass backward) is its rewrite;
// this one stays selectable (GPTK_CUDA_ATTENTION_VERSION=1) until a GPU record shows the
// rewrite correct and faster, and its dQ kernel is version 2's deterministic dQ.
//
// 64 x 64 tiles on 4 warps; each warp owns 16 rows of every score tile, so the row
// statistics (max, sum) never leave the warp. The fragment layouts of mma.sync and the
// register-level reuse of a score tile as the next product's A operand are described with
// the helpers in attention.cuh. Fragments are read from shared memory with 32-bit loads:
// - a B fragment needs two k-consecutive elements of one column. For S = Q K^T that is two
//   consecutive d of one K row: a 32-bit load from a row-major tile. Where the k index runs
//   over rows of the operand (V in P V, dO in P^T dO, Q in dS^T Q, K in dS K), the tile is
//   stored transposed in shared memory instead, so the load is again one 32-bit word.
// Row-major tiles have a row stride of D_PAD + 8 bf16 (and transposed ones of ROWS + 8):
// the lanes' 32-bit fragment loads then fall in 32 distinct banks.
#include "attention.cuh"

namespace gptk {
namespace {

using bf16 = __nv_bfloat16;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * WARP_SIZE;
constexpr int WARP_ROWS = 16;                   // rows of a tile owned by one warp
constexpr int BLOCK_ROWS = WARPS * WARP_ROWS;   // 64 queries (forward, dQ) or keys (dK/dV)

// The inner tile length: 64, or 32 for D = 128 to keep the accumulators in registers.
template <int D_PAD>
constexpr int inner_tile() { return D_PAD == 128 ? 32 : 64; }

// Two bf16 at p (4-byte aligned) as one register: the lower address in the low half, as mma
// expects the lower column / k index.
__device__ __forceinline__ uint32_t load_pair(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The A fragment of the 16 x 16 block at (row0, col0) of a row-major shared tile.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* tile, int stride, int row0,
                                       int col0) {
  const int g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const bf16* p = tile + (row0 + g) * stride + col0 + 2 * c;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * stride);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * stride + 8);
}

// D += A * B where B (k x n = 16 x 8) is stored transposed: element (k, n) at
// tile[(n0 + n) * stride + k0 + k] (for S = Q K^T that is simply the row-major K tile).
__device__ __forceinline__ void mma_b_rows(float (&d)[4], const uint32_t (&a)[4],
                                           const bf16* tile, int stride, int n0, int k0) {
  const int g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const bf16* p = tile + (n0 + g) * stride + k0 + 2 * c;
  mma_bf16(d, a, load_pair(p), load_pair(p + 8));
}

// Rows [row0, row0 + ROWS) of a (T, D) head matrix into tile[ROWS][STRIDE], in 16-byte
// chunks; rows >= T and columns >= D read as zeros.
template <int ROWS, int D_PAD, int STRIDE>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* head, int64_t stride_t, int row0,
                                          int T, int D) {
  constexpr int CHUNKS = D_PAD / 8;
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += blockDim.x) {
    const int r = i / CHUNKS, col = i % CHUNKS * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < T && col < D) v = *reinterpret_cast<const uint4*>(head + (row0 + r) * stride_t + col);
    *reinterpret_cast<uint4*>(tile + r * STRIDE + col) = v;
  }
}

// The same rows stored transposed: tile[d * STRIDE + r]. Consecutive threads take
// consecutive rows so that a warp's 2-byte shared stores land on consecutive addresses.
template <int ROWS, int D_PAD, int STRIDE>
__device__ __forceinline__ void load_rows_transposed(bf16* tile, const bf16* head, int64_t stride_t,
                                                     int row0, int T, int D) {
  constexpr int CHUNKS = D_PAD / 8;
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += blockDim.x) {
    const int r = i % ROWS, col = i / ROWS * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < T && col < D) v = *reinterpret_cast<const uint4*>(head + (row0 + r) * stride_t + col);
    const bf16* e = reinterpret_cast<const bf16*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) tile[(col + j) * STRIDE + r] = e[j];
  }
}

// ----------------------------------------------------------------------------- forward

// One block per 64 queries of one (batch, head); warp w owns queries 16w..16w+15.
template <int D_PAD, bool DROPOUT>
__global__ void __launch_bounds__(THREADS) attention_forward_bf16_kernel(const AttentionForwardArgs<bf16> args) {
  constexpr int BLOCK_KEYS = BLOCK_ROWS;  // equal to the query block: one diagonal tile
  constexpr int STRIDE = D_PAD + 8, VT_STRIDE = BLOCK_KEYS + 8;
  __shared__ __align__(16) bf16 qk_tile[BLOCK_ROWS * STRIDE];   // the queries, then each K tile
  __shared__ __align__(16) bf16 vt_tile[D_PAD * VT_STRIDE];     // V tile, transposed
  const int warp = threadIdx.x / WARP_SIZE, g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_ROWS;  // longest rows first
  const int warp_row0 = q0 + warp * WARP_ROWS;
  const int row[2] = {warp_row0 + g, warp_row0 + g + 8};       // this lane's two query rows

  // The warp's queries as A fragments, kept in registers for the whole key loop.
  load_rows<BLOCK_ROWS, D_PAD, STRIDE>(qk_tile, args.q.head(b, h), args.q.stride_t, q0, T, D);
  __syncthreads();
  uint32_t q_frag[D_PAD / 16][4];
#pragma unroll
  for (int kk = 0; kk < D_PAD / 16; ++kk) load_a(q_frag[kk], qk_tile, STRIDE, warp * WARP_ROWS, kk * 16);
  __syncthreads();

  float acc[D_PAD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running row max (base 2)
  float l[2] = {0.f, 0.f};              // this lane's share of the running row sum
  const int offset = args.kv_offset();  // query `row` sees keys <= row + offset
  const int last_key = min(q0 + BLOCK_ROWS, T) - 1 + offset;
  for (int k0 = 0; k0 <= last_key; k0 += BLOCK_KEYS) {
    load_rows<BLOCK_KEYS, D_PAD, STRIDE>(qk_tile, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D);
    load_rows_transposed<BLOCK_KEYS, D_PAD, VT_STRIDE>(vt_tile, args.v.head(b, h), args.v.stride_t,
                                                       k0, args.T_K, D);
    uint32_t keep = ~0u;  // dropout's keep bits of the warp's 16 x 64 tile
    if constexpr (DROPOUT) {
      keep = 0;
#pragma unroll
      for (int kk = 0; kk < BLOCK_KEYS / 16; ++kk)
        keep |= keep_bits_rows(args.dropout, bh, warp_row0, k0 + kk * 16) << (8 * kk);
    }
    __syncthreads();

    float s[BLOCK_KEYS / 8][4] = {};
#pragma unroll
    for (int nt = 0; nt < BLOCK_KEYS / 8; ++nt)
#pragma unroll
      for (int kk = 0; kk < D_PAD / 16; ++kk) mma_b_rows(s[nt], q_frag[kk], qk_tile, STRIDE, nt * 8, kk * 16);

    // Scale to base 2, mask keys after the query (only a tile reaching past the warp's
    // first row has any), and take the row maxima over the 4 lanes of each row.
    const bool diagonal = k0 + BLOCK_KEYS - 1 > warp_row0 + offset;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BLOCK_KEYS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1);
        float x = s[nt][e] * args.scale_log2;
        if (diagonal && key > row[e / 2] + offset) x = -INFINITY;
        s[nt][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      // Tile 0 holds key 0 <= row + offset, so m is finite from the first tile on; the
      // guard keeps a fully masked row at 0 instead of exp2(-inf - -inf) = NaN should that
      // ever change.
      const float base = m_new == -INFINITY ? 0.f : m_new;
      rescale[r] = exp2f(m[r] - base);
      m[r] = m_new;
    }
#pragma unroll
    for (int nt = 0; nt < BLOCK_KEYS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float base = m[e / 2] == -INFINITY ? 0.f : m[e / 2];
        s[nt][e] = exp2f(s[nt][e] - base);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BLOCK_KEYS / 8; ++nt) sum += s[nt][2 * r] + s[nt][2 * r + 1];
      l[r] = l[r] * rescale[r] + sum;  // the 4 lanes' shares are added once, at the end
    }
#pragma unroll
    for (int dt = 0; dt < D_PAD / 8; ++dt) {
      acc[dt][0] *= rescale[0];
      acc[dt][1] *= rescale[0];
      acc[dt][2] *= rescale[1];
      acc[dt][3] *= rescale[1];
    }

    // Dropout after the sums: only the kept probabilities go into P V.
#pragma unroll
    for (int nt = 0; nt < BLOCK_KEYS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!kept(keep, nt, e)) s[nt][e] = 0.f;

    // acc += P V, with P taken straight from the score registers.
#pragma unroll
    for (int kk = 0; kk < BLOCK_KEYS / 16; ++kk) {
      uint32_t p_frag[4];
      c_to_a(p_frag, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < D_PAD / 8; ++dt) mma_b_rows(acc[dt], p_frag, vt_tile, VT_STRIDE, dt * 8, kk * 16);
    }
    __syncthreads();  // the tiles are overwritten next iteration
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
  }
  const float out_scale = DROPOUT ? args.dropout.scale : 1.f;
  store_rows<D_PAD>(args.out.head(b, h), args.out.stride_t, acc, warp_row0, T, D, out_scale / l[0],
                    out_scale / l[1]);
  if (c == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row[r] < T) args.lse[int64_t(bh) * T + row[r]] = m[r] + log2f(l[r]);
  }
}

// ----------------------------------------------------------------------------- backward

// dK and dV for 64 keys of one (batch, head); warp w owns keys 16w..16w+15 and works on the
// transposed products (keys as rows): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dK += dS^T Q, over the query tiles at or below the diagonal.
template <int D_PAD>
struct DkDvTiles {
  static constexpr int QUERIES = inner_tile<D_PAD>();
  static constexpr int STRIDE = D_PAD + 8, T_STRIDE = QUERIES + 8;
  static constexpr int K_OFFSET = 0;
  static constexpr int V_OFFSET = K_OFFSET + BLOCK_ROWS * STRIDE;
  static constexpr int Q_OFFSET = V_OFFSET + BLOCK_ROWS * STRIDE;
  static constexpr int QT_OFFSET = Q_OFFSET + QUERIES * STRIDE;
  static constexpr int DO_OFFSET = QT_OFFSET + D_PAD * T_STRIDE;
  static constexpr int DOT_OFFSET = DO_OFFSET + QUERIES * STRIDE;
  static constexpr int BF16_END = DOT_OFFSET + D_PAD * T_STRIDE;
  static constexpr size_t BYTES = BF16_END * sizeof(bf16) + 2 * QUERIES * sizeof(float);
};

template <int D_PAD, bool DROPOUT>
__global__ void __launch_bounds__(THREADS) attention_backward_dkdv_bf16_kernel(const AttentionBackwardArgs<bf16> args) {
  using Tiles = DkDvTiles<D_PAD>;
  constexpr int QUERIES = Tiles::QUERIES, STRIDE = Tiles::STRIDE, T_STRIDE = Tiles::T_STRIDE;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* tiles = reinterpret_cast<bf16*>(smem);
  bf16* k_tile = tiles + Tiles::K_OFFSET;     // keys, row-major (A operand of S^T)
  bf16* v_tile = tiles + Tiles::V_OFFSET;     // values, row-major (A operand of dP^T)
  bf16* q_tile = tiles + Tiles::Q_OFFSET;     // queries, row-major (B of S^T)
  bf16* qt_tile = tiles + Tiles::QT_OFFSET;   // queries, transposed (B of dK)
  bf16* do_tile = tiles + Tiles::DO_OFFSET;   // dO, row-major (B of dP^T)
  bf16* dot_tile = tiles + Tiles::DOT_OFFSET; // dO, transposed (B of dV)
  float* lse_tile = reinterpret_cast<float*>(tiles + Tiles::BF16_END);
  float* delta_tile = lse_tile + QUERIES;

  const int warp = threadIdx.x / WARP_SIZE, g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int k0 = blockIdx.y * BLOCK_ROWS;
  const int offset = args.kv_offset();  // query i sees keys <= i + offset
  // The first query to see each of this lane's two keys.
  const int first_query[2] = {k0 + warp * WARP_ROWS + g - offset, k0 + warp * WARP_ROWS + g + 8 - offset};
  const float* lse = args.lse + int64_t(bh) * T;
  const float* delta = args.delta + int64_t(bh) * T;

  load_rows<BLOCK_ROWS, D_PAD, STRIDE>(k_tile, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D);
  load_rows<BLOCK_ROWS, D_PAD, STRIDE>(v_tile, args.v.head(b, h), args.v.stride_t, k0, args.T_K, D);

  float dk[D_PAD / 8][4] = {}, dv[D_PAD / 8][4] = {};
  for (int q0 = max(k0 - offset, 0) / QUERIES * QUERIES; q0 < T; q0 += QUERIES) {
    load_rows<QUERIES, D_PAD, STRIDE>(q_tile, args.q.head(b, h), args.q.stride_t, q0, T, D);
    load_rows_transposed<QUERIES, D_PAD, T_STRIDE>(qt_tile, args.q.head(b, h), args.q.stride_t, q0, T, D);
    load_rows<QUERIES, D_PAD, STRIDE>(do_tile, args.dout.head(b, h), args.dout.stride_t, q0, T, D);
    load_rows_transposed<QUERIES, D_PAD, T_STRIDE>(dot_tile, args.dout.head(b, h), args.dout.stride_t,
                                                   q0, T, D);
    for (int i = threadIdx.x; i < QUERIES; i += blockDim.x) {
      lse_tile[i] = q0 + i < T ? lse[q0 + i] : INFINITY;  // padded queries: P = exp2(-inf) = 0
      delta_tile[i] = q0 + i < T ? delta[q0 + i] : 0.f;
    }
    uint32_t keep = ~0u;  // dropout's keep bits of the warp's 16 keys x QUERIES tile
    if constexpr (DROPOUT) {
      keep = 0;
#pragma unroll
      for (int kk = 0; kk < QUERIES / 16; ++kk)
        keep |= keep_bits_transposed(args.dropout, bh, k0 + warp * WARP_ROWS, q0 + kk * 16)
                << (8 * kk);
    }
    __syncthreads();

    float st[QUERIES / 8][4] = {}, dpt[QUERIES / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t k_frag[4], v_frag[4];
      load_a(k_frag, k_tile, STRIDE, warp * WARP_ROWS, kk * 16);
      load_a(v_frag, v_tile, STRIDE, warp * WARP_ROWS, kk * 16);
#pragma unroll
      for (int nt = 0; nt < QUERIES / 8; ++nt) {
        mma_b_rows(st[nt], k_frag, q_tile, STRIDE, nt * 8, kk * 16);
        mma_b_rows(dpt[nt], v_frag, do_tile, STRIDE, nt * 8, kk * 16);
      }
    }
    // P^T and dS^T in place of S^T and dP^T; a key after the query gets P = 0. With
    // dropout st holds P^T Z (for dV; Z's scale at the store) and dS = P (Z dP - Delta).
#pragma unroll
    for (int nt = 0; nt < QUERIES / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * c + (e & 1);
        const float p = q0 + qi >= first_query[e / 2]
                            ? exp2f(st[nt][e] * args.scale_log2 - lse_tile[qi]) : 0.f;
        const bool keeps = kept(keep, nt, e);
        const float dp = DROPOUT ? (keeps ? dpt[nt][e] * args.dropout.scale : 0.f)
                                              : dpt[nt][e];
        st[nt][e] = keeps ? p : 0.f;
        dpt[nt][e] = p * (dp - delta_tile[qi]);
      }
#pragma unroll
    for (int kk = 0; kk < QUERIES / 16; ++kk) {
      uint32_t p_frag[4], ds_frag[4];
      c_to_a(p_frag, st[2 * kk], st[2 * kk + 1]);
      c_to_a(ds_frag, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < D_PAD / 8; ++dt) {
        mma_b_rows(dv[dt], p_frag, dot_tile, T_STRIDE, dt * 8, kk * 16);
        mma_b_rows(dk[dt], ds_frag, qt_tile, T_STRIDE, dt * 8, kk * 16);
      }
    }
    __syncthreads();
  }
  const int warp_key0 = k0 + warp * WARP_ROWS;
  const float dv_scale = DROPOUT ? args.dropout.scale : 1.f;
  store_rows<D_PAD>(args.dk.head(b, h), args.dk.stride_t, dk, warp_key0, args.T_K, D, args.scale,
                    args.scale);
  store_rows<D_PAD>(args.dv.head(b, h), args.dv.stride_t, dv, warp_key0, args.T_K, D, dv_scale,
                    dv_scale);
}

// dQ for 64 queries of one (batch, head); warp w owns queries 16w..16w+15:
// S = Q K^T, dP = dO V^T, dQ += dS K over the key tiles at or below the diagonal.
template <int D_PAD, bool DROPOUT>
__global__ void __launch_bounds__(THREADS) attention_backward_dq_bf16_kernel(const AttentionBackwardArgs<bf16> args) {
  constexpr int KEYS = inner_tile<D_PAD>();
  constexpr int STRIDE = D_PAD + 8, T_STRIDE = KEYS + 8;
  __shared__ __align__(16) bf16 staging[BLOCK_ROWS * STRIDE];  // Q, then dO, into registers
  __shared__ __align__(16) bf16 k_tile[KEYS * STRIDE];         // B of S = Q K^T
  __shared__ __align__(16) bf16 kt_tile[D_PAD * T_STRIDE];     // B of dQ = dS K
  __shared__ __align__(16) bf16 v_tile[KEYS * STRIDE];         // B of dP = dO V^T
  const int warp = threadIdx.x / WARP_SIZE, g = threadIdx.x % WARP_SIZE / 4, c = threadIdx.x % 4;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_ROWS;  // longest rows first
  const int warp_row0 = q0 + warp * WARP_ROWS;
  const int row[2] = {warp_row0 + g, warp_row0 + g + 8};

  uint32_t q_frag[D_PAD / 16][4], do_frag[D_PAD / 16][4];
  load_rows<BLOCK_ROWS, D_PAD, STRIDE>(staging, args.q.head(b, h), args.q.stride_t, q0, T, D);
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D_PAD / 16; ++kk) load_a(q_frag[kk], staging, STRIDE, warp * WARP_ROWS, kk * 16);
  __syncthreads();
  load_rows<BLOCK_ROWS, D_PAD, STRIDE>(staging, args.dout.head(b, h), args.dout.stride_t, q0, T, D);
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D_PAD / 16; ++kk) load_a(do_frag[kk], staging, STRIDE, warp * WARP_ROWS, kk * 16);

  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_lse[r] = row[r] < T ? args.lse[int64_t(bh) * T + row[r]] : INFINITY;
    row_delta[r] = row[r] < T ? args.delta[int64_t(bh) * T + row[r]] : 0.f;
  }

  float dq[D_PAD / 8][4] = {};
  const int offset = args.kv_offset();  // query `row` sees keys <= row + offset
  const int last_key = min(q0 + BLOCK_ROWS, T) - 1 + offset;
  for (int k0 = 0; k0 <= last_key; k0 += KEYS) {
    load_rows<KEYS, D_PAD, STRIDE>(k_tile, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D);
    load_rows_transposed<KEYS, D_PAD, T_STRIDE>(kt_tile, args.k.head(b, h), args.k.stride_t, k0,
                                                args.T_K, D);
    load_rows<KEYS, D_PAD, STRIDE>(v_tile, args.v.head(b, h), args.v.stride_t, k0, args.T_K, D);
    uint32_t keep = ~0u;  // dropout's keep bits of the warp's 16 x KEYS tile
    if constexpr (DROPOUT) {
      keep = 0;
#pragma unroll
      for (int kk = 0; kk < KEYS / 16; ++kk)
        keep |= keep_bits_rows(args.dropout, bh, warp_row0, k0 + kk * 16) << (8 * kk);
    }
    __syncthreads();

    float s[KEYS / 8][4] = {}, dp[KEYS / 8][4] = {};
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
      for (int kk = 0; kk < D_PAD / 16; ++kk) {
        mma_b_rows(s[nt], q_frag[kk], k_tile, STRIDE, nt * 8, kk * 16);
        mma_b_rows(dp[nt], do_frag[kk], v_tile, STRIDE, nt * 8, kk * 16);
      }
    // With dropout, dP of the kept probabilities: Z dP (dropped ones 0, the rest scaled).
    if constexpr (DROPOUT) {
#pragma unroll
      for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] = kept(keep, nt, e) ? dp[nt][e] * args.dropout.scale : 0.f;
    }
    // dS in place of S.
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * c + (e & 1);
        const int r = e / 2;
        const float p = key <= row[r] + offset ? exp2f(s[nt][e] * args.scale_log2 - row_lse[r]) : 0.f;
        s[nt][e] = p * (dp[nt][e] - row_delta[r]);
      }
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk) {
      uint32_t ds_frag[4];
      c_to_a(ds_frag, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < D_PAD / 8; ++dt) mma_b_rows(dq[dt], ds_frag, kt_tile, T_STRIDE, dt * 8, kk * 16);
    }
    __syncthreads();
  }
  store_rows<D_PAD>(args.dq.head(b, h), args.dq.stride_t, dq, warp_row0, T, D, args.scale, args.scale);
}

// Each kernel comes with and without dropout (a template flag: the kernels without it keep
// the registers they had, and at D = 32 the dQ kernel would spill on sm_80 otherwise).
template <int D_PAD>
void launch_forward(const AttentionForwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T, BLOCK_ROWS)));
  if (args.dropout.enabled) attention_forward_bf16_kernel<D_PAD, true><<<grid, THREADS, 0, stream>>>(args);
  else attention_forward_bf16_kernel<D_PAD, false><<<grid, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dQ alone: version 1's second backward kernel, and version 2's deterministic dQ.
template <int D_PAD>
void launch_backward_dq(const AttentionBackwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T, BLOCK_ROWS)));
  if (args.dropout.enabled) attention_backward_dq_bf16_kernel<D_PAD, true><<<grid, THREADS, 0, stream>>>(args);
  else attention_backward_dq_bf16_kernel<D_PAD, false><<<grid, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD, bool DROPOUT>
void launch_backward_dkdv(const AttentionBackwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T_K, BLOCK_ROWS)));  // key blocks
  const auto dkdv = attention_backward_dkdv_bf16_kernel<D_PAD, DROPOUT>;
  constexpr size_t smem = DkDvTiles<D_PAD>::BYTES;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dkdv<<<grid, THREADS, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD>
void launch_backward(const AttentionBackwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  if (args.dropout.enabled) launch_backward_dkdv<D_PAD, true>(args, batch_heads, stream);
  else launch_backward_dkdv<D_PAD, false>(args, batch_heads, stream);
  launch_backward_dq<D_PAD>(args, batch_heads, stream);
}

}  // namespace

void attention_forward_bf16(const AttentionForwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_forward<32>(args, batch_heads, stream);
    case 64: return launch_forward<64>(args, batch_heads, stream);
    default: return launch_forward<128>(args, batch_heads, stream);
  }
}

void attention_backward_bf16(const AttentionBackwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_backward<32>(args, batch_heads, stream);
    case 64: return launch_backward<64>(args, batch_heads, stream);
    default: return launch_backward<128>(args, batch_heads, stream);
  }
}

void attention_backward_dq_bf16(const AttentionBackwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_backward_dq<32>(args, batch_heads, stream);
    case 64: return launch_backward_dq<64>(args, batch_heads, stream);
    default: return launch_backward_dq<128>(args, batch_heads, stream);
  }
}

}  // namespace gptk
