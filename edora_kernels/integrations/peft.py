"""For PEFT users: EDoRA from the ``LoraConfig`` you already have.

Swap ``get_peft_model(model, lora_config)`` for ``apply_edora_from_lora_config(model,
lora_config)``: the targets, rank, alpha, dropout, rsLoRA scaling, ``exclude_modules`` and
``modules_to_save`` carry over. Options PEFT offers that EDoRA has no counterpart for are refused
by name rather than ignored.
"""
from __future__ import annotations

import math

from torch import nn

from ..checks import check_target_modules, exact_names, matches_target
from ..layer import EDoRALinear, freeze_all_but_adapters
from ..model import EDoRASummary, apply_edora

# LoraConfig fields whose non-default value changes what PEFT would build and that EDoRA cannot
# honour; each maps to the value that means "off".
_UNSUPPORTED = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "fan_in_fan_out": False,
    "bias": "none",
    "init_lora_weights": True,
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


def _matches(name: str, patterns, field: str) -> bool:
    """PEFT's matching rule (``checks.matches_target``); None or an empty list matches
    nothing. ``field`` names the config field in errors."""
    if patterns is None or (not isinstance(patterns, str) and not patterns):
        return False
    return matches_target(name, check_target_modules(patterns, field))


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def target_names(model: nn.Module, config, kind: str = "LoraConfig") -> list[str]:
    """The module names PEFT's ``target_modules`` (including "all-linear") and
    ``exclude_modules`` select among the plain ``nn.Linear`` modules of ``model``; ``config``
    is a LoraConfig or an EDoRAConfig (``kind`` names it in errors)."""
    targets = config.target_modules
    if targets is None:
        raise ValueError(f"{kind}.target_modules is None; name the modules to adapt "
                         "(PEFT would infer them from the model type, EDoRA does not)")
    if targets == "all-linear":
        # PEFT's meaning: every linear layer except the output head.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in _linear_names(model) if model.get_submodule(n) is not head]
    else:
        names = [n for n in _linear_names(model)
                 if _matches(n, targets, f"{kind}.target_modules")]
    excluded = getattr(config, "exclude_modules", None)
    return [n for n in names if not _matches(n, excluded, f"{kind}.exclude_modules")]


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
    ``modules_to_save`` → those modules stay trainable (in place: no copy is kept as PEFT does),
    ``inference_mode=True`` → every parameter frozen, adapters included. ``use_dora`` is
    irrelevant (EDoRA always splits magnitude and direction). Fields with no EDoRA counterpart
    (``rank_pattern``, ``layer_replication``, ``trainable_token_indices``,
    ``target_parameters``, other initialisations, ...) are refused by name when set. Everything
    is checked before the model changes. Other arguments go to
    :func:`edora_kernels.apply_edora`.
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
    # modules_to_save is resolved before apply_edora changes anything.
    to_save = list(getattr(config, "modules_to_save", None) or [])
    field = "LoraConfig.modules_to_save"
    kept = [n for n, m in model.named_modules() if n and _matches(n, to_save, field)]
    missing = [p for p in to_save if not any(_matches(n, [p], field) for n in kept)]
    if missing:
        raise ValueError(f"LoraConfig.modules_to_save entries {missing} match no module")
    summary = apply_edora(model, exact_names(names), rank, alpha, init=init, seed=seed,
                          progress=progress, dropout=config.lora_dropout, **layer_kwargs)
    if getattr(config, "inference_mode", False):
        freeze_all_but_adapters(model, trainable=False)
        summary.trainable_params = 0
        return summary
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
