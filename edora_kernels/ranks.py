"""Which rank where: two advisors and one way to turn their curves into a ``rank_pattern``
(docs/DESIGN.md §14).

* :func:`weight_energy` reads each adapted weight (from a model, or from a Hugging Face model
  directory one matrix at a time) and gives the share of ‖W0‖²_F its top-r singular subspace
  holds, r = 1 … ``max_rank``: what EDoRA's frozen factors capture of the layer.
* :func:`gradient_share` runs a few batches through a model and gives, per layer, the share of
  the full fine-tuning gradient ``G = gyᵀ x`` that the r×r core can express,
  ``‖U_rᵀ G V_r‖² / ‖G‖²`` with U_r, V_r the top-r singular vectors of W0 (the span of EDoRA's
  B and A). It is computed from ``gy·U`` and ``x·V`` (N×r each); ‖G‖² from the rows' Gram
  matrices or from G in row blocks, whichever costs less: G is never held whole.
* :func:`suggest_ranks` picks a rank per layer from either set of curves, for a target share
  (``energy=``) or for a budget of trainable numbers (``budget=``: Σ r_l² + out_l), and returns a
  :class:`RankAdvice` that prints a table, draws a plot and writes the JSON ``EDoRAConfig`` reads.
"""
from __future__ import annotations

import heapq
import io
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bases
from .bench.io import write_atomically
from .checks import check_rank, check_target_modules
from .svd import randomized_svd

DEFAULT_MAX_RANK = 64
# Below this smaller side an exact SVD is cheap (all-MiniLM's 384×1536 in a few ms); above it
# the top singular values come from the randomised SVD at max_rank (docs/DESIGN.md §14).
EXACT_UP_TO = 1024
# Rows per Gram block of the gradient norm: bounds its memory at 2 · 2048² float64 numbers.
GRAM_BLOCK = 2048
# Summed shares closer than this count as equal: the budget rule is exact to it.
TIE = 1e-9


@dataclass
class LayerCurve:
    """One adapted layer: ``share[r - 1]`` is what rank r captures (energy or gradient share),
    r = 1 … len(share); the curve ends at min(max_rank, in, out)."""

    name: str
    in_features: int
    out_features: int
    share: list[float]

    @property
    def group(self) -> str:
        """The layer's type: its name with the block numbers replaced by "*"."""
        return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", self.name)

    def at(self, rank: int) -> float:
        return self.share[min(rank, len(self.share)) - 1]


