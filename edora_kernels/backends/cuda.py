"""The CUDA C++ backend: ``edora_kernels._C`` kernels around cuBLAS GEMMs (through ATen), a whole
step per call (contract in ``edora_kernels.backends``, docs/DESIGN.md §4, csrc/README.md).

Each ``_C`` function is one kernel launch; per step:

- forward (3): ``_C.prologue`` — the gate (P = B R, n, g = m / n and the zero-magnitude slots,
  in float64) and ``v = x Aᵀ`` in one launch —, ``torch.mm(x, W0ᵀ)``, then ``_C.rescale``
  writes ``y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b`` over the GEMM's output and the z of the slot columns
  into ``zbuf``.
- backward (4, 5 with ``detach_norm=False``): ``_C.prepass`` reads gy (and y) once for
  ``gz = gy ⊙ g``, ``u = s·(gz B) R`` and the per-block partials of dR and dm (and, when A is
  kept in another dtype than gy, A rounded to gy's dtype); ``_C.finalize`` sums the partials in
  a fixed order into dm and dR (``_C.finalize_exact`` adds the norm's share to dR once every
  column block has formed it); ``dx = torch.mm(gz, W0)`` then ``dx.addmm_(u, A)``.
- epilogue forward (2): the prologue and the rescale of the caller's y0 into a fresh output;
  epilogue backward: the pre-pass (its gz is dy0), ``torch.mm(u, A)``, the finalize.

A training step is 7 launches (8 with ``detach_norm=False``), an inference forward 3. Nothing
reads device data on the host and nothing is converted or copied by an ATen op: the adapter
tensors (A, B, R, m, any float dtype) and strided activations go to the kernels as they are,
converted on load; every size comes from shapes and the slot capacity. dR and dm are the same
bits run to run: the pre-pass's row blocks (``_rows_per_block``, a function of the token count
and the device) write partials that the finalize adds in block order.

Ranks above ``_C.MAX_RANK`` (128, the rank the kernels' shared-memory tiles hold) take the torch
backend's code path. The extension is imported here, so this module only loads where it is built
(see csrc/README.md).
"""
from __future__ import annotations

import torch

from edora_kernels import _C
from edora_kernels.backends import torch_backend
from edora_kernels.op_common import Saved

# Pre-pass row blocks per multiprocessor once there are enough tokens: as many as stay resident
# (csrc/prepass.cu bounds its registers for three), no more, since each block adds a row of
# partials (out + r² accumulators) that the finalize reads back.
ROW_BLOCKS_PER_SM = 3


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # CPU tensors reach this module only in the tests (a stand-in extension)


def _rows_per_block(n_rows: int, device: torch.device) -> int:
    """Tokens per pre-pass block: whole 32-row tiles, one per block until the blocks would
    exceed ROW_BLOCKS_PER_SM per multiprocessor, then as few more as keep them within it. The
    partials' layout (hence dR's and dm's bits) depends on the token count and the device
    only."""
    tile = _C.PREPASS_TILE_ROWS
    tiles = max(1, -(-n_rows // tile))
    blocks = ROW_BLOCKS_PER_SM * _multiprocessors(device)
    return tile * -(-tiles // blocks)


def _beyond_kernels(A) -> bool:
    return A.shape[0] > _C.MAX_RANK


# --- forward ------------------------------------------------------------------------------------

def forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """``y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b`` and what backward keeps: three launches."""
    if _beyond_kernels(A):
        return torch_backend.forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save,
                                     capacity)
    P, n, g, slots, v = _C.prologue(x, A, B, R, magnitude, terms.c0, terms.C, terms.G,
                                    float(scaling), capacity)
    # The GEMM's output is this call's own temporary: the rescale turns it into y in place.
    y, zbuf = _C.rescale(torch.mm(x, weight.T), v, P, g, bias, slots, capacity, float(scaling),
                         subtract_bias=False, overwrite_base=True)
    return y, Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)


def epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """``y = g ⊙ (y0 − b + s·v Pᵀ) + b`` into a fresh output (y0 is the caller's): two
    launches."""
    if _beyond_kernels(A):
        return torch_backend.epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling,
                                              save, capacity)
    P, n, g, slots, v = _C.prologue(x, A, B, R, magnitude, terms.c0, terms.C, terms.G,
                                    float(scaling), capacity)
    y, zbuf = _C.rescale(y0, v, P, g, bias, slots, capacity, float(scaling), subtract_bias=True,
                         overwrite_base=False)
    return y, Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)


# --- backward -----------------------------------------------------------------------------------

def backward(gy, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
             need_dx, need_dR, need_dm):
    """``(dx, dR, dm)``, unneeded ones empty: the pre-pass, ``gz W0 + u A`` (two cuBLAS calls,
    the second accumulating into the first's output) when x needs a gradient, the finalize."""
    if _beyond_kernels(A):
        return torch_backend.backward(gy, weight, bias, A, B, R, magnitude, terms, scaling,
                                      detach_norm, y, saved, need_dx, need_dR, need_dm)
    gz, u, A_gemm, dR, dm = _prepass_finalize(gy, y, bias, A, B, R, magnitude, terms, scaling,
                                              detach_norm, saved, need_dx, need_dx, need_dR,
                                              need_dm)
    dx = torch.mm(gz, weight).addmm_(u, A_gemm) if need_dx else gy.new_empty(0)
    return dx, dR, dm


def epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
                      need_dy0, need_dx, need_dR, need_dm):
    """``(dy0, dx, dR, dm)``: the pre-pass writes dy0 = gy ⊙ g for the base layer; dx is the
    rank-r branch's share, ``u A``, one cuBLAS call."""
    if _beyond_kernels(A):
        return torch_backend.epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling,
                                               detach_norm, y, saved, need_dy0, need_dx,
                                               need_dR, need_dm)
    gz, u, A_gemm, dR, dm = _prepass_finalize(gy, y, bias, A, B, R, magnitude, terms, scaling,
                                              detach_norm, saved, need_dy0, need_dx, need_dR,
                                              need_dm)
    dx = torch.mm(u, A_gemm) if need_dx else gy.new_empty(0)
    return (gz if need_dy0 else gy.new_empty(0)), dx, dR, dm


def _prepass_finalize(gy, y, bias, A, B, R, magnitude, terms, scaling, detach_norm, saved,
                      write_gz, need_u, need_dR, need_dm):
    """The pre-pass (and the finalize when R or m needs a gradient): ``gz`` (when
    ``write_gz``), ``u`` and the GEMM's A in gy's dtype (when ``need_u``), dR and dm."""
    empty = gy.new_empty(0)
    dR, dm = R.new_empty(0), magnitude.new_empty(0)
    if not (write_gz or need_u or need_dR or need_dm):
        return empty, empty, A, dR, dm
    exact = need_dR and not detach_norm
    need_colsum = need_dm or exact
    convert_A = need_u and A.dtype != gy.dtype
    gz, u, A_cast, cs_part, dr_part = _C.prepass(
        gy, y, bias, saved.g, B, R, A, saved.v, saved.slots, saved.zbuf, float(scaling),
        _rows_per_block(gy.shape[0], gy.device), write_gz, need_u, need_dR, need_colsum,
        convert_A)
    if need_dR or need_dm:
        dR, dm, shares = _C.finalize(cs_part, dr_part, magnitude, saved.n, saved.slots, B,
                                     saved.P, terms.C, terms.G, R, float(scaling), need_dR,
                                     need_dm, exact)
        if exact:
            dR = _C.finalize_exact(dr_part, shares, R, float(scaling))
    return gz, u, (A_cast if convert_A else A), dR, dm
