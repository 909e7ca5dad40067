"""The ``cuda`` backend (csrc/ kernels + cuBLAS): on a GPU against the float64 reference, and its
Python logic on CPU with a stand-in for the extension.

The GPU tests need a CUDA device and the built extension (csrc/README.md); they skip otherwise,
saying which. Shapes are deliberately odd (in/out not multiples of 16, ranks 1 to 64, 1 to 130
rows) so that every tile edge of the kernels is crossed.

Without a GPU, ``edora_kernels/backends/cuda.py`` runs on CPU tensors against ``StandIn``: each
function of ``edora_kernels._C`` written in torch ops, to the kernel's contract (csrc/README.md:
the same outputs, the same partial-sum layout per block of rows, the same slots and kept z
columns) and asserting the binding's argument rules. Through the op, cuda.py + the stand-in is
checked against the torch backend and the float64 reference; a dispatch-mode count shows how many
launches a step issues (each ``_C`` call one, plus every ATen op cuda.py calls itself) and that
none of them waits on the device.

The slow tests run the kernels themselves without a GPU: csrc/ compiled by the host compiler
against csrc/emulation/cpu_emulation.h (a block's threads as fibers that switch at barriers),
checked against the stand-in function by function and, through cuda.py, against the reference.
That covers the kernels' index arithmetic, tiling, barriers and reduction orders; concurrency
between blocks, the GPU's memory model and nvcc's code are covered only by the GPU tests.
"""
import importlib.util
import math
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    check_backend,
    check_outputs,
    epilogue_on_dense_base,
    op_outputs,
    reference_with_grads,
    requires_cuda,
    run_with_grads,
)
from torch.utils._python_dispatch import TorchDispatchMode

from edora_kernels import (
    backend_info,
    backends,
    base_norm_terms,
    edora_epilogue,
    edora_linear,
    op_common,
    ops,
)
from edora_kernels.backends import torch_backend
from edora_kernels.bench.launches import SYNC_OPS
from edora_kernels.norm import NORM_SQ_FLOOR, NormTerms, compute_norm_terms
from edora_kernels.plan import plan_step
from edora_kernels.reference import edora_linear_reference
from edora_kernels.testing import make_case
from edora_kernels.tolerances import TOLERANCE, normalised_error

try:
    from edora_kernels import _C
    _NOT_BUILT = None
except ImportError as err:
    _C = None
    _NOT_BUILT = f"the CUDA extension is not built ({err}); see csrc/README.md"

_ON_GPU = (requires_cuda, pytest.mark.gpu,
           pytest.mark.skipif(_NOT_BUILT is not None, reason=str(_NOT_BUILT)))


def gpu_test(fn):
    for mark in _ON_GPU:
        fn = mark(fn)
    return fn


SHAPES = [(77, 93), (130, 67)]  # (in, out)
RANKS = [1, 3, 16, 64]
ROWS = [1, 37, 130]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# A training step (forward + backward) and an inference forward may launch at most this many
# kernels (docs/DESIGN.md §4).
STEP_LAUNCHES, INFERENCE_LAUNCHES = 8, 3


def linear(backend="cuda", **args):
    return edora_linear(**args, backend=backend)


def epilogue(x, weight, bias, A, B, R, magnitude, scaling, backend="cuda", **kwargs):
    """The epilogue op fed by a plain F.linear base: equals edora_linear in exact arithmetic."""
    c0, C = base_norm_terms(weight, A)
    return edora_epilogue(F.linear(x, weight, bias), x, bias, A, B, R, magnitude, scaling,
                          base_norm_sq=c0, base_times_A=C, backend=backend, **kwargs)


def problem(n_rows, in_features, out_features, rank, dtype, **kwargs):
    return make_case(n_rows, in_features, out_features, rank, dtype=dtype, device="cuda",
                     **kwargs).op_args()


def check_against_reference(fn, args, dtype, **kwargs):
    """Each output within the tolerance table, or within 2× the torch backend's error on the
    same GPU where that is larger (DESIGN's rule, "≤ 2× PyTorch at the same dtype"): in fp16 and
    bf16 the torch backend itself exceeds the table on some reductions over rows (dR at rank 1)."""
    y, grads = run_with_grads(fn, args, **kwargs)
    y_torch, grads_torch = run_with_grads(fn, args, backend="torch", **kwargs)
    y_ref, grads_ref = reference_with_grads(args, **kwargs)
    assert y.dtype == dtype and y.device.type == "cuda"
    outputs = {"y": (y, y_torch, y_ref)}
    outputs.update({f"d{k}": (grads[k], grads_torch[k], grads_ref[k]) for k in grads})
    for what, (got, anchor, expected) in outputs.items():
        assert got.dtype == dtype and got.shape == expected.shape, what
        assert torch.isfinite(got).all(), what
        err = normalised_error(got, expected)
        bound = max(TOLERANCE[dtype], 2 * normalised_error(anchor, expected))
        assert err <= bound, f"{what}: normalised error {err:.3g} > {bound:.3g} ({dtype})"


def _capacity_two(monkeypatch):
    """Two zero-magnitude slots whatever the device (as tests/test_triton.py does)."""
    def capacity(magnitude, save, *backend):
        return 2 if save else 0
    monkeypatch.setattr(op_common, "slot_capacity", capacity)
    monkeypatch.setattr(ops, "slot_capacity", capacity)


# ------------------------------------------------------------------------------------------------
# On a GPU, with the built extension
# ------------------------------------------------------------------------------------------------

@gpu_test
def test_backend_reports_available():
    assert backend_info()["cuda"]["available"], backend_info()["cuda"]