@dataclass
class RankAdvice:
    """Ranks chosen per layer from a set of curves; ``rule`` says how ("energy ≥ 0.9",
    "budget 50000"), ``measure`` what the curves are ("weight energy", "gradient share")."""

    curves: list[LayerCurve]
    ranks: dict[str, int]
    rule: str
    measure: str
    target_modules: list[str] | str | None = None
    short: list[str] = field(default_factory=list)  # layers whose target share was not reached

    @property
    def r(self) -> int:
        """The most common rank (ties: the smaller): the config's ``r``."""
        counts = Counter(self.ranks.values())
        return min(counts, key=lambda rank: (-counts[rank], rank))

    def config(self) -> dict:
        """``r``, ``rank_pattern`` (the other layers by their exact names) and
        ``target_modules`` (as given, else these layers by name): what
        ``EDoRAConfig.from_dict`` takes. Names match with any prefix, as PEFT's patterns do, so
        a task model (``bert.encoder…``) takes the advice of its base's directory
        (``encoder…``)."""
        r = self.r
        pattern = {re.escape(name): rank for name, rank in self.ranks.items() if rank != r}
        targets = self.target_modules
        if targets is None:
            targets = r"(.*\.)?(" + "|".join(re.escape(c.name) for c in self.curves) + ")"
        return {"r": r, "rank_pattern": pattern, "target_modules": targets}

    def trainable(self) -> int:
        """Σ r_l² + out_l: the adapter's trainable numbers (R and the magnitude)."""
        return sum(self.ranks[c.name] ** 2 + c.out_features for c in self.curves)

    def table(self, ranks: Iterable[int] = (1, 2, 4, 8, 16, 32, 64)) -> str:
        """Per layer type: the mean (min) share at a few ranks, and the chosen ranks."""
        shown = [r for r in ranks if r <= max(len(c.share) for c in self.curves)]
        lines = [f"{self.measure} by layer type (mean, min over its layers); rule: {self.rule}",
                 "| layer type | layers | " + " | ".join(f"r={r}" for r in shown)
                 + " | chosen ranks |",
                 "|---" * (len(shown) + 3) + "|"]
        for group, curves in _by_group(self.curves).items():
            cells = []
            for r in shown:
                values = [c.at(r) for c in curves]
                cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f})")
            chosen = Counter(self.ranks[c.name] for c in curves)
            picks = ", ".join(f"{r}×{n}" if n > 1 else f"{r}" for r, n in sorted(chosen.items()))
            lines.append(f"| {group} | {len(curves)} | " + " | ".join(cells) + f" | {picks} |")
        mean = sum(c.at(self.ranks[c.name]) for c in self.curves) / len(self.curves)
        lines.append(f"mean {self.measure} at the chosen ranks: {mean:.4f}")
        lines.append(f"trainable numbers (Σ r² + out): {self.trainable():,}; config r = "
                     f"{self.r}, {len(self.config()['rank_pattern'])} layers in rank_pattern")
        if self.short:
            more = " …" if len(self.short) > 5 else ""
            lines.append(f"{len(self.short)} layers stay below the target at the largest rank "
                         f"measured: {', '.join(self.short[:5])}{more}")
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """``config()`` to ``path`` (``EDoRAConfig.from_dict(json.load(f))`` reads it) and the
        rule, the ranks and every curve beside it (``<stem>_curves.json``); each file is
        written whole or not at all."""
        path = Path(path)
        curves = {"rule": self.rule, "measure": self.measure, "ranks": self.ranks,
                  "curves": {c.name: c.share for c in self.curves}}
        return (_write_json(path, self.config()),
                _write_json(path.with_name(f"{path.stem}_curves.json"), curves))

    def plot(self, path: str | os.PathLike) -> Path:
        """Share vs rank per layer type (mean line, min–max band), the chosen ranks marked."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for group, curves in _by_group(self.curves).items():
            length = min(len(c.share) for c in curves)
            x = list(range(1, length + 1))
            columns = list(zip(*(c.share[:length] for c in curves)))
            line, = ax.plot(x, [sum(v) / len(v) for v in columns], label=group)
            ax.fill_between(x, [min(v) for v in columns], [max(v) for v in columns],
                            color=line.get_color(), alpha=0.15)
            ax.scatter([self.ranks[c.name] for c in curves],
                       [c.at(self.ranks[c.name]) for c in curves],
                       color=line.get_color(), edgecolor="black", zorder=3, s=25)
        ax.set_xscale("log", base=2)
        longest = max(len(c.share) for c in self.curves)
        ticks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= longest]
        ax.set_xticks(ticks, [str(r) for r in ticks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(self.measure)
        ax.set_title(f"{self.measure} of the top-r subspace; dots: chosen ranks ({self.rule})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()

        png = io.BytesIO()
        try:
            fig.savefig(png, format="png", dpi=110)
        finally:
            plt.close(fig)
        return write_atomically(path, png.getvalue())


def _by_group(curves: list[LayerCurve]) -> dict[str, list[LayerCurve]]:
    groups: dict[str, list[LayerCurve]] = defaultdict(list)
    for curve in curves:
        groups[curve.group].append(curve)
    return dict(groups)


def _write_json(path, payload) -> Path:
    return write_atomically(path, (json.dumps(payload, indent=1) + "\n").encode())


# --- choosing ranks ---------------------------------------------------------------------------


def suggest_ranks(curves: list[LayerCurve], *, energy: float | None = None,
                  budget: int | None = None, measure: str = "share",
                  target_modules=None) -> RankAdvice:
    """Ranks per layer: with ``energy``, the smallest r whose share reaches it (the largest
    measured where none does); with ``budget``, the ranks of the largest summed share with
    Σ r_l² + out_l ≤ budget: the best mix, not a greedy one (``_ranks_for_budget``)."""
    if not curves:
        raise ValueError("no layers to choose ranks for")
    if (energy is None) == (budget is None):
        raise ValueError("give exactly one of energy= (a share in (0, 1]) or budget= (trainable "
                         "numbers)")
    if energy is not None:
        if isinstance(energy, bool) or not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must be a share in (0, 1], got {energy!r}")
        ranks, short = {}, []
        for c in curves:
            reached = next((r for r, s in enumerate(c.share, 1) if s >= energy), None)
            ranks[c.name] = reached or len(c.share)
            # a curve measured to full rank holds all of it (its last share rounds below 1)
            if reached is None and len(c.share) < min(c.in_features, c.out_features):
                short.append(c.name)
        return RankAdvice(curves, ranks, f"{measure} ≥ {energy:g}", measure, target_modules,
                          short)
    return RankAdvice(curves, _ranks_for_budget(curves, budget), f"budget {budget:,}", measure,
                      target_modules)


def _ranks_for_budget(curves: list[LayerCurve], budget) -> dict[str, int]:
    """The ranks of the largest summed share with Σ r_l² + out_l ≤ ``budget``, exact to
    ``TIE`` (a multiple-choice knapsack: growing the best share per number first leaves budget
    unspent that another mix uses). A price λ per trainable number, the lowest at which every
    layer's best rank under it fits, gives a choice (raised by ``_fill``) and the bound
    λ·spare + Σ_l max_r (share_l(r) − λ·cost(r)) on every choice's summed share; a choice
    beating the first falls short of the bound by at most the gap between the two, in slacks
    (each layer's max minus its term). The layers are then added one at a time, keeping per
    total cost the partial choice holding the most, within the gap: about a second for a
    7B model's 224 layers at max_rank 64."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int (trainable numbers), got {budget!r}")
    floor = sum(1 + c.out_features for c in curves)
    if budget < floor:
        raise ValueError(f"budget {budget:,} is below the least any adapter of these "
                         f"{len(curves)} layers needs (r = 1 everywhere: {floor:,})")
    spare = budget - floor  # what ranks above 1 may add: r² − 1 a layer
    longest = max(len(c.share) for c in curves)
    share = torch.full((len(curves), longest), -math.inf, dtype=torch.float64)
    for i, c in enumerate(curves):
        share[i, :len(c.share)] = torch.tensor(c.share, dtype=torch.float64)
    cost = torch.arange(1, longest + 1, dtype=torch.float64) ** 2 - 1  # exact: whole numbers

    def fits(price: float) -> bool:
        return int(cost[(share - price * cost).argmax(1)].sum()) <= spare

    low, price = 0.0, 1.0  # at 1 no step gains what it costs: r = 1 everywhere fits
    for _ in range(60):
        mid = (low + price) / 2
        low, price = (low, mid) if fits(mid) else (mid, price)
    best, pick = (share - price * cost).max(1)  # argmax and max: the first, smallest rank
    pick = _fill(share, cost, pick, spare)
    # The bound minus the feasible choice's share: what a better choice's slacks sum to at most.
    gap = float(price * spare + best.sum() - share.gather(1, pick[:, None]).sum())
    if gap <= TIE:
        return {c.name: int(r) + 1 for c, r in zip(curves, pick)}
    slack = best[:, None] - (share - price * cost)
    spent = torch.zeros(1, dtype=torch.float64)
    held = torch.zeros(1, dtype=torch.float64)
    lost = torch.zeros(1, dtype=torch.float64)
    steps = []
    for i in range(len(curves)):
        options = (slack[i] <= gap + TIE).nonzero().flatten()
        c = spent[:, None] + cost[options]
        v = held[:, None] + share[i, options]
        s = lost[:, None] + slack[i, options]
        parent, option = ((c <= spare) & (s <= gap + TIE)).nonzero(as_tuple=True)
        # By cost, the most share first at each, keeping what holds more than all cheaper ones.
        order = v[parent, option].argsort(descending=True, stable=True)
        order = order[c[parent, option][order].argsort(stable=True)]
        parent, option = parent[order], option[order]
        v = v[parent, option]
        more = v > torch.cat([v.new_full((1,), -math.inf), v.cummax(0).values[:-1]])
        parent, option = parent[more], option[more]
        spent, held, lost = c[parent, option], v[more], s[parent, option]
        steps.append((parent, options[option]))
    ranks, state = {}, len(spent) - 1  # kept shares rise with cost: the last holds the most
    for c, (parent, option) in zip(reversed(curves), reversed(steps)):
        ranks[c.name] = int(option[state]) + 1
        state = int(parent[state])
    return {c.name: ranks[c.name] for c in curves}


def _fill(share: torch.Tensor, cost: torch.Tensor, pick: torch.Tensor, spare: int) -> torch.Tensor:
    """``pick`` (rank indices) raised a step at a time while one fits in ``spare``, the most
    share per number first: the priced choice leaves budget unspent where several layers' steps
    cost the same price."""
    pick = pick.clone()
    left = spare - int(cost[pick].sum())
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        r = int(pick[i])
        if r + 1 < share.shape[1] and share[i, r + 1] > -math.inf:
            step = int(cost[r + 1] - cost[r])
            heapq.heappush(heap, (-float(share[i, r + 1] - share[i, r]) / step, i, step))

    for i in range(len(pick)):
        push(i)
    while heap:
        _, i, step = heapq.heappop(heap)
        if step <= left:  # else a cheaper step elsewhere may still fit
            pick[i] += 1
            left -= step
            push(i)
    return pick


# --- the advisor from the weights -------------------------------------------------------------


def weight_energy(source: nn.Module | str | os.PathLike, target_modules="all-linear", *,
                  exclude_modules=None, max_rank: int = DEFAULT_MAX_RANK,
                  progress: bool = True) -> list[LayerCurve]:
    """Per adapted layer, the share of ‖W0‖²_F in its top-r singular subspace, r = 1 …
    ``max_rank``. ``source``: a model, or a Hugging Face model directory (its config builds
    the module tree on the meta device; the weights are read from its safetensors one matrix at
    a time). ``target_modules`` / ``exclude_modules``: PEFT's rules, "all-linear" included."""
    check_rank(max_rank)
    if isinstance(source, nn.Module):
        layers = [(name, bases.kind_of(source.get_submodule(name)), source.get_submodule(name))
                  for name in _targets(source, target_modules, exclude_modules)]
        read = {name: (lambda m=module, k=kind: bases.dequantized_weight(m, k))
                for name, kind, module in layers}
        sizes = {name: bases.features(module, kind) for name, kind, module in layers}
    else:
        sizes, read = _directory_layers(Path(source), target_modules, exclude_modules)
    curves = []
    for name in tqdm(sizes, desc="weight energy", unit="matrix", disable=not progress):
        in_features, out_features = sizes[name]
        W = read[name]()
        curves.append(LayerCurve(name, in_features, out_features, _energy(W, max_rank)))
    return curves


def _energy(W: torch.Tensor, max_rank: int) -> list[float]:
    """Σ_{i≤r} σ_i² / ‖W‖²_F for r = 1 … min(max_rank, m, n), in float64."""
    exact = min(W.shape) <= EXACT_UP_TO
    W = W.detach().to(torch.float64 if exact else torch.float32)
    rank = min(max_rank, *W.shape)
    sigma = torch.linalg.svdvals(W)[:rank] if exact else randomized_svd(W, rank, seed=0)[1]
    total = W.double().pow(2).sum()
    if total == 0:
        return [1.0] * rank  # a zero matrix: nothing to capture, every rank captures it
    return (sigma.double().pow(2).cumsum(0) / total).clamp(max=1.0).tolist()


def _targets(model: nn.Module, target_modules, exclude_modules) -> list[str]:
    from .integrations.peft import target_names

    # Checked here to name the arguments as given (target_names names a config's fields).
    check_target_modules(target_modules, "target_modules")
    if exclude_modules:
        check_target_modules(exclude_modules, "exclude_modules")
    spec = SimpleNamespace(target_modules=target_modules, exclude_modules=exclude_modules)
    names = target_names(model, spec)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} selected no layer of "
                         f"{type(model).__name__}")
    return names


