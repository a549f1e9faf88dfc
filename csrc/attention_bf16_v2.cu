// bf16 causal attention on the tensor cores, version 2: FlashAttention-2's forward and its
// single-pass backward (the math is in attention.cu; mma.sync fragments and the score-tile
// register reuse are described with the helpers in attention.cuh). Version 1
// (attention_bf16.cu) stays selectable with GPTK_CUDA_ATTENTION_VERSION=1 or
// kernels.versions.select("cuda_attention", 1).
//
// What is new against version 1, and why:
// - Fragments come out of shared memory by ldmatrix: one ldmatrix.x4 hands a warp a whole
//   16x16 A fragment or the B fragments of two 8-column n-tiles, where version 1 issued
//   4 LDS.32 per lane per fragment. Its .trans form reads the operands whose k index runs
//   along rows (V in P V, dO in P^T dO, Q in dS^T Q, dS and K in dS K) straight from
//   row-major tiles, so nothing is transposed on its way into shared memory (version 1
//   scattered 2-byte stores for that).
// - Global -> shared copies are cp.async (16 bytes per instruction, L1 bypassed) into a
//   STAGES-deep ring: the next K/V tile (forward) or Q/dO tile (backward) is in flight while
//   the tensor cores work on the current one, and no register ever holds the loaded data.
// - Tiles are XOR-swizzled instead of padded (Swizzled, below): ldmatrix, cp.async and the
//   dS stores are free of bank conflicts and the tiles are dense.
// - Bigger tiles: 128 queries per forward block (each K/V tile is fetched once per 128
//   queries, not 64), with two 16-row m-tiles per warp for D <= 64 so that each K/V fragment
//   feeds two mma (half the shared-memory reads per FLOP); 128 keys per backward block.
//   Q fragments are re-read from shared memory for every key tile (as FlashAttention-2
//   does) rather than held in registers: the registers go to the score and accumulator
//   tiles, and ptxas keeps every kernel here free of spills.
// - The backward is one pass per key block computing S, dP, dV, dK and dQ from one
//   recomputation of P: 5 GEMMs against version 1's 7 (its separate dQ kernel recomputed S
//   and dP). dQ then has many writers (every key block at or before a query block), so each
//   block adds its dS K into an fp32 buffer with atomics and a last pass scales and rounds
//   it to bf16. The order of those additions varies from run to run; with
//   torch.use_deterministic_algorithms(True) the pass computes dK and dV only and dQ comes
//   from version 1's dQ kernel, which gives every dQ tile one owner.
// - The backward covers head dims up to 64 (every GPT-2 size): at D = 128 a 128-key block's
//   dK and dV accumulators alone take 128 registers per lane and ptxas spills, so D = 128
//   runs version 1's backward (attention_bf16_v2_runs says which calls version 2 takes).
#include "attention.cuh"

namespace gptk {
namespace {

using bf16 = __nv_bfloat16;

// ----------------------------------------------------------------------------- PTX

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously, cached in L2 only (.cg: each tile is read once
// per block, L1 would only be polluted). With valid == false the source size is 0: nothing
// is read and the 16 bytes are zero-filled, which is how rows past T and columns past D
// become the zeros the kernels rely on.
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n"
               ::"r"(smem_u32(smem)), "l"(global), "r"(valid ? 16 : 0) : "memory");
}

// 4 bytes global -> shared (an fp32 of lse or Delta: rows of those are not 16-byte aligned).
__device__ __forceinline__ void cp_async_4(void* smem, const void* global, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               ::"r"(smem_u32(smem)), "l"(global), "r"(valid ? 4 : 0) : "memory");
}

// Closes this thread's current group of cp.async; wait<N> blocks until at most N of the
// thread's groups are still in flight (groups complete in commit order).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ldmatrix.x4: lanes 8i..8i+7 give the shared addresses of the 8 rows (16 bytes each) of an
// 8x8 bf16 matrix i, and every lane receives in register i two elements of matrix i: the
// pair at (row lane / 4, columns 2 (lane % 4), +1) (exactly a C-layout pair) or, with
// .trans, the pair at (rows 2 (lane % 4), +1, column lane / 4): the matrix transposed.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// dQ partial sums into the fp32 buffer: a reduction (RED, the result is not read back);
// sm_90 adds an aligned float2 in one instruction.
__device__ __forceinline__ void atomic_add_pair(float* p, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(lo, hi));
#else
  atomicAdd(p, lo);
  atomicAdd(p + 1, hi);
#endif
}

// ----------------------------------------------------------------------------- shared tiles

