"""Whole models: swap matching ``nn.Linear`` layers for ``EDoRALinear``.

``apply_edora`` groups the target weights by (shape, dtype, device) and initialises each group
with batched :func:`~edora_kernels.svd.randomized_svd` calls, in chunks whose working memory stays
under a budget (docs/DESIGN.md §6). It is atomic: every argument, module and weight is checked and
every new layer is built before the first module of the model is replaced, so an error leaves
the model exactly as it was. Saving and loading the adapter is ``edora_kernels.adapter_io``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter_io import (  # noqa: F401 (they lived here: edora_kernels.model.save_edora etc.)
    LoadResult,
    edora_state_dict,
    load_edora_state_dict,
    save_edora,
)
from .checks import (
    check_dropout_backend,
    check_dropout_mode,
    check_finite_number,
    check_init,
    check_rank,
    check_split,
    check_target_modules,
    matches_target,
    quote,
)
from .layer import EDoRALinear, freeze_all_but_adapters
from .norm import compute_dtype
from .svd import DEFAULT_N_ITER, default_oversample, edora_factors

# Working memory of one chunk of the batched initialisation. 1 GiB holds a dozen fp32 copies of
# a 4096×4096 weight with their Krylov blocks: enough for the GEMMs to run at full speed.
DEFAULT_MEMORY_BUDGET = 1 << 30
_LAYER_KWARGS = ("split", "sigma", "dropout", "dropout_mode", "detach_norm", "backend")


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


def _positions(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object is registered (a module shared between two
    parents has two)."""
    found: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            found.setdefault(id(module), []).append(name)
    return found


def _find_targets(model: nn.Module, target_modules) -> list[tuple[list[str], nn.Linear]]:
    """``(names, module)`` for each distinct module the targets select, with every position it
    occupies: a module registered twice becomes one shared EDoRA layer at both."""
    targets = check_target_modules(target_modules)
    modules = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    selected = [(names, modules[key]) for key, names in _positions(model).items()
                if any(matches_target(n, targets) for n in names)]
    if not selected:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules {target_modules!r} matched no module of "
                         f"{type(model).__name__}; its nn.Linear modules are: "
                         f"{quote(linears) or 'none'}")
    already = [names[0] for names, m in selected if isinstance(m, EDoRALinear)]
    if already:
        raise ValueError(f"modules {quote(already)} are already EDoRALinear")
    # nn.MultiheadAttention's out_proj is an nn.Linear subclass whose weight is read directly,
    # so swapping it would be silently ignored: only plain nn.Linear is replaced.
    other = [f"{names[0]} ({type(m).__name__})" for names, m in selected
             if type(m) is not nn.Linear]
    if other:
        raise ValueError(f"target_modules {target_modules!r} matched modules that are not "
                         f"nn.Linear: {quote(other)}; narrow the pattern")
    return selected


def _param_counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _bytes_per_matrix(m: int, n: int, rank: int, dtype: torch.dtype, init: str) -> int:
    """Peak working memory of one matrix in a batched init (a conservative estimate)."""
    item = torch.finfo(compute_dtype(dtype)).bits // 8
    if init == "svd":  # the stacked copy, U, Vh and LAPACK's workspace
        return item * 4 * m * n
    # The stacked copy, then randomized_svd's Krylov basis and Wᵀ-products (d columns each,
    # one of them also in fp64) and the blocks in flight.
    d = (DEFAULT_N_ITER + 1) * (rank + default_oversample(rank))
    return item * m * n + 16 * (m + n) * d


def _next_seed(gen: torch.Generator | None) -> int | None:
    return None if gen is None else int(torch.randint(2**62, (1,), generator=gen))


def _check_options(rank, alpha, init, memory_budget_bytes, layer_kwargs) -> None:
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; layer options are "
                        f"{list(_LAYER_KWARGS)}")
    check_rank(rank)
    check_finite_number("alpha", alpha)
    check_init(init)
    check_split(layer_kwargs.get("split", "u"))
    check_dropout_mode(layer_kwargs.get("dropout_mode", "peft"))
    check_finite_number("sigma", layer_kwargs.get("sigma", 0.0))
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) \
            or memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    check_dropout_backend(layer_kwargs.get("dropout", 0.0), layer_kwargs.get("backend", "auto"))