def _directory_layers(directory: Path, target_modules, exclude_modules):
    """The target layers of a model directory: sizes from the module tree built on the meta
    device, and a reader per layer that loads only its matrix."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} is not a Hugging Face model directory (no config.json)")
    files = _safetensors_files(directory)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:  # not JSON, or a model type this transformers lacks
        raise ValueError(f"{config_file}: {str(err).splitlines()[0]}") from None
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        model = (architecture(config) if architecture is not None
                 else transformers.AutoModel.from_config(config))
    prefix = getattr(model, "base_model_prefix", "")
    # A tied weight (an output head tied to the input embeddings) is saved under one name only.
    owners = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(key.removesuffix(".weight"))
    sizes, read = {}, {}
    for name in _targets(model, target_modules, exclude_modules):
        module = model.get_submodule(name)
        kind = bases.kind_of(module)
        key = _checkpoint_key(name, owners[id(module.weight)], files, prefix)
        if not files[key].is_file():  # found before any matrix is read
            raise ValueError(f"{files[key]} is missing: the sharded index puts {key} in it")
        sizes[name] = bases.features(module, kind)

        def load(key=key, transpose=kind is bases.CONV1D):
            W = _read_safetensors(files[key], lambda f: f.get_tensor(key))
            return W.T if transpose else W
        read[name] = load
    return sizes, read


def _read_safetensors(path: Path, read: Callable):
    """``read(f)`` on the safetensors file ``path``; a file that cannot be read is a ValueError
    naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return read(f)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint → the file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a sharded index (JSON with a 'weight_map'): "
                             f"{type(err).__name__} {err}") from None
        return {key: directory / file for key, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{directory} has no model.safetensors (nor a sharded index); the "
                         "advisor reads safetensors only (save_pretrained writes them)")
    return _read_safetensors(single, lambda f: dict.fromkeys(f.keys(), single))