// A row-major bf16 tile of COLS columns, stored as 16-byte chunks (8 columns) whose position
// within their row is XOR-swizzled: logical chunk c of row r sits at chunk c ^ s(r), with
//     s(r) = r % 8          for rows of 8 or 16 chunks (COLS = 64, 128),
//     s(r) = (r / 2) % 4    for rows of 4 chunks (COLS = 32).
// Why: shared memory serves 8 lanes' 16-byte accesses (one ldmatrix 8x8 matrix, one
// cp.async phase) in one wavefront only if they fall in 8 different 16-byte bank groups,
// group = (byte address / 16) % 8. ldmatrix reads one logical chunk of 8 consecutive rows
// r0..r0+7 (r0 a multiple of 8 everywhere below). Unswizzled, rows of 128 or 256 bytes put
// that chunk of every row in the same group: an 8-way conflict. Swizzled, the 8 rows use
// physical chunks c ^ 0 .. c ^ 7, whose low 3 bits (the group) are all different. Rows
// of 64 bytes pack two rows per 128 bytes: group = 4 (r % 2) + (c ^ s(r)), and over 8
// consecutive rows (r % 2, (r / 2) % 4) takes all 8 values. cp.async writes 8 consecutive
// chunks of a row (or of 2 rows) per phase, a permutation of the 8 groups; the dS stores
// are checked where they happen.
template <int COLS>
struct Swizzled {
  static constexpr int CHUNKS = COLS / 8;
  static_assert(CHUNKS == 4 || CHUNKS == 8 || CHUNKS == 16, "tiles are 32, 64 or 128 columns");

  // Element offset of logical chunk `chunk` (columns 8 chunk .. 8 chunk + 7) of row `row`.
  __device__ static __forceinline__ int at(int row, int chunk) {
    const int s = CHUNKS >= 8 ? row % 8 : row / 2 % 4;
    return row * COLS + (chunk ^ s) * 8;
  }
};

// Where lane `lane` points ldmatrix.x4 to fill a fragment from a swizzled tile at
// (row, chunk) = its top-left 16 rows x 2 chunks. Which 4 matrices a fragment needs, in
// register order, follows from the mma layouts (attention.cuh):
// (a) A from a row-major [m][k] tile, plain: a0..a3 = (m +0, k +0), (m +8, k +0),
//     (m +0, k +8), (m +8, k +8);
// (b) B of two n-tiles from an n-major [n][k] tile (K in S = Q K^T), plain: b0, b1 of
//     n-tile 0 = (n +0, k +0), (n +0, k +8), then b0, b1 of n-tile 1 = (n +8, k +0),
//     (n +8, k +8);
// (c) B of two n-tiles from a k-major [k][n] tile (V in P V), .trans: b0, b1 of n-tile 0 =
//     (k +0, n +0), (k +8, n +0), then (k +0, n +8), (k +8, n +8): rows and chunks in
//     the order of (a);
// (d) A from a k-major [k][m] tile (dS^T in dQ = dS K), .trans: a0..a3 = (k +0, m +0),
//     (k +0, m +8), (k +8, m +0), (k +8, m +8): in the order of (b).
// (.trans turns the matrix at memory rows k, columns n into the pairs (k 2c..2c+1, n g) a B
// register holds, and memory rows k, columns m into the pairs (m g, k 2c..2c+1) of an A
// register.) So two address patterns serve all four; lane l reads
//     rows_then_chunks (a, c): row + l % 16,              chunk + l / 16
//     chunks_then_rows (b, d): row + l % 8 + 8 (l / 16),  chunk + l / 8 % 2
template <int COLS>
__device__ __forceinline__ const bf16* rows_then_chunks(const bf16* tile, int row, int chunk,
                                                        int lane) {
  return tile + Swizzled<COLS>::at(row + lane % 16, chunk + lane / 16);
}

template <int COLS>
__device__ __forceinline__ const bf16* chunks_then_rows(const bf16* tile, int row, int chunk,
                                                        int lane) {
  return tile + Swizzled<COLS>::at(row + lane % 8 + 8 * (lane / 16), chunk + lane / 8 % 2);
}

// Rows [row0, row0 + ROWS) of a (T, D) head matrix into a swizzled ROWS x D_PAD tile by
// cp.async, chunk i by thread i % THREADS (consecutive threads read consecutive 16 bytes of
// a row: coalesced). Rows >= T and columns >= D are zero-filled; their source address is
// replaced by the head's first row so that no out-of-range address is even formed.
template <int ROWS, int D_PAD, int THREADS>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* head, int64_t stride_t,
                                                int row0, int T, int D) {
  constexpr int CHUNKS = D_PAD / 8;
  static_assert(ROWS * CHUNKS % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int j = 0; j < ROWS * CHUNKS / THREADS; ++j) {
    const int i = j * THREADS + int(threadIdx.x);
    const int r = i / CHUNKS, chunk = i % CHUNKS;
    const bool valid = row0 + r < T && chunk * 8 < D;
    const bf16* src = valid ? head + (row0 + r) * stride_t + chunk * 8 : head;
    cp_async_16(tile + Swizzled<D_PAD>::at(r, chunk), src, valid);
  }
}

// ----------------------------------------------------------------------------- forward

