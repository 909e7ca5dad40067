"""The CUDA C++ backend: cuBLAS (through ATen) for the GEMMs, ``edora_kernels._C`` for the rest.

Per step (contract in ``edora_kernels.backends``):

- forward: ``v = x Aᵀ`` and ``x W0ᵀ`` are two ATen GEMMs; one fused kernel (``_C.rescale``) turns
  ``x W0ᵀ`` into ``y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b``, computing the rank-r term in fp32 and rounding
  y once, written into the ``x W0ᵀ`` buffer: no output-sized temporary is added.
- epilogue: the same kernel on ``y0`` (subtracting b), into a fresh output (y0 is the caller's).
- backward: one kernel (``_C.grad_scale_colsum``) reads gy (and y) once for ``gz = gy ⊙ g`` and
  the deterministic column sums of ``gy ⊙ (y − b)``; ``t = gz B`` and ``dx = gz W0 + s·t (R A)``
  are ATen GEMMs.

All dtypes, float64 included, go through the same kernels (fp64 accumulation for fp64). The
extension is imported here, so this module only loads where it is built (see csrc/README.md).
"""
from __future__ import annotations

import torch

from edora_kernels import _C
from edora_kernels.backends.torch_backend import mm_compute


def _compute(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in the kernels' accumulator dtype: fp64 for fp64 ``like``, else fp32."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return t.to(dtype).contiguous()


def _bias(bias):
    return None if bias is None else bias.contiguous()


def forward(x, weight, bias, A, P, g, scaling, save):
    v = mm_compute(x, A.T, _compute(g, x).dtype)
    y = _C.rescale(torch.mm(x, weight.T).contiguous(), v.to(x.dtype).contiguous(),
                   _compute(P, x), _compute(g, x), _bias(bias), scaling, subtract_bias=False,
                   overwrite_base=True)
    return y, (v if save else v.new_empty(0))


def epilogue(y0, v, bias, P, g, scaling):
    base = y0.contiguous()
    # A copy made just now is ours to overwrite; y0 itself is the caller's.
    return _C.rescale(base, v.to(y0.dtype).contiguous(), _compute(P, y0), _compute(g, y0),
                      _bias(bias), scaling, subtract_bias=True, overwrite_base=base is not y0)


def backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t, need_colsum):
    dtype = gy.dtype
    need_gz = need_dx or need_t
    gz, colsum = _C.grad_scale_colsum(gy.contiguous(), _compute(g, gy), y.contiguous(),
                                      _bias(bias), need_gz=need_gz, need_colsum=need_colsum)
    dx, t = gy.new_empty(0), g.new_empty(0)
    if need_gz:
        t_full = mm_compute(gz, B, g.dtype)
        if need_dx:
            dx = torch.mm(gz, weight).addmm_(t_full.to(dtype), RA.to(dtype), alpha=scaling)
        if need_t:
            t = t_full
    return dx, t, colsum
