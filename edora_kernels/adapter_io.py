"""The adapter of a model as a file or a dict: what to save, how to read it back, all validated.

The file is safetensors: for every EDoRA layer ``name`` the tensors ``name.A``, ``name.B``,
``name.R`` and ``name.magnitude``, plus a JSON config in the metadata (per layer: rank, the
saved ``LayerOptions``, shape, base kind) so that a model without EDoRA layers can be rebuilt
from the file alone, around whatever base layers it has. Loading checks every key, shape, dtype
and value (finite, on no meta device) and builds every new layer before the model changes (the
shared installer, ``install``): an error leaves the model as it was.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import bases
from .checks import check_rank, quote
from .distributed import copy_whole, main_process, sharded_registered, whole
from .install import install, positions
from .layer import EDoRALinear, freeze_all_but_adapters
from .options import LayerOptions

ADAPTER_TENSORS = ("A", "B", "R", "magnitude")
FORMAT = "edora_kernels.adapter"
FORMAT_VERSION = "1"


class LoadResult(NamedTuple):
    """Keys tolerated by ``load_edora_state_dict(..., strict=False)``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _key(name: str, tensor: str) -> str:
    """The state-dict key of one tensor of the layer ``name``."""
    return f"{name}.{tensor}" if name else tensor


def edora_layers(model: nn.Module) -> dict[str, EDoRALinear]:
    """The EDoRA layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EDoRALinear)}


def within_edora_layers(model: nn.Module) -> set[str]:
    """The names of the modules inside EDoRA layers (their base layers, their adapters'):
    never targets of another adaptation, whose adapter would sit where no forward runs it."""
    layers = [name + "." for name in edora_layers(model)]
    return {n for n, _ in model.named_modules(remove_duplicate=False)
            if any(n.startswith(layer) for layer in layers)}


# --- saving ------------------------------------------------------------------------------------

def edora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{f"{name}.{t}": tensor}`` for t in A, B, R, magnitude of every EDoRA layer (detached,
    whole: a tensor FSDP2 sharded is gathered, so under FSDP2 every rank calls this)."""
    return {_key(name, t): whole(getattr(layer, t).detach())
            for name, layer in edora_layers(model).items() for t in ADAPTER_TENSORS}


def layer_config(layer: EDoRALinear, basis=None) -> dict:
    """What the file records of one layer, enough to rebuild it from A and B: its options, and
    the rank and alpha of ``basis`` (the layer's own unless one of its ``extra_bases``)."""
    basis = layer if basis is None else basis
    return {**layer.options.saved(), "rank": basis.rank, "alpha": basis.alpha,
            "in_features": layer.in_features, "out_features": layer.out_features,
            "base": layer.kind.name}


def adapter_tensors(model: nn.Module,
                    state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What :func:`save_edora` writes: :func:`edora_state_dict`, or the same keys taken from
    ``state_dict`` (``model``'s state dict, gathered already); a missing key raises."""
    layers = edora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EDoRALinear layers; "
                         "call apply_edora first")
    if state_dict is None:
        return edora_state_dict(model)
    keys = [_key(name, t) for name in layers for t in ADAPTER_TENSORS]
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks the adapter tensors {quote(missing)}")
    return {k: whole(state_dict[k]).detach() for k in keys}


def save_edora(model: nn.Module, path: str | os.PathLike, *,
               state_dict: dict[str, torch.Tensor] | None = None,
               is_main_process: bool | None = None) -> None:
    """Write the adapter of ``model`` (see :func:`edora_state_dict`) and its config to ``path``.

    In several processes only the main one writes (rank 0 unless ``is_main_process`` says).
    Under FSDP2 either every rank calls this (the shards are gathered) or the caller passes
    ``state_dict``, ``model``'s state dict gathered already (accelerate's ``get_state_dict``):
    the adapter's tensors are then taken from it and nothing is communicated.
    """
    sharded_registered(model)
    tensors = adapter_tensors(model, state_dict)
    if not main_process(is_main_process):
        return
    write_adapter_file(path, tensors, {name: layer_config(layer)
                                       for name, layer in edora_layers(model).items()})


def write_adapter_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                       layer_configs: dict[str, dict]) -> None:
    """The file :func:`save_edora` writes: ``tensors`` (A, B, R, magnitude by layer) and the
    per-layer configs (:func:`layer_config`) in its metadata."""
    empty = [k for k, v in tensors.items() if v.device.type == "meta"]
    if empty:
        raise ValueError(f"{path}: {quote(empty[:4])}{' …' if len(empty) > 4 else ''} are on "
                         "the meta device and hold no values yet: materialise the model "
                         "(to_empty, then load its weights and adapter) before saving")
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, os.fspath(path), metadata={
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "edora_config": json.dumps({"layers": layer_configs})})