// Tile shapes of the forward for a padded head dim: BLOCK_M = 128 queries per block on WARPS
// warps, each owning M_TILES consecutive 16-row m-tiles; key tiles of BLOCK_N keys through
// a STAGES-deep cp.async ring.
template <int D_PAD, bool DROPOUT = false>
struct ForwardShape {
  // D <= 64: 4 warps x 32 rows (FlashAttention-2's 128 x 64 on 4 warps). Per lane:
  // accumulators 2 x D_PAD/8 x 4 and scores 2 x 8 x 4 fp32 registers.
  // D = 128, and dropout at any D: 8 warps x 16 rows; 32 rows would need 128 accumulator +
  // 64 score registers and spill at D = 128, and at D = 64 the dropout's keep bits and
  // Philox rounds push the 252 registers of 32 rows into spills.
  static constexpr bool ONE_M_TILE = D_PAD == 128 || DROPOUT;
  static constexpr int WARPS = ONE_M_TILE ? 8 : 4;
  static constexpr int M_TILES = ONE_M_TILE ? 1 : 2;
  static constexpr int THREADS = WARPS * WARP_SIZE;
  // Blocks per SM the register budget aims at: 8 warps per SM, up to 255 registers per lane
  // (ptxas left to choose picks fewer registers for more blocks in some configurations,
  // and spills).
  static constexpr int MIN_BLOCKS = 256 / THREADS;
  static constexpr int WARP_M = 16 * M_TILES;
  static constexpr int BLOCK_M = WARPS * WARP_M;
  static constexpr int BLOCK_N = 64;
  static constexpr int STAGES = 2;  // double buffering: one tile in the tensor cores, the next landing
  static constexpr int Q_ELEMS = BLOCK_M * D_PAD, KV_ELEMS = BLOCK_N * D_PAD;
  // Q, then STAGES K tiles, then STAGES V tiles.
  static constexpr size_t SMEM = size_t(Q_ELEMS + 2 * STAGES * KV_ELEMS) * sizeof(bf16);
  static_assert(BLOCK_M == 128, "the grid is laid out for 128-query blocks");
};

