"""A batch whose rows use different adapters of one layer, in one pass (docs/DESIGN.md §13).

The adapters of a layer share its basis (A, B) and differ only in R and m, so a mixed batch
costs what one adapter costs plus a per-row r×r product and a per-row gather of g:

    y0 = base(x)                        once for the whole batch (one read of W0)
    v  = x Aᵀ                           once (N×r)
    t_i = R_{a(i)} v_i                  per row: its adapter's core
    z  = y0 + s·t Bᵀ                    one GEMM with the shared B, into y0
    y_i = g_{a(i)} ⊙ z_i + (1 − g_{a(i)}) ⊙ b
                                        g_a = m_a / ‖W0 + s·B R_a A‖, every adapter's at once

and rows of the base model are ``y0`` itself, bit for bit (their core is 0 and their g 1). With
gradients a layer records two autograd nodes — the tables (:class:`_Tables`) and the epilogue
(:class:`_MixedEpilogue`, which on a dense base runs the base product too) — and backward gives
each adapter's R and m the gradient of its own rows only, reading W0 once more (dx), however
many adapters the batch holds. A Triton layer runs the same step in its fused kernels
(:func:`mixed_on_triton`), serving or training.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .backends import CPU_BACKEND
from .backends.torch_backend import mm_compute
from .norm import TERMS_DTYPE, NormTerms, compute_dtype
from .op_common import ELEMENTWISE_WORK, cpu_threads_for, saved_tensors, slot_capacity

# The name PEFT uses for a row that runs the base model alone.
BASE_NAME = "__base__"


class RowAssignment:
    """Each leading row's adapter index for one forward (``adapter_names=``), shared by every
    layer and head of the model. The host's copy (``values``) decides which adapters take part
    and which rows each takes, with no device sync; the index tensors the layers need on the
    device are made once per forward — from pinned memory, without blocking — and reused by
    every layer after the first."""

    def __init__(self, rows: torch.Tensor, *, repeats: bool = False) -> None:
        self.values: list[int] = rows.tolist()
        self.repeats = repeats
        self._on_device: dict[tuple, torch.Tensor] = {}
        self._repeated: dict[int, RowAssignment] = {}

    def __len__(self) -> int:
        return len(self.values)

    def for_batch(self, batch: int) -> RowAssignment | None:
        """The assignment for a module whose input has ``batch`` leading rows: this one, or
        with ``repeats`` (set by ``generate``: beams and returned sequences repeat each row k
        times in place, the encoder of an encoder-decoder model sees the rows once) each row's
        adapter k times; None when the batch does not fit."""
        if batch == len(self):
            return self
        if not (self.repeats and self.values and batch % len(self) == 0):
            return None
        k = batch // len(self)
        if k not in self._repeated:
            self._repeated[k] = RowAssignment(torch.tensor(self.values).repeat_interleave(k))
        return self._repeated[k]

    def index(self, values: list[int], device: torch.device, *, repeat: int = 1,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
        """``values`` (ints), each repeated ``repeat`` times, as a ``dtype`` (int64 or int32)
        tensor on ``device``, made once per forward."""
        key = (tuple(values), repeat, dtype, device)
        if key not in self._on_device:
            numpy_dtype = {torch.long: np.int64, torch.int32: np.int32}[dtype]
            host = torch.from_numpy(np.repeat(np.asarray(values, dtype=numpy_dtype), repeat))
            if device.type == "cuda":
                host = host.pin_memory()
            self._on_device[key] = host.to(device, non_blocking=True)
        return self._on_device[key]

    def table_order(self, local: list[int], table_rows: int, device: torch.device) -> torch.Tensor:
        """:func:`_table_order` of ``local`` (each leading row's table row) on ``device``
        (int32), computed and copied once per forward however many layers ask."""
        key = ("order", tuple(local), table_rows, device)
        if key not in self._on_device:
            self._on_device[key] = self.index(_table_order(local, table_rows), device,
                                              dtype=torch.int32)
        return self._on_device[key]


def _table_order(local: list[int], table_rows: int) -> list[int]:
    """Each table row's leading rows, for sums per table row in a fixed order without a pass
    over the others' rows: ``table_rows + 1`` offsets, then the leading rows (indices into
    ``local``, each leading row's table row) sorted by table row, in batch order within one."""
    order = sorted(range(len(local)), key=lambda i: local[i])  # stable: batch order within
    counts = np.bincount(np.asarray(local, dtype=np.int64), minlength=table_rows)
    return [0, *np.cumsum(counts[:table_rows]).tolist(), *order]


def rows_this_forward(module) -> RowAssignment | torch.Tensor | None:
    """The rows ``module`` (a layer or head with ``row_adapters``) runs with in this forward:
    ``row_adapters``, which EDoRAModel sets for one forward and clears after it. Gradient
    checkpointing runs a forward again inside backward, after the clearing: that
    recomputation takes ``rows_to_recompute``, which EDoRAModel sets at every forward that
    records a graph (so not at a no-grad forward in between, a reference model's say)."""
    rows = module.row_adapters
    if (rows is None and not torch.compiler.is_compiling()
            and torch._C._current_graph_task_id() != -1):  # run by backward: a recomputation
        return getattr(module, "rows_to_recompute", None)
    return rows


def as_assignment(rows, x: torch.Tensor, where: str) -> RowAssignment:
    """``rows`` (a host tensor of adapter indices, or a RowAssignment already) as the
    assignment of the leading rows of ``x``, the input of the module ``where``; a ValueError
    when they do not fit."""
    assignment = rows if isinstance(rows, RowAssignment) else RowAssignment(rows)
    fitted = assignment.for_batch(x.shape[0]) if x.dim() >= 2 else None
    if fitted is None:
        raise ValueError(f"{where}: adapter_names gives {len(assignment)} rows but the input "
                         f"has shape {tuple(x.shape)} (batch first)")
    return fitted


class RowTables(NamedTuple):
    """The per-adapter tables a mixed batch gathers from: ``cores`` K×r×r and ``g`` K×out in
    the compute dtype, and a row K after them when some rows run the base model: core 0, g = 1,
    so that they come out as ``y0`` itself."""

    cores: torch.Tensor
    g: torch.Tensor


def row_tables(cores, magnitudes, norms: torch.Tensor, cdt, base_row: bool = True) -> RowTables:
    """The tables of K adapters: their ``cores`` (K tensors r×r: their R) and ``g = m / n`` from
    their ``magnitudes`` (K tensors of out) and ``norms`` (K×out, float64), with the base
    model's row appended if ``base_row``; differentiable in each R and m and in the norms, as
    one autograd node (:class:`_Tables`)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*cores, *magnitudes, norms)):
        return RowTables(*_Tables.apply(norms, cdt, base_row, *cores, *magnitudes))
    return _build_tables(torch.stack(cores), torch.stack(magnitudes), norms, cdt, base_row)


def _build_tables(Rs, ms, norms, cdt, base_row) -> RowTables:
    cores, g = Rs.to(cdt), (ms.to(TERMS_DTYPE) / norms).to(cdt)
    if not base_row:
        return RowTables(cores, g)
    return RowTables(torch.cat([cores, cores.new_zeros(1, *cores.shape[1:])]),
                     torch.cat([g, g.new_ones(1, g.shape[1])]))


class _Tables(torch.autograd.Function):
    """:func:`row_tables` as one node: a training step builds the tables of K adapters every
    step, and the small nodes autograd would record for it (two stacks, whose backward splits
    the gradients again, a division, casts, the base row) cost more than its math. It takes
    each R and m itself and hands each its slice of the tables' gradient."""

    @staticmethod
    def forward(ctx, norms, cdt, base_row, *weights):
        K = len(weights) // 2
        ms = torch.stack(weights[K:])
        ctx.save_for_backward(ms, norms)
        ctx.Rs_dtype = weights[0].dtype
        return _build_tables(torch.stack(weights[:K]), ms, norms, cdt, base_row)

    @staticmethod
    def backward(ctx, d_cores, d_g):
        ms, norms = ctx.saved_tensors
        with cpu_threads_for(ELEMENTWISE_WORK * norms.numel()):  # a few passes over K×out
            return _Tables._gradients(ctx, ms, norms, d_cores, d_g)

    @staticmethod
    def _gradients(ctx, ms, norms, d_cores, d_g):
        K = len(ms)  # the base model's row, if any, has no gradient to give
        d_Rs, d_ms, d_norms = (None,) * K, (None,) * K, None
        if any(ctx.needs_input_grad[3:3 + K]) and d_cores is not None:
            d_Rs = d_cores[:K].to(ctx.Rs_dtype).unbind(0)
        if d_g is not None:
            d_g = d_g[:K].to(TERMS_DTYPE)  # g = m / n, in float64 as it was formed
            if any(ctx.needs_input_grad[3 + K:]):
                d_ms = (d_g / norms).to(ms.dtype).unbind(0)
            if ctx.needs_input_grad[0]:
                d_norms = -d_g * ms.to(TERMS_DTYPE) / norms.square()
        return d_norms, None, None, *d_Rs, *d_ms


def _row_core_terms(x, A, cores, rows, cdt) -> tuple[torch.Tensor, ...]:
    """``(v, t, row_cores)``: v = x·Aᵀ (batch×T×r, in ``cdt``: a half x is read once by a GEMM
    with an fp32 result on a GPU, not converted first), each leading row's core
    ``row_cores[i] = cores[rows[i]]`` and t, that core applied to the row's v. No autograd:
    :class:`_MixedEpilogue` differentiates."""
    v = mm_compute(x.reshape(-1, x.shape[-1]), A.T, cdt).view(x.shape[0], -1, A.shape[0])
    with cpu_threads_for(v.numel() * A.shape[0]):  # N·r² multiply-adds
        row_cores = cores.index_select(0, rows)  # (index_select: a plain gather, not indexing)
        return v, torch.bmm(v, row_cores.transpose(1, 2)), row_cores


def mixed_epilogue(y0: torch.Tensor | None, x: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, tables: RowTables, scaling: float,
                   rows: torch.Tensor, *, own_y0: bool = False,
                   weight: torch.Tensor | None = None, base_rows: bool = True) -> torch.Tensor:
    """``y`` for a batch whose leading row i (``x[i]``, all its tokens) uses row ``rows[i]`` of
    the ``tables`` (on x's device; the last row runs the base alone: ``y0``, bit for bit).
    ``y0 = base(x)`` (bias included), or None with the dense base's ``weight``: then the base
    product is made here (and owned). ``own_y0``: nobody else holds ``y0``, so a served batch
    adds the rank-r term into it in place. ``base_rows``: some rows run the base model.

    ``g ⊙ (y0 − b + s·t Bᵀ) + b`` is computed as ``g ⊙ (y0 + s·t Bᵀ) + (1 − g) ⊙ b``: one
    pass over batch×out fewer, and a base row (t = 0, g = 1) adds exact zeros, so it is y0 as
    the base computes it (``F.linear`` with its bias). A base product made here without base
    rows leaves the bias to the epilogue instead: ``y = g ⊙ (x W0ᵀ + s·t Bᵀ) + b``. With
    gradients it is one autograd node (:class:`_MixedEpilogue`), whose backward gives y0 (so the
    base's dx; with ``weight``, dx itself), x, the cores and the g table theirs: each adapter's
    rows reach only its table rows."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (y0, x, *tables)):
        y = _MixedEpilogue.apply(y0, x, weight, bias, A, B, tables.cores, tables.g, rows,
                                 scaling, base_rows)
        return y.view(*x.shape[:-1], y.shape[-1])  # (a view made inside would be read-only)
    biased = True  # whether z carries the bias
    if y0 is None:
        y0, own_y0, biased = F.linear(x, weight, bias if base_rows else None), True, base_rows
    z, g_rows = _rank_term(y0, x, A, B, tables.cores, tables.g, rows, scaling, own_y0)[2:]
    z = _rescale(z.view(x.shape[0], -1, z.shape[-1]), g_rows, bias, biased)
    return z.to(y0.dtype).reshape(y0.shape)


def _rescale(z, g_rows, bias, biased: bool) -> torch.Tensor:
    """``g ⊙ z + b``, or ``g ⊙ z + (1 − g) ⊙ b`` when z carries the bias (``biased``), into z
    itself: computed in g's dtype (the compute dtype: g is never rounded to a half z's) and
    rounded once to z's."""
    if bias is None:
        return torch.mul(z, g_rows, out=z)
    b = bias.to(g_rows.dtype)
    if biased:
        b = torch.addcmul(b, g_rows, b, value=-1)
    return torch.addcmul(b, g_rows, z, out=z)


