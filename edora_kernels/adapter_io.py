"""Whole models: swap matching ``nn.Linear`` layers for ``EDoRALinear`` and save/load the adapter.

``apply_edora`` groups the target weights by (shape, dtype, device) and initialises each group
with batched :func:`~edora_kernels.svd.randomized_svd` calls, in chunks whose working memory stays
under a budget (DESIGN §5, §6). The adapter file is safetensors: for every EDoRA layer ``name``
the tensors ``name.A``, ``name.B``, ``name.R`` and ``name.magnitude``, plus a JSON config in the
metadata (per layer: rank, alpha, dropout, detach_norm, shape) so that a plain model can be
rebuilt from the file alone.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .checks import check_dropout_backend
from .layer import EDoRALinear
from .norm import compute_dtype
from .svd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLE, INITS, SPLITS, edora_factors

# Working memory of one chunk of the batched initialisation. 1 GiB holds a dozen fp32 copies of
# a 4096×4096 weight with their Krylov blocks: enough for the GEMMs to run at full speed.
DEFAULT_MEMORY_BUDGET = 1 << 30
ADAPTER_TENSORS = ("A", "B", "R", "magnitude")
FORMAT = "edora_kernels.adapter"
FORMAT_VERSION = "1"
_LAYER_KWARGS = ("split", "sigma", "dropout", "detach_norm", "backend")
_SHOWN_NAMES = 12  # names quoted in an error message before "... and N more"


@dataclass
class EDoRASummary:
    """What :func:`apply_edora` did: the replaced module names and the parameter counts."""

    layers: list[str]
    rank: int
    alpha: float
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"EDoRA: {len(self.layers)} layers replaced (rank={self.rank}, "
                f"alpha={self.alpha:g}); trainable params: {self.trainable_params:,} of "
                f"{self.total_params:,} ({share:.4f}%)")


class LoadResult(NamedTuple):
    """Keys tolerated by ``load_edora_state_dict(..., strict=False)``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _quote(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f", ... and {more} more" if more > 0 else "")


def _key(name: str, tensor: str) -> str:
    return f"{name}.{tensor}" if name else tensor


def _is_target(name: str, target_modules: str | list[str]) -> bool:
    # PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    # equal to an entry or ending in "." + entry.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    if isinstance(target_modules, str):
        valid = True
    else:
        target_modules = list(target_modules)
        valid = bool(target_modules) and all(isinstance(t, str) for t in target_modules)
    if not valid:
        raise TypeError("target_modules must be a regex string or a non-empty list of module "
                        f"names, got {target_modules!r}")
    matched = [(n, m) for n, m in model.named_modules() if n and _is_target(n, target_modules)]
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules {target_modules!r} matched no module of "
                         f"{type(model).__name__}; its nn.Linear modules are: "
                         f"{_quote(linears) or 'none'}")
    already = [n for n, m in matched if isinstance(m, EDoRALinear)]
    if already:
        raise ValueError(f"modules {_quote(already)} are already EDoRALinear")
    # nn.MultiheadAttention's out_proj is an nn.Linear subclass whose weight is read directly,
    # so swapping it would be silently ignored: only plain nn.Linear is replaced.
    other = [f"{n} ({type(m).__name__})" for n, m in matched if type(m) is not nn.Linear]
    if other:
        raise ValueError(f"target_modules {target_modules!r} matched modules that are not "
                         f"nn.Linear: {_quote(other)}; narrow the pattern")
    return matched


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _bytes_per_matrix(m: int, n: int, rank: int, dtype: torch.dtype, init: str) -> int:
    """Peak working memory of one matrix in a batched init (a conservative estimate)."""
    item = torch.finfo(compute_dtype(dtype)).bits // 8
    if init == "svd":  # the stacked copy, U, Vh and LAPACK's workspace
        return item * 4 * m * n
    # The stacked copy, then randomized_svd's Krylov basis and Wᵀ-products (d columns each,
    # one of them also in fp64) and the blocks in flight.
    d = (DEFAULT_N_ITER + 1) * (rank + DEFAULT_OVERSAMPLE)
    return item * m * n + 16 * (m + n) * d


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, EDoRALinear):
            module.R.requires_grad_(True)
            module.magnitude.requires_grad_(True)


def _param_counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _next_seed(gen: torch.Generator | None) -> int | None:
    return None if gen is None else int(torch.randint(2**62, (1,), generator=gen))


