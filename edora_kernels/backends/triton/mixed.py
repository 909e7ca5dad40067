"""A batch that mixes adapters on the Triton kernels (docs/DESIGN.md §13): the same forward GEMM
— or, for a quantized base, the same pass over its y0 — with each token's g taken from a table
of one row per adapter (W0 read once, however many adapters), and for training the same
backward pre-pass, dx GEMM and finalize, each pre-pass program on one leading row's tokens and
so on one adapter's g and R.

Before the GEMM, one launch of :func:`mixed_prologue_kernel` does the small work: its column
programs form every adapter's norm and g (the gate of the single-adapter prologue, one program
per adapter and block of output rows) and s·B; its row programs form v = x Aᵀ and each
token's t = R v with its adapter's R. For training, :func:`mixed_slots_kernel` (one program)
then gives the columns where some adapter's magnitude is zero their slots of z.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import op_common
from ...norm import NormTerms, compute_dtype
from ...op_common import Saved
from .bwd import (
    dx_args,
    edora_dx_kernel,
    finalize_args,
    finalize_kernel,
    prepass_args,
    prepass_kernel,
)
from .common import RANK_CHUNK, mainloop, store_tile
from .configs import (
    cdiv,
    finalize_config,
    input_precision,
    mixed_prologue_config,
    prepass_config,
    r_pad,
    row_block,
    tiles_grid,
)
from .epilogue_only import edora_epilogue_kernel, epilogue_args
from .fwd import edora_fwd_kernel, fwd_args, fwd_grid
from .launch import launch
from .prologue import row_norm

SLOT_FULL = tl.constexpr(op_common.SLOT_FULL)
SLOT_NONE = tl.constexpr(op_common.SLOT_NONE)
SLOTS_BLOCK = 1024  # columns per step of the slots program


# The batch's make-up (how many adapters take part, whether base rows do, tokens per row)
# changes from batch to batch: those ints are not specialised on, so a new mix reuses the
# compiled kernel (the JIT would otherwise compile again for a 1 or a multiple of 16).
@triton.jit(do_not_specialize=["T", "ADAPTERS", "SOURCE_ROWS", "COLUMN_PROGRAMS"])
def mixed_prologue_kernel(
    # column inputs: B (OUT×RANK); with GATE the adapters' R and R G (ADAPTERS×RANK×RANK,
    # G = A Aᵀ) and m (ADAPTERS×OUT), C = W0 Aᵀ (OUT×RANK) and c0 (OUT), all float64 but R, m
    b_ptr, rs_ptr, rg_ptr, ms_ptr, c_ptr, c0_ptr,
    # column outputs: s·B (OUT×RANK contiguous, x's dtype); with GATE each adapter's n
    # (ADAPTERS×OUT, float64), the tables g ((ADAPTERS + BASE_ROW)×OUT) and R (the same rows ×
    # RANK×RANK, contiguous), and a zero wherever some adapter's m is zero in flags (OUT,
    # int32, ones before the launch)
    sb_ptr, n_ptr, g_ptr, cores_ptr, flag_ptr,
    # row inputs: x (M×IN), A (RANK×IN), each leading row's table row (int64) and the cores
    # its tokens read (SOURCE_ROWS×RANK×RANK: the adapters' R with GATE, else the table);
    # outputs v = x Aᵀ and t = v Rᵀ with the token's R (M×RANK each)
    x_ptr, a_ptr, rows_ptr, src_ptr, v_ptr, t_ptr,
    OUT, T, IN, RANK, ADAPTERS, SOURCE_ROWS, BLOCKS_O, COLUMN_PROGRAMS, scaling,
    stride_bo, stride_br, stride_rsk, stride_rsr, stride_rsc, stride_msk, stride_rgk,
    stride_co, stride_cr, stride_nk, stride_gk, stride_xm, stride_xk, stride_ar, stride_ak,
    stride_sk, stride_sr, stride_sc, stride_vm, stride_tm,
    RANK_PAD: tl.constexpr, GATE: tl.constexpr, BASE_ROW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, RANK_PAD)
    rank_mask = offs_r < RANK
    if pid < COLUMN_PROGRAMS:
        # --- adapter `k`'s gate on one block of output rows (GATE), s·B on it (adapter 0)
        k = pid // BLOCKS_O
        offs_o = (pid % BLOCKS_O) * BLOCK_O + tl.arange(0, BLOCK_O)
        row_mask = offs_o < OUT
        tile_mask = row_mask[:, None] & rank_mask[None, :]
        if k == 0:
            b = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br,
                        mask=tile_mask, other=0.0)
            tl.store(sb_ptr + offs_o[:, None] * RANK + offs_r[None, :],
                     (b.to(tl.float32) * scaling).to(sb_ptr.dtype.element_ty), mask=tile_mask)
        if GATE:
            r_k = rs_ptr + k.to(tl.int64) * stride_rsk
            rg_k = rg_ptr + k.to(tl.int64) * stride_rgk
            # P = B R and P G = B (R G) in float64, one rank-1 update each per rank (no
            # portable float64 dot; R G is made before the launch, so no column of P is needed)
            P = tl.zeros((BLOCK_O, RANK_PAD), dtype=tl.float64)
            PG = tl.zeros((BLOCK_O, RANK_PAD), dtype=tl.float64)
            for j in range(0, RANK):
                b_j = tl.load(b_ptr + offs_o * stride_bo + j * stride_br, mask=row_mask,
                              other=0.0).to(tl.float64)[:, None]
                r_j = tl.load(r_k + j * stride_rsr + offs_r * stride_rsc, mask=rank_mask,
                              other=0.0)
                rg_j = tl.load(rg_k + j * RANK + offs_r, mask=rank_mask, other=0.0)
                P += b_j * r_j.to(tl.float64)[None, :]
                PG += b_j * rg_j[None, :]
            # the norm, g = m / n
            C = tl.load(c_ptr + offs_o[:, None] * stride_co + offs_r[None, :] * stride_cr,
                        mask=tile_mask, other=0.0)
            n = row_norm(P, PG, C, tl.load(c0_ptr + offs_o, mask=row_mask, other=0.0), scaling)
            m = tl.load(ms_ptr + k * stride_msk + offs_o, mask=row_mask, other=1.0)
            tl.store(n_ptr + k * stride_nk + offs_o, n, mask=row_mask)
            tl.store(g_ptr + k * stride_gk + offs_o,
                     (m.to(tl.float64) / n).to(g_ptr.dtype.element_ty), mask=row_mask)
            tl.store(flag_ptr + offs_o, tl.zeros_like(offs_o), mask=row_mask & (m == 0))
            core_mask = rank_mask[:, None] & rank_mask[None, :]
            entries = offs_r[:, None] * RANK + offs_r[None, :]
            if pid % BLOCKS_O == 0:  # the table's R, in its dtype
                R = tl.load(r_k + offs_r[:, None] * stride_rsr + offs_r[None, :] * stride_rsc,
                            mask=core_mask, other=0.0)
                tl.store(cores_ptr + k * RANK * RANK + entries,
                         R.to(cores_ptr.dtype.element_ty), mask=core_mask)
            if BASE_ROW:
                if k == 0:  # the base model's row: g = 1, R = 0
                    tl.store(g_ptr + ADAPTERS * stride_gk + offs_o,
                             tl.full((BLOCK_O,), 1.0, g_ptr.dtype.element_ty), mask=row_mask)
                    if pid == 0:
                        tl.store(cores_ptr + ADAPTERS * RANK * RANK + entries,
                                 tl.zeros((RANK_PAD, RANK_PAD), cores_ptr.dtype.element_ty),
                                 mask=core_mask)
    else:
        # --- v = x Aᵀ on a block of one leading row's tokens, then t = v Rᵀ with that row's R
        # (none for a row past the source: the base model's), in 16-wide chunks of t
        blocks_per_row = tl.cdiv(T, BLOCK_M)
        program = pid - COLUMN_PROGRAMS
        start = (program % blocks_per_row) * BLOCK_M
        leading = program // blocks_per_row
        row0 = leading.to(tl.int64) * T + start
        rows = T - start
        v = mainloop(x_ptr + row0 * stride_xm, stride_xm, stride_xk, x_ptr,
                     a_ptr, stride_ak, stride_ar, rows, RANK, IN,
                     False, BLOCK_M, RANK_PAD, BLOCK_K, INPUT_PRECISION)
        store_tile(v_ptr + row0 * stride_vm, v, stride_vm, 1, rows, RANK, BLOCK_M, RANK_PAD)
        source = tl.load(rows_ptr + leading)
        core = src_ptr + source * stride_sk
        offs_c = tl.arange(0, RANK_CHUNK)
        for first in range(0, RANK, RANK_CHUNK):
            chunk_mask = (first + offs_c) < RANK
            # Rᵀ's columns first.. (RANK_PAD × RANK_CHUNK): rows first.. of R, transposed
            Rt = tl.load(core + (first + offs_c)[None, :] * stride_sr
                         + offs_r[:, None] * stride_sc,
                         mask=rank_mask[:, None] & chunk_mask[None, :] & (source < SOURCE_ROWS),
                         other=0.0)
            t = tl.dot(v, Rt.to(tl.float32), input_precision="ieee")
            store_tile(t_ptr + row0 * stride_tm + first, t, stride_tm, 1, rows, RANK - first,
                       BLOCK_M, RANK_CHUNK)


@triton.jit(do_not_specialize=["ROWS"])
def mixed_slots_kernel(
    # input: ROWS×OUT values, a column zero in any row taking a slot (the prologue's flags,
    # or a g table); outputs: slots (OUT, int32) and the slot index (1 + SLOTS, int32: how
    # many are taken, then their columns, OUT where unused)
    zero_ptr, slot_ptr, index_ptr,
    ROWS, OUT, SLOTS, stride_zr,
    SLOTS_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: the k-th column (in column order) with a zero takes slot k while slots
    last, as ``op_common.zero_slots`` over the rows' minimum magnitude."""
    taken = 0
    for o0 in range(0, OUT, BLOCK):
        offs = o0 + tl.arange(0, BLOCK)
        mask = offs < OUT
        zero = tl.zeros((BLOCK,), dtype=tl.int32)
        for row in range(0, ROWS):
            value = tl.load(zero_ptr + row * stride_zr + offs, mask=mask, other=1)
            zero = tl.maximum(zero, (value == 0).to(tl.int32))
        order = taken + tl.cumsum(zero, axis=0) - 1
        slot = tl.where(zero > 0, tl.where(order < SLOTS, order, SLOT_FULL), SLOT_NONE)
        tl.store(slot_ptr + offs, slot, mask=mask)
        tl.store(index_ptr + 1 + slot, offs, mask=mask & (slot >= 0))
        taken += tl.sum(zero, axis=0)
    taken = tl.minimum(taken, SLOTS)
    tl.store(index_ptr, taken)
    unused = tl.arange(0, SLOTS_PAD)
    tl.store(index_ptr + 1 + unused, tl.full((SLOTS_PAD,), OUT, tl.int32),
             mask=(unused >= taken) & (unused < SLOTS))


