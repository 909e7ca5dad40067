"""Backends: each computes the heavy N-sized parts of the op with one contract.

    forward(x, weight, bias, A, P, g, scaling, save) -> (y, v, z)
    backward(gy, weight, B, RA, g, z, scaling, need_dx, need_t, need_colsum) -> (dx, t, colsum)
    epilogue(y0, v, bias, P, g, scaling, save) -> (y, z)       z = y0 − b + s·v Pᵀ

x is N×in, P = B R (out×r) and RA = R A (r×in) in the compute dtype, g = m/n (out) in the
compute dtype; v = x Aᵀ, z = x W0ᵀ + s·v Pᵀ, t = (gy ⊙ g) B, colsum = Σ_i gy ⊙ z in the compute
dtype. Unneeded outputs are returned as empty tensors. Everything O(out·r²) or smaller (norm, dR,
dm) is shared code in ``edora_kernels.ops``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from types import SimpleNamespace

import torch

ENV_VAR = "EDORA_BACKEND"
# Preference order for backend="auto" on a CUDA device; CPU tensors always use "torch".
_CUDA_PREFERENCE = ("triton", "cuda", "torch")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _why_unavailable(name: str) -> str | None:
    """None when the backend can run in this process, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not (torch.cuda.is_available() or _triton_interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
        return None
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        try:
            importlib.import_module("edora_kernels._C")
        except ImportError as err:
            return f"the CUDA extension is not built ({err})"
        return None
    raise ValueError(f"unknown backend {name!r}")


def info() -> dict[str, dict]:
    """Each backend, whether it can run here, and why not."""
    result = {}
    for name in ("torch", "triton", "cuda"):
        reason = _why_unavailable(name)
        result[name] = {"available": reason is None, "reason": reason or "ok"}
    return result


def _usable_on(name: str, device: torch.device) -> str | None:
    reason = _why_unavailable(name)
    if reason is not None:
        return reason
    if name == "cuda" and device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not _triton_interpreting():
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}"
    return None


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` ('auto' or a backend) on ``device``.

    ``EDORA_BACKEND`` replaces 'auto'. An explicit choice that cannot run raises, saying why.
    """
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        return next(b for b in _CUDA_PREFERENCE if _usable_on(b, device) is None)
    reason = _usable_on(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not usable: {reason}")
    return name


@lru_cache(maxsize=None)
def load(name: str) -> SimpleNamespace:
    """The backend's ``forward``, ``backward`` and ``epilogue`` (see the contract above)."""
    if name == "torch":
        from . import torch_backend as fwd_mod
        bwd_mod = fwd_mod
    elif name == "triton":
        from .triton import bwd as bwd_mod
        from .triton import fwd as fwd_mod
    else:
        from . import cuda as fwd_mod
        bwd_mod = fwd_mod
    return SimpleNamespace(forward=fwd_mod.forward, backward=bwd_mod.backward,
                           epilogue=fwd_mod.epilogue)
