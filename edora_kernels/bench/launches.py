"""What a step asks of the device, measured on CPU: the kernels it launches and whether it makes
the host wait (docs/DESIGN.md §4).

A GPU step is judged by its launches and host syncs as much as by its kernels. Both can be
counted without a GPU: the step runs on CPU or meta tensors with the Triton kernels stubbed
(:func:`stub_kernels`: each launch is recorded instead of run, so its outputs hold garbage),
under ``torch.profiler``; every ATen op that would launch a kernel on a GPU counts once,
composite ops count as the ops under them, views and allocations not at all, and ops that read
device data on the host are flagged as syncs. On meta tensors such an op fails outright.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..backends import BACKENDS
from ..backends.triton import launch as triton_launch

# ATen ops that launch no kernel on a GPU: allocation, views, metadata.
NO_KERNEL = frozenset(f"aten::{op}" for op in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "_reshape_alias", "as_strided", "as_strided_", "t", "transpose",
    "permute", "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow",
    "detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "set_", "resize_", "split",
    "split_with_sizes", "unbind", "chunk", "view_as", "numpy_T", "diagonal", "result_type",
    "_has_compatible_shallow_copy_type", "is_same_size",
))
# Composite ATen ops: they launch what the ops under them launch (a no-op conversion nothing).
COMPOSITE = frozenset(f"aten::{op}" for op in (
    "to", "_to_copy", "contiguous", "clone", "reshape", "flatten", "matmul", "linear",
    "zeros", "zeros_like", "ones", "ones_like", "full_like", "new_zeros", "new_ones",
    "new_full", "linalg_vecdot", "einsum", "dropout", "tensordot",
))
# ATen ops that make the host wait for the device (data-dependent results or shapes).
SYNC_OPS = frozenset(f"aten::{op}" for op in (
    "item", "_local_scalar_dense", "nonzero", "nonzero_numpy", "is_nonzero", "masked_select",
    "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose",
    "repeat_interleave", "masked_scatter", "_assert_async",
))
# ATen ops whose kernel meta tensors skip: counted as the launch a GPU makes under them.
COUNTED_AS = {"aten::full": "aten::fill_"}  # an allocation and its fill
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
    """The launches of ``event``: none for an allocation or a view, its children's for a
    composite op (and for non-ATen ranges such as autograd's), itself once for any other ATen
    op (what it calls inside is its own implementation: one kernel on a GPU)."""
    name = event.name
    if name.startswith(TRITON_PREFIX):
        return [name]
    if name in COUNTED_AS:
        return [COUNTED_AS[name]]
    if name in NO_KERNEL:
        return []
    if name.startswith("aten::") and name not in COMPOSITE:
        return [name]
    children = sorted(event.cpu_children, key=lambda e: e.time_range.start)
    return [launch for child in children for launch in _launches(child)]


@dataclass
class LaunchCost:
    """One launch of a step with what it moves and computes, as :func:`measure_launches` sees
    it: ``flops`` (matrix products only; 0 for a streaming op), ``bytes`` (every tensor it reads
    or writes, once), whether it is a matrix product (``gemm``), the dtype of its operands and
    whether autograd's backward issued it (``phase``); a Triton kernel whose FLOPs run at
    another rate than the step's dtype names it (``operand``, a key of ``plan.DEVICES``)."""

    name: str
    phase: str
    flops: float
    bytes: float
    gemm: bool
    dtype: torch.dtype
    operand: str = ""


# Each Triton kernel's FLOPs from its launch arguments (every other kernel streams).
TRITON_FLOPS = {
    "edora_fwd_kernel": lambda a: 2.0 * a["M"] * a["N"] * (a["K"] + a["RANK"]),
    "edora_dx_kernel": lambda a: 2.0 * a["M"] * a["N"] * (a["K"] + a["RANK"]),
    "edora_epilogue_kernel": lambda a: 2.0 * a["M"] * a["N"] * a["RANK"],
    "prepass_kernel": lambda a: 2.0 * a["gy_ptr"].shape[0] * a["RANK"] * (a["K"] + 2 * a["RANK"]),
    # the gate's float64 rank-1 updates (P = B R, P G) of every adapter; v = x Aᵀ beside them
    # streams x (memory-bound at these ranks)
    "mixed_prologue_kernel": lambda a: 4.0 * a["GATE"] * a["ADAPTERS"] * a["OUT"] * a["RANK"] ** 2,
}
TRITON_OPERANDS = {"mixed_prologue_kernel": "fp64_simt"}
GEMM_KERNELS = frozenset({"edora_fwd_kernel", "edora_dx_kernel"})
# Ops a dispatch mode sees whole that the profiler counts as the one launch under them, and
# the host-side scalars some ops wrap (no launch).
DISPATCHED_AS = {"_to_copy": "copy_", "clone": "copy_", "full_like": "fill_", "full": "fill_",
                 "new_full": "fill_", "new_ones": "fill_", "ones_like": "fill_",
                 "zeros": "zero_", "zeros_like": "zero_", "new_zeros": "zero_"}
NO_LAUNCH_DISPATCHED = frozenset({"scalar_tensor"})
MATMULS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"})


def measure_launches(step: Callable[[], object]) -> list[LaunchCost]:
    """Run ``step`` (on meta tensors, under :func:`stub_kernels`) and return each launch with its
    cost: ATen ops as a dispatch mode sees them (views and allocations skipped; a conversion is
    one copy), Triton kernels from their arguments. Its names are :func:`count_launches`'s,
    which ``tests/test_plan.py`` checks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    costs: list[LaunchCost] = []

    def phase() -> str:
        return "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"

    def tensor_bytes(values) -> tuple[float, list[torch.Tensor]]:
        tensors = {id(t): t for t in torch.utils._pytree.tree_leaves(values)
                   if isinstance(t, torch.Tensor)}
        return (float(sum(t.numel() * t.element_size() for t in tensors.values())),
                list(tensors.values()))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket.__name__
            name = f"aten::{DISPATCHED_AS.get(op, op)}"
            if name not in NO_KERNEL and op not in NO_LAUNCH_DISPATCHED:
                moved, tensors = tensor_bytes((args, kwargs or {}, out))
                flops = 0.0
                if op in MATMULS:
                    # (input, mat1, mat2) or (mat1, mat2): the result comes after them
                    a, b = tensors[1:3] if op.startswith(("addmm", "baddbmm")) else tensors[:2]
                    flops = 2.0 * a.numel() * b.shape[-1]
                costs.append(LaunchCost(name, phase(), flops, moved, op in MATMULS,
                                        tensors[0].dtype))
            return out

    def recorded(kernel, grid, args):
        name = triton_launch.kernel_name(kernel)
        moved, tensors = tensor_bytes(args)
        flops = TRITON_FLOPS.get(name, lambda a: 0.0)(args)
        costs.append(LaunchCost(TRITON_PREFIX + name, phase(), flops, moved,
                                name in GEMM_KERNELS, tensors[0].dtype,
                                TRITON_OPERANDS.get(name, "")))

    previous = triton_launch.intercept
    triton_launch.intercept = recorded
    try:
        with Mode():
            step()
    finally:
        triton_launch.intercept = previous
    return costs
