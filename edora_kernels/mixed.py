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
gradients the epilogue is one autograd node: backward gives each adapter's R and m the gradient
of its own rows only, and the base reads W0 once more (dx), however many adapters the batch
holds. Without them a Triton layer serves the batch in its fused kernels (:func:`serve_mixed`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .backends.torch_backend import mm_compute
from .norm import TERMS_DTYPE, compute_dtype

# The name PEFT uses for a row that runs the base model alone.
BASE_NAME = "__base__"


class RowAssignment:
    """Each leading row's adapter index for one forward (``adapter_names=``), shared by every
    layer and head of the model. The host's copy (``values``) decides which adapters take part
    and which rows each takes, with no device sync; the index tensors the layers need on the
    device are made once per forward — from pinned memory, without blocking — and reused by
    every layer after the first."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.values: list[int] = rows.tolist()
        self._on_device: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.values)

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


def as_assignment(rows) -> RowAssignment:
    """``rows`` (a host tensor of adapter indices, or a RowAssignment already) as one."""
    return rows if isinstance(rows, RowAssignment) else RowAssignment(rows)


class RowTables(NamedTuple):
    """The per-adapter tables a mixed batch gathers from: ``cores`` (K+1)×r×r and ``g``
    (K+1)×out in the compute dtype. Row K serves the base model's rows: core 0, g = 1, so that
    they come out as ``y0`` itself."""

    cores: torch.Tensor
    g: torch.Tensor


def row_tables(Rs: torch.Tensor, ms: torch.Tensor, norms: torch.Tensor, cdt) -> RowTables:
    """The tables of K adapters: their cores ``Rs`` (K×r×r) and ``g = ms / norms`` (K×out;
    ``norms`` float64), each with the base model's row appended; differentiable in Rs and ms."""
    cores = torch.cat([Rs.to(cdt), Rs.new_zeros(1, *Rs.shape[1:], dtype=cdt)])
    g = (ms.to(TERMS_DTYPE) / norms).to(cdt)
    return RowTables(cores, torch.cat([g, g.new_ones(1, g.shape[1])]))


def _row_core_terms(x, A, cores, rows, cdt) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, t)``: v = x·Aᵀ (batch×T×r, in ``cdt``: a half x is read once by a GEMM with an
    fp32 result on a GPU, not converted first) and t, each leading row's core
    ``cores[rows[i]]`` applied to its v. No autograd: :class:`_MixedEpilogue` differentiates."""
    v = mm_compute(x.reshape(-1, x.shape[-1]), A.T, cdt).view(x.shape[0], -1, A.shape[0])
    return v, torch.bmm(v, cores[rows].transpose(1, 2))


def mixed_epilogue(y0: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, tables: RowTables, scaling: float,
                   rows: torch.Tensor, *, own_y0: bool = False) -> torch.Tensor:
    """``y`` for a batch whose leading row i (``x[i]``, all its tokens) uses row ``rows[i]`` of
    the ``tables`` (on x's device; the last row runs the base alone: ``y0``, bit for bit).
    ``y0 = base(x)`` (bias included). ``own_y0``: nobody else holds ``y0``, so a served batch
    adds the rank-r term into it in place.

    ``g ⊙ (y0 − b + s·t Bᵀ) + b`` is computed as ``g ⊙ (y0 + s·t Bᵀ) + (1 − g) ⊙ b``: one
    pass over batch×out fewer, and a base row (t = 0, g = 1) adds exact zeros. With gradients
    it is one autograd node (:class:`_MixedEpilogue`), whose backward gives y0 (so the base's
    dx), x, the cores and the g table theirs: each adapter's rows reach only its table rows."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y0, x, *tables)):
        return _MixedEpilogue.apply(y0, x, bias, A, B, tables.cores, tables.g, rows, scaling)
    z, g_rows = _rank_term(y0, x, A, B, tables.cores, tables.g, rows, scaling, own_y0)[1:]
    y = z.mul_(g_rows) if bias is None else z.mul_(g_rows).add_((1 - g_rows) * bias.to(z.dtype))
    return y.to(y0.dtype).reshape(y0.shape)


def _rank_term(y0, x, A, B, cores, g_table, rows, scaling, own_y0):
    """``(v, z, g_rows)``: v = x Aᵀ, ``z = y0 + s·t Bᵀ`` (batch×T×out in the compute dtype;
    into y0 itself if ``own_y0`` or y0 had to be converted) and each row's g (batch×1×out)."""
    batch, out_features = x.shape[0], y0.shape[-1]
    cdt = compute_dtype(y0.dtype)
    v, t = _row_core_terms(x, A, cores, rows, cdt)
    z = y0.reshape(batch, -1, out_features)
    own = own_y0 or z.dtype != cdt  # .to(cdt) below copies
    z = z.to(cdt)
    Bt = B.to(cdt).T.expand(batch, -1, -1)
    z = z.baddbmm_(t, Bt, alpha=scaling) if own else torch.baddbmm(z, t, Bt, alpha=scaling)
    return v, z, g_table[rows].unsqueeze(1)


class _MixedEpilogue(torch.autograd.Function):
    """:func:`mixed_epilogue` with gradients, as one node: backward streams gy twice (gz =
    gy ⊙ g for y0, and each row's Σ gy ⊙ (z − b) for g) and otherwise runs rank-r products;
    each row's share of the cores and of g is added to its table row (``index_add``)."""

    @staticmethod
    def forward(ctx, y0, x, bias, A, B, cores, g_table, rows, scaling):
        v, z, g_rows = _rank_term(y0, x, A, B, cores, g_table, rows, scaling, False)
        if bias is None:
            y = g_rows * z
        else:
            y = torch.addcmul((1 - g_rows) * bias.to(z.dtype), g_rows, z)
        # z kept in y's dtype (as the single-adapter op keeps y); v in the compute dtype
        ctx.save_for_backward(x, bias, A, B, cores, g_table, rows, v, z.to(y0.dtype))
        ctx.scaling, ctx.y0_shape = scaling, y0.shape
        return y.to(y0.dtype).reshape(y0.shape)

    @staticmethod
    def backward(ctx, gy):
        x, bias, A, B, cores, g_table, rows, v, z = ctx.saved_tensors
        batch, cdt = x.shape[0], v.dtype
        gy = gy.reshape(batch, -1, gy.shape[-1]).to(cdt)
        g_rows = g_table[rows].unsqueeze(1)
        gz = gy * g_rows
        d_g = None
        if ctx.needs_input_grad[6]:  # ∂y/∂g = z − b
            per_row = (gy * z).sum(1)
            if bias is not None:
                per_row -= bias.to(cdt) * gy.sum(1)
            d_g = torch.zeros_like(g_table).index_add_(0, rows, per_row.to(g_table.dtype))
        dt = torch.bmm(gz, B.to(cdt).expand(batch, -1, -1)) * ctx.scaling     # batch×T×r
        d_cores = dx = None
        if ctx.needs_input_grad[5]:
            d_cores = torch.zeros_like(cores).index_add_(
                0, rows, torch.bmm(dt.transpose(1, 2), v).to(cores.dtype))
        if ctx.needs_input_grad[1]:
            dv = torch.bmm(dt, cores[rows])
            dx = (dv.reshape(-1, dv.shape[-1]) @ A.to(cdt)).to(x.dtype).reshape(x.shape)
        d_y0 = gz.to(z.dtype).reshape(ctx.y0_shape) if ctx.needs_input_grad[0] else None
        return d_y0, dx, None, None, None, d_cores, d_g, None, None


def serve_mixed(x: torch.Tensor, y0: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, tables: RowTables,
                scaling: float, rows: torch.Tensor, g_rows: torch.Tensor) -> torch.Tensor:
    """The mixed batch of :func:`mixed_epilogue` (no autograd) on the Triton kernels: the
    forward GEMM on ``weight`` (a dense base), or the epilogue pass over ``y0`` (any other
    base). ``g_rows``: each token's row of the tables (int32, contiguous)."""
    from .backends.triton.mixed import mixed_epilogue_forward, mixed_forward

    cdt = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    t = _row_core_terms(x, A, tables.cores, rows, cdt)[1].reshape(-1, tables.cores.shape[-1])
    sB = B.to(x.dtype) * scaling  # one rounding of s·B to x's dtype, as (s·B).to(x.dtype)
    if y0 is None:
        y = mixed_forward(x2, weight, bias, t, sB, tables.g, g_rows)
    else:
        y = mixed_epilogue_forward(y0.reshape(-1, y0.shape[-1]), bias, t, sB, tables.g, g_rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


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
