// Thin torch binding of the hand-written kernels (edora_kernels._C): argument checks, output
// allocation, device and stream. The GEMMs stay in ATen (cuBLAS), in
// edora_kernels/backends/cuda.py; each function here is one kernel launch (none when there is
// nothing to compute).
//
// A plain pybind11 module, not TORCH_LIBRARY ops: these functions are only called from inside
// the package's own torch.library custom ops (edora::linear_fwd, ...), which already carry the
// schema, the fake and the autograd formula that torch.compile needs; registering them with the
// dispatcher a second time would add nothing. A Python module also lets backends/__init__.py
// test availability with a plain `import edora_kernels._C`.
//
// Nothing here reads device data on the host or converts a tensor: the adapter tensors (A, B, R,
// magnitude) go to the kernels in their own dtype and strides (converted on load), the
// activations in their own strides; every allocation size comes from shapes and arguments.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "edora_kernels.cuh"

namespace {

// ATen's element types and the CUDA types the kernels are instantiated for (same layout).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
auto* data(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

// Null for an empty (not needed) output.
template <typename scalar_t>
auto* data_or_null(const at::Tensor& t) {
  using T = typename CudaType<scalar_t>::type;
  return t.numel() > 0 ? data<scalar_t>(t) : static_cast<T*>(nullptr);
}

bool is_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
         dtype == at::kDouble;
}

at::ScalarType accumulator_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

edora::Dtype tag(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return edora::Dtype::kFloat64;
    case at::kHalf:
      return edora::Dtype::kFloat16;
    case at::kBFloat16:
      return edora::Dtype::kBFloat16;
    default:
      return edora::Dtype::kFloat32;
  }
}

// `main` is the N-row tensor (x, base or gy) that fixes device, dtype and the token count.
void check_main(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "edora_kernels._C.", fn, ": ", name,
              " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(is_float(t.scalar_type()), "edora_kernels._C.", fn, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "edora_kernels._C.", fn, ": ", name, " must be 2-D, got shape ",
              t.sizes());
}

void check_device_shape(const char* fn, const char* name, const at::Tensor& t,
                        const at::Tensor& main, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == main.device(), "edora_kernels._C.", fn, ": ", name, " is on ",
              t.device(), ", expected ", main.device());
  TORCH_CHECK(t.sizes() == shape, "edora_kernels._C.", fn, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

// A tensor the kernels read with their own layout: dtype and shape as given, contiguous.
void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& main,
                at::ScalarType dtype, at::IntArrayRef shape) {
  check_device_shape(fn, name, t, main, shape);
  TORCH_CHECK(t.scalar_type() == dtype, "edora_kernels._C.", fn, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "edora_kernels._C.", fn, ": ", name,
              " must be contiguous (row-major), got strides ", t.strides());
}

