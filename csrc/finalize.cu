// The backward's finalize (docs/DESIGN.md §4): the pre-pass's partials summed in block order,
// in double, into dm and dR.
//
// - Column blocks, one thread per output column j:
//       colsum_j = Σ_p cs_part[p, j]                      (= g_j S_j, or S_j for a slot column)
//       S_j = colsum_j·n_j/m_j where m_j ≠ 0;  colsum_j for a slot column;  NaN past the slots
//       dm_j = S_j / n_j                                  (the magnitude's dtype)
//   and, when the norm is not detached, the block's share of the norm's gradient,
//       share = Σ_{j in block} B_jᵀ ⊗ coef_j (s C_j + s² (P G)_j),   coef_j = −m_j S_j / n_j³.
// - dR blocks, one thread per entry: dR = s·Σ_p dr_part[p] (+ Σ_q share[q] in the separate
//   finalize_exact launch, once every column block has written its share).
//
// Fixed-order sums, no atomics: dm and dR are the same bits on every run.
#include <climits>

#include "convert.cuh"

namespace edora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankSlots = static_cast<int>(kMaxRank / 32);
constexpr int kShareCols = static_cast<int>(kFinalizeExactCols);

// dR's entry e (of rank²): s·Σ_p dr_part[p][e] + Σ_q shares[q][e], in double, in index order.
template <typename Acc>
__device__ double dR_entry(const Acc* dr_part, int64_t parts, const double* shares,
                           int64_t n_shares, int64_t entries, int64_t e, double scaling) {
  double acc = 0.0;
  for (int64_t p = 0; p < parts; ++p) acc += static_cast<double>(dr_part[p * entries + e]);
  acc *= scaling;
  for (int64_t q = 0; q < n_shares; ++q) acc += shares[q * entries + e];
  return acc;
}

template <typename Acc>
__device__ void column_block(const FinalizeArgs<Acc>& a, int64_t block, int64_t width_max,
                             double* coef, double (*grad_p)[kMaxRank + 1]) {
  const int64_t col0 = block * width_max;
  const int64_t width = a.out - col0 < width_max ? a.out - col0 : width_max;
  const int64_t rank = a.rank;

  // --- S and dm, one column per thread
  for (int64_t l = threadIdx.x; l < width; l += kThreads) {
    const int64_t j = col0 + l;
    double colsum = 0.0;
    for (int64_t p = 0; p < a.parts; ++p) colsum += static_cast<double>(a.cs_part[p * a.out + j]);
    const double m = load_at<double>(a.m, j, 0);
    const double n = a.n[j];
    double S = colsum * n / (m == 0.0 ? 1.0 : m);  // colsum = g ⊙ S
    if (a.slots != nullptr) {
      const int32_t slot = a.slots[j];
      if (slot >= 0) S = colsum;  // these columns summed gy ⊙ z itself
      if (slot == kSlotFull) S = nan("");
    }
    if (a.dm.data != nullptr) store_any(a.dm, j, S / n);
    if (a.shares != nullptr) {
      const double grad_n = -m * S / (n * n);  // ∂L/∂n_j
      coef[l] = grad_n / n;
    }
  }
  if (a.shares == nullptr) return;  // the same for the whole block
  __syncthreads();

  // --- ∂L/∂P_j through the norm for the block's columns: coef_j (s C_j + s² (P G)_j)
  const double s = a.scaling;
  for (int64_t e = threadIdx.x; e < width * rank; e += kThreads) {
    const int64_t l = e / rank;
    const int64_t c = e % rank;
    const int64_t j = col0 + l;
    double pg = 0.0;
    for (int64_t k = 0; k < rank; ++k) pg += a.P[j * rank + k] * load_at(a.G, k, c);
    grad_p[l][c] = coef[l] * (s * load_at(a.C, j, c) + (s * s) * pg);
  }
  __syncthreads();

  // --- the block's share of dR, Bᵀ ∂L/∂P over its columns (in column order): warp w takes
  // rows w, w + 8, ... of the share, lane the ranks lane + 32q
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  double* share = a.shares + block * rank * rank;
  for (int64_t r = warp; r < rank; r += kWarps) {
    double acc[kRankSlots] = {};
    for (int64_t l = 0; l < width; ++l) {
      const double b = load_at<double>(a.B, col0 + l, r);
#pragma unroll
      for (int q = 0; q < kRankSlots; ++q) acc[q] += b * grad_p[l][lane + 32 * q];
    }
#pragma unroll
    for (int q = 0; q < kRankSlots; ++q) {
      const int64_t c = lane + 32 * q;
      if (c < rank) share[r * rank + c] = acc[q];
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const FinalizeArgs<Acc> a, int64_t column_blocks, int64_t width) {
  __shared__ double coef[kShareCols];
  __shared__ double grad_p[kShareCols][kMaxRank + 1];
  const int64_t block = blockIdx.x;
  if (block < column_blocks) {
    column_block(a, block, width, coef, grad_p);
    return;
  }
  const int64_t entries = a.rank * a.rank;
  const int64_t e = (block - column_blocks) * kThreads + threadIdx.x;
  if (e < entries) {
    store_any(a.dR, e, dR_entry(a.dr_part, a.parts, static_cast<const double*>(nullptr), 0,
                                entries, e, a.scaling));
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    finalize_exact_kernel(const Acc* __restrict__ dr_part, int64_t parts,
                          const double* __restrict__ shares, int64_t n_shares, int64_t rank,
                          double scaling, AnyOut dR) {
  const int64_t entries = rank * rank;
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e < entries) {
    store_any(dR, e, dR_entry(dr_part, parts, shares, n_shares, entries, e, scaling));
  }
}

}  // namespace

template <typename Acc>
cudaError_t launch_finalize(const FinalizeArgs<Acc>& a, cudaStream_t stream) {
  if (a.rank < 1 || a.rank > kMaxRank) return cudaErrorInvalidValue;
  // With shares, dR waits for every column block: launch_finalize_exact writes it.
  if (a.shares != nullptr && a.dR.data != nullptr) return cudaErrorInvalidValue;
  const bool columns = a.dm.data != nullptr || a.shares != nullptr;
  const int64_t width = a.shares != nullptr ? kFinalizeExactCols : kFinalizeCols;
  const int64_t column_blocks = columns ? ceil_div(a.out, width) : 0;
  const int64_t dr_blocks = a.dR.data != nullptr ? ceil_div(a.rank * a.rank, kThreads) : 0;
  const int64_t blocks = column_blocks + dr_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  finalize_kernel<Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a, column_blocks, width);
  return cudaGetLastError();
}

template <typename Acc>
cudaError_t launch_finalize_exact(const Acc* dr_part, int64_t parts, const double* shares,
                                  int64_t n_shares, int64_t rank, double scaling, AnyOut dR,
                                  cudaStream_t stream) {
  if (rank < 1 || rank > kMaxRank) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(rank * rank, kThreads);
  finalize_exact_kernel<Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      dr_part, parts, shares, n_shares, rank, scaling, dR);
  return cudaGetLastError();
}

template cudaError_t launch_finalize<float>(const FinalizeArgs<float>&, cudaStream_t);
template cudaError_t launch_finalize<double>(const FinalizeArgs<double>&, cudaStream_t);
template cudaError_t launch_finalize_exact<float>(const float*, int64_t, const double*, int64_t,
                                                  int64_t, double, AnyOut, cudaStream_t);
template cudaError_t launch_finalize_exact<double>(const double*, int64_t, const double*,
                                                   int64_t, int64_t, double, AnyOut,
                                                   cudaStream_t);

}  // namespace edora
