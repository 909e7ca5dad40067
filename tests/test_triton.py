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
)

from edora_kernels import edora_linear, op_common, ops
from edora_kernels.backends import torch_backend
from edora_kernels.backends.triton import bwd as triton_bwd
from edora_kernels.backends.triton import configs as triton_configs
from edora_kernels.backends.triton import epilogue_only as triton_epilogue
from edora_kernels.backends.triton import fwd as triton_fwd
from edora_kernels.backends.triton import mixed as triton_mixed
from edora_kernels.backends.triton.launch import launch
from edora_kernels.norm import adapter_norms, compute_norm_terms
from edora_kernels.op_common import SLOT_NONE
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
# The backend functions directly, against the torch backend's in float64
# ------------------------------------------------------------------------------------------------

def _terms(case):
    return compute_norm_terms(case.weight, case.A)


def _forward64(case, save=True, capacity=0, x=None):
    """The torch backend's forward on float64 copies of the case (the oracle of the contract)."""
    c = case.to(torch.float64)
    x = c.x if x is None else x.double()
    return torch_backend.forward(x, c.weight, c.bias, c.A, c.B, c.R, c.magnitude, _terms(c),
                                 c.scaling, save, capacity)


@pytest.mark.parametrize("save", [True, False])
def test_forward_contract(save):
    case = make_case(130, *SHAPES[0], 3, torch.float16, DEVICE, seed=37)
    y, saved = triton_fwd.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                                  case.magnitude, _terms(case), case.scaling, save, 0)
    ey, esaved = _forward64(case)
    assert y.dtype == torch.float16
    assert_close(y, ey, torch.float16, "y")
    # P and n in float64 from the same float64 terms: equal to rounding; g in fp32
    assert saved.P.dtype == saved.n.dtype == torch.float64 and saved.g.dtype == torch.float32
    torch.testing.assert_close(saved.P, esaved.P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(saved.n, esaved.n, rtol=1e-12, atol=0)
    assert_close(saved.g, esaved.g, torch.float32, "g")
    if save:  # v is kept in fp32: it feeds dR's cancelling sum
        assert saved.v.dtype == torch.float32
        assert_close(saved.v, esaved.v, torch.float32, "v")
    else:
        assert saved.v.numel() == 0
    assert saved.slots.numel() == 0 and saved.zbuf.shape == (130, 0)


def test_forward_with_strided_weight_and_empty_batch():
    case = make_case(37, *SHAPES[0], 16, torch.float32, DEVICE, seed=41)
    weight_t = case.weight.T.contiguous().T  # same values, column-major
    assert not weight_t.is_contiguous()
    y, _ = triton_fwd.forward(case.x, weight_t, case.bias, case.A, case.B, case.R,
                              case.magnitude, _terms(case), case.scaling, False, 0)
    assert_close(y, _forward64(case)[0], torch.float32, "strided weight")
    y0, saved = triton_fwd.forward(case.x[:0], case.weight, case.bias, case.A, case.B, case.R,
                                   case.magnitude, _terms(case), case.scaling, True, 0)
    assert y0.shape == (0, SHAPES[0][1]) and saved.v.shape == (0, 16)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True)])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_backward_contract(need, bias, detach_norm):
    dtype = torch.float16
    case = make_case(130, *SHAPES[1], 16, dtype, DEVICE, seed=43, bias=bias)
    terms = _terms(case)
    y, saved = triton_fwd.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                                  case.magnitude, terms, case.scaling, True, 0)
    grads = triton_bwd.backward(case.gy, case.weight, case.bias, case.A, case.B, case.R,
                                case.magnitude, terms, case.scaling, detach_norm, y, saved,
                                *need)
    c = case.to(torch.float64)
    d = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    expected = torch_backend.backward(
        c.gy, c.weight, c.bias, c.A, c.B, c.R, c.magnitude, _terms(c), c.scaling, detach_norm,
        y.double(), type(saved)(*(d(t) for t in saved)), True, True, True)
    for wanted, got, exp, name in zip(need, grads, expected, ("dx", "dR", "dm")):
        if wanted:
            assert_close(got, exp, dtype, name)
        else:
            assert got.numel() == 0, f"{name} computed although not needed"
    # several row blocks were summed (the fixed-order reduction is exercised)
    assert triton.cdiv(130, triton_configs.row_block(130, DEVICE)) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_magnitudes_keep_their_z_in_slots(dtype):
    """m = 0 makes g = 0 and y = b: the z of those columns goes to its slot (the k-th zero to
    slot k), and dm there equals the reference's."""
    case = make_case(37, *SHAPES[0], 3, dtype, DEVICE, seed=59)
    zeros = [0, 40, 74]
    case.magnitude[zeros] = 0.0
    y, saved = triton_fwd.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                                  case.magnitude, _terms(case), case.scaling, True, 3)
    _, esaved = _forward64(case, capacity=3)
    expected_slots = torch.full((SHAPES[0][1],), SLOT_NONE, dtype=torch.int32)
    expected_slots[zeros] = torch.arange(3, dtype=torch.int32)
    assert torch.equal(saved.slots, expected_slots)
    assert_close(saved.zbuf, esaved.zbuf, dtype, "kept z columns")
    assert torch.equal(y[:, zeros], case.bias[zeros].expand(37, 3))
    check_backend(case, "triton", dtype, f"zero magnitudes {dtype}")


