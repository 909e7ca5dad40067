"""The Triton kernels compiled on a GPU at real layer sizes, against the fp64 reference on the GPU.

Marked ``gpu`` and skipped without CUDA. The helpers (problem, reference, the error rule) are
those of ``test_triton``; there the same checks run on odd small shapes.
"""
import pytest
import torch
from helpers import assert_close, requires_cuda
from test_triton import SCALING, check_all, check_op, make_problem, reference, run, small_terms

from edora_kernels import edora_linear
from edora_kernels.backends.triton import fwd as triton_fwd

pytestmark = [pytest.mark.gpu, requires_cuda]
BF16 = torch.bfloat16


@pytest.mark.parametrize("n,in_f,out_f,rank", [
    (4096, 4096, 4096, 16),
    (4096, 4096, 4096, 64),
    (4096, 4096, 11008, 16),
    (4096, 11008, 4096, 64),
])
def test_bf16_matches_reference(n, in_f, out_f, rank):
    p = make_problem(n, in_f, out_f, rank, BF16, seed=rank)
    check_op(p, BF16, f"bf16 N={n} {in_f}x{out_f} r={rank}")


@pytest.mark.parametrize("n", [1, 77, 4095])
def test_bf16_odd_token_counts(n):
    """Decode (one token) and token counts that leave partial row tiles."""
    p = make_problem(n, 4096, 4096, 16, BF16, seed=n)
    check_op(p, BF16, f"bf16 N={n}")


def test_fp16_and_fp32_adapters():
    p = make_problem(2048, 4096, 4096, 32, torch.float16, adapter_dtype=torch.float32, seed=5)
    check_op(p, torch.float16, "fp16 model, fp32 adapters")


def test_exact_norm_deterministic():
    p = make_problem(4096, 4096, 4096, 16, BF16, seed=9)
    first, expected = check_op(p, BF16, "exact norm", detach_norm=False)
    gy = torch.randn(first[0].shape, generator=torch.Generator().manual_seed(1)).to(first[0])
    second, _ = run(p, detach_norm=False, gy=gy)
    for name, a, b in zip(("y", "dx", "dR", "dm"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_epilogue_kernel():
    p = make_problem(4096, 4096, 4096, 64, BF16, seed=13)
    P, _, g = small_terms(p)
    y0 = torch.nn.functional.linear(p["x"], p["weight"], p["bias"])
    v = p["x"] @ p["A"].T
    y, z = triton_fwd.epilogue(y0, v, p["bias"], P, g, SCALING, True)
    ez = (y0.double() - p["bias"].double()) + SCALING * v.double() @ P.double().T
    assert_close(z, ez, BF16, "z")
    assert_close(y, g.double() * ez + p["bias"].double(), BF16, "y")


def test_tf32_only_when_torch_allows_it():
    """fp32: TF32 kernels where torch allows TF32, torch's own fp32 path where it does not."""
    p = make_problem(1024, 4096, 4096, 16, torch.float32, seed=17)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert triton_fwd.use_torch_path(torch.float32, 16)
        check_op(p, torch.float32, "fp32 without TF32")
        matmul.fp32_precision = "tf32"
        assert not triton_fwd.use_torch_path(torch.float32, 16)
        actual, gy = run(p)
        # TF32 keeps 10 mantissa bits, bf16 7: bf16's bound holds.
        check_all(actual, reference(p, gy), BF16, "fp32 with TF32")
    finally:
        matmul.fp32_precision = saved


def test_torch_compile_fullgraph():
    """The op traces without graph breaks and gives eager's results."""
    p = make_problem(1024, 4096, 4096, 16, BF16, seed=19)
    args = (p["weight"], p["bias"], p["A"], p["B"])

    def step(x, R, m):
        return edora_linear(x, *args, R, m, SCALING, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = p["x"].detach().requires_grad_()
        R, m = p["R"].detach().requires_grad_(), p["magnitude"].detach().requires_grad_()
        y = fn(x, R, m)
        results.append((y.detach(),) + torch.autograd.grad(y, (x, R, m), torch.ones_like(y)))
    for name, eager, comp in zip(("y", "dx", "dR", "dm"), *results):
        assert_close(comp, eager.double(), BF16, f"compiled {name}")