// One block per 128 queries of one (batch, head); warp w owns queries w * WARP_M ..
// (w + 1) * WARP_M - 1 of the block. DROPOUT is a template flag, not a runtime branch: the
// kernels without it are the ones they were (at D = 64 they use 252-255 registers, and
// the dropout code's registers would make them spill).
template <int D_PAD, bool DROPOUT>
__global__ void __launch_bounds__(ForwardShape<D_PAD, DROPOUT>::THREADS,
                                  ForwardShape<D_PAD, DROPOUT>::MIN_BLOCKS)
    attention_forward_bf16_v2_kernel(const AttentionForwardArgs<bf16> args) {
  using S = ForwardShape<D_PAD, DROPOUT>;
  constexpr int M_TILES = S::M_TILES, BLOCK_N = S::BLOCK_N, STAGES = S::STAGES;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const q_tile = reinterpret_cast<bf16*>(smem);
  bf16* const k_ring = q_tile + S::Q_ELEMS;
  bf16* const v_ring = k_ring + STAGES * S::KV_ELEMS;

  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int g = lane / 4, c = lane % 4;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * S::BLOCK_M;  // longest rows first
  const int warp_row0 = q0 + warp * S::WARP_M;
  const bf16* const k_head = args.k.head(b, h);
  const bf16* const v_head = args.v.head(b, h);
  // Key tiles 0 .. n_tiles - 1 hold every key at or before the block's last query, which
  // sees keys up to its row + offset.
  const int offset = args.kv_offset();
  const int n_tiles = int(ceil_div(min(q0 + S::BLOCK_M, T) + offset, BLOCK_N));

  auto load_kv = [&](int tile) {
    const int stage = tile % STAGES;
    load_tile_async<BLOCK_N, D_PAD, S::THREADS>(k_ring + stage * S::KV_ELEMS, k_head,
                                                args.k.stride_t, tile * BLOCK_N, args.T_K, D);
    load_tile_async<BLOCK_N, D_PAD, S::THREADS>(v_ring + stage * S::KV_ELEMS, v_head,
                                                args.v.stride_t, tile * BLOCK_N, args.T_K, D);
  };

  // Pipeline prologue: K/V tile t is commit group t (committed even when empty, past the
  // last tile, so that the count stays uniform); the Q tile joins group 0.
  load_tile_async<S::BLOCK_M, D_PAD, S::THREADS>(q_tile, args.q.head(b, h), args.q.stride_t, q0, T, D);
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {
    if (t < n_tiles) load_kv(t);
    cp_async_commit();
  }

  float acc[M_TILES][D_PAD / 8][4] = {};
  float m[M_TILES][2], l[M_TILES][2];  // running row max (base 2), this lane's share of the row sum
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) m[mt][r] = -INFINITY, l[mt][r] = 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    // Groups committed so far: tiles 0 .. t + STAGES - 2. Tile t's is complete once at most
    // STAGES - 2 are in flight; the barrier then makes every thread's copies visible to all,
    // and says that every warp is done with tile t - 1, whose stage the next load refills.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (t + STAGES - 1 < n_tiles) load_kv(t + STAGES - 1);
    cp_async_commit();

    const int k0 = t * BLOCK_N;
    // A tile wholly after the warp's last query contributes nothing (warp-uniform; the
    // only barrier of the iteration is behind us).
    if (k0 > warp_row0 + S::WARP_M - 1 + offset) continue;
    const bf16* const k_tile = k_ring + t % STAGES * S::KV_ELEMS;
    const bf16* const v_tile = v_ring + t % STAGES * S::KV_ELEMS;
    uint32_t keep[M_TILES];  // dropout's keep bits, per m-tile of 16 rows x the 64 keys
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      keep[mt] = ~0u;
      if constexpr (DROPOUT) {
        keep[mt] = 0;
        // One Philox call at a time: the calls in flight together would each hold a
        // dozen registers beside the accumulators (at D = 128 that spills).
#pragma unroll 1
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
          keep[mt] |= keep_bits_rows(args.dropout, bh, warp_row0 + mt * 16, k0 + kk * 16) << (8 * kk);
      }
    }

    // S = Q K^T: A from the row-major Q tile (pattern a), B from the n-major K tile
    // (pattern b), one ldmatrix per two n-tiles, each B fragment used by every m-tile.
    float s[M_TILES][BLOCK_N / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t qa[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
        ldmatrix_x4(qa[mt], rows_then_chunks<D_PAD>(q_tile, warp * S::WARP_M + mt * 16, 2 * kk, lane));
#pragma unroll
      for (int np = 0; np < BLOCK_N / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, chunks_then_rows<D_PAD>(k_tile, np * 16, 2 * kk, lane));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_bf16(s[mt][2 * np], qa[mt], kb[0], kb[1]);
          mma_bf16(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

    // Online softmax per m-tile, as in version 1: scale to base 2, mask keys after the
    // query (only a tile reaching past the m-tile's first row has any), row maxima over the
    // 4 lanes of each row, rescale what came before.
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      const int row0 = warp_row0 + mt * 16;
      const int row[2] = {row0 + g, row0 + g + 8};
      const bool diagonal = k0 + BLOCK_N - 1 > row0 + offset;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < BLOCK_N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + nt * 8 + 2 * c + (e & 1);
          float x = s[mt][nt][e] * args.scale_log2;
          if (diagonal && key > row[e / 2] + offset) x = -INFINITY;
          s[mt][nt][e] = x;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
        }
      float rescale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 2));
        // Tile 0 holds key 0 <= every row + offset, so m is finite from the first tile on and a
        // wholly masked later tile leaves it (rescale 1, p 0); the guard keeps a fully
        // masked row at 0 instead of exp2(-inf - -inf) = NaN should that ever change.
        const float m_new = fmaxf(m[mt][r], tile_max[r]);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        rescale[r] = exp2f(m[mt][r] - base);
        m[mt][r] = m_new;
      }
#pragma unroll
      for (int nt = 0; nt < BLOCK_N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float base = m[mt][e / 2] == -INFINITY ? 0.f : m[mt][e / 2];
          s[mt][nt][e] = exp2f(s[mt][nt][e] - base);
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        l[mt][r] = l[mt][r] * rescale[r] + sum;  // the 4 lanes' shares are added at the end
      }
