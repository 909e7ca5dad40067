"""Fused Triton forward for EDoRA (docs/DESIGN.md §5): the prologue (gate and ``v = x Aᵀ``),
then one GEMM whose epilogue finishes the layer.

Each GEMM program owns a BLOCK_M×BLOCK_N tile of y: one loop over ``in`` accumulates ``x·W0ᵀ``;
the epilogue adds ``s·v·Pᵀ`` (v and P streamed in 16-wide rank chunks), keeps the z columns of
zero magnitudes, scales by g, adds b and stores y. The rank term costs the GEMM nothing but
its epilogue: 256-wide tiles serve every rank.

On sm_90, where x and W0 meet TMA's layout rules (``configs.tma_operands``), the same kernel
reads them through TMA descriptors made on the device, on a persistent grid of one program
per SM that loops over the tiles; the epilogue is the same.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...norm import compute_dtype
from ...op_common import Saved
from .. import torch_backend
from .common import (
    add_lowrank,
    mainloop,
    mainloop_tma,
    mixed_args,
    store_output,
    tile_coords,
)
from .configs import (
    GEMM_CONFIG_INTERPRET,
    GEMM_CONFIGS_SM80,
    GEMM_CONFIGS_SM90,
    INTERPRET,
    device_arch,
    input_precision,
    m_bucket,
    persistent_grid,
    prune_gemm,
    tiles_grid,
    tma_operands,
    use_torch_path,
)
from .launch import launch
from .prologue import prologue


@triton.autotune(
    configs=[GEMM_CONFIG_INTERPRET] if INTERPRET else GEMM_CONFIGS_SM90 + GEMM_CONFIGS_SM80,
    key=["M_BUCKET", "N", "K", "TMA"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_fwd_kernel(
    # inputs: x (M×K), W0 (N×K), v = x Aᵀ (M×RANK), s·P = s·B R (N×RANK, x's dtype), g (N),
    # bias (N), the slot index (1 + slots: their number, then their columns)
    x_ptr, w_ptr, v_ptr, ps_ptr, g_ptr, bias_ptr, index_ptr,
    # outputs: y (M×N), the z columns of zero magnitudes (M×slots)
    y_ptr, zbuf_ptr,
    # sizes: M tokens, N = out, K = in; M_BUCKET only keys the autotuner
    M, N, K, RANK, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_vm, stride_vr,
    stride_pn, stride_pr,
    stride_ym, stride_yn,
    stride_zm,
    # a batch mixing adapters: g is a table (one row per adapter), grow the row of each token
    grow_ptr, stride_gk,
    HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr, G_ROWS: tl.constexpr,
    TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- one tile per program, or with TMA (Hopper) x and W0 read through descriptors made
    # once per program, on a persistent grid: a program per SM takes every num_programs-th
    # tile in grouped order. The tile loop cannot be flattened (triton fuses a nest of exactly
    # one loop in one loop; the epilogue's rank and slot loops make more), and the pointer path
    # keeps one tile per program: the loop cost it 75–90 registers a thread (128×256 spilled).
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
            _fwd_tile(tile, x_desc, w_desc, v_ptr, ps_ptr, g_ptr, bias_ptr, index_ptr, y_ptr,
                      zbuf_ptr, M, N, K, RANK, stride_xm, stride_xk, stride_wn, stride_wk,
                      stride_vm, stride_vr, stride_pn, stride_pr, stride_ym, stride_yn,
                      stride_zm, grow_ptr, stride_gk, HAS_BIAS, HAS_SLOTS, G_ROWS, TMA,
                      INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _fwd_tile(tl.program_id(0), x_ptr, w_ptr, v_ptr, ps_ptr, g_ptr, bias_ptr, index_ptr,
                  y_ptr, zbuf_ptr, M, N, K, RANK, stride_xm, stride_xk, stride_wn, stride_wk,
                  stride_vm, stride_vr, stride_pn, stride_pr, stride_ym, stride_yn, stride_zm,
                  grow_ptr, stride_gk, HAS_BIAS, HAS_SLOTS, G_ROWS, TMA, INPUT_PRECISION,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _fwd_tile(
    tile, x, w, v_ptr, ps_ptr, g_ptr, bias_ptr, index_ptr, y_ptr, zbuf_ptr, M, N, K, RANK,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_vm, stride_vr, stride_pn, stride_pr,
    stride_ym, stride_yn, stride_zm, grow_ptr, stride_gk,
    HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr, G_ROWS: tl.constexpr, TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of ``edora_fwd_kernel`` (its arguments; x and w are descriptors with TMA)."""
    # --- the tile; offsets in 64 bits (M·K or N·K may pass 2³¹ elements)
    pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - row0
    cols = N - col0

    # --- z₀ = x·W0ᵀ
    if TMA:
        acc = mainloop_tma(x, w, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                           INPUT_PRECISION)
    else:
        acc = mainloop(x + row0 * stride_xm, stride_xm, stride_xk,   # lhs = x, no k-scale
                       x,
                       w + col0 * stride_wn, stride_wk, stride_wn,   # rhs = W0ᵀ (K × N view)
                       rows, cols, K,
                       False, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)

    # --- epilogue: z = z₀ + s·v·Pᵀ, y = g ⊙ z + b, the zero-magnitude columns of z kept
    z = add_lowrank(acc, v_ptr + row0 * stride_vm, stride_vm, stride_vr,       # L = v
                    ps_ptr + col0 * stride_pn, stride_pr, stride_pn,           # Q = s·Pᵀ
                    rows, cols, RANK, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                    y_ptr.dtype.element_ty)                                    # x's dtype
    store_output(y_ptr + row0 * stride_ym + col0 * stride_yn, stride_ym, stride_yn, z,
                 g_ptr + col0, bias_ptr + col0, index_ptr, zbuf_ptr + row0 * stride_zm,
                 stride_zm, grow_ptr + row0, stride_gk, col0, rows, cols, HAS_BIAS, HAS_SLOTS,
                 G_ROWS, BLOCK_M, BLOCK_N)


