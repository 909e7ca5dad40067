"""Helpers shared by the tests: the tolerance check, gradients of a fixed gy, GPU skips.

Problems come from the project's one builder, ``edora_kernels.testing.make_case``.
"""
from __future__ import annotations

import pytest
import torch

from edora_kernels.reference import edora_linear_reference
from edora_kernels.tolerances import TOLERANCE, normalised_error

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``, by the one table
    (edora_kernels.tolerances)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = normalised_error(actual, expected)  # NaN when finiteness differs
    assert err <= TOLERANCE[dtype], (
        f"{what}: normalised error {err:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})")


def as_float64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


TRAINABLE = ("x", "R", "magnitude")


def run_with_grads(fn, args, gy_seed=1, **kwargs):
    """``fn(**args)`` with x, R, magnitude requiring grad; y and their grads for a fixed gy."""
    args = {k: (v.detach().clone().requires_grad_(k in TRAINABLE) if isinstance(v, torch.Tensor)
                else v) for k, v in args.items()}
    y = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [args[k] for k in TRAINABLE], gy, allow_unused=True)
    return y.detach(), dict(zip(TRAINABLE, grads))


def reference_with_grads(args, **kwargs):
    return run_with_grads(edora_linear_reference, as_float64(args), **kwargs)