@torch.no_grad()
def apply_edora(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int,
    alpha: float = 16.0,
    *,
    init: str = "rsvd",
    seed: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    **layer_kwargs,
) -> EDoRASummary:
    """Replace the matching ``nn.Linear`` modules of ``model`` in place by ``EDoRALinear``.

    ``target_modules``: a regex that must match the whole module name, or a list of names, each
    matching a module called exactly that or ending in ``"." + name`` (PEFT's rule). Weights are
    grouped by (shape, dtype, device); each group is factorised with batched ``init`` calls
    ("rsvd", "svd" or "random") over chunks of at most ``memory_budget_bytes`` working memory
    (at least one matrix per chunk). Weights on the meta device get meta factors (shapes only).
    ``layer_kwargs``: ``split``, ``sigma``, ``dropout``, ``detach_norm``, ``backend`` as in
    ``EDoRALinear.from_linear``. Afterwards every parameter of the model is frozen except ``R``
    and ``magnitude`` of its EDoRA layers (unfreeze a task head yourself). ``seed`` makes the
    result reproducible for a given memory budget. Returns an :class:`EDoRASummary`.
    """
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; layer options are "
                        f"{list(_LAYER_KWARGS)}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    split = layer_kwargs.pop("split", "u")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # Checked here, not in the first EDoRALinear, so that a typo costs no factorisation.
    check_dropout_backend(layer_kwargs.get("dropout", 0.0), layer_kwargs.get("backend", "auto"))
    targets = _find_targets(model, target_modules)
    too_small = [f"{n} ({m.out_features}×{m.in_features})" for n, m in targets
                 if rank > min(m.in_features, m.out_features)]
    if too_small:
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) of "
                         f"{_quote(too_small)}")

    groups: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for name, linear in targets:
        w = linear.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append((name, linear))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with tqdm(total=len(targets), desc="EDoRA init", unit="layer", disable=not progress) as bar:
        for (shape, dtype, device), members in groups.items():
            per_chunk = max(1, memory_budget_bytes // _bytes_per_matrix(*shape, rank, dtype, init))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                A, B = _chunk_factors(chunk, shape, dtype, device, rank, init, split,
                                      _next_seed(gen))
                for i, (name, linear) in enumerate(chunk):
                    layer_seed = None if device.type == "meta" else _next_seed(gen)
                    layer = EDoRALinear.from_factors(linear, A[i].clone(), B[i].clone(), alpha,
                                                     seed=layer_seed, **layer_kwargs)
                    _replace(model, name, layer)
                    bar.update(1)
                del A, B

    _freeze_all_but_adapters(model)
    trainable, total = _param_counts(model)
    return EDoRASummary([n for n, _ in targets], rank, float(alpha), trainable, total)


def _chunk_factors(chunk, shape, dtype, device, rank, init, split, seed):
    m, n = shape
    if device.type == "meta":
        return (torch.empty(len(chunk), rank, n, device=device, dtype=dtype),
                torch.empty(len(chunk), m, rank, device=device, dtype=dtype))
    stack = torch.empty(len(chunk), m, n, device=device, dtype=compute_dtype(dtype))
    for i, (_, linear) in enumerate(chunk):
        stack[i].copy_(linear.weight)
    try:
        return edora_factors(stack, rank, init=init, split=split, seed=seed)
    except ValueError:
        # Name the layers: the batched call can only point at the stack.
        bad = [chunk[i][0] for i in range(len(chunk)) if not torch.isfinite(stack[i]).all()]
        if bad:
            raise ValueError(f"weights of {_quote(bad)} contain NaN or Inf") from None
        raise


# --- adapter state -----------------------------------------------------------------------------


def _edora_layers(model: nn.Module) -> dict[str, EDoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EDoRALinear)}


def edora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{f"{name}.{t}": tensor}`` for t in A, B, R, magnitude of every EDoRA layer (detached)."""
    return {_key(name, t): getattr(layer, t).detach()
            for name, layer in _edora_layers(model).items() for t in ADAPTER_TENSORS}


def _layer_config(layer: EDoRALinear) -> dict:
    return {"rank": layer.rank, "alpha": layer.alpha, "dropout": layer.dropout,
            "detach_norm": layer.detach_norm, "in_features": layer.in_features,
            "out_features": layer.out_features}


def save_edora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of ``model`` (see :func:`edora_state_dict`) and its config to ``path``."""
    layers = _edora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EDoRALinear layers; "
                         "call apply_edora first")
    tensors = {k: v.cpu().contiguous() for k, v in edora_state_dict(model).items()}
    config = {"layers": {name: _layer_config(layer) for name, layer in layers.items()}}
    save_file(tensors, os.fspath(path), metadata={
        "format": FORMAT, "format_version": FORMAT_VERSION, "edora_config": json.dumps(config)})


