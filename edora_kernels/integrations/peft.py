"""For PEFT users: EDoRA from the ``LoraConfig`` you already have, and PEFT's module selection.

``get_edora_model(model, EDoRAConfig.from_lora_config(lora_config))`` is the counterpart of
``get_peft_model(model, lora_config)``; ``apply_edora_from_lora_config(model, lora_config)``
applies the same in place without the wrapper. Both go through ``EDoRAConfig.from_lora_config``,
the one converter: options PEFT offers that EDoRA has no counterpart for are refused by name
rather than ignored. No PEFT is imported here.
"""
from __future__ import annotations

from torch import nn

from .. import bases
from ..checks import check_target_modules, exact_names, matches_target
from ..config import EDoRAConfig
from ..layer import EDoRALinear, freeze_all_but_adapters
from ..model import EDoRASummary, apply_edora


def _matches(name: str, patterns, field: str) -> bool:
    """PEFT's matching rule (``checks.matches_target``); None or an empty list matches
    nothing. ``field`` names the config field in errors."""
    if patterns is None or (not isinstance(patterns, str) and not patterns):
        return False
    return matches_target(name, check_target_modules(patterns, field))


def _within(name: str, patterns, field: str) -> bool:
    """Whether ``name`` or a module it sits in matches ``patterns`` (a head, or the copies
    EDoRAModel keeps inside a wrapped head)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), patterns, field) for i in range(1, len(parts) + 1))


def _linear_names(model: nn.Module, adapted: bool = False) -> list[str]:
    """The modules of ``model`` EDoRA can wrap (``edora_kernels.bases``), or has wrapped."""
    from ..adapter_io import edora_layers, within_edora_layers

    if adapted:
        return list(edora_layers(model))
    inside = within_edora_layers(model)
    return [n for n, m in model.named_modules()
            if n and n not in inside and bases.kind_of(m) is not None]


def target_names(model: nn.Module, config, kind: str = "LoraConfig", *,
                 adapted: bool = False) -> list[str]:
    """The module names PEFT's ``target_modules`` (including "all-linear") and
    ``exclude_modules`` select among the layers of ``model`` EDoRA can wrap (``adapted``: among
    its EDoRA layers); ``config`` is a LoraConfig or an EDoRAConfig (``kind`` names it in
    errors)."""
    targets = config.target_modules
    if targets is None:
        raise ValueError(f"{kind}.target_modules is None; name the modules to adapt "
                         "(PEFT would infer them from the model type, EDoRA does not)")
    if targets == "all-linear":
        # PEFT's meaning: every linear layer except the output head and the heads trained
        # whole (modules_to_save and the task type's).
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = config.heads() if hasattr(config, "heads") else []
        names = [n for n in _linear_names(model, adapted)
                 if model.get_submodule(n) is not head
                 and not _within(n, heads, f"{kind}.modules_to_save")]
    else:
        names = [n for n in _linear_names(model, adapted)
                 if _matches(n, targets, f"{kind}.target_modules")]
    excluded = getattr(config, "exclude_modules", None)
    return [n for n in names if not _matches(n, excluded, f"{kind}.exclude_modules")]


def apply_edora_from_lora_config(
    model: nn.Module,
    config,
    *,
    seed: int | None = None,
    progress: bool = True,
    **options,
) -> EDoRASummary:
    """Apply EDoRA to ``model`` in place with the settings of a PEFT ``LoraConfig`` (converted
    by ``EDoRAConfig.from_lora_config``, which refuses what EDoRA cannot honour).

    The selected layers are wrapped; ``modules_to_save`` (and the heads of ``task_type``) stay
    trainable in place (no copy is kept, as ``get_edora_model`` does); ``inference_mode=True``
    freezes every parameter, adapters included. Everything is checked before the model
    changes. ``options`` (layer options such as ``init``) go to :func:`edora_kernels.apply_edora`.
    """
    edora = EDoRAConfig.from_lora_config(config)
    names = target_names(model, edora)
    if not names:
        raise ValueError(f"LoraConfig.target_modules={config.target_modules!r} (exclude_modules="
                         f"{getattr(config, 'exclude_modules', None)!r}) selects no layer EDoRA "
                         f"can wrap in {type(model).__name__}; those are "
                         f"{_linear_names(model)[:12]}")
    # modules_to_save is resolved before apply_edora changes anything.
    to_save = list(getattr(config, "modules_to_save", None) or [])
    field = "LoraConfig.modules_to_save"
    kept = [n for n, m in model.named_modules() if n and _matches(n, edora.heads(), field)]
    missing = [p for p in to_save if not any(_matches(n, [p], field) for n in kept)]
    if missing:
        raise ValueError(f"LoraConfig.modules_to_save entries {missing} match no module")
    layer_options = {**vars(edora.layer_options()), **options}
    summary = apply_edora(model, exact_names(names), edora.r, seed=seed, progress=progress,
                          rank_pattern=edora.rank_pattern, alpha_pattern=edora.alpha_pattern,
                          **layer_options)
    if edora.inference_mode:
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