@gpu_test
def test_extension_constants_match_the_package():
    assert _C.NORM_SQ_FLOOR == NORM_SQ_FLOOR
    assert (_C.SLOT_NONE, _C.SLOT_FULL) == (op_common.SLOT_NONE, op_common.SLOT_FULL)
    assert _C.MAX_RANK == 128


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("n_rows", ROWS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_matches_reference(shape, rank, n_rows, detach_norm, dtype):
    args = problem(n_rows, *shape, rank, dtype, seed=rank + n_rows)
    check_against_reference(linear, args, dtype, detach_norm=detach_norm)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows", ROWS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_epilogue_matches_reference(bias, rank, n_rows, dtype):
    """Exact norm gradient at 37 rows only."""
    args = problem(n_rows, 77, 93, rank, dtype, seed=rank, bias=bias)
    check_against_reference(epilogue, args, dtype, detach_norm=n_rows != 37)


@gpu_test
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float64], ids=str)
def test_adapters_in_another_dtype(adapter_dtype):
    """A, B, R, m in another dtype than x: converted on load (A for the dx GEMM by the
    pre-pass); dR and dm in the parameters' dtype."""
    args = problem(130, 77, 93, 16, torch.bfloat16, adapter_dtype=adapter_dtype, seed=3)
    for fn in (linear, epilogue):
        y, grads = run_with_grads(fn, args)
        y_ref, grads_ref = reference_with_grads(args)
        assert_close(y, y_ref, torch.bfloat16, "y")
        assert grads["R"].dtype == grads["magnitude"].dtype == adapter_dtype
        for name in grads:
            assert_close(grads[name], grads_ref[name], torch.bfloat16, f"d{name}")


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn", [linear, epilogue], ids=["linear", "epilogue"])
def test_no_grad_forward(fn, dtype):
    """Nothing saved: the linear kernel writes y over the x W0ᵀ buffer."""
    args = problem(130, 77, 93, 16, dtype)
    with torch.no_grad():
        y = fn(**args)
    assert_close(y, edora_linear_reference(**{k: v.double() if isinstance(v, torch.Tensor)
                                              else v for k, v in args.items()}), dtype, "y")


@gpu_test
@pytest.mark.parametrize("wanted", [("x",), ("magnitude",), ("R",), ("R", "magnitude")], ids=str)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_each_gradient_alone(wanted, detach_norm):
    """The pre-pass with gz and u only (x), column partials only (magnitude), the dR partials
    (R), both; the finalize's column blocks alone, its dR blocks alone, the exact launch."""
    args = problem(37, 77, 93, 3, torch.float32)
    gy = torch.randn(37, 93, device="cuda")
    grads = {}
    for name, fn, cast in (("cuda", linear, lambda t: t),
                           ("ref", edora_linear_reference, lambda t: t.double())):
        inputs = {k: (cast(v).detach().requires_grad_(k in wanted) if isinstance(v, torch.Tensor)
                      else v) for k, v in args.items()}
        y = fn(**inputs, detach_norm=detach_norm)
        grads[name] = torch.autograd.grad(y, [inputs[k] for k in wanted], cast(gy))
    for k, got, expected in zip(wanted, grads["cuda"], grads["ref"]):
        assert_close(got, expected, torch.float32, f"d{k}")


@gpu_test
def test_zero_rows():
    args = problem(0, 77, 93, 3, torch.float32)
    y, grads = run_with_grads(linear, args)
    assert y.shape == (0, 93)
    assert grads["x"].shape == (0, 77)
    assert torch.count_nonzero(grads["R"]) == 0 and torch.count_nonzero(grads["magnitude"]) == 0


@gpu_test
def test_non_contiguous_inputs():
    """Strided x reaches the prologue as it is; an expanded gy (y.sum()) the pre-pass."""
    args = problem(1, 77, 93, 16, torch.float32, seed=3)
    x = torch.randn(2, 5, 154, device="cuda")[..., ::2]  # strided rows and columns
    y = linear(**{**args, "x": x})
    expected = edora_linear_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                         for k, v in {**args, "x": x}.items()})
    assert y.shape == (2, 5, 93)
    assert_close(y, expected, torch.float32, "y")
    R = args["R"].detach().requires_grad_()
    (dR,) = torch.autograd.grad(linear(**{**args, "R": R}).sum(), [R])
    (dR_ref,) = torch.autograd.grad(linear(**{**args, "R": R}, backend="torch").sum(), [R])
    assert_close(dR, dR_ref.double(), torch.float32, "dR")


@gpu_test
def test_epilogue_leaves_y0_alone():
    args = problem(37, 77, 93, 16, torch.float32)
    c0, C = base_norm_terms(args["weight"], args["A"])
    rest = {k: args[k] for k in ("bias", "A", "B", "R", "magnitude", "scaling")}
    y0 = F.linear(args["x"], args["weight"], args["bias"])
    y0_t = y0.T.contiguous().T  # same values, column-major: read with its strides
    ys = []
    for base in (y0, y0_t):
        before = base.clone()
        ys.append(edora_epilogue(base, args["x"], **rest, base_norm_sq=c0, base_times_A=C,
                                 backend="cuda"))
        assert torch.equal(base, before)
    assert torch.equal(ys[0], ys[1])


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_gradients(dtype):
    """Many row blocks in the pre-pass (20000 rows): dm and dR identical bit for bit."""
    args = problem(20000, 200, 300, 16, dtype)
    runs = [run_with_grads(linear, args, detach_norm=False) for _ in range(3)]
    (y, grads), *others = runs
    for y_other, grads_other in others:
        assert torch.equal(y, y_other)
        for name in ("R", "magnitude"):
            assert torch.equal(grads[name], grads_other[name]), f"d{name} differs between runs"
    _, grads_ref = reference_with_grads(args, detach_norm=False)
    assert_close(grads["magnitude"], grads_ref["magnitude"], dtype, "dmagnitude")


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_magnitudes_on_gpu(dtype, monkeypatch):
    """Zeros in several gate blocks keep their z in slots; a zero past the slots gets dm = NaN."""
    case = make_case(37, 50, 600, 8, dtype, "cuda", seed=5)
    case.magnitude[[0, 31, 32, 300, 599]] = 0.0
    check_backend(case, "cuda", dtype, f"zero magnitudes {dtype}")
    _capacity_two(monkeypatch)
    dm = op_outputs(case, "cuda")[3]
    assert not torch.isnan(dm[[0, 31]]).any() and torch.isnan(dm[[32, 300, 599]]).all()


@gpu_test
def test_large_rank_takes_the_torch_path():
    args = problem(5, 130, 140, 129, torch.float32, seed=9)
    check_against_reference(linear, args, torch.float32)


