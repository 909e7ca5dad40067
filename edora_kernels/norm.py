"""Closed-form row norm of ``V = W0 + s·B R A`` that never forms the out×in matrix
(docs/DESIGN.md §2).

Everything that touches the frozen weight is folded into three small terms, computed once per
(weight, A) pair in fp32 and cached:

    c0 = rowsum(W0 ⊙ W0)  (out)      C = W0 Aᵀ  (out×r)      G = A Aᵀ  (r×r)

so that with ``P = B R`` each step costs O(out·r²):

    n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum((P G) ⊙ P)
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

# n² is clamped here before the square root: a zero row stays finite instead of dividing by 0.
NORM_SQ_FLOOR = 1e-12
_CACHE_SIZE = 256


class NormTerms(NamedTuple):
    c0: torch.Tensor  # (out,)
    C: torch.Tensor   # (out, r)
    G: torch.Tensor   # (r, r)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of n, g and the epilogue: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_terms_uncached(weight: torch.Tensor, A: torch.Tensor) -> NormTerms:
    cdt = compute_dtype(weight.dtype)
    w = weight.detach().to(cdt)
    a = A.detach().to(cdt)
    return NormTerms(c0=(w * w).sum(dim=1), C=w @ a.T, G=a @ a.T)


def base_norm_terms(weight: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rowsum(W0 ⊙ W0), W0 Aᵀ)`` for :func:`edora_kernels.edora_epilogue`: compute once from
    the (dequantised) base weight and keep; they change only when W0 or A do."""
    terms = norm_terms_uncached(weight, A)
    return terms.c0, terms.C


class _Entry(NamedTuple):
    weight: weakref.ref
    A: weakref.ref
    stamp: tuple
    terms: NormTerms


_cache: dict[tuple[int, int], _Entry] = {}


def _stamp(t: torch.Tensor) -> tuple:
    # The version counter moves on every in-place write (optimizer step, load_state_dict, copy_);
    # data_ptr and shape catch a ``.data`` swap.
    return (t._version, t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def norm_terms(weight: torch.Tensor, A: torch.Tensor) -> NormTerms:
    """The cached ``c0, C, G`` for this exact (weight, A) pair, recomputed when either changes.

    Entries are keyed by object identity through weak references, so a freed tensor can never
    hand its terms to a new one that happens to reuse its address.
    """
    if weight.is_inference() or A.is_inference():
        return norm_terms_uncached(weight, A)  # inference tensors carry no version counter
    key = (id(weight), id(A))
    stamp = (_stamp(weight), _stamp(A))
    entry = _cache.get(key)
    if entry is not None and entry.weight() is weight and entry.A() is A and entry.stamp == stamp:
        return entry.terms
    terms = norm_terms_uncached(weight, A)
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = _Entry(weakref.ref(weight), weakref.ref(A), stamp, terms)
    return terms


def clear_cache() -> None:
    _cache.clear()


def row_norm(terms: NormTerms, P: torch.Tensor, scaling: float) -> torch.Tensor:
    """``n = ‖W0 + s·P A‖`` per row from the cached terms; P = B R in the compute dtype.

    Differentiable in P through plain autograd (used by the dropout path and tests).
    """
    n_sq = (
        terms.c0
        + (2.0 * scaling) * (P * terms.C).sum(dim=1)
        + (scaling * scaling) * ((P @ terms.G) * P).sum(dim=1)
    )
    return n_sq.clamp_min(NORM_SQ_FLOOR).sqrt()


def exact_norm_grad_P(
    terms: NormTerms, P: torch.Tensor, n: torch.Tensor, grad_n: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``∂L/∂P`` through the norm: row j is ``(∂L/∂n_j / n_j)·(s C_j + s² (P G)_j)``; O(out·r²)."""
    coeff = (grad_n / n).unsqueeze(1)
    return coeff * (scaling * terms.C + (scaling * scaling) * (P @ terms.G))
