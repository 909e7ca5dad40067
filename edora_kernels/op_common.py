"""What every path of the op shares, written in torch: the per-step gate (P, n, g and the slots of
zero magnitudes), what forward keeps for backward, the magnitude sums S, the adapter gradients,
and the in-place check. The torch backend and the dropout path compute with these; the Triton
and CUDA backends fuse the same formulas into kernels and are tested against them.

Everything here is O(out·r²) or smaller, except the N×k kept z columns (k ≤ the slot capacity).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import CPU_BACKEND
from .norm import TERMS_DTYPE, NormTerms, exact_norm_grad_P, row_norm

# Zero magnitudes (docs/DESIGN.md §3). Where m_j = 0, g_j = 0 and y_j = b_j carries no trace of
# z_j, which dm_j needs: forward keeps those columns of z in "slots". The torch backend on CPU
# reads m for free, so it has exactly as many slots as zeros; the device backends (and anything
# under torch.compile) never read device data on the host, so they have ZERO_SLOTS, and a zero
# column past them gets dm_j = NaN (loud, never a silently wrong 0). Zero rows of W0 (m = ‖V_j‖
# = 0 at init) have z_j ≡ 0 and would need no slot to be exact, but take one like any zero.
ZERO_SLOTS = 16
SLOT_NONE = -1   # m_j ≠ 0: S_j comes from y
SLOT_FULL = -2   # m_j = 0 and every slot taken: dm_j = NaN


# Work (multiply-adds; an elementwise pass counts ELEMENTWISE_WORK per element) below which one
# CPU thread beats waking OpenMP's others. Measured on 2 shared vCPUs: under
# OMP_WAIT_POLICY=PASSIVE (what `edora-kernels bench` sets) a wake costs about 80 µs, against a
# one-thread 256×256×16 product's 28 µs (101 µs on two threads) and a 65k-element multiply's
# 8 µs (52 µs); with spinning threads (the default policy) the same product takes 17 µs on two
# threads, so there only tiny ops stay on one thread.
_SLEEPING_THREADS = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
SMALL_CPU_WORK = 1 << 21 if _SLEEPING_THREADS else 1 << 16
ELEMENTWISE_WORK = 8


def small_work(fn):
    """Run ``fn`` (O(out·r²) work: a few thousand numbers per op) on one CPU thread."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cpu_threads_for(0):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def cpu_threads_for(work: int):
    """One CPU thread for the ops inside when their ``work`` is under ``SMALL_CPU_WORK``;
    switching the thread count costs well under a microsecond, other devices are untouched
    (the count only governs CPU ops), and nothing changes under torch.compile."""
    if work >= SMALL_CPU_WORK or torch.compiler.is_compiling():
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Gate(NamedTuple):
    """The per-step O(out·r²) work of the forward."""

    P: Tensor      # (out, r) float64: B R
    n: Tensor      # (out,) float64: ‖W0 + s·P A‖ per row
    g: Tensor      # (out,) compute dtype: m / n
    slots: Tensor  # (out,) int32: a zero magnitude's slot, SLOT_NONE or SLOT_FULL; (0,) if none


class Saved(NamedTuple):
    """What the forward keeps for backward besides its inputs and the output y."""

    v: Tensor      # (N, r) compute dtype: x Aᵀ; (0,) when R needs no gradient
    P: Tensor      # (out, r) float64
    n: Tensor      # (out,) float64
    g: Tensor      # (out,) compute dtype
    slots: Tensor  # (out,) int32, or (0,) when no column keeps its z
    zbuf: Tensor   # (N, k) in y's dtype: z of the zero-magnitude columns, slot by slot


