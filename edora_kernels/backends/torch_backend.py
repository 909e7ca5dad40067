"""The composed-ATen backend: the CPU path and the semantics anchor for the fused kernels.

Each step is one ATen call chosen to avoid temporaries: the rank-r term is added to the base
product in place, the epilogue is a single ``addcmul``.
"""
from __future__ import annotations

import torch


def forward(x, weight, bias, A, P, g, scaling, save):
    v = x @ A.to(x.dtype).T
    y, z = _rescale(x @ weight.T, v, bias, P, g, scaling, save)
    return y, (v if save else x.new_empty(0)), z


def epilogue(y0, v, bias, P, g, scaling, save):
    return _rescale(y0.clone() if bias is None else y0 - bias, v, bias, P, g, scaling, save)


def _rescale(z, v, bias, P, g, scaling, save):
    """``z += s·v Pᵀ`` in place, then ``y = g ⊙ z + b`` in g's dtype (fp32 for half inputs, as
    the kernels' epilogue: g is never rounded to half); z is returned only when saved."""
    dtype = z.dtype
    z.addmm_(v, P.to(dtype).T, alpha=scaling)
    if g.dtype != dtype:
        y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(g.dtype), z, g)
        return y.to(dtype), (z if save else z.new_empty(0))
    # Without autograd z is not kept, so y overwrites it (same arithmetic, one buffer fewer).
    out = None if save else z
    y = torch.mul(z, g, out=out) if bias is None else torch.addcmul(bias, z, g, out=out)
    return y, (z if save else z.new_empty(0))


def backward(gy, weight, B, RA, g, z, scaling, need_dx, need_t, need_colsum):
    dtype = gy.dtype
    cdt = g.dtype
    dx, t, colsum = gy.new_empty(0), gy.new_empty(0), g.new_empty(0)
    if need_dx or need_t:
        gz = gy * g.to(dtype)
        t = gz @ B.to(dtype)
        if need_dx:
            dx = (gz @ weight).addmm_(t, RA.to(dtype), alpha=scaling)
    if need_colsum:
        colsum = torch.linalg.vecdot(gy.to(cdt), z.to(cdt), dim=0)
    return dx, t, colsum
