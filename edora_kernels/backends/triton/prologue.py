"""The forward's prologue (docs/DESIGN.md §4, §5): one launch, two kinds of programs.

- Gate programs, one per block of output rows: ``P = B R``, the row norm
  ``n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum((P G) ⊙ P)`` in float64, ``g = m / n``, and the slot of
  each zero magnitude (docs/DESIGN.md §3). O(BLOCK_O·r²) float64 work each, as rank-1 updates.
- Row programs, one per block of tokens: the skinny ``v = x Aᵀ`` (fp32), read once per row
  panel instead of once per column block of the main GEMM.

The two are independent, so one launch serves both; the main GEMM then reads P, g and v.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import norm, op_common
from .common import mainloop, store_tile
from .configs import cdiv, input_precision, prologue_config, r_pad, row_block
from .launch import launch

NORM_SQ_FLOOR = tl.constexpr(norm.NORM_SQ_FLOOR)
SLOT_FULL = tl.constexpr(op_common.SLOT_FULL)
SLOT_NONE = tl.constexpr(op_common.SLOT_NONE)


@triton.jit
def row_norm(P, PG, C, c0, scaling):
    """n = ‖W0 + s·B R A‖ per row from P = B R, P G and the terms C, c0 (float64 tiles):
    ``n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum(PG ⊙ P)``, clamped at NORM_SQ_FLOOR."""
    n_sq = c0 + (2.0 * scaling) * tl.sum(P * C, axis=1) + (scaling * scaling) * tl.sum(PG * P, 1)
    return tl.sqrt(tl.maximum(n_sq, NORM_SQ_FLOOR))


@triton.jit
def _gate(
    pid,
    b_ptr, r_ptr, gram_ptr, c_ptr, c0_ptr, m_ptr,
    p_ptr, ps_ptr, n_ptr, g_ptr, slot_ptr, index_ptr,
    OUT, RANK, SLOTS, scaling,
    stride_bo, stride_br, stride_rr, stride_rc, stride_gr, stride_gc, stride_co, stride_cr,
    stride_po, stride_pr,
    RANK_PAD: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # --- this program's output rows
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, RANK_PAD)
    row_mask = offs_o < OUT
    rank_mask = offs_r < RANK
    tile_mask = row_mask[:, None] & rank_mask[None, :]

    # --- P = B R in float64, one rank-1 update per rank (tensor-core dots have no float64
    # path that compiles for every architecture), stored; then P G from P's stored columns
    P = tl.zeros((BLOCK_O, RANK_PAD), dtype=tl.float64)
    for k in range(0, RANK):
        b_k = tl.load(b_ptr + offs_o * stride_bo + k * stride_br, mask=row_mask, other=0.0)
        r_k = tl.load(r_ptr + k * stride_rr + offs_r * stride_rc, mask=rank_mask, other=0.0)
        P += b_k.to(tl.float64)[:, None] * r_k.to(tl.float64)[None, :]
    tl.store(p_ptr + offs_o[:, None] * stride_po + offs_r[None, :] * stride_pr, P,
             mask=tile_mask)
    # s·P rounded to the GEMM's operand dtype (via fp32: the interpreter cannot cast float64
    # to bf16), the small operand of the forward's rank-r epilogue
    tl.store(ps_ptr + offs_o[:, None] * RANK + offs_r[None, :],
             (P * scaling).to(tl.float32).to(ps_ptr.dtype.element_ty), mask=tile_mask)
    tl.debug_barrier()  # every thread's columns of P are stored before any is read back
    PG = tl.zeros((BLOCK_O, RANK_PAD), dtype=tl.float64)
    for k in range(0, RANK):
        p_k = tl.load(p_ptr + offs_o * stride_po + k * stride_pr, mask=row_mask, other=0.0)
        g_k = tl.load(gram_ptr + k * stride_gr + offs_r * stride_gc, mask=rank_mask, other=0.0)
        PG += p_k[:, None] * g_k[None, :]

    # --- n² = c0 + 2s·rowsum(P ⊙ C) + s²·rowsum(PG ⊙ P), clamped; g = m / n
    C = tl.load(c_ptr + offs_o[:, None] * stride_co + offs_r[None, :] * stride_cr,
                mask=tile_mask, other=0.0)
    c0 = tl.load(c0_ptr + offs_o, mask=row_mask, other=0.0)
    n = row_norm(P, PG, C, c0, scaling)
    m = tl.load(m_ptr + offs_o, mask=row_mask, other=1.0).to(tl.float64)
    tl.store(n_ptr + offs_o, n, mask=row_mask)
    tl.store(g_ptr + offs_o, (m / n).to(g_ptr.dtype.element_ty), mask=row_mask)

    # --- slots: the k-th zero magnitude (column order) takes slot k while slots last; the
    # zeros before this block are counted from m itself (no cross-program communication)
    if HAS_SLOTS:
        before = 0
        for o0 in range(0, pid * BLOCK_O, BLOCK_O):
            earlier = tl.load(m_ptr + o0 + tl.arange(0, BLOCK_O))
            before += tl.sum((earlier == 0).to(tl.int32), axis=0)
        zero = (m == 0) & row_mask
        order = before + tl.cumsum(zero.to(tl.int32), axis=0) - 1
        slot = tl.where(zero, tl.where(order < SLOTS, order, SLOT_FULL), SLOT_NONE)
        tl.store(slot_ptr + offs_o, slot, mask=row_mask)
        # the column of each slot (after the count), and the count from the last block
        tl.store(index_ptr + 1 + slot, offs_o, mask=row_mask & (slot >= 0))
        if (pid + 1) * BLOCK_O >= OUT:
            tl.store(index_ptr, tl.minimum(before + tl.sum(zero.to(tl.int32), axis=0), SLOTS))


@triton.jit
def prologue_kernel(
    # gate inputs: B (OUT×RANK), R (RANK×RANK), G = A Aᵀ (RANK×RANK, float64),
    # C = W0 Aᵀ (OUT×RANK, float64), c0 (OUT, float64), m (OUT)
    b_ptr, r_ptr, gram_ptr, c_ptr, c0_ptr, m_ptr,
    # gate outputs: P (OUT×RANK, float64), s·P (OUT×RANK contiguous, x's dtype), n (OUT,
    # float64), g (OUT), slots (OUT, int32), the slot index (SLOTS + 1, int32: the number of
    # slots taken, then the column of each)
    p_ptr, ps_ptr, n_ptr, g_ptr, slot_ptr, index_ptr,
    # row inputs: x (M×K), A (RANK×K); output v (M×RANK, fp32)
    x_ptr, a_ptr, v_ptr,
    OUT, M, K, RANK, SLOTS, GATE_PROGRAMS, scaling,
    stride_bo, stride_br, stride_rr, stride_rc, stride_gr, stride_gc, stride_co, stride_cr,
    stride_po, stride_pr, stride_xm, stride_xk, stride_ar, stride_ak, stride_vm, stride_vr,
    RANK_PAD: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_V: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < GATE_PROGRAMS:
        _gate(pid, b_ptr, r_ptr, gram_ptr, c_ptr, c0_ptr, m_ptr, p_ptr, ps_ptr, n_ptr, g_ptr,
              slot_ptr, index_ptr,
              OUT, RANK, SLOTS, scaling,
              stride_bo, stride_br, stride_rr, stride_rc, stride_gr, stride_gc, stride_co,
              stride_cr, stride_po, stride_pr, RANK_PAD, HAS_SLOTS, BLOCK_O)
    elif HAS_V:
        # --- v = x Aᵀ for this program's BLOCK_M tokens
        row0 = ((pid - GATE_PROGRAMS) * BLOCK_M).to(tl.int64)
        rows = M - row0
        v = mainloop(x_ptr + row0 * stride_xm, stride_xm, stride_xk,  # lhs = x, no k-scale
                     x_ptr,
                     a_ptr, stride_ak, stride_ar,                    # rhs = Aᵀ (K × RANK)
                     rows, RANK, K,
                     False, BLOCK_M, RANK_PAD, BLOCK_K, INPUT_PRECISION)
        store_tile(v_ptr + row0 * stride_vm, v, stride_vm, stride_vr, rows, RANK,
                   BLOCK_M, RANK_PAD)


def prologue_args(x, A, B, R, magnitude, terms, scaling, P, Ps, n, g, slots, index, v,
                  capacity, block_o: int) -> dict:
    """Arguments of ``prologue_kernel`` except the config's; also used by the AOT checks."""
    out, rank = B.shape
    has_v = v.numel() > 0
    return dict(
        b_ptr=B, r_ptr=R, gram_ptr=terms.G, c_ptr=terms.C, c0_ptr=terms.c0, m_ptr=magnitude,
        p_ptr=P, ps_ptr=Ps, n_ptr=n, g_ptr=g, slot_ptr=slots if capacity else n,
        index_ptr=index if capacity else n,
        x_ptr=x, a_ptr=A, v_ptr=v if has_v else g,  # unused pointer: typed like a real output
        OUT=out, M=x.shape[0], K=x.shape[1], RANK=rank, SLOTS=capacity,
        GATE_PROGRAMS=cdiv(out, block_o), scaling=float(scaling),
        stride_bo=B.stride(0), stride_br=B.stride(1), stride_rr=R.stride(0),
        stride_rc=R.stride(1), stride_gr=terms.G.stride(0), stride_gc=terms.G.stride(1),
        stride_co=terms.C.stride(0),
        stride_cr=terms.C.stride(1),
        stride_po=P.stride(0), stride_pr=P.stride(1),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=A.stride(0),
        stride_ak=A.stride(1),
        stride_vm=v.stride(0) if has_v else 0, stride_vr=v.stride(1) if has_v else 0,
        RANK_PAD=r_pad(rank), HAS_SLOTS=capacity > 0, HAS_V=has_v,
        INPUT_PRECISION=input_precision(x.dtype),
    )


def prologue(x, A, B, R, magnitude, terms, scaling, cdt, capacity):
    """Launch the gate and the ``x Aᵀ`` programs; returns ``(P, s·P, n, g, slots, index, v)``,
    s·P in x's dtype, ``index`` the slot index (empty without slots)."""
    out, rank = B.shape
    M = x.shape[0]
    f64 = torch.float64
    P = B.new_empty(out, rank, dtype=f64)
    Ps = x.new_empty(out, rank)
    n = B.new_empty(out, dtype=f64)
    g = B.new_empty(out, dtype=cdt)
    slots = B.new_empty(out if capacity else 0, dtype=torch.int32)
    index = B.new_empty(capacity + 1 if capacity else 0, dtype=torch.int32)
    v = x.new_empty(M, rank, dtype=cdt)
    config = prologue_config(row_block(M, x.device))
    kw = config.kwargs
    args = prologue_args(x, A, B, R, magnitude, terms, scaling, P, Ps, n, g, slots, index, v,
                         capacity, kw["BLOCK_O"])
    launch(prologue_kernel, (args["GATE_PROGRAMS"] + cdiv(M, kw["BLOCK_M"]),), **args,
           **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return P, Ps, n, g, slots, index, v
