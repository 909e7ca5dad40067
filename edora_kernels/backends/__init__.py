"""Backends: each runs a whole step of the op with one contract (docs/DESIGN.md §4).

    forward(x, weight, bias, A, B, R, magnitude, terms, scaling, save, capacity) -> (y, saved)
    backward(gy, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
             need_dx, need_dR, need_dm) -> (dx, dR, dm)
    epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling, save, capacity)
        -> (y, saved)
    epilogue_backward(gy, bias, A, B, R, magnitude, terms, scaling, detach_norm, y, saved,
                      need_dy0, need_dx, need_dR, need_dm) -> (dy0, dx, dR, dm)

x is N×in, ``terms`` the float64 ``NormTerms(c0, C, G)`` (backward gets C and G only, and only
with ``detach_norm=False``), y = g ⊙ (x W0ᵀ + s·v Pᵀ) + b in x's dtype (epilogue: y0 − b in place
of x W0ᵀ). ``saved`` is an ``op_common.Saved``: v = x Aᵀ in the compute dtype (it feeds the
cancelling sum dR = s·tᵀ v, so it is not rounded to half; empty unless ``save``), P = B R and n in
float64, g = m/n in the compute dtype, and the z columns of up to ``capacity`` zero magnitudes
with their slots. Backward reads the output y; no N×out tensor is kept besides it. Unneeded
outputs come back as empty tensors; gradients in each parameter's dtype. ``op_common`` holds
the formulas in torch; the torch backend computes with them, the others fuse them.

``BACKENDS`` is the one registry: the auto order, the names the op and the CLI accept, the
benchmark providers and the plot labels are all derived from it. Adding a backend is one entry
here plus its module (which defines the four functions above).
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
    module: str                       # defines the step functions of the contract above
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


def env_choice() -> str:
    """What ``EDORA_BACKEND`` puts in place of 'auto' ('auto' when unset); a ValueError naming
    the variable when it holds no backend name."""
    name = os.environ.get(ENV_VAR, "auto")
    if name not in CHOICES:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of "
                         f"{', '.join(CHOICES)} (or unset)")
    return name


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` ('auto' or a backend) on ``device``.

    ``EDORA_BACKEND`` replaces 'auto'. An explicit choice that cannot run raises, saying why.
    """
    by_env = name == "auto"
    if by_env:
        name = env_choice()
    if name == "auto":
        if device.type != "cuda":
            return CPU_BACKEND
        return next(b for b in AUTO_ORDER if _usable_on(b, device) is None)
    reason = _usable_on(name, device)
    if reason is not None:
        raise RuntimeError(f"{f'{ENV_VAR}={name}: ' if by_env else ''}backend {name!r} is not "
                           f"usable: {reason}")
    return name


STEP_FUNCTIONS = ("forward", "backward", "epilogue_forward", "epilogue_backward")


@lru_cache(maxsize=None)
def load(name: str) -> SimpleNamespace:
    """The backend's step functions (see the contract above)."""
    module = importlib.import_module(BACKENDS[name].module)
    return SimpleNamespace(**{fn: getattr(module, fn) for fn in STEP_FUNCTIONS})
