"""Backends: each computes the heavy N-sized parts of the op with one contract.

    forward(x, weight, bias, A, P, g, scaling, save) -> (y, v)
    backward(gy, weight, B, RA, g, y, bias, scaling, need_dx, need_t, need_colsum)
        -> (dx, t, colsum)
    epilogue(y0, v, bias, P, g, scaling) -> y           y = g ⊙ (y0 − b + s·v Pᵀ) + b

x is N×in, P = B R (out×r) and RA = R A (r×in) in the compute dtype, g = m/n (out) in the
compute dtype; y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b in x's dtype; v = x Aᵀ, t = (gy ⊙ g) B and
colsum = Σ_i gy ⊙ (y − b) in the compute dtype (v and t feed the cancelling sum dR = s·tᵀ v, so
they are not rounded to half; backward reads the output y, no N×out tensor is kept besides it).
Unneeded outputs are returned as empty tensors. Everything O(out·r²) or smaller (norm, dR,
dm) is shared code in ``edora_kernels.ops``.

``BACKENDS`` is the one registry: the auto order, the names the op and the CLI accept, the
benchmark providers and the plot labels are all derived from it. Adding a backend is one entry
here plus its module (which defines ``forward``, ``backward`` and ``epilogue``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch

ENV_VAR = "EDORA_BACKEND"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_torch() -> str | None:
    return None


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or _triton_interpreting()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


def _probe_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module("edora_kernels._C")
    except ImportError as err:
        return f"the CUDA extension is not built ({err})"
    return None


@dataclass(frozen=True)
class Backend:
    """One backend: where its code lives, where it runs, and how the tools name it."""

    name: str
    module: str                       # defines forward, backward, epilogue (the contract above)
    description: str
    label: str                        # benchmark tables and plots
    devices: tuple[str, ...]          # device types it runs on natively (and is timed on)
    fp64: bool                        # computes float64 inputs in float64 itself
    auto_priority: int                # lower runs first under backend="auto" on CUDA
    probe: Callable[[], str | None]   # None when it can run in this process, else why not

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "edora_kernels.backends.torch_backend",
            "composed ATen ops; the CPU path and the semantics anchor", "EDoRA torch",
            devices=("cpu", "cuda"), fp64=True, auto_priority=2, probe=_probe_torch),
    Backend("triton", "edora_kernels.backends.triton",
            "fused Triton kernels (forward, epilogue, dx, deterministic column sums)",
            "EDoRA triton", devices=("cuda",), fp64=False, auto_priority=0,
            probe=_probe_triton),
    Backend("cuda", "edora_kernels.backends.cuda",
            "the CUDA C++ extension (csrc/) with cuBLAS GEMMs through ATen", "EDoRA cuda",
            devices=("cuda",), fp64=True, auto_priority=1, probe=_probe_cuda),
)}
NAMES = tuple(BACKENDS)
CHOICES = ("auto", *NAMES)  # what the op's ``backend=`` accepts
# backend="auto" on a CUDA device tries these in turn; CPU tensors always use "torch".
AUTO_ORDER = tuple(sorted(NAMES, key=lambda n: BACKENDS[n].auto_priority))
CPU_BACKEND = "torch"


@lru_cache(maxsize=None)
def _why_unavailable(name: str) -> str | None:
    """None when the backend can run in this process, else the reason it cannot."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")
    return BACKENDS[name].probe()


def info() -> dict[str, dict]:
    """Each backend, whether it can run here, and why not."""
    result = {}
    for name, backend in BACKENDS.items():
        reason = _why_unavailable(name)
        result[name] = {"available": reason is None, "reason": reason or "ok",
                        "description": backend.description}
    return result


def _usable_on(name: str, device: torch.device) -> str | None:
    reason = _why_unavailable(name)
    if reason is not None:
        return reason
    backend = BACKENDS[name]
    if backend.runs_on(device) or (name == "triton" and _triton_interpreting()):
        return None
    return f"it needs tensors on {' or '.join(backend.devices)}, got tensors on {device}"


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` ('auto' or a backend) on ``device``.

    ``EDORA_BACKEND`` replaces 'auto'. An explicit choice that cannot run raises, saying why.
    """
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        if device.type != "cuda":
            return CPU_BACKEND
        return next(b for b in AUTO_ORDER if _usable_on(b, device) is None)
    reason = _usable_on(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not usable: {reason}")
    return name


@lru_cache(maxsize=None)
def load(name: str) -> SimpleNamespace:
    """The backend's ``forward``, ``backward`` and ``epilogue`` (see the contract above)."""
    module = importlib.import_module(BACKENDS[name].module)
    return SimpleNamespace(forward=module.forward, backward=module.backward,
                           epilogue=module.epilogue)