#pragma unroll
      for (int dt = 0; dt < D_PAD / 8; ++dt) {
        acc[mt][dt][0] *= rescale[0];
        acc[mt][dt][1] *= rescale[0];
        acc[mt][dt][2] *= rescale[1];
        acc[mt][dt][3] *= rescale[1];
      }
      // Dropout after the sums: only the kept probabilities go into P V.
      if constexpr (DROPOUT) {
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!kept(keep[mt], nt, e)) s[mt][nt][e] = 0.f;
      }
    }

    // acc += P V: P straight from the score registers (c_to_a), B from the k-major V tile
    // (pattern c, .trans), each B fragment used by every m-tile.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t p_frag[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) c_to_a(p_frag[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D_PAD / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, rows_then_chunks<D_PAD>(v_tile, kk * 16, 2 * dp, lane));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_bf16(acc[mt][2 * dp], p_frag[mt], vb[0], vb[1]);
          mma_bf16(acc[mt][2 * dp + 1], p_frag[mt], vb[2], vb[3]);
        }
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
    const int row0 = warp_row0 + mt * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(FULL_MASK, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(FULL_MASK, l[mt][r], 2);
    }
    const float out_scale = DROPOUT ? args.dropout.scale : 1.f;
    store_rows<D_PAD>(args.out.head(b, h), args.out.stride_t, acc[mt], row0, T, D,
                      out_scale / l[mt][0], out_scale / l[mt][1]);
    if (c == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row < T) args.lse[int64_t(bh) * T + row] = m[mt][r] + log2f(l[mt][r]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward

// Tile shapes of the backward (D <= 64): BLOCK_N = 128 keys per block, 16 per warp on 8
// warps; the queries at or after them in steps of BLOCK_M through a STAGES-deep cp.async
// ring.
template <int D_PAD, bool DROPOUT = false>
struct BackwardShape {
  static_assert(D_PAD <= 64, "D = 128 runs version 1's backward (see the top of the file)");
  static constexpr int WARPS = 8;
  static constexpr int THREADS = WARPS * WARP_SIZE;
  static constexpr int MIN_BLOCKS = 1;  // up to 255 registers per lane (as the forward)
  static constexpr int BLOCK_N = WARPS * 16;
  // Per lane: dK and dV accumulators 2 x D_PAD/8 x 4 fp32 (64 at D = 64), S^T and dP^T
  // BLOCK_M/8 x 4 each. With dropout at D = 64, 32-query steps: the 255 registers of
  // 64-query steps leave no room for the keep bits.
  static constexpr int BLOCK_M = DROPOUT && D_PAD == 64 ? 32 : 64;
  static constexpr int STAGES = 2;
  static constexpr int KV_ELEMS = BLOCK_N * D_PAD, QD_ELEMS = BLOCK_M * D_PAD;
  static constexpr int DS_ELEMS = BLOCK_N * BLOCK_M;
  // dQ = dS K, a BLOCK_M x D_PAD product, split over the warps: DQ_WARPS_M along the queries
  // (16 each), the others along the head dim, DQ_NTILES 8-column n-tiles each.
  static constexpr int DQ_WARPS_M = BLOCK_M / 16;
  static constexpr int DQ_NTILES = D_PAD / 8 / (WARPS / DQ_WARPS_M);
  static_assert(WARPS % DQ_WARPS_M == 0 && DQ_NTILES >= 2 && DQ_NTILES % 2 == 0,
                "dQ n-tiles go in pairs (one ldmatrix.x4)");
  // K, V, then the Q and dO rings, dS^T (atomic dQ only), then fp32 lse and Delta rings.
  static constexpr size_t smem(bool atomic_dq) {
    return size_t(2 * KV_ELEMS + 2 * STAGES * QD_ELEMS + (atomic_dq ? DS_ELEMS : 0)) * sizeof(bf16) +
           size_t(2 * STAGES * BLOCK_M) * sizeof(float);
  }
};

// One block per 128 keys of one (batch, head); warp w owns keys 16w..16w+15 of the block
// and works on the transposed products, keys as rows (so that dK and dV accumulate in C
// fragments of its own rows): per query step, S^T = K Q^T, dP^T = V dO^T, P^T, dS^T,
// dV += P^T dO, dK += dS^T Q; with ATOMIC_DQ also dQ += dS K for the step's queries.
template <int D_PAD, bool ATOMIC_DQ, bool DROPOUT>
__global__ void __launch_bounds__(BackwardShape<D_PAD, DROPOUT>::THREADS,
                                  BackwardShape<D_PAD, DROPOUT>::MIN_BLOCKS)
    attention_backward_bf16_v2_kernel(const AttentionBackwardArgs<bf16> args,
                                      float* __restrict__ dq_accum) {
  using S = BackwardShape<D_PAD, DROPOUT>;
  constexpr int BLOCK_M = S::BLOCK_M, STAGES = S::STAGES;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const k_tile = reinterpret_cast<bf16*>(smem);
  bf16* const v_tile = k_tile + S::KV_ELEMS;
  bf16* const q_ring = v_tile + S::KV_ELEMS;
  bf16* const do_ring = q_ring + STAGES * S::QD_ELEMS;
  bf16* const ds_tile = do_ring + STAGES * S::QD_ELEMS;  // only with ATOMIC_DQ
  float* const lse_ring = reinterpret_cast<float*>(ds_tile + (ATOMIC_DQ ? S::DS_ELEMS : 0));
  float* const delta_ring = lse_ring + STAGES * BLOCK_M;

  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int g = lane / 4, c = lane % 4;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int k0 = blockIdx.y * S::BLOCK_N;  // block 0 first: it has the most queries to visit
  const int key0 = warp * 16;              // the warp's first key, in the block
  // Query i sees keys <= i + offset: first_query[r] is the first query to see this lane's
  // key k0 + key0 + g + 8 r, and queries before k0 - offset see none of the block's keys.
  // The steps start there, aligned down to BLOCK_M.
  const int offset = args.kv_offset();
  const int first_query[2] = {k0 + key0 + g - offset, k0 + key0 + g + 8 - offset};
  const int q_start = max(k0 - offset, 0) / BLOCK_M * BLOCK_M;
  const int n_steps = int(ceil_div(T - q_start, BLOCK_M));
  const bf16* const q_head = args.q.head(b, h);
  const bf16* const do_head = args.dout.head(b, h);
  const float* const lse_head = args.lse + int64_t(bh) * T;
  const float* const delta_head = args.delta + int64_t(bh) * T;

  auto load_step = [&](int step) {
    const int stage = step % STAGES, q0 = q_start + step * BLOCK_M;
    load_tile_async<BLOCK_M, D_PAD, S::THREADS>(q_ring + stage * S::QD_ELEMS, q_head,
                                                args.q.stride_t, q0, T, D);
    load_tile_async<BLOCK_M, D_PAD, S::THREADS>(do_ring + stage * S::QD_ELEMS, do_head,
                                                args.dout.stride_t, q0, T, D);
    // Threads 0 .. BLOCK_M-1 copy lse, the next BLOCK_M Delta; past T: zeros (the
    // probabilities of those queries are masked to 0 below, whatever their lse).
    const int i = threadIdx.x % BLOCK_M, row = q0 + i;
    const float* src = threadIdx.x < BLOCK_M ? lse_head : delta_head;
    float* dst = (threadIdx.x < BLOCK_M ? lse_ring : delta_ring) + stage * BLOCK_M + i;
    if (threadIdx.x < 2 * BLOCK_M) cp_async_4(dst, src + (row < T ? row : 0), row < T);
  };

  // Prologue: K and V join query step 0's commit group; step s is group s.
  load_tile_async<S::BLOCK_N, D_PAD, S::THREADS>(k_tile, args.k.head(b, h), args.k.stride_t, k0,
                                                 args.T_K, D);
  load_tile_async<S::BLOCK_N, D_PAD, S::THREADS>(v_tile, args.v.head(b, h), args.v.stride_t, k0,
                                                 args.T_K, D);
#pragma unroll
  for (int step = 0; step < STAGES - 1; ++step) {
    if (step < n_steps) load_step(step);
    cp_async_commit();
  }

  float dk[D_PAD / 8][4] = {}, dv[D_PAD / 8][4] = {};
  for (int step = 0; step < n_steps; ++step) {
    // As in the forward: step `step`'s group has landed for every thread, every warp is done
    // with the previous step (its stage and dS^T may be overwritten), refill the ring.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (step + STAGES - 1 < n_steps) load_step(step + STAGES - 1);
    cp_async_commit();

    const int stage = step % STAGES, q0 = q_start + step * BLOCK_M;
    const bf16* const q_tile = q_ring + stage * S::QD_ELEMS;
    const bf16* const do_tile = do_ring + stage * S::QD_ELEMS;
    const float* const lse = lse_ring + stage * BLOCK_M;
    const float* const delta = delta_ring + stage * BLOCK_M;
    // Dropout's keep bits of the warp's 16 keys x BLOCK_M queries (BLOCK_M / 8 n-tiles x
    // 4 = 32), computed before the products keep S^T and dP^T live.
    uint32_t keep = ~0u;
    if constexpr (DROPOUT) {
      keep = 0;
#pragma unroll
      for (int kk = 0; kk < BLOCK_M / 16; ++kk)
        keep |= keep_bits_transposed(args.dropout, bh, k0 + key0, q0 + kk * 16) << (8 * kk);
    }

    // S^T = K Q^T, 16 keys x BLOCK_M queries: A from the row-major K tile (pattern a), B
    // from the n-major Q tile (pattern b: n = query, k = d).
    float st[BLOCK_M / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t ka[4];
      ldmatrix_x4(ka, rows_then_chunks<D_PAD>(k_tile, key0, 2 * kk, lane));
#pragma unroll
      for (int np = 0; np < BLOCK_M / 16; ++np) {
        uint32_t qb[4];
        ldmatrix_x4(qb, chunks_then_rows<D_PAD>(q_tile, np * 16, 2 * kk, lane));
        mma_bf16(st[2 * np], ka, qb[0], qb[1]);
        mma_bf16(st[2 * np + 1], ka, qb[2], qb[3]);
      }
    }
    // P^T = exp2(S^T scale_log2 - lse) where the query sees the key (and exists), else 0.
    // (Computed before dP^T so that S^T and dP^T are never live together.)
#pragma unroll
    for (int nt = 0; nt < BLOCK_M / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * c + (e & 1), query = q0 + qi;
        const bool sees = query >= first_query[e / 2] && query < T;
        st[nt][e] = sees ? exp2f(st[nt][e] * args.scale_log2 - lse[qi]) : 0.f;
      }
    // dP^T = V dO^T, as S^T with V and dO; then dS^T = P^T (dP^T - Delta).
    float dpt[BLOCK_M / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t va[4];
      ldmatrix_x4(va, rows_then_chunks<D_PAD>(v_tile, key0, 2 * kk, lane));
#pragma unroll
      for (int np = 0; np < BLOCK_M / 16; ++np) {
        uint32_t dob[4];
        ldmatrix_x4(dob, chunks_then_rows<D_PAD>(do_tile, np * 16, 2 * kk, lane));
        mma_bf16(dpt[2 * np], va, dob[0], dob[1]);
        mma_bf16(dpt[2 * np + 1], va, dob[2], dob[3]);
      }
    }
    // Both packed to bf16 A fragments (c_to_a) at once, which halves the registers they hold.
    // With dropout, dS = P (Z dP - Delta), and P^T becomes P^T Z for dV (Z's 1 / (1 - p) at
    // the store).
    uint32_t p_frag[BLOCK_M / 16][4], ds_frag[BLOCK_M / 16][4];
#pragma unroll
    for (int nt = 0; nt < BLOCK_M / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * c + (e & 1);
        const bool keeps = kept(keep, nt, e);
        const float dp = DROPOUT ? (keeps ? dpt[nt][e] * args.dropout.scale : 0.f) : dpt[nt][e];
        dpt[nt][e] = st[nt][e] * (dp - delta[qi]);
        if (!keeps) st[nt][e] = 0.f;
      }
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
      c_to_a(p_frag[kk], st[2 * kk], st[2 * kk + 1]);
      c_to_a(ds_frag[kk], dpt[2 * kk], dpt[2 * kk + 1]);
    }

    // dV += P^T dO and dK += dS^T Q: B from the k-major dO and Q tiles (pattern c, .trans:
    // k = query, n = d).
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk)
#pragma unroll
      for (int dp = 0; dp < D_PAD / 16; ++dp) {
        uint32_t dob[4], qb[4];
        ldmatrix_x4_trans(dob, rows_then_chunks<D_PAD>(do_tile, kk * 16, 2 * dp, lane));
        ldmatrix_x4_trans(qb, rows_then_chunks<D_PAD>(q_tile, kk * 16, 2 * dp, lane));
        mma_bf16(dv[2 * dp], p_frag[kk], dob[0], dob[1]);
        mma_bf16(dv[2 * dp + 1], p_frag[kk], dob[2], dob[3]);
        mma_bf16(dk[2 * dp], ds_frag[kk], qb[0], qb[1]);
        mma_bf16(dk[2 * dp + 1], ds_frag[kk], qb[2], qb[3]);
      }

    if constexpr (ATOMIC_DQ) {
      // dS^T to shared memory (rows = keys), the same bf16 values dK used. ds_frag[kk] holds
      // the 16 x 16 block (keys key0.., queries 16 kk..) as an A fragment: registers 0..3 =
      // (key g, queries 2c..2c+1), (key g+8, 2c..), (key g, 8+2c..), (key g+8, 8+2c..). A
      // warp's store covers keys key0+g (g = 0..7, one logical chunk, 8 distinct bank groups
      // by the swizzle) x 4 consecutive words (c): 32 distinct banks.
      using DsTile = Swizzled<BLOCK_M>;
#pragma unroll
      for (int kk = 0; kk < BLOCK_M / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = key0 + g + 8 * (i % 2), chunk = 2 * kk + i / 2;
          *reinterpret_cast<uint32_t*>(ds_tile + DsTile::at(row, chunk) + 2 * c) = ds_frag[kk][i];
        }
      __syncthreads();

      // dQ(q0.., BLOCK_M x D) += dS K over the block's 128 keys. Warp (mw, nw) computes
      // queries 16 mw.. x n-tiles nw DQ_NTILES..: A = dS from the k-major dS^T tile (pattern
      // d, .trans: m = query, k = key), B = K from the k-major K tile (pattern c, .trans:
      // k = key, n = d).
      const int mw = warp % S::DQ_WARPS_M, nw = warp / S::DQ_WARPS_M;
      float dq[S::DQ_NTILES][4] = {};
#pragma unroll
      for (int kk = 0; kk < S::BLOCK_N / 16; ++kk) {
        uint32_t dsa[4];
        ldmatrix_x4_trans(dsa, chunks_then_rows<BLOCK_M>(ds_tile, kk * 16, 2 * mw, lane));
#pragma unroll
        for (int np = 0; np < S::DQ_NTILES / 2; ++np) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, rows_then_chunks<D_PAD>(k_tile, kk * 16,
                                                        nw * S::DQ_NTILES + 2 * np, lane));
          mma_bf16(dq[2 * np], dsa, kb[0], kb[1]);
          mma_bf16(dq[2 * np + 1], dsa, kb[2], kb[3]);
        }
      }
      // C fragment (query 16 mw + g (+8), column 2c (+1) of n-tile nt) into dq_accum, a
      // contiguous (B*H, T, D) fp32 buffer: rows past T and columns past D are padding.
