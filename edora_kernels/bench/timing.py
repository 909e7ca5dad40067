"""Measuring: round-robin timing, bytes kept for backward, peak device memory.

Providers are timed in turns within each repeat (A B C, A B C, ...), so that a burst of load
from other processes lands on all of them alike; ratios are then taken round by round.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Seconds for one call: CUDA events on a GPU (no host overhead in the number), else
    ``perf_counter``; both after a full synchronisation, so each call is timed alone."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        synchronize(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def round_robin(
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]],
    device: torch.device,
    repeats: int,
    warmup: int,
    progress: Callable[[int], None] = lambda n: None,
    failures: dict[str, Exception] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call for each name, ``repeats`` samples each, taken in turns.

    ``calls[name] = (reset, step)``: ``reset`` runs untimed before each ``step`` (e.g. clearing
    gradients). ``warmup`` untimed turns come first (compilation, allocator, caches). With
    ``failures``, a name whose call raises goes there with its exception and out of the
    rotation (the others keep their turns); without, the exception propagates.
    """
    clock = _Clock(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    active = dict(calls)
    for i in range(warmup + repeats):
        for name, (reset, step) in list(active.items()):
            try:
                reset()
                seconds = clock(step)
            except Exception as err:
                if failures is None:
                    raise
                failures[name] = err
                del active[name]
                continue
            if i >= warmup:
                samples[name].append(seconds)
            progress(1)
    return samples


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(p50, p20, p80)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    p50, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return p50.item(), p20.item(), p80.item()


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn()``'s output.

    Counted while the output (and so its graph) is alive, and only tensors the graph still
    holds then: a tensor saved by a graph branch that was dropped during the forward is not
    kept for backward. Storages of ``exclude`` (weights, adapter parameters: memory the model
    holds anyway) are not counted; a storage saved twice, or through several views, counts once.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(t))
        return t  # the graph holds this very object: alive exactly as long as it is needed

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn()
    sizes = {}
    for ref in packed:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del output
    return sum(sizes.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it;
    None off CUDA (the CPU allocator keeps no such statistic)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
