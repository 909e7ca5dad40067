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
import dataclasses
import importlib.util
import json
import os
import threading
import weakref

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from . import basis
from .adapter_io import (
    adapter_tensors,
    edora_layers,
    layer_config,
    load_edora_state_dict,
    read_adapter_file,
    read_file,
    save_edora,
    tensor_problems,
    write_adapter_file,
)
from .checks import exact_names, matches_target, pattern_value, quote
from .config import EDoRAConfig
from .distributed import copy_whole, main_process, sharded_registered, whole
from .export import merge_and_unload, unload
from .install import install, positions
from .integrations.peft import target_names
from .layer import DEFAULT_ADAPTER, EDoRALinear, check_adapter_name
from .mixed import RowAssignment, as_assignment, row_indices, rows_this_forward
from .model import apply_edora, check_weights, factorise

CORES_FORMAT = "edora_kernels.adapter_cores"  # R and magnitude only, on a basis saved elsewhere
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEADS_NAME = "modules_to_save.safetensors"


def _outside_layers(module: nn.Module):
    """``module`` and its modules, not walking into an EDoRA layer: its children are its base
    and its adapters, a thousand modules at 64 adapters."""
    yield module
    if not isinstance(module, EDoRALinear):
        for child in module.children():
            yield from _outside_layers(child)


def _row_switched(module: nn.Module):
    """The EDoRA layers and trained heads in ``module`` (itself included)."""
    return (m for m in _outside_layers(module) if isinstance(m, (EDoRALinear, TrainedHead)))


def _checkpoint_owners(module: nn.Module):
    """The modules in ``module`` that transformers gives a gradient-checkpointing function
    (those with a ``gradient_checkpointing`` flag)."""
    return (m for m in _outside_layers(module) if hasattr(m, "gradient_checkpointing"))


class _RecomputeWithItsRows:
    """A module's gradient-checkpointing function, wrapped so that the recomputation inside
    backward runs the module's EDoRA layers and heads with the rows of the forward that
    recorded it. A step may record several forwards, each with its own ``adapter_names``,
    before one backward (a contrastive loss); ``rows_to_recompute`` alone holds the last."""

    def __init__(self, checkpoint, owner: nn.Module) -> None:
        self.checkpoint, self.owner = checkpoint, owner

    def __call__(self, function, *args, **kwargs):
        modules = list(_row_switched(self.owner))
        rows = modules[0].row_adapters if modules else None  # this forward's, None unmixed

        def run(*inner_args, **inner_kwargs):
            if torch._C._current_graph_task_id() == -1:  # the forward itself
                return function(*inner_args, **inner_kwargs)
            before = [getattr(m, "rows_to_recompute", None) for m in modules]
            for module in modules:
                module.rows_to_recompute = rows
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                for module, previous in zip(modules, before):
                    module.rows_to_recompute = previous

        return self.checkpoint(run, *args, **kwargs)


# The keyword inputs whose first dimension is the batch, looked at before the others (a
# broadcast position_ids of batch 1 may come first).
BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "pixel_values",
                "input_features", "input_values")


def _batch_size(args, kwargs, adapter_names) -> int:
    """The batch a forward's inputs hold: the first dimension of its first positional tensor,
    else of the first of BATCH_INPUTS given, else of any tensor (else the names' count)."""
    candidates = [*args, *(kwargs.get(k) for k in BATCH_INPUTS), *kwargs.values()]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return len(adapter_names)


# One forward at a time per model: the rows of a forward live on the model's layers for its
# duration (as PEFT's adapter_names do), so concurrent forwards from threads are serialised
# instead of reading each other's rows. Kept beside the model, not in it: a lock does not
# pickle or deep-copy.
_FORWARD_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _one_forward_at_a_time(model: nn.Module):
    if torch.compiler.is_compiling():  # dynamo cannot trace a lock (fullgraph would fail)
        return contextlib.nullcontext()
    with _LOCKS_GUARD:
        lock = _FORWARD_LOCKS.get(model)
        if lock is None:
            lock = _FORWARD_LOCKS[model] = threading.RLock()
    return lock


