"""The composed-ATen backend: the CPU path and the semantics anchor for the fused kernels.

Each step is one ATen call chosen to avoid temporaries: the rank-r term is added to the base
product in place, the epilogue is a single ``addcmul`` written over that product.
"""
from __future__ import annotations

import torch


def mm_compute(a, b, cdt):
    """``a @ b`` with an fp32 (compute dtype) result for half inputs: v and t feed the cancelling
    sum dR = s·tᵀ v, so they are not rounded to half. b is small (rank r columns)."""
    if a.dtype == cdt:
        return a @ b.to(cdt)
    if a.is_cuda:
        return torch.mm(a, b.to(a.dtype), out_dtype=cdt)  # fp32 output of the half GEMM
    return a.to(cdt) @ b.to(cdt)


def forward(x, weight, bias, A, P, g, scaling, save):
    v = mm_compute(x, A.T, g.dtype)
    y = _rescale(x @ weight.T, v, bias, P, g, scaling)
    return y, (v if save else v.new_empty(0))


def epilogue(y0, v, bias, P, g, scaling):
    return _rescale(y0.clone() if bias is None else y0 - bias, v, bias, P, g, scaling)


def _rescale(z, v, bias, P, g, scaling):
    """``z += s·v Pᵀ`` in place (z is a temporary of the caller), then ``y = g ⊙ z + b`` in g's
    dtype: fp32 for half inputs as in the kernels' epilogue, g is never rounded to half."""
    dtype = z.dtype
    z.addmm_(v.to(dtype), P.to(dtype).T, alpha=scaling)
    if g.dtype != dtype:
        y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(g.dtype), z, g)
        return y.to(dtype)
    return torch.mul(z, g, out=z) if bias is None else torch.addcmul(bias, z, g, out=z)


def backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t, need_colsum):
    cdt = g.dtype
    dx, t, colsum = gy.new_empty(0), gy.new_empty(0), g.new_empty(0)
    if need_dx or need_t:
        # gz = gy ⊙ g is never formed: g scales the small operands (B, and W0 when that is the
        # smaller of W0 and gy), which saves an N×out pass and its buffer.
        t = mm_compute(gy, B.to(cdt) * g[:, None], cdt)
        if need_dx:
            dx = _grad_input(gy, weight, B, RA, g, t, scaling)
    if need_colsum:
        colsum = grad_colsum(gy, y, bias, cdt)
    return dx, t, colsum


def _grad_input(gy, weight, B, RA, g, t, scaling):
    """``dx = (gy ⊙ g) W0 + s·t (R A)``.

    fp32/fp64: as one GEMM, ``gy (g ⊙ (W0 + s·B R A))`` — forming the out×in matrix costs
    out·in·r multiply-adds, less than the N×in rank product and its pass when N ≥ out.
    Half inputs keep W0 and the rank term apart: rounding W0 + s·B R A to half would drop
    updates below W0's half-precision quantum.
    """
    dtype = gy.dtype
    if dtype == g.dtype and gy.shape[0] >= weight.shape[0]:
        scaled = torch.addmm(weight, B.to(dtype), RA.to(dtype), alpha=scaling).mul_(g[:, None])
        return gy @ scaled
    low = (t @ (scaling * RA)).to(dtype)
    if weight.numel() <= gy.numel():
        return torch.addmm(low, gy, weight * g[:, None].to(dtype))
    return torch.addmm(low, gy * g.to(dtype), weight)


def grad_colsum(gy, y, bias, cdt):
    """``Σ_rows gy ⊙ (y − b)`` in ``cdt`` (= g ⊙ Σ gy ⊙ z: the magnitude gradient's sum), as
    ``Σ gy ⊙ y − b ⊙ Σ gy``: no N×out temporary for y − b."""
    gy_c, y_c = gy.to(cdt), y.to(cdt)
    colsum = (gy_c * y_c).sum(0)
    if bias is not None:
        colsum -= bias.to(cdt) * gy_c.sum(0)
    return colsum