class AdapterStack(NamedTuple):
    """What :func:`mixed_prologue` needs to form a training step's tables itself: the adapters'
    R (K×r×r) and m (K×out), stacked, the layer's float64 norm terms, and whether the tables
    end with the base model's row. The prologue makes R G (float64) from them first."""

    Rs: torch.Tensor
    ms: torch.Tensor
    terms: NormTerms
    base_row: bool


class Prologue(NamedTuple):
    """What :func:`mixed_prologue` made: v = x Aᵀ and t (tokens × r, the compute dtype), s·B
    (out × r, x's dtype), the tables ``cores`` and ``g``, each adapter's norm ``n`` (K × out,
    float64; None when the tables were given) and the zero-g columns' ``slots`` (None when
    serving)."""

    v: torch.Tensor
    t: torch.Tensor
    sB: torch.Tensor
    cores: torch.Tensor
    g: torch.Tensor
    n: torch.Tensor | None
    slots: ZeroSlots | None


class ZeroSlots(tuple):
    """``(slots, index, zbuf)`` of a mixed training step: the columns where some adapter's g
    is 0 keep z (docs/DESIGN.md §3) for every token — ``slots`` (out, int32: a column's slot,
    SLOT_NONE or SLOT_FULL), the kernels' slot index (1 + capacity, int32: how many are taken,
    then their columns) and ``zbuf`` (tokens × capacity) — or all three empty."""

    @staticmethod
    def make(zeros: torch.Tensor, capacity: int, like: torch.Tensor) -> ZeroSlots:
        """The slots of the columns with a zero in some row of ``zeros`` (rows × out), one
        launch of :func:`mixed_slots_kernel`; ``like`` is y's shape and dtype."""
        out = zeros.shape[1]
        slots = zeros.new_empty(out if capacity else 0, dtype=torch.int32)
        index = zeros.new_empty(capacity + 1 if capacity else 0, dtype=torch.int32)
        if capacity:
            launch(mixed_slots_kernel, (1,), **slots_args(zeros, slots, index, capacity),
                   num_warps=4)
        return ZeroSlots((slots, index, like.new_empty(like.shape[0], capacity)))


