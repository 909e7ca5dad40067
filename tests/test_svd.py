"""``randomized_svd`` against ``torch.linalg.svd`` on known spectra; determinism, errors, dtypes;
``init="rsvd"`` in ``EDoRALinear.from_linear``.

Accuracy is judged as docs/DESIGN.md §6 says: the Frobenius residual ``‖W − U Uᵀ W‖_F`` over
the optimal rank-r residual ``‖W − W_r‖_F`` (from float64 ``torch.linalg.svd``), and the error of
the top-r singular values. Run with ``-s`` to see the values printed.
"""
import re

import pytest
import torch
from helpers import assert_close, requires_cuda
from torch import nn

from edora_kernels.layer import EDoRALinear
from edora_kernels.svd import DEFAULT_N_ITER, default_oversample, edora_factors, randomized_svd

RANK = 16
# At the defaults the residual may exceed the optimum by 2% (measured: at most 0.1%).
MAX_RESIDUAL_RATIO = 1.02
ORTHONORMAL_TOL = 1e-5
# Relative error |S_i − S_i*| / S_i* of the top-r singular values, in two tiers. Values that stand
# clear of the tail (S_i* >= 2·S*_{d+1}, d the Krylov dimension) come out near fp32 rounding:
# measured <= 8e-6 (fast decay, where σ_16 ≈ 5e-4·σ_1). Values inside a flat tail come out
# slightly low, the known bias of a range finder that shrinks with n_iter: measured <= 5e-4
# (LLM-like spectrum, 640×512). Both bounds leave a margin of about 6–10×.
MAX_SIGMA_REL_ERROR_SEPARATED = 5e-5
MAX_SIGMA_REL_ERROR = 5e-3
KRYLOV_DIM = (DEFAULT_N_ITER + 1) * (RANK + default_oversample(RANK))

# Every short side exceeds the Krylov dimension (120 at rank 16), so the randomised path runs;
# "large" keeps it far below, as for real weights.
SHAPES = {
    "large": (640, 512),
    "tall": (256, 192),
    "wide": (192, 256),
    "square": (160, 160),
    "batched": (3, 160, 128),
    "batched-wide": (2, 2, 128, 144),
}


def spectrum(kind: str, k: int) -> torch.Tensor:
    i = torch.arange(k, dtype=torch.float64)
    if kind == "fast":  # σ_17/σ_1 ≈ 3e-4: as fast as fp32 can still resolve
        return 0.6**i
    if kind == "slow":
        return (1 + i) ** -0.5
    if kind == "flat":
        return torch.ones(k, dtype=torch.float64)
    if kind == "llm":  # a power-law bulk under a few outlier directions
        s = (1 + i) ** -0.25
        s[:4] *= torch.tensor([12.0, 7.0, 5.0, 3.0], dtype=torch.float64)
        return s
    raise ValueError(kind)


def make_matrix(shape, kind, seed=0, dtype=torch.float32) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with Haar-random U, V, built in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    out = torch.empty(*batch, m, n, dtype=torch.float64)
    for W in out.view(-1, m, n):
        U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
        W.copy_((U * spectrum(kind, k)) @ V.mT)
    return out.to(dtype)


def accuracy(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, rank: int):
    """Per matrix: the residual ratio ‖W − U Uᵀ W‖_F / ‖W − W_r‖_F, the relative errors of the
    top-r singular values (all, and those clear of the tail), and the exact values."""
    W64 = W.double()
    S_exact = torch.linalg.svd(W64).S
    U64 = U.double()
    residual = (W64 - U64 @ (U64.mT @ W64)).norm(dim=(-2, -1))
    ratio = residual / S_exact[..., rank:].norm(dim=-1)
    top = S_exact[..., :rank]
    rel = (S.double() - top).abs() / top
    tail = S_exact[..., min(KRYLOV_DIM, S_exact.shape[-1] - 1), None]
    separated = torch.where(top >= 2 * tail, rel, torch.zeros_like(rel))
    return ratio, rel.amax(dim=-1), separated.amax(dim=-1), top