// An adapter tensor (A, B, R, magnitude): any float dtype and strides, converted on load.
edora::AnyMatrix any_matrix(const char* fn, const char* name, const at::Tensor& t,
                            const at::Tensor& main, at::IntArrayRef shape) {
  check_device_shape(fn, name, t, main, shape);
  TORCH_CHECK(is_float(t.scalar_type()), "edora_kernels._C.", fn, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  return {t.data_ptr(), tag(t.scalar_type()), t.stride(0), t.dim() > 1 ? t.stride(1) : 0};
}

// A float64 norm term (c0, C, G, as the caller keeps them): any strides.
edora::F64Matrix f64_matrix(const char* fn, const char* name, const at::Tensor& t,
                            const at::Tensor& main, at::IntArrayRef shape) {
  check_device_shape(fn, name, t, main, shape);
  TORCH_CHECK(t.scalar_type() == at::kDouble, "edora_kernels._C.", fn, ": ", name,
              " must be Double, got ", t.scalar_type());
  return {t.numel() > 0 ? t.data_ptr<double>() : nullptr, t.stride(0),
          t.dim() > 1 ? t.stride(1) : 0};
}

void check_rank(const char* fn, int64_t rank) {
  TORCH_CHECK(rank >= 1 && rank <= edora::kMaxRank, "edora_kernels._C.", fn,
              ": rank must be in [1, ", edora::kMaxRank, "], got ", rank);
}

// The slot codes: (out,) int32, or empty when no column keeps its z (null then).
const int32_t* slots_or_null(const char* fn, const at::Tensor& slots, const at::Tensor& main,
                             int64_t out) {
  if (slots.numel() == 0) return nullptr;
  check_like(fn, "slots", slots, main, at::kInt, {out});
  return slots.data_ptr<int32_t>();
}

void check_capacity(const char* fn, int64_t capacity, const int32_t* slots) {
  TORCH_CHECK(capacity >= 0, "edora_kernels._C.", fn, ": capacity must be >= 0, got ", capacity);
  TORCH_CHECK((capacity > 0) == (slots != nullptr), "edora_kernels._C.", fn,
              ": slots must be given (out,) exactly when the capacity is > 0, got capacity ",
              capacity, (slots != nullptr ? " with slots" : " without slots"));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The shape of an output, or (0,) when it is not asked for.
std::vector<int64_t> shape_if(bool needed, std::vector<int64_t> shape) {
  return needed ? shape : std::vector<int64_t>{0};
}

void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "edora_kernels._C.", fn, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

// --- forward ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prologue(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& R,
    const at::Tensor& magnitude, const at::Tensor& c0, const at::Tensor& C, const at::Tensor& G,
    double scaling, int64_t capacity) {
  constexpr const char* fn = "prologue";
  check_main(fn, "x", x);
  const int64_t n_rows = x.size(0), in = x.size(1);
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2, "edora_kernels._C.", fn,
              ": A and B must be 2-D, got shapes ", A.sizes(), " and ", B.sizes());
  const int64_t rank = A.size(0), out = B.size(0);
  check_rank(fn, rank);
  TORCH_CHECK(capacity >= 0, "edora_kernels._C.", fn, ": capacity must be >= 0, got ", capacity);
  const auto acc = accumulator_dtype(x.scalar_type());
  const edora::AnyMatrix A_ = any_matrix(fn, "A", A, x, {rank, in});
  const edora::AnyMatrix B_ = any_matrix(fn, "B", B, x, {out, rank});
  const edora::AnyMatrix R_ = any_matrix(fn, "R", R, x, {rank, rank});
  const edora::AnyMatrix m_ = any_matrix(fn, "magnitude", magnitude, x, {out});
  const edora::F64Matrix c0_ = f64_matrix(fn, "c0", c0, x, {out});
  const edora::F64Matrix C_ = f64_matrix(fn, "C", C, x, {out, rank});
  const edora::F64Matrix G_ = f64_matrix(fn, "G", G, x, {rank, rank});

  const c10::cuda::CUDAGuard guard(x.device());
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor P = at::empty({out, rank}, f64);
  at::Tensor n = at::empty({out}, f64);
  at::Tensor g = at::empty({out}, x.options().dtype(acc));
  at::Tensor slots = at::empty({capacity > 0 ? out : 0}, x.options().dtype(at::kInt));
  at::Tensor v = at::empty({n_rows, rank}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edora_prologue", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = edora::acc_t<T>;
    edora::PrologueArgs<T> a{};
    a.B = B_;
    a.R = R_;
    a.m = m_;
    a.c0 = c0_.data;
    a.c0_stride = c0_.stride0;
    a.C = C_;
    a.G = G_;
    a.scaling = scaling;
    a.capacity = capacity;
    a.P = P.data_ptr<double>();
    a.n = n.data_ptr<double>();
    a.g = g.data_ptr<Acc>();
    a.slots = capacity > 0 ? slots.data_ptr<int32_t>() : nullptr;
    a.x = data<scalar_t>(x);
    a.x_stride0 = x.stride(0);
    a.x_stride1 = x.stride(1);
    a.A = A_;
    a.v = n_rows > 0 ? v.data_ptr<Acc>() : nullptr;
    a.n_rows = n_rows;
    a.in = in;
    a.out = out;
    a.rank = rank;
    check_launch(fn, edora::launch_prologue(a, stream_of(x)));
  });
  return {P, n, g, slots, v};
}

