"""Whole models: wrap the matching base layers (``nn.Linear``, GPT-2 ``Conv1D``, quantized
linears: ``edora_kernels.bases``) in ``EDoRALinear``.

``apply_edora`` groups the target weights (dequantized for quantized bases, once) by (shape,
dtype, device) and initialises each group with batched
:func:`~edora_kernels.svd.randomized_svd` calls, in chunks whose working memory stays under a
budget (docs/DESIGN.md §6). It is atomic: every argument, module and weight is checked and every
new layer is built before the first module of the model is replaced (``install``), so an error
leaves the model exactly as it was. Saving and loading the adapter is
``edora_kernels.adapter_io``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bases
from .adapter_io import (  # noqa: F401 (they lived here: edora_kernels.model.save_edora etc.)
    LoadResult,
    edora_state_dict,
    load_edora_state_dict,
    save_edora,
    within_edora_layers,
)
from .checks import (
    check_finite_number,
    check_pattern,
    check_rank,
    check_seed,
    check_target_modules,
    matches_target,
    pattern_value,
    quote,
)
from .install import install, positions
from .layer import EDoRALinear, freeze_all_but_adapters
from .norm import compute_dtype
from .options import LayerOptions
from .svd import DEFAULT_N_ITER, default_oversample, edora_factors

# Working memory of one chunk of the batched initialisation. 1 GiB holds a dozen fp32 copies of
# a 4096×4096 weight with their Krylov blocks: enough for the GEMMs to run at full speed.
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass
class EDoRASummary:
    """What :func:`apply_edora` did: the replaced module names and the parameter counts."""

    layers: list[str]
    rank: int
    alpha: float
    trainable_params: int
    total_params: int
    # per layer, where rank_pattern / alpha_pattern gave it another value than rank / alpha
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        ranks = sorted({self.rank, *self.ranks.values()})
        rank = f"rank={self.rank}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        alphas = sorted({self.alpha, *self.alphas.values()})
        alpha = (f"alpha={self.alpha:g}" if len(alphas) == 1
                 else f"alphas {alphas[0]:g}-{alphas[-1]:g}")
        return (f"EDoRA: {len(self.layers)} layers replaced ({rank}, {alpha}); trainable "
                f"params: {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%)")


def _find_targets(model: nn.Module, target_modules) -> list[tuple[list[str], nn.Module]]:
    """``(names, module)`` for each distinct module the targets select, with every position it
    occupies: a module registered twice becomes one shared EDoRA layer at both. A selected
    module EDoRA cannot wrap is refused, named with its type and its weight's."""
    targets = check_target_modules(target_modules)
    modules = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    selected = [(names, modules[key]) for key, names in positions(model).items()
                if any(matches_target(n, targets) for n in names)]
    if not selected:
        wrappable = [n for n, m in model.named_modules() if bases.kind_of(m) is not None]
        raise ValueError(f"target_modules {target_modules!r} matched no module of "
                         f"{type(model).__name__}; the layers EDoRA can wrap are: "
                         f"{quote(wrappable) or 'none'}")
    already = [names[0] for names, m in selected if isinstance(m, EDoRALinear)]
    if already:
        raise ValueError(f"modules {quote(already)} are already EDoRALinear")
    inside = within_edora_layers(model)
    nested = [n for names, _ in selected for n in names if n in inside]
    if nested:
        raise ValueError(f"target_modules {target_modules!r} selected {quote(nested)}, inside "
                         "EDoRA layers (their base layers); an adapter there would never run: "
                         "narrow the pattern")
    other = [bases.unsupported(names[0], m) for names, m in selected
             if bases.kind_of(m) is None]
    if other:
        raise ValueError(f"target_modules {target_modules!r} selected modules EDoRA cannot "
                         f"wrap: {quote(other)}; narrow the pattern ({bases.SUPPORTED})")
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


def _check_budget(memory_budget_bytes) -> None:
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) \
            or memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")


