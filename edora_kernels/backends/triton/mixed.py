"""Serving a batch that mixes adapters with the Triton kernels (docs/DESIGN.md §13): the same
forward GEMM — or, for a quantized base, the same pass over its y0 — with each token's g taken
from a table of one row per adapter. One launch; W0 read once, however many adapters."""
from __future__ import annotations

import torch

from .configs import tiles_grid
from .epilogue_only import edora_epilogue_kernel, epilogue_args
from .fwd import edora_fwd_kernel, fwd_args, fwd_grid
from .launch import launch


def mixed_forward(x, weight, bias, t, sB, g_table, g_rows) -> torch.Tensor:
    """``y = g_table[g_rows] ⊙ (x W0ᵀ + t (sB)ᵀ) + b``: x (M×in), t = each token's core applied
    to x Aᵀ (M×r), sB = s·B (out×r, x's dtype), g_table (adapters×out, fp32), g_rows (M, int32)."""
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty(M, N)
    if M > 0:
        args = fwd_args(x, weight, bias, t, sB, g_table, None, y, x.new_empty(M, 0), g_rows)
        launch(edora_fwd_kernel, fwd_grid(args), **args)
    return y


def mixed_epilogue_forward(y0, bias, t, sB, g_table, g_rows) -> torch.Tensor:
    """As :func:`mixed_forward` on a base layer's own output ``y0 = base(x)`` (bias included)."""
    M, N = y0.shape
    y = y0.new_empty(M, N)
    if M > 0:
        launch(edora_epilogue_kernel, tiles_grid(M, N),
               **epilogue_args(y0, t, bias, sB, g_table, None, y, y0.new_empty(M, 0),
                               g_rows=g_rows))
    return y
