"""The one tolerance table: how far a result computed in a dtype may sit from the float64 answer.

Used by the tests, ``edora-kernels check`` and the benchmark's error column, so that "correct"
means the same thing everywhere.
"""
from __future__ import annotations

import torch

# Normalised max error, max|actual − expected| / max(1, max|expected|), allowed per dtype of the
# computation. ``expected`` is always the float64 reference, so the bound covers the rounding of
# inputs, accumulation and output in that dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def normalised_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max(1, max|expected|), in float64; NaN where finiteness differs."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    if not torch.equal(torch.isfinite(actual), torch.isfinite(expected)):
        return float("nan")
    finite = torch.isfinite(expected)
    diff = (actual - expected)[finite].abs()
    if diff.numel() == 0:
        return 0.0
    return (diff.max() / expected[finite].abs().max().clamp_min(1.0)).item()


def within_tolerance(error: float, dtype: torch.dtype) -> bool:
    """False for NaN (a finiteness mismatch) as well as for errors above the table's bound."""
    return error <= TOLERANCE[dtype]
