"""The Triton backend against the float64 reference: forward, backward, the epilogue kernel.

Without a GPU these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) on small,
deliberately odd shapes; with a GPU the same tests run the compiled kernels on it.
"""
import pytest
import torch
import triton
from helpers import (
    assert_close,
    check_backend,
    check_outputs,
    epilogue_on_dense_base,
    op_outputs,
    run_with_grads,
    small_terms,
)

from edora_kernels import edora_linear
from edora_kernels.backends import torch_backend
from edora_kernels.backends.triton import bwd as triton_bwd
from edora_kernels.backends.triton import configs as triton_configs
from edora_kernels.backends.triton import epilogue_only as triton_epilogue
from edora_kernels.backends.triton import fwd as triton_fwd
from edora_kernels.testing import make_case
from edora_kernels.tolerances import TOLERANCE, normalised_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# in/out are no multiples of any block size; (70, 131) has out > in and allows rank 64.
SHAPES = ((97, 75), (70, 131))


# The interpreter's bf16 dot is broken; conftest's shim upcasts its operands (kernels untouched).
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")


# ------------------------------------------------------------------------------------------------
# Through the op: forward and backward against the fp64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 37, 130])
@pytest.mark.parametrize("rank", [1, 3, 16, 64])
def test_fp32_matches_reference(rank, n):
    in_f, out_f = SHAPES[1] if rank == 64 else SHAPES[0]
    case = make_case(n, in_f, out_f, rank, torch.float32, DEVICE, seed=rank * 1000 + n)
    check_backend(case, "triton", torch.float32, f"fp32 r={rank} n={n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank,n", [(1, 130), (3, 37), (16, 1), (64, 130)])