def assert_accurate(W, U, S, rank, what):
    ratio, sigma_err, sep_err, S_exact = accuracy(W, U, S, rank)
    first = (0,) * (W.dim() - 2)
    print(f"\n{what}: residual ratio max {ratio.max():.5f}, top-{rank} σ max rel. error "
          f"{sigma_err.max():.2e} ({sep_err.max():.2e} clear of the tail)")
    print("  σ rsvd :", " ".join(f"{v:.5g}" for v in S[first].tolist()))
    print("  σ exact:", " ".join(f"{v:.5g}" for v in S_exact[first].tolist()))
    assert ratio.max() <= MAX_RESIDUAL_RATIO, f"{what}: residual ratio {ratio.tolist()}"
    assert sigma_err.max() <= MAX_SIGMA_REL_ERROR, f"{what}: σ rel. error {sigma_err.tolist()}"
    assert sep_err.max() <= MAX_SIGMA_REL_ERROR_SEPARATED, f"{what}: σ rel. error {sep_err}"


def orthonormality_error(U: torch.Tensor) -> float:
    eye = torch.eye(U.shape[-1], dtype=U.dtype)
    return (U.mT @ U - eye).abs().max().item()


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("kind", ["fast", "slow", "flat", "llm"])
def test_accuracy_against_exact_svd(kind, shape_name):
    shape = SHAPES[shape_name]
    W = make_matrix(shape, kind)
    U, S, Vh = randomized_svd(W, RANK, seed=0)
    *batch, m, n = shape
    assert U.shape == (*batch, m, RANK) and S.shape == (*batch, RANK)
    assert Vh.shape == (*batch, RANK, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32

    assert_accurate(W, U, S, RANK, f"{kind} {shape_name} {shape}")
    assert orthonormality_error(U) <= ORTHONORMAL_TOL
    assert orthonormality_error(Vh.mT) <= ORTHONORMAL_TOL
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values must be descending"
    # The triple itself is a near-optimal rank-r approximation, not only the subspace of U.
    W64 = W.double()
    reconstruction = (W64 - U.double() @ (S.double().unsqueeze(-1) * Vh.double()))
    optimal = torch.linalg.svdvals(W64)[..., RANK:].norm(dim=-1)
    assert (reconstruction.norm(dim=(-2, -1)) / optimal).max() <= MAX_RESIDUAL_RATIO


def test_full_rank_is_exact():
    W = make_matrix((40, 24), "slow")
    U, S, Vh = randomized_svd(W, 24, seed=0)
    assert_close(U @ (S.unsqueeze(-1) * Vh), W.double(), torch.float32, "U S Vh")


def test_small_matrices_take_the_exact_svd():
    # A Krylov space of (n_iter + 1)·(rank + oversample) >= min(m, n) would fill the short side.
    W = make_matrix((2, 60, 40), "slow")
    U, S, Vh = randomized_svd(W, 8, seed=0)
    U_exact, S_exact, Vh_exact = torch.linalg.svd(W, full_matrices=False)
    assert torch.equal(S, S_exact[..., :8]) and torch.equal(U, U_exact[..., :8])
    assert torch.equal(Vh, Vh_exact[..., :8, :])


@pytest.mark.parametrize("shape", [(2, 200, 150), (2, 150, 200)])
def test_rank_deficient_input_still_gives_orthonormal_factors(shape):
    # The Krylov space becomes invariant after one block: later blocks are rounding noise, which
    # must still come out orthogonal to the earlier ones.
    W = torch.zeros(shape)
    W[1] = torch.randn(shape[1], 3) @ torch.randn(3, shape[2])  # rank 3 < the 8 requested
    U, S, Vh = randomized_svd(W, 8, seed=0)
    assert orthonormality_error(U) <= ORTHONORMAL_TOL
    assert orthonormality_error(Vh.mT) <= ORTHONORMAL_TOL
    assert S[0].abs().max() == 0 and S[1, 3:].abs().max() < 1e-4 * S[1, 0]
    assert_close(U[1] @ (S[1].unsqueeze(-1) * Vh[1]), W[1].double(), torch.float32, "rank 3")


def test_same_seed_same_result_and_seeds_differ():
    W = make_matrix((2, 96, 80), "slow")
    first = randomized_svd(W, 8, n_iter=1, seed=123)
    again = randomized_svd(W, 8, n_iter=1, seed=123)
    other = randomized_svd(W, 8, n_iter=1, seed=124)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_each_batch_element_gets_its_own_test_matrix():
    # A flat spectrum leaves no preferred subspace, so without power iterations or oversampling
    # the span of U is the span of W Ω: identical matrices give different U exactly when their
    # test matrices Ω differ.
    W = make_matrix((64, 48), "flat").expand(4, 64, 48)
    U, _, _ = randomized_svd(W, 6, oversample=0, n_iter=0, seed=0)
    projectors = U @ U.mT
    for i in range(4):
        for j in range(i + 1, 4):
            assert (projectors[i] - projectors[j]).abs().max() > 0.1, (i, j)
    # ... and the first element's test matrix is what a batch of one would draw.
    U0, _, _ = randomized_svd(W[:1], 6, oversample=0, n_iter=0, seed=0)
    assert torch.allclose(U0[0] @ U0[0].mT, projectors[0], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    W = make_matrix((3, 160, 128), "llm", dtype=dtype)
    U, S, Vh = randomized_svd(W, RANK, seed=0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    upcast = randomized_svd(W.float(), RANK, seed=0)
    for a, b in zip((U, S, Vh), upcast):
        assert torch.equal(a, b)
    assert_accurate(W, U, S, RANK, f"{dtype} input")


def test_float64_input_stays_float64():
    W = make_matrix((120, 100), "fast", dtype=torch.float64)
    U, S, Vh = randomized_svd(W, 8, seed=0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert orthonormality_error(U) < 1e-12 and orthonormality_error(Vh.mT) < 1e-12
    assert_close(S, torch.linalg.svdvals(W)[:8], torch.float64, "S")


def test_non_contiguous_input_matches_contiguous():
    W = make_matrix((96, 128), "slow")
    for a, b in zip(randomized_svd(W.mT, 8, seed=0), randomized_svd(W.mT.contiguous(), 8, seed=0)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), r"rank must be in \[1, min\(m, n\)\] = \[1, 20\]"),
    (dict(rank=21), r"rank must be in \[1, min\(m, n\)\] = \[1, 20\]"),
    (dict(rank=2.0), "rank must be an int"),
    (dict(oversample=-1), "oversample must be an int >= 0"),
    (dict(n_iter=-1), "n_iter must be an int >= 0"),
    (dict(n_iter=1.5), "n_iter must be an int >= 0"),
    (dict(seed=1.5), r"seed must be None or an int"),
    (dict(seed=2 ** 70), r"seed must be None or an int"),
])
def test_argument_errors(bad, match):
    kwargs = {"rank": 4, **bad}
    rank = kwargs.pop("rank")
    with pytest.raises((ValueError, TypeError), match=match):
        randomized_svd(torch.randn(30, 20), rank, **kwargs)


@pytest.mark.parametrize("shape", [(2, 30, 20), (2, 200, 150)])  # exact and Krylov paths
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused(value, shape):
    W = torch.randn(shape)
    W[1, 3, 4] = value
    message = rf"W \(shape {re.escape(str(shape))}\) contains NaN or Inf"
    with pytest.raises(ValueError, match=message):
        randomized_svd(W, 4)


def test_overflow_is_told_apart_from_non_finite_input():
    W = torch.full((200, 150), 3e38)
    with pytest.raises(ValueError, match="overflows torch.float32"):
        randomized_svd(W, 4)


@pytest.mark.parametrize("W", [torch.randn(10), torch.tensor(1.0)])
def test_fewer_than_two_dims_is_refused(W):
    with pytest.raises(ValueError, match="at least 2 dims"):
        randomized_svd(W, 1)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        randomized_svd(torch.ones(5, 4, dtype=torch.int64), 2)


# --- init="rsvd" in the factors and the layer ------------------------------------------------


def gapped_linear(out_f=48, in_f=64, rank=6, dtype=torch.float32) -> nn.Linear:
    """A layer whose top-``rank`` singular values are distinct and far above the rest, so that
    the rank-r singular vectors are unique up to sign."""
    gen = torch.Generator().manual_seed(1)
    k = min(out_f, in_f)
    s = torch.cat([torch.linspace(10, 5, rank, dtype=torch.float64),
                   0.3 * torch.rand(k - rank, generator=gen, dtype=torch.float64)])
    U = torch.linalg.qr(torch.randn(out_f, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, k, generator=gen, dtype=torch.float64)).Q
    linear = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_((U * s) @ V.mT)
        linear.bias.copy_(torch.randn(out_f, generator=gen, dtype=torch.float64))
    return linear


def test_rsvd_is_the_from_linear_default():
    linear = gapped_linear()
    default = EDoRALinear.from_linear(linear, 6, seed=3)
    rsvd = EDoRALinear.from_linear(linear, 6, init="rsvd", seed=3)
    for name in ("A", "B", "R", "magnitude"):
        assert torch.equal(getattr(default, name), getattr(rsvd, name)), name


@pytest.mark.parametrize("split", ["u", "sqrt"])
def test_rsvd_layer_matches_exact_svd_layer(split):
    rank = 6
    linear = gapped_linear(rank=rank)
    # sigma=0: R is set below, identically up to the sign alignment.
    exact = EDoRALinear.from_linear(gapped_linear(rank=rank, dtype=torch.float64), rank,
                                    init="svd", split=split, sigma=0.0)
    rsvd = EDoRALinear.from_linear(linear, rank, init="rsvd", split=split, sigma=0.0, seed=0)
    # Singular vectors are defined up to sign: align the columns of B, then A, R follow.
    signs = torch.sign((exact.B.mT @ rsvd.B.double()).diagonal())
    assert_close(rsvd.B * signs, exact.B, torch.float32, "B")
    assert_close(rsvd.A * signs.unsqueeze(1), exact.A, torch.float32, "A")
    assert_close(rsvd.magnitude, exact.magnitude, torch.float32, "magnitude")
    with torch.no_grad():
        exact.R.copy_(0.2 * torch.randn(rank, rank, generator=torch.Generator().manual_seed(0)))
        rsvd.R.copy_(signs.unsqueeze(1) * exact.R * signs)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_close(rsvd(x.float()), exact(x), torch.float32, "forward")


def test_batched_factors_match_one_by_one_for_each_seeded_batch():
    W = make_matrix((3, 40, 32), "llm")
    A, B = edora_factors(W, 5, init="rsvd", seed=7)
    assert A.shape == (3, 5, 32) and B.shape == (3, 40, 5)
    assert_close(A, (B.double().mT @ W.double()), torch.float32, "A = Bᵀ W")


@requires_cuda
def test_cuda_matches_cpu_accuracy_and_is_deterministic():
    W = make_matrix((4, 256, 192), "llm").cuda()
    U, S, Vh = randomized_svd(W, RANK, seed=0)
    again = randomized_svd(W, RANK, seed=0)
    for a, b in zip((U, S, Vh), again):
        assert torch.equal(a, b)
    assert_accurate(W.cpu(), U.cpu(), S.cpu(), RANK, "cuda")
    assert orthonormality_error(U.cpu()) <= ORTHONORMAL_TOL


def test_random_init_draws_the_papers_distributions():
    """The paper's ablation: A ~ U(±1/√r), B ~ U(±1/√out) (kaiming-uniform, a = √5, on its
    transposed factors)."""
    out_f, in_f, rank = 300, 200, 8
    W = torch.randn(out_f, in_f)
    A, B = edora_factors(W, rank, init="random", seed=0)
    for t, bound in ((A, rank ** -0.5), (B, out_f ** -0.5)):
        assert t.abs().max() <= bound
        assert abs(t.std().item() - bound / 3 ** 0.5) < 0.03 * bound
        assert abs(t.mean().item()) < 0.03 * bound
    again, _ = edora_factors(W, rank, init="random", seed=0)
    assert torch.equal(A, again)


def test_random_init_draws_each_layer_at_its_own_rank():
    """Layers of one shape with other ranks (rank_pattern) are drawn at their own scale, not
    sliced from a draw at the largest rank."""
    from edora_kernels.model import apply_edora

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    apply_edora(model, ["0", "1"], 32, rank_pattern={"0": 2}, init="random", seed=0,
                progress=False)
    for layer, rank in ((model[0], 2), (model[1], 32)):
        assert layer.rank == rank
        assert 0.9 * rank ** -0.5 < layer.A.abs().max() <= rank ** -0.5


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32, 64])
def test_default_block_covers_small_ranks(rank):
    """Small ranks get extra test columns (a block of exactly r columns captured too little
    of the top-r energy on real weights at r ≤ 16); from r = 32 none are needed."""
    assert default_oversample(rank) == (10 if rank < 16 else 4 if rank < 32 else 0)
