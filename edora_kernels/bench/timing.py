"""Measuring: round-robin timing, bytes kept for backward, peak device memory.

Providers are timed in turns within each repeat (A B C, A B C, ...), so that a burst of load
from other processes lands on all of them alike; ratios are then taken round by round.
"""
from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable

import torch

# On CUDA a turn is a burst of calls issued back to back, as a training loop issues them: timing
# a call alone after a full synchronisation adds the launch latency a running loop hides. A burst
# lasts about BURST_S at the provider's last measured rate: one call where a call takes longer
# (the initialiser's SVDs), up to MAX_BURST for the tiniest ones.
BURST_S = 0.01
MAX_BURST = 1000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def burst_calls(seconds_per_call: float) -> int:
    """Calls in a provider's next CUDA burst, from its last per-call time: enough to last
    ``BURST_S``, at least 1, at most ``MAX_BURST`` (also for a time of zero)."""
    if seconds_per_call * MAX_BURST <= BURST_S:
        return MAX_BURST
    return math.ceil(BURST_S / seconds_per_call)


def _time_call(reset: Callable[[], object], step: Callable[[], object]) -> float:
    """Seconds of one ``step`` on the CPU, ``reset`` untimed before it."""
    reset()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _time_burst(reset: Callable[[], object], step: Callable[[], object], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back ``step``s on the current CUDA stream, with
    one synchronisation, at the end. Each call has its own pair of events, so that ``reset``
    (between two calls, host work that must not synchronise) stays untimed as on the CPU: on
    the stream, the next call's start is reached as soon as the previous call ends unless the
    host fell behind."""
    spans = []
    for _ in range(calls):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        spans.append((start, end))
    end.synchronize()
    return sum(start.elapsed_time(end) for start, end in spans) / 1e3 / calls


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
    gradients). On the CPU a sample is one call (``perf_counter``); on CUDA it is the mean of a
    burst of calls (``burst_calls``; the first turn, a warm-up one unless ``warmup`` is 0, is one
    call), timed with CUDA events. ``warmup`` untimed turns come first (compilation, allocator,
    caches). With ``failures``, a name whose call raises goes there with its exception and out
    of the rotation (the others keep their turns); without, the exception propagates.
    """
    on_cuda = device.type == "cuda"
    burst = dict.fromkeys(calls, 1)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    active = dict(calls)
    for i in range(warmup + repeats):
        for name, (reset, step) in list(active.items()):
            try:
                seconds = (_time_burst(reset, step, burst[name]) if on_cuda
                           else _time_call(reset, step))
            except Exception as err:
                if failures is None:
                    raise
                failures[name] = err
                del active[name]
                continue
            if on_cuda:
                burst[name] = burst_calls(seconds)
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