std::tuple<at::Tensor, at::Tensor> rescale(const at::Tensor& base, const at::Tensor& v,
                                           const at::Tensor& P, const at::Tensor& g,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& slots, int64_t capacity,
                                           double scaling, bool subtract_bias,
                                           bool overwrite_base) {
  constexpr const char* fn = "rescale";
  check_main(fn, "base", base);
  const int64_t n_rows = base.size(0), n_cols = base.size(1);
  TORCH_CHECK(P.dim() == 2, "edora_kernels._C.", fn, ": P must be 2-D (out, rank), got shape ",
              P.sizes());
  const int64_t rank = P.size(1);
  check_rank(fn, rank);
  TORCH_CHECK(!overwrite_base || base.is_contiguous(), "edora_kernels._C.", fn,
              ": base must be contiguous to be overwritten, got strides ", base.strides());
  const auto dtype = base.scalar_type();
  const auto acc = accumulator_dtype(dtype);
  check_like(fn, "v", v, base, acc, {n_rows, rank});
  check_like(fn, "P", P, base, at::kDouble, {n_cols, rank});
  check_like(fn, "g", g, base, acc, {n_cols});
  if (bias.has_value()) {
    check_device_shape(fn, "bias", *bias, base, {n_cols});
    TORCH_CHECK(bias->scalar_type() == dtype, "edora_kernels._C.", fn, ": bias must be ", dtype,
                ", got ", bias->scalar_type());
  }
  const int32_t* slot_ptr = slots_or_null(fn, slots, base, n_cols);
  check_capacity(fn, capacity, slot_ptr);

  const c10::cuda::CUDAGuard guard(base.device());
  // With overwrite_base, base is a temporary of the caller: it becomes y.
  at::Tensor y = overwrite_base ? base : at::empty({n_rows, n_cols}, base.options());
  at::Tensor zbuf = at::empty({n_rows, capacity}, base.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "edora_rescale", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = edora::acc_t<T>;
    edora::RescaleArgs<T> a{};
    a.base = data<scalar_t>(base);
    a.base_stride0 = base.stride(0);
    a.base_stride1 = base.stride(1);
    a.v = v.data_ptr<Acc>();
    a.P = P.data_ptr<double>();
    a.g = g.data_ptr<Acc>();
    a.bias = bias.has_value() ? data<scalar_t>(*bias) : nullptr;
    a.bias_stride = bias.has_value() ? bias->stride(0) : 0;
    a.subtract_bias = subtract_bias;
    a.scaling = scaling;
    a.slots = slot_ptr;
    a.zbuf = slot_ptr != nullptr ? data<scalar_t>(zbuf) : nullptr;
    a.capacity = capacity;
    a.n_rows = n_rows;
    a.n_cols = n_cols;
    a.rank = rank;
    a.y = data<scalar_t>(y);
    check_launch(fn, edora::launch_rescale(a, stream_of(base)));
  });
  return {y, zbuf};
}