def check_weights(targets, ranks: dict[int, int]) -> None:
    """Ranks fit and dense weights are finite, named, before any factorisation."""
    too_small = []
    for names, m in targets:
        in_f, out_f = bases.features(m, bases.kind_of(m))
        if ranks[id(m)] > min(in_f, out_f):
            too_small.append((ranks[id(m)], f"{names[0]} ({out_f}×{in_f})"))
    if too_small:
        raise ValueError("; ".join(
            f"rank {r} exceeds min(out_features, in_features) of "
            f"{quote([name for rank, name in too_small if rank == r])}"
            for r in sorted({rank for rank, _ in too_small})))
    bad = []
    for names, m in targets:
        kind = bases.kind_of(m)
        if kind.dense and m.weight.device.type != "meta" and not torch.isfinite(m.weight).all():
            bad.append(names[0])
    if bad:
        raise ValueError(f"weights of {quote(bad)} contain NaN or Inf")


@torch.no_grad()
def apply_edora(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int,
    alpha: float = 16.0,
    *,
    seed: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    **options,
) -> EDoRASummary:
    """Wrap the matching base layers of ``model`` in place in ``EDoRALinear``.

    ``target_modules``: a regex that must match the whole module name, or a list of names, each
    matching a module called exactly that or ending in ``"." + name`` (PEFT's rule). The
    selected modules must be base layers EDoRA can wrap (``nn.Linear``, transformers'
    ``Conv1D``, bitsandbytes 4/8-bit, torchao int8 weight-only; anything else is refused by
    name). A module registered under several names is wrapped once, shared at all of them.
    Weights are grouped by (shape, dtype, device); each group is factorised with batched
    ``init`` calls ("rsvd", "svd" or "random") over chunks of at most ``memory_budget_bytes``
    working memory (at least one matrix per chunk). Weights on the meta device get meta factors
    (shapes only). ``rank_pattern`` / ``alpha_pattern`` give layers another rank / alpha by
    PEFT's rule (the first key, in order, matching the end of the module name at a "."
    boundary); layers of one shape share one batched factorisation at their largest rank, a
    smaller rank taking its leading directions. ``options``: the ``LayerOptions`` (``init``,
    ``split``, ``sigma``,
    ``dropout``, ``dropout_mode``, ``detach_norm``, ``backend``). Afterwards every parameter of
    the model is frozen except ``R`` and ``magnitude`` of its EDoRA layers (unfreeze a task head
    yourself). ``seed`` makes the result reproducible for a given memory budget. On any error
    the model is left unchanged. Returns an :class:`EDoRASummary`.
    """
    check_rank(rank)
    check_seed(seed)
    rank_pattern = check_pattern("rank_pattern", rank_pattern, _check_pattern_rank)
    alpha_pattern = check_pattern("alpha_pattern", alpha_pattern, check_finite_number)
    layer_options = LayerOptions.from_kwargs("apply_edora", alpha=alpha, **options)
    _check_budget(memory_budget_bytes)
    targets = _find_targets(model, target_modules)
    ranks = {id(m): pattern_value(names, rank_pattern, rank) for names, m in targets}
    alphas = {id(m): float(pattern_value(names, alpha_pattern, layer_options.alpha))
              for names, m in targets}
    check_weights(targets, ranks)

    built = [(names, EDoRALinear.from_factors(
                 module, A, B, seed=layer_seed,
                 **vars(layer_options.replace(alpha=alphas[id(module)]))))
             for names, module, A, B, layer_seed in factorise(
                 targets, ranks, init=layer_options.init, split=layer_options.split, seed=seed,
                 memory_budget_bytes=memory_budget_bytes, progress=progress)]

    # Everything is built: only now does the model change.
    install(model, built)
    freeze_all_but_adapters(model)
    trainable, total = _param_counts(model)
    return EDoRASummary(
        [n for names, _ in targets for n in names], rank, layer_options.alpha, trainable, total,
        ranks={names[0]: ranks[id(m)] for names, m in targets if ranks[id(m)] != rank},
        alphas={names[0]: alphas[id(m)] for names, m in targets
                if alphas[id(m)] != layer_options.alpha})


