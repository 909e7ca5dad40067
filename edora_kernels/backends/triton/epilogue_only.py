"""Epilogue-only Triton forward, for base layers that are not a dense weight (docs/DESIGN.md
§5): the prologue (gate and ``v = x Aᵀ``), then ``z = y0 − b + s·v·Pᵀ`` and ``y = g ⊙ z + b``
in one pass over y0."""
from __future__ import annotations

import triton
import triton.language as tl

from ...norm import compute_dtype
from ...op_common import Saved
from .. import torch_backend
from .common import add_lowrank, mixed_args, store_output, tile_coords
from .configs import (
    EPILOGUE_CONFIG_INTERPRET,
    EPILOGUE_CONFIGS,
    INTERPRET,
    input_precision,
    m_bucket,
    prune_epilogue,
    tiles_grid,
    use_torch_path,
)
from .launch import launch
from .prologue import prologue


@triton.autotune(
    configs=[EPILOGUE_CONFIG_INTERPRET] if INTERPRET else EPILOGUE_CONFIGS,
    key=["M_BUCKET", "N"],
    prune_configs_by={"early_config_prune": prune_epilogue},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_epilogue_kernel(
    # inputs: y0 = base(x) (M×N), v = x·Aᵀ (M×RANK), s·P = s·B R (N×RANK, y0's dtype), g (N),
    # bias (N), the slot index (1 + slots: their number, then their columns)
    y0_ptr, v_ptr, ps_ptr, g_ptr, bias_ptr, index_ptr,
    # outputs: y (M×N), the z columns of zero magnitudes (M×slots)
    y_ptr, zbuf_ptr,
    M, N, RANK, M_BUCKET,
    stride_y0m, stride_y0n,
    stride_vm, stride_vr,
    stride_pn, stride_pr,
    stride_ym, stride_yn,
    stride_zm,
    # a batch mixing adapters: g is a table (one row per adapter), grow the row of each token
    grow_ptr, stride_gk,
    HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr, G_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - row0
    cols = N - col0
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_mask = offs_n < cols

    # --- y0 − b in fp32
    z0 = tl.load(y0_ptr + (row0 + offs_m)[:, None] * stride_y0m
                 + (col0 + offs_n)[None, :] * stride_y0n,
                 mask=(offs_m[:, None] < rows) & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z0 -= tl.load(bias_ptr + col0 + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    # --- z = y0 − b + s·v·Pᵀ, the zero-magnitude columns of z kept, y = g ⊙ z + b
    z = add_lowrank(z0, v_ptr + row0 * stride_vm, stride_vm, stride_vr,        # L = v
                    ps_ptr + col0 * stride_pn, stride_pr, stride_pn,           # Q = s·Pᵀ
                    rows, cols, RANK, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                    y0_ptr.dtype.element_ty)
    store_output(y_ptr + row0 * stride_ym + col0 * stride_yn, stride_ym, stride_yn, z,
                 g_ptr + col0, bias_ptr + col0, index_ptr, zbuf_ptr + row0 * stride_zm,
                 stride_zm, grow_ptr + row0, stride_gk, col0, rows, cols, HAS_BIAS, HAS_SLOTS,
                 G_ROWS, BLOCK_M, BLOCK_N)


def epilogue_args(y0, v, bias, Ps, g, index, y, zbuf, g_rows=None) -> dict:
    """Arguments of ``edora_epilogue_kernel`` except the config's (``g_rows``: as
    ``fwd_args``)."""
    (M, N), rank = y0.shape, Ps.shape[1]
    has_slots = zbuf.shape[1] > 0
    return dict(
        y0_ptr=y0, v_ptr=v, ps_ptr=Ps, g_ptr=g, bias_ptr=bias if bias is not None else y,
        index_ptr=index if has_slots else g,
        y_ptr=y, zbuf_ptr=zbuf if has_slots else y,
        M=M, N=N, RANK=rank, M_BUCKET=m_bucket(M),
        stride_y0m=y0.stride(0), stride_y0n=y0.stride(1),
        stride_vm=v.stride(0), stride_vr=v.stride(1),
        stride_pn=Ps.stride(0), stride_pr=Ps.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_zm=zbuf.stride(0) if has_slots else 0,
        **mixed_args(g, g_rows),
        HAS_BIAS=bias is not None, HAS_SLOTS=has_slots,
        INPUT_PRECISION=input_precision(y0.dtype),
    )


def epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """The backend contract's epilogue forward: the prologue and one pass over y0. Inputs named
    by ``use_torch_path`` take the torch backend's code path."""
    if use_torch_path(y0.dtype, A.shape[0]):
        return torch_backend.epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling,
                                              save, capacity)
    cdt = compute_dtype(y0.dtype)
    M, N = y0.shape
    P, Ps, n, g, slots, index, v = prologue(x, A, B, R, magnitude, terms, scaling, cdt, capacity)
    y = y0.new_empty(M, N)
    zbuf = y0.new_empty(M, capacity)
    if M > 0:
        launch(edora_epilogue_kernel, tiles_grid(M, N),
               **epilogue_args(y0, v, bias, Ps, g, index, y, zbuf))
    return y, Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)
