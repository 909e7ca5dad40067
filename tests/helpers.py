"""Problem builders shared by the tests: realistic scales, every tensor on request in any dtype."""
from __future__ import annotations

import torch

from edora_kernels.reference import edora_linear_reference


def make_problem(n_rows, in_features, out_features, rank, *, dtype=torch.float32, seed=0,
                 bias=True, device="cpu"):
    """A dict of op arguments with O(1) outputs, built in float64 then rounded to ``dtype``.

    R is far from its init so that the low-rank term matters; magnitude is ‖W0‖ ± 20%.
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    W = torch.randn(out_features, in_features, generator=gen, **f64) / in_features**0.5
    args = {
        "x": torch.randn(n_rows, in_features, generator=gen, **f64),
        "weight": W,
        "bias": torch.randn(out_features, generator=gen, **f64) if bias else None,
        "A": torch.randn(rank, in_features, generator=gen, **f64) / in_features**0.5,
        "B": torch.randn(out_features, rank, generator=gen, **f64) / rank**0.5,
        "R": 0.3 * torch.randn(rank, rank, generator=gen, **f64),
        "magnitude": W.norm(dim=1) * (0.8 + 0.4 * torch.rand(out_features, generator=gen, **f64)),
        "scaling": 2.0 / rank,
    }
    return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
            for k, v in args.items()}


def as_float64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


TRAINABLE = ("x", "R", "magnitude")


def run_with_grads(fn, args, gy_seed=1, **kwargs):
    """``fn(**args)`` with x, R, magnitude requiring grad; y and their grads for a fixed gy."""
    args = {k: (v.detach().clone().requires_grad_(k in TRAINABLE) if isinstance(v, torch.Tensor)
                else v) for k, v in args.items()}
    y = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [args[k] for k in TRAINABLE], gy, allow_unused=True)
    return y.detach(), dict(zip(TRAINABLE, grads))


def reference_with_grads(args, **kwargs):
    return run_with_grads(edora_linear_reference, as_float64(args), **kwargs)
