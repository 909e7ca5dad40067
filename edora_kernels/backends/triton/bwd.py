"""Fused Triton backward for EDoRA (docs/DESIGN.md §3, §5).

dx, one kernel with the forward's structure: each program owns a BLOCK_M×BLOCK_N tile of dx; one
loop over ``out`` loads gy with g folded in (gz = gy ⊙ g) and accumulates ``gz·W0`` and
``gz·B`` (= t); the epilogue adds ``s·t·(R A)``. The first column of programs stores t. When only
t is needed (x needs no gradient) the same kernel runs one column of programs and skips W0.

colsum = Σ_rows gy ⊙ (y − b), a separate kernel: each program sums a fixed slab of rows for a
column block into an fp32 partial, and the partials are added in a fixed order. It reads the
output y, not a saved z (docs/DESIGN.md §3). Not fused into dx:
there only the first column of programs would read y, so the extra stream, its pipeline buffers
and registers would land on a few programs of the hot GEMM (load imbalance, less room for its
tiles), to save one read of gy — a few percent of the dx GEMM at 4096² and above. The separate
kernel also serves the case where dx is not needed, and runs one fixed config: its reduction
order must never depend on which config a timing picked, so dm is identical run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_backend
from .common import add_lowrank, lowrank_mainloop, store_tile, tile_coords
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

# Fixed (see the module docstring): 32 rows × 128 columns per step.
COLSUM_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_stages=1, num_warps=4)
# Row slabs per column block: enough programs to fill the device a few times over.
COLSUM_PROGRAMS_PER_SM = 4
COLSUM_PROGRAMS_INTERPRET = 4


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=[GEMM_CONFIG_INTERPRET] if INTERPRET else GEMM_CONFIGS_SM90 + GEMM_CONFIGS_SM80,
    key=["M_BUCKET", "N", "K", "RANK_PAD", "NEED_DX"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_dx_kernel(
    # inputs: gy (M×K), g (K), W0 (K×N), B (K×RANK), R A (RANK×N)
    gy_ptr, g_ptr, w_ptr, b_ptr, ra_ptr,
    # outputs: dx (M×N), t (M×RANK, fp32)
    dx_ptr, t_ptr,
    # sizes: M tokens, N = in, K = out; M_BUCKET only keys the autotuner
    M, N, K, RANK, M_BUCKET,
    stride_gym, stride_gyk,
    stride_wk, stride_wn,
    stride_bk, stride_br,
    stride_rar, stride_ran,
    stride_dxm, stride_dxn,
    stride_tm, stride_tr,
    scaling,
    RANK_PAD: tl.constexpr, NEED_DX: tl.constexpr, NEED_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile; t alone needs one column of programs
    if NEED_DX:
        pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    else:
        pid_m = tl.program_id(0)
        pid_n = 0
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - pid_m * BLOCK_M
    cols = N - col0

    # --- gz·W0 and t = gz·B in one pass over K, gz = gy ⊙ g formed as gy is loaded
    acc, t = lowrank_mainloop(
        gy_ptr + row0 * stride_gym, stride_gym, stride_gyk,  # lhs = gy
        g_ptr,                                               # k-scale = g (gz = gy ⊙ g)
        w_ptr + col0 * stride_wn, stride_wk, stride_wn,      # main = W0 (K × N)
        b_ptr, stride_bk, stride_br,                         # rank = B (K × RANK)
        rows, cols, K, RANK,
        NEED_DX, True, RANK_PAD, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
    )

    # --- epilogue: dx = gz·W0 + s·t·(R A), t rounded to gy's dtype for the product; t itself
    # is stored from the fp32 accumulator (it feeds dR's cancelling sum)
    if NEED_DX:
        dx = add_lowrank(acc, t.to(gy_ptr.dtype.element_ty), ra_ptr + col0 * stride_ran,
                         stride_rar, stride_ran, cols, RANK, scaling, RANK_PAD, BLOCK_N,
                         INPUT_PRECISION)  # Q = R A
        store_tile(dx_ptr + row0 * stride_dxm + col0 * stride_dxn, dx, stride_dxm, stride_dxn,
                   rows, cols, BLOCK_M, BLOCK_N)
    if NEED_T:
        if pid_n == 0:
            store_tile(t_ptr + row0 * stride_tm, t, stride_tm, stride_tr, rows, RANK,
                       BLOCK_M, RANK_PAD)


@triton.jit
def colsum_partials_kernel(
    # inputs: gy and y (M×N), bias (N); output: one fp32 row of partial sums per slab (SLABS×N)
    gy_ptr, y_ptr, bias_ptr, part_ptr,
    M, N, rows_per_slab,
    stride_gm, stride_gn,
    stride_ym, stride_yn,
    stride_pm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # --- this program's columns and row slab
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    row_start = pid_s * rows_per_slab
    row_end = min(row_start + rows_per_slab, M)
    gy_ptrs = (gy_ptr + row_start.to(tl.int64) * stride_gm
               + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn)
    y_ptrs = (y_ptr + row_start.to(tl.int64) * stride_ym
              + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)

    # --- elementwise fp32 accumulation down the slab, then one fixed-shape tree sum
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        mask = ((m0 + offs_m) < row_end)[:, None] & col_mask[None, :]
        gy = tl.load(gy_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += gy * (y - b[None, :])
        gy_ptrs += BLOCK_M * stride_gm
        y_ptrs += BLOCK_M * stride_ym
    tl.store(part_ptr + pid_s * stride_pm + offs_n, tl.sum(acc, axis=0), mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def dx_args(gy, weight, B, RA, g, scaling, need_dx, need_t, dx, t) -> dict:
    """Arguments of ``edora_dx_kernel`` except the config's; also used by the AOT checks."""
    (M, K), N, rank = gy.shape, weight.shape[1], B.shape[1]
    # Unused pointers point at an output that is written: never dereferenced, typed like gy.
    dx_out = dx if need_dx else t
    t_out = t if need_t else dx_out
    return dict(
        gy_ptr=gy, g_ptr=g, w_ptr=weight, b_ptr=B, ra_ptr=RA,
        dx_ptr=dx_out, t_ptr=t_out,
        M=M, N=N, K=K, RANK=rank, M_BUCKET=m_bucket(M),
        stride_gym=gy.stride(0), stride_gyk=gy.stride(1),
        stride_wk=weight.stride(0), stride_wn=weight.stride(1),
        stride_bk=B.stride(0), stride_br=B.stride(1),
        stride_rar=RA.stride(0), stride_ran=RA.stride(1),
        stride_dxm=dx.stride(0) if need_dx else 0, stride_dxn=dx.stride(1) if need_dx else 0,
        stride_tm=t.stride(0) if need_t else 0, stride_tr=t.stride(1) if need_t else 0,
        scaling=float(scaling),
        RANK_PAD=r_pad(rank), NEED_DX=bool(need_dx), NEED_T=bool(need_t),
        INPUT_PRECISION=input_precision(gy.dtype),
    )


