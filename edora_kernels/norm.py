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
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    """``n = ‖W0 + s·P A‖`` per row, in float64; P = B R (out×r, cast to float64 here).

    Differentiable in P through plain autograd (the composed path and the tests use that).
    """
    P = P.to(TERMS_DTYPE)
    # n² = c0 + rowsum(P ⊙ (2s·C + s²·P G)): the inner term is one addmm
    inner = torch.addmm(terms.C, P, terms.G, beta=2.0 * scaling, alpha=scaling * scaling)
    return (terms.c0 + torch.linalg.vecdot(P, inner)).clamp_min(NORM_SQ_FLOOR).sqrt()


def adapter_norms(terms: NormTerms, B: torch.Tensor, Rs: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``‖W0 + s·B R_k A‖`` per row for the K cores ``Rs`` (K×r×r) of one basis: K×out,
    float64, differentiable in Rs. With M_k = R_k G R_kᵀ, row j of adapter k is

        n²_kj = c0_j + 2s·b_jᵀ R_k c_j + s²·b_jᵀ M_k b_j

    a bilinear form in (b_j, c_j) whose coefficients are adapter k's, so all K come out of GEMMs
    over the basis's rows rather than K products B R_k: either the row features
    [b_j ⊗ c_j, b_j ⊗ b_j] (out×2r²) times the K coefficient vectors [2s·R_k, s²·M_k], or
    [C | B] times the K coefficient blocks (out×rK), then a dot with b_j. Both do 2K·out·r²
    multiply-adds; the one with the smaller intermediate is taken (the features once K > 2r)."""
    B, Rs = B.to(TERMS_DTYPE), Rs.to(TERMS_DTYPE)
    (out, r), K = B.shape, Rs.shape[0]
    M = torch.bmm(torch.matmul(Rs, terms.G), Rs.transpose(1, 2))
    if K > 2 * r:
        features_c = (B.unsqueeze(2) * terms.C.unsqueeze(1)).reshape(out, r * r)
        features_b = (B.unsqueeze(2) * B.unsqueeze(1)).reshape(out, r * r)
        n_sq = torch.addmm(terms.c0.unsqueeze(1), features_c, Rs.reshape(K, r * r).T,
                           alpha=2 * scaling)
        n_sq = n_sq.addmm_(features_b, M.reshape(K, r * r).T, alpha=scaling * scaling).T
    else:
        coefficients = torch.cat([(2 * scaling) * Rs.transpose(1, 2), (scaling * scaling) * M],
                                 dim=1)  # K × 2r × r: [C | B] row j times block k, dotted with b_j
        Z = torch.cat([terms.C, B], dim=1) @ coefficients.permute(1, 0, 2).reshape(2 * r, K * r)
        n_sq = torch.linalg.vecdot(Z.view(out, K, r), B.unsqueeze(1)).T + terms.c0
    return n_sq.clamp_min(NORM_SQ_FLOOR).sqrt()


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


# Optimizers that update parameters in fused kernels (torch's fused AdamW, which transformers'
# Trainer takes by default) leave the version counter where it was, so stamps cannot see their
# writes: every optimizer step anywhere is counted here, and a value made from adapters' R and m
# is kept within one step only (a step-post hook common to all torch optimizers).
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class StampedEntries:
    """Values made from tensors that change in place (adapters' R and m), kept by key — the
    ``capacity`` latest keys — with those tensors' stamps and the norm terms they used, and
    returned while every stamp and the terms are still the same and no optimizer has stepped
    since. A copy or a pickle starts empty, as :class:`NormTermsCache` does."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict = {}

    def get(self, key, tensors, terms):
        """The value kept for ``key`` if it was made from these ``tensors`` unchanged and from
        ``terms``; else None."""
        entry = self._entries.get(key)
        if (entry is not None and entry[1] is terms and entry[3] == _optimizer_steps[0]
                and all(_same(stamp, t) for stamp, t in zip(entry[0], tensors))):
            return entry[2]
        return None

    def put(self, key, tensors, terms, value) -> None:
        if key not in self._entries and len(self._entries) >= self.capacity:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = ([_stamp(t) for t in tensors], terms, value, _optimizer_steps[0])

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo) -> "StampedEntries":
        return StampedEntries(self.capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.capacity, self._entries = state["capacity"], {}
