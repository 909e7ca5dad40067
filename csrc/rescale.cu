// Fused epilogue of the EDoRA forward: y = g ⊙ (base − [b] + s·v Pᵀ) + b.
//
// base is x W0ᵀ (from cuBLAS) or y0 = base_layer(x). The rank-r term is a dot of length r per
// output element; it is computed as a small tiled GEMM so that v and P are read once per tile
// instead of once per element, and it never goes through the output dtype: y is rounded once,
// from fp32 (fp64 for double). z is not stored: backward reads y (docs/DESIGN.md §3).
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
__global__ void __launch_bounds__(kThreads)
    rescale_kernel(const T* base,                       // n_rows × n_cols, may alias y
                   const T* __restrict__ v,             // n_rows × rank
                   const acc_t<T>* __restrict__ P,      // n_cols × rank
                   const acc_t<T>* __restrict__ g,      // n_cols
                   const T* __restrict__ bias,          // n_cols or null
                   bool subtract_bias, acc_t<T> scaling, int64_t n_rows, int64_t n_cols,
                   int64_t rank,
                   T* y) {                              // n_rows × n_cols
  using Acc = acc_t<T>;
  // The +1 column spreads the P tile's column reads (one per thread of a warp) over the banks.
  __shared__ Acc v_tile[kRows][kK + 1];
  __shared__ Acc p_tile[kCols][kK + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t col0 = int64_t(blockIdx.y) * kCols;

  // --- acc = v Pᵀ over the tile; entries past n_rows, n_cols or rank load as 0
  Acc acc[kRowsPerThread][kColsPerThread] = {};
  for (int64_t k0 = 0; k0 < rank; k0 += kK) {
    // Thread (tx, ty) loads rank k0 + tx of rows ty, ty + 8, ...: a warp reads along a row.
    const int64_t k = k0 + tx;
#pragma unroll
    for (int r = ty; r < kRows; r += kThreadsY) {
      const int64_t row = row0 + r;
      v_tile[r][tx] = (row < n_rows && k < rank) ? to_acc(v[row * rank + k]) : Acc(0);
    }
#pragma unroll
    for (int c = ty; c < kCols; c += kThreadsY) {
      const int64_t col = col0 + c;
      p_tile[c][tx] = (col < n_cols && k < rank) ? P[col * rank + k] : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kK; ++kk) {
      Acc p[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) p[c] = p_tile[tx + c * kThreadsX][kk];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const Acc a = v_tile[ty + q * kThreadsY][kk];
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[q][c] += a * p[c];
      }
    }
    __syncthreads();
  }

  // --- y = g ⊙ (base − b + s·acc) + b
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t row = row0 + ty + q * kThreadsY;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int64_t col = col0 + tx + c * kThreadsX;
      if (row >= n_rows || col >= n_cols) continue;
      const int64_t idx = row * n_cols + col;
      const Acc b = bias != nullptr ? to_acc(bias[col]) : Acc(0);
      Acc zv = to_acc(base[idx]);
      if (subtract_bias) zv -= b;
      zv += scaling * acc[q][c];
      y[idx] = from_acc<T>(g[col] * zv + b);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_rescale(const T* base, const T* v, const acc_t<T>* P, const acc_t<T>* g,
                           const T* bias, bool subtract_bias, acc_t<T> scaling, int64_t n_rows,
                           int64_t n_cols, int64_t rank, T* y, cudaStream_t stream) {
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  // Rows go on grid x (up to 2^31 − 1 blocks), columns on grid y (up to 65535).
  const int64_t row_blocks = ceil_div(n_rows, kRows);
  const int64_t col_blocks = ceil_div(n_cols, kCols);
  if (row_blocks > INT_MAX || col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  rescale_kernel<T><<<grid, dim3(kThreadsX, kThreadsY), 0, stream>>>(
      base, v, P, g, bias, subtract_bias, scaling, n_rows, n_cols, rank, y);
  return cudaGetLastError();
}

#define EDORA_INSTANTIATE_RESCALE(T)                                                          \
  template cudaError_t launch_rescale<T>(const T*, const T*, const acc_t<T>*, const acc_t<T>*, \
                                         const T*, bool, acc_t<T>, int64_t, int64_t, int64_t,  \
                                         T*, cudaStream_t);
EDORA_INSTANTIATE_RESCALE(float)
EDORA_INSTANTIATE_RESCALE(double)
EDORA_INSTANTIATE_RESCALE(__half)
EDORA_INSTANTIATE_RESCALE(__nv_bfloat16)
#undef EDORA_INSTANTIATE_RESCALE

}  // namespace edora
