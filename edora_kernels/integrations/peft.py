"""For PEFT users: EDoRA from the ``LoraConfig`` you already have.

Swap ``get_peft_model(model, lora_config)`` for ``apply_edora_from_lora_config(model,
lora_config)``: the targets, rank, alpha, dropout, rsLoRA scaling, ``exclude_modules`` and
``modules_to_save`` carry over. Options PEFT offers that EDoRA has no counterpart for are refused
by name rather than ignored.
"""
from __future__ import annotations

import math
import re

from torch import nn

from ..layer import EDoRALinear
from ..model import EDoRASummary, apply_edora

# LoraConfig fields whose non-default value changes what PEFT would build and that EDoRA cannot
# honour; each maps to the value that means "off".
_UNSUPPORTED = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_qalora": False,
    "lora_bias": False,
}


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def target_names(model: nn.Module, config) -> list[str]:
    """The module names PEFT's ``target_modules`` (including "all-linear") and
    ``exclude_modules`` select among the plain ``nn.Linear`` modules of ``model``."""
    targets = config.target_modules
    if targets is None:
        raise ValueError("LoraConfig.target_modules is None; name the modules to adapt "
                         "(PEFT would infer them from the model type, EDoRA does not)")
    if targets == "all-linear":
        # PEFT's meaning: every linear layer except the output head.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in _linear_names(model) if model.get_submodule(n) is not head]
    else:
        names = [n for n in _linear_names(model) if _matches(n, targets)]
    return [n for n in names if not _matches(n, getattr(config, "exclude_modules", None))]


def apply_edora_from_lora_config(
    model: nn.Module,
    config,
    *,
    init: str = "rsvd",
    seed: int | None = None,
    progress: bool = True,
    **layer_kwargs,
) -> EDoRASummary:
    """Apply EDoRA to ``model`` in place with the settings of a PEFT ``LoraConfig``.

    ``r`` → rank, ``lora_alpha`` → alpha (``use_rslora`` keeps PEFT's ``alpha/√r`` scaling),
    ``lora_dropout`` → dropout, ``target_modules``/``exclude_modules`` → the replaced layers,
    ``modules_to_save`` → those modules stay trainable (in place: no copy is kept as PEFT does).
    ``use_dora`` is irrelevant (EDoRA always splits magnitude and direction). Other arguments go
    to :func:`edora_kernels.apply_edora`.
    """
    for name, off in _UNSUPPORTED.items():
        value = getattr(config, name, off)
        if value not in (off, None, {}, []):
            raise ValueError(f"LoraConfig.{name}={value!r} has no EDoRA counterpart; "
                             f"leave it at {off!r}")
    rank = config.r
    alpha = config.lora_alpha * (math.sqrt(rank) if getattr(config, "use_rslora", False) else 1.0)
    names = target_names(model, config)
    if not names:
        raise ValueError(f"LoraConfig.target_modules={config.target_modules!r} (exclude_modules="
                         f"{getattr(config, 'exclude_modules', None)!r}) selects no nn.Linear of "
                         f"{type(model).__name__}; its linear layers are "
                         f"{_linear_names(model)[:12]}")
    summary = apply_edora(model, names, rank, alpha, init=init, seed=seed, progress=progress,
                          dropout=config.lora_dropout, **layer_kwargs)
    to_save = getattr(config, "modules_to_save", None) or []
    kept = [n for n, m in model.named_modules() if n and _matches(n, list(to_save))]
    missing = [p for p in to_save if not any(_matches(n, [p]) for n in kept)]
    if missing:
        raise ValueError(f"LoraConfig.modules_to_save entries {missing} match no module")
    for name in kept:
        for module in model.get_submodule(name).modules():
            if isinstance(module, EDoRALinear):
                continue  # its W0 stays frozen; R and magnitude train anyway
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    if kept:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary.trainable_params = trainable
    return summary