// --- backward -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepass(
    const at::Tensor& gy, const at::Tensor& y, const std::optional<at::Tensor>& bias,
    const at::Tensor& g, const at::Tensor& B, const at::Tensor& R, const at::Tensor& A,
    const at::Tensor& v, const at::Tensor& slots, const at::Tensor& zbuf, double scaling,
    int64_t rows_per_block, bool write_gz, bool need_u, bool need_dr, bool need_colsum,
    bool convert_A) {
  constexpr const char* fn = "prepass";
  check_main(fn, "gy", gy);
  const int64_t n_rows = gy.size(0), out = gy.size(1);
  TORCH_CHECK(A.dim() == 2, "edora_kernels._C.", fn, ": A must be 2-D (rank, in), got shape ",
              A.sizes());
  const int64_t rank = A.size(0), in = A.size(1);
  check_rank(fn, rank);
  TORCH_CHECK(rows_per_block >= edora::kPrepassTileRows &&
                  rows_per_block % edora::kPrepassTileRows == 0,
              "edora_kernels._C.", fn, ": rows_per_block must be a positive multiple of ",
              edora::kPrepassTileRows, ", got ", rows_per_block);
  const auto dtype = gy.scalar_type();
  const auto acc = accumulator_dtype(dtype);
  check_like(fn, "g", g, gy, acc, {out});
  if (need_colsum) {
    check_device_shape(fn, "y", y, gy, {n_rows, out});
    TORCH_CHECK(y.scalar_type() == dtype, "edora_kernels._C.", fn, ": y must be ", dtype,
                ", got ", y.scalar_type());
    if (bias.has_value()) {
      check_device_shape(fn, "bias", *bias, gy, {out});
      TORCH_CHECK(bias->scalar_type() == dtype, "edora_kernels._C.", fn, ": bias must be ",
                  dtype, ", got ", bias->scalar_type());
    }
  }
  if (need_dr) check_like(fn, "v", v, gy, acc, {n_rows, rank});
  const int32_t* slot_ptr = need_colsum ? slots_or_null(fn, slots, gy, out) : nullptr;
  const int64_t capacity = slot_ptr != nullptr && zbuf.dim() == 2 ? zbuf.size(1) : 0;
  if (slot_ptr != nullptr) {
    check_capacity(fn, capacity, slot_ptr);
    check_like(fn, "zbuf", zbuf, gy, dtype, {n_rows, capacity});
  }

  const edora::AnyMatrix A_ = any_matrix(fn, "A", A, gy, {rank, in});
  const edora::AnyMatrix B_ = any_matrix(fn, "B", B, gy, {out, rank});
  const edora::AnyMatrix R_ = any_matrix(fn, "R", R, gy, {rank, rank});

  const c10::cuda::CUDAGuard guard(gy.device());
  const int64_t parts = edora::prepass_row_blocks(n_rows, rows_per_block);
  // Outputs not asked for come back empty, (0,).
  const auto like = gy.options();
  const auto acc_like = gy.options().dtype(acc);
  at::Tensor gz = at::empty(shape_if(write_gz, {n_rows, out}), like);
  at::Tensor u = at::empty(shape_if(need_u, {n_rows, rank}), like);
  at::Tensor a_cast = at::empty(shape_if(convert_A, {rank, in}), like);
  at::Tensor cs_part =
      at::empty(shape_if(need_colsum, {parts, out}), acc_like);
  at::Tensor dr_part =
      at::empty(shape_if(need_dr, {parts, rank, rank}), acc_like);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "edora_prepass", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = edora::acc_t<T>;
    edora::PrepassArgs<T> a{};
    a.gy = data<scalar_t>(gy);
    a.gy_stride0 = gy.stride(0);
    a.gy_stride1 = gy.stride(1);
    if (need_colsum) {
      a.y = data<scalar_t>(y);
      a.y_stride0 = y.stride(0);
      a.y_stride1 = y.stride(1);
      a.bias = bias.has_value() ? data<scalar_t>(*bias) : nullptr;
      a.bias_stride = bias.has_value() ? bias->stride(0) : 0;
    }
    a.g = g.data_ptr<Acc>();
    a.B = B_;
    a.R = R_;
    a.A = A_;
    a.v = need_dr ? data_or_null<Acc>(v) : nullptr;
    a.slots = slot_ptr;
    a.zbuf = slot_ptr != nullptr ? data_or_null<scalar_t>(zbuf) : nullptr;
    a.capacity = capacity;
    a.scaling = scaling;
    a.n_rows = n_rows;
    a.out = out;
    a.rank = rank;
    a.in = in;
    a.rows_per_block = rows_per_block;
    a.gz = data_or_null<scalar_t>(gz);
    a.u = data_or_null<scalar_t>(u);
    a.cs_part = need_colsum ? data_or_null<Acc>(cs_part) : nullptr;
    a.dr_part = need_dr ? data_or_null<Acc>(dr_part) : nullptr;
    a.a_cast = data_or_null<scalar_t>(a_cast);
    check_launch(fn, edora::launch_prepass(a, stream_of(gy)));
  });
  return {gz, u, a_cast, cs_part, dr_part};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize(
    const at::Tensor& cs_part, const at::Tensor& dr_part, const at::Tensor& magnitude,
    const at::Tensor& n, const at::Tensor& slots, const at::Tensor& B, const at::Tensor& P,
    const at::Tensor& C, const at::Tensor& G, const at::Tensor& R, double scaling, bool need_dR,
    bool need_dm, bool exact) {
  constexpr const char* fn = "finalize";
  TORCH_CHECK(n.is_cuda(), "edora_kernels._C.", fn, ": n must be a CUDA tensor, got one on ",
              n.device());
  TORCH_CHECK(n.dim() == 1 && B.dim() == 2, "edora_kernels._C.", fn,
              ": n must be 1-D and B 2-D, got shapes ", n.sizes(), " and ", B.sizes());
  const int64_t out = n.size(0), rank = B.size(1);
  check_rank(fn, rank);
  TORCH_CHECK(!exact || need_dR, "edora_kernels._C.", fn, ": exact needs need_dR");
  const auto acc = cs_part.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "edora_kernels._C.", fn,
              ": the partials must be Float or Double, got ", acc);
  const bool columns = need_dm || exact;
  int64_t parts = 0;
  if (columns) {
    TORCH_CHECK(cs_part.dim() == 2, "edora_kernels._C.", fn,
                ": cs_part must be 2-D (parts, out), got shape ", cs_part.sizes());
    parts = cs_part.size(0);
    check_like(fn, "cs_part", cs_part, n, acc, {parts, out});
  }
  if (need_dR) {
    TORCH_CHECK(dr_part.dim() == 3, "edora_kernels._C.", fn,
                ": dr_part must be 3-D (parts, rank, rank), got shape ", dr_part.sizes());
    TORCH_CHECK(!columns || dr_part.size(0) == parts, "edora_kernels._C.", fn,
                ": cs_part and dr_part must have as many parts, got ", parts, " and ",
                dr_part.size(0));
    parts = dr_part.size(0);
    check_like(fn, "dr_part", dr_part, n, acc, {parts, rank, rank});
  }
  check_like(fn, "n", n, n, at::kDouble, {out});
  const int32_t* slot_ptr = columns ? slots_or_null(fn, slots, n, out) : nullptr;
  const edora::AnyMatrix m_ = any_matrix(fn, "magnitude", magnitude, n, {out});
  const edora::AnyMatrix B_ = any_matrix(fn, "B", B, n, {out, rank});
  TORCH_CHECK(is_float(R.scalar_type()), "edora_kernels._C.", fn,
              ": R must be float32, float16, bfloat16 or float64, got ", R.scalar_type());
  edora::F64Matrix C_{}, G_{};
  if (exact) {
    check_like(fn, "P", P, n, at::kDouble, {out, rank});
    C_ = f64_matrix(fn, "C", C, n, {out, rank});
    G_ = f64_matrix(fn, "G", G, n, {rank, rank});
  }

  const c10::cuda::CUDAGuard guard(n.device());
  at::Tensor dR = need_dR && !exact ? at::empty({rank, rank}, R.options()) : R.new_empty({0});
  at::Tensor dm = need_dm ? at::empty({out}, magnitude.options()) : magnitude.new_empty({0});
  at::Tensor shares = at::empty({exact ? edora::finalize_share_blocks(out) : 0, rank, rank},
                                n.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "edora_finalize", [&] {
    edora::FinalizeArgs<scalar_t> a{};
    a.cs_part = columns && cs_part.numel() > 0 ? cs_part.data_ptr<scalar_t>() : nullptr;
    a.dr_part = need_dR && dr_part.numel() > 0 ? dr_part.data_ptr<scalar_t>() : nullptr;
    a.parts = parts;
    a.m = m_;
    a.n = n.data_ptr<double>();
    a.slots = slot_ptr;
    a.B = B_;
    if (exact) {
      a.P = P.data_ptr<double>();
      a.C = C_;
      a.G = G_;
    }
    a.scaling = scaling;
    a.out = out;
    a.rank = rank;
    if (need_dm) a.dm = {dm.data_ptr(), tag(dm.scalar_type())};
    if (need_dR && !exact) a.dR = {dR.data_ptr(), tag(dR.scalar_type())};
    a.shares = exact ? shares.data_ptr<double>() : nullptr;
    check_launch(fn, edora::launch_finalize(a, stream_of(n)));
  });
  return {dR, dm, shares};
}