def test_half_precision_matches_reference(dtype, rank, n):
    in_f, out_f = SHAPES[1] if rank == 64 else SHAPES[0]
    case = make_case(n, in_f, out_f, rank, dtype, DEVICE, seed=rank + n)
    check_backend(case, "triton", dtype, f"{dtype} r={rank} n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [3, 16])
def test_exact_norm_gradient(dtype, rank):
    case = make_case(37, *SHAPES[0], rank, dtype, DEVICE, seed=7)
    _, expected = check_backend(case, "triton", dtype, f"detach_norm=False {dtype}",
                                detach_norm=False)
    # The exact-norm term must change dR by more than the table lets pass (else this test could
    # not fail): the detached gradient fails the same check.
    detached = op_outputs(case, None, detach_norm=True)[2]
    assert normalised_error(detached, expected[2]) > 3 * TOLERANCE[dtype]


def test_fp32_adapters_on_bf16_model():
    """A, B, R, m in fp32 with bf16 x and W0: loaded and cast inside the kernels."""
    case = make_case(130, *SHAPES[0], 16, torch.bfloat16, DEVICE, adapter_dtype=torch.float32,
                     seed=3)
    actual, _ = check_backend(case, "triton", torch.bfloat16, "bf16 model, fp32 adapters")
    assert actual[2].dtype == torch.float32 and actual[3].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_3d_input(dtype):
    case = make_case(1, *SHAPES[0], 3, dtype, DEVICE, seed=11)
    x = torch.randn(3, 13, SHAPES[0][0], generator=torch.Generator().manual_seed(5)).to(case.x)
    actual, _ = check_backend(case, "triton", dtype, f"3-D {dtype}", x=x)
    assert actual[0].shape == (3, 13, SHAPES[0][1])


def test_non_contiguous_input():
    """A transposed view reaches the kernel as is (stride along in ≠ 1); a strided 3-D slice."""
    case = make_case(1, *SHAPES[0], 16, torch.float32, DEVICE, seed=13)
    in_f = SHAPES[0][0]
    gen = torch.Generator().manual_seed(6)
    transposed = torch.randn(in_f, 37, generator=gen).to(DEVICE).T
    strided = torch.randn(2, 40, 2 * in_f, generator=gen).to(DEVICE)[:, ::3, ::2]
    for x in (transposed, strided):
        assert not x.is_contiguous()
        check_backend(case, "triton", torch.float32, f"strides {x.stride()}", x=x)


def test_without_input_gradient_and_without_bias():
    """x needs no grad: the dx kernel runs its t-only variant; no bias."""
    case = make_case(130, *SHAPES[1], 16, torch.float16, DEVICE, bias=False, seed=17)
    actual, _ = check_backend(case, "triton", torch.float16, "no dx, no bias", grad_x=False)
    assert actual[1] is None


def test_no_grad_forward_matches_training_forward():
    """save=False (no v, z stored) computes the very same y."""
    case = make_case(37, *SHAPES[0], 3, torch.float16, DEVICE, seed=19)
    R = case.R.detach().requires_grad_()
    y_train = edora_linear(case.x, case.weight, case.bias, case.A, case.B, R, case.magnitude,
                           case.scaling, backend="triton")
    with torch.no_grad():
        y_eval = edora_linear(case.x, case.weight, case.bias, case.A, case.B, R,
                              case.magnitude, case.scaling, backend="triton")
    assert y_train.requires_grad and not y_eval.requires_grad
    assert torch.equal(y_train.detach(), y_eval)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dm_dR_deterministic(detach_norm):
    case = make_case(130, *SHAPES[1], 16, torch.bfloat16, DEVICE, seed=23)
    first = op_outputs(case, "triton", detach_norm=detach_norm)
    second = op_outputs(case, "triton", detach_norm=detach_norm)
    for name, a, b in zip(("y", "dx", "dR", "dm"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_fp64_and_large_rank_take_the_torch_path():
    case = make_case(5, 130, 129, 129, torch.float32, DEVICE, seed=29)  # rank 129 > MAX_RANK
    check_backend(case, "triton", torch.float32, "rank 129")
    case = make_case(5, *SHAPES[0], 3, torch.float64, DEVICE, seed=31)
    check_backend(case, "triton", torch.float64, "fp64")


# ------------------------------------------------------------------------------------------------
# The backend functions directly
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [True, False])
def test_forward_contract(save):
    case = make_case(130, *SHAPES[0], 3, torch.float16, DEVICE, seed=37)
    P, _, g = small_terms(case)
    y, v = triton_fwd.forward(case.x, case.weight, case.bias, case.A, P, g, case.scaling, save)
    ey, ev = torch_backend.forward(*(t.double() for t in (case.x, case.weight, case.bias,
                                                           case.A, P, g)), case.scaling, True)
    assert y.dtype == torch.float16
    assert_close(y, ey, torch.float16, "y")
    if save:  # v is kept in fp32: it feeds dR's cancelling sum
        assert v.dtype == torch.float32
        assert_close(v, ev, torch.float32, "v")
    else:
        assert v.numel() == 0


def test_forward_with_strided_weight_and_empty_batch():
    case = make_case(37, *SHAPES[0], 16, torch.float32, DEVICE, seed=41)
    P, _, g = small_terms(case)
    weight_t = case.weight.T.contiguous().T  # same values, column-major
    assert not weight_t.is_contiguous()
    y, _ = triton_fwd.forward(case.x, weight_t, case.bias, case.A, P, g, case.scaling, False)
    ey, _ = torch_backend.forward(*(t.double() for t in (case.x, case.weight, case.bias,
                                                          case.A, P, g)), case.scaling, False)
    assert_close(y, ey, torch.float32, "strided weight")
    y0, v0 = triton_fwd.forward(case.x[:0], case.weight, case.bias, case.A, P, g, case.scaling,
                                True)
    assert y0.shape == (0, SHAPES[0][1]) and v0.shape == (0, 16)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True)])
def test_backward_contract(need, bias):
    need_dx, need_t, need_colsum = need
    dtype = torch.float16
    case = make_case(130, *SHAPES[1], 16, dtype, DEVICE, seed=43, bias=bias)
    P, RA, g = small_terms(case)
    y, _ = torch_backend.forward(case.x, case.weight, case.bias, case.A, P, g, case.scaling,
                                 False)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    dx, t, colsum = triton_bwd.backward(gy, case.weight, case.B, RA, g, y, case.bias,
                                        case.scaling, *need)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ex, et, ec = torch_backend.backward(d(gy), d(case.weight), d(case.B), d(RA), d(g), d(y),
                                        d(case.bias), case.scaling, True, True, True)
    for wanted, got, exp, name in ((need_dx, dx, ex, "dx"), (need_t, t, et, "t"),
                                   (need_colsum, colsum, ec, "colsum")):
        if wanted:
            assert_close(got, exp, dtype, name)
        else:
            assert got.numel() == 0, f"{name} computed although not needed"
    if need_colsum:
        assert colsum.dtype == torch.float32
        # several row slabs were summed (the fixed-order reduction is exercised)
        assert triton_bwd.colsum_slabs(130, SHAPES[1][1], DEVICE)[1] > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,n", [(1, 130), (16, 37), (64, 1)])
