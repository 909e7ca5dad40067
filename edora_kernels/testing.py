"""Random EDoRA problems: one layer's tensors plus a fixed upstream gradient.

The one problem builder of the project: the tests, ``edora-kernels check`` and the benchmarks all
draw their problems here. The adapter is set to a "mid-training" state (R well away from zero,
magnitude off the initial row norms) so that every term of the op moves the output and a wrong
term cannot hide.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .adapter_io import ADAPTER_TENSORS


@dataclass(frozen=True)
class Case:
    x: torch.Tensor                # (N, in), the problem's dtype
    weight: torch.Tensor           # (out, in), frozen
    bias: torch.Tensor | None      # (out,), frozen
    A: torch.Tensor                # (r, in), frozen
    B: torch.Tensor                # (out, r), frozen
    R: torch.Tensor                # (r, r), trainable
    magnitude: torch.Tensor        # (out,), trainable
    scaling: float
    gy: torch.Tensor               # (N, out), the fixed upstream gradient

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(N, in, out, r)."""
        return self.x.shape[0], self.weight.shape[1], self.weight.shape[0], self.A.shape[0]

    def to(self, dtype: torch.dtype) -> "Case":
        """The same problem in ``dtype``, from these values (the float64 oracle's input)."""
        cast = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scaling"}
        return replace(self, **{k: None if t is None else t.to(dtype) for k, t in cast.items()})

    def op_args(self) -> dict:
        """The keyword arguments of ``edora_linear``: x, weight, bias, A, B, R, magnitude,
        scaling."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "gy"}


def make_case(
    tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    alpha: float = 16.0,
    bias: bool = True,
    seed: int = 0,
    adapter_dtype: torch.dtype | None = None,
) -> Case:
    """A layer like a trained model's: B with orthonormal columns and A = Bᵀ W0 (the structure
    the SVD initialiser gives, without paying for an SVD of big shapes). R is scaled so that the
    low-rank update ``s·B R A`` is a sizeable fraction of W0's top-r part whatever alpha and r.

    Drawn in float64, then cast, so that every dtype sees the same values. ``adapter_dtype``
    (default: ``dtype``) is the dtype of A, B, R and magnitude, e.g. fp32 adapters on a bf16
    model.
    """
    gen = torch.Generator().manual_seed(seed)
    scaling = alpha / rank

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    weight = randn(out_features, in_features, std=in_features ** -0.5)
    B = torch.linalg.qr(randn(out_features, rank)).Q
    A = B.T @ weight
    R = randn(rank, rank, std=0.5 / (abs(scaling) * rank ** 0.5 or 1.0))
    magnitude = weight.norm(dim=1) * (1.0 + 0.1 * randn(out_features))
    tensors = {
        "x": randn(tokens, in_features),
        "weight": weight,
        "bias": randn(out_features, std=0.1) if bias else None,
        "A": A, "B": B, "R": R, "magnitude": magnitude,
        "gy": randn(tokens, out_features),
    }
    adapter_dtype = adapter_dtype or dtype
    return Case(scaling=scaling, **{
        k: None if t is None else t.to(device=device,
                                       dtype=adapter_dtype if k in ADAPTER_TENSORS else dtype)
        for k, t in tensors.items()
    })