def mixed_prologue(x, A, B, rows, scaling, y_like, *, gate: AdapterStack | None = None,
                   tables=None, capacity: int = 0) -> Prologue:
    """One launch of :func:`mixed_prologue_kernel` over x (tokens × in, ``len(rows)`` leading
    rows of equal length; ``rows`` each one's table row, int64): with ``gate`` the tables, the
    norms and the zero-magnitude flags, else the given ``tables`` (cores, g); then, with a
    ``capacity`` (training), the slots (:class:`ZeroSlots`), z kept in ``y_like``'s dtype."""
    M, (out, rank) = x.shape[0], B.shape
    cdt = compute_dtype(x.dtype)
    if gate is not None:
        table_rows = gate.Rs.shape[0] + int(gate.base_row)
        n = B.new_empty(gate.Rs.shape[0], out, dtype=torch.float64)
        cores = B.new_empty(table_rows, rank, rank, dtype=cdt)
        g = B.new_empty(table_rows, out, dtype=cdt)
        flags = B.new_ones(1, out, dtype=torch.int32)  # the gate writes a 0 where m = 0
        source, ms, terms = gate.Rs, gate.ms, gate.terms
    else:
        (cores, g), n, flags = tables, None, None
        source, ms, terms = cores, g, None
    v = x.new_empty(M, rank, dtype=cdt)
    t = x.new_empty(M, rank, dtype=cdt)
    sB = x.new_empty(out, rank)
    T = M // max(len(rows), 1)
    config = mixed_prologue_config(row_block(T, x.device, len(rows)), r_pad(rank))
    kw = config.kwargs
    # R G for the norms' P G = B (R G): one float64 product over all adapters
    RG = torch.matmul(source.to(torch.float64), terms.G) if terms is not None else None
    args = mixed_prologue_args(x, A, B, rows, scaling, source, RG, ms, terms, sB, n, g, cores,
                               flags, v, t, gate is not None and gate.base_row, kw["BLOCK_O"])
    programs = args["COLUMN_PROGRAMS"] + len(rows) * cdiv(T, kw["BLOCK_M"])
    if programs:
        launch(mixed_prologue_kernel, (programs,), **args, **kw, num_warps=config.num_warps,
               num_stages=config.num_stages)
    slots = ZeroSlots.make(flags if gate is not None else g, capacity, y_like) if capacity else None
    return Prologue(v, t, sB, cores, g, n, slots)


