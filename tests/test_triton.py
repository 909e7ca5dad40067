"""The Triton backend against the float64 reference: forward, backward, the epilogue kernel.

Without a GPU these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) on small,
deliberately odd shapes; with a GPU the same tests run the compiled kernels on it.
"""
import pytest
import torch
import triton
from helpers import assert_close

from edora_kernels import base_norm_terms, edora_epilogue, edora_linear
from edora_kernels.backends import torch_backend
from edora_kernels.backends.triton import bwd as triton_bwd
from edora_kernels.backends.triton import fwd as triton_fwd
from edora_kernels.reference import edora_linear_reference
from edora_kernels.tolerances import TOLERANCE, normalised_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALING = 2.0
# in/out are no multiples of any block size; (70, 131) has out > in and allows rank 64.
SHAPES = ((97, 75), (70, 131))


# The interpreter's bf16 dot is broken; conftest's shim upcasts its operands (kernels untouched).
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")


def make_problem(n, in_f, out_f, rank, dtype, adapter_dtype=None, bias=True, seed=0):
    """Frozen W0, A, B, b in ``dtype``; trainable R, m in ``adapter_dtype`` (default ``dtype``).

    R is far from its N(0, 1e-5) init so the low-rank term and the norm's dependence on R
    both matter; m is the row norm of W0 perturbed, so g = m/n is not ≈ 1 everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    weight = rnd(out_f, in_f) / in_f**0.5
    p = dict(
        x=rnd(n, in_f).to(dtype),
        weight=weight.to(dtype),
        bias=(0.1 * rnd(out_f)).to(dtype) if bias else None,
        A=(rnd(rank, in_f) / in_f**0.5).to(adapter_dtype),
        B=(rnd(out_f, rank) / rank**0.5).to(adapter_dtype),
        R=(0.3 * rnd(rank, rank)).to(adapter_dtype),
        magnitude=(weight.norm(dim=1) * (1 + 0.2 * rnd(out_f))).to(adapter_dtype),
    )
    return {k: v.to(DEVICE) if v is not None else None for k, v in p.items()}


def run(p, x=None, backend="triton", detach_norm=True, gy=None, grad_x=True):
    """y and the gradients (dx, dR, dm) of ⟨y, gy⟩ through ``edora_linear``."""
    x = (p["x"] if x is None else x).detach().requires_grad_(grad_x)
    R = p["R"].detach().requires_grad_()
    m = p["magnitude"].detach().requires_grad_()
    y = edora_linear(x, p["weight"], p["bias"], p["A"], p["B"], R, m, SCALING,
                     detach_norm=detach_norm, backend=backend)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    inputs = (x, R, m) if grad_x else (R, m)
    grads = torch.autograd.grad(y, inputs, gy)
    return (y.detach(),) + ((None,) if not grad_x else ()) + grads, gy


def reference(p, gy, x=None, detach_norm=True):
    """fp64 reference (y, dx, dR, dm) on fp64 copies of the very same inputs."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x = d(p["x"] if x is None else x).requires_grad_()
    R = d(p["R"]).requires_grad_()
    m = d(p["magnitude"]).requires_grad_()
    y = edora_linear_reference(x, d(p["weight"]), d(p["bias"]), d(p["A"]), d(p["B"]), R, m,
                               SCALING, detach_norm=detach_norm)
    return (y.detach(),) + torch.autograd.grad(y, (x, R, m), gy.double())


def check_all(actual, expected, dtype, label, baseline=None):
    """Each output against the fp64 reference by the tolerance table.

    dR and dm are sums over tokens of products of t, v (or gy, z) stored in ``dtype``; when the
    sum cancels, the torch backend at the same dtype misses the table as well. There, and only
    there, DESIGN's rule applies: no more than twice the torch backend's error.
    """
    for i, (name, a, e) in enumerate(zip(("y", "dx", "dR", "dm"), actual, expected)):
        if a is None:
            continue
        torch_error = normalised_error(baseline[i], e) if baseline is not None else 0.0
        if torch_error <= TOLERANCE[dtype]:
            assert_close(a, e, dtype, f"{label} {name}")
        else:
            err = normalised_error(a, e)
            assert name in ("dR", "dm") and err <= 2 * torch_error, (
                f"{label} {name}: error {err:.3g}, torch backend {torch_error:.3g} ({dtype})")


