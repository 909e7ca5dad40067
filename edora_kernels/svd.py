"""Initialisation of the frozen factors A and B from the base weight (docs/DESIGN.md §1, §6).

With the rank-r truncated SVD ``W0 ≈ U_r Σ_r V_rᵀ``: ``B = U_r`` and ``A = U_rᵀ W0`` (computed as
the product — for m ≤ n from the products randomized_svd made — so A is exact even when U_r is
approximate); ``split="sqrt"`` gives
``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ`` instead. Everything here accepts a batch ``(*, m, n)`` and
computes in fp32 (fp64 for fp64 input).

``randomized_svd`` is a Halko–Martinsson–Tropp range finder, batched over leading dims, in its
block-Krylov form (HMT §4.6): every block of the power iteration is kept, and the Rayleigh–Ritz
step reuses the Wᵀ-products already made. Measured on RoBERTa-base's 48 target matrices (bulk +
power-law spikes, r = 16, 2-core CPU, ``edora-kernels bench --init``), it reaches scikit-learn's
``TruncatedSVD(n_iter=10)`` residual with 12 passes over W of 16 columns, where plain subspace
iteration needs 22 passes of 26 columns (p = 10, q = 10); at p = 10, q = 4 subspace iteration
is both slower and less accurate than the defaults here (p = 0, q = 5), which is why they differ
from the usual p ≈ 10 (oversampling matters for subspace iteration; depth does it here).

Orthonormalisation is Householder QR (``torch.linalg.qr``), chosen by measurement (``edora-kernels
bench --init --init-orth``, two runs): per call on the 48 RoBERTa-base matrices it takes 21–22 ms
of ~360 ms. Shifted Cholesky-QR2 took 16 ms in one run and 32 ms in the other, and it loses
orthogonality (‖QᵀQ − I‖ = 3e-3) at a block condition number of 4e3 and breaks down at 6e6, which
fast-decaying spectra reach; shifted Cholesky-QR3 (22–46 ms) breaks down there too; Cholesky-QR2
with an fp64 Gram matrix is robust but slower (29–47 ms). At best Cholesky-QR would save 2% of a
call on this CPU, at the price of a fallback path; Householder also stays orthonormal for rank-
deficient inputs. (On a GPU the balance may differ: rerun ``--init-orth``.)
"""
from __future__ import annotations

import numbers

import torch

from .checks import check_init, check_rank, check_seed, check_split
from .norm import compute_dtype
from .op_common import cpu_threads_for

# randomized_svd's defaults, chosen by measurement (see the module docstring): five Krylov steps
# and an oversampling that shrinks with the rank.
DEFAULT_N_ITER = 5


def default_oversample(rank: int) -> int:
    """Extra test columns by rank. Measured on all-MiniLM-L6-v2's 24 attention matrices against
    scikit-learn's ``TruncatedSVD(n_iter=10)``: with 5 Krylov steps, a block of exactly ``rank``
    columns captured less of the top-r energy at r ≤ 16 (r = 4: 0.985 vs 0.9997 on the worst
    matrix); 10 extra columns below r = 16 and 4 at r = 16 capture at least as much on every
    matrix; from r = 32 the Krylov space is large enough without."""
    return 10 if rank < 16 else 4 if rank < 32 else 0


def _check_matrix(W: torch.Tensor, rank: int, *, finite: bool = True) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a tensor of shape (*, m, n) with at least 2 dims, got {shape}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a real floating-point tensor, got {W.dtype} "
                        f"(shape {tuple(W.shape)})")
    m, n = W.shape[-2:]
    check_rank(rank, m, n, what=f"W of shape {tuple(W.shape)}", dims="m, n")
    if finite:
        _require_finite(W, W)


def _require_finite(t: torch.Tensor, W: torch.Tensor) -> None:
    """Raise if ``t`` (W itself, or a sketch W Ω that is non-finite whenever W is) is not finite.

    Checking the sketch instead of W saves a full pass over W (torch.isfinite on CPU makes three);
    only on failure is W itself checked, to tell NaN/Inf from overflow.
    """
    if torch.isfinite(t).all():
        return
    if t is W or not torch.isfinite(W).all():
        raise ValueError(f"W (shape {tuple(W.shape)}) contains NaN or Inf; cannot factorise it")
    raise ValueError(f"W (shape {tuple(W.shape)}, max |W| = {W.abs().max().item():.3g}) "
                     f"overflows {compute_dtype(W.dtype)} in W·Ω; scale it down")


def _check_nonnegative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    # Householder QR of a thin block is a chain of level-2 steps of m·b multiply-adds each,
    # too short to share out, so below SMALL_CPU_WORK it runs on one thread: on 2 CPU cores
    # (2, 11008, 20) took 2x as long on two threads, 25x while the other core was busy.
    with cpu_threads_for(Y.shape[-2] * Y.shape[-1]):
        return torch.linalg.qr(Y, mode="reduced").Q