# --- reading and checking ------------------------------------------------------------------------

def read_file(where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, or a ValueError if it is not one."""
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(where), metadata
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{where} is not a readable safetensors file: {err}") from None


def _check_header(where: str, metadata: dict[str, str]) -> None:
    """The metadata names save_edora's format, in the version this code reads."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{where} is not an EDoRA adapter file (metadata 'format' is "
                         f"{metadata.get('format')!r}, expected {FORMAT!r}); write it with "
                         "save_edora")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where} has adapter format version "
                         f"{metadata.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION!r}")


def _parse_config(where: str, metadata: dict[str, str]) -> dict[str, dict]:
    """The per-layer configs from the 'edora_config' metadata, each one checked."""
    if "edora_config" not in metadata:
        raise ValueError(f"{where} has no 'edora_config' in its metadata: the file is damaged")
    try:
        layers = json.loads(metadata["edora_config"])["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: the 'edora_config' metadata is not the JSON save_edora "
                         f"writes ({type(err).__name__}: {err})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'edora_config.layers' must map layer names to configs")
    for name, cfg in layers.items():
        _check_layer_config(f"{where}: layer {name!r}", cfg)
    return layers


def _check_layer_config(where: str, cfg) -> None:
    """One layer's config has every field, each of a value the layer accepts."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: config must be an object, got {cfg!r}")
    missing = [k for k in ("rank", *LayerOptions.SAVED) if k not in cfg
               and k != "dropout_mode"]  # files before dropout_mode existed: "peft"
    if missing:
        raise ValueError(f"{where}: config lacks {missing}")
    try:
        check_rank(cfg["rank"])
        _options(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _options(cfg: dict) -> LayerOptions:
    """The layer options a file records (backend "auto", the initialisation irrelevant)."""
    return LayerOptions(**{k: cfg[k] for k in LayerOptions.SAVED if k in cfg})


def _source(state_or_path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors and the per-layer configs (none for a dict) of what is being loaded."""
    if isinstance(state_or_path, dict):
        return state_or_path, {}
    if not isinstance(state_or_path, (str, os.PathLike)):
        raise TypeError("state_or_path must be a dict of tensors or a path to a save_edora file, "
                        f"got {type(state_or_path).__name__}")
    where = os.fspath(state_or_path)
    state, metadata = read_file(where)
    _check_header(where, metadata)
    return state, _parse_config(where, metadata)


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors of a :func:`save_edora` file and its per-layer configs, header and configs
    checked (tensors are checked by whoever knows their expected shapes)."""
    return _source(os.fspath(path))


def _expected_shapes(rank: int, out_features: int, in_features: int) -> dict[str, tuple]:
    """The shape of each adapter tensor of a layer."""
    return {"A": (rank, in_features), "B": (out_features, rank), "R": (rank, rank),
            "magnitude": (out_features,)}


def _plan(model: nn.Module, config: dict) -> tuple[dict, dict, dict[str, tuple]]:
    """Existing EDoRA layers, the base layers the config rebuilds (with every name each is
    registered under), each key's shape."""
    existing = edora_layers(model)
    modules = dict(model.named_modules())
    where = positions(model)
    to_build = {name: (cfg, where[id(modules[name])]) for name, cfg in config.items()
                if name not in existing and name in modules
                and bases.kind_of(modules[name]) is not None}
    expected: dict[str, tuple] = {}
    for name, layer in existing.items():
        shapes = _expected_shapes(layer.rank, layer.out_features, layer.in_features)
        expected.update({_key(name, t): shape for t, shape in shapes.items()})
    for name, (cfg, _) in to_build.items():
        module = modules[name]
        in_f, out_f = bases.features(module, bases.kind_of(module))
        shapes = _expected_shapes(cfg["rank"], out_f, in_f)
        expected.update({_key(name, t): shape for t, shape in shapes.items()})
    return existing, to_build, expected