def check_op(p, dtype, label, x=None, detach_norm=True, grad_x=True):
    """edora_linear with the Triton backend against the reference, the torch backend as baseline."""
    actual, gy = run(p, x=x, detach_norm=detach_norm, grad_x=grad_x)
    baseline, _ = run(p, x=x, backend="torch", detach_norm=detach_norm, gy=gy, grad_x=grad_x)
    expected = reference(p, gy, x=x, detach_norm=detach_norm)
    check_all(actual, expected, dtype, label, baseline)
    return actual, expected


# ------------------------------------------------------------------------------------------------
# Through the op: forward and backward against the fp64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 37, 130])
@pytest.mark.parametrize("rank", [1, 3, 16, 64])
def test_fp32_matches_reference(rank, n):
    in_f, out_f = SHAPES[1] if rank == 64 else SHAPES[0]
    p = make_problem(n, in_f, out_f, rank, torch.float32, seed=rank * 1000 + n)
    check_op(p, torch.float32, f"fp32 r={rank} n={n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank,n", [(1, 130), (3, 37), (16, 1), (64, 130)])
def test_half_precision_matches_reference(dtype, rank, n):
    in_f, out_f = SHAPES[1] if rank == 64 else SHAPES[0]
    p = make_problem(n, in_f, out_f, rank, dtype, seed=rank + n)
    check_op(p, dtype, f"{dtype} r={rank} n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [3, 16])
def test_exact_norm_gradient(dtype, rank):
    p = make_problem(37, *SHAPES[0], rank, dtype, seed=7)
    _, expected = check_op(p, dtype, f"detach_norm=False {dtype}", detach_norm=False)
    # The exact-norm term must actually change dR (else this test could not fail).
    gy = torch.randn(37, SHAPES[0][1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    detached = reference(p, gy.to(dtype), detach_norm=True)[2]
    assert (expected[2] - detached).abs().max() > 10 * TOLERANCE[dtype] * detached.abs().max()


def test_fp32_adapters_on_bf16_model():
    """A, B, R, m in fp32 with bf16 x and W0: loaded and cast inside the kernels."""
    p = make_problem(130, *SHAPES[0], 16, torch.bfloat16, adapter_dtype=torch.float32, seed=3)
    actual, _ = check_op(p, torch.bfloat16, "bf16 model, fp32 adapters")
    assert actual[2].dtype == torch.float32 and actual[3].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_3d_input(dtype):
    p = make_problem(1, *SHAPES[0], 3, dtype, seed=11)
    x = torch.randn(3, 13, SHAPES[0][0], generator=torch.Generator().manual_seed(5)).to(p["x"])
    actual, _ = check_op(p, dtype, f"3-D {dtype}", x=x)
    assert actual[0].shape == (3, 13, SHAPES[0][1])


def test_non_contiguous_input():
    """A transposed view reaches the kernel as is (stride along in ≠ 1); a strided 3-D slice."""
    p = make_problem(1, *SHAPES[0], 16, torch.float32, seed=13)
    in_f = SHAPES[0][0]
    gen = torch.Generator().manual_seed(6)
    transposed = torch.randn(in_f, 37, generator=gen).to(DEVICE).T
    strided = torch.randn(2, 40, 2 * in_f, generator=gen).to(DEVICE)[:, ::3, ::2]
    for x in (transposed, strided):
        assert not x.is_contiguous()
        check_op(p, torch.float32, f"strides {x.stride()}", x=x)


def test_without_input_gradient_and_without_bias():
    """x needs no grad: the dx kernel runs its t-only variant; no bias."""
    p = make_problem(130, *SHAPES[1], 16, torch.float16, bias=False, seed=17)
    actual, _ = check_op(p, torch.float16, "no dx, no bias", grad_x=False)
    assert actual[1] is None


def test_no_grad_forward_matches_training_forward():
    """save=False (no v, z stored) computes the very same y."""
    p = make_problem(37, *SHAPES[0], 3, torch.float16, seed=19)
    R = p["R"].detach().requires_grad_()
    y_train = edora_linear(p["x"], p["weight"], p["bias"], p["A"], p["B"], R, p["magnitude"],
                           SCALING, backend="triton")
    with torch.no_grad():
        y_eval = edora_linear(p["x"], p["weight"], p["bias"], p["A"], p["B"], R,
                              p["magnitude"], SCALING, backend="triton")
    assert y_train.requires_grad and not y_eval.requires_grad
    assert torch.equal(y_train.detach(), y_eval)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dm_dR_deterministic(detach_norm):
    p = make_problem(130, *SHAPES[1], 16, torch.bfloat16, seed=23)
    first, gy = run(p, detach_norm=detach_norm)
    second, _ = run(p, detach_norm=detach_norm, gy=gy)
    for name, a, b in zip(("y", "dx", "dR", "dm"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_fp64_and_large_rank_take_the_torch_path():
    p = make_problem(5, 130, 129, 129, torch.float32, seed=29)  # rank 129 > MAX_RANK
    check_op(p, torch.float32, "rank 129")
    p = make_problem(5, *SHAPES[0], 3, torch.float64, seed=31)
    check_op(p, torch.float64, "fp64")


# ------------------------------------------------------------------------------------------------
# The backend functions directly
# ------------------------------------------------------------------------------------------------

def small_terms(p):
    """P = B R, R A and g in fp32, as ops.py forms them."""
    B, R, A = (p[k].float() for k in ("B", "R", "A"))
    g = p["magnitude"].float() / (p["weight"].float() + SCALING * B @ R @ A).norm(dim=1)
    return B @ R, R @ A, g


@pytest.mark.parametrize("save", [True, False])
def test_forward_contract(save):
    p = make_problem(130, *SHAPES[0], 3, torch.float16, seed=37)
    P, _, g = small_terms(p)
    y, v, z = triton_fwd.forward(p["x"], p["weight"], p["bias"], p["A"], P, g, SCALING, save)
    ey, ev, ez = torch_backend.forward(*(t.double() for t in (p["x"], p["weight"], p["bias"],
                                                               p["A"], P, g)), SCALING, True)
    assert y.dtype == torch.float16
    assert_close(y, ey, torch.float16, "y")
    if save:
        assert_close(v, ev, torch.float16, "v")
        assert_close(z, ez, torch.float16, "z")
        assert len({id(y), id(v), id(z)}) == 3 and y.data_ptr() != z.data_ptr()
    else:
        assert v.numel() == 0 and z.numel() == 0


def test_forward_with_strided_weight_and_empty_batch():
    p = make_problem(37, *SHAPES[0], 16, torch.float32, seed=41)
    P, _, g = small_terms(p)
    weight_t = p["weight"].T.contiguous().T  # same values, column-major
    assert not weight_t.is_contiguous()
    y, _, _ = triton_fwd.forward(p["x"], weight_t, p["bias"], p["A"], P, g, SCALING, False)
    ey, _, _ = torch_backend.forward(*(t.double() for t in (p["x"], p["weight"], p["bias"],
                                                             p["A"], P, g)), SCALING, False)
    assert_close(y, ey, torch.float32, "strided weight")
    y0, v0, z0 = triton_fwd.forward(p["x"][:0], p["weight"], p["bias"], p["A"], P, g, SCALING, True)
    assert y0.shape == (0, SHAPES[0][1]) and v0.shape == (0, 16) and z0.shape == (0, SHAPES[0][1])


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True)])
def test_backward_contract(need):
    need_dx, need_t, need_colsum = need
    dtype = torch.float16
    p = make_problem(130, *SHAPES[1], 16, dtype, seed=43)
    P, RA, g = small_terms(p)
    _, _, z = torch_backend.forward(p["x"], p["weight"], p["bias"], p["A"], P, g, SCALING, True)
    gy = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(z)
    dx, t, colsum = triton_bwd.backward(gy, p["weight"], p["B"], RA, g, z, SCALING, *need)
    ex, et, ec = torch_backend.backward(gy.double(), p["weight"].double(), p["B"].double(),
                                        RA.double(), g.double(), z.double(), SCALING,
                                        True, True, True)
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
@pytest.mark.parametrize("save", [True, False])
def test_epilogue_matches_reference(dtype, rank, n, save):
    in_f, out_f = SHAPES[1]
    p = make_problem(n, in_f, out_f, rank, dtype, seed=rank + n + 47)
    P, _, g = small_terms(p)
    y0 = torch.nn.functional.linear(p["x"], p["weight"], p["bias"])  # a "base layer" output
    v = p["x"] @ p["A"].T
    y, z = triton_fwd.epilogue(y0, v, p["bias"], P, g, SCALING, save)
    ez = (y0.double() - p["bias"].double()) + SCALING * v.double() @ P.double().T
    ey = g.double() * ez + p["bias"].double()
    assert y.dtype == dtype
    assert_close(y, ey, dtype, "epilogue y")
    if save:
        assert_close(z, ez, dtype, "epilogue z")
    else:
        assert z.numel() == 0
    # and it is EDoRA's output when y0 is the dense base layer's
    assert_close(y, reference(p, torch.zeros(n, out_f, dtype=torch.float64))[0], dtype, "vs ref")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_epilogue_op(dtype):
    """edora_epilogue(..., backend="triton"): its forward runs the epilogue kernel."""
    p = make_problem(37, *SHAPES[0], 3, dtype, seed=53)
    c0, C = base_norm_terms(p["weight"], p["A"])
    x = p["x"].detach().requires_grad_()
    R, m = p["R"].detach().requires_grad_(), p["magnitude"].detach().requires_grad_()
    y = edora_epilogue(torch.nn.functional.linear(x, p["weight"], p["bias"]), x, p["bias"],
                       p["A"], p["B"], R, m, SCALING, base_norm_sq=c0, base_times_A=C,
                       backend="triton")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    actual = (y.detach(),) + torch.autograd.grad(y, (x, R, m), gy)
    check_all(actual, reference(p, gy), dtype, f"edora_epilogue {dtype}")


# ------------------------------------------------------------------------------------------------
# Config machinery
# ------------------------------------------------------------------------------------------------

def test_autotune_key_buckets_token_counts():
    assert [triton_fwd.m_bucket(m) for m in (1, 16, 17, 37, 4096, 4097, 10**6)] == \
        [16, 16, 32, 64, 4096, 8192, 8192]
    assert [triton_fwd.r_pad(r) for r in (1, 3, 16, 17, 64, 128)] == [16, 16, 16, 32, 64, 128]


@pytest.mark.parametrize("arch", [80, 90])
def test_prune_filter(arch):
    for elt in (2, 4):
        for r_pad in (16, 32, 64, 128):
            kept = triton_fwd.gemm_candidates(arch, elt, r_pad)
            assert kept and all(any(c is a for a in triton_fwd.gemm_configs(arch)) for c in kept)
            for c in kept:
                smem = triton_fwd.gemm_smem_bytes(c, arch, elt, r_pad)
                assert smem <= triton_fwd.SMEM_LIMIT[arch]
    big = triton_fwd.gemm_candidates(arch, 2, 16)
    small = triton_fwd.fit_to_problem(big, triton_fwd.m_bucket(8), 4096)
    assert small and max(c.kwargs["BLOCK_M"] for c in small) == 64 < max(
        c.kwargs["BLOCK_M"] for c in big)
    # A fp32 operand tile twice as wide must leave out at least the largest bf16 tile.
    assert len(triton_fwd.gemm_candidates(90, 4, 16)) < len(triton_fwd.gemm_candidates(90, 2, 16))


def test_interpreter_uses_one_fixed_config():
    if not triton_fwd.INTERPRET:
        pytest.skip("compiled kernels autotune")
    for kernel in (triton_fwd.edora_fwd_kernel, triton_bwd.edora_dx_kernel,
                   triton_fwd.edora_epilogue_kernel):
        assert isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) == 1
