"""The naive EDoRA formulation, exactly as the paper's code computes it: the oracle.

It builds the dense ``V = W0 + s·B R A`` every call, takes its row norm, and leaves the rest to
plain autograd. Every backend is tested against it; the benchmark uses it as "the paper's naive
formulation". It computes in the input dtype, as the paper's code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def edora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    detach_norm: bool = True,
) -> torch.Tensor:
    """``y = m/‖W0 + s·BRA‖_row ⊙ (x W0ᵀ + s·x Aᵀ Rᵀ Bᵀ) + b`` with PEFT's dropout semantics.

    With ``dropout > 0`` (always applied, as ``F.dropout(training=True)``) and ``x̃ = dropout(x)``:
    ``y = x W0ᵀ + b + (g − 1)⊙(x̃ W0ᵀ) + g⊙s·(x̃ Aᵀ Rᵀ Bᵀ)``.
    """
    dtype = x.dtype
    A, B, R, magnitude = (t.to(dtype) for t in (A, B, R, magnitude))
    delta = scaling * (B @ R @ A)
    norm = torch.linalg.vector_norm(weight + delta, dim=1)
    if detach_norm:
        norm = norm.detach()
    g = magnitude / norm
    lora = lambda inp: scaling * F.linear(F.linear(F.linear(inp, A), R), B)  # noqa: E731
    if dropout == 0.0:
        return g * (F.linear(x, weight) + lora(x)) + (0 if bias is None else bias)
    x_drop = F.dropout(x, p=dropout, training=True)
    base = F.linear(x, weight, bias)
    return base + (g - 1) * F.linear(x_drop, weight) + g * lora(x_drop)
