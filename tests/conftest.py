"""Shared test set-up: the Triton interpreter on CPU-only machines, the one tolerance table.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, so it is set here, first. On a
machine with a CUDA device the kernels compile for real and the GPU-marked tests run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
    actual, expected = actual.double(), expected.double()
    if expected.numel() == 0:
        return 0.0
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``, by the table above."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: finiteness"
    err = normalised_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: normalised error {err:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
