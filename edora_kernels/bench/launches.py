"""What a step asks of the device, measured on CPU: the kernels it launches and whether it makes
the host wait (docs/DESIGN.md §4).

A GPU step is judged by its launches and host syncs as much as by its kernels. Both can be
counted without a GPU: the step runs on CPU tensors with the Triton kernels stubbed
(:func:`stub_kernels`: each launch is recorded instead of run, so its outputs hold garbage), under
``torch.profiler``; every ATen op that would launch a kernel on a GPU is counted where it
computes (an op whose work is done by ATen ops under it counts as those), views and
allocations are not, and ops that read device data on the host are flagged as syncs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..backends import BACKENDS
from ..backends.triton import launch as triton_launch

# ATen ops that launch no kernel on a GPU: allocation, views, metadata, no-op conversions.
NO_KERNEL = frozenset(f"aten::{op}" for op in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "permute",
    "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow", "detach",
    "alias", "lift_fresh", "resolve_conj", "resolve_neg", "to", "contiguous", "set_",
    "resize_", "split", "split_with_sizes", "unbind", "chunk", "view_as", "numpy_T",
    "diagonal", "result_type", "_has_compatible_shallow_copy_type", "is_same_size",
))
# ATen ops that make the host wait for the device (data-dependent results or shapes).
SYNC_OPS = frozenset(f"aten::{op}" for op in (
    "item", "_local_scalar_dense", "nonzero", "nonzero_numpy", "is_nonzero", "masked_select",
    "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose",
    "repeat_interleave", "masked_scatter", "_assert_async",
))
TRITON_PREFIX = "triton::"


@dataclass
class StepLog:
    """Launches in issue order (``triton::<kernel>`` or ``aten::<op>``) and the sync ops seen."""

    launches: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)


@contextlib.contextmanager
def stub_kernels(record: bool = True) -> Iterator[None]:
    """Skip the Triton launches — recorded as ``triton::<kernel>`` profiler ranges when
    ``record``, dropped otherwise (host timing) — and let the Triton backend take CPU and meta
    tensors."""
    def recorded(kernel, grid, args):
        with torch.profiler.record_function(TRITON_PREFIX + triton_launch.kernel_name(kernel)):
            pass

    def dropped(kernel, grid, args):
        pass

    previous_intercept, previous_probe = triton_launch.intercept, BACKENDS["triton"]
    triton_launch.intercept = recorded if record else dropped
    BACKENDS["triton"] = _runs_anywhere(previous_probe)
    _clear_probe_cache()
    try:
        yield
    finally:
        triton_launch.intercept = previous_intercept
        BACKENDS["triton"] = previous_probe
        _clear_probe_cache()


def _runs_anywhere(backend):
    from dataclasses import replace
    return replace(backend, devices=("cpu", "cuda", "meta"), probe=lambda: None)


def _clear_probe_cache() -> None:
    from .. import backends
    backends._why_unavailable.cache_clear()


def count_launches(step: Callable[[], object]) -> StepLog:
    """Run ``step`` under the profiler and return its launches and syncs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    log = StepLog()
    for event in events:
        if event.cpu_parent is None:
            log.launches += _launches(event)
        if event.name in SYNC_OPS:
            log.syncs.append(event.name)
    return log


def _launches(event) -> list[str]:
    """The launches under ``event``: its children's, or itself when it computes alone."""
    if event.name.startswith(TRITON_PREFIX):
        return [event.name]
    children = sorted(event.cpu_children, key=lambda e: e.time_range.start)
    inner = [name for child in children for name in _launches(child)]
    if inner:
        return inner
    if event.name.startswith("aten::") and event.name not in NO_KERNEL:
        return [event.name]
    return []