def test_zero_magnitudes_past_the_slots_get_nan(monkeypatch):
    """On a GPU the slots are a fixed number (no host read of m): a zero magnitude past them
    gets dm = NaN, never a silently wrong value; the others stay exact."""
    monkeypatch.setattr(op_common, "slot_capacity", lambda m, save, backend: 2 if save else 0)
    monkeypatch.setattr(ops, "slot_capacity", op_common.slot_capacity)
    case = make_case(37, *SHAPES[0], 3, torch.float32, DEVICE, seed=61)
    case.magnitude[[5, 9, 60]] = 0.0
    for backend in ("triton", "torch"):
        dm = op_outputs(case, backend)[3]
        assert torch.isnan(dm[60]) and not torch.isnan(dm[[5, 9]]).any(), backend
        rest = torch.ones_like(dm, dtype=torch.bool)
        rest[60] = False
        assert_close(dm[rest], op_outputs(case)[3][rest], torch.float32, f"{backend} dm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,n", [(1, 130), (16, 37), (64, 1)])
def test_epilogue_matches_reference(dtype, rank, n):
    in_f, out_f = SHAPES[1]
    case = make_case(n, in_f, out_f, rank, dtype, DEVICE, seed=rank + n + 47)
    y0 = torch.nn.functional.linear(case.x, case.weight, case.bias)  # a "base layer" output
    y, _ = triton_epilogue.epilogue_forward(y0, case.x, case.bias, case.A, case.B, case.R,
                                            case.magnitude, _terms(case), case.scaling, False,
                                            0)
    ey, _ = _forward64(case)
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
# The forward's TMA path (Hopper), forced in the interpreter
# ------------------------------------------------------------------------------------------------

# Rows of 16-byte multiples (TMA's rule) that are no multiples of the blocks: in = 72 leaves a
# partial K block, out = 75 and 131 partial column blocks.
TMA_SHAPES = ((72, 75), (136, 131))


@pytest.fixture
def tma_forward(monkeypatch):
    """The forward's chooser sees sm_90; each forward launch's TMA flag, program count and tile
    count are recorded. In the interpreter the persistent grid has 3 programs, so each loops
    over several tiles."""
    monkeypatch.setattr(triton_fwd, "device_arch", lambda t: triton_configs.TMA_ARCH)
    monkeypatch.setenv(triton_configs.TMA_ENV, "1")
    launches = []
    meta = triton_configs.GEMM_CONFIG_INTERPRET.kwargs

    def record(kernel, grid, **args):
        tiles = triton_configs.tiles_grid(args["M"], args["N"])(meta)[0]
        launches.append(dict(tma=args["TMA"], programs=grid({**args, **meta})[0], tiles=tiles))
        launch(kernel, grid, **args)

    monkeypatch.setattr(triton_fwd, "launch", record)
    monkeypatch.setattr(triton_mixed, "launch", record)
    return launches