def _check_weights(targets, rank) -> None:
    """Ranks fit and weights are finite, named, before any factorisation."""
    too_small = [f"{names[0]} ({m.out_features}×{m.in_features})" for names, m in targets
                 if rank > min(m.in_features, m.out_features)]
    if too_small:
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) of "
                         f"{quote(too_small)}")
    bad = [names[0] for names, m in targets
           if m.weight.device.type != "meta" and not torch.isfinite(m.weight).all()]
    if bad:
        raise ValueError(f"weights of {quote(bad)} contain NaN or Inf")


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
    matching a module called exactly that or ending in ``"." + name`` (PEFT's rule). A module
    registered under several names is replaced by one shared layer at all of them. Weights are
    grouped by (shape, dtype, device); each group is factorised with batched ``init`` calls
    ("rsvd", "svd" or "random") over chunks of at most ``memory_budget_bytes`` working memory
    (at least one matrix per chunk). Weights on the meta device get meta factors (shapes only).
    ``layer_kwargs``: ``split``, ``sigma``, ``dropout``, ``dropout_mode``, ``detach_norm``,
    ``backend`` as in ``EDoRALinear.from_linear``. Afterwards every parameter of the model is
    frozen except ``R`` and ``magnitude`` of its EDoRA layers (unfreeze a task head yourself).
    ``seed`` makes the result reproducible for a given memory budget. On any error the model is
    left unchanged. Returns an :class:`EDoRASummary`.
    """
    _check_options(rank, alpha, init, memory_budget_bytes, layer_kwargs)
    targets = _find_targets(model, target_modules)
    _check_weights(targets, rank)
    split = layer_kwargs.pop("split", "u")

    groups: dict[tuple, list[tuple[list[str], nn.Linear]]] = {}
    for names, linear in targets:
        w = linear.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append((names, linear))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    built: list[tuple[list[str], EDoRALinear]] = []
    with tqdm(total=len(targets), desc="EDoRA init", unit="layer", disable=not progress) as bar:
        for (shape, dtype, device), members in groups.items():
            per_chunk = max(1, memory_budget_bytes // _bytes_per_matrix(*shape, rank, dtype, init))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                A, B = _chunk_factors(chunk, shape, dtype, device, rank, init, split,
                                      _next_seed(gen))
                for i, (names, linear) in enumerate(chunk):
                    layer_seed = None if device.type == "meta" else _next_seed(gen)
                    layer = EDoRALinear.from_factors(linear, A[i].clone(), B[i].clone(), alpha,
                                                     seed=layer_seed, **layer_kwargs)
                    built.append((names, layer))
                    bar.update(1)
                del A, B

    # Everything is built: only now does the model change.
    tied = _tied_parameters(model)
    for names, layer in built:
        layer.adapted_name = names[0]
        storage = layer.weight.untyped_storage().data_ptr()
        layer.tied_to = [n for n in tied.get(storage, [])
                         if not any(n == f"{name}.weight" for name in names)]
        layer.tied_storage = storage
        for name in names:
            model.set_submodule(name, layer)
    freeze_all_but_adapters(model)
    trainable, total = _param_counts(model)
    return EDoRASummary([n for names, _ in targets for n in names], rank, float(alpha),
                        trainable, total)


def _tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage: a weight tied to another parameter (an lm_head sharing the
    embedding matrix) shows up under both names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta":
            names.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    return names


def _chunk_factors(chunk, shape, dtype, device, rank, init, split, seed):
    m, n = shape
    if device.type == "meta":
        return (torch.empty(len(chunk), rank, n, device=device, dtype=dtype),
                torch.empty(len(chunk), m, rank, device=device, dtype=dtype))
    stack = torch.empty(len(chunk), m, n, device=device, dtype=compute_dtype(dtype))
    for i, (_, linear) in enumerate(chunk):
        stack[i].copy_(linear.weight)
    return edora_factors(stack, rank, init=init, split=split, seed=seed)
