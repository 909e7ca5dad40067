// Launchers of the hand-written EDoRA kernels: plain pointers, sizes and a stream, no torch.
//
// One training step of the `cuda` backend (docs/DESIGN.md §4, csrc/README.md):
//   forward   prologue (gate + v = x Aᵀ) → cuBLAS x W0ᵀ → rescale (y in place, zero-magnitude z)
//   backward  prepass (gz, u, partials) → cuBLAS gz W0 (+ u A) → finalize (dm, dR)
//             [→ finalize_exact (dR with the norm's share) when the norm is not detached]
//
// T is the activations' element type (x, y, gy, W0's products): float, __half, __nv_bfloat16 or
// double. Sums over tokens and the epilogue arithmetic run in acc_t<T> (double for double, float
// otherwise); everything O(out·r²) (P, n, g, dm, dR, the norm's share) in double. The adapter
// tensors A, B, R and the magnitude may be any of the four float types, independently of T and
// of each other: they are passed as AnyMatrix (pointer, dtype tag, strides) and converted on
// load. Each launcher returns the launch error (cudaSuccess when there is nothing to launch).
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

// Largest rank the kernels take (the shared-memory tiles hold this many ranks); the Python
// backend sends larger ranks to the torch backend.
constexpr int64_t kMaxRank = 128;

// n² is clamped here before the square root (norm.NORM_SQ_FLOOR).
constexpr double kNormSqFloor = 1e-24;

// Slot codes of op_common: a zero magnitude's slot is ≥ 0.
constexpr int32_t kSlotNone = -1;  // m_j ≠ 0
constexpr int32_t kSlotFull = -2;  // m_j = 0 and every slot taken: dm_j = NaN

// Token rows of one pre-pass tile; a pre-pass block covers a multiple of it (rows_per_block).
constexpr int64_t kPrepassTileRows = 32;
// Output columns per finalize block: one thread per column; 32 when the norm's share is formed
// (its float64 tiles live in shared memory).
constexpr int64_t kFinalizeCols = 256;
constexpr int64_t kFinalizeExactCols = 32;

// Element types of the adapter tensors, as the binding tags them.
enum class Dtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A read-only matrix (or, with stride1 unused, vector) of any supported float type: element
// (i, j) is data[i * stride0 + j * stride1], converted on load.
struct AnyMatrix {
  const void* data;
  Dtype dtype;
  int64_t stride0;
  int64_t stride1;
};

// A contiguous output of any supported float type, written from double (dm, dR).
struct AnyOut {
  void* data;
  Dtype dtype;
};

// A strided float64 matrix (the norm terms C and G, as the caller keeps them).
struct F64Matrix {
  const double* data;
  int64_t stride0;
  int64_t stride1;
};

// --- forward: the prologue ----------------------------------------------------------------------
// One launch, two kinds of blocks:
//  - gate blocks, 32 output rows each: P = B R, n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum((P G) ⊙ P)
//    clamped at 1e-24, n = √n², g = m / n (rounded to acc_t<T>), all in double; with slots, the
//    slot of each zero magnitude = the number of zeros in earlier columns (counted by each block
//    from m itself), kSlotFull from `capacity` on, kSlotNone where m ≠ 0;
//  - row blocks, 32 tokens each: v = x Aᵀ accumulated in acc_t<T>, x read once.
template <typename T>
struct PrologueArgs {
  // gate: B (out×rank), R (rank×rank), magnitude (out, stride0), c0 (out, stride c0_stride),
  // C = W0 Aᵀ (out×rank), G = A Aᵀ (rank×rank)
  AnyMatrix B, R, m;
  const double* c0;
  int64_t c0_stride;
  F64Matrix C, G;
  double scaling;
  int64_t capacity;  // slots; `slots` is null when 0
  // gate outputs (contiguous): P (out×rank), n (out), g (out), slots (out)
  double* P;
  double* n;
  acc_t<T>* g;
  int32_t* slots;
  // row blocks: x (n_rows×in, strides), A (rank×in); v (n_rows×rank, contiguous)
  const T* x;
  int64_t x_stride0, x_stride1;
  AnyMatrix A;
  acc_t<T>* v;
  int64_t n_rows, in, out, rank;
};
template <typename T>
cudaError_t launch_prologue(const PrologueArgs<T>& args, cudaStream_t stream);