def test_epilogue_matches_reference(dtype, rank, n):
    in_f, out_f = SHAPES[1]
    case = make_case(n, in_f, out_f, rank, dtype, DEVICE, seed=rank + n + 47)
    P, _, g = small_terms(case)
    y0 = torch.nn.functional.linear(case.x, case.weight, case.bias)  # a "base layer" output
    v = case.x @ case.A.T
    y = triton_epilogue.epilogue(y0, v, case.bias, P, g, case.scaling)
    ez = (y0.double() - case.bias.double()) + case.scaling * v.double() @ P.double().T
    ey = g.double() * ez + case.bias.double()
    assert y.dtype == dtype
    assert_close(y, ey, dtype, "epilogue y")
    # and it is EDoRA's output when y0 is the dense base layer's
    assert_close(y, op_outputs(case)[0], dtype, "vs ref")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_epilogue_op(dtype):
    """edora_epilogue(..., backend="triton"): its forward runs the epilogue kernel."""
    case = make_case(37, *SHAPES[0], 3, dtype, DEVICE, seed=53)
    y, grads = run_with_grads(epilogue_on_dense_base, case.op_args(), backend="triton")
    actual = (y, grads["x"], grads["R"], grads["magnitude"])
    check_outputs(actual, op_outputs(case), dtype, f"edora_epilogue {dtype}")


# ------------------------------------------------------------------------------------------------
# Config machinery
# ------------------------------------------------------------------------------------------------

def test_autotune_key_buckets_token_counts():
    assert [triton_configs.m_bucket(m) for m in (1, 16, 17, 37, 4096, 4097, 10**6)] == \
        [16, 16, 32, 64, 4096, 8192, 8192]
    assert [triton_configs.r_pad(r) for r in (1, 3, 16, 17, 64, 128)] == [16, 16, 16, 32, 64, 128]


@pytest.mark.parametrize("arch", [80, 90])
def test_prune_filter(arch):
    for elt in (2, 4):
        for r_pad in (16, 32, 64, 128):
            kept = triton_configs.gemm_candidates(arch, elt, r_pad)
            listed = triton_configs.gemm_configs(arch)
            assert kept and all(any(c is a for a in listed) for c in kept)
            for c in kept:
                smem = triton_configs.gemm_smem_bytes(c, arch, elt, r_pad)
                assert smem <= triton_configs.SMEM_LIMIT[arch]
    big = triton_configs.gemm_candidates(arch, 2, 16)
    small = triton_configs.fit_to_problem(big, triton_configs.m_bucket(8), 4096)
    assert small and max(c.kwargs["BLOCK_M"] for c in small) == 64 < max(
        c.kwargs["BLOCK_M"] for c in big)
    # A fp32 operand tile twice as wide must leave out at least the largest bf16 tile.
    candidates = triton_configs.gemm_candidates
    assert len(candidates(90, 4, 16)) < len(candidates(90, 2, 16))
    # fp32 adapters on a bf16 model stage the rank-r tiles in fp32: the shared-memory model
    # counts them at 4 bytes (at r = 128 the bf16 count let a 245,760 B config through)
    for c in candidates(arch, 2, 128, rank_elt_size=4):
        smem = triton_configs.gemm_smem_bytes(c, arch, 2, 128, rank_elt_size=4)
        assert smem <= triton_configs.SMEM_LIMIT[arch]
    assert all(c.kwargs["BLOCK_K"] == 32 and c.num_warps == 8
               for c in candidates(arch, 2, 16, aligned=False))


def test_fixed_config_switch(monkeypatch):
    monkeypatch.delenv(triton_configs.FIXED_CONFIG_ENV, raising=False)
    assert not triton_configs.fixed_config()
    monkeypatch.setenv(triton_configs.FIXED_CONFIG_ENV, "1")
    assert triton_configs.fixed_config()


def test_interpreter_uses_one_fixed_config():
    if not triton_configs.INTERPRET:
        pytest.skip("compiled kernels autotune")
    for kernel in (triton_fwd.edora_fwd_kernel, triton_bwd.edora_dx_kernel,
                   triton_epilogue.edora_epilogue_kernel):
        assert isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) == 1
