"""Shared test set-up and fixtures; helper functions live in tests/helpers.py.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, so it is set here, first. On a
machine with a CUDA device the kernels compile for real and the GPU-marked tests run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def interpreter_bf16_dot():
    """Test-only shim: the interpreter's tl.dot multiplies bf16 bit patterns as integers
    (triton-lang/triton#11584). Upcast bf16 operands to fp32 there; the kernels stay untouched."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    original = InterpreterBuilder.create_dot

    def as_float32(handle):
        return (handle.data.astype(np.uint32) << 16).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(as_float32(a), as_float32(b), dtype=d.data.dtype)
        return TensorHandle(product + d.data, d.dtype.scalar)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", create_dot)
        yield
