"""Shared test set-up: the Triton interpreter on CPU-only machines, the tolerance check.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, so it is set here, first. On a
machine with a CUDA device the kernels compile for real and the GPU-marked tests run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from edora_kernels.tolerances import TOLERANCE, normalised_error  # noqa: E402  (the one table)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``, by the one table
    (edora_kernels.tolerances)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = normalised_error(actual, expected)  # NaN when finiteness differs
    assert err <= TOLERANCE[dtype], (
        f"{what}: normalised error {err:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