def mixed_prologue_args(x, A, B, rows, scaling, source, RG, ms, terms, sB, n, g, cores, flags,
                        v, t, base_row: bool, block_o: int) -> dict:
    """Arguments of ``mixed_prologue_kernel`` except the config's; also used by the AOT checks.
    ``terms`` None: no gate (``source`` is the cores table; ``RG``, ``n``, ``ms`` and
    ``flags`` are not read), else ``source`` and ``ms`` are the adapters' stacked R and m and
    ``RG`` their R G (contiguous, float64)."""
    (M, width), (out, rank) = x.shape, B.shape
    gate = terms is not None
    adapters = source.shape[0] if gate else 1
    blocks_o = cdiv(out, block_o)
    unused = g  # pointers the launch never dereferences, typed like a real one
    C, c0 = (terms.C, terms.c0) if gate else (unused,) * 2
    RG, n, flags = (RG, n, flags) if gate else (source, unused, unused)
    return dict(
        b_ptr=B, rs_ptr=source, rg_ptr=RG, ms_ptr=ms, c_ptr=C, c0_ptr=c0,
        sb_ptr=sB, n_ptr=n, g_ptr=g, cores_ptr=cores, flag_ptr=flags,
        x_ptr=x, a_ptr=A, rows_ptr=rows, src_ptr=source, v_ptr=v, t_ptr=t,
        OUT=out, T=M // max(len(rows), 1), IN=width, RANK=rank, ADAPTERS=adapters,
        SOURCE_ROWS=source.shape[0], BLOCKS_O=blocks_o, COLUMN_PROGRAMS=blocks_o * adapters,
        scaling=float(scaling),
        stride_bo=B.stride(0), stride_br=B.stride(1), stride_rsk=source.stride(0),
        stride_rsr=source.stride(1), stride_rsc=source.stride(2), stride_msk=ms.stride(0),
        stride_rgk=RG.stride(0), stride_co=C.stride(0),
        stride_cr=C.stride(-1), stride_nk=n.stride(0), stride_gk=g.stride(0),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=A.stride(0),
        stride_ak=A.stride(1), stride_sk=source.stride(0), stride_sr=source.stride(1),
        stride_sc=source.stride(2), stride_vm=v.stride(0), stride_tm=t.stride(0),
        RANK_PAD=r_pad(rank), GATE=gate, BASE_ROW=gate and base_row,
        INPUT_PRECISION=input_precision(x.dtype),
    )