#pragma unroll
      for (int nt = 0; nt < S::DQ_NTILES; ++nt) {
        const int col = (nw * S::DQ_NTILES + nt) * 8 + 2 * c;
        if (col >= D) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = q0 + 16 * mw + g + 8 * r;
          if (row < T) atomic_add_pair(dq_accum + (int64_t(bh) * T + row) * D + col, dq[nt][2 * r], dq[nt][2 * r + 1]);
        }
      }
    }
  }
  const float dv_scale = DROPOUT ? args.dropout.scale : 1.f;
  store_rows<D_PAD>(args.dk.head(b, h), args.dk.stride_t, dk, k0 + key0, args.T_K, D, args.scale,
                    args.scale);
  store_rows<D_PAD>(args.dv.head(b, h), args.dv.stride_t, dv, k0 + key0, args.T_K, D, dv_scale,
                    dv_scale);
}

// dq = bf16(scale * dq_accum), 4 elements per thread (D is a multiple of 8, both tensors are
// contiguous (B, H, T, D): the same flat index).
__global__ void attention_dq_convert_kernel(bf16* __restrict__ dq, const float* __restrict__ dq_accum,
                                            int64_t quads, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < quads;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(dq_accum)[i];
    reinterpret_cast<uint2*>(dq)[i] = make_uint2(pack_pair(v.x * scale, v.y * scale),
                                                 pack_pair(v.z * scale, v.w * scale));
  }
}