def colsum_slabs(M: int, N: int, device: torch.device) -> tuple[int, int]:
    """(rows per slab, number of slabs): a function of the shape and the device only."""
    block_m, block_n = COLSUM_CONFIG.kwargs["BLOCK_M"], COLSUM_CONFIG.kwargs["BLOCK_N"]
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = COLSUM_PROGRAMS_PER_SM * sms
    else:
        programs = COLSUM_PROGRAMS_INTERPRET
    row_blocks = triton.cdiv(M, block_m)
    slabs = min(row_blocks, max(1, programs // triton.cdiv(N, block_n)))
    rows_per_slab = triton.cdiv(row_blocks, slabs) * block_m
    return rows_per_slab, triton.cdiv(M, rows_per_slab)


def colsum_args(gy, y, bias, partials, rows_per_slab) -> dict:
    """Arguments of ``colsum_partials_kernel`` except the config's."""
    M, N = gy.shape
    return dict(
        gy_ptr=gy, y_ptr=y, bias_ptr=bias if bias is not None else y, part_ptr=partials,
        M=M, N=N, rows_per_slab=rows_per_slab,
        stride_gm=gy.stride(0), stride_gn=gy.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_pm=partials.stride(0), HAS_BIAS=bias is not None,
    )


def colsum(gy, y, bias, compute_dtype):
    """Σ over rows of gy ⊙ (y − b) in ``compute_dtype``: slab partials, then a fixed-order
    sum."""
    M, N = gy.shape
    if M == 0:
        return gy.new_zeros(N, dtype=compute_dtype)
    rows_per_slab, slabs = colsum_slabs(M, N, gy.device)
    partials = gy.new_empty(slabs, N, dtype=torch.float32)
    grid = (triton.cdiv(N, COLSUM_CONFIG.kwargs["BLOCK_N"]), slabs)
    colsum_partials_kernel[grid](
        **colsum_args(gy, y, bias, partials, rows_per_slab), **COLSUM_CONFIG.kwargs,
        num_warps=COLSUM_CONFIG.num_warps, num_stages=COLSUM_CONFIG.num_stages,
    )
    # torch's dim-0 sum has a fixed order for a fixed shape (no atomics).
    return partials.sum(0, dtype=compute_dtype)


def backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t, need_colsum):
    """The backend contract's backward: ``(dx, t, colsum)``, unneeded ones empty.

    Inputs named by ``configs.use_torch_path`` take the torch backend's code path.
    """
    if use_torch_path(gy.dtype, B.shape[1]):
        return torch_backend.backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t,
                                      need_colsum)
    (M, _), N, rank = gy.shape, weight.shape[1], B.shape[1]
    dx = gy.new_empty(M, N) if need_dx else gy.new_empty(0)
    t = g.new_empty(M, rank) if need_t else g.new_empty(0)
    if M > 0 and (need_dx or need_t):
        if need_dx:
            grid = tiles_grid(M, N)
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        edora_dx_kernel[grid](**dx_args(gy, weight, B, RA, g, scaling, need_dx, need_t, dx, t))
    cs = colsum(gy, y, bias, g.dtype) if need_colsum else g.new_empty(0)
    return dx, t, cs
