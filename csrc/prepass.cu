// The backward's pre-pass (docs/DESIGN.md §4): one launch that reads gy (and y) once.
//
// Row blocks own rows_per_block tokens and take them 32 rows (a tile) at a time. For a tile,
// one sweep over the output columns, 32 columns per step:
//     gz = gy ⊙ g                  in acc_t<T>; stored rounded to T when asked (the dx GEMM's
//                                  operand, or the epilogue op's dy0)
//     t += gz·B                    acc_t<T>, in registers (B's rows staged in shared memory), from
//                                  gz before its rounding: t feeds dR's cancelling sum
//     partial_j += Σ_rows gy ⊙ (y − b)   the column partials for dm (gy ⊙ zbuf[:, slot] for the
//                                  columns of zero magnitudes, whose y carries no z)
// then, from t:
//     u = s·t·R                    rounded to T (the dx GEMM's rank-r operand)
//     dr_part += tᵀ v              the block's partial of dR / s
// Every sum has a fixed order (rows within a thread, then warps, then tiles, all in index
// order), so the partials are the same bits on every run; the finalize sums them in block order.
// Extra blocks past the row blocks write A rounded to T (the dx GEMM's other operand) when A is
// kept in another dtype: no conversion kernel of its own.
#include <climits>

#include "convert.cuh"

