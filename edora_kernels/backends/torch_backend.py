"""The composed-ATen backend: the CPU path and the semantics anchor for the fused kernels.

Each step is one ATen call chosen to avoid temporaries: the rank-r term is added to the base
product in place, the epilogue is a single ``addcmul`` written over that product. The O(out·r²)
work is ``op_common``'s, in float64. On CPU everything but the base GEMMs runs on one thread
when it is small (``op_common.cpu_threads_for``): waking OpenMP's threads would cost more.
"""
from __future__ import annotations

import torch

from ..norm import compute_dtype
from ..op_common import (
    ELEMENTWISE_WORK,
    Saved,
    adapter_grads,
    cpu_threads_for,
    gate,
    keep_slot_columns,
    magnitude_sums,
)


def mm_compute(a, b, cdt):
    """``a @ b`` with an fp32 (compute dtype) result for half inputs: v and t feed the cancelling
    sum dR = s·tᵀ v, so they are not rounded to half. b is small (rank r columns)."""
    if a.dtype == cdt:
        return a @ b.to(cdt)
    if a.is_cuda or a.is_meta:  # (meta: what a GPU would run, for the launch counts)
        return torch.mm(a, b.to(a.dtype), out_dtype=cdt)  # fp32 output of the half GEMM
    return a.to(cdt) @ b.to(cdt)


# --- forward ----------------------------------------------------------------------------------

def forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """``y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b`` and what backward keeps (``op_common.Saved``)."""
    return _rescale(x @ weight.T, x, bias, A, B, R, magnitude, terms, scaling, save, capacity)


def epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """``y = g ⊙ (y0 − b + s·v Pᵀ) + b`` for a base layer's output y0 (bias included)."""
    z = y0.clone() if bias is None else y0 - bias
    return _rescale(z, x, bias, A, B, R, magnitude, terms, scaling, save, capacity)


def _rescale(z, x, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """``z += s·v Pᵀ`` in place (z is this call's temporary), then ``y = g ⊙ z + b`` in g's
    dtype: fp32 for half inputs as in the kernels' epilogue, g is never rounded to half."""
    dtype, cdt = z.dtype, compute_dtype(z.dtype)
    with _rank_ops(z, A):
        P, n, g, slots = gate(terms, B, R, magnitude, scaling, cdt, capacity)
        v = mm_compute(x, A.T, cdt)
        z.addmm_(v.to(dtype), P.to(dtype).T, alpha=scaling)
        zbuf = keep_slot_columns(z, slots, capacity)
        if g.dtype != dtype:
            y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(g.dtype), z, g)
            y = y.to(dtype)
        else:
            y = torch.mul(z, g, out=z) if bias is None else torch.addcmul(bias, z, g, out=z)
    return y, Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)


def _rank_ops(rows, A):
    """The CPU threads for the rank-r products and elementwise passes over N = ``rows.shape[0]``
    rows, sized by the largest of them (each op is one OpenMP region)."""
    rank, in_features = A.shape
    n_rows, out_features = rows.shape[0], rows.shape[-1]
    return cpu_threads_for(max(n_rows * rank * max(in_features, out_features),
                               ELEMENTWISE_WORK * n_rows * out_features))


# --- backward ---------------------------------------------------------------------------------

def backward(gy, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
             need_dx, need_dR, need_dm):
    """``(dx, dR, dm)`` of :func:`forward`; unneeded ones come back empty."""
    dx = gy.new_empty(0)
    with _rank_ops(gy, A):
        t = _t(gy, B, saved.g, need_dx or need_dR)
        grads = _adapter_grads(gy, bias, B, R, magnitude, terms, scaling, detach_norm, y,
                               saved, t, need_dR, need_dm)
        if need_dx:
            # dx = (gy ⊙ g) W0 + u A with u = s·t R: one pass over gy, the big GEMM, a rank-r one
            gz = gy * saved.g.to(gy.dtype)
            u = _u(t, R, scaling, gy.dtype)
    if need_dx:
        dx = torch.mm(gz, weight)
        with _rank_ops(gy, A):
            dx.addmm_(u, A.to(gy.dtype))
    return (dx, *grads)


def epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
                      need_dy0, need_dx, need_dR, need_dm):
    """``(dy0, dx, dR, dm)`` of :func:`epilogue_forward`: dy0 = gy ⊙ g goes to the base layer,
    dx is the rank-r branch's share only."""
    with _rank_ops(gy, A):
        t = _t(gy, B, saved.g, need_dx or need_dR)
        dy0 = gy * saved.g.to(gy.dtype) if need_dy0 else gy.new_empty(0)
        dx = (torch.mm(_u(t, R, scaling, gy.dtype), A.to(gy.dtype)) if need_dx
              else gy.new_empty(0))
        return (dy0, dx, *_adapter_grads(gy, bias, B, R, magnitude, terms, scaling,
                                         detach_norm, y, saved, t, need_dR, need_dm))


def _t(gy, B, g, needed):
    """``t = (gy ⊙ g) B`` in the compute dtype, with g scaling B: no N×out pass, and no
    rounding of gy ⊙ g to half before the sum that dR needs."""
    return mm_compute(gy, B.to(g.dtype) * g[:, None], g.dtype) if needed else None


def _u(t, R, scaling, dtype):
    """``u = s·t R`` (N×r), dx's rank-r rows, in the gradient's dtype; s scales the r×r
    factor."""
    return torch.mm(t, R.to(t.dtype) * scaling).to(dtype)


def _adapter_grads(gy, bias, B, R, magnitude, terms, scaling, detach_norm, y, saved, t,
                   need_dR, need_dm):
    S = None
    if need_dm or (need_dR and not detach_norm):
        S = magnitude_sums(grad_colsum(gy, y, bias, saved.g.dtype), gy, saved, magnitude)
    return adapter_grads(t, saved.v, S, terms, B, R, saved.P, magnitude, saved.n, scaling,
                         detach_norm, need_dR, need_dm)


def grad_colsum(gy, y, bias, cdt):
    """``Σ_rows gy ⊙ (y − b)`` in ``cdt`` (= g ⊙ Σ gy ⊙ z: the magnitude gradient's sum), as
    ``Σ gy ⊙ y − b ⊙ Σ gy``: no N×out temporary for y − b."""
    gy_c, y_c = gy.to(cdt), y.to(cdt)
    colsum = torch.linalg.vecdot(gy_c, y_c, dim=0)
    if bias is not None:
        colsum -= bias.to(cdt) * torch.mv(gy_c.T, gy_c.new_ones(gy_c.shape[0]))
    return colsum
