// Backward, gy side: gz = gy ⊙ g (the input of the dx and t GEMMs) fused with the column sums
// Σ_rows gy ⊙ (y − b) = g ⊙ Σ_rows gy ⊙ z that give dm (and the exact-norm term of dR).
//
// Deterministic: each block writes the partial sum of its rows (a fixed order within the block),
// then a second pass adds the partials in row-block order. No float atomics.
#include <algorithm>
#include <climits>

#include "convert.cuh"

namespace edora {
namespace {

// A block is one warp wide (32 consecutive columns: coalesced) and 8 warps tall; warp w reads
// rows w, w + 8, ... of the block's row range.
constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kFinalizeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    grad_scale_colsum_kernel(const T* __restrict__ gy,         // n_rows × n_cols
                             const acc_t<T>* __restrict__ g,   // n_cols
                             const T* __restrict__ y,          // n_rows × n_cols, or null
                             const T* __restrict__ bias,       // n_cols, or null
                             int64_t n_rows, int64_t n_cols, int64_t rows_per_block,
                             T* __restrict__ gz,               // n_rows × n_cols, or null
                             acc_t<T>* __restrict__ partial) { // row blocks × n_cols, or null
  using Acc = acc_t<T>;
  __shared__ Acc warp_sums[kThreadsY][kThreadsX];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kThreadsX + tx;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end =
      row_begin + rows_per_block < n_rows ? row_begin + rows_per_block : n_rows;

  // --- gz and this thread's share of the column sum
  Acc sum = 0;
  if (col < n_cols) {
    const Acc gc = g[col];
    const Acc bc = bias != nullptr ? to_acc(bias[col]) : Acc(0);
#pragma unroll 4
    for (int64_t row = row_begin + ty; row < row_end; row += kThreadsY) {
      const int64_t idx = row * n_cols + col;
      const Acc d = to_acc(gy[idx]);
      if (gz != nullptr) gz[idx] = from_acc<T>(d * gc);
      if (partial != nullptr) sum += d * (to_acc(y[idx]) - bc);
    }
  }
  if (partial == nullptr) return;  // the same for the whole block, so no thread waits below

  // --- the block's partial: the 8 warps' sums in warp order
  warp_sums[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < n_cols) {
    Acc total = 0;
#pragma unroll
    for (int w = 0; w < kThreadsY; ++w) total += warp_sums[w][tx];
    partial[int64_t(blockIdx.y) * n_cols + col] = total;
  }
}

// colsum[c] = Σ_b partial[b][c] in b order (0 when there are no partials).
template <typename Acc>
__global__ void __launch_bounds__(kFinalizeThreads)
    colsum_finalize_kernel(const Acc* __restrict__ partial, int64_t n_partial, int64_t n_cols,
                           Acc* __restrict__ colsum) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < n_cols;
       col += stride) {
    Acc total = 0;
    for (int64_t b = 0; b < n_partial; ++b) total += partial[b * n_cols + col];
    colsum[col] = total;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_grad_scale_colsum(const T* gy, const acc_t<T>* g, const T* y, const T* bias,
                                     int64_t n_rows, int64_t n_cols, T* gz, acc_t<T>* partial,
                                     acc_t<T>* colsum, cudaStream_t stream) {
  if (n_cols == 0) return cudaSuccess;
  if (colsum == nullptr) partial = nullptr;
  const int64_t n_partial = colsum_partial_rows(n_rows);
  if (n_rows > 0 && (gz != nullptr || partial != nullptr)) {
    const int64_t col_blocks = ceil_div(n_cols, kThreadsX);
    if (col_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    // n_partial ≤ kColsumMaxBlocks, well inside grid y's 65535.
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(n_partial));
    grad_scale_colsum_kernel<T><<<grid, dim3(kThreadsX, kThreadsY), 0, stream>>>(
        gy, g, y, bias, n_rows, n_cols, colsum_rows_per_block(n_rows), gz, partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (colsum != nullptr) {
    // A grid-stride loop covers any n_cols; 1024 blocks fill every current GPU.
    const int64_t blocks = std::min<int64_t>(ceil_div(n_cols, kFinalizeThreads), 1024);
    colsum_finalize_kernel<acc_t<T>><<<static_cast<unsigned>(blocks), kFinalizeThreads, 0,
                                       stream>>>(partial, n_partial, n_cols, colsum);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

#define EDORA_INSTANTIATE_GRAD(T)                                                             \
  template cudaError_t launch_grad_scale_colsum<T>(const T*, const acc_t<T>*, const T*,       \
                                                   const T*, int64_t, int64_t, T*, acc_t<T>*,  \
                                                   acc_t<T>*, cudaStream_t);
EDORA_INSTANTIATE_GRAD(float)
EDORA_INSTANTIATE_GRAD(double)
EDORA_INSTANTIATE_GRAD(__half)
EDORA_INSTANTIATE_GRAD(__nv_bfloat16)
#undef EDORA_INSTANTIATE_GRAD

}  // namespace edora
