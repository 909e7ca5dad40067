"""Initialisation of the frozen factors A and B from the base weight (DESIGN §1).

With the rank-r truncated SVD ``W0 ≈ U_r Σ_r V_rᵀ``: ``B = U_r`` and ``A = U_rᵀ W0`` (computed as
the product, so A is exact even when U_r is approximate); ``split="sqrt"`` gives
``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ`` instead. Everything here accepts a batch ``(*, m, n)`` and
computes in fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import torch

from .norm import compute_dtype

INITS = ("svd", "random")
SPLITS = ("u", "sqrt")


def _check_matrix(W: torch.Tensor, rank: int) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a tensor of shape (*, m, n) with at least 2 dims, got {shape}")
    m, n = W.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for W of shape "
                         f"{tuple(W.shape)}, got {rank}")
    if not torch.isfinite(W).all():
        raise ValueError(f"W (shape {tuple(W.shape)}) contains NaN or Inf; cannot factorise it")


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def edora_factors(
    W: torch.Tensor,
    rank: int,
    *,
    init: str = "svd",
    split: str = "u",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(*, rank, n)`` and ``(*, m, rank)`` for ``W`` of shape ``(*, m, n)``.

    ``init="svd"``: exact truncated SVD (``torch.linalg.svd``). ``init="random"``: the paper's
    ablation, Gaussian factors with fan-in variance (A ~ N(0, 1/n), B ~ N(0, 1/rank)), seeded.
    Results are in the compute dtype (fp32, or fp64 for fp64 input).
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
