"""Fused Triton forward for EDoRA (docs/DESIGN.md §5).

One kernel: each program owns a BLOCK_M×BLOCK_N tile of y. A single loop over ``in`` accumulates
``x·W0ᵀ`` (BLOCK_M×BLOCK_N) and ``x·Aᵀ`` (BLOCK_M×RANK_PAD, the rank padded to a power of two
≥ 16 by masks, never in memory); the epilogue adds ``s·v·Pᵀ``, scales by g, adds b and stores y,
plus (from the first column of programs) v when training.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import torch_backend
from .common import add_lowrank, lowrank_mainloop, scale_shift, store_tile, tile_coords
from .configs import (
    GEMM_CONFIG_INTERPRET,
    GEMM_CONFIGS_SM80,
    GEMM_CONFIGS_SM90,
    INTERPRET,
    input_precision,
    m_bucket,
    prune_gemm,
    r_pad,
    tiles_grid,
    use_torch_path,
)


@triton.autotune(
    configs=[GEMM_CONFIG_INTERPRET] if INTERPRET else GEMM_CONFIGS_SM90 + GEMM_CONFIGS_SM80,
    key=["M_BUCKET", "N", "K", "RANK_PAD"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_fwd_kernel(
    # inputs: x (M×K), W0 (N×K), A (RANK×K), P = B R (N×RANK), g (N), bias (N)
    x_ptr, w_ptr, a_ptr, p_ptr, g_ptr, bias_ptr,
    # outputs: y (M×N), v (M×RANK, fp32)
    y_ptr, v_ptr,
    # sizes: M tokens, N = out, K = in; M_BUCKET only keys the autotuner
    M, N, K, RANK, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_pn, stride_pr,
    stride_ym, stride_yn,
    stride_vm, stride_vr,
    scaling,
    RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile; offsets in 64 bits (M·K or N·K may pass 2³¹ elements)
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - pid_m * BLOCK_M
    cols = N - col0

    # --- z₀ = x·W0ᵀ and v = x·Aᵀ in one pass over K
    acc, v = lowrank_mainloop(
        x_ptr + row0 * stride_xm, stride_xm, stride_xk,      # lhs = x, no k-scale
        g_ptr,
        w_ptr + col0 * stride_wn, stride_wk, stride_wn,      # main = W0ᵀ (K × N view of W0)
        a_ptr, stride_ak, stride_ar,                         # rank = Aᵀ (K × RANK view of A)
        rows, cols, K, RANK,
        True, False, RANK_PAD, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
    )

    # --- epilogue: z = z₀ + s·v·Pᵀ, y = g ⊙ z + b (z stays in registers: backward reads y).
    # v is stored from the fp32 accumulator (it feeds dR's cancelling sum); the product uses it
    # rounded to x's dtype, as the torch backend does.
    if SAVE:
        if pid_n == 0:
            store_tile(v_ptr + row0 * stride_vm, v, stride_vm, stride_vr, rows, RANK,
                       BLOCK_M, RANK_PAD)
    z = add_lowrank(acc, v.to(x_ptr.dtype.element_ty), p_ptr + col0 * stride_pn,  # Q = Pᵀ
                    stride_pr, stride_pn, cols, RANK, scaling, RANK_PAD, BLOCK_N,
                    INPUT_PRECISION)
    y = scale_shift(z, g_ptr + col0, bias_ptr + col0, cols, HAS_BIAS, BLOCK_N)
    store_tile(y_ptr + row0 * stride_ym + col0 * stride_yn, y, stride_ym, stride_yn,
               rows, cols, BLOCK_M, BLOCK_N)


def fwd_args(x, weight, bias, A, P, g, scaling, save, y, v) -> dict:
    """Arguments of ``edora_fwd_kernel`` except the config's; also used by the AOT checks."""
    (M, K), N, rank = x.shape, weight.shape[0], A.shape[0]
    # Unused pointers point at y: never dereferenced, and typed like a real output.
    return dict(
        x_ptr=x, w_ptr=weight, a_ptr=A, p_ptr=P, g_ptr=g,
        bias_ptr=bias if bias is not None else y,
        y_ptr=y, v_ptr=v if save else y,
        M=M, N=N, K=K, RANK=rank, M_BUCKET=m_bucket(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=A.stride(0), stride_ak=A.stride(1),
        stride_pn=P.stride(0), stride_pr=P.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_vm=v.stride(0) if save else 0, stride_vr=v.stride(1) if save else 0,
        scaling=float(scaling),
        RANK_PAD=r_pad(rank), HAS_BIAS=bias is not None, SAVE=bool(save),
        INPUT_PRECISION=input_precision(x.dtype),
    )


def forward(x, weight, bias, A, P, g, scaling, save):
    """The backend contract's forward: ``(y, v)``, v empty unless ``save``.

    Inputs named by ``use_torch_path`` take the torch backend's code path.
    """
    if use_torch_path(x.dtype, A.shape[0]):
        return torch_backend.forward(x, weight, bias, A, P, g, scaling, save)
    (M, _), N, rank = x.shape, weight.shape[0], A.shape[0]
    y = x.new_empty(M, N)
    v = g.new_empty(M, rank) if save else g.new_empty(0)
    if M == 0:
        return y, v
    edora_fwd_kernel[tiles_grid(M, N)](**fwd_args(x, weight, bias, A, P, g, scaling, save, y, v))
    return y, v

