"""A batch whose rows use different adapters of one layer, in one pass (docs/DESIGN.md §13).

The adapters of a layer share its basis (A, B) and differ only in R and m, so a mixed batch
costs what one adapter costs plus a per-row r×r product and a per-row gather of g:

    y0 = base(x)                  once for the whole batch (one read of W0)
    v  = x Aᵀ                     once (N×r)
    t_i = R_{a(i)} v_i            per row: its adapter's core
    z  = y0 − b + s·t Bᵀ          one GEMM with the shared B
    y_i = g_{a(i)} ⊙ z_i + b      g_a = m_a / ‖W0 + s·B R_a A‖, every adapter's norm at once

and rows of the base model (``BASE_ROW``) are ``y0`` itself, bit for bit. It is written in
differentiable torch ops: backward gives each adapter's R and m the gradient of its own rows
only, and reads W0 once more (dx), however many adapters the batch holds.
"""
from __future__ import annotations

import torch

from .norm import TERMS_DTYPE, compute_dtype

# The name PEFT uses for a row that runs the base model alone.
BASE_NAME = "__base__"


def _row_terms(x, A, cores, ms, norms, idx, cdt) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (batch×T×r): each leading row's core ``cores[idx[i]]`` applied to its x·Aᵀ; and
    ``g = m / n`` per adapter (K×out), in ``cdt``."""
    v = x.reshape(x.shape[0], -1, x.shape[-1]).to(cdt) @ A.to(cdt).T        # batch×T×r
    t = torch.bmm(v, cores.to(cdt)[idx].transpose(1, 2))
    return t, (ms.to(TERMS_DTYPE) / norms).to(cdt)


def mixed_epilogue(y0: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, Rs: torch.Tensor, ms: torch.Tensor,
                   scaling: float, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``y`` for a batch whose leading row i (``x[i]``, all its tokens) uses adapter
    ``rows[i]``: a core of ``Rs`` (K×r×r) and a magnitude of ``ms`` (K×out); ``rows[i] == K``
    runs the base alone (``y0``, untouched). ``y0 = base(x)`` (bias included), ``norms`` the
    adapters' row norms ‖W0 + s·B R_a A‖ (K×out, float64: ``row_norm`` of the stacked B R_a).
    ``rows`` stays on the host (whether base rows exist is read there)."""
    batch, out_features, K = x.shape[0], y0.shape[-1], Rs.shape[0]
    cdt = compute_dtype(y0.dtype)
    has_base_rows = bool((rows >= K).any())
    idx = rows.clamp_max(K - 1).to(x.device)
    y0_rows = y0.reshape(batch, -1, out_features)
    t, g = _row_terms(x, A, Rs, ms, norms, idx, cdt)
    base = y0_rows.to(cdt) if bias is None else y0_rows.to(cdt) - bias.to(cdt)
    z = torch.baddbmm(base, t, B.to(cdt).T.expand(batch, -1, -1), alpha=scaling)
    g_rows = g[idx].unsqueeze(1)
    if torch.is_grad_enabled():
        y = g_rows * z if bias is None else torch.addcmul(bias.to(cdt), g_rows, z)
    else:  # serving: in place, no temporaries
        y = z.mul_(g_rows) if bias is None else z.mul_(g_rows).add_(bias.to(cdt))
    y = y.to(y0.dtype)
    if has_base_rows:
        y = torch.where((rows >= K).to(x.device).view(batch, 1, 1), y0_rows, y)
    return y.reshape(y0.shape)


def serve_mixed(x: torch.Tensor, y0: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, Rs: torch.Tensor,
                ms: torch.Tensor, scaling: float, rows: torch.Tensor,
                norms: torch.Tensor) -> torch.Tensor:
    """The mixed batch of :func:`mixed_epilogue` (no autograd) on the Triton kernels: the
    forward GEMM on ``weight`` (a dense base), or the epilogue pass over ``y0`` (any other
    base). Rows of the base model get the table row g = 1 and t = 0."""
    from .backends.triton.mixed import mixed_epilogue_forward, mixed_forward

    batch, cdt = x.shape[0], compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0] // max(batch, 1)
    cores = torch.cat([Rs, Rs.new_zeros(1, *Rs.shape[1:])])                  # + the base's
    idx = rows.to(x.device)
    t, g = _row_terms(x, A, cores, ms, norms, idx, cdt)
    t = t.reshape(-1, Rs.shape[-1])
    g_table = torch.cat([g, g.new_ones(1, g.shape[1])])                       # (K+1)×out
    g_rows = idx.to(torch.int32).repeat_interleave(tokens)
    sB = (scaling * B.to(cdt)).to(x.dtype)
    if y0 is None:
        y = mixed_forward(x2, weight, bias, t, sB, g_table, g_rows)
    else:
        y = mixed_epilogue_forward(y0.reshape(-1, y0.shape[-1]), bias, t, sB, g_table, g_rows)
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