def _checkpoint_key(name: str, owners: list[str], files: dict[str, Path], prefix: str) -> str:
    """The checkpoint's key of module ``name``'s weight, under its own name or that of a module
    sharing it (``owners``), with or without the model's ``base_model_prefix`` (a task model
    saved from its base, or the other way round)."""
    candidates = []
    for owner in dict.fromkeys([name, *owners]):
        candidates.append(f"{owner}.weight")
        if prefix:
            candidates += [f"{prefix}.{owner}.weight",
                           f"{owner}.weight".removeprefix(f"{prefix}.")]
    for key in candidates:
        if key in files:
            return key
    raise ValueError(f"layer {name!r}: its weight is not in the checkpoint (looked for "
                     f"{', '.join(dict.fromkeys(candidates))})")


# --- the advisor from a few batches -----------------------------------------------------------


def gradient_share(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None,
                   target_modules="all-linear", *, exclude_modules=None,
                   max_rank: int = DEFAULT_MAX_RANK, progress: bool = True,
                   seed: int = 0) -> list[LayerCurve]:
    """Per target layer, the share of the fine-tuning gradient the r×r core can express at
    r = 1 … ``max_rank``: Σ_b ‖U_rᵀ G_b V_r‖² / Σ_b ‖G_b‖² over ``batches``, with
    ``G_b = gyᵀ x`` the gradient of W0 on batch b (one optimizer step's) and U_r, V_r W0's top-r
    singular vectors (the randomised SVD of the initialiser, ``seed``). ``loss_fn(model, batch)``
    returns the loss (default: ``model(**batch).loss``, transformers' convention). Nothing of the
    model changes: no parameter gets a gradient, its training mode is kept."""
    check_rank(max_rank)
    names = _targets(model, target_modules, exclude_modules)
    probes = {name: _GradientProbe(name, model.get_submodule(name), max_rank, seed)
              for name in names}
    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
    handles = [h for probe in probes.values() for h in probe.attach()]
    seen = 0
    try:
        for batch in tqdm(batches, desc="gradient share", unit="batch", disable=not progress):
            seen += 1
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                    raise ValueError(f"loss_fn must return a one-element tensor, got "
                                     f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
                calls = [(probe, x, y) for probe in probes.values() for x, y in probe.calls]
                if not loss.requires_grad or not calls:
                    raise ValueError("the loss does not depend on any target layer's output")
                # Gradients of the layers' outputs only: no parameter gets a .grad.
                grads = torch.autograd.grad(loss, [y for _, _, y in calls], allow_unused=True)
            for (probe, x, _), gy in zip(calls, grads):
                if gy is not None:
                    probe.rows.append((x, gy))
            for probe in probes.values():
                probe.finish_batch()
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("batches is empty: give at least one batch")
    return [LayerCurve(name, *probe.features, probe.shares()) for name, probe in probes.items()]


class _GradientProbe:
    """Hooks on one layer: its calls' (x, output) in this batch, then the r×r projected
    gradient's per-rank norms and ‖G‖² accumulated at the end of each batch."""

    def __init__(self, name: str, module: nn.Module, max_rank: int, seed: int):
        kind = bases.kind_of(module)
        self.name, self.module = name, module
        self.features = bases.features(module, kind)
        W = bases.dequantized_weight(module, kind).detach()
        rank = min(max_rank, *W.shape)
        U, _, Vh = randomized_svd(W, rank, seed=seed)
        self.U, self.V = U.float(), Vh.mT.float()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.projected = torch.zeros(rank, dtype=torch.float64, device=W.device)
        self.total = torch.zeros((), dtype=torch.float64, device=W.device)

    def attach(self):
        return [self.module.register_forward_pre_hook(self._pre),
                self.module.register_forward_hook(self._post)]

    def _pre(self, _module, args):
        # Frozen layers below this one leave x without grad; a leaf that requires it makes the
        # output's gradient flow, and x needing no grad means nothing upstream is cut off.
        x = args[0]
        if torch.is_grad_enabled() and not x.requires_grad:
            return (x.detach().requires_grad_(), *args[1:])
        return None

    def _post(self, _module, args, output):
        if output.requires_grad:
            self.calls.append((args[0].detach(), output))

    def finish_batch(self):
        """Every call of the layer in the batch counts as rows of one G = Σ gyᵀ x."""
        if self.rows:
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in self.rows]).float()
            gy = torch.cat([gy.reshape(-1, gy.shape[-1]) for _, gy in self.rows]).float()
            M = ((gy @ self.U).double().T @ (x @ self.V).double()).pow(2)
            self.projected += M.cumsum(0).cumsum(1).diagonal()  # ‖M[:r, :r]‖² for each r
            self.total += gradient_norm2(x, gy)
        self.calls, self.rows = [], []

    def shares(self) -> list[float]:
        if self.total == 0:
            raise ValueError(f"layer {self.name!r}: no gradient reached its output in any batch "
                             "(does the loss use it? leave it out with exclude_modules)")
        return (self.projected / self.total).clamp(max=1.0).tolist()


def gradient_norm2(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """‖gyᵀ x‖²_F in float64 without holding the out×in product: Σ (x xᵀ) ⊙ (gy gyᵀ) in row
    blocks when the rows are few, else gyᵀ x a block of output columns at a time."""
    n, (in_features, out_features) = x.shape[0], (x.shape[1], gy.shape[1])
    x, gy = x.double(), gy.double()
    total = x.new_zeros(())
    if n * (in_features + out_features) <= in_features * out_features:
        for i in range(0, n, GRAM_BLOCK):
            for j in range(0, n, GRAM_BLOCK):
                total += ((x[i:i + GRAM_BLOCK] @ x[j:j + GRAM_BLOCK].T)
                          * (gy[i:i + GRAM_BLOCK] @ gy[j:j + GRAM_BLOCK].T)).sum()
        return total
    block = max(1, (1 << 22) // max(in_features, 1))
    for j in range(0, out_features, block):
        total += (gy[:, j:j + block].T @ x).pow(2).sum()
    return total
