// The forward's prologue (docs/DESIGN.md §4): one launch, two kinds of blocks.
//
// - Gate blocks, 32 output rows each, one warp per row: P_j = B_j R, the row norm
//   n_j² = c0_j + 2s·P_j·C_j + s²·(P_j G)·P_j in double (clamped at 1e-24), g_j = m_j / n_j, and
//   the slot of each zero magnitude: the number of zeros in earlier columns, which every block
//   counts from m itself (a block-wide count, then one warp ballot over its 32 rows), so no block
//   waits for another and no atomics are needed.
// - Row blocks, 32 tokens each: the skinny GEMM v = x Aᵀ, accumulated in acc_t<T>; each block
//   streams its rows of x once over `in`, A's slice through shared memory beside it.
//
// The two are independent, so one launch serves both; the rescale then reads P, g and v.
#include <climits>

#include "convert.cuh"

namespace edora {
namespace {

constexpr int kThreads = 256;
// Three blocks per SM: without the bound nvcc caps the registers at 64 and spills.
constexpr int kMinBlocks = 3;
constexpr int kWarps = kThreads / 32;
constexpr int kGateRows = 32;  // one ballot covers a gate block's rows
constexpr int kRows = 32;      // tokens per row block
constexpr int kK = 32;         // input columns per step of the row blocks
// A row block's thread (ty = warp, tx = lane) owns v at rows ty + 8i and ranks tx + 32q.
constexpr int kRowSlots = kRows / kWarps;
constexpr int kRankSlots = static_cast<int>(kMaxRank / 32);

// The two kinds of blocks never run the same code, so their tiles share the memory.
template <typename Acc>
union PrologueSmem {
  struct {
    double p[kWarps][kMaxRank];  // each warp's row of P
  } gate;
  struct {
    Acc x[kK][kRows + 1];       // x tile, transposed; +1 spreads the stores over the banks
    Acc a[kK][kMaxRank + 1];    // A tile, transposed
  } rows;
};

__device__ __forceinline__ bool is_zero(const AnyMatrix& m, int64_t j) {
  return load_at<double>(m, j, 0) == 0.0;
}

template <typename T>
__device__ void gate_block(const PrologueArgs<T>& a, int64_t block, double (*p_rows)[kMaxRank]) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = block * kGateRows;
  const int64_t rank = a.rank;
  const double s = a.scaling;
  double* p = p_rows[warp];

  for (int i = warp; i < kGateRows; i += kWarps) {
    const int64_t j = row0 + i;
    if (j >= a.out) break;  // the same for the whole warp

    // --- P_j = B_j R, one rank per lane, summed in rank order
    for (int64_t c = lane; c < rank; c += 32) {
      double acc = 0.0;
      for (int64_t k = 0; k < rank; ++k) {
        acc += load_at<double>(a.B, j, k) * load_at<double>(a.R, k, c);
      }
      p[c] = acc;
      a.P[j * rank + c] = acc;
    }
    __syncwarp();

    // --- the lanes' shares of P_j·C_j and (P_j G)·P_j, then the warp's sums
    double pc = 0.0;
    double pgp = 0.0;
    for (int64_t c = lane; c < rank; c += 32) {
      double pg = 0.0;
      for (int64_t k = 0; k < rank; ++k) pg += p[k] * load_at(a.G, k, c);
      pc += p[c] * load_at(a.C, j, c);
      pgp += pg * p[c];
    }
    pc = warp_sum(pc);
    pgp = warp_sum(pgp);
    if (lane == 0) {
      double n_sq = a.c0[j * a.c0_stride] + (2.0 * s) * pc + (s * s) * pgp;
      n_sq = n_sq < kNormSqFloor ? kNormSqFloor : n_sq;  // NaN stays NaN, as torch's clamp
      const double n = sqrt(n_sq);
      a.n[j] = n;
      a.g[j] = static_cast<Acc>(load_at<double>(a.m, j, 0) / n);
    }
    __syncwarp();  // every lane has read p before the next row overwrites it
  }