def slots_args(zeros, slots, index, capacity) -> dict:
    """Arguments of ``mixed_slots_kernel``; also used by the AOT checks."""
    return dict(zero_ptr=zeros, slot_ptr=slots, index_ptr=index, ROWS=zeros.shape[0],
                OUT=zeros.shape[1], SLOTS=capacity, stride_zr=zeros.stride(0),
                SLOTS_PAD=triton.next_power_of_2(capacity), BLOCK=SLOTS_BLOCK)


def mixed_forward(x, weight, bias, pro: Prologue, g_rows):
    """``y = g_table[g_rows] ⊙ (x W0ᵀ + t (sB)ᵀ) + b`` from the prologue's tables, t and s·B:
    x (M×in), g_rows (M, int32); with slots (a training step) z's zero-g columns go to their
    zbuf."""
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty(M, N)
    index, zbuf = (None, x.new_empty(M, 0)) if pro.slots is None else pro.slots[1:]
    if M > 0:
        args = fwd_args(x, weight, bias, pro.t, pro.sB, pro.g, index, y, zbuf, g_rows)
        launch(edora_fwd_kernel, fwd_grid(args), **args)
    return y


def mixed_epilogue_forward(y0, bias, pro: Prologue, g_rows):
    """As :func:`mixed_forward` on a base layer's own output ``y0 = base(x)`` (bias included)."""
    M, N = y0.shape
    y = y0.new_empty(M, N)
    index, zbuf = (None, y0.new_empty(M, 0)) if pro.slots is None else pro.slots[1:]
    if M > 0:
        launch(edora_epilogue_kernel, tiles_grid(M, N),
               **epilogue_args(y0, pro.t, bias, pro.sB, pro.g, index, y, zbuf, g_rows=g_rows))
    return y