def _assert_persistent_tma(launches):
    assert launches and all(ln["tma"] for ln in launches)
    assert all(ln["programs"] == min(triton_configs.INTERPRET_PROGRAMS, ln["tiles"])
               for ln in launches)


@pytest.mark.parametrize("n", [1, 130])
@pytest.mark.parametrize("rank", [1, 3, 16, 64])
def test_tma_forward_matches_reference(tma_forward, rank, n):
    in_f, out_f = TMA_SHAPES[1] if rank == 64 else TMA_SHAPES[0]
    case = make_case(n, in_f, out_f, rank, torch.float32, DEVICE, seed=rank * 100 + n)
    check_backend(case, "triton", torch.float32, f"TMA fp32 r={rank} n={n}")
    _assert_persistent_tma(tma_forward)
    if n > 1:  # programs looped over several tiles
        assert tma_forward[0]["tiles"] > tma_forward[0]["programs"]


@pytest.mark.parametrize("dtype,rank,n,adapter_dtype", [
    (torch.bfloat16, 16, 37, None), (torch.float16, 64, 130, None),
    (torch.bfloat16, 3, 1, None), (torch.bfloat16, 16, 130, torch.float32)])
def test_tma_forward_half_precision(tma_forward, dtype, rank, n, adapter_dtype):
    in_f, out_f = TMA_SHAPES[1] if rank == 64 else TMA_SHAPES[0]
    case = make_case(n, in_f, out_f, rank, dtype, DEVICE, adapter_dtype=adapter_dtype, seed=n)
    check_backend(case, "triton", dtype, f"TMA {dtype} r={rank} n={n} adapters {adapter_dtype}")
    _assert_persistent_tma(tma_forward)


def test_tma_forward_keeps_zero_magnitude_columns(tma_forward):
    """The slots of zero magnitudes, written from the persistent loop's tiles."""
    case = make_case(130, *TMA_SHAPES[1], 3, torch.float32, DEVICE, seed=67)
    zeros = [0, 64, 130]  # in the first, second and third column block
    case.magnitude[zeros] = 0.0
    y, saved = triton_fwd.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                                  case.magnitude, _terms(case), case.scaling, True, 3)
    _, esaved = _forward64(case, capacity=3)
    assert_close(saved.zbuf, esaved.zbuf, torch.float32, "kept z columns")
    assert_close(y, _forward64(case)[0], torch.float32, "y")
    _assert_persistent_tma(tma_forward)