// --- forward: the rescale -----------------------------------------------------------------------
// Per element of the n_rows × n_cols output (v: n_rows×rank, P: n_cols×rank double):
//     z = base − [b] + s·v Pᵀ,   y = g ⊙ z + b,
// `bias` may be null; it is subtracted from base only with `subtract_bias` (base = y0 = x W0ᵀ + b).
// Where slots[col] ≥ 0, z (rounded to T) is also stored into zbuf[row, slots[col]]
// (zbuf: n_rows × capacity, contiguous); `slots` null means no column keeps its z.
// `y` (contiguous) may be the `base` buffer itself: each element is read, then written, by the
// same thread.
template <typename T>
struct RescaleArgs {
  const T* base;
  int64_t base_stride0, base_stride1;
  const acc_t<T>* v;
  const double* P;
  const acc_t<T>* g;
  const T* bias;
  int64_t bias_stride;
  bool subtract_bias;
  double scaling;
  const int32_t* slots;
  T* zbuf;
  int64_t capacity;
  int64_t n_rows, n_cols, rank;
  T* y;
};
template <typename T>
cudaError_t launch_rescale(const RescaleArgs<T>& args, cudaStream_t stream);

// --- backward: the pre-pass ---------------------------------------------------------------------
// Row blocks of `rows_per_block` tokens (a multiple of kPrepassTileRows) stream gy (and y) over
// the output columns once, tile by tile:
//     gz = gy ⊙ g (in acc_t<T>; stored rounded to T when `gz` is set),
//     t  = gz B   (acc_t<T>, from the unrounded gz; never stored),
//     u  = s·t R  (rounded to T; when `u` is set),
//     dr_part[block]     = Σ_rows tᵀ v            (rank×rank, acc_t<T>; when `dr_part` is set),
//     cs_part[block, j]  = Σ_rows gy ⊙ (y − b)    (acc_t<T>; when `cs_part` is set), or
//                          Σ_rows gy ⊙ zbuf[:, slot] for columns with slots[j] ≥ 0.
// Sums over a block's rows run in a fixed order. Extra blocks past the row blocks write
// a_cast = A rounded to T (rank×in), when `a_cast` is set: the dx GEMM's operand.
template <typename T>
struct PrepassArgs {
  const T* gy;
  int64_t gy_stride0, gy_stride1;
  const T* y;
  int64_t y_stride0, y_stride1;
  const T* bias;
  int64_t bias_stride;
  const acc_t<T>* g;
  AnyMatrix B, R, A;
  const acc_t<T>* v;  // n_rows×rank, contiguous
  const int32_t* slots;
  const T* zbuf;      // n_rows×capacity, contiguous
  int64_t capacity;
  double scaling;
  int64_t n_rows, out, rank, in, rows_per_block;
  T* gz;               // n_rows×out
  T* u;                // n_rows×rank
  acc_t<T>* cs_part;   // row blocks × out
  acc_t<T>* dr_part;   // row blocks × rank × rank
  T* a_cast;           // rank×in
};

// Row blocks of the pre-pass (= partials) for n_rows tokens.
inline int64_t prepass_row_blocks(int64_t n_rows, int64_t rows_per_block) {
  return (n_rows + rows_per_block - 1) / rows_per_block;
}
template <typename T>
cudaError_t launch_prepass(const PrepassArgs<T>& args, cudaStream_t stream);

// --- backward: the finalize ---------------------------------------------------------------------
// Column blocks (when `dm` or `shares` is set), in double, partials summed in block order:
//     colsum = Σ_p cs_part[p, j];  S = colsum·n/m (m ≠ 0), colsum (slot ≥ 0), NaN (kSlotFull)
//     dm = S / n (magnitude's dtype)
//     shares[block] = Σ_{j in block} B_jᵀ ⊗ coef_j (s C_j + s² (P G)_j),  coef = −m S / n³
// dR blocks (when `dR` is set): dR = s·Σ_p dr_part[p] + Σ_q shares[q] (R's dtype); the finalize
// takes no shares (the exact mode adds them in launch_finalize_exact, once every column block
// has written its share).
template <typename Acc>
struct FinalizeArgs {
  const Acc* cs_part;  // parts × out
  const Acc* dr_part;  // parts × rank × rank
  int64_t parts;
  AnyMatrix m;         // out (stride0)
  const double* n;     // out
  const int32_t* slots;  // out, or null
  AnyMatrix B;         // out × rank
  const double* P;     // out × rank, contiguous
  F64Matrix C, G;
  double scaling;
  int64_t out, rank;
  AnyOut dm;           // data null when not needed
  AnyOut dR;           // data null when not needed (or left to launch_finalize_exact)
  double* shares;      // column blocks × rank × rank, null unless the norm is not detached
};
template <typename Acc>
cudaError_t launch_finalize(const FinalizeArgs<Acc>& args, cudaStream_t stream);

// Column blocks of the finalize when the norm's share is formed.
inline int64_t finalize_share_blocks(int64_t out) {
  return (out + kFinalizeExactCols - 1) / kFinalizeExactCols;
}

// dR = s·Σ_p dr_part[p] + Σ_q shares[q] (q < n_shares), in double, stored in R's dtype.
template <typename Acc>
cudaError_t launch_finalize_exact(const Acc* dr_part, int64_t parts, const double* shares,
                                  int64_t n_shares, int64_t rank, double scaling, AnyOut dR,
                                  cudaStream_t stream);

}  // namespace edora
