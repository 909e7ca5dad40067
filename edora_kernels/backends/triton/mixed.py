"""A batch that mixes adapters on the Triton kernels (docs/DESIGN.md §13): the same forward GEMM
— or, for a quantized base, the same pass over its y0 — with each token's g taken from a table
of one row per adapter (W0 read once, however many adapters), and for training the same
backward pre-pass and dx GEMM, each pre-pass program on one leading row's tokens and so on one
adapter's g and R."""
from __future__ import annotations

import torch

from ...op_common import Saved, slot_columns, zero_slots
from .bwd import dx_args, edora_dx_kernel, prepass_args, prepass_kernel
from .configs import cdiv, prepass_config, r_pad, row_block, tiles_grid
from .epilogue_only import edora_epilogue_kernel, epilogue_args
from .fwd import edora_fwd_kernel, fwd_args, fwd_grid
from .launch import launch


class ZeroSlots(tuple):
    """``(slots, index, zbuf)`` of a mixed training step: the columns where some adapter's g
    is 0 keep z (docs/DESIGN.md §3) for every token — ``slots`` (out, int32: a column's slot,
    SLOT_NONE or SLOT_FULL), the kernels' slot index (1 + capacity, int32: how many are taken,
    then their columns) and ``zbuf`` (tokens × capacity) — or all three empty."""

    @staticmethod
    def make(g_table: torch.Tensor, capacity: int, y: torch.Tensor) -> ZeroSlots:
        slots = zero_slots(g_table.abs().amin(0), capacity)  # 0 where any adapter's g is
        if capacity == 0:
            return ZeroSlots((slots, slots, y.new_empty(y.shape[0], 0)))
        taken = (slots >= 0).sum(dtype=torch.int32).unsqueeze(0)
        index = torch.cat([taken, slot_columns(slots, capacity).to(torch.int32)])
        return ZeroSlots((slots, index, y.new_empty(y.shape[0], capacity)))


def mixed_forward(x, weight, bias, t, sB, g_table, g_rows, slots: ZeroSlots | None = None):
    """``y = g_table[g_rows] ⊙ (x W0ᵀ + t (sB)ᵀ) + b``: x (M×in), t = each token's core applied
    to x Aᵀ (M×r), sB = s·B (out×r, x's dtype), g_table (adapters×out, fp32), g_rows (M, int32);
    with ``slots`` (a training step) z's zero-g columns go to their zbuf."""
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty(M, N)
    index, zbuf = (None, x.new_empty(M, 0)) if slots is None else slots[1:]
    if M > 0:
        args = fwd_args(x, weight, bias, t, sB, g_table, index, y, zbuf, g_rows)
        launch(edora_fwd_kernel, fwd_grid(args), **args)
    return y


def mixed_epilogue_forward(y0, bias, t, sB, g_table, g_rows, slots: ZeroSlots | None = None):
    """As :func:`mixed_forward` on a base layer's own output ``y0 = base(x)`` (bias included)."""
    M, N = y0.shape
    y = y0.new_empty(M, N)
    index, zbuf = (None, y0.new_empty(M, 0)) if slots is None else slots[1:]
    if M > 0:
        launch(edora_epilogue_kernel, tiles_grid(M, N),
               **epilogue_args(y0, t, bias, sB, g_table, index, y, zbuf, g_rows=g_rows))
    return y


def mixed_backward(gy, y, weight, bias, A, B, cores, g_table, slots: ZeroSlots, v, rows,
                   g_rows, scaling, need_dy0, need_dx, need_cores, need_g):
    """The backward of a mixed training step: ``(dy0, dx, d_cores, d_g)``, the ones not needed
    None. gy and y: M×out over ``len(rows)`` leading rows of equal length; ``rows`` each
    leading row's table row (int64), ``g_rows`` each token's (int32); ``cores`` and
    ``g_table`` the tables. One pre-pass launch (each program on one leading row's tokens:
    gz = gy ⊙ g, u = s·(gz B) R, the block's tᵀv and column sums of gy ⊙ (y − b)), then
    with ``weight`` (a dense base) the dx GEMM on gz; without (a base layer's y0) gz is dy0 and
    the rank-r share of dx one small product. d_cores
    and d_g sum the blocks' partials into their table rows (float64, in order)."""
    (M, out_features), rank = gy.shape, B.shape[1]
    T = M // len(rows)
    block = prepass_config(row_block(T, gy.device, len(rows)), r_pad(rank), gy.element_size())
    per_row = cdiv(T, block.kwargs["BLOCK_M"])
    parts, f32 = len(rows) * per_row, torch.float32
    need_u = need_dx
    u = gy.new_empty((M, rank) if need_u else (0,))
    dr_part = gy.new_empty((parts, rank, rank) if need_cores else (0,), dtype=f32)
    cs_part = gy.new_empty((parts, out_features) if need_g else (0,), dtype=f32)
    write_gz = need_dx if weight is not None else need_dy0
    gz = gy.new_empty(gy.shape if write_gz else (0,))
    saved = Saved(v, None, None, g_table, *slots[::2])
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
        # each block's table row: a product with this one-hot map sums its partials in order
        table = torch.arange(len(g_table), device=gy.device).unsqueeze(1)
        part_rows = rows.unsqueeze(1).expand(-1, per_row).reshape(1, -1)
        part_map = (part_rows == table).double()
        if need_cores:
            d_cores = (part_map @ dr_part.view(parts, -1).double()).mul_(scaling)
            d_cores = d_cores.view(len(g_table), rank, rank).to(cores.dtype)
        if need_g:
            d_g = _g_gradient(part_map @ cs_part.double(), g_table, slots[0]).to(g_table.dtype)
    return (gz if weight is None and need_dy0 else None), dx, d_cores, d_g


def _g_gradient(sums, g_table, slots):
    """∂L/∂g per table row from its sums of gy ⊙ (y − b) = g ⊙ Σ gy ⊙ z: divided by g, but
    where a column kept z (a slot) the sums are of gy ⊙ z already; where g = 0 with no slot
    (past the capacity) NaN, never a silently wrong number."""
    g = g_table.double()
    d_g = torch.where(g == 0, torch.nan, sums / g)
    if slots.numel():
        d_g = torch.where(slots >= 0, sums, d_g)
    return d_g