def test_tma_forward_serves_a_mixed_batch(tma_forward):
    """G_ROWS (g per token from a table of adapters) shares the TMA path."""
    gen = torch.Generator().manual_seed(71)
    (in_f, out_f), rank, M = TMA_SHAPES[1], 16, 130
    x, weight = torch.randn(M, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    bias, t = torch.randn(out_f, generator=gen), torch.randn(M, rank, generator=gen)
    sB = torch.randn(out_f, rank, generator=gen)
    g_table = torch.rand(3, out_f, generator=gen) + 0.5
    g_rows = torch.randint(0, 3, (M,), generator=gen, dtype=torch.int32)
    prologue = triton_mixed.Prologue(v=None, t=t, sB=sB, cores=None, g=g_table, n=None,
                                     slots=None)
    y = triton_mixed.mixed_forward(x, weight, bias, prologue, g_rows)
    d = torch.float64
    z = x.to(d) @ weight.to(d).T + t.to(d) @ sB.to(d).T
    assert_close(y, g_table.to(d)[g_rows.long()] * z + bias.to(d), torch.float32, "mixed y")
    _assert_persistent_tma(tma_forward)


def test_tma_launch_leaves_the_callers_allocator(tma_forward):
    """The TMA launch sets Triton's scratch allocator in a copy of the context only."""
    from triton.runtime import _allocation  # no public getter

    def callers(size, alignment, stream):
        raise AssertionError("the backend's scratch came from the caller's allocator")

    before = _allocation._allocator.get()
    triton.set_allocator(callers)
    try:
        case = make_case(37, *TMA_SHAPES[0], 3, torch.float32, DEVICE, seed=79)
        triton_fwd.forward(case.x, case.weight, case.bias, case.A, case.B, case.R,
                           case.magnitude, _terms(case), case.scaling, False, 0)
        assert _allocation._allocator.get() is callers
    finally:
        triton.set_allocator(before)
    _assert_persistent_tma(tma_forward)


def test_tma_chooser(monkeypatch):
    """TMA only when switched on, on sm_90 and only where its layout rules hold for x and W0
    alike: unit stride along K, row stride and base address 16-byte aligned, one dtype of
    fp16/bf16/fp32."""
    bf16 = torch.bfloat16
    x, w = torch.empty(37, 64, dtype=bf16), torch.empty(75, 64, dtype=bf16)
    use = triton_configs.tma_operands
    monkeypatch.delenv(triton_configs.TMA_ENV, raising=False)
    assert not use(90, x, w)  # opt-in until timed on a GPU
    monkeypatch.setenv(triton_configs.TMA_ENV, "1")
    assert use(90, x, w)
    for arch in (0, 80, 86, 89, 100, 120):
        assert not use(arch, x, w), arch
    assert triton_configs.device_arch(x) == 0  # off CUDA: the pointer path
    # unaligned: rows of 4095 elements, K-major views, a base 2 bytes off, nothing to copy
    assert not use(90, torch.empty(37, 4095, dtype=bf16), torch.empty(75, 4095, dtype=bf16))
    assert not use(90, torch.empty(64, 37, dtype=bf16).T, w)
    assert not use(90, x, torch.empty(64, 75, dtype=bf16).T)
    assert not use(90, torch.empty(37 * 64 + 1, dtype=bf16)[1:].view(37, 64), w)
    assert not use(90, x[:0], w)
    # dtypes: fp16 and fp32 too (fp32's 16-byte rows are multiples of 4 elements), one dtype
    assert use(90, x.half(), w.half()) and use(90, x.float(), w.float())
    assert not use(90, torch.empty(37, 6), torch.empty(75, 6))
    assert not use(90, x.double(), w.double()) and not use(90, x, w.half())


def test_forward_off_hopper_keeps_the_pointer_path(monkeypatch):
    launches = []
    monkeypatch.setattr(triton_fwd, "launch",
                        lambda kernel, grid, **args: launches.append(args) or
                        launch(kernel, grid, **args))
    case = make_case(37, *TMA_SHAPES[0], 3, torch.bfloat16, DEVICE, seed=73)
    op_outputs(case, "triton")
    assert [a["TMA"] for a in launches] == [DEVICE.type == "cuda" and
                                            triton_configs.device_arch(case.x) == 90]


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
        kept = triton_configs.gemm_candidates(arch, elt)
        listed = triton_configs.gemm_configs(arch)
        assert kept and all(any(c is a for a in listed) for c in kept)
        for c in kept:
            assert triton_configs.gemm_smem_bytes(c, arch, elt) <= triton_configs.SMEM_LIMIT[arch]
    big = triton_configs.gemm_candidates(arch, 2)
    small = triton_configs.fit_to_problem(big, triton_configs.m_bucket(8), 4096)
    assert small and max(c.kwargs["BLOCK_M"] for c in small) == 64 < max(
        c.kwargs["BLOCK_M"] for c in big)
    candidates = triton_configs.gemm_candidates
    unaligned = candidates(arch, 2, aligned=False)
    assert unaligned and all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps) == (64, 32, 8)
                             for c in unaligned)
    if arch == 90:  # the rank no longer limits the tile: 256-wide tiles serve every rank
        assert any(c.kwargs["BLOCK_N"] == 256 for c in candidates(arch, 2))
        # the TMA path's persistent loop: accumulators within its own budget, 128×256 out
        for elt in (2, 4):
            for gathered in (False, True):
                tma = candidates(arch, elt, gathered_g=gathered, tma=True)
                assert tma and all(any(c is a for a in candidates(arch, elt, gathered_g=gathered))
                                   for c in tma)
                assert all(triton_configs.gemm_acc_regs(c) <= triton_configs.TMA_ACC_REG_BUDGET
                           for c in tma)


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


