"""Closed-form row norm of ``V = W0 + s·B R A`` that never forms the out×in matrix
(docs/DESIGN.md §2).

Everything that touches the frozen weight is folded into three small terms, computed in float64
from W0 and A once per (W0, A) pair:

    c0 = rowsum(W0 ⊙ W0)  (out)      C = W0 Aᵀ  (out×r)      G = A Aᵀ  (r×r)

so that with ``P = B R`` each step costs O(out·r²):

    n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum((P G) ⊙ P)

The sum cancels when ‖V_j‖ ≪ ‖W0_j‖ (an adapter that nearly removes a row): in fp32 the error of
n² is about 1e-7·c0, larger than n² itself once the ratio falls near 3e-4. The terms and the
combination therefore stay in float64 — O(out·r²) work per step, negligible next to the layer's
GEMMs — and only g = m/n is rounded to the compute dtype.

Who owns the terms: the layer that owns W0 and A (``NormTermsCache``), rebuilt whenever a stamp of
either tensor changes; the functional op takes them as an argument or computes them per call.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

# n² is clamped here before the square root: a zero row stays finite instead of dividing by 0.
NORM_SQ_FLOOR = 1e-24
TERMS_DTYPE = torch.float64
# W0 is read in row chunks of at most this many float64 bytes: the fp64 copy of a 4096×11008
# weight would be 344 MiB.
_CHUNK_BYTES = 64 << 20


class NormTerms(NamedTuple):
    c0: torch.Tensor  # (out,)    float64
    C: torch.Tensor   # (out, r)  float64
    G: torch.Tensor   # (r, r)    float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of g and the epilogue: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_norm_terms(weight: torch.Tensor, A: torch.Tensor) -> NormTerms:
    """``c0, C, G`` in float64. Cost: one read of W0, ``out·in·(r + 1)`` fp64 multiply-adds and
    at most 64 MiB of temporaries."""
    a = A.detach().to(TERMS_DTYPE)
    rows = max(1, _CHUNK_BYTES // (8 * max(weight.shape[1], 1)))
    c0, C = [], []
    for chunk in weight.detach().split(rows):
        w = chunk.to(TERMS_DTYPE)
        c0.append((w * w).sum(dim=1))
        C.append(w @ a.T)
    if not c0:  # out = 0
        return NormTerms(a.new_zeros(0), a.new_zeros(0, a.shape[0]), a @ a.T)
    return NormTerms(torch.cat(c0), torch.cat(C), a @ a.T)


def base_norm_terms(weight: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rowsum(W0 ⊙ W0), W0 Aᵀ)`` in float64 for :func:`edora_kernels.edora_epilogue`: compute
    once from the (dequantised) base weight and keep; they change only when W0 or A do."""
    terms = compute_norm_terms(weight, A)
    return terms.c0, terms.C


def row_norm(terms: NormTerms, P: torch.Tensor, scaling: float) -> torch.Tensor:
    """``n = ‖W0 + s·P A‖`` per row, in float64; P = B R (cast to float64 here), out×r — or
    K×out×r for K adapters sharing the basis (K×out norms).

    Differentiable in P through plain autograd (the composed path and the tests use that).
    """
    P = P.to(TERMS_DTYPE)
    # n² = c0 + rowsum(P ⊙ (2s·C + s²·P G)): the inner term is one addmm (per adapter)
    beta, alpha = 2.0 * scaling, scaling * scaling
    if P.dim() == 2:
        inner = torch.addmm(terms.C, P, terms.G, beta=beta, alpha=alpha)
    else:
        inner = torch.baddbmm(terms.C.expand(P.shape), P, terms.G.expand(len(P), -1, -1),
                              beta=beta, alpha=alpha)
    return (terms.c0 + torch.linalg.vecdot(P, inner)).clamp_min(NORM_SQ_FLOOR).sqrt()


def exact_norm_grad_P(
    terms: NormTerms, P: torch.Tensor, n: torch.Tensor, grad_n: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``∂L/∂P`` through the norm: row j is ``(∂L/∂n_j / n_j)·(s C_j + s² (P G)_j)``; O(out·r²),
    float64."""
    P = P.to(TERMS_DTYPE)
    coeff = (grad_n.to(TERMS_DTYPE) / n).unsqueeze(1)
    return coeff * (scaling * terms.C + (scaling * scaling) * (P @ terms.G))


# --- ownership ------------------------------------------------------------------------------------

def _stamp(t: torch.Tensor) -> tuple:
    """What identifies the values of ``t`` without reading them: its storage (held weakly, so a
    freed storage whose address is reused never matches), where it starts, its layout, and the
    version counter that every in-place write through autograd's view of it moves."""
    return (weakref.ref(t.untyped_storage()), t.data_ptr(), t._version, tuple(t.shape),
            t.stride(), t.dtype, t.device)


def _same(stamp: tuple, t: torch.Tensor) -> bool:
    return stamp[0]() is t.untyped_storage() and stamp[1:] == _stamp(t)[1:]


class NormTermsCache:
    """The norm terms of one (W0, A) pair, held by the module that owns W0 and A.

    ``get`` returns the stored terms while both tensors carry the stamps they had when the terms
    were computed, and recomputes otherwise: after an optimizer-style in-place write, a
    ``load_state_dict``, a ``.to()``/``.half()``, a ``.data = ...`` swap. Writes that bypass the
    version counter (``weight.data.mul_()``, writes through a numpy view) cannot be seen:
    call :func:`edora_kernels.refresh_norm_terms` after them, or run with ``EDORA_VERIFY_NORM=1``
    to catch them. The stored entry is replaced in a single assignment, so concurrent callers see
    either the old or the new entry, never a mix; the terms die with their owner.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple, tuple, NormTerms] | None = None

    def get(self, stamped: torch.Tensor, A: torch.Tensor, weight=None) -> NormTerms:
        """The terms of (W0, A). ``stamped`` is W0 itself, or for a quantized base the tensor
        whose storage and version change with it; then ``weight()`` gives W0 dense, called
        only when the terms are recomputed (the base is dequantized only then)."""
        def compute():
            return compute_norm_terms(stamped if weight is None else weight(), A)

        if stamped.is_inference() or A.is_inference():
            return compute()  # inference tensors carry no version counter
        entry = self._entry
        if entry is not None and _same(entry[0], stamped) and _same(entry[1], A):
            return entry[2]
        stamps = (_stamp(stamped), _stamp(A))  # taken before reading: a racing write re-stamps
        terms = compute()
        self._entry = (*stamps, terms)
        return terms

    def clear(self) -> None:
        self._entry = None

    # A copy or a pickle starts empty: its weights are other tensors.
    def __deepcopy__(self, memo) -> "NormTermsCache":
        return NormTermsCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entry = None