def factorise(targets: list[tuple[list[str], nn.Module]], ranks: dict[int, int], *,
              init: str = "rsvd", split: str = "u", seed: int | None = None,
              memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, progress: bool = False):
    """``(names, module, A, B, layer_seed)`` for each base layer of ``targets`` (``(names,
    module)`` pairs; ``ranks`` by module id), as :func:`apply_edora` factorises them: grouped by
    (shape, dtype, device), batched in chunks under ``memory_budget_bytes``, from one seed
    stream that also gives each layer the seed of its R. A and B are views of the chunk's
    factors (copy them to keep them)."""
    groups: dict[tuple, list[tuple[list[str], nn.Module]]] = {}
    for names, module in targets:
        # random factors are drawn at their rank's scale (U(±1/√r)): one rank per batch
        rank_of_group = ranks[id(module)] if init == "random" else None
        groups.setdefault((*_group_key(module), rank_of_group), []).append((names, module))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with tqdm(total=len(targets), desc="EDoRA init", unit="layer", disable=not progress) as bar:
        for (shape, dtype, device, _), members in groups.items():
            # One batched call per chunk at the chunk's largest rank: a layer of a smaller
            # rank takes the leading singular directions of it.
            top = max(ranks[id(m)] for _, m in members)
            per_chunk = max(1, memory_budget_bytes // _bytes_per_matrix(*shape, top, dtype, init))
            buffer = stack_buffer(min(per_chunk, len(members)), shape, dtype, device)
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                A, B = chunk_factors([m for _, m in chunk], max(ranks[id(m)] for _, m in chunk),
                                     init=init, split=split, seed=_next_seed(gen),
                                     buffer=buffer)
                for i, (names, module) in enumerate(chunk):
                    r = ranks[id(module)]
                    layer_seed = None if device.type == "meta" else _next_seed(gen)
                    yield names, module, A[i, :r], B[i, :, :r], layer_seed
                    bar.update(1)
                del A, B
            del buffer  # before the next group's is allocated


def _group_key(module: nn.Module) -> tuple:
    """``((out, in), weight dtype, device)``: what layers factorised in one batch share."""
    kind = bases.kind_of(module)
    in_f, out_f = bases.features(module, kind)
    return ((out_f, in_f), bases.weight_dtype(module, kind),
            bases.stamped_weight(module, kind).device)


def chunk_factors(modules: list[nn.Module], rank: int, *, init: str = "rsvd", split: str = "u",
                  seed: int | None = None, buffer: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(k, rank, in)`` and ``(k, out, rank)`` for ``k`` base layers of one
    shape, weight dtype and device: one batched :func:`~edora_kernels.svd.edora_factors` call
    on their (dequantized) weights stacked in the compute dtype, which the factors come in. What
    :func:`apply_edora` runs on each chunk; weights on the meta device give meta factors.

    ``buffer`` (from :func:`stack_buffer`, for at least ``k`` layers) is where the weights are
    stacked, for calls in a row to share: on the CPU, fresh memory costs a page fault per 4 KiB
    (37-90 ms per 180 MB on 2 cores, a tenth of the time of a 11008×4096 factorisation)."""
    (m, n), dtype, device = _group_key(modules[0])
    if device.type == "meta":
        return (torch.empty(len(modules), rank, n, device=device, dtype=dtype),
                torch.empty(len(modules), m, rank, device=device, dtype=dtype))
    if buffer is None:
        buffer = stack_buffer(len(modules), (m, n), dtype, device)
    stack = buffer[:len(modules) * m * n].view(len(modules), m, n)
    for i, module in enumerate(modules):
        stack[i].copy_(bases.dequantized_weight(module, bases.kind_of(module)))
    return edora_factors(stack, rank, init=init, split=split, seed=seed)


def stack_buffer(count: int, shape: tuple[int, int], dtype: torch.dtype, device
                 ) -> torch.Tensor:
    """Flat memory for :func:`chunk_factors` to stack ``count`` weights of ``shape`` and
    ``dtype`` in (in their compute dtype)."""
    return torch.empty(count * shape[0] * shape[1], dtype=compute_dtype(dtype), device=device)


def _check_pattern_rank(label: str, value) -> None:
    try:
        check_rank(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{label}: {err}") from None
