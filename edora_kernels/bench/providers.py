"""The contenders of the op benchmark, each built from one ``Case`` and run the same way.

A ``Runner`` wraps ``y = fn(x)``: mode "fwd" is the inference forward (``no_grad``), mode
"fwd+bwd" a training step of the layer (x requires grad, the trainable tensors get gradients
from the fixed ``gy``). PEFT's layers get ``lora_A = A`` and ``lora_B = B R`` (and DoRA's
magnitude ``m``), so that PEFT DoRA computes the very function EDoRA does and PEFT LoRA the same
adapter without the magnitude/direction split.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import BACKENDS, NAMES
from ..backends import info as backend_info
from ..norm import compute_norm_terms
from ..ops import edora_linear
from ..reference import edora_linear_reference
from ..testing import Case

MODES = ("fwd", "fwd+bwd")
EDORA_FAMILY = ("reference", *NAMES, "compiled", "lowrank")


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (printed as a note)."""


@dataclass
class Runner:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    gy: torch.Tensor
    trainable: list[torch.Tensor]
    state: list[torch.Tensor] = field(default_factory=list)  # held by the model anyway

    def reset(self) -> None:
        for t in [self.x, *self.trainable]:
            t.grad = None

    def step(self, mode: str) -> torch.Tensor:
        if mode == "fwd":
            with torch.no_grad():
                return self.fn(self.x)
        y = self.fn(self.x)
        y.backward(self.gy)
        return y

    def outputs(self, mode: str) -> list[torch.Tensor]:
        """y, and in "fwd+bwd" dx and the trainable tensors' gradients."""
        self.reset()
        y = self.step(mode).detach()
        if mode == "fwd":
            return [y]
        return [y, self.x.grad, *(t.grad for t in self.trainable)]


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _frozen(case: Case, dropout: float = 0.0) -> Runner:
    w, b = case.weight, case.bias
    return Runner("frozen", lambda x: F.linear(x, w, b), _leaf(case.x, True), case.gy, [],
                  [w, b])


def _edora(name: str, case: Case, op: Callable, dropout: float = 0.0, **options) -> Runner:
    R, m = _leaf(case.R, True), _leaf(case.magnitude, True)
    frozen = (case.weight, case.bias, case.A, case.B)
    if dropout > 0.0:
        options["dropout"] = dropout

    def fn(x):
        return op(x, *frozen, R, m, case.scaling, **options)

    return Runner(name, fn, _leaf(case.x, True), case.gy, [R, m], [*frozen, R, m])


def _terms(case: Case):
    """The norm terms, computed once as EDoRALinear caches them (the functional op would
    recompute them every call: one read of W0 in float64)."""
    return compute_norm_terms(case.weight, case.A)


def _backend(name: str) -> Callable[[Case], Runner]:
    def build(case: Case, dropout: float = 0.0) -> Runner:
        state = backend_info()[name]
        if not state["available"]:
            raise Unavailable(f"backend {name}: {state['reason']}")
        if not BACKENDS[name].runs_on(case.x.device):
            raise Unavailable(f"{name} is timed on {', '.join(BACKENDS[name].devices)} only "
                              "(elsewhere it runs, if at all, in an emulator too slow to time)")

        def op(*args, **options):
            return edora_linear(*args, backend=name, **options)

        return _edora(name, case, op, dropout, norm_terms=_terms(case))

    return build


def _compiled(case: Case, dropout: float = 0.0) -> Runner:
    def op(*args, **options):
        return edora_linear(*args, backend="torch", **options)

    # fullgraph: a graph break would time something other than the traced op.
    return _edora("compiled", case, torch.compile(op, fullgraph=True), dropout,
                  norm_terms=_terms(case))


def _lowrank(case: Case, dropout: float = 0.0) -> Runner:
    """The torch backend with dropout on the rank-r branch only (``dropout_mode="lowrank"``)."""
    if dropout <= 0.0:
        raise Unavailable("lowrank is the dropout_mode='lowrank' variant: give --dropout")
    return _edora("lowrank", case, edora_linear, dropout, backend="torch",
                  dropout_mode="lowrank", norm_terms=_terms(case))


class OneLinear(nn.Module):
    """A model holding one linear as `linear`: what PEFT wraps."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def _peft(use_dora: bool) -> Callable[[Case], Runner]:
    name = "peft_dora" if use_dora else "peft_lora"

    def build(case: Case, dropout: float = 0.0) -> Runner:
        if importlib.util.find_spec("peft") is None:
            raise Unavailable("peft is not installed (pip install peft)")
        from peft import LoraConfig, get_peft_model

        _, in_f, out_f, rank = case.dims
        linear = nn.Linear(in_f, out_f, bias=case.bias is not None,
                           device=case.x.device, dtype=case.x.dtype)
        with torch.no_grad():
            linear.weight.copy_(case.weight)
            if case.bias is not None:
                linear.bias.copy_(case.bias)
        config = LoraConfig(r=rank, lora_alpha=case.scaling * rank, lora_dropout=dropout,
                            target_modules=["linear"], use_dora=use_dora)
        layer = get_peft_model(OneLinear(linear), config).base_model.model.linear
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(case.A)
            layer.lora_B["default"].weight.copy_(case.B @ case.R)
            if use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(case.magnitude)
        if abs(layer.scaling["default"] - case.scaling) > 1e-12 * case.scaling:
            raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {case.scaling}")
        trainable = [p for p in layer.parameters() if p.requires_grad]
        return Runner(name, layer, _leaf(case.x, True), case.gy, trainable,
                      list(layer.parameters()))

    return build


# Each builder takes the case and the dropout probability (0: none; the PEFT providers get it
# as lora_dropout, the EDoRA ones with PEFT's semantics, "lowrank" on the rank branch only).
BUILDERS: dict[str, Callable[..., Runner]] = {
    "frozen": _frozen,
    "reference": lambda case, dropout=0.0: _edora("reference", case, edora_linear_reference,
                                                  dropout),
    "peft_lora": _peft(use_dora=False),
    "peft_dora": _peft(use_dora=True),
    **{name: _backend(name) for name in NAMES},
    "compiled": _compiled,
    "lowrank": _lowrank,
}
PROVIDERS = tuple(BUILDERS)
# How tables and plots name each provider: the EDoRA backends by what they are.
LABELS = {name: name for name in PROVIDERS} | {n: b.label for n, b in BACKENDS.items()} | {
    "compiled": "EDoRA torch.compile", "lowrank": "EDoRA, dropout on the rank branch"}


def oracle_name(provider: str) -> str:
    """Whose float64 run a provider's results (y, dx, parameter gradients) are compared with:
    the naive EDoRA reference for every EDoRA implementation (same parameters R, m), the
    provider's own float64 run for the others (PEFT trains other tensors)."""
    return "reference" if provider in EDORA_FAMILY else provider
