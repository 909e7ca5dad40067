"""Initialisation of the frozen factors A and B from the base weight (DESIGN §1, §6).

With the rank-r truncated SVD ``W0 ≈ U_r Σ_r V_rᵀ``: ``B = U_r`` and ``A = U_rᵀ W0`` (computed as
the product, so A is exact even when U_r is approximate); ``split="sqrt"`` gives
``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ`` instead. Everything here accepts a batch ``(*, m, n)`` and
computes in fp32 (fp64 for fp64 input).

``randomized_svd`` is the Halko–Martinsson–Tropp range finder, batched over leading dims.
Orthonormalisation is Householder QR (``torch.linalg.qr``), chosen by measurement on the 2-core
CPU this was developed on (``python bench/bench_init.py --orth``): for the 48 RoBERTa-base sketches
it costs about the same as shifted Cholesky-QR2 (~7 ms vs ~6 ms per sweep, a fifth of a
randomized_svd call either way), while Cholesky-QR2 in fp32 loses orthogonality (‖QᵀQ − I‖ ~ 0.1)
once the sketch's condition number passes ~u^(-1/2) ≈ 3e3, which fast-decaying spectra reach;
forming the Gram matrix in fp64 repairs that but is then slower than Householder on CPU.
Householder also stays orthonormal for rank-deficient inputs (e.g. a zero matrix).
"""
from __future__ import annotations

import numbers

import torch

from .norm import compute_dtype

INITS = ("rsvd", "svd", "random")
SPLITS = ("u", "sqrt")


def _check_matrix(W: torch.Tensor, rank: int) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a tensor of shape (*, m, n) with at least 2 dims, got {shape}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a real floating-point tensor, got {W.dtype} "
                        f"(shape {tuple(W.shape)})")
    m, n = W.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for W of shape "
                         f"{tuple(W.shape)}, got {rank}")
    if not torch.isfinite(W).all():
        raise ValueError(f"W (shape {tuple(W.shape)}) contains NaN or Inf; cannot factorise it")


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
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``W ≈ U diag(S) Vh`` by randomised range finding.

    ``W``: ``(*, m, n)``, any floating dtype; computed in fp32 (fp64 for fp64 input) and returned
    in that dtype as contiguous ``U (*, m, rank)``, ``S (*, rank)`` (descending) and
    ``Vh (*, rank, n)``.
    Each matrix of the batch gets its own Gaussian test matrix of ``k = rank + oversample`` columns
    (capped at ``min(m, n)``); ``n_iter`` power iterations follow, re-orthonormalising after every
    product with W or Wᵀ. ``seed`` makes the result deterministic (on a given device and thread
    count); ``None`` draws from torch's global generator. Wide matrices are factorised through
    their transpose so that the final small SVD is ``k × min(m, n)``.
    """
    _check_matrix(W, rank)
    _check_nonnegative_int("oversample", oversample)
    _check_nonnegative_int("n_iter", n_iter)
    Wc = W.detach().to(compute_dtype(W.dtype))
    wide = Wc.shape[-2] < Wc.shape[-1]
    if wide:
        Wc = Wc.mT
    *batch, m, n = Wc.shape  # m >= n from here on
    k = min(rank + oversample, n)
    gen = _generator(Wc.device, seed)
    omega = torch.randn(*batch, n, k, generator=gen, device=Wc.device, dtype=Wc.dtype)
    Q = _orthonormalize(Wc @ omega)
    for _ in range(n_iter):
        Q = _orthonormalize(Wc @ _orthonormalize(Wc.mT @ Q))
    Ub, S, Vh = torch.linalg.svd(Q.mT @ Wc, full_matrices=False)
    U = Q @ Ub[..., :rank]
    S, Vh = S[..., :rank], Vh[..., :rank, :]
    if wide:
        U, Vh = Vh.mT, U.mT
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def edora_factors(
    W: torch.Tensor,
    rank: int,
    *,
    init: str = "rsvd",
    split: str = "u",
    seed: int | None = None,
    oversample: int = 10,
    n_iter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(*, rank, n)`` and ``(*, m, rank)`` for ``W`` of shape ``(*, m, n)``.

    ``init="rsvd"``: :func:`randomized_svd` (``oversample``, ``n_iter`` and ``seed`` are passed
    on). ``init="svd"``: exact truncated SVD (``torch.linalg.svd``). ``init="random"``: the
    paper's ablation, Gaussian factors with fan-in variance (A ~ N(0, 1/n), B ~ N(0, 1/rank)),
    seeded. Results are in the compute dtype (fp32, or fp64 for fp64 input).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_matrix(W, rank)
    Wc = W.detach().to(compute_dtype(W.dtype))
    *batch, m, n = Wc.shape
    if init == "random":
        gen = _generator(Wc.device, seed)
        A = torch.randn(*batch, rank, n, generator=gen, device=Wc.device, dtype=Wc.dtype)
        B = torch.randn(*batch, m, rank, generator=gen, device=Wc.device, dtype=Wc.dtype)
        return A / n**0.5, B / rank**0.5
    if init == "rsvd":
        U, S, _ = randomized_svd(Wc, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    else:
        U, S, _ = torch.linalg.svd(Wc, full_matrices=False)
        U, S = U[..., :rank], S[..., :rank]
    return factors_from_u(Wc, U, S, split)


def factors_from_u(Wc: torch.Tensor, U: torch.Tensor, S: torch.Tensor, split: str):
    """A and B from the leading left singular vectors U (``(*, m, r)``) and values S."""
    A = U.mT @ Wc
    if split == "u":
        return A, U
    root = S.clamp_min(0).sqrt()
    # √Σ Vᵀ = Σ^{-1/2} Uᵀ W; directions with σ = 0 carry nothing either way.
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return A * inv_root.unsqueeze(-1), U * root.unsqueeze(-2)
