"""Fused Triton backward for EDoRA (docs/DESIGN.md §3, §5): three launches.

1. **Pre-pass**, one program per row block, streaming gy (and y) over the output columns once:
   ``t = (gy ⊙ g)·B`` (fp32), then ``u = s·t·R`` (the dx epilogue's rank-r rows) and the
   block's partial ``tᵀv`` for dR; the block's column partials of ``gy ⊙ (y − b)`` for dm (of
   ``gy ⊙ z`` for the zero-magnitude columns, from their kept z); ``gz = gy ⊙ g`` itself only
   for the epilogue op, whose base layer takes it.
2. **dx**, a GEMM: each program owns a BLOCK_M×BLOCK_N tile of dx; one loop over ``out`` loads
   gy with g folded in (gz = gy ⊙ g) against W0; the epilogue adds ``u·A`` in 16-wide rank
   chunks. When x needs no gradient it is not launched.
3. **Finalize**: column programs sum the pre-pass's column partials (float64, fixed order) into
   ``S = Σ gy ⊙ z`` and ``dm = S / n``; tile programs sum the dR partials into ``dR = s·Σ tᵀv``.
   With ``detach_norm=False`` the column programs also form their block's share of the norm's
   gradient and one more small launch adds the shares to dR.

Every reduction has a fixed order (per-block partials, then a fixed-order sum; no atomics), and
the block sizes depend on the shape and the device only: dR and dm are the same bits run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import op_common
from .. import torch_backend
from .common import RANK_CHUNK, add_lowrank, mainloop, mixed_args, store_tile, tile_coords
from .configs import (
    GEMM_CONFIG_INTERPRET,
    GEMM_CONFIGS_SM80,
    GEMM_CONFIGS_SM90,
    INTERPRET,
    cdiv,
    finalize_config,
    input_precision,
    m_bucket,
    prepass_config,
    prune_gemm,
    r_pad,
    row_block,
    tiles_grid,
    use_torch_path,
)
from .launch import launch

SLOT_FULL = tl.constexpr(op_common.SLOT_FULL)
NAN = tl.constexpr(float("nan"))


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def prepass_kernel(
    # inputs: gy (M×K, K = out), g (K), B (K×RANK), y (M×K), bias (K), slots (K),
    # kept z columns (M×SLOTS), v (M×RANK, fp32), R (RANK×RANK)
    gy_ptr, g_ptr, b_ptr, y_ptr, bias_ptr, slot_ptr, zbuf_ptr, v_ptr, r_ptr,
    # outputs: u = s·t·R (M×RANK, gy's dtype), dR partials (programs×RANK×RANK, fp32), column
    # partials (programs×K, fp32), gz = gy ⊙ g (M×K, gy's dtype)
    u_ptr, dr_part_ptr, cs_part_ptr, gz_ptr,
    # T tokens per leading row (all of them but in a mixed batch), K = out
    T, K, RANK, scaling,
    stride_gym, stride_gyk, stride_bk, stride_br, stride_ym, stride_yk, stride_zm,
    stride_vm, stride_vr, stride_rr, stride_rc, stride_um, stride_ur, stride_gzm, stride_gzk,
    # a batch mixing adapters: g and R are tables (one row, one core per adapter) and grow the
    # table row of each token; a program's rows lie in one leading row, so take one table row
    grow_ptr, stride_gk, stride_rk,
    RANK_PAD: tl.constexpr, NEED_U: tl.constexpr, NEED_DR: tl.constexpr,
    NEED_COLSUM: tl.constexpr, WRITE_GZ: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SLOTS: tl.constexpr, G_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # --- this program's rows: a block of the batch, or of one leading row in a mixed batch
    pid = tl.program_id(0)
    row0 = (pid * BLOCK_M).to(tl.int64)
    rows = T - row0
    if G_ROWS:
        blocks_per_row = tl.cdiv(T, BLOCK_M)
        start = (pid % blocks_per_row) * BLOCK_M
        row0 = (pid // blocks_per_row).to(tl.int64) * T + start
        rows = T - start
        table_row = tl.load(grow_ptr + row0).to(tl.int64)
        g_ptr += table_row * stride_gk
        r_ptr += table_row * stride_rk
    dtype = gy_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RANK_PAD)
    row_mask = offs_m < rows
    rank_mask = offs_r < RANK

    # --- one pass over the columns: t += gz·B, column partials of gy ⊙ (y − b)
    t = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        k_mask = cols < K
        mask = row_mask[:, None] & k_mask[None, :]
        gy = tl.load(gy_ptr + (row0 + offs_m)[:, None] * stride_gym + cols[None, :] * stride_gyk,
                     mask=mask, other=0.0)
        if NEED_U or NEED_DR or WRITE_GZ:
            g = tl.load(g_ptr + cols, mask=k_mask, other=0.0)
            gz = (gy.to(tl.float32) * g[None, :]).to(dtype)
            if WRITE_GZ:
                tl.store(gz_ptr + (row0 + offs_m)[:, None] * stride_gzm
                         + cols[None, :] * stride_gzk, gz, mask=mask)
            if NEED_U or NEED_DR:
                b = tl.load(b_ptr + cols[:, None] * stride_bk + offs_r[None, :] * stride_br,
                            mask=k_mask[:, None] & rank_mask[None, :], other=0.0).to(dtype)
                t = tl.dot(gz, b, t, input_precision=INPUT_PRECISION)
        if NEED_COLSUM:
            y = tl.load(y_ptr + (row0 + offs_m)[:, None] * stride_ym + cols[None, :] * stride_yk,
                        mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_SLOTS:  # zero magnitudes: y − b = 0 there, z comes from its slot
                slot = tl.load(slot_ptr + cols, mask=k_mask, other=-1)
                kept = tl.load(zbuf_ptr + (row0 + offs_m)[:, None] * stride_zm + slot[None, :],
                               mask=row_mask[:, None] & (slot[None, :] >= 0), other=0.0)
                y = tl.where(slot[None, :] >= 0, kept.to(tl.float32), y)
            partial = tl.sum(gy.to(tl.float32) * y, axis=0)
            tl.store(cs_part_ptr + pid.to(tl.int64) * K + cols, partial, mask=k_mask)

    # --- this block's tᵀv (exact fp32: dR is a cancelling sum) and u = s·t·R, in 16-wide
    # column chunks of v and R: no r×r tile in registers
    offs_c = tl.arange(0, RANK_CHUNK)
    for c0 in range(0, RANK, RANK_CHUNK):
        chunk_mask = (c0 + offs_c) < RANK
        if NEED_DR:
            v = tl.load(v_ptr + (row0 + offs_m)[:, None] * stride_vm
                        + (c0 + offs_c)[None, :] * stride_vr,
                        mask=row_mask[:, None] & chunk_mask[None, :], other=0.0)
            part = tl.dot(tl.trans(t), v, input_precision="ieee")
            tl.store(dr_part_ptr + pid.to(tl.int64) * RANK * RANK + offs_r[:, None] * RANK
                     + (c0 + offs_c)[None, :], part,
                     mask=rank_mask[:, None] & chunk_mask[None, :])
        if NEED_U:
            R = tl.load(r_ptr + offs_r[:, None] * stride_rr + (c0 + offs_c)[None, :] * stride_rc,
                        mask=rank_mask[:, None] & chunk_mask[None, :], other=0.0)
            u = tl.dot(t, R.to(tl.float32), input_precision="ieee") * scaling
            store_tile(u_ptr + row0 * stride_um + c0 * stride_ur, u, stride_um, stride_ur, rows,
                       RANK - c0, BLOCK_M, RANK_CHUNK)


@triton.autotune(
    configs=[GEMM_CONFIG_INTERPRET] if INTERPRET else GEMM_CONFIGS_SM90 + GEMM_CONFIGS_SM80,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune_gemm},
    cache_results=True,  # tuned once per machine, not in every process
)
@triton.jit
def edora_dx_kernel(
    # inputs: gy (M×K), g (K), W0 (K×N), u = s·t·R (M×RANK), A (RANK×N); output dx (M×N)
    gy_ptr, g_ptr, w_ptr, u_ptr, a_ptr, dx_ptr,
    # sizes: M tokens, N = in, K = out; M_BUCKET only keys the autotuner
    M, N, K, RANK, M_BUCKET,
    stride_gym, stride_gyk,
    stride_wk, stride_wn,
    stride_um, stride_ur,
    stride_ar, stride_an,
    stride_dxm, stride_dxn,
    # SCALE_K: gy is scaled by g as it is loaded; else it is gz already (a mixed batch)
    SCALE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    rows = M - row0
    cols = N - col0

    # --- gz·W0, gz = gy ⊙ g formed as gy is loaded
    acc = mainloop(gy_ptr + row0 * stride_gym, stride_gym, stride_gyk,   # lhs = gy
                   g_ptr,                                                # k-scale = g
                   w_ptr + col0 * stride_wn, stride_wk, stride_wn,       # rhs = W0 (K × N)
                   rows, cols, K,
                   SCALE_K, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)

    # --- epilogue: dx = gz·W0 + u·A
    dx = add_lowrank(acc, u_ptr + row0 * stride_um, stride_um, stride_ur,      # L = u
                     a_ptr + col0 * stride_an, stride_ar, stride_an,           # Q = A
                     rows, cols, RANK, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                     gy_ptr.dtype.element_ty)
    store_tile(dx_ptr + row0 * stride_dxm + col0 * stride_dxn, dx, stride_dxm, stride_dxn,
               rows, cols, BLOCK_M, BLOCK_N)


@triton.jit
def finalize_kernel(
    # inputs: column partials (PARTS×K), dR partials (PARTS×RANK×RANK), m, n (float64), slots;
    # for the norm's share: B (K×RANK), P and C (K×RANK, float64), G (RANK×RANK, float64);
    # in a MIXED batch the leading rows of each table row (``order``, int32: ORDER_BASE offsets,
    # then the leading rows in table-row order) and m and n as tables
    cs_part_ptr, dr_part_ptr, m_ptr, n_ptr, slot_ptr, b_ptr, p_ptr, c_ptr, gram_ptr, order_ptr,
    # outputs: dm (K), dR (RANK×RANK), the norm's share per column program (programs×RANK×RANK);
    # a table of each per table row in a mixed batch
    dm_ptr, dr_ptr, norm_part_ptr,
    K, RANK, PARTS, PER_ROW, ORDER_BASE, BLOCKS_O, COLUMN_PROGRAMS, scaling,
    stride_bk, stride_br, stride_pk, stride_pr, stride_ck, stride_cr, stride_gr, stride_gc,
    stride_drr, stride_drc, stride_mt, stride_nt, stride_dmt, stride_drt,
    NEED_DM: tl.constexpr, NEED_DR: tl.constexpr, EXACT: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_N: tl.constexpr, MIXED: tl.constexpr,
    RANK_PAD: tl.constexpr, BLOCK_O: tl.constexpr, DR_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < COLUMN_PROGRAMS:
        # --- S = Σ gy ⊙ z for this program's columns (of its table row's parts), from the
        # column partials
        table_row, block = 0, pid
        if MIXED:  # a program per table row and block of columns
            table_row, block = pid // BLOCKS_O, pid % BLOCKS_O
        offs_o = block * BLOCK_O + tl.arange(0, BLOCK_O)
        col_mask = offs_o < K
        colsum = _sum_parts(tl.zeros((BLOCK_O,), dtype=tl.float64), cs_part_ptr, offs_o, col_mask,
                            K, order_ptr, table_row, PARTS, PER_ROW, ORDER_BASE, MIXED)
        m = tl.load(m_ptr + table_row * stride_mt + offs_o, mask=col_mask, other=1.0)
        m = m.to(tl.float64)
        n = tl.full((BLOCK_O,), 1.0, tl.float64)
        if HAS_N:
            n = tl.load(n_ptr + table_row * stride_nt + offs_o, mask=col_mask, other=1.0)
        inv_n = 1.0 / n
        S = colsum * n / tl.where(m == 0, 1.0, m)  # colsum = g ⊙ S
        if HAS_SLOTS:
            slot = tl.load(slot_ptr + offs_o, mask=col_mask, other=-1)
            S = tl.where(slot >= 0, colsum, S)  # these columns summed gy ⊙ z itself
            # no z kept: no honest number (one adapter's zeros take all its SLOT_FULL columns;
            # a table's slots are the union over its rows)
            if MIXED:
                S = tl.where((m == 0) & (slot < 0), NAN, S)
            else:
                S = tl.where(slot == SLOT_FULL, NAN, S)
        if NEED_DM:
            # float64 → fp32 → the parameter's dtype (the interpreter cannot cast float64 to bf16)
            dm = (S * inv_n).to(tl.float32).to(dm_ptr.dtype.element_ty)
            tl.store(dm_ptr + table_row * stride_dmt + offs_o, dm, mask=col_mask)
        if EXACT:
            # --- ∂L/∂P_j through the norm, (∂L/∂n_j / n_j)·(s C_j + s² (P G)_j), with
            # ∂L/∂n_j = −m_j S_j / n_j²; this block's share of dR is Bᵀ of it
            offs_r = tl.arange(0, RANK_PAD)
            rank_mask = offs_r < RANK
            PG = tl.zeros((BLOCK_O, RANK_PAD), dtype=tl.float64)
            for k in range(0, RANK):  # rank-1 updates: float64 has no portable tensor-core dot
                p_k = tl.load(p_ptr + offs_o * stride_pk + k * stride_pr, mask=col_mask,
                              other=0.0)
                g_k = tl.load(gram_ptr + k * stride_gr + offs_r * stride_gc, mask=rank_mask,
                              other=0.0)
                PG += p_k[:, None] * g_k[None, :]
            C = tl.load(c_ptr + offs_o[:, None] * stride_ck + offs_r[None, :] * stride_cr,
                        mask=col_mask[:, None] & rank_mask[None, :], other=0.0)
            coeff = tl.where(col_mask, -m * S * (inv_n * inv_n * inv_n), 0.0)
            grad_P = coeff[:, None] * (scaling * C + (scaling * scaling) * PG)
            # this block's share of dR = Bᵀ grad_P, row by row
            share = norm_part_ptr + pid.to(tl.int64) * RANK * RANK
            for a in range(0, RANK):
                b_a = tl.load(b_ptr + offs_o * stride_bk + a * stride_br, mask=col_mask,
                              other=0.0)
                row = tl.sum(b_a.to(tl.float64)[:, None] * grad_P, axis=0)
                tl.store(share + a * RANK + offs_r, row, mask=rank_mask)
    elif NEED_DR:
        # --- one tile of one table row's dR
        tile = pid - COLUMN_PROGRAMS
        tiles = tl.cdiv(RANK, DR_TILE) * tl.cdiv(RANK, DR_TILE)
        _sum_dR(tile % tiles, dr_part_ptr, norm_part_ptr, dr_ptr + (tile // tiles) * stride_drt,
                order_ptr, tile // tiles, RANK, PARTS, PER_ROW, ORDER_BASE, 0, scaling,
                stride_drr, stride_drc, MIXED, DR_TILE)


@triton.jit
def finalize_exact_kernel(
    dr_part_ptr, norm_part_ptr, dr_ptr, RANK, PARTS, NORM_PARTS, scaling,
    stride_drr, stride_drc, DR_TILE: tl.constexpr,
):
    """dR = s·Σ tᵀv + the norm's share, once every column program has written its share."""
    _sum_dR(tl.program_id(0), dr_part_ptr, norm_part_ptr, dr_ptr, dr_ptr, 0, RANK, PARTS, 1, 0,
            NORM_PARTS, scaling, stride_drr, stride_drc, False, DR_TILE)