def _read_adapter_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not an EDoRA adapter file (metadata 'format' "
                         f"is {metadata.get('format')!r}, expected {FORMAT!r}); write it with "
                         "save_edora")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)} has adapter format version "
                         f"{metadata.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION!r}")
    return load_file(os.fspath(path)), json.loads(metadata["edora_config"])["layers"]


def _expected_shapes(rank: int, out_features: int, in_features: int) -> dict[str, tuple]:
    return {"A": (rank, in_features), "B": (out_features, rank), "R": (rank, rank),
            "magnitude": (out_features,)}


@torch.no_grad()
def load_edora_state_dict(
    model: nn.Module,
    state_or_path: dict[str, torch.Tensor] | str | os.PathLike,
    strict: bool = True,
) -> LoadResult:
    """Load an adapter into ``model``: a dict from :func:`edora_state_dict` or a file from
    :func:`save_edora`.

    EDoRA layers already in the model receive the tensors (copied, cast to their dtype and
    device; ``requires_grad`` untouched). Given a file, plain ``nn.Linear`` modules named in its
    config are first rebuilt as EDoRA layers from the saved A and B (no SVD is run; rank, alpha,
    dropout and detach_norm from the file, backend "auto"), and the model is then frozen as
    :func:`apply_edora` leaves it. Nothing is changed unless every check passes:
    mis-shaped tensors and an alpha that differs from the file's always raise, and with ``strict``
    so do missing and unexpected keys, each listed by name. Returns the tolerated
    ``(missing_keys, unexpected_keys)``.
    """
    if isinstance(state_or_path, (str, os.PathLike)):
        state, config = _read_adapter_file(state_or_path)
    elif isinstance(state_or_path, dict):
        state, config = state_or_path, {}
    else:
        raise TypeError("state_or_path must be a dict of tensors or a path to a save_edora file, "
                        f"got {type(state_or_path).__name__}")
    existing = _edora_layers(model)
    modules = dict(model.named_modules())
    to_build = {name: cfg for name, cfg in config.items()
                if name not in existing and type(modules.get(name)) is nn.Linear}

    expected: dict[str, tuple] = {}
    for name, layer in existing.items():
        for t, shape in _expected_shapes(layer.rank, layer.out_features,
                                         layer.in_features).items():
            expected[_key(name, t)] = shape
    for name, cfg in to_build.items():
        linear = modules[name]
        for t, shape in _expected_shapes(cfg["rank"], linear.out_features,
                                         linear.in_features).items():
            expected[_key(name, t)] = shape

    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k}: got {tuple(state[k].shape)}, expected {expected[k]}"
                        for k in expected if k in state and tuple(state[k].shape) != expected[k])
    alpha_diff = sorted(f"{n}: model {layer.alpha:g}, file {config[n]['alpha']:g}"
                        for n, layer in existing.items()
                        if n in config and layer.alpha != config[n]["alpha"])
    merged = sorted(n for n, layer in existing.items() if layer.merged)
    problems = []
    if mismatched:
        problems.append(f"mis-shaped tensors: {_quote(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_quote(missing)}")
    if strict and unexpected:
        hint = ("" if existing or config else "; the model has no EDoRA layers: pass the "
                "save_edora file (it carries the config to rebuild them) or call apply_edora first")
        problems.append(f"unexpected keys: {_quote(unexpected)}{hint}")
    if alpha_diff:
        problems.append(f"alpha differs from the file's for {_quote(alpha_diff)}")
    if merged:
        problems.append(f"layers {_quote(merged)} are merged; call unmerge() before loading")
    if problems:
        raise ValueError(f"cannot load the EDoRA adapter into {type(model).__name__}: "
                         + "; ".join(problems))

    for name, cfg in to_build.items():
        keys = {t: _key(name, t) for t in ADAPTER_TENSORS}
        if any(k not in state for k in keys.values()):
            continue  # strict=False and incomplete: the layer stays a plain nn.Linear
        layer = EDoRALinear.from_factors(modules[name], state[keys["A"]], state[keys["B"]],
                                         cfg["alpha"], sigma=0.0, dropout=cfg["dropout"],
                                         detach_norm=cfg["detach_norm"])
        _replace(model, name, layer)
        existing[name] = layer
    for name, layer in existing.items():
        for t in ADAPTER_TENSORS:
            if _key(name, t) in state:
                getattr(layer, t).copy_(state[_key(name, t)])
    if to_build:
        _freeze_all_but_adapters(model)
    return LoadResult(missing, unexpected)