def _times(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``M @ Q``; on the CPU, for M the transpose of a contiguous matrix, as ``(Qᵀ Mᵀ)ᵀ``, which
    reads M's storage in order: 20-35% faster for 4096×4096 and 11008×4096 weights on 2 cores
    (for a lone 4096×11008 one 20% slower, a batch of them 10% faster)."""
    if M.device.type == "cpu" and M.mT.is_contiguous() and not M.is_contiguous():
        return (Q.mT @ M.mT).mT
    return M @ Q


def _orthonormalize_against(Y: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the part of ``Y`` (batch, m, b) outside span(K), K orthonormal."""
    for _ in range(2):  # block Gram–Schmidt, twice: orthogonal to K to rounding
        Y = Y - K @ (K.mT @ Y)
    Q = _orthonormalize(Y)
    # When Y lies (partly) inside span(K) — W of low rank, an invariant subspace reached — the QR
    # above blows rounding up into directions inside span(K). Householder QR of [K, Y] returns an
    # orthonormal complement of K in every case, so those matrices take that slower route. The
    # bound is tight because the errors of all blocks add up in U (measured: ~1 eps normally).
    tol = 4 * torch.finfo(Y.dtype).eps
    lost = (K.mT @ Q).abs().amax(dim=(-2, -1)) > tol
    if lost.any():
        Q[lost] = _orthonormalize(torch.cat([K[lost], Y[lost]], dim=-1))[..., K.shape[-1]:]
    return Q


def _top_svd_of_transpose(X: torch.Tensor, rank: int):
    """``(Ub, S, Vb)``, the top-``rank`` SVD ``Xᵀ ≈ Ub diag(S) Vbᵀ`` of a tall (batch, n, d) X.

    For fp32 X, from the eigenvectors of the d×d Gram matrix XᵀX formed in fp64 (squaring in fp64
    loses nothing fp32 holds) and a QR of X·Ub for the other side: about twice as fast on CPU as
    LAPACK's SVD of X, and both factors come out orthonormal. fp64 X takes the SVD.
    """
    if X.dtype == torch.float64:
        Vb, S, Ubh = torch.linalg.svd(X, full_matrices=False)
        return Ubh[..., :rank, :].mT, S[..., :rank], Vb[..., :rank]
    X64 = X.double()
    eigenvalues, E = torch.linalg.eigh(X64.mT @ X64)  # ascending
    E = E[..., -rank:].flip(-1)
    S = eigenvalues[..., -rank:].flip(-1).clamp_min(0).sqrt()
    Vb, R = torch.linalg.qr(X64 @ E)  # columns σ_i v_i, made orthonormal; keep their signs
    Vb = Vb * torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    return E.to(X.dtype), S.to(X.dtype), Vb.to(X.dtype)


def randomized_svd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    n_iter: int = DEFAULT_N_ITER,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``W ≈ U diag(S) Vh`` by a randomised block-Krylov range finder.

    ``W``: ``(*, m, n)``, any floating dtype; computed in fp32 (fp64 for fp64 input) and returned
    in that dtype as contiguous ``U (*, m, rank)`` and ``Vh (*, rank, n)`` with orthonormal
    columns/rows and ``S (*, rank)`` descending. Each matrix of the batch gets its own Gaussian
    test matrix Ω of ``b = rank + oversample`` columns (default: :func:`default_oversample`).
    ``n_iter`` steps each apply Wᵀ then W to
    the newest block, re-orthonormalising after every product, and every block is kept: the
    range is the block Krylov space [WΩ, (WWᵀ)WΩ, …, (WWᵀ)^n_iter WΩ] of dimension
    ``(n_iter + 1)·b`` (HMT §4.6; for tall W the same is built from Wᵀ, so that the basis lives
    on the shorter side), and the Rayleigh–Ritz step reuses the products already made, so that
    there are ``2·n_iter + 2`` passes over W in all. When that dimension would reach
    ``min(m, n)`` the exact SVD is as cheap and is returned instead. ``seed`` makes the result
    deterministic on a given device and thread count; ``None`` draws from torch's global
    generator.
    """
    if oversample is None:
        oversample = default_oversample(rank)
    _check_nonnegative_int("oversample", oversample)
    _check_nonnegative_int("n_iter", n_iter)
    check_seed(seed)
    _check_matrix(W, rank, finite=False)
    Wc = W.detach().to(compute_dtype(W.dtype))
    *batch, m, n = Wc.shape
    short = min(m, n)
    b = min(rank + oversample, short)
    if (n_iter + 1) * b >= short:
        _require_finite(Wc, Wc)
        U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        return (U[..., :rank].contiguous(), S[..., :rank].contiguous(),
                Vh[..., :rank, :].contiguous())

    # The Krylov basis K lives on the shorter side: fewer rows to re-orthogonalise.
    tall = m > n
    Wo = (Wc.mT if tall else Wc).reshape(-1, short, max(m, n))
    d = (n_iter + 1) * b
    gen = _generator(Wc.device, seed)
    omega = torch.randn(Wo.shape[0], Wo.shape[-1], b, generator=gen, device=Wc.device,
                        dtype=Wc.dtype)
    K = Wo.new_empty(Wo.shape[0], short, d)
    X = Wo.new_empty(Wo.shape[0], Wo.shape[-1], d)  # X = Woᵀ K, so that Kᵀ Wo = Xᵀ comes free
    Y = _times(Wo, omega)
    _require_finite(Y, W)
    Q = _orthonormalize(Y)
    K[..., :b] = Q
    for i in range(1, n_iter + 1):
        X[..., (i - 1) * b:i * b] = Xi = _times(Wo.mT, Q)
        Q = _orthonormalize_against(_times(Wo, _orthonormalize(Xi)), K[..., :i * b])
        K[..., i * b:(i + 1) * b] = Q
    X[..., n_iter * b:] = _times(Wo.mT, Q)
    # Rayleigh–Ritz: Kᵀ Wo = Xᵀ = Ub S Vbᵀ, so Wo ≈ (K Ub) S Vbᵀ.
    Ub, S, Vb = _top_svd_of_transpose(X, rank)
    U = K @ Ub
    Vh = Vb.mT
    if tall:
        U, Vh = Vh.mT, U.mT
    return (U.reshape(*batch, m, rank).contiguous(), S.reshape(*batch, rank),
            Vh.reshape(*batch, rank, n).contiguous())


def edora_factors(
    W: torch.Tensor,
    rank: int,
    *,
    init: str = "rsvd",
    split: str = "u",
    seed: int | None = None,
    oversample: int | None = None,
    n_iter: int = DEFAULT_N_ITER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(*, rank, n)`` and ``(*, m, rank)`` for ``W`` of shape ``(*, m, n)``.

    ``init="rsvd"``: :func:`randomized_svd` (``oversample``, ``n_iter`` and ``seed`` are passed
    on). ``init="svd"``: exact truncated SVD (``torch.linalg.svd``). ``init="random"``: the
    paper's random-initialisation ablation, seeded: A ~ U(±1/√rank), B ~ U(±1/√m), the
    distributions its released code draws (kaiming-uniform with a = √5 on the transposed
    factors). Results are in the compute dtype (fp32, or fp64 for fp64 input).
    """
    check_init(init)
    check_split(split)
    check_seed(seed)
    _check_matrix(W, rank, finite=init != "rsvd")  # randomized_svd checks its sketch instead
    Wc = W.detach().to(compute_dtype(W.dtype))
    *batch, m, n = Wc.shape
    if init == "random":
        # The paper's ablation draws both factors with PyTorch's kaiming_uniform_(a=√5) on its
        # (in × r) encoder and (r × out) decoder: fan-ins r and out, so A ~ U(±1/√r) and
        # B ~ U(±1/√out).
        gen = _generator(Wc.device, seed)
        A = torch.rand(*batch, rank, n, generator=gen, device=Wc.device, dtype=Wc.dtype)
        B = torch.rand(*batch, m, rank, generator=gen, device=Wc.device, dtype=Wc.dtype)
        return (2 * A - 1) / rank**0.5, (2 * B - 1) / m**0.5
    if init == "rsvd":
        U, S, Vh = randomized_svd(Wc, rank, oversample=oversample, n_iter=n_iter, seed=seed)
        # For m ≤ n, diag(S)·Vh is Uᵀ W already, from the Wᵀ-products X = Wᵀ K of the Krylov
        # basis K (U = K Ub and Vhᵀ diag(S) = X Ub): a pass over W saved. For m > n the basis is
        # on the other side, and Uᵀ W takes the product.
        UtW = S.unsqueeze(-1) * Vh if m <= n else None
    else:
        U, S, _ = torch.linalg.svd(Wc, full_matrices=False)
        U, S, UtW = U[..., :rank], S[..., :rank], None
    return factors_from_u(Wc, U, S, split, UtW)


def factors_from_u(Wc: torch.Tensor, U: torch.Tensor, S: torch.Tensor, split: str,
                   UtW: torch.Tensor | None = None):
    """A and B from the leading left singular vectors U (``(*, m, r)``) and values S; ``UtW``
    is ``Uᵀ W`` when known (else it is computed)."""
    A = U.mT @ Wc if UtW is None else UtW
    if split == "u":
        return A, U
    root = S.clamp_min(0).sqrt()
    # √Σ Vᵀ = Σ^{-1/2} Uᵀ W; directions with σ = 0 carry nothing either way.
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return A * inv_root.unsqueeze(-1), U * root.unsqueeze(-2)