at::Tensor finalize_exact(const at::Tensor& dr_part, const at::Tensor& shares, const at::Tensor& R,
                          double scaling) {
  constexpr const char* fn = "finalize_exact";
  TORCH_CHECK(shares.is_cuda(), "edora_kernels._C.", fn,
              ": shares must be a CUDA tensor, got one on ", shares.device());
  TORCH_CHECK(R.dim() == 2 && R.size(0) == R.size(1), "edora_kernels._C.", fn,
              ": R must be square, got shape ", R.sizes());
  TORCH_CHECK(is_float(R.scalar_type()), "edora_kernels._C.", fn,
              ": R must be float32, float16, bfloat16 or float64, got ", R.scalar_type());
  const int64_t rank = R.size(0);
  check_rank(fn, rank);
  TORCH_CHECK(shares.dim() == 3 && dr_part.dim() == 3, "edora_kernels._C.", fn,
              ": shares and dr_part must be 3-D (parts, rank, rank), got shapes ", shares.sizes(),
              " and ", dr_part.sizes());
  check_like(fn, "shares", shares, shares, at::kDouble, {shares.size(0), rank, rank});
  const auto acc = dr_part.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "edora_kernels._C.", fn,
              ": dr_part must be Float or Double, got ", acc);
  check_like(fn, "dr_part", dr_part, shares, acc, {dr_part.size(0), rank, rank});
  check_device_shape(fn, "R", R, shares, {rank, rank});

  const c10::cuda::CUDAGuard guard(shares.device());
  at::Tensor dR = at::empty({rank, rank}, R.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "edora_finalize_exact", [&] {
    check_launch(fn, edora::launch_finalize_exact(
                         dr_part.numel() > 0 ? dr_part.data_ptr<scalar_t>() : nullptr,
                         dr_part.size(0), shares.numel() > 0 ? shares.data_ptr<double>() : nullptr,
                         shares.size(0), rank, scaling, {dR.data_ptr(), tag(dR.scalar_type())},
                         stream_of(shares)));
  });
  return dR;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Hand-written CUDA kernels of edora_kernels (the 'cuda' backend); one launch each.";
  m.attr("MAX_RANK") = edora::kMaxRank;
  m.attr("PREPASS_TILE_ROWS") = edora::kPrepassTileRows;
  m.attr("FINALIZE_SHARE_COLUMNS") = edora::kFinalizeExactCols;
  m.attr("SLOT_NONE") = edora::kSlotNone;
  m.attr("SLOT_FULL") = edora::kSlotFull;
  m.attr("NORM_SQ_FLOOR") = edora::kNormSqFloor;
  m.def("prologue", &prologue,
        "Forward prologue: returns (P, n, g, slots, v): P = B R and n (float64), g = m / n and "
        "v = x A^T (float32; float64 for float64 x), slots (int32, empty when capacity = 0).",
        py::arg("x"), py::arg("A"), py::arg("B"), py::arg("R"), py::arg("magnitude"),
        py::arg("c0"), py::arg("C"), py::arg("G"), py::arg("scaling"), py::arg("capacity"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rescale", &rescale,
        "Forward epilogue: returns (y, zbuf), y = g * (base - [bias] + scaling * v @ P.T) + bias "
        "and the pre-scale z of the columns with a slot, zbuf[:, slot] (N x capacity). "
        "overwrite_base writes y into base.",
        py::arg("base"), py::arg("v"), py::arg("P"), py::arg("g"), py::arg("bias"),
        py::arg("slots"), py::arg("capacity"), py::arg("scaling"), py::arg("subtract_bias"),
        py::arg("overwrite_base"), py::call_guard<py::gil_scoped_release>());
  m.def("prepass", &prepass,
        "Backward pre-pass: returns (gz, u, a_cast, cs_part, dr_part): gz = gy * g, "
        "u = scaling * (gz @ B) @ R, A in gy's dtype, and per block of rows_per_block rows the "
        "column partials of gy * (y - bias) and the partials of (gz @ B).T @ v; each empty "
        "unless asked for.",
        py::arg("gy"), py::arg("y"), py::arg("bias"), py::arg("g"), py::arg("B"), py::arg("R"),
        py::arg("A"), py::arg("v"), py::arg("slots"), py::arg("zbuf"), py::arg("scaling"),
        py::arg("rows_per_block"), py::arg("write_gz"), py::arg("need_u"), py::arg("need_dr"),
        py::arg("need_colsum"), py::arg("convert_A"), py::call_guard<py::gil_scoped_release>());
  m.def("finalize", &finalize,
        "Backward finalize: returns (dR, dm, shares) from the pre-pass's partials (fixed-order "
        "float64 sums); with exact, dR is left to finalize_exact and shares holds each column "
        "block's share of the norm's gradient.",
        py::arg("cs_part"), py::arg("dr_part"), py::arg("magnitude"), py::arg("n"),
        py::arg("slots"), py::arg("B"), py::arg("P"), py::arg("C"), py::arg("G"), py::arg("R"),
        py::arg("scaling"), py::arg("need_dR"), py::arg("need_dm"), py::arg("exact"),
        py::call_guard<py::gil_scoped_release>());
  m.def("finalize_exact", &finalize_exact,
        "dR = scaling * sum(dr_part) + sum(shares), in R's dtype.", py::arg("dr_part"),
        py::arg("shares"), py::arg("R"), py::arg("scaling"),
        py::call_guard<py::gil_scoped_release>());
}
