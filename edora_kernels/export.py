"""Leaving EDoRA: plain base layers (merged or not), or a stock PEFT DoRA adapter.

- :func:`merge_and_unload` replaces every EDoRA layer by a base layer of its base's kind whose
  weight is the merged ``m/‖V‖ ⊙ V`` (``nn.Linear``, ``Conv1D``, a quantized layer quantized
  again): a model that loads and runs without this package.
- :func:`unload` replaces them by their base layers with the original W0 (the adapter dropped).
- :func:`export_peft_dora` writes a directory that ``peft.PeftModel.from_pretrained`` loads as a
  DoRA adapter with identical outputs: EDoRA is DoRA with ``lora_A = A`` and ``lora_B = B R``
  (same scaling, same magnitude), so tools that only know PEFT can serve it.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from safetensors.torch import save_file
from torch import nn

from . import bases
from .adapter_io import edora_layers
from .checks import exact_names
from .install import install, positions


def _replace_all(model: nn.Module, build) -> nn.Module:
    """Every EDoRA layer (at every name it is registered under) replaced by ``build(layer)``,
    in the layer's training mode (a fresh layer starts in training mode, in which an 8-bit
    bitsandbytes layer computes differently); all are built before the model changes."""
    where = positions(model)
    install(model, [(where[id(layer)], build(layer).train(layer.training))
                    for layer in edora_layers(model).values()])
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every EDoRA layer by a base layer of its base's kind holding the merged weight
    ``m/‖W0 + s·BRA‖ ⊙ (W0 + s·BRA)`` (rounded once to W0's dtype; for a quantized base,
    quantized again — a fresh quantization error of the scheme's size); returns ``model``.

    The new weights are fresh tensors: W0 and any parameter tied to it stay untouched. Given an
    ``EDoRAModel``, returns its base model with the trained heads.
    """
    from .edora_model import EDoRAModel  # the wrapper imports this module

    if isinstance(model, EDoRAModel):
        return model.merge_and_unload()
    if not edora_layers(model):
        raise ValueError(f"{type(model).__name__} has no EDoRALinear layers")
    return _replace_all(model, lambda layer: bases.rebuilt(layer.base_layer, layer.kind,
                                                          layer.merged_weight()))


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Replace every EDoRA layer by its base layer with the original W0 (adapter dropped; a
    merged dense layer gets W0 back in a fresh layer). Given an ``EDoRAModel``, returns its base
    model with the original heads."""
    from .edora_model import EDoRAModel  # the wrapper imports this module

    if isinstance(model, EDoRAModel):
        return model.unload()
    if not edora_layers(model):
        raise ValueError(f"{type(model).__name__} has no EDoRALinear layers")

    def base(layer):
        if not layer.merged:
            return layer.base_layer
        return bases.rebuilt(layer.base_layer, layer.kind, layer.base_weight())

    return _replace_all(model, base)


def export_peft_dora(model: nn.Module, directory: str | os.PathLike, *,
                     base_model_name_or_path: str | None = None,
                     task_type: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of a PEFT LoRA adapter
    with ``use_dora=True`` whose outputs equal this EDoRA adapter's.

    Layers of other ranks or alphas than the most common ones are written to PEFT's
    ``rank_pattern`` / ``alpha_pattern`` under their exact names. Keys follow PEFT's layout
    for a model wrapped as ``base_model.model``. Given an ``EDoRAModel``, its base model is
    exported with its trained heads as PEFT ``modules_to_save`` and its ``task_type``. Each
    layer's active adapter is exported. ``fan_in_fan_out`` is set when any layer is a GPT-2
    ``Conv1D``; PEFT sets it per layer by the layer's type, so Conv1D and ``nn.Linear`` layers
    (GPT-2's ``lm_head``) mix. Nothing is written unless everything can be.
    """
    from .edora_model import EDoRAModel  # the wrapper imports this module

    for name, value in (("base_model_name_or_path", base_model_name_or_path),
                        ("task_type", task_type)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"export_peft_dora: {name} must be a str or None, got "
                            f"{type(value).__name__}")

    heads: dict[str, nn.Module] = {}
    if isinstance(model, EDoRAModel):
        model.only_active_adapter("export_peft_dora")
        heads = {name: head.module_for(head.active_adapter)
                 for name, head in model.heads().items()}
        task_type = task_type or model.edora_config.task_type
        model = model.get_base_model()
    layers = edora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EDoRALinear layers")
    # The basis of each layer's active adapter; its most common rank and alpha are the
    # config's, the others go to PEFT's patterns, keyed by each layer's exact name.
    used = {name: layer.basis_of(layer.active_adapter) for name, layer in layers.items()}
    rank = Counter(basis.rank for basis in used.values()).most_common(1)[0][0]
    alpha = Counter(basis.alpha for basis in used.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): basis.rank for n, basis in used.items() if basis.rank != rank}
    alpha_pattern = {re.escape(n): basis.alpha for n, basis in used.items()
                     if basis.alpha != alpha}
    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        R, magnitude = layer.adapter_weights(layer.active_adapter)
        B_R = used[name].B.double() @ R.detach().double()
        tensors[f"{prefix}.lora_A.weight"] = used[name].A.detach().float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B_R.float().contiguous()
        tensors[f"{prefix}.lora_magnitude_vector"] = magnitude.detach().float()
    for name, head in heads.items():  # PEFT stores a modules_to_save copy under its own name
        for key, value in head.state_dict().items():
            tensors[f"base_model.model.{name}.{key}"] = value.detach().contiguous()
    config = {"peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "target_modules": exact_names(sorted(layers)),
              "use_dora": True, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": any(layer.kind is bases.CONV1D for layer in layers.values()),
              "modules_to_save": sorted(heads) or None,
              "base_model_name_or_path": base_model_name_or_path}
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()},
              os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