class EDoRATuner(nn.Module):
    """``EDoRAModel.base_model``, as PEFT's tuner (``LoraModel``) is ``PeftModel.base_model``:
    the adapted model as ``.model``, every other attribute and the call passed on to it.
    transformers reaches a PEFT model's model as ``base_model.model`` (Trainer's label
    smoothing, which shifts labels for causal LMs by its class name; NEFTune)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


class TrainedHead(nn.Module):
    """A head EDoRA trains and saves with the adapter (PEFT's ``modules_to_save``): a trainable
    copy per adapter beside the frozen original, which runs instead while the adapter is
    disabled and for rows of the base model."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.trained_module = copy.deepcopy(original)     # the adapter "default"
        self.extra_trained = nn.ModuleDict()              # the others, by name
        self.active_adapter = DEFAULT_ADAPTER
        self.use_original = False
        self.row_adapters = None                          # as EDoRALinear.row_adapters

    @property
    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER, *self.extra_trained]

    def module_for(self, name: str) -> nn.Module:
        return self.trained_module if name == DEFAULT_ADAPTER else self.extra_trained[name]

    def add_adapter(self, name: str) -> None:
        self.extra_trained[name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        if self.use_original:
            return self.original_module(*args, **kwargs)
        rows = rows_this_forward(self)
        if rows is None:
            return self.module_for(self.active_adapter)(*args, **kwargs)
        # Each row through its adapter's head (the base model's rows: the original); which
        # rows is read on the host, so the device is never waited on.
        x, rest = args[0], args[1:]
        assignment = as_assignment(rows, x, f"head {type(self.original_module).__name__}")
        modules = [*map(self.module_for, self.adapter_names), self.original_module]
        selections: dict[int, list[int]] = {}
        for row, index in enumerate(assignment.values):
            selections.setdefault(index, []).append(row)
        outputs = [modules[index](x[assignment.index(rows, x.device)], *rest, **kwargs)
                   for index, rows in selections.items()]
        gathered = [row for rows in selections.values() for row in rows]
        order = sorted(range(len(gathered)), key=gathered.__getitem__)
        return torch.cat(outputs)[assignment.index(order, x.device)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The unwrapped head's own keys (a checkpoint of the base model, loaded after a
        # meta-device build) fill both copies.
        copies = (prefix + "original_module.", prefix + "trained_module.",
                  prefix + "extra_trained.")
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(copies)]:
            value = state_dict.pop(key)
            for copy_prefix in copies[:2]:
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
                        rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern,
                        **vars(options))
        self.base_model = EDoRATuner(model)
        self.edora_config = config
        self._configs = {DEFAULT_ADAPTER: config}
        # Each adapter's basis: None for the model's own, else a key of the layers'
        # extra_bases; each basis's fingerprint settings (init, split, seed) by the same key.
        self._adapter_basis: dict[str, str | None] = {DEFAULT_ADAPTER: None}
        self._basis_settings: dict[str | None, dict] = {None: _settings(config)}
        self._active = [DEFAULT_ADAPTER]
        self._mixed_recorded = False  # whether some module holds rows to recompute
        self._wrap_heads(config)
        self.set_trainable(not config.inference_mode)

    def __new__(cls, *args, **kwargs):
        # With PEFT installed, an EDoRAModel is also a peft.PeftModel (Trainer's isinstance).
        if cls is EDoRAModel:
            cls = _peft_flavoured()
        return super().__new__(cls)

    def _wrap_heads(self, config: EDoRAConfig) -> None:
        """Wrap the heads ``config`` names that are not wrapped yet (each with a copy for every
        adapter the model holds)."""
        where = positions(self.get_base_model())
        wrapped = []
        for name in _head_names(self.get_base_model(), config.heads()):
            module = self.get_base_model().get_submodule(name)
            if not isinstance(module, TrainedHead):
                head = TrainedHead(module)
                for adapter in self.adapter_names()[1:]:
                    head.add_adapter(adapter)
                wrapped.append((where[id(module)], head))
        install(self.get_base_model(), wrapped)

    # --- pass-through -------------------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward; ``adapter_names`` (one per row, ``"__base__"`` for the base
        model) runs every row with its own adapter in one pass."""
        with _one_forward_at_a_time(self), self._rows(adapter_names, args, kwargs) as mixed:
            output = self.get_base_model()(*args, **kwargs)
        if mixed and torch.is_grad_enabled():
            output = self._differentiable(output)
        return output

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's ``generate``; ``adapter_names`` as in :meth:`forward`, one per input
        row (beams and returned sequences take their row's adapter)."""
        with _one_forward_at_a_time(self), self._rows(adapter_names, args, kwargs,
                                                      repeats=True):
            return self.get_base_model().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names, args, kwargs, repeats: bool = False):
        """Set the rows of one forward (yields whether it is a mixed one). A forward that
        records a graph also sets the rows its recomputation under gradient checkpointing
        takes (mixed.rows_this_forward), mixed or not; a no-grad one leaves them."""
        records = torch.is_grad_enabled()
        if records:
            self._recompute_with_their_rows()
        if adapter_names is None:
            if len(self._active) > 1:
                raise ValueError(f"adapters {self._active} are active together: pass "
                                 "adapter_names= (one per row) to say which row uses which")
            if records and getattr(self, "_mixed_recorded", True):
                for module in _row_switched(self.get_base_model()):
                    module.rows_to_recompute = None
                self._mixed_recorded = False
            yield False
            return
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list with one adapter name per row, got "
                            f"the string {adapter_names!r}")
        batch = _batch_size(args, kwargs, adapter_names)
        rows = RowAssignment(row_indices(adapter_names, self.adapter_names(), batch),
                             repeats=repeats)
        modules = list(_row_switched(self.get_base_model()))
        for module in modules:
            module.row_adapters = rows
            if records:
                module.rows_to_recompute = rows
        self._mixed_recorded = records or getattr(self, "_mixed_recorded", True)
        try:
            yield True
        finally:
            for module in modules:
                module.row_adapters = None

    def _recompute_with_their_rows(self) -> None:
        """Wrap each gradient-checkpointing function of the model (transformers'
        ``_gradient_checkpointing_func``, set by ``gradient_checkpointing_enable``) so that
        its recomputation runs with the rows of the forward that recorded it
        (:class:`_RecomputeWithItsRows`), once per function set."""
        owners = getattr(self, "_checkpoint_owners", None)
        if owners is None:
            owners = self._checkpoint_owners = list(_checkpoint_owners(self.get_base_model()))
        for owner in owners:
            function = owner.__dict__.get("_gradient_checkpointing_func")
            if function is not None and not isinstance(function, _RecomputeWithItsRows):
                owner._gradient_checkpointing_func = _RecomputeWithItsRows(function, owner)

    def _differentiable(self, output):
        """``output`` of a mixed batch, its floating tensors tied to a zero-valued anchor when
        none of them depends on a trained parameter (every row ``"__base__"`` or of an adapter
        that does not train) while the model trains some: autograd would refuse their
        backward, and a Trainer step on such a batch would stop. Backward then runs and leaves
        every gradient None, as for an adapter a mixed batch leaves out."""
        tensors = [t for t in tree_leaves(output)
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if any(t.requires_grad for t in tensors) or not tensors or not any(
                p.requires_grad for p in self.get_base_model().parameters()):
            return output
        anchor = torch.zeros((), device=tensors[0].device, requires_grad=True)
        return tree_map(lambda t: t + anchor.to(t.dtype)
                        if isinstance(t, torch.Tensor) and t.is_floating_point() else t, output)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The adapted model itself (``base_model.model``, as in PEFT)."""
        return self.base_model.model

    # --- adapters (PEFT's multi-adapter API) ----------------------------------------------------

    @property
    def peft_config(self) -> dict[str, EDoRAConfig]:
        return dict(self._configs)

    def adapter_names(self) -> list[str]:
        """Every adapter, "default" first, in the order they were added."""
        return list(self._configs)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    def only_active_adapter(self, what: str) -> str:
        """The active adapter, for ``what`` that takes one; a ValueError when several are."""
        if len(self._active) > 1:
            raise ValueError(f"{what} takes one adapter, and {self._active} are active: "
                             "set_adapter(name) the one to use first")
        return self._active[0]

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False,
                    **_ignored) -> None:
        """A new adapter with a fresh R (``peft_config.seed``) and m that start as the base
        model, and its own copies of the heads; not made active (``set_adapter``). It adapts
        the model's layers with the model's dropout and norm treatment. With the model's rank
        and initialisation it shares the model's basis (and its alpha): no W0 read while the
        norm terms are cached, no factorisation. With another rank (``r``, ``rank_pattern``)
        or ``init`` it gets a basis of its own, factorised from W0 as ``get_edora_model`` would
        with ``peft_config`` (its seed and alpha), or shared with an adapter that has it."""
        config = _as_edora_config(peft_config)
        check_adapter_name(adapter_name, self.adapter_names())
        key, factors = self._basis_of_config(adapter_name, config)
        self._check_same_basis_settings(adapter_name, config, key)
        if factors is not None:
            self._add_basis(key, *factors)
        self._add_on_basis(adapter_name, config, key)

    def _basis_of_config(self, adapter_name: str, config: EDoRAConfig
                         ) -> tuple[str | None, tuple | None]:
        """The basis an adapter added with ``config`` uses (None: the model's own) and, when
        the model does not hold it yet, what makes it (as :meth:`_basis_for`)."""
        if all(getattr(config, f) == getattr(self.edora_config, f)
               for f in ("r", "rank_pattern", "init")):
            return None, None
        layers = edora_layers(self.get_base_model())
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise RuntimeError(f"layers {merged[:4]} are merged; unmerge() before adding an "
                               f"adapter of another basis ({adapter_name!r})")
        ranks = {name: pattern_value(name, config.rank_pattern, config.r) for name in layers}
        settings = _settings(config)
        key = _basis_key(basis.fingerprint(layers, **settings, ranks=ranks))
        if key in self._basis_settings:
            return key, None
        targets = [([name], layer.base_layer) for name, layer in layers.items()]
        by_module = {id(layer.base_layer): ranks[name] for name, layer in layers.items()}
        check_weights(targets, by_module)
        factors = {names[0]: (A, B, float(pattern_value(names[0], config.alpha_pattern,
                                                        config.alpha)))
                   for names, _, A, B, _ in factorise(targets, by_module, init=config.init,
                                                      split=settings["split"],
                                                      seed=config.seed)}
        return key, (settings, factors)

    def _add_on_basis(self, adapter_name: str, config: EDoRAConfig, key: str | None) -> None:
        """Add ``adapter_name`` (fresh R and m) on the basis ``key`` in every layer, with its
        heads."""
        for layer in edora_layers(self.get_base_model()).values():
            layer.add_adapter(adapter_name, seed=config.seed, basis=key)
        for head in self.heads().values():
            head.add_adapter(adapter_name)
        self._configs[adapter_name] = config
        self._adapter_basis[adapter_name] = key
        self._wrap_heads(config)
        self._set_requires_grad()

    def _check_same_basis_settings(self, adapter_name: str, config: EDoRAConfig,
                                   key: str | None) -> None:
        """``config`` takes the layers and the layer options of the model, and the rank, alpha
        and initialisation of the basis ``key`` it is added on (a basis the model does not
        hold yet: its own)."""
        on_basis = [self._configs[n] for n, k in self._adapter_basis.items() if k == key]
        basis_config = on_basis[0] if on_basis else config
        checks = [*((f, basis_config) for f in ("r", "alpha", "rank_pattern", "alpha_pattern",
                                                 "init")),
                  *((f, self.edora_config) for f in ("dropout", "dropout_mode", "detach_norm"))]
        for field, reference in checks:
            if getattr(config, field) != getattr(reference, field):
                raise ValueError(
                    f"adapter {adapter_name!r}: {field}={getattr(config, field)!r} differs from "
                    f"its basis ({field}={getattr(reference, field)!r}); adapters on one "
                    "basis share their layers and settings (an adapter of another rank, "
                    "initialisation or seed gets a basis of its own)")
        if config.target_modules is None:
            return  # the basis's layers
        model = self.get_base_model()
        layers = set(edora_layers(model))
        wanted = set(target_names(model, config, "EDoRAConfig", adapted=True))
        outside = target_names(model, config, "EDoRAConfig")  # wrappable, not wrapped
        if wanted != layers or outside:
            raise ValueError(
                f"adapter {adapter_name!r} targets other layers than the model's basis (not in "
                f"the basis: {sorted(outside)[:4]}, left out: {sorted(layers - wanted)[:4]}); "
                "adapters on one basis adapt the same layers")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the one forward uses and the one that trains; a list makes
        several trainable together, for batches with ``adapter_names`` (multi-tenant
        training)."""
        names = [adapter_name] if isinstance(adapter_name, str) else [*dict.fromkeys(adapter_name)]
        known = self.adapter_names()
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise ValueError(f"no adapter {unknown or names!r} in this model (its adapters: "
                             f"{known})")
        for layer in edora_layers(self.get_base_model()).values():
            layer.set_active_adapter(names[0])
        for head in self.heads().values():
            head.active_adapter = names[0]
        self._active = names
        self._set_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop an adapter (not "default": its R and m are the layers' own). The model's other
        adapters, its basis and its norm terms are untouched; an active adapter deleted leaves
        "default" active."""
        if adapter_name == DEFAULT_ADAPTER:
            raise ValueError(f"the adapter {DEFAULT_ADAPTER!r} holds the basis and cannot be "
                             "deleted; load another adapter into it instead")
        if adapter_name not in self._configs:
            raise ValueError(f"no adapter {adapter_name!r} in this model (its adapters: "
                             f"{self.adapter_names()})")
        for layer in edora_layers(self.get_base_model()).values():
            layer.delete_adapter(adapter_name)
        for head in self.heads().values():
            del head.extra_trained[adapter_name]
            if head.active_adapter == adapter_name:
                head.active_adapter = DEFAULT_ADAPTER
        del self._configs[adapter_name]
        key = self._adapter_basis.pop(adapter_name)
        if key is not None and key not in self._adapter_basis.values():
            del self._basis_settings[key]  # the layers dropped it with its last adapter
        self._active = [n for n in self._active if n != adapter_name] or [DEFAULT_ADAPTER]
        self.set_adapter(self._active)

    def basis_fingerprint(self, adapter_name: str = DEFAULT_ADAPTER) -> dict:
        """The fingerprint of the basis ``adapter_name`` uses (``edora_kernels.basis``): the
        model's own, which every adapter shares unless one was loaded with another basis."""
        if adapter_name not in self._adapter_basis:
            raise ValueError(f"no adapter {adapter_name!r} in this model (its adapters: "
                             f"{self.adapter_names()})")
        return self._fingerprint(self._adapter_basis[adapter_name])

    def _fingerprint(self, key: str | None, state_dict=None) -> dict:
        layers = edora_layers(self.get_base_model())
        ranks = None if key is None else {n: layer.extra_bases[key].rank
                                          for n, layer in layers.items()}
        return basis.fingerprint(layers, **self._basis_settings[key], ranks=ranks,
                                 state_dict=state_dict)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", *,
                     is_trainable: bool = False, **_ignored) -> None:
        """Load a ``save_pretrained`` directory's adapter (and heads) as ``adapter_name``,
        adding it if the model does not hold it: Trainer's resume path, and the hot swap of a
        served adapter. Only R and m (and heads) are read when the model holds the adapter's
        basis — no W0 read, no factorisation, other adapters untouched. An adapter trained on
        the same base model with other basis settings (rank, init, seed) brings its
        basis from the saved tree (its own file, the tree's root or a sibling adapter's
        directory) as a second basis; one of another base model, or whose basis the tree does
        not carry, is refused naming the first difference."""
        config = _read_config(directory)
        where = os.path.join(directory, WEIGHTS_NAME)
        state, _ = read_file(where)
        key, new_basis = self._basis_for(directory, config)
        replacing = adapter_name in self._configs and self._adapter_basis[adapter_name] != key
        if replacing and adapter_name == DEFAULT_ADAPTER:
            raise ValueError(
                f"{directory}: the adapter was trained on basis {config.basis['digest']}, not "
                f"the one {DEFAULT_ADAPTER!r} holds ({self.basis_fingerprint()['digest']}); "
                "load it under another name")
        added = adapter_name not in self._configs or replacing
        # PEFT's rule: an adapter added without is_trainable is for inference only; loading into
        # an adapter the model holds (Trainer's load_best_model_at_end) keeps it as it was.
        inference = not is_trainable if added else self._configs[adapter_name].inference_mode
        config = dataclasses.replace(config, basis=None, inference_mode=inference)
        if added:
            if not replacing:
                check_adapter_name(adapter_name, self.adapter_names())
            self._check_same_basis_settings(adapter_name, config, key)
        layers = edora_layers(self.get_base_model())
        if new_basis is not None:
            ranks = {n: A.shape[0] for n, (A, _, _) in new_basis[1].items()}
        else:
            ranks = {n: (layer if key is None else layer.extra_bases[key]).rank
                     for n, layer in layers.items()}
        _check_cores(layers, state, ranks, adapter_name, where)
        # Every check passed: only now does the model change.
        if replacing:
            self.delete_adapter(adapter_name)  # a name reused for an adapter of another basis
        if added:
            if new_basis is not None:
                self._add_basis(key, *new_basis)
            self._add_on_basis(adapter_name, config, key)
        _copy_cores(layers, state, adapter_name)
        try:
            _load_heads(self.get_base_model(), directory, self.heads(), adapter_name)
        except ValueError:
            if added:  # no half-loaded adapter, no orphaned basis
                self.delete_adapter(adapter_name)
            raise
        self._configs[adapter_name] = config
        self.edora_config = self._configs[DEFAULT_ADAPTER]
        self._set_requires_grad()

    def _basis_for(self, directory, config: EDoRAConfig) -> tuple[str | None, tuple | None]:
        """The key of the model's basis the adapter in ``directory`` was trained on (None: the
        model's own), and — for a basis the model does not hold yet — what makes it:
        ``(settings, {layer: (A, B, alpha)})`` read from the saved tree."""
        saved = config.basis
        if saved is None:  # saved before fingerprints: only the model's own basis existed
            return None, None
        for key in self._basis_settings:
            if basis.difference(saved, self._fingerprint(key)) is None:
                return key, None
        own = self.basis_fingerprint()
        theirs, ours = set(saved["layers"]), set(own["layers"])
        if theirs != ours:
            raise ValueError(
                f"{directory}: the adapter adapts other layers than this model's adapters (only "
                f"the adapter: {sorted(theirs - ours)[:4]}, only the model: "
                f"{sorted(ours - theirs)[:4]}); every adapter of one model adapts the same "
                "layers")
        why = basis.base_difference(saved, own)
        if why is not None:
            raise ValueError(
                f"{directory}: the adapter was trained on basis {saved['digest']} of another "
                f"base model than this one ({own['digest']}): {why}. Load it into the base "
                "model it was trained on")
        source = _basis_source(directory, saved["digest"])
        if source is None:
            raise ValueError(
                f"{directory}: the adapter was trained on basis {saved['digest']}, not this "
                f"model's ({own['digest']}: {basis.difference(saved, own)}), and the saved "
                "tree does not carry that basis (no adapter_model.safetensors with its A and B "
                "in the adapter's directory, its parent or their subdirectories)")
        settings = {k: saved.get(k) for k in ("init", "split", "seed")}
        return _basis_key(saved), (settings, _read_basis(source, saved, own))

    def _add_basis(self, key: str, settings: dict, factors: dict) -> None:
        """A second basis in every layer: ``factors`` by layer name, checked already."""
        for name, layer in edora_layers(self.get_base_model()).items():
            layer.add_basis(key, *factors[name])
        self._basis_settings[key] = settings

    # --- training state -----------------------------------------------------------------------

    def heads(self) -> dict[str, TrainedHead]:
        """The trained heads by name."""
        return {n: m for n, m in self.get_base_model().named_modules()
                if isinstance(m, TrainedHead)}

    def head_names(self) -> list[str]:
        return list(self.heads())

    def set_trainable(self, trainable: bool) -> None:
        """R and magnitude of the active adapters in every EDoRA layer, and their heads, train
        (or not); everything else stays frozen."""
        self._trainable = trainable
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        """Everything frozen but the active adapters (unless frozen as a whole, or loaded for
        inference only)."""
        trainable = [name for name in self._active if getattr(self, "_trainable", True)
                     and not self._configs[name].inference_mode]
        for p in self.get_base_model().parameters():
            p.requires_grad_(False)
        for layer in edora_layers(self.get_base_model()).values():
            for name in trainable:
                for p in layer.adapter_weights(name):
                    p.requires_grad_(True)
        for head in self.heads().values():
            for name in trainable:
                head.module_for(name).requires_grad_(True)

    def print_trainable_parameters(self) -> None:
        params = list(self.get_base_model().parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model inside the block: W0 alone in every EDoRA layer and the original
        heads — bit-exactly the model before EDoRA."""
        switches = [*edora_layers(self.get_base_model()).values(), *self.heads().values()]
        for module in switches:
            _set_disabled(module, True)
        try:
            yield
        finally:
            for module in switches:
                _set_disabled(module, False)

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter merged and its heads (PEFT's meaning)."""
        self.only_active_adapter("merge_and_unload")
        _unwrap_heads(self.get_base_model(), trained=True)
        return merge_and_unload(self.get_base_model())

    def unload(self) -> nn.Module:
        """The base model as it was: W0 and the original heads."""
        _unwrap_heads(self.get_base_model(), trained=False)
        return unload(self.get_base_model())

    # --- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *,
                        selected_adapters: list[str] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool | None = None, **_ignored) -> None:
        """PEFT's layout: "default" in ``directory`` (``adapter_config.json``, the adapter with
        the basis A, B — the only copy of the basis — and the trained heads), every other
        adapter in ``directory/<name>/`` (its config, R and magnitude, its heads). Each config
        records the basis fingerprint. ``selected_adapters`` limits what is written.

        Only the main process writes (rank 0 unless ``is_main_process`` says, PEFT's argument).
        Under FSDP2 call it on every rank — the sharded tensors are gathered, a collective — or
        pass ``state_dict``, this model's state dict gathered already (Trainer does): the
        default adapter's tensors are then read from it and nothing is communicated.
        """
        sharded_registered(self)
        names = self.adapter_names() if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self._configs]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} are not adapters of this model "
                             f"(its adapters: {self.adapter_names()})")
        if state_dict is not None:  # this wrapper's keys, or the base model's
            state_dict = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        layers = edora_layers(self.get_base_model())
        # A second basis is written once, with the first adapter written on it.
        carrier = {}
        for name in names:
            carrier.setdefault(self._adapter_basis[name], name)
        # (sharded W0s' digests from a given state dict: no collective)
        fingerprints = {key: self._fingerprint(key, state_dict) for key in carrier}
        written = {}  # adapter -> (tensors, heads), gathered on every rank first
        for name in names:
            key = self._adapter_basis[name]
            if name == DEFAULT_ADAPTER:
                tensors = adapter_tensors(self.get_base_model(), state_dict)
            else:
                tensors = _adapter_tensors(layers, name, with_basis=carrier[key] == name)
            written[name] = (tensors, self._head_tensors(name, state_dict))
        if not main_process(is_main_process):
            return
        for name, (tensors, heads) in written.items():
            key = self._adapter_basis[name]
            where = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
            os.makedirs(where, exist_ok=True)
            config = dataclasses.replace(self._configs[name], basis=fingerprints[key])
            with open(os.path.join(where, CONFIG_NAME), "w") as f:
                json.dump(config.to_dict(), f, indent=2)
            path = os.path.join(where, WEIGHTS_NAME)
            if name == DEFAULT_ADAPTER:
                save_edora(self.get_base_model(), path, state_dict=tensors, is_main_process=True)
            elif carrier[key] == name:  # the save_edora format, with its basis
                write_adapter_file(path, tensors, {
                    n: layer_config(layer, layer.basis_of(name)) for n, layer in layers.items()})
            else:
                save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, path,
                          metadata={"format": CORES_FORMAT, "format_version": "1"})
            if heads:
                save_file(heads, os.path.join(where, HEADS_NAME))

    def _head_tensors(self, adapter_name: str, state_dict) -> dict[str, torch.Tensor]:
        """The trained heads of one adapter, whole, by ``{head}.{key}``."""
        heads = {}
        for name, head in self.heads().items():
            prefix = ("trained_module" if adapter_name == DEFAULT_ADAPTER
                      else f"extra_trained.{adapter_name}")
            for k, v in head.module_for(adapter_name).state_dict().items():
                key = f"{name}.{prefix}.{k}"
                if state_dict is not None and key not in state_dict:
                    raise ValueError(f"state_dict lacks the trained head tensor {key!r}")
                value = v if state_dict is None else state_dict[key]
                heads[f"{name}.{k}"] = whole(value).detach().cpu().contiguous()
        return heads

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike,
                        adapter_name: str = "default", *,
                        is_trainable: bool = False, **_ignored) -> "EDoRAModel":
        """``model`` (the base architecture with its pretrained weights) with the adapter and
        heads of ``directory`` — the basis (A, B) from that directory, or for an adapter saved
        in a subdirectory from the tree's root — checked against the fingerprint the adapter
        recorded (a different base model is refused, naming the first layer whose W0
        differs); frozen and in eval mode unless ``is_trainable``. More adapters of the tree:
        :meth:`load_adapter`."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: not a directory (from_pretrained takes the "
                                    "directory save_pretrained wrote)")
        basis_dir = _basis_directory(directory)
        root_config = _read_config(basis_dir)
        load_edora_state_dict(model, os.path.join(basis_dir, WEIGHTS_NAME))
        try:
            wrapped = cls(model, _without_basis(root_config), apply=False)
            saved = root_config.basis
            if saved is not None:  # the file's A and B were made with the settings it records
                wrapped._basis_settings[None] = {k: saved.get(k)
                                                 for k in ("init", "split", "seed")}
            own = wrapped.basis_fingerprint()
            why = None if saved is None else basis.difference(saved, own)
            if why is not None:
                raise ValueError(
                    f"{basis_dir}: the adapter was trained on basis {saved['digest']}, not on "
                    f"the one this model and the file make ({own['digest']}): {why}. Load it "
                    "into the base model it was trained on")
            if os.path.samefile(basis_dir, directory) and adapter_name == DEFAULT_ADAPTER:
                _load_heads(model, directory, wrapped.heads(), DEFAULT_ADAPTER)
            else:
                wrapped.load_adapter(directory, adapter_name, is_trainable=is_trainable)
                wrapped.set_adapter(adapter_name)
        except BaseException:
            unload(model)  # refused: the model as it came
            raise
        wrapped.set_trainable(is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped


def _adapter_tensors(layers: dict[str, EDoRALinear], adapter_name: str, *, with_basis: bool
                     ) -> dict[str, torch.Tensor]:
    """R and magnitude of ``adapter_name`` in every layer (and its basis's A, B), whole."""
    tensors = {}
    for layer_name, layer in layers.items():
        R, magnitude = layer.adapter_weights(adapter_name)
        basis = layer.basis_of(adapter_name)
        values = {"A": basis.A, "B": basis.B} if with_basis else {}
        for t, value in {**values, "R": R, "magnitude": magnitude}.items():
            tensors[f"{layer_name}.{t}"] = whole(value.detach())
    return tensors


def _as_edora_config(config) -> EDoRAConfig:
    if isinstance(config, EDoRAConfig):
        return config
    if hasattr(config, "lora_alpha"):  # a PEFT LoraConfig
        return EDoRAConfig.from_lora_config(config)
    raise TypeError(f"expected an EDoRAConfig or a peft LoraConfig, got {type(config).__name__}")


def _without_basis(config: EDoRAConfig) -> EDoRAConfig:
    return dataclasses.replace(config, basis=None)


def _basis_directory(directory) -> str:
    """Where the basis of the adapter in ``directory`` is: there when its file holds A and B,
    else the parent (PEFT's layout: other adapters in subdirectories of the default's)."""
    if _holds_basis(os.path.join(directory, WEIGHTS_NAME)):
        return os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if _holds_basis(os.path.join(parent, WEIGHTS_NAME)):
        return parent
    raise ValueError(f"{directory}: its adapter holds only R and magnitude, and neither it nor "
                     f"{parent} holds the basis (A, B) it was trained on: load it into a model "
                     "that has that basis (EDoRAModel.load_adapter)")


def _settings(config: EDoRAConfig) -> dict:
    """The fingerprint settings of the basis ``config`` makes."""
    return {"init": config.init, "split": config.layer_options().split, "seed": config.seed}


def _basis_key(fingerprint: dict) -> str:
    """The name a second basis has in the layers' ``extra_bases``."""
    return "basis_" + fingerprint["digest"][:16]


def _basis_source(directory, digest: str) -> str | None:
    """The adapter file of the saved tree around ``directory`` — the directory itself, its
    parent, or a subdirectory of that — that holds the A and B of basis ``digest``."""
    parent = os.path.dirname(os.path.abspath(directory))
    candidates = [os.fspath(directory), parent]
    with contextlib.suppress(OSError):
        candidates += sorted(e.path for e in os.scandir(parent) if e.is_dir())
    for candidate in dict.fromkeys(os.path.abspath(c) for c in candidates):
        path = os.path.join(candidate, WEIGHTS_NAME)
        if not _holds_basis(path):
            continue
        try:
            saved = _read_config(candidate).basis
        except ValueError:
            continue  # not an adapter directory: look on
        if saved is not None and saved.get("digest") == digest:
            return path
    return None


def _read_basis(path: str, saved: dict, own: dict) -> dict[str, tuple]:
    """``{layer: (A, B, alpha)}`` of basis ``saved`` from the adapter file ``path``, every layer
    of the model's basis ``own`` present with the rank ``saved`` records, finite."""
    state, configs = read_adapter_file(path)
    expected = {}
    for name, layer in own["layers"].items():
        rank, (out_f, in_f) = saved["layers"][name]["rank"], layer["shape"]
        expected.update({f"{name}.A": (rank, in_f), f"{name}.B": (out_f, rank)})
    missing = [k for k in expected if k not in state]
    problems = [f"missing keys: {quote(missing)}"] if missing else []
    problems += tensor_problems(state, expected)
    problems += [f"{name}: no rank {saved['layers'][name]['rank']} layer config"
                 for name in own["layers"]
                 if configs.get(name, {}).get("rank") != saved["layers"][name]["rank"]]
    if problems:
        raise ValueError(f"{path}: cannot read basis {saved['digest']} from it: "
                         + "; ".join(problems))
    return {name: (state[f"{name}.A"], state[f"{name}.B"], configs[name]["alpha"])
            for name in own["layers"]}


def _holds_basis(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with safe_open(path, framework="pt") as f:
        return f.metadata() is not None and f.metadata().get("format") != CORES_FORMAT


def _check_cores(layers: dict, state: dict, ranks: dict[str, int], adapter_name: str,
                 where: str) -> None:
    """``state`` holds R (rank×rank, ``ranks`` by layer) and magnitude of every layer, finite,
    and nothing else but a basis (A, B); a ValueError lists every problem."""
    expected = {}
    for name, layer in layers.items():
        expected.update({f"{name}.R": (ranks[name], ranks[name]),
                         f"{name}.magnitude": (layer.out_features,)})
    problems = []
    missing = [key for key in expected if key not in state]
    if missing:
        problems.append(f"missing keys: {quote(missing)}")
    bad = tensor_problems(state, expected)
    if bad:
        problems.append(f"bad tensors: {quote(bad)}")
    basis_keys = {f"{n}.{t}" for n in layers for t in ("A", "B")}  # a file that holds the basis
    unexpected = sorted(set(state) - set(expected) - basis_keys)
    if unexpected:
        problems.append(f"unexpected keys: {quote(unexpected)}")
    if problems:
        raise ValueError(f"cannot load {where} as adapter {adapter_name!r}: "
                         + "; ".join(problems))


@torch.no_grad()
def _copy_cores(layers: dict, state: dict, adapter_name: str) -> None:
    """R and magnitude of every layer from ``state`` (checked: :func:`_check_cores`) into
    ``adapter_name``."""
    for name, layer in layers.items():
        for t, target in zip(("R", "magnitude"), layer.adapter_weights(adapter_name)):
            copy_whole(target, state[f"{name}.{t}"])


def _set_disabled(module, disabled: bool) -> None:
    if isinstance(module, TrainedHead):
        module.use_original = disabled
    else:
        module.adapter_disabled = disabled


def _unwrap_heads(model: nn.Module, *, trained: bool) -> None:
    where = positions(model)
    install(model, [(where[id(head)], head.module_for(head.active_adapter) if trained
                     else head.original_module)
                    for head in {id(m): m for m in model.modules()
                                 if isinstance(m, TrainedHead)}.values()])


def _read_config(directory) -> EDoRAConfig:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            return EDoRAConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable EDoRA adapter config ({err})") from None


def _load_heads(model: nn.Module, directory, heads: dict[str, TrainedHead],
                adapter_name: str) -> None:
    """The trained heads saved in ``directory`` into ``adapter_name``'s copies."""
    heads_path = os.path.join(directory, HEADS_NAME)
    if not os.path.exists(heads_path):
        return
    saved = load_file(heads_path)
    state = {f"{name}.{k}": v for name, head in heads.items()
             for k, v in head.module_for(adapter_name).state_dict(keep_vars=True).items()}
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
