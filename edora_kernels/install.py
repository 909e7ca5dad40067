"""Putting modules into a model — the one installer of ``apply_edora``, the adapter loader and
the ways out (``merge_and_unload``, ``unload``).

A module registered under several names (shared between two parents) is replaced at every one
of them by the same new module; an EDoRA layer learns which other parameters of the model share
its W0's storage (an ``lm_head`` tied to the embedding), so that ``merge()`` can refuse to
change them too.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import EDoRALinear


def positions(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object is registered, by ``id``."""
    found: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            found.setdefault(id(module), []).append(name)
    return found


def _parameters_by_storage(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage; parameters with no storage of their own (meta tensors,
    tensor subclasses such as torchao's quantized weights) are left out."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta" and type(p) in (torch.Tensor, nn.Parameter):
            names.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    return names


def install(model: nn.Module, replacements: list[tuple[list[str], nn.Module]]) -> None:
    """Set each new module at every one of its names (all of them built beforehand: the model
    changes only here); EDoRA layers record the parameters tied to their W0."""
    tied = _parameters_by_storage(model)
    for names, module in replacements:
        if isinstance(module, EDoRALinear):
            module.adapted_name = names[0]
            if module.kind.dense and module.weight.device.type != "meta":
                storage = module.weight.untyped_storage().data_ptr()
                own = {f"{name}.weight" for name in names}
                module.tied_to = [n for n in tied.get(storage, []) if n not in own]
                module.tied_storage = storage
        for name in names:
            model.set_submodule(name, module)
