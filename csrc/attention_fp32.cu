// fp32 causal attention on the CUDA cores, FlashAttention-2 style (the math is in
// attention.cu), with exact fp32 products: the accurate path, not the fast one (bf16 is).
//
// One warp per row being produced (a query row for the forward and dQ, a key row for dK/dV)
// and 8 rows per block sharing 32-row tiles of the other operand in shared memory. The two
// kinds of work in a tile use the lanes differently:
// - scores: lane j computes the dot product of the warp's row with tile row j (the warp's
//   row is broadcast from shared memory, tile rows are padded to D_PAD + 1 floats so lane j
//   reading column d hits bank (j + d) % 32: no conflicts);
// - accumulation: lane l owns head dims l, l + 32, ... of the output row and adds
//   p_j * tile[j][d] for every j, with p_j broadcast from lane j by a shuffle.
// Row statistics (max, sum) are warp reductions over the 32 keys of a tile.
#include "attention.cuh"

namespace gptk {
namespace {

constexpr int ROWS = 8;   // output rows per block, one per warp
constexpr int THREADS = ROWS * WARP_SIZE;
constexpr int TILE = 32;  // rows of the shared operand per tile, one per lane

// tile[r][d] = head[row0 + r][d] for r < ROWS_ and d < D_PAD (times `factor`), zero
// outside T x D.
template <int ROWS_, int D_PAD, int STRIDE>
__device__ __forceinline__ void load_rows(float* tile, const float* head, int64_t stride_t,
                                          int row0, int T, int D, float factor = 1.f) {
  for (int i = threadIdx.x; i < ROWS_ * D_PAD; i += blockDim.x) {
    const int r = i / D_PAD, d = i % D_PAD;
    tile[r * STRIDE + d] = row0 + r < T && d < D ? head[(row0 + r) * stride_t + d] * factor : 0.f;
  }
}

template <int D_PAD>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll
  for (int d = 0; d < D_PAD; ++d) s += a[d] * b[d];
  return s;
}

// Head dims owned by each lane in the accumulation.
template <int D_PAD>
constexpr int dims_per_lane() { return (D_PAD + WARP_SIZE - 1) / WARP_SIZE; }

// acc[i] += sum_j coef_j * tile[j][lane + 32 i], coef_j held by lane j.
template <int D_PAD, int STRIDE>
__device__ __forceinline__ void accumulate(float (&acc)[dims_per_lane<D_PAD>()], float coef,
                                           const float* tile) {
  const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll 4
  for (int j = 0; j < TILE; ++j) {
    const float cj = __shfl_sync(FULL_MASK, coef, j);
#pragma unroll
    for (int i = 0; i < dims_per_lane<D_PAD>(); ++i) {
      const int d = lane + WARP_SIZE * i;
      if (d < D_PAD) acc[i] += cj * tile[j * STRIDE + d];
    }
  }
}

template <int D_PAD>
__device__ __forceinline__ void store_row(float* dst, const float (&acc)[dims_per_lane<D_PAD>()],
                                          int D, float factor) {
  const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
  for (int i = 0; i < dims_per_lane<D_PAD>(); ++i) {
    const int d = lane + WARP_SIZE * i;
    if (d < D) dst[d] = acc[i] * factor;
  }
}

template <int D_PAD>
__global__ void __launch_bounds__(THREADS) attention_forward_fp32_kernel(const AttentionForwardArgs<float> args) {
  constexpr int PADDED = D_PAD + 1;
  __shared__ float q_rows[ROWS * D_PAD];  // the block's queries, pre-scaled to base 2
  __shared__ float k_tile[TILE * PADDED];
  __shared__ float v_tile[TILE * D_PAD];
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * ROWS;  // longest rows first
  const int row = q0 + warp;
  const int offset = args.kv_offset();  // query `row` sees keys <= row + offset

  load_rows<ROWS, D_PAD, D_PAD>(q_rows, args.q.head(b, h), args.q.stride_t, q0, T, D, args.scale_log2);
  float acc[dims_per_lane<D_PAD>()] = {};
  float m = -INFINITY, l = 0.f;
  const int last_key = min(q0 + ROWS, T) - 1 + offset;
  for (int k0 = 0; k0 <= last_key; k0 += TILE) {
    __syncthreads();  // q_rows written / the previous tiles consumed
    load_rows<TILE, D_PAD, PADDED>(k_tile, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D);
    load_rows<TILE, D_PAD, D_PAD>(v_tile, args.v.head(b, h), args.v.stride_t, k0, args.T_K, D);
    __syncthreads();
    if (row >= T) continue;  // warp-uniform
    const int key = k0 + lane;
    const float s = key <= row + offset
                        ? dot_row<D_PAD>(q_rows + warp * D_PAD, k_tile + lane * PADDED)
                        : -INFINITY;
    // The first tile holds key 0 <= row + offset, so m_new is finite from then on.
    const float m_new = fmaxf(m, warp_max(s));
    float p = exp2f(s - m_new);
    const float rescale = exp2f(m - m_new);
    l = l * rescale + warp_sum(p);
    if (args.dropout.enabled && key <= row + offset && !dropout_keeps(args.dropout, bh, row, key))
      p = 0.f;  // out of the products, not of the softmax's sum
#pragma unroll
    for (int i = 0; i < dims_per_lane<D_PAD>(); ++i) acc[i] *= rescale;
    accumulate<D_PAD, D_PAD>(acc, p, v_tile);
    m = m_new;
  }
  if (row < T) {
    store_row<D_PAD>(args.out.head(b, h) + row * args.out.stride_t, acc, D,
                     (args.dropout.enabled ? args.dropout.scale : 1.f) / l);
    if (lane == 0) args.lse[int64_t(bh) * T + row] = m + log2f(l);
  }
}

// dQ for 8 queries: dS_j = P_j (dP_j - delta) over the keys j <= row, dQ = scale * sum dS_j k_j.
template <int D_PAD>
__global__ void __launch_bounds__(THREADS) attention_backward_dq_fp32_kernel(const AttentionBackwardArgs<float> args) {
  constexpr int PADDED = D_PAD + 1;
  __shared__ float q_rows[ROWS * D_PAD];
  __shared__ float do_rows[ROWS * D_PAD];
  __shared__ float k_tile[TILE * PADDED];
  __shared__ float v_tile[TILE * PADDED];
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * ROWS;
  const int row = q0 + warp;

  load_rows<ROWS, D_PAD, D_PAD>(q_rows, args.q.head(b, h), args.q.stride_t, q0, T, D, args.scale_log2);
  load_rows<ROWS, D_PAD, D_PAD>(do_rows, args.dout.head(b, h), args.dout.stride_t, q0, T, D);
  const float row_lse = row < T ? args.lse[int64_t(bh) * T + row] : 0.f;
  const float row_delta = row < T ? args.delta[int64_t(bh) * T + row] : 0.f;
  const int offset = args.kv_offset();
  float dq[dims_per_lane<D_PAD>()] = {};
  const int last_key = min(q0 + ROWS, T) - 1 + offset;
  for (int k0 = 0; k0 <= last_key; k0 += TILE) {
    __syncthreads();
    load_rows<TILE, D_PAD, PADDED>(k_tile, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D);
    load_rows<TILE, D_PAD, PADDED>(v_tile, args.v.head(b, h), args.v.stride_t, k0, args.T_K, D);
    __syncthreads();
    if (row >= T) continue;
    const int key = k0 + lane;
    float ds = 0.f;
    if (key <= row + offset) {
      const float p = exp2f(dot_row<D_PAD>(q_rows + warp * D_PAD, k_tile + lane * PADDED) - row_lse);
      float dp = dot_row<D_PAD>(do_rows + warp * D_PAD, v_tile + lane * PADDED);
      if (args.dropout.enabled)  // dP of the dropped probabilities: Z dP
        dp = dropout_keeps(args.dropout, bh, row, key) ? dp * args.dropout.scale : 0.f;
      ds = p * (dp - row_delta);
    }
    accumulate<D_PAD, PADDED>(dq, ds, k_tile);
  }
  if (row < T) store_row<D_PAD>(args.dq.head(b, h) + row * args.dq.stride_t, dq, D, args.scale);
}

// dK and dV for 8 keys: over the queries i >= key, dV = sum P_i dO_i, dK = scale * sum dS_i q_i.
template <int D_PAD>
__global__ void __launch_bounds__(THREADS) attention_backward_dkdv_fp32_kernel(const AttentionBackwardArgs<float> args) {
  constexpr int PADDED = D_PAD + 1;
  __shared__ float k_rows[ROWS * D_PAD];  // pre-scaled to base 2
  __shared__ float v_rows[ROWS * D_PAD];
  __shared__ float q_tile[TILE * PADDED];
  __shared__ float do_tile[TILE * PADDED];
  __shared__ float lse_tile[TILE], delta_tile[TILE];
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const int T = args.T, D = args.D;
  const int bh = blockIdx.x, b = bh / args.H, h = bh % args.H;
  const int k0 = blockIdx.y * ROWS;
  const int key = k0 + warp;

  const int offset = args.kv_offset();  // query i sees keys <= i + offset
  load_rows<ROWS, D_PAD, D_PAD>(k_rows, args.k.head(b, h), args.k.stride_t, k0, args.T_K, D, args.scale_log2);
  load_rows<ROWS, D_PAD, D_PAD>(v_rows, args.v.head(b, h), args.v.stride_t, k0, args.T_K, D);
  float dk[dims_per_lane<D_PAD>()] = {}, dv[dims_per_lane<D_PAD>()] = {};
  for (int q0 = max(k0 - offset, 0) / TILE * TILE; q0 < T; q0 += TILE) {
    __syncthreads();
    load_rows<TILE, D_PAD, PADDED>(q_tile, args.q.head(b, h), args.q.stride_t, q0, T, D);
    load_rows<TILE, D_PAD, PADDED>(do_tile, args.dout.head(b, h), args.dout.stride_t, q0, T, D);
    if (threadIdx.x < TILE) {
      const int i = q0 + threadIdx.x;
      lse_tile[threadIdx.x] = i < T ? args.lse[int64_t(bh) * T + i] : 0.f;
      delta_tile[threadIdx.x] = i < T ? args.delta[int64_t(bh) * T + i] : 0.f;
    }
    __syncthreads();
    if (key >= args.T_K) continue;
    const int query = q0 + lane;
    float p_kept = 0.f, ds = 0.f;
    if (query + offset >= key && query < T) {
      const float p = exp2f(dot_row<D_PAD>(k_rows + warp * D_PAD, q_tile + lane * PADDED) - lse_tile[lane]);
      float dp = dot_row<D_PAD>(v_rows + warp * D_PAD, do_tile + lane * PADDED);
      const bool kept = !args.dropout.enabled || dropout_keeps(args.dropout, bh, query, key);
      p_kept = kept ? p : 0.f;  // dV = (P Z)^T dO, Z's scale at the store
      if (args.dropout.enabled) dp = kept ? dp * args.dropout.scale : 0.f;
      ds = p * (dp - delta_tile[lane]);
    }
    accumulate<D_PAD, PADDED>(dv, p_kept, do_tile);
    accumulate<D_PAD, PADDED>(dk, ds, q_tile);
  }
  if (key < args.T_K) {
    store_row<D_PAD>(args.dk.head(b, h) + key * args.dk.stride_t, dk, D, args.scale);
    store_row<D_PAD>(args.dv.head(b, h) + key * args.dv.stride_t, dv, D,
                     args.dropout.enabled ? args.dropout.scale : 1.f);
  }
}

template <int D_PAD>
void launch_forward(const AttentionForwardArgs<float>& args, int batch_heads, cudaStream_t stream) {
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T, ROWS)));
  attention_forward_fp32_kernel<D_PAD><<<grid, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD>
void launch_backward(const AttentionBackwardArgs<float>& args, int batch_heads, cudaStream_t stream) {
  const dim3 key_grid(unsigned(batch_heads), unsigned(ceil_div(args.T_K, ROWS)));
  attention_backward_dkdv_fp32_kernel<D_PAD><<<key_grid, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(unsigned(batch_heads), unsigned(ceil_div(args.T, ROWS)));
  attention_backward_dq_fp32_kernel<D_PAD><<<grid, THREADS, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void attention_forward_fp32(const AttentionForwardArgs<float>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_forward<32>(args, batch_heads, stream);
    case 64: return launch_forward<64>(args, batch_heads, stream);
    default: return launch_forward<128>(args, batch_heads, stream);
  }
}

void attention_backward_fp32(const AttentionBackwardArgs<float>& args, int batch_heads, cudaStream_t stream) {
  switch (padded_head_dim(args.D)) {
    case 32: return launch_backward<32>(args, batch_heads, stream);
    case 64: return launch_backward<64>(args, batch_heads, stream);
    default: return launch_backward<128>(args, batch_heads, stream);
  }
}

}  // namespace gptk