def mixed_backward(gy, y, weight, bias, A, B, cores, g_table, n, ms, slots: ZeroSlots, v, rows,
                   g_rows, order, scaling, need_dy0, need_dx, need_cores, need_g,
                   dR_dtype=None):
    """The backward of a mixed training step: ``(dy0, dx, d_cores, d_g)``, the ones not needed
    None. gy and y: M×out over ``len(rows)`` leading rows of equal length; ``rows`` each
    leading row's table row (int64), ``g_rows`` each token's (int32), ``order`` each table
    row's leading rows (``RowAssignment.table_order``); ``cores`` and ``g_table`` the tables. The
    pre-pass (each program on one leading row's tokens: gz = gy ⊙ g, u = s·(gz B) R, the
    block's tᵀv and column sums of gy ⊙ (y − b)), then with ``weight`` (a dense base) the dx
    GEMM on gz — without (a base layer's y0) gz is dy0 and the rank-r share of dx one small
    product —, then the finalize, which sums each table row's partials in float64, in order.
    With the adapters' norms ``n`` and magnitudes ``ms`` (K rows, the prologue's gate) it gives
    each adapter's dR (in ``dR_dtype``) and dm (in m's dtype) themselves; else the tables'
    gradients (every table row, in their dtypes)."""
    (M, out_features), rank = gy.shape, B.shape[1]
    T = M // max(len(rows), 1)
    block = prepass_config(row_block(T, gy.device, len(rows)), r_pad(rank), gy.element_size())
    per_row = cdiv(T, block.kwargs["BLOCK_M"])
    parts, f32 = len(rows) * per_row, torch.float32
    u = gy.new_empty((M, rank) if need_dx else (0,))
    dr_part = gy.new_empty((parts, rank, rank) if need_cores else (0,), dtype=f32)
    cs_part = gy.new_empty((parts, out_features) if need_g else (0,), dtype=f32)
    write_gz = need_dx if weight is not None else need_dy0
    gz = gy.new_empty(gy.shape if write_gz else (0,))
    saved = Saved(v, None, n, g_table, *slots[::2])
    if parts:
        launch(prepass_kernel, (parts,),
               **prepass_args(gy, B, cores, y, bias, saved, scaling, u, dr_part, cs_part, gz,
                              g_rows, T),
               **block.kwargs, num_warps=block.num_warps, num_stages=block.num_stages)
    dx = None
    if need_dx and weight is not None:
        dx = gy.new_empty(M, weight.shape[1])
        if M > 0:
            launch(edora_dx_kernel, tiles_grid(M, weight.shape[1]),
                   **dx_args(gz, None, weight, u, A, dx))
    elif need_dx:
        dx = torch.mm(u, A.to(u.dtype))
    d_cores = d_g = None
    if need_cores or need_g:
        magnitudes = g_table if ms is None else ms  # g = m / n, or g itself (n = 1)
        table_rows = magnitudes.shape[0]
        dtypes = (cores.dtype, g_table.dtype) if ms is None else (dR_dtype, ms.dtype)
        d_cores = cores.new_empty((table_rows, rank, rank) if need_cores else (0,),
                                  dtype=dtypes[0])
        d_g = g_table.new_empty((table_rows, out_features) if need_g else (0,), dtype=dtypes[1])
        finalize = finalize_config(r_pad(rank))
        kw = finalize.kwargs
        args = finalize_args(saved, magnitudes, B, None, scaling, cs_part, dr_part, d_g,
                             d_cores, dr_part, False, kw["BLOCK_O"], order=order,
                             table_rows=g_table.shape[0], per_row=per_row)
        tiles = table_rows * cdiv(rank, kw["DR_TILE"]) ** 2 if need_cores else 0
        if parts:
            launch(finalize_kernel, (args["COLUMN_PROGRAMS"] + tiles,), **args, **kw,
                   num_warps=finalize.num_warps, num_stages=finalize.num_stages)
        else:  # no rows: nothing to sum
            d_cores.zero_()
            d_g.zero_()
        d_cores, d_g = (d if need else None for d, need in ((d_cores, need_cores), (d_g, need_g)))
    return (gz if weight is None and need_dy0 else None), dx, d_cores, d_g