def tensor_problems(state: dict, expected: dict[str, tuple]) -> list[str]:
    """Each present key whose value is not a real, finite floating tensor of the expected shape."""
    problems = []
    for key in sorted(k for k in expected if k in state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            problems.append(f"{key}: a {type(t).__name__}, not a torch.Tensor")
        elif t.device.type == "meta":
            problems.append(f"{key}: a meta tensor (no values)")
        elif not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype} is not floating point")
        elif tuple(t.shape) != expected[key]:
            problems.append(f"{key}: got {tuple(t.shape)}, expected {expected[key]}")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: contains NaN or Inf")
    return problems


def _load_problems(state, config, existing, expected, keys: LoadResult, strict) -> list[str]:
    """Every reason to refuse the load: bad tensors, keys (strict), alpha, merged layers."""
    problems = []
    bad = tensor_problems(state, expected)
    if bad:
        problems.append(f"bad tensors: {quote(bad)}")
    if strict and keys.missing_keys:
        problems.append(f"missing keys: {quote(keys.missing_keys)}")
    if strict and keys.unexpected_keys:
        hint = ("" if existing or config else "; the model has no EDoRA layers: pass the "
                "save_edora file (it carries the config to rebuild them) or call apply_edora first")
        problems.append(f"unexpected keys: {quote(keys.unexpected_keys)}{hint}")
    alpha_diff = sorted(f"{n}: model {layer.alpha:g}, file {config[n]['alpha']:g}"
                        for n, layer in existing.items()
                        if n in config and layer.alpha != config[n]["alpha"])
    if alpha_diff:
        problems.append(f"alpha differs from the file's for {quote(alpha_diff)}")
    merged = sorted(n for n, layer in existing.items() if layer.merged)
    if merged:
        problems.append(f"layers {quote(merged)} are merged; call unmerge() before loading")
    return problems


def _build_layers(model, state, to_build) -> list[tuple[list[str], EDoRALinear]]:
    """The layers the config rebuilds from its A and B (no SVD), not yet installed."""
    built = []
    for name, (cfg, names) in to_build.items():
        if any(_key(name, t) not in state for t in ADAPTER_TENSORS):
            continue  # strict=False and incomplete: the base layer stays as it is
        layer = EDoRALinear.from_factors(
            model.get_submodule(name), state[_key(name, "A")], state[_key(name, "B")],
            **vars(_options(cfg).replace(sigma=0.0)))
        built.append((names, layer))
    return built


def _assign(model, state, existing, built) -> None:
    """Install the built layers, then copy every tensor of ``state`` into its layer."""
    install(model, built)
    layers = {**existing, **{names[0]: layer for names, layer in built}}
    for name, layer in layers.items():
        for t in ADAPTER_TENSORS:
            if _key(name, t) in state:
                copy_whole(getattr(layer, t), state[_key(name, t)])
    if built:
        freeze_all_but_adapters(model)


@torch.no_grad()
def load_edora_state_dict(
    model: nn.Module,
    state_or_path: dict[str, torch.Tensor] | str | os.PathLike,
    strict: bool = True,
) -> LoadResult:
    """Load an adapter into ``model``: a dict from :func:`edora_state_dict` or a file from
    :func:`save_edora`.

    EDoRA layers already in the model receive the tensors (copied, cast to their dtype and
    device; ``requires_grad`` untouched). Given a file, the base layers named in its config
    (``nn.Linear``, ``Conv1D``, quantized linears) are first wrapped in EDoRA layers from the
    saved A and B (no SVD is run; rank and the saved options from the file, backend "auto"), at
    every name each is registered under and with tied weights recorded, as
    :func:`apply_edora` does; the model is then frozen as it leaves it. Nothing is changed
    unless every check passes: a tensor that is not a finite floating tensor of the expected
    shape, a damaged file or config, and an alpha
    that differs from the file's always raise, and with ``strict`` so do missing and unexpected
    keys, each listed by name. Returns the tolerated ``(missing_keys, unexpected_keys)``.
    """
    state, config = _source(state_or_path)
    existing, to_build, expected = _plan(model, config)
    keys = LoadResult(sorted(k for k in expected if k not in state),
                      sorted(k for k in state if k not in expected))
    problems = _load_problems(state, config, existing, expected, keys, strict)
    if problems:
        raise ValueError(f"cannot load the EDoRA adapter into {type(model).__name__}: "
                         + "; ".join(problems))
    built = _build_layers(model, state, to_build)
    # Every check passed and every layer is built: only now does the model change.
    _assign(model, state, existing, built)
    return keys
