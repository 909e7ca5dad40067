"""The composed-ATen backend: the CPU path and the semantics anchor for the fused kernels.

Each step is one ATen call chosen to avoid temporaries: the rank-r term is added to the base
product in place, the epilogue is a single ``addcmul``.
"""
from __future__ import annotations

import torch


def forward(x, weight, bias, A, P, g, scaling, save):
    dtype = x.dtype
    v = x @ A.to(dtype).T
    z = (x @ weight.T).addmm_(v, P.to(dtype).T, alpha=scaling)
    g = g.to(dtype)
    # Without autograd z is not kept, so y overwrites it (same arithmetic, one buffer fewer).
    out = None if save else z
    y = torch.mul(z, g, out=out) if bias is None else torch.addcmul(bias, z, g, out=out)
    if not save:
        return y, x.new_empty(0), x.new_empty(0)
    return y, v, z


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