@gpu_test
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_launches_and_syncs_on_gpu(detach_norm):
    """The profiler's count of device work in one training step and one inference forward,
    and no call that makes the host wait."""
    from torch.profiler import ProfilerActivity, profile
    args = problem(256, 128, 192, 16, torch.bfloat16, adapter_dtype=torch.float32)
    inputs = {k: (v.detach().requires_grad_(k in ("x", "R", "magnitude"))
                  if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    terms = compute_norm_terms(args["weight"], args["A"])
    gy = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)

    def step():
        y = edora_linear(**inputs, backend="cuda", detach_norm=detach_norm, norm_terms=terms)
        torch.autograd.grad(y, [inputs["x"], inputs["R"], inputs["magnitude"]], gy)

    def infer():
        with torch.no_grad():
            edora_linear(**args, backend="cuda", norm_terms=terms)

    for fn, budget in ((step, STEP_LAUNCHES), (infer, INFERENCE_LAUNCHES)):
        fn()  # warm up (cuBLAS handles, allocator)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        events = prof.events()
        kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        syncs = [e.name for e in events if e.name in (
            "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::item",
            "aten::_local_scalar_dense", "aten::nonzero")]
        assert len(kernels) <= budget, kernels
        assert not syncs, syncs


def _binding_rejects_bad_arguments(ext, dev):
    x, A, B = torch.zeros(4, 5, device=dev), torch.zeros(2, 5, device=dev), torch.zeros(
        6, 2, device=dev)
    R, m = torch.zeros(2, 2, device=dev), torch.ones(6, device=dev)
    c0, C, G = (torch.zeros(s, device=dev, dtype=torch.float64) for s in ((6,), (6, 2), (2, 2)))
    with pytest.raises(RuntimeError, match="rank must be in"):
        ext.prologue(x, torch.zeros(129, 5, device=dev), B, R, m, c0, C, G, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"R must have shape \[2, 2\]"):
        ext.prologue(x, A, B, R[:1], m, c0, C, G, 1.0, 0)
    with pytest.raises(RuntimeError, match="C must be Double"):
        ext.prologue(x, A, B, R, m, c0, C.float(), G, 1.0, 0)
    P, n, g, slots, v = ext.prologue(x, A, B, R, m, c0, C, G, 1.0, 0)
    base = torch.zeros(4, 6, device=dev)
    with pytest.raises(RuntimeError, match="P must be Double"):
        ext.rescale(base, v, P.float(), g, None, slots, 0, 1.0, False, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[6\]"):
        ext.rescale(base, v, P, g, torch.zeros(5, device=dev), slots, 0, 1.0, False, False)
    with pytest.raises(RuntimeError, match="slots must be given"):
        ext.rescale(base, v, P, g, None, slots, 2, 1.0, False, False)
    with pytest.raises(RuntimeError, match="base must be contiguous"):
        ext.rescale(base.T.contiguous().T, v, P, g, None, slots, 0, 1.0, False, True)
    gy = torch.zeros(4, 6, device=dev)
    zbuf = torch.zeros(4, 0, device=dev)
    with pytest.raises(RuntimeError, match="rows_per_block must be a positive multiple"):
        ext.prepass(gy, gy, None, g, B, R, A, v, slots, zbuf, 1.0, 48, True, True, True, True,
                    False)
    with pytest.raises(RuntimeError, match="y must be Float"):
        ext.prepass(gy, gy.half(), None, g, B, R, A, v, slots, zbuf, 1.0, 32, True, True, True,
                    True, False)
    _, _, _, cs_part, dr_part = ext.prepass(gy, gy, None, g, B, R, A, v, slots, zbuf, 1.0, 32,
                                            True, True, True, True, False)
    with pytest.raises(RuntimeError, match="exact needs need_dR"):
        ext.finalize(cs_part, dr_part, m, n, slots, B, P, C, G, R, 1.0, False, True, True)
    with pytest.raises(RuntimeError, match="as many parts"):
        ext.finalize(cs_part, dr_part[:0], m, n, slots, B, P, C, G, R, 1.0, True, True, False)
    with pytest.raises(RuntimeError, match="shares must be Double"):
        ext.finalize_exact(dr_part, dr_part, R, 1.0)


@gpu_test
def test_binding_rejects_bad_arguments():
    _binding_rejects_bad_arguments(_C, "cuda")


# ------------------------------------------------------------------------------------------------
# Without a GPU: cuda.py against a stand-in for the extension
# ------------------------------------------------------------------------------------------------

def _acc(dtype):
    """The kernels' accumulator (and v, g, partials) dtype for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(cond, message):
    """The binding's argument rules: a TORCH_CHECK there, a RuntimeError here."""
    if not cond:
        raise RuntimeError(f"stand-in: {message}")


def _check_like(name, t, dtype, shape):
    _check(t.dtype == dtype and tuple(t.shape) == tuple(shape) and t.is_contiguous(),
           f"{name} must be contiguous {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)} "
           f"strides {t.stride()}")


def _slots(slots, out):
    if slots.numel() == 0:
        return None
    _check_like("slots", slots, torch.int32, (out,))
    return slots


class StandIn:
    """``edora_kernels._C`` in torch ops: each function computes exactly what its kernel does
    (csrc/edora_kernels.cuh and csrc/README.md), in the kernel's precisions, with the kernel's
    partial-sum layout, and checks the binding's argument rules. Every call is one launch; the
    ``log`` list records them."""

    MAX_RANK = 128
    PREPASS_TILE_ROWS = 32
    FINALIZE_SHARE_COLUMNS = 32
    SLOT_NONE = -1
    SLOT_FULL = -2
    NORM_SQ_FLOOR = 1e-24

    def __init__(self):
        self.log = []

    def _called(self, name):
        self.log.append(name)
        if _LaunchCounter.active is not None:
            _LaunchCounter.active.launches.append(f"_C.{name}")

    # --- forward

    def prologue(self, x, A, B, R, magnitude, c0, C, G, scaling, capacity):
        """P = B R, n, g = m / n (float64, g rounded to the accumulator), slots; v = x Aᵀ."""
        with _LaunchCounter.paused():
            self._called("prologue")
            rank, out = A.shape[0], B.shape[0]
            _check(1 <= rank <= self.MAX_RANK, f"rank must be in [1, {self.MAX_RANK}]")
            _check(tuple(B.shape) == (out, rank) and tuple(R.shape) == (rank, rank)
                   and tuple(magnitude.shape) == (out,) and A.shape[1] == x.shape[1],
                   "adapter shapes")
            _check(all(t.dtype == torch.float64 for t in (c0, C, G)), "norm terms must be Double")
            acc, f64 = _acc(x.dtype), torch.float64
            P = B.to(f64) @ R.to(f64)
            n_sq = c0 + (2.0 * scaling) * (P * C).sum(1) + (scaling * scaling) * (
                (P @ G) * P).sum(1)
            n = n_sq.clamp_min(self.NORM_SQ_FLOOR).sqrt()
            g = (magnitude.to(f64) / n).to(acc)
            slots = torch.empty(0, dtype=torch.int32)
            if capacity > 0:
                zero = magnitude == 0
                order = torch.cumsum(zero, 0) - 1  # zeros in earlier columns
                slots = torch.where(zero, torch.where(order < capacity, order, self.SLOT_FULL),
                                    self.SLOT_NONE).to(torch.int32)
            v = x.to(acc) @ A.to(acc).T
            return P, n, g, slots, v

    def rescale(self, base, v, P, g, bias, slots, capacity, scaling, subtract_bias,
                overwrite_base):
        """z = base − [b] + s·v Pᵀ, y = g ⊙ z + b rounded once; zbuf[:, slot] = z there."""
        with _LaunchCounter.paused():
            self._called("rescale")
            (N, out), rank = base.shape, P.shape[1]
            acc = _acc(base.dtype)
            _check_like("v", v, acc, (N, rank))
            _check_like("P", P, torch.float64, (out, rank))
            _check_like("g", g, acc, (out,))
            _check(bias is None or (bias.dtype == base.dtype and tuple(bias.shape) == (out,)),
                   "bias")
            slots = _slots(slots, out)
            _check((capacity > 0) == (slots is not None), "slots must be given")
            _check(not overwrite_base or base.is_contiguous(), "base must be contiguous")
            b = torch.zeros(out, dtype=acc) if bias is None else bias.to(acc)
            z = base.to(acc) - (b if subtract_bias else 0.0) + scaling * (v @ P.to(acc).T)
            y = (g * z + b).to(base.dtype)
            zbuf = base.new_empty(N, capacity)
            if slots is not None:
                kept = slots >= 0
                zbuf[:, slots[kept].long()] = z[:, kept].to(base.dtype)
            if overwrite_base:
                y = base.copy_(y)
            return y, zbuf

    # --- backward

    def prepass(self, gy, y, bias, g, B, R, A, v, slots, zbuf, scaling, rows_per_block,
                write_gz, need_u, need_dr, need_colsum, convert_A):
        """gz, u (t = (gy ⊙ g) B in the accumulator), A in gy's dtype, and per block of
        ``rows_per_block`` rows the column partials of gy ⊙ (y − b) (gy ⊙ zbuf[:, slot] for slot
        columns) and the partial tᵀ v."""
        with _LaunchCounter.paused():
            self._called("prepass")
            (N, out), (rank, in_features) = gy.shape, A.shape
            acc = _acc(gy.dtype)
            tile = self.PREPASS_TILE_ROWS
            _check(rows_per_block >= tile and rows_per_block % tile == 0,
                   "rows_per_block must be a positive multiple of 32")
            _check(1 <= rank <= self.MAX_RANK, "rank")
            _check_like("g", g, acc, (out,))
            _check(tuple(B.shape) == (out, rank) and tuple(R.shape) == (rank, rank), "B, R")
            parts = -(-N // rows_per_block)
            blocks = [slice(p * rows_per_block, (p + 1) * rows_per_block) for p in range(parts)]
            dy = gy.to(acc)
            gz = dy * g
            t = gz @ B.to(acc)  # from gz before its rounding to gy's dtype
            empty = gy.new_empty(0)
            u = (scaling * (t @ R.to(acc))).to(gy.dtype) if need_u else empty
            cs_part = dr_part = torch.empty(0, dtype=acc)
            if need_colsum:
                _check(y.dtype == gy.dtype and y.shape == gy.shape, "y")
                z = y.to(acc) - (0.0 if bias is None else bias.to(acc))
                slots = _slots(slots, out)
                if slots is not None:
                    _check_like("zbuf", zbuf, gy.dtype, (N, zbuf.shape[1]))
                    kept = slots >= 0
                    z[:, kept] = zbuf[:, slots[kept].long()].to(acc)
                product = dy * z
                cs_part = torch.stack([product[rows].sum(0) for rows in blocks]) if parts else (
                    torch.zeros(0, out, dtype=acc))
            if need_dr:
                _check_like("v", v, acc, (N, rank))
                dr_part = torch.stack([t[rows].T @ v[rows] for rows in blocks]) if parts else (
                    torch.zeros(0, rank, rank, dtype=acc))
            a_cast = A.to(gy.dtype) if convert_A else empty
            assert not convert_A or tuple(a_cast.shape) == (rank, in_features)
            return (gz.to(gy.dtype) if write_gz else empty), u, a_cast, cs_part, dr_part

    def finalize(self, cs_part, dr_part, magnitude, n, slots, B, P, C, G, R, scaling, need_dR,
                 need_dm, exact):
        """dm = S / n from the column partials, dR = s·Σ partials; with ``exact`` the column
        blocks' shares of the norm's gradient instead of dR."""
        with _LaunchCounter.paused():
            self._called("finalize")
            f64, (out, rank) = torch.float64, B.shape
            _check(not exact or need_dR, "exact needs need_dR")
            dR, dm = R.new_empty(0), magnitude.new_empty(0)
            shares = torch.empty(0, rank, rank, dtype=f64)
            if need_dm or exact:
                _check(cs_part.dim() == 2 and cs_part.shape[1] == out, "cs_part")
                colsum = cs_part.to(f64).sum(0)
                m = magnitude.to(f64)
                S = colsum * n / torch.where(m == 0, 1.0, m)
                slots = _slots(slots, out)
                if slots is not None:
                    S = torch.where(slots >= 0, colsum, S)
                    S = torch.where(slots == self.SLOT_FULL, math.nan, S)
                if need_dm:
                    dm = (S / n).to(magnitude.dtype)
                if exact:
                    _check_like("P", P, f64, (out, rank))
                    coef = (-m * S / (n * n)) / n
                    grad_P = coef[:, None] * (scaling * C + (scaling * scaling) * (P @ G))
                    width = self.FINALIZE_SHARE_COLUMNS
                    shares = torch.stack([B[j:j + width].to(f64).T @ grad_P[j:j + width]
                                          for j in range(0, out, width)])
            if need_dR and not exact:
                _check(dr_part.dim() == 3, "dr_part")
                dR = (scaling * dr_part.to(f64).sum(0)).to(R.dtype)
            return dR, dm, shares

    def finalize_exact(self, dr_part, shares, R, scaling):
        """dR = s·Σ partials + Σ shares."""
        with _LaunchCounter.paused():
            self._called("finalize_exact")
            f64 = torch.float64
            return (scaling * dr_part.to(f64).sum(0) + shares.sum(0)).to(R.dtype)


class _LaunchCounter(TorchDispatchMode):
    """Records the ATen ops that would launch a kernel on a GPU (not views, not allocations) and
    the stand-in's calls; ops inside the stand-in are not cuda.py's and are skipped."""

    active = None
    NO_KERNEL = {"empty.memory_format", "empty_strided.default", "new_empty.default",
                 "new_empty_strided.default", "empty_like.default",
                 "_unsafe_view.default"}  # a view in all but name
    SYNCS = {op.removeprefix("aten::") for op in SYNC_OPS}

    def __init__(self):
        super().__init__()
        self.launches = []
        self._paused = False

    def __enter__(self):
        _LaunchCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        _LaunchCounter.active = None
        return super().__exit__(*exc)

    @staticmethod
    def paused():
        counter = _LaunchCounter.active

        class _Pause:
            def __enter__(self):
                if counter is not None:
                    self.was, counter._paused = counter._paused, True

            def __exit__(self, *exc):
                if counter is not None:
                    counter._paused = self.was
        return _Pause()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and not func.is_view and func._opname + "." + func._overloadname \
                not in self.NO_KERNEL:
            self.launches.append(f"aten::{func._opname}")
        return func(*args, **(kwargs or {}))

    def syncs(self):
        return [op for op in self.launches if op.removeprefix("aten::") in self.SYNCS]


@pytest.fixture
def standin():
    return StandIn()


def _load_cuda_module(monkeypatch, extension):
    """``edora_kernels/backends/cuda.py`` loaded afresh against ``extension`` (in place of
    ``edora_kernels._C``), and the op's ``backend="cuda"`` pointed at it for CPU tensors."""
    import edora_kernels
    monkeypatch.setitem(sys.modules, "edora_kernels._C", extension)
    monkeypatch.setattr(edora_kernels, "_C", extension, raising=False)
    path = Path(edora_kernels.__file__).parent / "backends" / "cuda.py"
    spec = importlib.util.spec_from_file_location("edora_cuda_backend_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    steps = SimpleNamespace(**{fn: getattr(module, fn) for fn in backends.STEP_FUNCTIONS})
    resolve, load = backends.resolve, backends.load
    monkeypatch.setattr(backends, "resolve",
                        lambda name, device: "cuda" if name == "cuda" else resolve(name, device))
    monkeypatch.setattr(backends, "load", lambda name: steps if name == "cuda" else load(name))
    return module


@pytest.fixture
def cuda_on_cpu(monkeypatch, standin):
    return _load_cuda_module(monkeypatch, standin)


CPU_SHAPES = ((97, 75), (70, 131))  # (in, out): odd; out > in, room for rank 64


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("n_rows", [0, 1, 37, 130])
@pytest.mark.parametrize("rank", [1, 3, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_linear_on_cpu(cuda_on_cpu, standin, dtype, rank, n_rows, detach_norm):
    in_f, out_f = CPU_SHAPES[1] if rank == 64 else CPU_SHAPES[0]
    case = make_case(n_rows, in_f, out_f, rank, dtype, seed=rank * 100 + n_rows)
    check_backend(case, "cuda", dtype, f"{dtype} r={rank} n={n_rows}", detach_norm=detach_norm)
    expected = ["prologue", "rescale", "prepass", "finalize"] + (
        [] if detach_norm else ["finalize_exact"])
    assert standin.log == expected


@pytest.mark.parametrize("grad_x", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_bias_and_input_gradient_on_cpu(cuda_on_cpu, bias, grad_x):
    case = make_case(130, *CPU_SHAPES[1], 16, torch.float32, bias=bias, seed=17)
    actual, _ = check_backend(case, "cuda", torch.float32, "bias/dx", grad_x=grad_x)
    assert (actual[1] is None) == (not grad_x)


@pytest.mark.parametrize("model,adapters", [(torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float64)], ids=str)
def test_adapters_in_another_dtype_on_cpu(cuda_on_cpu, standin, model, adapters):
    case = make_case(37, *CPU_SHAPES[0], 16, model, adapter_dtype=adapters, seed=3)
    actual, _ = check_backend(case, "cuda", model, f"{model} model, {adapters} adapters")
    assert actual[2].dtype == actual[3].dtype == adapters


def _check_layouts(module):
    """Strided x (prologue), an expanded gy (pre-pass: y.sum()), a column-major y0 (rescale):
    all read with their strides, no copies."""
    case = make_case(1, *CPU_SHAPES[0], 16, torch.float32, seed=13)
    x = torch.randn(2, 40, 2 * CPU_SHAPES[0][0]).to(case.x)[:, ::3, ::2]
    check_backend(case, "cuda", torch.float32, "strided x", x=x)
    args = {k: (v.detach().clone().requires_grad_(k in ("x", "R", "magnitude"))
                if isinstance(v, torch.Tensor) else v) for k, v in case.op_args().items()}
    wrt = [args["x"], args["R"], args["magnitude"]]
    got = torch.autograd.grad(linear(**args).sum(), wrt)  # gy is an expanded scalar
    expected = torch.autograd.grad(linear(**args, backend="torch").sum(), wrt)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    case = make_case(37, *CPU_SHAPES[0], 16, torch.float64, seed=7)
    terms = compute_norm_terms(case.weight, case.A)
    y0 = F.linear(case.x, case.weight, case.bias)
    rest = (case.bias, case.A, case.B, case.R, case.magnitude, terms, case.scaling, True, 0)
    ys = []
    for base in (y0, y0.T.contiguous().T):  # contiguous, column-major: both read as they are
        before = base.clone()
        ys.append(module.epilogue_forward(base, case.x, *rest)[0])
        assert torch.equal(base, before)
        assert ys[-1].data_ptr() != base.data_ptr()
    torch.testing.assert_close(ys[0], ys[1])


def test_layouts_on_cpu(cuda_on_cpu):
    _check_layouts(cuda_on_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_magnitudes_keep_their_z_in_slots_on_cpu(cuda_on_cpu, dtype):
    """Zeros spread over the gate blocks; the k-th zero takes slot k; y = b there."""
    case = make_case(37, 50, 300, 8, dtype, seed=59)
    zeros = [0, 31, 32, 40, 299]
    case.magnitude[zeros] = 0.0
    terms = compute_norm_terms(case.weight, case.A)
    args = (case.x, case.weight, case.bias, case.A, case.B, case.R, case.magnitude, terms,
            case.scaling, True, 8)
    y, saved = cuda_on_cpu.forward(*args)
    _, expected = torch_backend.forward(*args)
    assert torch.equal(saved.slots, expected.slots)
    assert torch.equal(saved.slots[zeros], torch.arange(5, dtype=torch.int32))
    assert_close(saved.zbuf[:, :5], expected.zbuf[:, :5].double(), dtype, "kept z")
    assert torch.equal(y[:, zeros], case.bias[zeros].expand(37, 5))
    for detach_norm in (True, False):
        check_backend(case, "cuda", dtype, f"zero magnitudes {dtype}", detach_norm=detach_norm)


def test_zero_magnitudes_past_the_slots_get_nan_on_cpu(cuda_on_cpu, monkeypatch):
    _capacity_two(monkeypatch)
    case = make_case(37, *CPU_SHAPES[0], 3, torch.float32, seed=61)
    case.magnitude[[5, 9, 60]] = 0.0
    dm = op_outputs(case, "cuda")[3]
    assert torch.isnan(dm[60]) and not torch.isnan(dm[[5, 9]]).any()
    rest = torch.ones_like(dm, dtype=torch.bool)
    rest[60] = False
    assert_close(dm[rest], op_outputs(case)[3][rest], torch.float32, "dm")
    # the exact norm gradient takes S: dR is NaN with it, as the torch backend's
    for backend in ("cuda", "torch"):
        assert torch.isnan(op_outputs(case, backend, detach_norm=False)[2]).all(), backend


def _check_epilogue_against_torch(case, dtype, detach_norm, label):
    """The epilogue op on the CUDA backend against the reference, with the torch backend's
    error as the baseline."""
    results = []
    for backend in ("cuda", "torch"):
        y, grads = run_with_grads(epilogue_on_dense_base, case.op_args(), backend=backend,
                                  detach_norm=detach_norm)
        results.append((y, grads["x"], grads["R"], grads["magnitude"]))
    check_outputs(results[0], op_outputs(case, detach_norm=detach_norm), dtype, label,
                  results[1])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_epilogue_on_cpu(cuda_on_cpu, standin, dtype, detach_norm, bias):
    case = make_case(37, *CPU_SHAPES[0], 3, dtype, seed=53, bias=bias)
    _check_epilogue_against_torch(case, dtype, detach_norm, f"epilogue {dtype}")
    assert standin.log[:2] == ["prologue", "rescale"]


def test_large_rank_takes_the_torch_path_on_cpu(cuda_on_cpu, standin):
    case = make_case(5, 130, 140, 129, torch.float32, seed=29)
    check_backend(case, "cuda", torch.float32, "rank 129")
    assert standin.log == []


@pytest.mark.parametrize("save", [True, False])
def test_forward_contract_on_cpu(cuda_on_cpu, save):
    """Saved: v in the compute dtype (empty unless save), P and n float64, g fp32."""
    case = make_case(130, *CPU_SHAPES[0], 3, torch.bfloat16, seed=37)
    terms = compute_norm_terms(case.weight, case.A)
    args = (case.x, case.weight, case.bias, case.A, case.B, case.R, case.magnitude, terms,
            case.scaling, save, 0)
    y, saved = cuda_on_cpu.forward(*args)
    ey, esaved = torch_backend.forward(*args)
    assert y.dtype == torch.bfloat16 and saved.P.dtype == saved.n.dtype == torch.float64
    assert saved.g.dtype == torch.float32
    torch.testing.assert_close(saved.P, esaved.P)
    torch.testing.assert_close(saved.n, esaved.n)
    assert saved.v.shape == ((130, 3) if save else (0,)) and saved.v.dtype == torch.float32
    assert saved.slots.shape == (0,) and saved.zbuf.shape == (130, 0)


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, False, False)],
                         ids=["all", "dx", "dR", "dm", "none"])
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_backward_contract_on_cpu(cuda_on_cpu, standin, need, detach_norm):
    """Each gradient alone; the ones not asked for come back empty, and nothing is launched
    for them."""
    case = make_case(130, *CPU_SHAPES[1], 16, torch.float64, seed=43)
    terms = compute_norm_terms(case.weight, case.A)
    args = (case.weight, case.bias, case.A, case.B, case.R, case.magnitude)
    y, saved = torch_backend.forward(case.x, *args, terms, case.scaling, True, 0)
    bwd_terms = NormTerms(None, terms.C, terms.G)
    got = cuda_on_cpu.backward(case.gy, *args, bwd_terms, case.scaling, detach_norm, y, saved,
                               *need)
    expected = torch_backend.backward(case.gy, *args, bwd_terms, case.scaling, detach_norm, y,
                                      saved, True, True, True)
    for wanted, a, e, name in zip(need, got, expected, ("dx", "dR", "dm")):
        if wanted:
            torch.testing.assert_close(a, e, msg=name)
        else:
            assert a.numel() == 0, name
    need_dx, need_dR, need_dm = need
    launches = ([] if not any(need) else ["prepass"]) + (
        ["finalize"] if need_dR or need_dm else []) + (
        ["finalize_exact"] if need_dR and not detach_norm else [])
    assert standin.log == launches


def test_outputs_share_no_memory_on_cpu(cuda_on_cpu):
    case = make_case(37, *CPU_SHAPES[0], 3, torch.float32, seed=1)
    terms = compute_norm_terms(case.weight, case.A)
    args = (case.weight, case.bias, case.A, case.B, case.R, case.magnitude)
    y, saved = cuda_on_cpu.forward(case.x, *args, terms, case.scaling, True, 0)
    grads = cuda_on_cpu.backward(case.gy, *args, NormTerms(None, terms.C, terms.G),
                                 case.scaling, True, y, saved, True, True, True)
    outputs = [t for t in (y, *saved, *grads) if t.numel() > 0]
    ptrs = [t.untyped_storage().data_ptr() for t in outputs]
    assert len(set(ptrs)) == len(ptrs), "two outputs share memory"
    inputs = {t.untyped_storage().data_ptr() for t in (case.x, case.gy, *args, *terms)
              if t is not None and t.numel() > 0}
    assert not inputs & set(ptrs), "an output aliases an input"


def test_rows_per_block(cuda_on_cpu, monkeypatch):
    """Whole 32-row tiles; at most ROW_BLOCKS_PER_SM blocks per multiprocessor once the tokens
    fill them; a function of the token count and the device only."""
    monkeypatch.setattr(cuda_on_cpu, "_multiprocessors", lambda device: 132)
    blocks_max = cuda_on_cpu.ROW_BLOCKS_PER_SM * 132
    cpu = torch.device("cpu")
    for n_rows in (0, 1, 31, 32, 33, 130, 4096, 12672, 12673, 10 ** 6):
        rows = cuda_on_cpu._rows_per_block(n_rows, cpu)
        assert rows >= 32 and rows % 32 == 0
        blocks = -(-n_rows // rows)
        assert blocks <= blocks_max
        if n_rows <= 32 * blocks_max:
            assert rows == 32  # one tile per block while there are blocks to spare


def _count_step(module, case, detach_norm, train=True, epilogue_op=False):
    """The launches of one step of the backend module (forward, and backward when ``train``)."""
    terms = compute_norm_terms(case.weight, case.A)
    capacity = op_common.ZERO_SLOTS if train else 0
    with _LaunchCounter() as counter:
        if epilogue_op:
            y0 = F.linear(case.x, case.weight, case.bias)
            counter.launches.clear()  # the caller's base layer
            y, saved = module.epilogue_forward(y0, case.x, case.bias, case.A, case.B, case.R,
                                               case.magnitude, terms, case.scaling, train,
                                               capacity)
            if train:
                module.epilogue_backward(case.gy, case.bias, case.A, case.B, case.R,
                                         case.magnitude, terms, case.scaling, detach_norm, y,
                                         saved, True, True, True, True)
        else:
            y, saved = module.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                                      case.magnitude, terms, case.scaling, train, capacity)
            if train:
                module.backward(case.gy, case.weight, case.bias, case.A, case.B, case.R,
                                case.magnitude, NormTerms(None, terms.C, terms.G), case.scaling,
                                detach_norm, y, saved, True, True, True)
    return counter


@pytest.mark.parametrize("adapters", [None, torch.float32], ids=["same-dtype", "fp32-adapters"])
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_launch_budget_on_cpu(cuda_on_cpu, detach_norm, adapters):
    """A training step: at most 8 launches (7 with the norm detached), an inference forward 3,
    the epilogue op's step at most 6 (forward 2); no host sync anywhere, adapters in another
    dtype included (A is converted by the pre-pass, not by a launch of its own)."""
    case = make_case(130, *CPU_SHAPES[0], 16, torch.bfloat16, adapter_dtype=adapters, seed=2)
    case.magnitude[[3, 50]] = 0.0  # slots in use
    step = _count_step(cuda_on_cpu, case, detach_norm)
    finalize = ["_C.finalize"] + ([] if detach_norm else ["_C.finalize_exact"])
    assert step.launches == ["_C.prologue", "aten::mm", "_C.rescale", "_C.prepass", *finalize,
                             "aten::mm", "aten::addmm_"]
    # the cost model lists the very launches (edora-kernels plan --backend cuda)
    planned = plan_step("cuda", 130, *CPU_SHAPES[0], 16, exact_norm=not detach_norm)
    assert [launch.name for launch in planned.launches] == step.launches
    assert len(step.launches) <= STEP_LAUNCHES and not step.syncs()
    inference = _count_step(cuda_on_cpu, case, detach_norm, train=False)
    assert inference.launches == ["_C.prologue", "aten::mm", "_C.rescale"]
    assert len(inference.launches) <= INFERENCE_LAUNCHES and not inference.syncs()
    epi = _count_step(cuda_on_cpu, case, detach_norm, epilogue_op=True)
    assert epi.launches == ["_C.prologue", "_C.rescale", "_C.prepass", *finalize, "aten::mm"]
    assert not epi.syncs()
    epi_inference = _count_step(cuda_on_cpu, case, detach_norm, train=False, epilogue_op=True)
    assert epi_inference.launches == ["_C.prologue", "_C.rescale"]


def test_launch_counter_sees_aten_launches_and_syncs():
    """The counter itself: conversions, copies and fills count, views and allocations do not,
    host reads are syncs."""
    x = torch.randn(4, 3)
    with _LaunchCounter() as counter:
        x.T.reshape(-1)            # a copy (the transpose is not contiguous)
        x.to(torch.float64)
        x.to(torch.float32)        # no-op
        torch.zeros(3)
        x.new_empty(5)
        x[0].sum().item()
    assert [op.removeprefix("aten::") for op in counter.launches] == [
        "clone", "_to_copy", "zeros", "sum", "_local_scalar_dense"]
    assert counter.syncs() == ["aten::_local_scalar_dense"]


# ------------------------------------------------------------------------------------------------
# Without a GPU: the kernels themselves, compiled for the CPU (slow: builds an extension)
# ------------------------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"
EMULATION_HEADER = CSRC / "emulation" / "cpu_emulation.h"
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def _split_arguments(text):
    """``a, f(b, c), d`` → ``["a", "f(b, c)", "d"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def _emulated_launch(match):
    grid, threads, *_ = _split_arguments(match[2])
    return f"edora_emulation::launch({match[1]}, dim3({grid}), dim3({threads}), {match[3]});"


def _host_sources(dest: Path) -> list[str]:
    """csrc/ as host C++ for cpu_emulation.h: every ``<<<...>>>`` launch rewritten, the binding's
    CUDA guard and stream replaced and its device checks pointed at CPU tensors."""
    for header in CSRC.glob("*.cuh"):
        shutil.copy(header, dest / header.name)
    sources = []
    for cu in sorted(CSRC.glob("*.cu")):
        text, launches = _LAUNCH.subn(_emulated_launch, cu.read_text())
        assert launches >= 1, f"no launch found in {cu.name}"
        (dest / f"{cu.stem}.cpp").write_text(text)
        sources.append(str(dest / f"{cu.stem}.cpp"))
    binding = (CSRC / "bindings.cpp").read_text()
    for old, new in (("#include <c10/cuda/CUDAGuard.h>\n", ""),
                     ("#include <c10/cuda/CUDAStream.h>\n", ""),
                     ("c10::cuda::CUDAGuard", "edora_emulation::Guard"),
                     (".is_cuda()", ".is_cpu()")):
        assert old in binding, old
        binding = binding.replace(old, new)
    binding, streams = re.subn(r"c10::cuda::getCurrentCUDAStream\([^;]*?\)\.stream\(\)",
                               "static_cast<cudaStream_t>(nullptr)", binding)
    assert streams == 1
    (dest / "bindings.cpp").write_text(binding)
    return [str(dest / "bindings.cpp"), *sources]


@pytest.fixture(scope="module")
def emulated_C(tmp_path_factory):
    """``edora_kernels._C`` built for the CPU from csrc/ with csrc/emulation/cpu_emulation.h."""
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        pytest.skip("ninja is needed to build the emulated extension")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME]
    includes = [Path(h) / "include" for h in homes if h]
    include = next((p for p in includes if (p / "cuda_fp16.h").is_file()), None)
    if include is None:
        pytest.skip("the CUDA headers (cuda_fp16.h under CUDA_HOME/include) are needed")
    sources = _host_sources(tmp_path_factory.mktemp("emulated_src"))
    return cpp_extension.load(
        name="edora_kernels_C_cpu_emulation", sources=sources,
        build_directory=str(tmp_path_factory.mktemp("emulated_build")),
        extra_include_paths=[str(Path(sources[0]).parent), str(include)],
        extra_cflags=["-O2", "-include", str(EMULATION_HEADER), "-Wno-unknown-pragmas",
                      "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"])


@pytest.fixture
def cuda_on_emulation(monkeypatch, emulated_C):
    return _load_cuda_module(monkeypatch, emulated_C)


@pytest.mark.slow
def test_layouts_under_emulation(cuda_on_emulation):
    _check_layouts(cuda_on_emulation)


@pytest.mark.slow
def test_binding_rejects_bad_arguments_under_emulation(emulated_C):
    _binding_rejects_bad_arguments(emulated_C, "cpu")


def test_launch_rewriting():
    src = "k<T><<<static_cast<unsigned>(n), dim3(32, 8), 0, stream>>>(a,\n    b);"
    assert _LAUNCH.sub(_emulated_launch, src) == (
        "edora_emulation::launch(k<T>, dim3(static_cast<unsigned>(n)), dim3(dim3(32, 8)), a,\n"
        "    b);")


EMULATED = [  # (dtype, adapter dtype, N, in, out, rank)
    (torch.float32, None, 37, 97, 75, 3),
    (torch.float32, None, 130, 70, 131, 64),
    (torch.float32, None, 0, 97, 75, 1),
    (torch.float64, None, 1, 97, 75, 16),
    (torch.bfloat16, torch.float32, 130, 97, 75, 16),
    (torch.float16, torch.float64, 37, 130, 140, 128),
]


@pytest.mark.slow
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("problem_", EMULATED, ids=lambda p: f"{p[0]}-{p[1]}-n{p[2]}-r{p[5]}")
def test_kernels_under_emulation(cuda_on_emulation, problem_, detach_norm):
    """The compiled kernels (on the CPU) through cuda.py and the op, against the reference."""
    dtype, adapters, n_rows, in_f, out_f, rank = problem_
    case = make_case(n_rows, in_f, out_f, rank, dtype, adapter_dtype=adapters, seed=rank + n_rows)
    case.magnitude[[2, out_f - 1]] = 0.0  # slots in use
    check_backend(case, "cuda", dtype, f"emulated {problem_}", detach_norm=detach_norm)
    _check_epilogue_against_torch(case, dtype, detach_norm, f"emulated epilogue {problem_}")


@pytest.mark.slow
def test_zero_magnitudes_under_emulation(cuda_on_emulation, monkeypatch):
    """Zeros spread over 19 gate blocks (the zero count before a block runs over > 256
    columns); then past two slots: NaN there only."""
    case = make_case(37, 50, 600, 8, torch.float32, seed=5)
    case.magnitude[[0, 31, 32, 40, 300, 599]] = 0.0
    for detach_norm in (True, False):
        check_backend(case, "cuda", torch.float32, "emulated zeros", detach_norm=detach_norm)
    _capacity_two(monkeypatch)
    dm = op_outputs(case, "cuda")[3]
    assert not torch.isnan(dm[[0, 31]]).any() and torch.isnan(dm[[32, 40, 300, 599]]).all()


def _assert_same(got, expected, what, tol):
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    if got.dtype == torch.int32:
        assert torch.equal(got, expected), what
        return
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), what
    got, expected = torch.nan_to_num(got.double()), torch.nan_to_num(expected.double())
    err = normalised_error(got, expected)
    assert err <= tol, f"{what}: {err:.3g} > {tol:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype,adapters", [(torch.float32, torch.float32),
                                            (torch.float64, torch.float32),
                                            (torch.bfloat16, torch.float16),
                                            (torch.float16, torch.float64)], ids=str)
@pytest.mark.parametrize("shape", [(37, 50, 300, 8, 3), (0, 20, 14, 1, 0), (130, 70, 131, 64, 16),
                                   (70, 40, 60, 128, 2)], ids=str)
def test_kernels_match_the_stand_in(emulated_C, standin, dtype, adapters, shape):
    """Function by function, every output of the compiled kernels against the stand-in's,
    partials included (two row-block sizes: one tile per block, two)."""
    n_rows, in_f, out_f, rank, capacity = shape
    gen = torch.Generator().manual_seed(rank)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    x, gy, base, bias = randn(n_rows, in_f), randn(n_rows, out_f), randn(n_rows, out_f), randn(
        out_f)
    A, B, R = randn(rank, in_f, dtype=adapters), randn(out_f, rank, dtype=adapters), randn(
        rank, rank, dtype=adapters) * 0.1
    m = (randn(out_f, dtype=torch.float64).abs() + 0.5).to(adapters)
    m[torch.randperm(out_f, generator=gen)[:5]] = 0.0
    W = randn(out_f, in_f, dtype=torch.float64)
    terms = (W * W).sum(1), W @ A.double().T, A.double() @ A.double().T
    s = 0.7
    loose = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    got = emulated_C.prologue(x, A, B, R, m, *terms, s, capacity)
    for name, a, e in zip(("P", "n", "g", "slots", "v"), got,
                          standin.prologue(x, A, B, R, m, *terms, s, capacity)):
        _assert_same(a, e, f"prologue {name}", 1e-12 if name in "Pn" else loose)
    P, n, g, slots, v = got
    for subtract in (False, True):
        y, zbuf = emulated_C.rescale(base, v, P, g, bias, slots, capacity, s, subtract, False)
        ey, ezbuf = standin.rescale(base, v, P, g, bias, slots, capacity, s, subtract, False)
        _assert_same(y, ey, "rescale y", loose)
        used = int((slots >= 0).sum()) if capacity else 0
        _assert_same(zbuf[:, :used], ezbuf[:, :used], "rescale zbuf", loose)
    flags = [(True, True, True, True, adapters != dtype), (False, False, False, True, False),
             (False, True, True, False, True)]
    for rows_per_block in (32, 64):
        for flag in flags:
            args = (gy, y, bias, g, B, R, A, v, slots, zbuf, s, rows_per_block, *flag)
            got = emulated_C.prepass(*args)
            for name, a, e in zip(("gz", "u", "A_cast", "cs_part", "dr_part"), got,
                                  standin.prepass(*args)):
                _assert_same(a, e, f"prepass {name} {flag}", 10 * loose)
            _, _, _, cs_part, dr_part = got
            for need_dR, need_dm, exact in ((True, True, False), (True, False, False),
                                            (False, True, False), (True, True, True)):
                if (need_dm or exact) and not flag[3] or need_dR and not flag[2]:
                    continue
                args = (cs_part, dr_part, m, n, slots, B, P, terms[1], terms[2], R, s, need_dR,
                        need_dm, exact)
                got_f, expected_f = emulated_C.finalize(*args), standin.finalize(*args)
                tol = 1e-3 if torch.float16 in (adapters, dtype) else 1e-6
                for name, a, e in zip(("dR", "dm", "shares"), got_f, expected_f):
                    _assert_same(a, e, f"finalize {name}", tol if name != "shares" else 1e-9)
                if exact:
                    _assert_same(emulated_C.finalize_exact(dr_part, got_f[2], R, s),
                                 standin.finalize_exact(dr_part, got_f[2], R, s),
                                 "finalize_exact", tol)
