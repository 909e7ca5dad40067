"""Every Triton launch of the backend goes through :func:`launch`: one place where the launches
of a step can be counted, or replaced by no-ops to measure the host's share of a step
(``edora_kernels.bench.launches``)."""
from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch
import triton

# When set, called as intercept(kernel, grid, args) instead of launching.
intercept: Callable | None = None


def launch(kernel, grid, **args) -> None:
    if intercept is not None:
        intercept(kernel, grid, args)
    elif args.get("TMA"):
        contextvars.copy_context().run(_launch_with_scratch, kernel, grid, args)
    else:
        kernel[grid](**args)


def _launch_with_scratch(kernel, grid, args) -> None:
    """A kernel launched with TMA=True makes its TMA descriptors on the device, and Triton asks
    the allocator of ``triton.set_allocator`` for their global scratch (128 bytes a descriptor
    and program) at launch. It is set to torch's caching allocator in a copy of the context:
    an allocator the caller set stays untouched."""
    triton.set_allocator(_torch_scratch)
    kernel[grid](**args)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # on the current device and stream, where Triton launches; torch aligns to 512 bytes
    return torch.empty(size, dtype=torch.int8, device="cuda")


def kernel_name(kernel) -> str:
    """The @triton.jit function's name, through an autotuner if there is one."""
    fn = getattr(kernel, "fn", kernel)
    fn = getattr(fn, "fn", fn)
    return fn.__name__
