"""The composed-ATen backend: the CPU path and the semantics anchor for the fused kernels.

Each step is one ATen call chosen to avoid temporaries: the rank-r term is added to the base
product in place, the epilogue is a single ``addcmul`` written over that product.
"""
from __future__ import annotations

import torch


def forward(x, weight, bias, A, P, g, scaling, save):
    v = x @ A.to(x.dtype).T
    y = _rescale(x @ weight.T, v, bias, P, g, scaling)
    return y, (v if save else x.new_empty(0))


def epilogue(y0, v, bias, P, g, scaling):
    return _rescale(y0.clone() if bias is None else y0 - bias, v, bias, P, g, scaling)


def _rescale(z, v, bias, P, g, scaling):
    """``z += s·v Pᵀ`` in place (z is a temporary of the caller), then ``y = g ⊙ z + b`` in g's
    dtype: fp32 for half inputs as in the kernels' epilogue, g is never rounded to half."""
    dtype = z.dtype
    z.addmm_(v, P.to(dtype).T, alpha=scaling)
    if g.dtype != dtype:
        y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(g.dtype), z, g)
        return y.to(dtype)
    return torch.mul(z, g, out=z) if bias is None else torch.addcmul(bias, z, g, out=z)


def backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t, need_colsum):
    dtype = gy.dtype
    cdt = g.dtype
    dx, t, colsum = gy.new_empty(0), gy.new_empty(0), g.new_empty(0)
    if need_dx or need_t:
        gz = gy * g.to(dtype)
        t = gz @ B.to(dtype)
        if need_dx:
            dx = (gz @ weight).addmm_(t, RA.to(dtype), alpha=scaling)
    if need_colsum:
        colsum = grad_colsum(gy, y, bias, cdt)
    return dx, t, colsum


def grad_colsum(gy, y, bias, cdt):
    """``Σ_rows gy ⊙ (y − b)`` in ``cdt`` (= g ⊙ Σ gy ⊙ z: the magnitude gradient's sum)."""
    shifted = y.to(cdt) if bias is None else y.to(cdt) - bias.to(cdt)
    return torch.linalg.vecdot(gy.to(cdt), shifted, dim=0)
