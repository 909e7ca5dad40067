"""Random EDoRA problems for the benchmark and the self-check: one layer's tensors plus a gy.

The adapter is set to a "mid-training" state (R well away from zero, magnitude off the initial
row norms) so that every term of the op moves the output and a wrong term cannot hide.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Case:
    x: torch.Tensor                # (N, in), the bench dtype
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


def make_case(
    tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    alpha: float = 16.0,
    bias: bool = True,
    seed: int = 0,
) -> Case:
    """A layer like a trained model's: B with orthonormal columns and A = Bᵀ W0 (DESIGN §1's
    structure, without paying for an SVD of big shapes). Drawn in float64, then cast, so that
    every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    weight = randn(out_features, in_features, std=in_features ** -0.5)
    B = torch.linalg.qr(randn(out_features, rank)).Q
    A = B.T @ weight
    R = randn(rank, rank, std=0.3 / rank ** 0.5)
    magnitude = weight.norm(dim=1) * (1.0 + 0.1 * randn(out_features))
    tensors = {
        "x": randn(tokens, in_features),
        "weight": weight,
        "bias": randn(out_features, std=0.1) if bias else None,
        "A": A, "B": B, "R": R, "magnitude": magnitude,
        "gy": randn(tokens, out_features),
    }
    return Case(scaling=alpha / rank, **{
        k: None if t is None else t.to(device=device, dtype=dtype) for k, t in tensors.items()
    })
