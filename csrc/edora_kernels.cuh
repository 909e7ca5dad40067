// Launchers of the hand-written EDoRA kernels: plain pointers, sizes and a stream, no torch.
//
// Matrices are row-major and contiguous. T is float, __half, __nv_bfloat16 or double; sums and
// the epilogue arithmetic run in acc_t<T> (double for double, float otherwise), and P, g, the
// column sums and their workspace are in that type too. Each launcher returns the launch error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace edora {

template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

// Fused epilogue, per element of the n_rows × n_cols output (base and v: N×out and N×r, P: out×r):
//     y = g ⊙ (base − [b] + s·v Pᵀ) + b.
// `bias` may be null; it is subtracted from base only with `subtract_bias` (base = y0 = x W0ᵀ + b).
// `y` may be the `base` buffer itself: every element is read and then written by the same thread.
template <typename T>
cudaError_t launch_rescale(const T* base, const T* v, const acc_t<T>* P, const acc_t<T>* g,
                           const T* bias, bool subtract_bias, acc_t<T> scaling, int64_t n_rows,
                           int64_t n_cols, int64_t rank, T* y, cudaStream_t stream);

// The column sums are reduced in two fixed-order passes: one partial sum per block of rows, then
// the partials in row-block order. Rows per block depend on n_rows only, never on the device, so
// the result is the same bit for bit on every run. At most kColsumMaxBlocks partial rows are
// kept, which bounds the workspace to kColsumMaxBlocks × n_cols accumulators.
constexpr int64_t kColsumMinRowsPerBlock = 64;
constexpr int64_t kColsumMaxBlocks = 256;

inline int64_t colsum_rows_per_block(int64_t n_rows) {
  const int64_t spread = (n_rows + kColsumMaxBlocks - 1) / kColsumMaxBlocks;
  return spread > kColsumMinRowsPerBlock ? spread : kColsumMinRowsPerBlock;
}

// Rows of the `partial` workspace that launch_grad_scale_colsum needs (times n_cols).
inline int64_t colsum_partial_rows(int64_t n_rows) {
  const int64_t per_block = colsum_rows_per_block(n_rows);
  return (n_rows + per_block - 1) / per_block;
}

// Backward, gy side (gy and the forward's output y: n_rows × n_cols; bias: n_cols or null):
//     gz = gy ⊙ g                     when `gz` is not null (the input of the dx and t GEMMs),
//     colsum = Σ_rows gy ⊙ (y − b)    when `colsum` is not null, with `partial` a workspace of
//                                     colsum_partial_rows(n_rows) × n_cols accumulators.
template <typename T>
cudaError_t launch_grad_scale_colsum(const T* gy, const acc_t<T>* g, const T* y, const T* bias,
                                     int64_t n_rows, int64_t n_cols, T* gz, acc_t<T>* partial,
                                     acc_t<T>* colsum, cudaStream_t stream);

}  // namespace edora
