// The forward's rescale: y = g ⊙ (base − [b] + s·v Pᵀ) + b, keeping the z columns of zero
// magnitudes.
//
// base is x W0ᵀ (from cuBLAS, overwritten in place) or y0 = base_layer(x) (read, any strides).
// The rank-r term is a dot of length r per output element, computed as a small tiled GEMM so
// that v and P are read once per tile instead of once per element; it never goes through the
// output dtype: z stays in acc_t<T> and y is rounded once. Where m_j = 0, g_j = 0 and y_j = b_j
// keeps no trace of z_j, which dm_j needs: those columns' z (rounded to T) go to their slots of
// zbuf (docs/DESIGN.md §3). Backward reads y, not z.
#include <climits>

#include "convert.cuh"

namespace edora {
namespace {

// One block of 32 × 8 threads owns a kRows × kCols output tile, each thread kRows/8 rows (stride
// 8) and kCols/32 columns (stride 32, so a warp touches consecutive columns: coalesced).
// v and P pass through shared memory kK ranks at a time.
constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kRows = 32;
constexpr int kCols = 64;
constexpr int kK = 32;
constexpr int kRowsPerThread = kRows / kThreadsY;
constexpr int kColsPerThread = kCols / kThreadsX;
static_assert(kK == kThreadsX, "one rank per thread of a warp when loading the tiles");

template <typename T>
__global__ void __launch_bounds__(kThreads) rescale_kernel(const RescaleArgs<T> a) {
  using Acc = acc_t<T>;
  // The +1 column spreads the P tile's column reads (one per thread of a warp) over the banks.
  __shared__ Acc v_tile[kRows][kK + 1];
  __shared__ Acc p_tile[kCols][kK + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t col0 = int64_t(blockIdx.y) * kCols;
  const int64_t rank = a.rank;

  // --- acc = v Pᵀ over the tile; entries past n_rows, n_cols or rank load as 0
  Acc acc[kRowsPerThread][kColsPerThread] = {};
  for (int64_t k0 = 0; k0 < rank; k0 += kK) {
    // Thread (tx, ty) loads rank k0 + tx of rows ty, ty + 8, ...: a warp reads along a row.
    const int64_t k = k0 + tx;
#pragma unroll
    for (int r = ty; r < kRows; r += kThreadsY) {
      const int64_t row = row0 + r;
      v_tile[r][tx] = (row < a.n_rows && k < rank) ? a.v[row * rank + k] : Acc(0);
    }
#pragma unroll
    for (int c = ty; c < kCols; c += kThreadsY) {
      const int64_t col = col0 + c;
      p_tile[c][tx] = (col < a.n_cols && k < rank) ? static_cast<Acc>(a.P[col * rank + k])
                                                   : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kK; ++kk) {
      Acc p[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) p[c] = p_tile[tx + c * kThreadsX][kk];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const Acc v = v_tile[ty + q * kThreadsY][kk];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[q][c] += v * p[c];
      }
    }
    __syncthreads();
  }

  // --- z = base − b + s·acc (kept in its slot where m = 0), y = g ⊙ z + b
  const Acc scaling = static_cast<Acc>(a.scaling);
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t col = col0 + tx + c * kThreadsX;
    if (col >= a.n_cols) continue;
    const Acc b = a.bias != nullptr ? to_acc(a.bias[col * a.bias_stride]) : Acc(0);
    const Acc g = a.g[col];
    const int32_t slot = a.slots != nullptr ? a.slots[col] : kSlotNone;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t row = row0 + ty + q * kThreadsY;
      if (row >= a.n_rows) continue;
      Acc z = to_acc(a.base[row * a.base_stride0 + col * a.base_stride1]);
      if (a.subtract_bias) z -= b;
      z += scaling * acc[q][c];
      if (slot >= 0) a.zbuf[row * a.capacity + slot] = from_acc<T>(z);
      a.y[row * a.n_cols + col] = from_acc<T>(g * z + b);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_rescale(const RescaleArgs<T>& a, cudaStream_t stream) {
  if (a.n_rows == 0 || a.n_cols == 0) return cudaSuccess;
  // Rows go on grid x (up to 2^31 − 1 blocks), columns on grid y (up to 65535).
  const int64_t row_blocks = ceil_div(a.n_rows, kRows);
  const int64_t col_blocks = ceil_div(a.n_cols, kCols);
  if (row_blocks > INT_MAX || col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  rescale_kernel<T><<<grid, dim3(kThreadsX, kThreadsY), 0, stream>>>(a);
  return cudaGetLastError();
}

template cudaError_t launch_rescale<float>(const RescaleArgs<float>&, cudaStream_t);
template cudaError_t launch_rescale<double>(const RescaleArgs<double>&, cudaStream_t);
template cudaError_t launch_rescale<__half>(const RescaleArgs<__half>&, cudaStream_t);
template cudaError_t launch_rescale<__nv_bfloat16>(const RescaleArgs<__nv_bfloat16>&,
                                                   cudaStream_t);

}  // namespace edora