def _rank_term(y0, x, A, B, cores, g_table, rows, scaling, own_y0, *, in_y0_dtype=False):
    """``(v, row_cores, z, g_rows)``: v = x Aᵀ, each row's core, ``z = y0 + s·t Bᵀ``
    (N×out; into y0 itself if ``own_y0``) and each row's g (batch×1×out). z is formed in
    the compute dtype (a copy of a half y0), or with ``in_y0_dtype`` in y0's own, rounded once
    as the single-adapter step does: what a training step keeps. The shared B makes ``t Bᵀ``
    one GEMM over all tokens; only ``t`` is per row."""
    cdt = compute_dtype(y0.dtype)
    v, t, row_cores = _row_core_terms(x, A, cores, rows, cdt)
    z = y0.flatten(0, -2)  # y0 itself when it is N×out already
    if not in_y0_dtype:
        own_y0 = own_y0 or z.dtype != cdt  # .to(cdt) below copies
        z = z.to(cdt)
    t2, Bt = t.reshape(-1, t.shape[-1]).to(z.dtype), B.to(z.dtype).T
    z = z.addmm_(t2, Bt, alpha=scaling) if own_y0 else torch.addmm(z, t2, Bt, alpha=scaling)
    return v, row_cores, z, g_table.index_select(0, rows)[:, None]