@triton.jit
def _sum_parts(acc, part_ptr, offsets, mask, part_size, order_ptr, table_row, PARTS, PER_ROW,
               ORDER_BASE, MIXED: tl.constexpr):
    """``acc`` plus the partials at ``offsets`` of every part, in part order (float64); in a
    MIXED batch of the parts of ``table_row``'s leading rows only (from ``order``: no pass over
    the others)."""
    if MIXED:
        first = tl.load(order_ptr + table_row)
        last = tl.load(order_ptr + table_row + 1)
        for i in range(first, last):
            leading = tl.load(order_ptr + ORDER_BASE + i).to(tl.int64)
            for j in range(0, PER_ROW):
                part = leading * PER_ROW + j
                acc += tl.load(part_ptr + part * part_size + offsets, mask=mask, other=0.0)
    else:
        for p in range(0, PARTS):
            acc += tl.load(part_ptr + p * part_size + offsets, mask=mask, other=0.0)
    return acc


@triton.jit
def _sum_dR(tile, dr_part_ptr, norm_part_ptr, dr_ptr, order_ptr, table_row, RANK, PARTS,
            PER_ROW, ORDER_BASE, NORM_PARTS, scaling, stride_drr, stride_drc,
            MIXED: tl.constexpr, DR_TILE: tl.constexpr):
    """One DR_TILE × DR_TILE block of ``dR = s·Σ_p partial_p + Σ_q norm_share_q`` in float64;
    in a MIXED batch over the parts of ``table_row`` only."""
    tiles = tl.cdiv(RANK, DR_TILE)
    offs_i = (tile // tiles) * DR_TILE + tl.arange(0, DR_TILE)
    offs_j = (tile % tiles) * DR_TILE + tl.arange(0, DR_TILE)
    mask = (offs_i[:, None] < RANK) & (offs_j[None, :] < RANK)
    offsets = offs_i[:, None] * RANK + offs_j[None, :]
    acc = _sum_parts(tl.zeros((DR_TILE, DR_TILE), dtype=tl.float64), dr_part_ptr, offsets, mask,
                     RANK * RANK, order_ptr, table_row, PARTS, PER_ROW, ORDER_BASE, MIXED)
    acc *= scaling
    for q in range(0, NORM_PARTS):
        acc += tl.load(norm_part_ptr + q * RANK * RANK + offsets, mask=mask, other=0.0)
    tl.store(dr_ptr + offs_i[:, None] * stride_drr + offs_j[None, :] * stride_drc,
             acc.to(tl.float32).to(dr_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def prepass_args(gy, B, R, y, bias, saved, scaling, u, dr_part, cs_part, gz, g_rows=None,
                 tokens_per_row: int | None = None) -> dict:
    """Arguments of ``prepass_kernel`` except the block sizes; also used by the AOT checks.
    Outputs that are not needed are empty tensors; their pointers are never dereferenced.
    A mixed batch gives ``g_rows`` (each token's table row, int32), ``saved.g`` and ``R`` as
    tables (adapters × out, adapters × r × r) and its ``tokens_per_row``."""
    (M, K), rank = gy.shape, B.shape[1]
    has_slots = saved.zbuf.shape[1] > 0
    need_u, need_dr, need_cs, write_gz = (t.numel() > 0 for t in (u, dr_part, cs_part, gz))
    spare = cs_part if need_cs else dr_part if need_dr else u
    return dict(
        gy_ptr=gy, g_ptr=saved.g, b_ptr=B, y_ptr=y, bias_ptr=bias if bias is not None else y,
        slot_ptr=saved.slots if has_slots else saved.g,
        zbuf_ptr=saved.zbuf if has_slots else y, v_ptr=saved.v if need_dr else saved.g,
        r_ptr=R, u_ptr=u if need_u else gy, dr_part_ptr=dr_part if need_dr else spare,
        cs_part_ptr=cs_part if need_cs else spare, gz_ptr=gz if write_gz else gy,
        T=M if tokens_per_row is None else tokens_per_row, K=K, RANK=rank,
        scaling=float(scaling),
        stride_gym=gy.stride(0), stride_gyk=gy.stride(1),
        stride_bk=B.stride(0), stride_br=B.stride(1),
        stride_ym=y.stride(0), stride_yk=y.stride(1),
        stride_zm=saved.zbuf.stride(0) if has_slots else 0,
        stride_vm=saved.v.stride(0) if need_dr else 0,
        stride_vr=saved.v.stride(1) if need_dr else 0,
        stride_rr=R.stride(-2), stride_rc=R.stride(-1),
        stride_um=u.stride(0) if need_u else 0, stride_ur=u.stride(1) if need_u else 0,
        stride_gzm=gz.stride(0) if write_gz else 0, stride_gzk=gz.stride(1) if write_gz else 0,
        **mixed_args(saved.g, g_rows), stride_rk=R.stride(0) if R.dim() == 3 else 0,
        RANK_PAD=r_pad(rank), NEED_U=need_u, NEED_DR=need_dr, NEED_COLSUM=need_cs,
        WRITE_GZ=write_gz, HAS_BIAS=bias is not None, HAS_SLOTS=has_slots,
        INPUT_PRECISION=input_precision(gy.dtype),
    )


def dx_args(gy, g, weight, u, A, dx) -> dict:
    """Arguments of ``edora_dx_kernel`` except the config's; also used by the AOT checks.
    ``g`` None: ``gy`` is gz = gy ⊙ g already."""
    (M, K), N, rank = gy.shape, weight.shape[1], A.shape[0]
    return dict(
        gy_ptr=gy, g_ptr=gy if g is None else g, w_ptr=weight, u_ptr=u, a_ptr=A, dx_ptr=dx,
        M=M, N=N, K=K, RANK=rank, M_BUCKET=m_bucket(M),
        stride_gym=gy.stride(0), stride_gyk=gy.stride(1),
        stride_wk=weight.stride(0), stride_wn=weight.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_ar=A.stride(0), stride_an=A.stride(1),
        stride_dxm=dx.stride(0), stride_dxn=dx.stride(1),
        SCALE_K=g is not None, INPUT_PRECISION=input_precision(gy.dtype),
    )


def finalize_args(saved, magnitude, B, terms, scaling, cs_part, dr_part, dm, dR, norm_part,
                  exact, block_o: int, order=None, table_rows: int = 1,
                  per_row: int = 1) -> dict:
    """Arguments of ``finalize_kernel`` except the config's; also used by the AOT checks. A
    mixed batch gives the leading rows of each of its ``table_rows`` (``order``, int32, from
    ``RowAssignment.table_order``) and each leading row's ``per_row`` parts; ``magnitude``,
    ``saved.n`` (None: n = 1, for a g table as the magnitude), ``dm`` and ``dR`` then have a
    row per table row (the first ones: a gate's adapters come before the base row)."""
    K, rank = B.shape
    need_dm, need_dr = dm.numel() > 0, dR.numel() > 0
    table = order is not None
    rows_out = magnitude.shape[0] if table else 1
    column_programs = rows_out * cdiv(K, block_o) if (need_dm or exact) else 0
    n = saved.n if saved.n is not None else magnitude
    # The norm's share reads P, C and G; without it their pointers are never dereferenced.
    P, C, G = (saved.P, terms.C, terms.G) if exact else (n.view(-1)[:1, None],) * 3
    return dict(
        cs_part_ptr=cs_part, dr_part_ptr=dr_part, m_ptr=magnitude, n_ptr=n,
        slot_ptr=saved.slots if saved.slots.numel() else n, b_ptr=B, p_ptr=P,
        c_ptr=C, gram_ptr=G, order_ptr=order if table else n,
        dm_ptr=dm if need_dm else n, dr_ptr=dR if need_dr else n,
        norm_part_ptr=norm_part if exact else dr_part,
        K=K, RANK=rank, PARTS=cs_part.shape[0] if cs_part.numel() else dr_part.shape[0],
        PER_ROW=per_row, ORDER_BASE=table_rows + 1, BLOCKS_O=cdiv(K, block_o),
        COLUMN_PROGRAMS=column_programs,
        scaling=float(scaling),
        stride_bk=B.stride(0), stride_br=B.stride(1),
        stride_pk=P.stride(0), stride_pr=P.stride(1),
        stride_ck=C.stride(0), stride_cr=C.stride(1), stride_gr=G.stride(0),
        stride_gc=G.stride(1),
        stride_drr=dR.stride(-2) if need_dr else 0, stride_drc=dR.stride(-1) if need_dr else 0,
        stride_mt=magnitude.stride(0) if table else 0,
        stride_nt=n.stride(0) if table else 0,
        stride_dmt=dm.stride(0) if table and need_dm else 0,
        stride_drt=dR.stride(0) if table and need_dr else 0,
        NEED_DM=need_dm, NEED_DR=need_dr, EXACT=exact, HAS_SLOTS=saved.slots.numel() > 0,
        HAS_N=saved.n is not None, MIXED=table, RANK_PAD=r_pad(rank),
    )


def _steps(gy, B, R, magnitude, terms, scaling, detach_norm, y, bias, saved, need_u, need_dR,
           need_dm, gz):
    """Pre-pass and finalize: ``u`` (for dx; empty unless ``need_u``), dR and dm; the pre-pass
    also writes ``gz`` when it is not empty."""
    (M, K), rank = gy.shape, B.shape[1]
    exact = need_dR and not detach_norm
    need_cs = need_dm or exact
    prepass = prepass_config(row_block(M, gy.device), r_pad(rank), gy.element_size())
    parts = cdiv(M, prepass.kwargs["BLOCK_M"])
    f32 = torch.float32
    u = gy.new_empty((M, rank) if need_u else (0,))
    cs_part = gy.new_empty((parts, K) if need_cs else (0,), dtype=f32)
    dr_part = gy.new_empty((parts, rank, rank) if need_dR else (0,), dtype=f32)
    if parts and (need_u or need_cs or need_dR or gz.numel()):
        launch(prepass_kernel, (parts,),
               **prepass_args(gy, B, R, y, bias, saved, scaling, u, dr_part, cs_part, gz),
               **prepass.kwargs, num_warps=prepass.num_warps, num_stages=prepass.num_stages)
    dR = R.new_empty(R.shape if need_dR else (0,))
    dm = magnitude.new_empty(magnitude.shape if need_dm else (0,))
    if need_dR or need_dm:
        finalize = finalize_config(r_pad(rank))
        kw = finalize.kwargs
        column_programs = cdiv(K, kw["BLOCK_O"])
        norm_part = gy.new_empty((column_programs, rank, rank) if exact else (0,),
                                 dtype=torch.float64)
        args = finalize_args(saved, magnitude, B, terms, scaling, cs_part, dr_part, dm, dR,
                             norm_part, exact, kw["BLOCK_O"])
        tiles = cdiv(rank, kw["DR_TILE"]) ** 2 if need_dR else 0
        launch(finalize_kernel, (args["COLUMN_PROGRAMS"] + (0 if exact else tiles),), **args,
               **kw, num_warps=finalize.num_warps, num_stages=finalize.num_stages)
        if exact:
            launch(finalize_exact_kernel, (tiles,),
                   **finalize_exact_args(dr_part, norm_part, dR, args["PARTS"], scaling),
                   DR_TILE=kw["DR_TILE"], num_warps=4, num_stages=1)
    return u, dR, dm


def finalize_exact_args(dr_part, norm_part, dR, parts, scaling) -> dict:
    """Arguments of ``finalize_exact_kernel`` except DR_TILE; also used by the AOT checks."""
    return dict(dr_part_ptr=dr_part, norm_part_ptr=norm_part, dr_ptr=dR, RANK=dR.shape[0],
                PARTS=parts, NORM_PARTS=norm_part.shape[0], scaling=float(scaling),
                stride_drr=dR.stride(0), stride_drc=dR.stride(1))


def backward(gy, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
             need_dx, need_dR, need_dm):
    """The backend contract's backward: ``(dx, dR, dm)``, unneeded ones empty; the pre-pass,
    the dx GEMM when x needs a gradient, the finalize. Inputs named by ``use_torch_path`` take
    the torch backend's code path."""
    if use_torch_path(gy.dtype, B.shape[1]):
        return torch_backend.backward(gy, weight, bias, A, B, R, magnitude, terms, scaling,
                                      detach_norm, y, saved, need_dx, need_dR, need_dm)
    M, N = gy.shape[0], weight.shape[1]
    u, dR, dm = _steps(gy, B, R, magnitude, terms, scaling, detach_norm, y, bias, saved,
                       need_dx, need_dR, need_dm, gy.new_empty(0))
    dx = gy.new_empty((M, N) if need_dx else (0,))
    if need_dx and M > 0:
        launch(edora_dx_kernel, tiles_grid(M, N), **dx_args(gy, saved.g, weight, u, A, dx))
    return dx, dR, dm


def epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
                      need_dy0, need_dx, need_dR, need_dm):
    """The backend contract's epilogue backward: the pre-pass (which writes dy0 = gy ⊙ g for the
    base layer), the rank-r share of dx as one small GEMM, the finalize."""
    if use_torch_path(gy.dtype, B.shape[1]):
        return torch_backend.epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling,
                                               detach_norm, y, saved, need_dy0, need_dx,
                                               need_dR, need_dm)
    dy0 = gy.new_empty(gy.shape if need_dy0 else (0,))
    u, dR, dm = _steps(gy, B, R, magnitude, terms, scaling, detach_norm, y, bias, saved,
                       need_dx, need_dR, need_dm, dy0)
    dx = torch.mm(u, A.to(u.dtype)) if need_dx else gy.new_empty(0)
    return dy0, dx, dR, dm