def fwd_args(x, weight, bias, v, Ps, g, index, y, zbuf, g_rows=None) -> dict:
    """Arguments of ``edora_fwd_kernel`` except the config's; also used by the AOT checks.
    ``g_rows`` (int32, one per row of x) makes ``g`` a table with a row per adapter. TMA where
    ``tma_operands`` allows it on x's device."""
    (M, K), N, rank = x.shape, weight.shape[0], Ps.shape[1]
    has_slots = zbuf.shape[1] > 0
    # Unused pointers point at y: never dereferenced, and typed like a real output.
    return dict(
        x_ptr=x, w_ptr=weight, v_ptr=v, ps_ptr=Ps, g_ptr=g,
        bias_ptr=bias if bias is not None else y, index_ptr=index if has_slots else g,
        y_ptr=y, zbuf_ptr=zbuf if has_slots else y,
        M=M, N=N, K=K, RANK=rank, M_BUCKET=m_bucket(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_vm=v.stride(0), stride_vr=v.stride(1),
        stride_pn=Ps.stride(0), stride_pr=Ps.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_zm=zbuf.stride(0) if has_slots else 0,
        **mixed_args(g, g_rows),
        HAS_BIAS=bias is not None, HAS_SLOTS=has_slots,
        TMA=tma_operands(device_arch(x), x, weight),
        INPUT_PRECISION=input_precision(x.dtype),
    )


def fwd_grid(args: dict):
    """The grid of a launch with ``args`` (from ``fwd_args``): with TMA a persistent one, else
    a program per tile."""
    M, N = args["M"], args["N"]
    return persistent_grid(M, N, args["x_ptr"].device) if args["TMA"] else tiles_grid(M, N)


def forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save, capacity):
    """The backend contract's forward (``edora_kernels.backends``): two launches, the prologue
    and the GEMM. Inputs named by ``use_torch_path`` take the torch backend's code path."""
    if use_torch_path(x.dtype, A.shape[0]):
        return torch_backend.forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save,
                                     capacity)
    cdt = compute_dtype(x.dtype)
    (M, _), N = x.shape, weight.shape[0]
    P, Ps, n, g, slots, index, v = prologue(x, A, B, R, magnitude, terms, scaling, cdt, capacity)
    y = x.new_empty(M, N)
    zbuf = x.new_empty(M, capacity)
    if M > 0:
        args = fwd_args(x, weight, bias, v, Ps, g, index, y, zbuf)
        launch(edora_fwd_kernel, fwd_grid(args), **args)
    return y, Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)
