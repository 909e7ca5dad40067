"""Every Triton launch of the backend goes through :func:`launch`: one place where the launches
of a step can be counted, or replaced by no-ops to measure the host's share of a step
(``edora_kernels.bench.launches``)."""
from __future__ import annotations

from collections.abc import Callable

# When set, called as intercept(kernel, grid, args) instead of launching.
intercept: Callable | None = None


def launch(kernel, grid, **args) -> None:
    if intercept is not None:
        intercept(kernel, grid, args)
        return
    kernel[grid](**args)


def kernel_name(kernel) -> str:
    """The @triton.jit function's name, through an autotuner if there is one."""
    fn = getattr(kernel, "fn", kernel)
    fn = getattr(fn, "fn", fn)
    return fn.__name__