namespace edora {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 3;  // three resident blocks per SM (≤ 85 registers, no spills)
constexpr int kWarps = kThreads / 32;
constexpr int kRows = static_cast<int>(kPrepassTileRows);
constexpr int kCols = 32;  // output columns per step of the sweep; ranks per chunk of v
// A thread (ty = warp, tx = lane) owns t and u at rows ty + 8i and ranks tx + 32q.
constexpr int kRowSlots = kRows / kWarps;
constexpr int kRankSlots = static_cast<int>(kMaxRank / 32);
constexpr int kRankPad = static_cast<int>(kMaxRank) + 1;  // +1: stores spread over the banks
static_assert(kCols == 32, "a warp covers one step's columns");

template <typename Acc>
union PrepassSmem {
  struct {                     // the sweep over the columns
    Acc gz[kCols][kRows + 1];  // the step's gz in acc_t<T>, transposed: [column][row]
    Acc b[kCols][kRankPad];    // B's rows for the step's columns
    Acc cs[kWarps][kCols];     // each warp's share of the step's column partials
  } sweep;
  struct {                     // after the sweep
    Acc t[kRows][kRankPad];    // t of the tile's rows
    Acc v[kRows][kCols + 1];   // a 32-rank chunk of v
  } tail;
};

// Adds `value` to the block's partial at p, the first tile storing it.
template <typename Acc>
__device__ __forceinline__ void accumulate(Acc* p, Acc value, bool first) {
  *p = first ? value : *p + value;
}

template <typename T>
__device__ void prepass_tile(const PrepassArgs<T>& a, PrepassSmem<acc_t<T>>& s, int64_t block,
                             int64_t row0, bool first) {
  using Acc = acc_t<T>;
  const int tx = threadIdx.x % 32;
  const int ty = threadIdx.x / 32;
  const int64_t rank = a.rank;
  const bool need_t = a.u != nullptr || a.dr_part != nullptr;
  const bool need_gz = need_t || a.gz != nullptr;
  const bool need_cs = a.cs_part != nullptr;

  Acc t[kRowSlots][kRankSlots] = {};
  for (int64_t col0 = 0; col0 < a.out; col0 += kCols) {
    // --- gy over the step: thread (ty, tx) reads column col0 + tx at rows ty + 8i (a warp reads
    // 32 consecutive columns of a row)
    const int64_t col = col0 + tx;
    const bool col_ok = col < a.out;
    Acc g = 0;
    Acc b = 0;
    int32_t slot = kSlotNone;
    if (col_ok) {
      if (need_gz) g = a.g[col];
      if (need_cs && a.bias != nullptr) b = to_acc(a.bias[col * a.bias_stride]);
      if (need_cs && a.slots != nullptr) slot = a.slots[col];
    }
    Acc part = 0;
#pragma unroll
    for (int i = 0; i < kRowSlots; ++i) {
      const int r = ty + kWarps * i;
      const int64_t row = row0 + r;
      const bool ok = col_ok && row < a.n_rows;
      const Acc dy = ok ? to_acc(a.gy[row * a.gy_stride0 + col * a.gy_stride1]) : Acc(0);
      if (need_gz) {
        const Acc gz = dy * g;  // 0 outside the problem
        if (a.gz != nullptr && ok) a.gz[row * a.out + col] = from_acc<T>(gz);
        if (need_t) s.sweep.gz[tx][r] = gz;
      }
      if (need_cs && ok) {
        const Acc z = slot >= 0 ? to_acc(a.zbuf[row * a.capacity + slot])
                                : to_acc(a.y[row * a.y_stride0 + col * a.y_stride1]) - b;
        part += dy * z;
      }
    }
    if (need_cs) s.sweep.cs[ty][tx] = part;
    // --- B's rows for the step, 0 past `out` (a warp reads along B's rows)
    if (need_t) {
      for (int64_t e = threadIdx.x; e < kCols * rank; e += kThreads) {
        const int k = static_cast<int>(e / rank);
        const int c = static_cast<int>(e % rank);
        const int64_t j = col0 + k;
        s.sweep.b[k][c] = j < a.out ? load_at<Acc>(a.B, j, c) : Acc(0);
      }
    }
    __syncthreads();

    // --- the column partials: the warps' shares in warp order, added to the earlier tiles'
    if (need_cs && ty == 0 && col_ok) {
      Acc total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += s.sweep.cs[w][tx];
      accumulate(a.cs_part + block * a.out + col, total, first);
    }
    // --- t += gz·B over the step (ranks past `rank` are computed and never used)
    if (need_t) {
#pragma unroll 4
      for (int kk = 0; kk < kCols; ++kk) {
        Acc gv[kRowSlots];
        Acc bv[kRankSlots];
#pragma unroll
        for (int i = 0; i < kRowSlots; ++i) gv[i] = s.sweep.gz[kk][ty + kWarps * i];
#pragma unroll
        for (int q = 0; q < kRankSlots; ++q) bv[q] = s.sweep.b[kk][tx + 32 * q];
#pragma unroll
        for (int i = 0; i < kRowSlots; ++i) {
#pragma unroll
          for (int q = 0; q < kRankSlots; ++q) t[i][q] += gv[i] * bv[q];
        }
      }
    }
    __syncthreads();
  }
  if (!need_t) return;

  // --- t into shared memory (the sweep's tiles are free: the loop ended on a barrier)
#pragma unroll
  for (int i = 0; i < kRowSlots; ++i) {
#pragma unroll
    for (int q = 0; q < kRankSlots; ++q) {
      const int c = tx + 32 * q;
      if (c < rank) s.tail.t[ty + kWarps * i][c] = t[i][q];
    }
  }
  __syncthreads();

  // --- u = s·t R for the thread's rows and ranks (R's rows from L1)
  if (a.u != nullptr) {
    Acc acc[kRowSlots][kRankSlots] = {};
    for (int64_t k = 0; k < rank; ++k) {
      Acc rv[kRankSlots];
      Acc tv[kRowSlots];
#pragma unroll
      for (int q = 0; q < kRankSlots; ++q) {
        const int64_t c = tx + 32 * q;
        rv[q] = c < rank ? load_at<Acc>(a.R, k, c) : Acc(0);
      }
#pragma unroll
      for (int i = 0; i < kRowSlots; ++i) tv[i] = s.tail.t[ty + kWarps * i][k];
#pragma unroll
      for (int i = 0; i < kRowSlots; ++i) {
#pragma unroll
        for (int q = 0; q < kRankSlots; ++q) acc[i][q] += tv[i] * rv[q];
      }
    }
    const Acc scaling = static_cast<Acc>(a.scaling);
#pragma unroll
    for (int i = 0; i < kRowSlots; ++i) {
      const int64_t row = row0 + ty + kWarps * i;
#pragma unroll
      for (int q = 0; q < kRankSlots; ++q) {
        const int64_t c = tx + 32 * q;
        if (row < a.n_rows && c < rank) a.u[row * rank + c] = from_acc<T>(scaling * acc[i][q]);
      }
    }
  }

  // --- dr_part (+)= tᵀ v over the tile's rows (in row order), 32 ranks of v at a time
  if (a.dr_part != nullptr) {
    for (int64_t b0 = 0; b0 < rank; b0 += kCols) {
      for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
        const int r = e / kCols;
        const int c = e % kCols;
        const int64_t row = row0 + r;
        s.tail.v[r][c] = (row < a.n_rows && b0 + c < rank) ? a.v[row * rank + b0 + c] : Acc(0);
      }
      __syncthreads();
      const int64_t c = b0 + tx;
      for (int64_t k = ty; k < rank; k += kWarps) {
        Acc sum = 0;
#pragma unroll 8
        for (int r = 0; r < kRows; ++r) sum += s.tail.t[r][k] * s.tail.v[r][tx];
        if (c < rank) accumulate(a.dr_part + (block * rank + k) * rank + c, sum, first);
      }
      __syncthreads();
    }
  }
  __syncthreads();  // the next tile's sweep overwrites t
}