  // --- slots: the k-th zero magnitude (column order) takes slot k while slots last
  if (a.slots == nullptr) return;  // the same for the whole block
  int64_t before = 0;              // zeros in the columns before this block
  for (int64_t base = 0; base < row0; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    before += __syncthreads_count(i < row0 && is_zero(a.m, i));
  }
  if (warp == 0) {
    const int64_t j = row0 + lane;
    const bool zero = j < a.out && is_zero(a.m, j);
    const unsigned zeros = __ballot_sync(kFullMask, zero);
    const int64_t order = before + __popc(zeros & ((1u << lane) - 1u));
    if (j < a.out) {
      a.slots[j] = zero ? (order < a.capacity ? static_cast<int32_t>(order) : kSlotFull)
                        : kSlotNone;
    }
  }
}

template <typename T>
__device__ void rows_block(const PrologueArgs<T>& a, int64_t block,
                           acc_t<T> (*xs)[kRows + 1], acc_t<T> (*as)[kMaxRank + 1]) {
  using Acc = acc_t<T>;
  const int tx = threadIdx.x % 32;
  const int ty = threadIdx.x / 32;
  const int64_t row0 = block * kRows;
  const int64_t rank = a.rank;

  Acc acc[kRowSlots][kRankSlots] = {};
  for (int64_t k0 = 0; k0 < a.in; k0 += kK) {
    // --- x's and A's slices; a warp reads 32 consecutive input columns (coalesced), entries
    // past the edges load as 0
    for (int e = threadIdx.x; e < kRows * kK; e += kThreads) {
      const int r = e / kK;
      const int k = e % kK;
      const int64_t row = row0 + r;
      const int64_t col = k0 + k;
      xs[k][r] = (row < a.n_rows && col < a.in)
                     ? to_acc(a.x[row * a.x_stride0 + col * a.x_stride1])
                     : Acc(0);
    }
    for (int64_t e = threadIdx.x; e < rank * kK; e += kThreads) {
      const int c = static_cast<int>(e / kK);
      const int k = static_cast<int>(e % kK);
      const int64_t col = k0 + k;
      as[k][c] = col < a.in ? load_at<Acc>(a.A, c, col) : Acc(0);
    }
    __syncthreads();

    // --- acc += x·Aᵀ over the slice (ranks past `rank` are computed and never stored)
#pragma unroll 4
    for (int kk = 0; kk < kK; ++kk) {
      Acc xv[kRowSlots];
      Acc av[kRankSlots];
#pragma unroll
      for (int i = 0; i < kRowSlots; ++i) xv[i] = xs[kk][ty + kWarps * i];
#pragma unroll
      for (int q = 0; q < kRankSlots; ++q) av[q] = as[kk][tx + 32 * q];
#pragma unroll
      for (int i = 0; i < kRowSlots; ++i) {
#pragma unroll
        for (int q = 0; q < kRankSlots; ++q) acc[i][q] += xv[i] * av[q];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRowSlots; ++i) {
    const int64_t row = row0 + ty + kWarps * i;
#pragma unroll
    for (int q = 0; q < kRankSlots; ++q) {
      const int64_t c = tx + 32 * q;
      if (row < a.n_rows && c < rank) a.v[row * rank + c] = acc[i][q];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    prologue_kernel(const PrologueArgs<T> a, int64_t gate_blocks) {
  __shared__ PrologueSmem<acc_t<T>> smem;
  const int64_t block = blockIdx.x;
  if (block < gate_blocks) {
    gate_block(a, block, smem.gate.p);
  } else {
    rows_block(a, block - gate_blocks, smem.rows.x, smem.rows.a);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_prologue(const PrologueArgs<T>& a, cudaStream_t stream) {
  if (a.rank < 1 || a.rank > kMaxRank) return cudaErrorInvalidValue;
  const int64_t gate_blocks = ceil_div(a.out, kGateRows);
  const int64_t row_blocks = ceil_div(a.n_rows, kRows);
  const int64_t blocks = gate_blocks + row_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  prologue_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, gate_blocks);
  return cudaGetLastError();
}

template cudaError_t launch_prologue<float>(const PrologueArgs<float>&, cudaStream_t);
template cudaError_t launch_prologue<double>(const PrologueArgs<double>&, cudaStream_t);
template cudaError_t launch_prologue<__half>(const PrologueArgs<__half>&, cudaStream_t);
template cudaError_t launch_prologue<__nv_bfloat16>(const PrologueArgs<__nv_bfloat16>&,
                                                    cudaStream_t);

}  // namespace edora
