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
    """Test-only shim for two bf16 defects of the interpreter, so that it computes what a GPU
    does; the kernels stay untouched:

    - its tl.dot multiplies bf16 bit patterns as integers (triton-lang/triton#11584): bf16
      operands are upcast to fp32 there;
    - its fp32 → bf16 casts truncate, where a GPU rounds to the nearest even (twice the
      rounding error of every bf16 store): they round to nearest even here too."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    original_dot, original_cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def as_float32(handle):
        return (handle.data.astype(np.uint32) << 16).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(as_float32(a), as_float32(b), dtype=d.data.dtype)
        return TensorHandle(product + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return original_cast(self, src, dst_type)
        data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", create_dot)
        mp.setattr(InterpreterBuilder, "cast_impl", cast_impl)
        yield
