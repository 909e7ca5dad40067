// Thin torch binding of the hand-written kernels (edora_kernels._C): argument checks, output
// allocation, device and stream. The GEMMs stay in ATen (cuBLAS), in
// edora_kernels/backends/cuda.py.
//
// A plain pybind11 module, not TORCH_LIBRARY ops: these functions are only called from inside
// the package's own torch.library custom ops (edora::linear_fwd, ...), which already carry the
// schema, the fake and the autograd formula that torch.compile needs; registering them with the
// dispatcher a second time would add nothing. A Python module also lets backends/__init__.py
// test availability with a plain `import edora_kernels._C`.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

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

at::ScalarType accumulator_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// `main` is the N × out tensor (base or gy) that fixes device, dtype and sizes.
void check_main(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "edora_kernels._C.", fn, ": ", name,
              " must be a CUDA tensor, got one on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "edora_kernels._C.", fn, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(t.dim() == 2, "edora_kernels._C.", fn, ": ", name, " must be 2-D (N, out), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "edora_kernels._C.", fn, ": ", name,
              " must be contiguous (row-major), got strides ", t.strides());
}

void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& main,
                at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == main.device(), "edora_kernels._C.", fn, ": ", name, " is on ",
              t.device(), ", expected ", main.device());
  TORCH_CHECK(t.scalar_type() == dtype, "edora_kernels._C.", fn, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "edora_kernels._C.", fn, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "edora_kernels._C.", fn, ": ", name,
              " must be contiguous (row-major), got strides ", t.strides());
}

void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "edora_kernels._C.", fn, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor rescale(const at::Tensor& base, const at::Tensor& v, const at::Tensor& P,
                   const at::Tensor& g, const std::optional<at::Tensor>& bias, double scaling,
                   bool subtract_bias, bool overwrite_base) {
  constexpr const char* fn = "rescale";
  check_main(fn, "base", base);
  const int64_t n_rows = base.size(0), n_cols = base.size(1);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == n_rows && v.size(1) >= 1, "edora_kernels._C.", fn,
              ": v must have shape (N = ", n_rows, ", rank >= 1), got ", v.sizes());
  const int64_t rank = v.size(1);
  const auto dtype = base.scalar_type();
  const auto acc = accumulator_dtype(dtype);
  check_like(fn, "v", v, base, dtype, {n_rows, rank});
  check_like(fn, "P", P, base, acc, {n_cols, rank});
  check_like(fn, "g", g, base, acc, {n_cols});
  if (bias.has_value()) check_like(fn, "bias", *bias, base, dtype, {n_cols});

  const c10::cuda::CUDAGuard guard(base.device());
  // With overwrite_base, base is a temporary of the caller: it becomes y.
  at::Tensor y = overwrite_base ? base : at::empty_like(base);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(base.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "edora_rescale", [&] {
    using Acc = edora::acc_t<typename CudaType<scalar_t>::type>;
    check_launch(fn, edora::launch_rescale(
                         data<scalar_t>(base), data<scalar_t>(v), P.data_ptr<Acc>(),
                         g.data_ptr<Acc>(), bias.has_value() ? data<scalar_t>(*bias) : nullptr,
                         subtract_bias, static_cast<Acc>(scaling), n_rows, n_cols, rank,
                         data<scalar_t>(y), stream));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_scale_colsum(const at::Tensor& gy, const at::Tensor& g,
                                                     const at::Tensor& y,
                                                     const std::optional<at::Tensor>& bias,
                                                     bool need_gz, bool need_colsum) {
  constexpr const char* fn = "grad_scale_colsum";
  check_main(fn, "gy", gy);
  const int64_t n_rows = gy.size(0), n_cols = gy.size(1);
  const auto dtype = gy.scalar_type();
  check_like(fn, "g", g, gy, accumulator_dtype(dtype), {n_cols});
  if (need_colsum) check_like(fn, "y", y, gy, dtype, {n_rows, n_cols});
  if (need_colsum && bias.has_value()) check_like(fn, "bias", *bias, gy, dtype, {n_cols});

  const c10::cuda::CUDAGuard guard(gy.device());
  at::Tensor gz = need_gz ? at::empty_like(gy) : gy.new_empty({0});
  at::Tensor colsum = g.new_empty({need_colsum ? n_cols : 0});
  // The partial sums live only until the second pass: the caching allocator reuses the block.
  at::Tensor partial =
      g.new_empty({need_colsum ? edora::colsum_partial_rows(n_rows) : 0, n_cols});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gy.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "edora_grad_colsum", [&] {
    using Acc = edora::acc_t<typename CudaType<scalar_t>::type>;
    check_launch(fn, edora::launch_grad_scale_colsum(
                         data<scalar_t>(gy), g.data_ptr<Acc>(),
                         need_colsum ? data<scalar_t>(y) : nullptr,
                         need_colsum && bias.has_value() ? data<scalar_t>(*bias) : nullptr,
                         n_rows, n_cols,
                         need_gz ? data<scalar_t>(gz) : nullptr,
                         need_colsum ? partial.data_ptr<Acc>() : nullptr,
                         need_colsum ? colsum.data_ptr<Acc>() : nullptr, stream));
  });
  return {gz, colsum};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Hand-written CUDA kernels of edora_kernels (the 'cuda' backend).";
  m.def("rescale", &rescale,
        "Fused epilogue: returns y = g * (base - [bias] + scaling * v @ P.T) + bias. base, v, "
        "bias: N x out, N x r, out in one dtype; P (out x r) and g (out) in float32 (float64 for "
        "float64 base). overwrite_base writes y into base.",
        py::arg("base"), py::arg("v"), py::arg("P"), py::arg("g"), py::arg("bias"),
        py::arg("scaling"), py::arg("subtract_bias"), py::arg("overwrite_base"),
        py::call_guard<py::gil_scoped_release>());
  m.def("grad_scale_colsum", &grad_scale_colsum,
        "Backward, gy side: returns (gz = gy * g, colsum = sum over rows of gy * (y - bias)), "
        "each empty unless needed. colsum is deterministic (fixed-order two-pass reduction) and "
        "in g's dtype.",
        py::arg("gy"), py::arg("g"), py::arg("y"), py::arg("bias"), py::arg("need_gz"),
        py::arg("need_colsum"),
        py::call_guard<py::gil_scoped_release>());
}
