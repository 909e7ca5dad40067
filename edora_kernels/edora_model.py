"""A PEFT-shaped front door: ``EDoRAConfig`` and ``get_edora_model(model, config)``.

``EDoRAModel`` wraps a model the way ``PeftModel`` does: forward and generate pass through,
``save_pretrained`` writes a small adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``: R, magnitude, A, B and the ``modules_to_save`` heads), and
``EDoRAModel.from_pretrained(model, directory)`` restores the outputs bit-exactly.
``merge_and_unload``/``unload`` hand back a plain model; ``disable_adapter()`` runs the base
model for a block. The config file says ``"peft_type": "EDORA"``, which PEFT's and transformers'
own loaders refuse (KeyError) instead of silently dropping the adapter.

With PEFT installed, ``EDoRAModel`` is a ``peft.PeftModel`` subclass (its ``__init__`` is not
used) with the surface ``transformers.Trainer`` relies on: Trainer then writes adapter-sized
checkpoints through ``save_pretrained`` and resumes through ``load_adapter``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_io import edora_layers, load_edora_state_dict, save_edora
from .checks import exact_names, matches_target
from .export import merge_and_unload, unload
from .integrations.peft import target_names
from .model import apply_edora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEADS_NAME = "modules_to_save.safetensors"
PEFT_TYPE = "EDORA"
# PEFT's defaults for the task heads it trains and saves with the adapter.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


@dataclass
class EDoRAConfig:
    """What ``get_edora_model`` builds; round-trips through JSON (``to_dict``/``from_dict``)."""

    r: int = 16
    alpha: float = 16.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    dropout: float = 0.0
    dropout_mode: str = "peft"
    init: str = "rsvd"
    seed: int | None = 0
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    detach_norm: bool = True
    backend: str = "auto"
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def heads(self) -> list[str]:
        """``modules_to_save``, or PEFT's default heads for ``task_type``."""
        return list(self.modules_to_save or TASK_HEADS.get(self.task_type or "", []))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EDoRAConfig":
        values = dict(values)
        if values.pop("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError("not an EDoRA config (peft_type is not 'EDORA')")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EDoRAConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_lora_config(cls, lora_config) -> "EDoRAConfig":
        """The EDoRA counterpart of a PEFT ``LoraConfig`` (rsLoRA's alpha/√r scaling kept)."""
        rank = lora_config.r
        alpha = lora_config.lora_alpha * (math.sqrt(rank) if lora_config.use_rslora else 1.0)
        task = lora_config.task_type
        return cls(r=rank, alpha=alpha, target_modules=_plain(lora_config.target_modules),
                   exclude_modules=_plain(lora_config.exclude_modules),
                   dropout=lora_config.lora_dropout,
                   modules_to_save=_plain(lora_config.modules_to_save),
                   task_type=None if task is None else str(getattr(task, "value", task)))


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _head_names(model: nn.Module, heads: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and heads and matches_target(n, heads)]


try:  # only for isinstance checks in Trainer and accelerate; no PEFT machinery is used
    from peft import PeftModel as _Base
except ImportError:
    _Base = nn.Module


class EDoRAModel(_Base):
    """``model`` with EDoRA layers in place; see the module docstring."""

    def __init__(self, model: nn.Module, config: EDoRAConfig, *, apply: bool = True) -> None:
        nn.Module.__init__(self)
        self.base_model = model
        self.edora_config = config
        if apply:
            names = target_names(model, config, "EDoRAConfig")
            if not names:
                raise ValueError(f"EDoRAConfig.target_modules={config.target_modules!r} selects "
                                 f"no nn.Linear of {type(model).__name__}")
            apply_edora(model, exact_names(names), config.r, config.alpha,
                        init=config.init, seed=config.seed, progress=False,
                        dropout=config.dropout, dropout_mode=config.dropout_mode,
                        detach_norm=config.detach_norm, backend=config.backend)
        self.set_trainable(True)

    # --- pass-through -------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # What Trainer reads on a PeftModel: one adapter, called "default".
    @property
    def peft_config(self) -> dict:
        return {"default": self.edora_config}

    @property
    def active_adapters(self) -> list[str]:
        return ["default"]

    @property
    def active_adapter(self) -> str:
        return "default"

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", *,
                     is_trainable: bool = False, **_ignored) -> None:
        """Load a ``save_pretrained`` directory's adapter and heads into this model (Trainer's
        resume path)."""
        if adapter_name != "default":
            raise ValueError(f"EDoRAModel holds one adapter, 'default'; got {adapter_name!r}")
        _load_into(self.base_model, directory)
        self.set_trainable(is_trainable)

    # --- training state -----------------------------------------------------------------------

    def head_names(self) -> list[str]:
        return _head_names(self.base_model, self.edora_config.heads())

    def set_trainable(self, trainable: bool) -> None:
        """R and magnitude of every EDoRA layer and the ``modules_to_save`` heads train (or
        not); everything else stays frozen."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for layer in edora_layers(self.base_model).values():
            layer.R.requires_grad_(trainable)
            layer.magnitude.requires_grad_(trainable)
        for name in self.head_names():
            for p in self.base_model.get_submodule(name).parameters():
                p.requires_grad_(trainable)

    def print_trainable_parameters(self) -> None:
        params = list(self.base_model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model (W0, no adapter) inside the block."""
        layers = list(edora_layers(self.base_model).values())
        for layer in layers:
            layer.adapter_disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_disabled = False

    def merge_and_unload(self) -> nn.Module:
        return merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        return unload(self.base_model)

    # --- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, **_ignored) -> None:
        """``adapter_config.json``, the adapter (R, magnitude, A, B) and the trained heads."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.edora_config.to_dict(), f, indent=2)
        save_edora(self.base_model, os.path.join(directory, WEIGHTS_NAME))
        heads = {f"{name}.{k}": v.detach().cpu().contiguous()
                 for name in self.head_names()
                 for k, v in self.base_model.get_submodule(name).state_dict().items()}
        if heads:
            save_file(heads, os.path.join(directory, HEADS_NAME))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *,
                        is_trainable: bool = False) -> "EDoRAModel":
        """``model`` (the base architecture with its pretrained weights) with the adapter and
        heads of ``directory``; frozen unless ``is_trainable``."""
        config = _read_config(directory)
        _load_into(model, directory)
        wrapped = cls(model, config, apply=False)
        wrapped.set_trainable(is_trainable)
        return wrapped


def _read_config(directory) -> EDoRAConfig:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            return EDoRAConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable EDoRA adapter config ({err})") from None


def _load_into(model: nn.Module, directory) -> None:
    """The adapter (layers rebuilt from the file where the model has none) and the heads."""
    load_edora_state_dict(model, os.path.join(directory, WEIGHTS_NAME))
    heads_path = os.path.join(directory, HEADS_NAME)
    if not os.path.exists(heads_path):
        return
    heads = load_file(heads_path)
    state = model.state_dict(keep_vars=True)
    unknown = sorted(set(heads) - set(state))
    if unknown:
        raise ValueError(f"{heads_path}: {unknown[:8]} are not in {type(model).__name__}")
    with torch.no_grad():
        for key, value in heads.items():
            state[key].copy_(value)


def get_edora_model(model: nn.Module, config: EDoRAConfig) -> EDoRAModel:
    """Apply EDoRA to ``model`` in place as ``config`` says and wrap it; PEFT's
    ``get_peft_model`` counterpart."""
    return EDoRAModel(model, config)