// A rounded to T, by blocks past the row blocks (a grid-stride loop over rank × in).
template <typename T>
__device__ void convert_A(const PrepassArgs<T>& a, int64_t block, int64_t blocks) {
  const int64_t total = a.rank * a.in;
  for (int64_t e = block * kThreads + threadIdx.x; e < total; e += blocks * kThreads) {
    a.a_cast[e] = from_double<T>(load_at<double>(a.A, e / a.in, e % a.in));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    prepass_kernel(const PrepassArgs<T> a, int64_t row_blocks) {
  __shared__ PrepassSmem<acc_t<T>> smem;
  const int64_t block = blockIdx.x;
  if (block >= row_blocks) {
    convert_A(a, block - row_blocks, int64_t(gridDim.x) - row_blocks);
    return;
  }
  const int64_t first = block * a.rows_per_block;
  const int64_t end = first + a.rows_per_block < a.n_rows ? first + a.rows_per_block : a.n_rows;
  for (int64_t row0 = first; row0 < end; row0 += kRows) {
    prepass_tile(a, smem, block, row0, row0 == first);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_prepass(const PrepassArgs<T>& a, cudaStream_t stream) {
  if (a.rank < 1 || a.rank > kMaxRank) return cudaErrorInvalidValue;
  if (a.rows_per_block < kRows || a.rows_per_block % kRows != 0) return cudaErrorInvalidValue;
  const bool row_work =
      a.gz != nullptr || a.u != nullptr || a.cs_part != nullptr || a.dr_part != nullptr;
  const int64_t row_blocks = row_work ? prepass_row_blocks(a.n_rows, a.rows_per_block) : 0;
  // About 8 elements of A per thread, at most 1024 blocks.
  const int64_t total = a.rank * a.in;
  int64_t convert_blocks = a.a_cast != nullptr ? ceil_div(total, kThreads * 8) : 0;
  if (convert_blocks > 1024) convert_blocks = 1024;
  const int64_t blocks = row_blocks + convert_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  prepass_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, row_blocks);
  return cudaGetLastError();
}

template cudaError_t launch_prepass<float>(const PrepassArgs<float>&, cudaStream_t);
template cudaError_t launch_prepass<double>(const PrepassArgs<double>&, cudaStream_t);
template cudaError_t launch_prepass<__half>(const PrepassArgs<__half>&, cudaStream_t);
template cudaError_t launch_prepass<__nv_bfloat16>(const PrepassArgs<__nv_bfloat16>&,
                                                   cudaStream_t);

}  // namespace edora
