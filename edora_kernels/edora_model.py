"""A PEFT-shaped front door: ``get_edora_model(model, EDoRAConfig(...))`` → ``EDoRAModel``.

``EDoRAModel`` wraps a model the way ``PeftModel`` does: forward and generate pass through,
``save_pretrained`` writes a small adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``: R, magnitude, A, B; the trained heads beside them), and
``EDoRAModel.from_pretrained(model, directory)`` restores the outputs bit-exactly.
``merge_and_unload``/``unload`` hand back a plain model; ``disable_adapter()`` runs the base
model — the base layers and the original heads — for a block. The config file says
``"peft_type": "EDORA"``, which PEFT's and transformers' own loaders refuse (KeyError) instead of
silently dropping the adapter.

Heads (``modules_to_save`` and the ``task_type``'s heads) are wrapped as PEFT wraps them: a
trained copy beside the frozen original (``TrainedHead``).

No PEFT is imported until a model is wrapped. With PEFT installed, the model returned is also a
``peft.PeftModel`` (a subclass made on first use, its ``__init__`` unused) with the surface
``transformers.Trainer`` relies on: Trainer then writes adapter-sized checkpoints through
``save_pretrained`` and resumes through ``load_adapter``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_io import adapter_tensors, edora_layers, load_edora_state_dict, save_edora
from .checks import exact_names, matches_target
from .config import EDoRAConfig
from .distributed import copy_whole, main_process, whole
from .export import merge_and_unload, unload
from .install import install, positions
from .integrations.peft import target_names
from .model import apply_edora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEADS_NAME = "modules_to_save.safetensors"


class TrainedHead(nn.Module):
    """A head EDoRA trains and saves with the adapter (PEFT's ``modules_to_save``): a trainable
    copy beside the frozen original, which runs instead while the adapter is disabled."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.trained_module = copy.deepcopy(original)
        self.use_original = False

    def forward(self, *args, **kwargs):
        module = self.original_module if self.use_original else self.trained_module
        return module(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The unwrapped head's own keys (a checkpoint of the base model, loaded after a
        # meta-device build) fill both copies.
        copies = (prefix + "original_module.", prefix + "trained_module.")
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(copies)]:
            value = state_dict.pop(key)
            for copy_prefix in copies:
                state_dict.setdefault(copy_prefix + key[len(prefix):], value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the head's own attributes (out_features, weight, ...)
            return getattr(self.trained_module, name)


def _head_names(model: nn.Module, heads: list[str]) -> list[str]:
    """The modules the head patterns select, outermost only (a head's own children are part of
    it), once each."""
    names = [n for n, _ in model.named_modules() if n and heads and matches_target(n, heads)]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


class EDoRAModel(nn.Module):
    """``model`` with EDoRA layers in place; see the module docstring. Build one with
    :func:`get_edora_model` or :meth:`from_pretrained`."""

    def __init__(self, model: nn.Module, config: EDoRAConfig, *, apply: bool = True) -> None:
        nn.Module.__init__(self)
        if apply:
            names = target_names(model, config, "EDoRAConfig")
            if not names:
                raise ValueError(f"EDoRAConfig.target_modules={config.target_modules!r} selects "
                                 f"no layer EDoRA can wrap in {type(model).__name__}")
            options = config.layer_options()
            apply_edora(model, exact_names(names), config.r, seed=config.seed, progress=False,
                        **vars(options))
        self.base_model = model
        self.edora_config = config
        self._wrap_heads()
        self.set_trainable(not config.inference_mode)

    def __new__(cls, *args, **kwargs):
        # With PEFT installed, an EDoRAModel is also a peft.PeftModel (Trainer's isinstance).
        if cls is EDoRAModel:
            cls = _peft_flavoured()
        return super().__new__(cls)

    def _wrap_heads(self) -> None:
        where = positions(self.base_model)
        wrapped = []
        for name in _head_names(self.base_model, self.edora_config.heads()):
            module = self.base_model.get_submodule(name)
            if not isinstance(module, TrainedHead):
                wrapped.append((where[id(module)], TrainedHead(module)))
        install(self.base_model, wrapped)

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
        _load_into(self.base_model, directory, self.heads())
        self.set_trainable(is_trainable)

    # --- training state -----------------------------------------------------------------------

    def heads(self) -> dict[str, TrainedHead]:
        """The trained heads by name."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, TrainedHead)}

    def head_names(self) -> list[str]:
        return list(self.heads())

    def set_trainable(self, trainable: bool) -> None:
        """R and magnitude of every EDoRA layer and the trained heads train (or not);
        everything else stays frozen."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for layer in edora_layers(self.base_model).values():
            layer.R.requires_grad_(trainable)
            layer.magnitude.requires_grad_(trainable)
        for head in self.heads().values():
            head.trained_module.requires_grad_(trainable)

    def print_trainable_parameters(self) -> None:
        params = list(self.base_model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model inside the block: W0 alone in every EDoRA layer and the original
        heads — bit-exactly the model before EDoRA."""
        switches = [*edora_layers(self.base_model).values(), *self.heads().values()]
        for module in switches:
            _set_disabled(module, True)
        try:
            yield
        finally:
            for module in switches:
                _set_disabled(module, False)

    def merge_and_unload(self) -> nn.Module:
        """The base model with merged weights and the trained heads (PEFT's meaning)."""
        _unwrap_heads(self.base_model, trained=True)
        return merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        """The base model as it was: W0 and the original heads."""
        _unwrap_heads(self.base_model, trained=False)
        return unload(self.base_model)

    # --- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool | None = None, **_ignored) -> None:
        """``adapter_config.json``, the adapter (R, magnitude, A, B) and the trained heads.

        Only the main process writes (rank 0 unless ``is_main_process`` says, PEFT's argument).
        Under FSDP2 call it on every rank — the sharded tensors are gathered, a collective — or
        pass ``state_dict``, this model's state dict gathered already (Trainer does): the
        tensors are then read from it and nothing is communicated.
        """
        if state_dict is not None:  # this wrapper's keys, or the base model's
            state_dict = {k.removeprefix("base_model."): v for k, v in state_dict.items()}
        adapter = adapter_tensors(self.base_model, state_dict)  # gathered: every rank joins
        heads = {}
        for name, head in self.heads().items():
            for k, v in head.trained_module.state_dict().items():
                key = f"{name}.trained_module.{k}"
                if state_dict is not None and key not in state_dict:
                    raise ValueError(f"state_dict lacks the trained head tensor {key!r}")
                value = v if state_dict is None else state_dict[key]
                heads[f"{name}.{k}"] = whole(value).detach().cpu().contiguous()
        if not main_process(is_main_process):
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.edora_config.to_dict(), f, indent=2)
        save_edora(self.base_model, os.path.join(directory, WEIGHTS_NAME),
                   state_dict=adapter, is_main_process=True)
        if heads:
            save_file(heads, os.path.join(directory, HEADS_NAME))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *,
                        is_trainable: bool = False) -> "EDoRAModel":
        """``model`` (the base architecture with its pretrained weights) with the adapter and
        heads of ``directory``; frozen and in eval mode unless ``is_trainable``."""
        config = _read_config(directory)
        load_edora_state_dict(model, os.path.join(directory, WEIGHTS_NAME))
        wrapped = cls(model, config, apply=False)
        _load_into(model, directory, wrapped.heads(), adapter=False)
        wrapped.set_trainable(is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped


def _set_disabled(module, disabled: bool) -> None:
    if isinstance(module, TrainedHead):
        module.use_original = disabled
    else:
        module.adapter_disabled = disabled


def _unwrap_heads(model: nn.Module, *, trained: bool) -> None:
    where = positions(model)
    install(model, [(where[id(head)], head.trained_module if trained else head.original_module)
                    for head in {id(m): m for m in model.modules()
                                 if isinstance(m, TrainedHead)}.values()])


def _read_config(directory) -> EDoRAConfig:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            return EDoRAConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable EDoRA adapter config ({err})") from None


def _load_into(model: nn.Module, directory, heads: dict[str, TrainedHead], *,
               adapter: bool = True) -> None:
    """The adapter (layers rebuilt from the file where the model has none) and the heads."""
    if adapter:
        load_edora_state_dict(model, os.path.join(directory, WEIGHTS_NAME))
    heads_path = os.path.join(directory, HEADS_NAME)
    if not os.path.exists(heads_path):
        return
    saved = load_file(heads_path)
    state = {f"{name}.{k}": v for name, head in heads.items()
             for k, v in head.trained_module.state_dict(keep_vars=True).items()}
    unknown = sorted(set(saved) - set(state))
    if unknown:
        raise ValueError(f"{heads_path}: {unknown[:8]} are not heads of {type(model).__name__} "
                         f"(its heads: {sorted(heads)})")
    with torch.no_grad():
        for key, value in saved.items():
            copy_whole(state[key], value)


_PEFT_CLASS: type | None = None


def _peft_flavoured() -> type:
    """``EDoRAModel``, or with PEFT installed a subclass that is also a ``peft.PeftModel`` (made
    on first use: importing PEFT imports transformers, seconds that ``import edora_kernels``
    does not pay)."""
    global _PEFT_CLASS
    if _PEFT_CLASS is None:
        if importlib.util.find_spec("peft") is None:
            _PEFT_CLASS = EDoRAModel
        else:
            from peft import PeftModel

            _PEFT_CLASS = type("EDoRAPeftModel", (EDoRAModel, PeftModel),
                               {"__module__": __name__, "__doc__": EDoRAModel.__doc__})
    return _PEFT_CLASS


def __getattr__(name):
    # Unpickling an EDoRAPeftModel in a fresh process finds the class here.
    if name == "EDoRAPeftModel":
        return _peft_flavoured()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_edora_model(model: nn.Module, config: EDoRAConfig) -> EDoRAModel:
    """Apply EDoRA to ``model`` in place as ``config`` says and wrap it; PEFT's
    ``get_peft_model`` counterpart."""
    return EDoRAModel(model, config)