// ----------------------------------------------------------------------------- launch

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int D_PAD, bool DROPOUT>
void launch_forward(const AttentionForwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  using S = ForwardShape<D_PAD, DROPOUT>;
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T, S::BLOCK_M)));
  const auto kernel = attention_forward_bf16_v2_kernel<D_PAD, DROPOUT>;
  allow_shared_memory(kernel, S::SMEM);
  kernel<<<grid, S::THREADS, S::SMEM, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD>
void launch_forward(const AttentionForwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  if (args.dropout.enabled) launch_forward<D_PAD, true>(args, batch_heads, stream);
  else launch_forward<D_PAD, false>(args, batch_heads, stream);
}

template <int D_PAD, bool ATOMIC_DQ, bool DROPOUT>
void launch_backward_pass(const AttentionBackwardArgs<bf16>& args, int batch_heads, float* dq_accum,
                          cudaStream_t stream) {
  using S = BackwardShape<D_PAD, DROPOUT>;
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T_K, S::BLOCK_N)));  // key blocks
  const auto kernel = attention_backward_bf16_v2_kernel<D_PAD, ATOMIC_DQ, DROPOUT>;
  allow_shared_memory(kernel, S::smem(ATOMIC_DQ));
  kernel<<<grid, S::THREADS, S::smem(ATOMIC_DQ), stream>>>(args, dq_accum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD, bool ATOMIC_DQ>
void launch_backward_pass(const AttentionBackwardArgs<bf16>& args, int batch_heads, float* dq_accum,
                          cudaStream_t stream) {
  if (args.dropout.enabled) launch_backward_pass<D_PAD, ATOMIC_DQ, true>(args, batch_heads, dq_accum, stream);
  else launch_backward_pass<D_PAD, ATOMIC_DQ, false>(args, batch_heads, dq_accum, stream);
}

template <int D_PAD>
void launch_backward(const AttentionBackwardArgs<bf16>& args, int batch_heads, float* dq_accum,
                     cudaStream_t stream) {
  if (dq_accum == nullptr) {  // deterministic: dK and dV here, dQ by version 1's kernel
    launch_backward_pass<D_PAD, false>(args, batch_heads, nullptr, stream);
    attention_backward_dq_bf16(args, batch_heads, stream);
    return;
  }
  launch_backward_pass<D_PAD, true>(args, batch_heads, dq_accum, stream);
  const int64_t quads = int64_t(batch_heads) * args.T * args.D / 4;
  constexpr int CONVERT_THREADS = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(quads, CONVERT_THREADS), int64_t(num_sms()) * 16);
  attention_dq_convert_kernel<<<unsigned(blocks), CONVERT_THREADS, 0, stream>>>(
      args.dq.ptr, dq_accum, quads, args.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool attention_bf16_v2_runs(int D, bool backward, bool atomic_dq) {
  size_t bytes;
  switch (padded_head_dim(D)) {
    case 32: bytes = backward ? BackwardShape<32>::smem(atomic_dq) : ForwardShape<32>::SMEM; break;
    case 64: bytes = backward ? BackwardShape<64>::smem(atomic_dq) : ForwardShape<64>::SMEM; break;
    default:
      if (backward) return false;  // version 1's backward (see the top of the file)
      bytes = ForwardShape<128>::SMEM;
  }
  return bytes <= size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

void attention_forward_bf16_v2(const AttentionForwardArgs<bf16>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_forward<32>(args, batch_heads, stream);
    case 64: return launch_forward<64>(args, batch_heads, stream);
    default: return launch_forward<128>(args, batch_heads, stream);
  }
}

void attention_backward_bf16_v2(const AttentionBackwardArgs<bf16>& args, int batch_heads,
                                float* dq_accum, cudaStream_t stream) {
  TORCH_CHECK(args.D <= 64, "attention_backward_bf16_v2 covers head dims up to 64, got ", args.D);
  if (padded_head_dim(args.D) == 32) launch_backward<32>(args, batch_heads, dq_accum, stream);
  else launch_backward<64>(args, batch_heads, dq_accum, stream);
}

}  // namespace gptk