def _table_map(rows: torch.Tensor, table_rows: int, dtype) -> torch.Tensor:
    """The one-hot map (table rows × batch) of each batch row's table row: a product with it
    sums each table row's share over the batch rows that use it — deterministic on every device
    (an index_add adds with atomics on a GPU), one adapter's rows added in batch order."""
    table = torch.arange(table_rows, device=rows.device).unsqueeze(1)
    return (rows.unsqueeze(0) == table).to(dtype)


def _per_table_row(table_map: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """Each table row's sum of ``per_row`` (batch×...) by :func:`_table_map`."""
    flat = per_row.reshape(per_row.shape[0], -1)
    return (table_map @ flat).view(table_map.shape[0], *per_row.shape[1:])


class _MixedEpilogue(torch.autograd.Function):
    """:func:`mixed_epilogue` with gradients, as one node: backward streams gy twice (gz =
    gy ⊙ g for y0, and each row's Σ gy ⊙ (y − b) for g) and otherwise runs rank-r products;
    each row's share of the cores and of g is summed into its table row (one one-hot map).
    Given the dense base's ``weight`` instead of y0, it also runs the base product: y0 is its
    own buffer (the rank-r term and g go in place) and dx = gz W0 + dv A is one GEMM pair.

    It keeps y, the output, as the single-adapter op does, and no N×out tensor beside it:
    ∂y/∂g = (y − b)/g, so each table row's Σ gy ⊙ (y − b) is divided by its g once. Where g is
    0, y = b keeps no trace of z: forward keeps those columns of z in slots (docs/DESIGN.md §3),
    up to as many as the table has zeros on a CPU, ``ZERO_SLOTS`` per table row elsewhere (no
    host read), and a zero past them gets a NaN gradient, never a silently wrong one."""

    @staticmethod
    def forward(ctx, y0, x, weight, bias, A, B, cores, g_table, rows, scaling, base_rows):
        own, biased = y0 is None, True
        if own:  # over N rows: the N×out product is its own tensor (not a view of one)
            y0 = F.linear(x.flatten(0, -2), weight, bias if base_rows else None)
            biased = base_rows
        # z (N×out) in y0's dtype, our own buffer (y0 when we made it), and y is written over
        # it: the output is that buffer itself, so the caller's view of it may be written in
        # place (which backward then refuses, as it reads y); v in the compute dtype
        v, row_cores, z, g_rows = _rank_term(y0, x, A, B, cores, g_table, rows, scaling, own,
                                             in_y0_dtype=True)
        rows_z = z.view(x.shape[0], -1, z.shape[-1])
        slot_cols, row_cols, zbuf = _keep_zero_g_columns(rows_z, g_table, rows)
        _rescale(rows_z, g_rows, bias, biased)
        # the rows' gathers are kept (batch×r×r and batch×out), not redone; x is not (only
        # v = x Aᵀ, N×r, as one adapter's step keeps)
        ctx.save_for_backward(weight, bias, A, B, row_cores, g_table, g_rows, rows, v, z,
                              slot_cols, row_cols, zbuf)
        ctx.scaling, ctx.biased, ctx.cores_dtype = scaling, biased, cores.dtype
        ctx.y0_shape, ctx.x_shape, ctx.x_dtype = y0.shape, x.shape, x.dtype
        return z

    @staticmethod
    def backward(ctx, gy):
        (weight, bias, A, B, row_cores, g_table, g_rows, rows, v, y, slot_cols, row_cols,
         zbuf) = saved_tensors(ctx, "an EDoRA layer's mixed batch (adapter_names=)")
        batch, cdt, out_features = v.shape[0], v.dtype, y.shape[-1]
        x_dtype = ctx.x_dtype
        # contiguous: the products below flatten it (a gradient may arrive permuted, as the
        # attention heads reshape their projections)
        gy = gy.reshape(batch, -1, out_features).to(cdt).contiguous()
        d_g, gz = None, None
        if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
            table_map = _table_map(rows, len(g_table), cdt)
        if ctx.needs_input_grad[7]:  # ∂y/∂g = (y − b)/g, (z − b) or z from the slots where g = 0
            product = gy * y.view(batch, -1, out_features)  # (a half y is promoted as read)
            per_row = product.sum(1)
            if bias is not None:
                per_row -= bias.to(cdt) * gy.sum(1)
            with cpu_threads_for(table_map.numel() * out_features):
                d_g = _per_table_row(table_map, per_row) / g_table
                if zbuf.numel():
                    d_g = _zero_g_gradients(d_g, gy, zbuf, slot_cols, row_cols, g_table,
                                            table_map, bias if ctx.biased else None)
            d_g = d_g.to(g_table.dtype)
            gz = torch.mul(gy, g_rows, out=product)  # its buffer again: one N×out fewer
        if gz is None:
            gz = gy * g_rows
        # dt = gz (s·B) over all tokens at once (B is shared); batch×T×r
        gz2 = gz.view(-1, out_features)
        dt = torch.mm(gz2, B.to(cdt) * ctx.scaling).view(batch, -1, B.shape[1])
        d_cores = dx = dv = None
        # the per-row r×r products (N·r² multiply-adds each) and their per-table sums
        with cpu_threads_for(dt.numel() * dt.shape[-1] + len(g_table) * row_cores.numel()):
            if ctx.needs_input_grad[6]:
                d_cores = _per_table_row(table_map, torch.bmm(dt.transpose(1, 2), v))
                d_cores = d_cores.to(ctx.cores_dtype)
            if ctx.needs_input_grad[1]:
                dv = torch.bmm(dt, row_cores).view(-1, A.shape[0])
        if ctx.needs_input_grad[1]:
            if weight is None:
                dx = (dv @ A.to(cdt)).to(x_dtype)
            else:  # the base's dx and the rank-r one, accumulated in one buffer (as the
                # single-adapter step does, in x's dtype)
                dx = torch.mm(gz2.to(x_dtype), weight).addmm_(dv.to(x_dtype), A.to(x_dtype))
            dx = dx.reshape(ctx.x_shape)
        d_y0 = None
        if ctx.needs_input_grad[0]:
            d_y0 = gz.to(y.dtype).reshape(ctx.y0_shape)
        return d_y0, dx, None, None, None, None, d_cores, d_g, None, None, None


def _keep_zero_g_columns(z: torch.Tensor, g_table: torch.Tensor, rows: torch.Tensor):
    """``(slot_cols, row_cols, zbuf)``: per table row its first columns where g = 0, in column
    order (table rows × capacity, ``out`` where unused); each leading row's slot columns
    (batch×capacity, unused ones clamped into range) and its z there (batch×T×capacity); all
    empty when nothing is kept. The capacity is
    :func:`~edora_kernels.op_common.slot_capacity`'s for the composed path."""
    out_features = g_table.shape[1]
    capacity = min(slot_capacity(g_table, True, CPU_BACKEND), out_features)
    if capacity == 0:
        empty = g_table.new_empty(0, dtype=torch.long)
        return empty, empty, z.new_empty(0)
    # a stable sort of "g ≠ 0" puts each row's zero columns first, in column order
    first = torch.sort((g_table != 0).to(torch.uint8), dim=1, stable=True).indices[:, :capacity]
    slot_cols = torch.where(g_table.gather(1, first) == 0, first, out_features)
    row_cols = slot_cols.index_select(0, rows).clamp_max(out_features - 1)
    return slot_cols, row_cols, z.gather(2, _over_tokens(row_cols, z))


def _over_tokens(row_cols: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Each leading row's columns ``row_cols`` (batch×k) over the tokens of ``like``
    (batch×T×...), to gather those columns of z or gy."""
    return row_cols.unsqueeze(1).expand(like.shape[0], like.shape[1], -1)


def _zero_g_gradients(d_g, gy, zbuf, slot_cols, row_cols, g_table, table_map, bias):
    """``d_g`` with its g = 0 entries from the kept columns: each table row's Σ gy ⊙ (z − b)
    (``bias`` when z carries it) over its rows, NaN for a zero that had no slot."""
    u = zbuf.to(d_g.dtype)
    if bias is not None:
        u = u - bias.to(d_g.dtype).take(row_cols).unsqueeze(1)
    sums = _per_table_row(table_map,
                          torch.linalg.vecdot(gy.gather(2, _over_tokens(row_cols, gy)), u, dim=1))
    kept = torch.full((len(g_table), g_table.shape[1] + 1), torch.nan, dtype=d_g.dtype,
                      device=d_g.device).scatter_(1, slot_cols, sums)[:, :-1]
    return torch.where(g_table == 0, kept, d_g)


class KernelTables(NamedTuple):
    """The adapters of a mixed Triton training step, whose tables the kernels form themselves
    (:func:`mixed_on_triton`): each one's R (``cores``) and m (``magnitudes``), the layer's
    float64 norm terms for its basis, and whether the tables end with the base model's row."""

    cores: tuple
    magnitudes: tuple
    terms: NormTerms
    base_row: bool


def mixed_on_triton(x: torch.Tensor, y0: torch.Tensor | None, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                    adapters: RowTables | KernelTables, scaling: float, rows: torch.Tensor,
                    g_rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The mixed batch of :func:`mixed_epilogue` on the Triton kernels: one prologue launch
    (v = x Aᵀ, each token's t, s·B; given :class:`KernelTables`, the tables and norms too),
    then the forward GEMM on ``weight`` (a dense base) or the epilogue pass over ``y0`` (any
    other base); ``rows``: each leading row's row of the tables (int64), ``g_rows`` each
    token's (int32, contiguous), ``order`` the leading rows of each table row (int32, from
    :meth:`RowAssignment.table_order`). With gradients one autograd node (:class:`_MixedOnTriton`)
    whose backward is the Triton pre-pass, dx GEMM and finalize, each adapter's rows reaching
    only its own R and m (or table rows)."""
    if isinstance(adapters, KernelTables):
        weights = (*adapters.cores, *adapters.magnitudes)
        terms, base_row = adapters.terms, adapters.base_row
    else:
        weights, terms, base_row = tuple(adapters), None, None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, y0, *weights)):
        y = _MixedOnTriton.apply(x, y0, weight, bias, A, B, scaling, rows, g_rows, order,
                                 terms, base_row, *weights)
    else:
        y = _triton_forward(x, y0, weight, bias, A, B, scaling, rows, g_rows,
                            _kernel_inputs(terms, base_row, weights), train=False)[0]
    return y.view(*x.shape[:-1], y.shape[-1])  # (a view made inside would be read-only)


def _kernel_inputs(terms, base_row, weights) -> dict:
    """The prologue's keyword for the adapters: their R and m stacked (``gate``) when the
    kernels form the tables, else the tables themselves."""
    from .backends.triton.mixed import AdapterStack

    if terms is None:
        return {"tables": weights}
    K = len(weights) // 2
    return {"gate": AdapterStack(torch.stack(weights[:K]), torch.stack(weights[K:]), terms,
                                 base_row)}


def _triton_forward(x, y0, weight, bias, A, B, scaling, rows, g_rows, adapters: dict, train):
    """``(y, prologue)`` of :func:`mixed_on_triton`: y (tokens × out) and what the prologue
    made (:class:`~edora_kernels.backends.triton.mixed.Prologue`; for a training step the
    zero-g columns' slots too)."""
    from .backends.triton import mixed as kernels

    flat = x.reshape(-1, x.shape[-1])
    like = flat if y0 is None else y0.reshape(-1, y0.shape[-1])
    # ZERO_SLOTS columns keep z: the kernels never read a count of zeros on the host
    capacity = min(slot_capacity(B, True, "triton"), B.shape[0]) if train else 0
    pro = kernels.mixed_prologue(flat, A, B, rows, scaling, like, capacity=capacity, **adapters)
    if y0 is None:
        y = kernels.mixed_forward(flat, weight, bias, pro, g_rows)
    else:
        y = kernels.mixed_epilogue_forward(like, bias, pro, g_rows)
    return y, pro


class _MixedOnTriton(torch.autograd.Function):
    """:func:`mixed_on_triton` with gradients. Forward keeps y (its output), v, the tables (and
    the norms) and the zero-g columns of z, as the single-adapter step does; backward runs the
    pre-pass (gz = gy ⊙ g, u = dv, each block's tᵀv and Σ gy ⊙ (y − b)), on a dense base the
    dx GEMM, and the finalize."""

    @staticmethod
    def forward(ctx, x, y0, weight, bias, A, B, scaling, rows, g_rows, order, terms, base_row,
                *weights):
        adapters = _kernel_inputs(terms, base_row, weights)
        y, pro = _triton_forward(x, y0, weight, bias, A, B, scaling, rows, g_rows, adapters,
                                 train=True)
        ms = adapters["gate"].ms if terms is not None else None
        ctx.save_for_backward(weight, bias, A, B, pro.cores, pro.g, pro.n, ms, rows, g_rows,
                              order, pro.v, y, *pro.slots)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        ctx.y0_shape = None if y0 is None else y0.shape
        ctx.adapters = len(weights) // 2 if terms is not None else None
        ctx.dR_dtype = weights[0].dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        from .backends.triton.mixed import ZeroSlots, mixed_backward

        (weight, bias, A, B, cores, g_table, n, ms, rows, g_rows, order, v, y,
         *slots) = saved_tensors(ctx, "an EDoRA layer's mixed batch (adapter_names=)")
        need, first = ctx.needs_input_grad, 12  # the adapters' tensors from here on
        K = ctx.adapters
        need_cores, need_g = ((any(need[first:first + K]), any(need[first + K:]))
                              if K is not None else need[first:first + 2])
        dy0, dx, d_cores, d_g = mixed_backward(
            gy.reshape(y.shape).to(y.dtype).contiguous(), y, weight, bias, A, B, cores,
            g_table, n, ms, ZeroSlots(slots), v, rows, g_rows, order, ctx.scaling,
            need_dy0=need[1],
            need_dx=need[0], need_cores=need_cores, need_g=need_g, dR_dtype=ctx.dR_dtype)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        if dy0 is not None:
            dy0 = dy0.reshape(ctx.y0_shape)
        if K is None:
            grads = (d_cores, d_g)
        else:  # each adapter's own R and m
            grads = (*(d_cores.unbind(0) if need_cores else (None,) * K),
                     *(d_g.unbind(0) if need_g else (None,) * K))
        return dx, dy0, *(None,) * (first - 2), *grads


def row_indices(adapter_names, known: list[str], batch: int) -> torch.Tensor:
    """The index of each row's adapter in ``known`` (``len(known)`` for ``BASE_NAME``), or a
    ValueError naming the unknown names or the length mismatch."""
    names = list(adapter_names)
    if len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows; "
                         "give one name per row")
    position = {name: i for i, name in enumerate(known)}
    position[BASE_NAME] = len(known)
    unknown = sorted({n for n in names if n not in position}, key=str)
    if unknown:
        raise ValueError(f"adapter_names holds {unknown}, not adapters of this model "
                         f"(its adapters: {known}; {BASE_NAME!r} runs the base model)")
    return torch.tensor([position[n] for n in names], dtype=torch.long)