@small_work
def slot_capacity(magnitude: Tensor, save: bool, backend: str) -> int:
    """How many zero-magnitude columns forward keeps z for: 0 when nothing will run backward,
    the exact count for the torch backend on CPU in eager mode, ZERO_SLOTS otherwise (the
    count would be a host read of device data)."""
    if not save:
        return 0
    if (backend == CPU_BACKEND and magnitude.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return magnitude.numel() - int(magnitude.count_nonzero())
    return ZERO_SLOTS


def zero_slots(magnitude: Tensor, capacity: int) -> Tensor:
    """Slot k for the k-th zero magnitude (column order), SLOT_FULL past ``capacity``,
    SLOT_NONE elsewhere; fixed shape, no host read."""
    if capacity == 0:
        return magnitude.new_empty(0, dtype=torch.int32)
    zero = magnitude == 0
    order = torch.cumsum(zero, 0, dtype=torch.int32) - 1
    full = torch.full_like(order, SLOT_FULL)
    return torch.where(zero, torch.where(order < capacity, order, full), SLOT_NONE)


def slot_columns(slots: Tensor, capacity: int) -> Tensor:
    """(capacity,) int64: the column of each slot; ``out`` (one past the last) where unused."""
    return torch.nonzero_static(slots >= 0, size=capacity, fill_value=slots.shape[0]).flatten()


@small_work
def gate(terms: NormTerms, B: Tensor, R: Tensor, magnitude: Tensor, scaling: float, cdt,
         capacity: int = 0) -> Gate:
    """P = B R and n in float64 (docs/DESIGN.md §2), g = m / n rounded to the compute dtype."""
    P = B.to(TERMS_DTYPE) @ R.to(TERMS_DTYPE)
    n = row_norm(terms, P, scaling)
    g = (magnitude.to(TERMS_DTYPE) / n).to(cdt)
    return Gate(P, n, g, zero_slots(magnitude, capacity))


def keep_slot_columns(z: Tensor, slots: Tensor, capacity: int) -> Tensor:
    """The z columns of the zero magnitudes, (N, capacity) in slot order (unused slots hold a
    copy of some column: never read)."""
    if capacity == 0:
        return z.new_empty(z.shape[0], 0)
    columns = slot_columns(slots, capacity).clamp_max(z.shape[1] - 1)
    return z.index_select(1, columns)


@small_work
def magnitude_sums(colsum: Tensor, gy: Tensor, saved: Saved, magnitude: Tensor) -> Tensor:
    """``S = Σ_rows gy ⊙ z`` per column in float64, from ``colsum = Σ_rows gy ⊙ (y − b)`` (=
    g ⊙ S, so S = colsum·n/m); zero-magnitude columns from their kept z, NaN past the slots.
    Every zero magnitude has a slot or SLOT_FULL whenever S is formed (``slot_capacity``), so
    the division by m never keeps a 0/0."""
    f64, n, slots = TERMS_DTYPE, saved.n, saved.slots
    S = colsum.to(f64) * n / magnitude.to(f64)
    if slots.numel():
        out, capacity = S.shape[0], saved.zbuf.shape[1]
        columns = slot_columns(slots, capacity)
        kept = gy.index_select(1, columns.clamp_max(out - 1)).to(f64)
        zsum = torch.linalg.vecdot(kept, saved.zbuf.to(f64), dim=0)
        # Unused slots write to a scratch entry past the last column.
        S = torch.cat([S, S.new_zeros(1)]).index_copy(0, columns, zsum)[:out]
        S = torch.where(slots == SLOT_FULL, torch.nan, S)
    return S


@small_work
def adapter_grads(t, v, S, terms: NormTerms, B, R, P, magnitude, n, scaling, detach_norm,
                  need_dR, need_dm):
    """dR = s·tᵀ v (+ the norm's share when not detached) and dm = S/n, with
    ``S = Σ_rows gy ⊙ z`` (None when neither needs it); the O(out·r²) parts in float64."""
    f64 = TERMS_DTYPE
    dR = R.new_empty(0)
    if need_dR:
        dR_c = scaling * (t.to(f64).T @ v.to(f64))
        if not detach_norm:
            dR_c = dR_c + B.to(f64).T @ norm_share(terms, P, magnitude, n, S, scaling)
        dR = dR_c.to(R.dtype)
    dm = (S / n).to(magnitude.dtype) if need_dm else magnitude.new_empty(0)
    return dR, dm


def norm_share(terms: NormTerms, P, magnitude, n, S, scaling):
    """∂L/∂P through the norm (detach_norm=False), with ∂L/∂n = −m S / n²."""
    grad_n = -magnitude.to(TERMS_DTYPE) * S / (n * n)
    return exact_norm_grad_P(terms, P, n, grad_n, scaling)


def fake_adapter_grads(R: Tensor, magnitude: Tensor, need_dR: bool, need_dm: bool):
    """dR and dm as the fakes (and unneeded outputs) shape them."""
    return (R.new_empty(R.shape if need_dR else (0,)),
            magnitude.new_empty(magnitude.shape if need_dm else (0,)))


def saved_tensors(ctx, op: str):
    """``ctx.saved_tensors`` with autograd's in-place error made specific: backward reads y."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError(
            f"{op}: a tensor its backward needs was modified in place after the forward — "
            "usually its output y (an in-place activation such as ReLU(inplace=True), y += ..., "
            "y.mul_()); EDoRA's backward reads y for the magnitude gradient. Apply such ops out "
            "of place (F.relu(y), y = y + ...)") from err


def fake_saved(rows_like: Tensor, rank: int, out_features: int, save: bool,
               capacity: int) -> Saved:
    """``Saved`` as the custom ops' fakes shape it (rows_like: x or y0, N rows)."""
    cdt = TERMS_DTYPE if rows_like.dtype == TERMS_DTYPE else torch.float32
    n_rows = rows_like.shape[0]
    return Saved(
        v=rows_like.new_empty((n_rows, rank) if save else (0,), dtype=cdt),
        P=rows_like.new_empty((out_features, rank), dtype=TERMS_DTYPE),
        n=rows_like.new_empty(out_features, dtype=TERMS_DTYPE),
        g=rows_like.new_empty(out_features, dtype=cdt),
        slots=rows_like.new_empty(out_features if capacity else 0, dtype=torch.int32),
        zbuf=rows_like.new_empty(n_rows, capacity),
    )
