"""``edora-kernels check``: every available backend against the naive reference, forward and
gradients, on a few deliberately odd shapes, judged by the one tolerance table.

The reference runs in float64 on the same (rounded) inputs; each backend runs in float64 where
it supports it (the torch backend) and in float32, plus float16/bfloat16 on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS
from .backends import info as backend_info
from .ops import edora_linear
from .reference import edora_linear_reference
from .testing import Case, make_case
from .tolerances import TOLERANCE, normalised_error, within_tolerance

# (N, in, out, r, bias, detach_norm): sizes off every power of two, r from 1 to 16, an empty
# batch, and the exact-norm gradient once.
CASES = (
    (37, 67, 45, 3, True, True),
    (1, 130, 96, 16, False, True),
    (256, 96, 200, 8, True, False),
    (0, 33, 17, 1, True, True),
)


@dataclass
class CheckResult:
    backend: str
    dtype: torch.dtype
    case: str
    worst: str           # the output with the largest error
    error: float
    failure: str = ""    # an exception's message, when the backend raised

    @property
    def ok(self) -> bool:
        return not self.failure and within_tolerance(self.error, self.dtype)


def _outputs(op, case: Case, detach_norm: bool) -> dict[str, torch.Tensor]:
    """y and every gradient the op gives, from the case's fixed gy."""
    x, R, m = (t.detach().clone().requires_grad_(True) for t in (case.x, case.R, case.magnitude))
    bias = None if case.bias is None else case.bias.detach().clone().requires_grad_(True)
    y = op(x, case.weight, bias, case.A, case.B, R, m, case.scaling, detach_norm=detach_norm)
    y.backward(case.gy)
    out = {"y": y.detach(), "dx": x.grad, "dR": R.grad, "dm": m.grad}
    if bias is not None:
        out["dbias"] = bias.grad
    return out


def _dtypes(backend: str, device: torch.device) -> list[torch.dtype]:
    dtypes = [torch.float64] if BACKENDS[backend].fp64 else []
    dtypes.append(torch.float32)
    if device.type == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    return dtypes


def _check_one(backend: str, dtype: torch.dtype, device: torch.device, spec: tuple) -> CheckResult:
    tokens, in_f, out_f, rank, bias, detach_norm = spec
    label = f"N={tokens} {in_f}x{out_f} r={rank}" + ("" if bias else " no-bias") + (
        "" if detach_norm else " exact-norm")
    case = make_case(tokens, in_f, out_f, rank, dtype, device, bias=bias)
    expected = _outputs(edora_linear_reference, case.to(torch.float64), detach_norm)

    def op(*args, **kwargs):
        return edora_linear(*args, backend=backend, **kwargs)

    try:
        actual = _outputs(op, case, detach_norm)
    except Exception as err:  # noqa: BLE001 - a check reports every failure, then exits non-zero
        return CheckResult(backend, dtype, label, "-", float("nan"),
                           failure=f"{type(err).__name__}: {err}")
    errors = {name: normalised_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=lambda k: (errors[k] != errors[k], errors[k]))  # NaN counts as worst
    return CheckResult(backend, dtype, label, worst, errors[worst])


def run_checks(device: torch.device, backends: list[str] | None = None) -> list[CheckResult]:
    """Check ``backends`` (default: every available one); an unavailable one named explicitly
    raises, saying why."""
    states = backend_info()
    if backends is None:
        backends = [name for name, state in states.items() if state["available"]]
    for name in backends:
        if name not in states:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(states)}")
        if not states[name]["available"]:
            raise RuntimeError(f"backend {name!r} is not available: {states[name]['reason']}")
    return [_check_one(b, dtype, device, spec)
            for b in backends for dtype in _dtypes(b, device) for spec in CASES]


def format_report(results: list[CheckResult]) -> str:
    header = ("backend", "dtype", "case", "worst", "max err", "tolerance", "result")
    lines = [header]
    for r in results:
        verdict = "ok" if r.ok else f"FAIL {r.failure}".rstrip()
        lines.append((r.backend, str(r.dtype).removeprefix("torch."), r.case, r.worst,
                      f"{r.error:.2e}", f"{TOLERANCE[r.dtype]:.0e}", verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]
        for line in lines)