def _zero_slot_reference(zeros: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
    """The slots and slot index of the columns with a zero in some row of ``zeros``, by the
    torch ops the single-adapter path uses."""
    slots = op_common.zero_slots(zeros.abs().amin(0), capacity)
    taken = (slots >= 0).sum(dtype=torch.int32).unsqueeze(0)
    return slots, torch.cat([taken, op_common.slot_columns(slots, capacity).to(torch.int32)])


@pytest.mark.parametrize("capacity", [16, 40])
def test_mixed_slots_program_numbers_the_union_of_zeros(capacity):
    """The slots program over several rows and more than one step of columns (out > 1024),
    with zeros on both sides of each step's edge and, at capacity 16, more zeros than slots:
    the same slots and index as op_common.zero_slots and slot_columns on the rows' minimum."""
    gen = torch.Generator().manual_seed(5)
    out = 2 * triton_mixed.SLOTS_BLOCK + 37
    table = torch.rand(3, out, generator=gen) + 0.5
    for row, cols in ((0, [0, 1023, 1024, 2047, out - 1]), (1, [5, 1023, 1500]),
                      (2, list(range(2048, 2068)))):
        table[row, cols] = 0.0
    expected = _zero_slot_reference(table, capacity)
    got = triton_mixed.ZeroSlots.make(table, capacity, torch.empty(4, out))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[2].shape == (4, capacity)


@pytest.mark.parametrize("base_row", [True, False])
def test_mixed_prologue_forms_every_adapters_tables(base_row):
    """One launch forms K adapters' norms (float64, as adapter_norms), their g and cores
    tables (and the base model's row: g = 1, core 0), s·B, v = x Aᵀ and each leading row's
    t = R v; the slots program then numbers the columns where any adapter's m is 0."""
    gen = torch.Generator().manual_seed(11)
    K, in_f, out_f, r, s, T = 3, 37, 45, 5, 0.75, 3  # out spans three 16-row gate blocks
    W0, A = torch.randn(out_f, in_f, generator=gen), torch.randn(r, in_f, generator=gen)
    B = torch.randn(out_f, r, generator=gen)
    Rs, ms = torch.randn(K, r, r, generator=gen), torch.rand(K, out_f, generator=gen) + 0.5
    ms[0, [2, 40]] = 0.0
    ms[2, [40, 44]] = 0.0
    terms = compute_norm_terms(W0, A)
    rows = torch.tensor([2, K, 0, 1] if base_row else [2, 0, 0, 1])
    x = torch.randn(len(rows) * T, in_f, generator=gen)
    pro = triton_mixed.mixed_prologue(
        x, A, B, rows, s, x, capacity=16,
        gate=triton_mixed.AdapterStack(Rs, ms, terms, base_row))
    n = adapter_norms(terms, B, Rs, s)
    torch.testing.assert_close(pro.n, n, rtol=1e-12, atol=0)
    torch.testing.assert_close(pro.g[:K], (ms.double() / n).float(), rtol=2e-7, atol=0)
    assert torch.equal(pro.cores[:K], Rs)
    assert pro.g.shape[0] == pro.cores.shape[0] == K + base_row
    if base_row:
        assert torch.equal(pro.g[K], torch.ones(out_f)) and not pro.cores[K].any()
    assert torch.equal(pro.sB, (B * s).to(x.dtype))
    v = x.double() @ A.double().T
    assert_close(pro.v, v, torch.float32, "v")
    cores = torch.cat([Rs, torch.zeros(1, r, r)]).double()
    t = torch.einsum("ntr,nqr->ntq", v.view(len(rows), T, r), cores[rows]).reshape(-1, r)
    assert_close(pro.t, t, torch.float32, "t")
    expected = _zero_slot_reference(ms, 16)
    assert torch.equal(pro.slots[0], expected[0]) and torch.equal(pro.slots[1], expected[1])
