"""The closed-form norm's precision, the fp32 epilogue of half inputs, and forward-mode AD."""
import pytest
import torch
from helpers import as_float64

from edora_kernels import edora_linear
from edora_kernels.backends import torch_backend
from edora_kernels.norm import NormTerms, adapter_norms, compute_norm_terms, row_norm
from edora_kernels.reference import edora_linear_reference
from edora_kernels.testing import make_case
from edora_kernels.tolerances import normalised_error


def test_one_by_one_layer_that_nearly_cancels():
    """V = W0 + s·BRA = 1 − 0.999: the fp32 closed form used to give 1.024 instead of 1."""
    one = torch.ones(1, 1)
    y = edora_linear(one, one, None, one, one, torch.tensor([[-0.999]]), torch.ones(1), 1.0)
    assert abs(y.item() - 1.0) < 1e-6


def _cancelling_case(ratio: float, dtype=torch.float32):
    """A rank-r W0 = B A0 whose adapter removes all but ``ratio`` of it: ‖V_j‖ = ratio·‖W0_j‖."""
    case = make_case(64, 48, 40, 8, torch.float64, seed=3)
    weight = case.B @ case.A  # rank r, so that V = ratio·W0 exactly
    R = -(1.0 - ratio) / case.scaling * torch.eye(8, dtype=torch.float64)
    args = {**case.op_args(), "weight": weight, "R": R,
            "magnitude": weight.norm(dim=1) * ratio * 1.3}
    return {k: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for k, t in args.items()}


@pytest.mark.parametrize("ratio", [1e-1, 1e-2, 1e-3])
def test_fp32_error_within_the_dense_formula_when_the_norm_cancels(ratio):
    args = _cancelling_case(ratio)
    expected = edora_linear_reference(**as_float64(args))
    closed_form = normalised_error(edora_linear(**args, backend="torch"), expected)
    dense_fp32 = normalised_error(edora_linear_reference(**args), expected)
    assert closed_form <= max(dense_fp32, 1e-6), (closed_form, dense_fp32)


def test_norm_terms_are_float64_and_exact():
    case = make_case(1, 33, 29, 5, torch.float32)
    terms = compute_norm_terms(case.weight, case.A)
    assert all(t.dtype == torch.float64 for t in terms)
    w, a = case.weight.double(), case.A.double()
    P = case.B.double() @ case.R.double()
    dense = (w + case.scaling * P @ a).norm(dim=1)
    torch.testing.assert_close(row_norm(terms, P, case.scaling), dense, rtol=1e-13, atol=0)


# (rank, adapters): K ≤ 2r takes the products [C | B]·coefficients, K > 2r the row features
@pytest.mark.parametrize("rank,count", [(1, 1), (3, 2), (3, 7), (8, 16), (8, 17), (16, 64)])
def test_many_adapters_norms_equal_each_dense_norm(rank, count):
    """adapter_norms of K cores on one basis = ‖W0 + s·B R_k A‖ formed densely, per adapter,
    in float64 on odd shapes, on both sides of its choice of GEMMs; and so do its gradients."""
    case = make_case(1, 37, 29, rank, torch.float64, seed=rank)
    gen = torch.Generator().manual_seed(count)
    Rs = torch.randn(count, rank, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    terms = compute_norm_terms(case.weight, case.A)
    dense = torch.stack([(case.weight + case.scaling * case.B @ R @ case.A).norm(dim=1)
                         for R in Rs])
    norms = adapter_norms(terms, case.B, Rs, case.scaling)
    torch.testing.assert_close(norms, dense, rtol=1e-13, atol=0)
    weights = torch.randn(norms.shape, generator=gen, dtype=torch.float64)
    grad, = torch.autograd.grad((norms * weights).sum(), Rs)
    dense_grad, = torch.autograd.grad((dense * weights).sum(), Rs)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-11, atol=1e-13)


def test_norm_terms_read_big_weights_in_chunks(monkeypatch):
    monkeypatch.setattr("edora_kernels.norm._CHUNK_BYTES", 8 * 33 * 4)  # 4 rows per chunk
    case = make_case(1, 33, 29, 5, torch.float32)
    chunked = compute_norm_terms(case.weight, case.A)
    monkeypatch.undo()
    whole = compute_norm_terms(case.weight, case.A)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_epilogue_multiplies_by_g_in_fp32(dtype):
    """y = g ⊙ z + b rounded once from fp32: g is not first rounded to half precision (a
    magnitude update below half's quantum must move the output)."""
    gen = torch.Generator().manual_seed(0)
    out, rank = 64, 4
    y0 = torch.randn(256, out, generator=gen).to(dtype)
    x, A, B, R = torch.zeros(256, 8, dtype=dtype), torch.zeros(rank, 8), torch.zeros(out, rank), \
        torch.zeros(rank, rank)
    terms = NormTerms(torch.ones(out, dtype=torch.float64),
                      torch.zeros(out, rank, dtype=torch.float64),
                      torch.zeros(rank, rank, dtype=torch.float64))  # n = 1: g = m

    def epilogue(g):
        return torch_backend.epilogue_forward(y0, x, None, A, B, R, g, terms, 1.0, False, 0)[0]

    g = 1 + 0.01 * torch.rand(out, generator=gen)
    y = epilogue(g)
    correctly_rounded = (y0.double() * g.double()).to(dtype)
    assert (y != correctly_rounded).float().mean() < 0.01
    assert not torch.equal(epilogue(g * (1 + 2**-12)), y)


# --- forward-mode AD: a real tangent, never a silent zero ---------------------------------------

@pytest.mark.parametrize("detach_norm", [True, False])
def test_jvp_matches_the_reference(detach_norm):
    args = make_case(7, 12, 10, 3, torch.float64, seed=1).op_args()
    tangents = {k: torch.randn_like(args[k]) for k in ("x", "R", "magnitude")}

    def along(fn):
        def f(x, R, magnitude):
            return fn(**{**args, "x": x, "R": R, "magnitude": magnitude},
                      detach_norm=detach_norm)
        primals = tuple(args[k] for k in tangents)
        return torch.func.jvp(f, primals, tuple(tangents.values()))

    y, dy = along(edora_linear)
    y_ref, dy_ref = along(edora_linear_reference)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref)
    assert dy.abs().max() > 0


def test_forward_ad_dual_tensors():
    import torch.autograd.forward_ad as fwAD
    args = make_case(5, 9, 8, 2, torch.float64, seed=2).op_args()
    tangent = torch.randn_like(args["R"])
    with fwAD.dual_level():
        R = fwAD.make_dual(args["R"], tangent)
        dy = fwAD.unpack_dual(edora_linear(**{**args, "R": R})).tangent
        dy_ref = fwAD.unpack_dual(edora_linear_reference(**{**args, "R": R})).tangent
    assert dy is not None
    torch.testing.assert_close(dy, dy_ref)


def test_vmap_over_a_batch_of_inputs():
    args = make_case(4, 9, 8, 2, torch.float64, seed=4).op_args()
    xs = torch.randn(3, 4, 9, dtype=torch.float64)
    batched = torch.func.vmap(lambda x: edora_linear(**{**args, "x": x}))(xs)
    expected = torch.stack([edora_linear_reference(**{**args, "x": x}) for x in xs])
    torch.testing.assert_close(batched, expected)
