"""Epilogue-only Triton kernel, for base layers that are not a dense weight (docs/DESIGN.md §5).

Given ``y0 = base(x)`` and ``v = x Aᵀ``: ``z = y0 − b + s·v·Pᵀ`` and ``y = g ⊙ z + b`` in one
pass over y0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import torch_backend
from .common import add_lowrank, scale_shift, store_tile, tile_coords
from .configs import (
    EPILOGUE_CONFIG_INTERPRET,
    EPILOGUE_CONFIGS,
    INTERPRET,
    input_precision,
    m_bucket,
    prune_epilogue,
    r_pad,
    tiles_grid,
    use_torch_path,
)


@triton.autotune(
    configs=[EPILOGUE_CONFIG_INTERPRET] if INTERPRET else EPILOGUE_CONFIGS,
    key=["M_BUCKET", "N", "RANK_PAD"],
    prune_configs_by={"early_config_prune": prune_epilogue},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_epilogue_kernel(
    # inputs: y0 = base(x) (M×N), v = x·Aᵀ (M×RANK), P = B R (N×RANK), g (N), bias (N)
    y0_ptr, v_ptr, p_ptr, g_ptr, bias_ptr,
    # output: y (M×N)
    y_ptr,
    M, N, RANK, M_BUCKET,
    stride_y0m, stride_y0n,
    stride_vm, stride_vr,
    stride_pn, stride_pr,
    stride_ym, stride_yn,
    scaling,
    RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - pid_m * BLOCK_M
    cols = N - col0
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_PAD)
    row_mask = offs_m[:, None] < rows
    col_mask = offs_n < cols

    # --- loads: y0 − b in fp32, v in y0's dtype (the rank-r product's operand)
    z0 = tl.load(y0_ptr + row0 * stride_y0m + offs_m[:, None] * stride_y0m
                 + (col0 + offs_n)[None, :] * stride_y0n,
                 mask=row_mask & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z0 -= tl.load(bias_ptr + col0 + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    v = tl.load(v_ptr + row0 * stride_vm + offs_m[:, None] * stride_vm
                + offs_r[None, :] * stride_vr,
                mask=row_mask & (offs_r[None, :] < RANK), other=0.0)

    # --- z = y0 − b + s·v·Pᵀ, y = g ⊙ z + b
    z = add_lowrank(z0, v, p_ptr + col0 * stride_pn, stride_pr, stride_pn,  # Q = Pᵀ
                    cols, RANK, scaling, RANK_PAD, BLOCK_N, INPUT_PRECISION)
    y = scale_shift(z, g_ptr + col0, bias_ptr + col0, cols, HAS_BIAS, BLOCK_N)
    store_tile(y_ptr + row0 * stride_ym + col0 * stride_yn, y, stride_ym, stride_yn,
               rows, cols, BLOCK_M, BLOCK_N)


def epilogue_args(y0, v, bias, P, g, scaling, y) -> dict:
    """Arguments of ``edora_epilogue_kernel`` except the config's."""
    (M, N), rank = y0.shape, v.shape[1]
    return dict(
        y0_ptr=y0, v_ptr=v, p_ptr=P, g_ptr=g, bias_ptr=bias if bias is not None else y,
        y_ptr=y,
        M=M, N=N, RANK=rank, M_BUCKET=m_bucket(M),
        stride_y0m=y0.stride(0), stride_y0n=y0.stride(1),
        stride_vm=v.stride(0), stride_vr=v.stride(1),
        stride_pn=P.stride(0), stride_pr=P.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        scaling=float(scaling),
        RANK_PAD=r_pad(rank), HAS_BIAS=bias is not None,
        INPUT_PRECISION=input_precision(y0.dtype),
    )


def epilogue(y0, v, bias, P, g, scaling):
    """``y = g ⊙ (y0 − b + s·v·Pᵀ) + b`` in one kernel.

    y0 (N×out) is the base layer's output including its bias, v = x Aᵀ (N×r),
    bias (out) in y0's dtype or None; v, P = B R (out×r) and g = m/n (out) in the compute dtype.
    y comes back in y0's dtype. Inputs named by ``use_torch_path`` take the torch backend's
    code path.
    """
    N, rank = y0.shape[0], v.shape[1]
    if use_torch_path(y0.dtype, rank):
        return torch_backend.epilogue(y0, v, bias, P, g, scaling)
    y = y0.new_empty(N, y0.shape[1])
    if N > 0:
        # v rounded to y0's dtype here (N×r), not in the kernel: an fp32 tile of v at rank 128
        # would not fit the register budget next to the output tile
        edora_epilogue_kernel[tiles_grid(N, y0.shape[1])](
            **epilogue_args(y0, v.to(y0.dtype), bias, P, g, scaling, y))
    return y
