"""``EDoRALinear``: EDoRA around a base layer, which it wraps (``base_layer``, as PEFT's tuner
layers do).

The base layer keeps W0 and the bias (frozen); the EDoRA layer adds the frozen factors A, B and
the trainable R and magnitude. The kind of the base decides the path (``edora_kernels.bases``):
an ``nn.Linear`` or a GPT-2 ``Conv1D`` goes through the fused ``edora_linear`` on W0 itself (a
transposed view for Conv1D, never a copy); a quantized base (bitsandbytes 4/8-bit, torchao int8)
runs its own forward and ``edora_epilogue`` adds the adapter, its norm terms computed once from
the dequantized weight.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import bases
from . import basis as basis_digest
from .checks import check_rank, check_seed
from .mixed import (
    BASE_NAME,
    KernelTables,
    RowTables,
    as_assignment,
    mixed_epilogue,
    mixed_on_triton,
    row_tables,
    rows_this_forward,
)
from .norm import (
    NormTermsCache,
    StampedEntries,
    adapter_norms,
    compute_dtype,
    compute_norm_terms,
    row_norm,
)
from .op_common import cpu_threads_for
from .ops import edora_epilogue, edora_linear
from .options import LayerOptions
from .svd import edora_factors

# Recompute the norm terms on every forward and compare with the cached ones (debugging writes
# that bypass the version counter); read at each forward so a test or a session can flip it.
VERIFY_NORM_ENV = "EDORA_VERIFY_NORM"
# The adapter a layer is built with; its R and magnitude are the layer's own parameters.
DEFAULT_ADAPTER = "default"
# How many sets of adapters a layer keeps the mixed-batch tables (served) and the detached
# norms (trained) of.
SERVED_TABLES = 4


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Trainable tensors stay in fp32 on half-precision models (as PEFT's autocast_adapter_dtype):
    # the optimizer needs the precision, and ‖W0‖ may exceed the fp16 range.
    return compute_dtype(weight_dtype)


def base_kind(name: str, module: nn.Module) -> bases.Kind:
    """The kind of a base layer, or a ValueError naming ``name`` and what is supported."""
    kind = bases.kind_of(module)
    if kind is None:
        raise ValueError(f"{bases.unsupported(name, module)} is not a base layer EDoRA can "
                         f"wrap; {bases.SUPPORTED}")
    return kind


class AdapterWeights(nn.Module):
    """R and magnitude of one more adapter; ``basis`` names the layer's basis it uses (None: the
    layer's own A, B; else a key of ``extra_bases``)."""

    def __init__(self, R: torch.Tensor, magnitude: torch.Tensor, basis: str | None = None
                 ) -> None:
        super().__init__()
        self.R = nn.Parameter(R)
        self.magnitude = nn.Parameter(magnitude)
        self.basis = basis


class ExtraBasis(nn.Module):
    """A second basis of a layer: frozen A, B of another rank, alpha or initialisation, for
    adapters trained on it (docs/DESIGN.md §13). It answers to what forward reads of a basis
    (``A``, ``B``, ``rank``, ``scaling``, ``norm_cache``) as the layer itself does for its own."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.rank, self.alpha = A.shape[0], float(alpha)
        self.norm_cache = NormTermsCache()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class EDoRALinear(nn.Module):
    """``y = m/‖W0 + s·BRA‖_row ⊙ (base(x) − b + s·x Aᵀ Rᵀ Bᵀ) + b`` around ``base_layer``.

    Submodule ``base_layer`` (frozen, holding W0 and b); buffers ``A`` and ``B`` (frozen, saved
    with the adapter since SVD signs make them non-reproducible); parameters ``R`` and
    ``magnitude`` (trainable) of the adapter "default". More adapters share the basis A, B
    (:meth:`add_adapter`; their R and magnitude in ``extra_adapters``) or use a second basis of
    another rank or alpha (:meth:`add_basis`, ``extra_bases``; :meth:`basis_of`); ``active_adapter``
    names the one forward uses, and ``row_adapters`` (set by ``EDoRAModel`` for
    ``adapter_names=``) gives each row of a batch its own. ``weight`` and ``bias`` are the base
    layer's.
    ``EDoRALinear(base, rank)`` is a bare layer (zero factors) to be loaded into;
    :meth:`from_linear` initialises one from the base's weight.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float = 16.0, **options) -> None:
        super().__init__()
        self.kind = base_kind(type(base_layer).__name__, base_layer)
        self.options = LayerOptions.from_kwargs("EDoRALinear", alpha=alpha, **options)
        self.in_features, self.out_features = bases.features(base_layer, self.kind)
        check_rank(rank, self.in_features, self.out_features)
        self.rank = rank
        self.base_layer = base_layer.requires_grad_(False)
        bases.prepare_base(base_layer, self.kind)
        dtype = bases.weight_dtype(base_layer, self.kind)
        device = bases.stamped_weight(base_layer, self.kind).device
        self.register_buffer("A", torch.zeros(rank, self.in_features, device=device, dtype=dtype))
        self.register_buffer("B", torch.zeros(self.out_features, rank, device=device,
                                              dtype=dtype))
        adapter = {"device": device, "dtype": _adapter_dtype(dtype)}
        self.R = nn.Parameter(torch.zeros(rank, rank, **adapter))
        self.magnitude = nn.Parameter(torch.ones(self.out_features, **adapter))
        self.merged = False
        # (R, m, n, basis) as merge() used them: unmerge() inverts exactly that, whatever
        # happened to the parameters in between (an optimizer step on leftover gradients, a load).
        self._merge_snapshot: tuple | None = None
        self.norm_cache = NormTermsCache()
        self.adapter_disabled = False  # EDoRAModel.disable_adapter(): run the base alone
        self.extra_adapters = nn.ModuleDict()
        self.extra_bases = nn.ModuleDict()  # key -> ExtraBasis, for adapters of another basis
        self.active_adapter = DEFAULT_ADAPTER
        # Per leading row of the input, the index of its adapter in adapter_names (len() for
        # the base model): a host tensor, or the RowAssignment EDoRAModel shares among its
        # layers for one forward; None: every row uses active_adapter.
        self.row_adapters = None
        # (adapters) -> their detached row norms; (served adapters, dtype, base row) -> their
        # RowTables: each kept while the adapters' R (and m) and the norm terms are unchanged
        self._norm_rows = StampedEntries(SERVED_TABLES)
        self._served_tables = StampedEntries(SERVED_TABLES)
        # Set by the installer: other parameters of the model that share W0's storage (tied
        # embeddings) and that storage; merge() would change them too, so it refuses while the
        # layer still holds that storage.
        self.tied_to: list[str] = []
        self.tied_storage: int | None = None
        self.register_state_dict_post_hook(self._state_dict_holds_w0)

    def _option(name: str):  # noqa: N805 (a property factory, used in the class body)
        """The option ``name`` as an attribute; setting it checks the new value."""
        return property(lambda self: getattr(self.options, name),
                        lambda self, value: setattr(self, "options",
                                                    self.options.replace(**{name: value})))

    alpha = _option("alpha")
    dropout = _option("dropout")
    dropout_mode = _option("dropout_mode")
    detach_norm = _option("detach_norm")
    backend = _option("backend")
    del _option

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def weight(self):
        """The base layer's weight, in its own layout (as PEFT's tuner layers expose it): W0
        (out×in) for an ``nn.Linear``, in×out for a Conv1D, the quantized tensor otherwise."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name, value):
        # layer.weight = ... (untying a shared embedding) sets the base layer's own weight.
        if name == "weight" and "base_layer" in self.__dict__.get("_modules", {}):
            self.base_layer.weight = value
            return
        super().__setattr__(name, value)

    def _w0(self) -> torch.Tensor:
        """W0 (out×in) of a dense base: the weight itself or Conv1D's transposed view."""
        return bases.dense_weight(self.base_layer, self.kind)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, base_layer: nn.Module, rank: int, alpha: float = 16.0, *,
                    seed: int | None = None, **options) -> "EDoRALinear":
        """Wrap ``base_layer`` (an ``nn.Linear``, a GPT-2 ``Conv1D`` or a quantized linear; its
        weight is shared, never copied) and initialise A, B, R, m from its weight
        (``init``, ``split``, ``sigma`` and the other ``LayerOptions``); ``seed`` makes the
        random parts reproducible."""
        layer = cls(base_layer, rank, alpha, **options)
        A, B = edora_factors(layer.base_weight(), rank, init=layer.options.init,
                             split=layer.options.split, seed=seed)
        layer.initialise(A, B, seed=seed)
        return layer

    @classmethod
    def from_factors(cls, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor,
                     alpha: float = 16.0, *, seed: int | None = None,
                     **options) -> "EDoRALinear":
        """Like :meth:`from_linear` with precomputed factors (batched initialisation, loading)."""
        layer = cls(base_layer, A.shape[0], alpha, **options)
        layer.initialise(A, B, seed=seed)
        return layer

    @torch.no_grad()
    def initialise(self, A: torch.Tensor, B: torch.Tensor, *, seed: int | None = None) -> None:
        """Set the factors, draw R (std ``sigma``) and start m at ‖W0 + s·B R A‖, so that g = 1
        and the layer starts as its base."""
        check_seed(seed)
        shapes = {"A": (self.rank, self.in_features), "B": (self.out_features, self.rank)}
        for name, t in (("A", A), ("B", B)):
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"factors must be A {shapes['A']} and B {shapes['B']}; got "
                                 f"{name} {tuple(t.shape)}")
        # Copied into the layer's own buffers: never an alias of the caller's tensor (a slice
        # of a batched factorisation or of a loaded file, unaligned: BLAS would round differently).
        self.A.copy_(A.detach())
        self.B.copy_(B.detach())
        R, m = self._fresh_adapter(seed, self.norm_terms(cached=False))
        self.R.copy_(R)
        self.magnitude.copy_(m)

    def _fresh_adapter(self, seed: int | None, terms=None, basis=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """R drawn with std ``sigma`` and m = ‖W0 + s·B R A‖ on ``basis`` (the layer's own by
        default): an adapter that starts as the base layer."""
        basis = self if basis is None else basis
        gen = None
        if seed is not None and self.R.device.type != "meta":
            gen = torch.Generator(device=self.R.device).manual_seed(seed + 1)
        R = torch.randn(basis.rank, basis.rank, generator=gen, device=self.R.device,
                        dtype=self.R.dtype) * self.options.sigma
        cdt = compute_dtype(basis.A.dtype)
        terms = self.norm_terms(basis=basis) if terms is None else terms
        n = row_norm(terms, basis.B.to(cdt) @ R.to(cdt), basis.scaling)
        return R, n.to(self.magnitude.dtype)

    # --- adapters -----------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of the layer: "default" first, then the added ones in order."""
        return [DEFAULT_ADAPTER, *self.extra_adapters]

    def adapter_weights(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(R, magnitude) of the adapter ``name``."""
        if name == DEFAULT_ADAPTER:
            return self.R, self.magnitude
        parameters = self._extra(name)._parameters
        return parameters["R"], parameters["magnitude"]

    def _extra(self, name: str) -> AdapterWeights:
        # read from the module dicts directly: a mixed batch asks for every adapter of every
        # layer each step, and nn.Module's attribute lookup is most of that cost at K = 64
        weights = self.extra_adapters._modules.get(name)
        if weights is None:
            raise ValueError(f"{self._display_name()} has no adapter {name!r} (its adapters: "
                             f"{self.adapter_names})")
        return weights

    def basis_of(self, name: str):
        """The basis adapter ``name`` uses: the layer itself (its A, B, rank, scaling) or one
        of ``extra_bases``; either has ``A``, ``B``, ``rank``, ``scaling`` and ``norm_cache``."""
        key = None if name == DEFAULT_ADAPTER else self._extra(name).basis
        return self if key is None else self.extra_bases[key]

    @torch.no_grad()
    def add_basis(self, key: str, A: torch.Tensor, B: torch.Tensor, alpha: float) -> None:
        """Another basis (A: r×in, B: out×r, its own rank and alpha) for adapters trained on it,
        copied into buffers on the layer's device and dtype."""
        if not isinstance(key, str) or not key or "." in key or key in self.extra_bases:
            raise ValueError(f"basis key {key!r} must be a new non-empty string without '.'")
        rank = A.shape[0] if A.dim() == 2 else -1
        check_rank(rank, self.in_features, self.out_features)
        shapes = {"A": (rank, self.in_features), "B": (self.out_features, rank)}
        for name, t in (("A", A), ("B", B)):
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{self._display_name()}: a basis must be A {shapes['A']} and "
                                 f"B {shapes['B']}; got {name} {tuple(t.shape)}")
        like = {"device": self.A.device, "dtype": self.A.dtype}
        self.extra_bases[key] = ExtraBasis(A.detach().to(**like).clone(),
                                           B.detach().to(**like).clone(), alpha)

    @torch.no_grad()
    def add_adapter(self, name: str, *, seed: int | None = None, basis: str | None = None
                    ) -> None:
        """A new adapter on this layer's basis (or on ``extra_bases[basis]``): R drawn as at
        initialisation (std ``sigma``, ``seed``), m such that it starts as the base layer.
        Reads no W0 while that basis's norm terms are cached, runs no factorisation."""
        check_adapter_name(name, self.adapter_names)
        if self.merged:
            raise RuntimeError(f"{self._display_name()} is merged; unmerge() before adding "
                               "adapters")
        if basis is not None and basis not in self.extra_bases:
            raise ValueError(f"{self._display_name()} has no basis {basis!r} (its bases: "
                             f"{list(self.extra_bases)})")
        R, m = self._fresh_adapter(seed, basis=None if basis is None
                                   else self.extra_bases[basis])
        self.extra_adapters[name] = AdapterWeights(R, m, basis)

    def delete_adapter(self, name: str) -> None:
        """Drop the adapter ``name`` (not "default", whose R and m are the layer's own), and its
        basis if no other adapter uses it; the active adapter falls back to "default" if it
        was ``name``."""
        if name == DEFAULT_ADAPTER:
            raise ValueError(f"the adapter {DEFAULT_ADAPTER!r} is the layer's own and cannot be "
                             "deleted; load another adapter into it instead")
        key = self._extra(name).basis  # raises for an unknown name
        del self.extra_adapters[name]
        self._norm_rows.clear()
        self._served_tables.clear()
        if key is not None and all(w.basis != key for w in self.extra_adapters.values()):
            del self.extra_bases[key]
        if self.active_adapter == name:
            self.active_adapter = DEFAULT_ADAPTER

    def set_active_adapter(self, name: str) -> None:
        self.adapter_weights(name)  # raises for an unknown name
        if self.merged and name != self.active_adapter:
            raise RuntimeError(f"{self._display_name()} is merged with adapter "
                               f"{self.active_adapter!r}; unmerge() before switching")
        self.active_adapter = name

    def _active(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.adapter_weights(self.active_adapter)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            if self.merged:  # the base holds the merged weight: W0 is reconstructed
                return F.linear(x, self.base_weight(), self.bias)
            return self.base_layer(x)
        R, magnitude = self._active()
        if self.merged:
            if torch.is_grad_enabled() and (R.requires_grad or magnitude.requires_grad):
                raise RuntimeError(
                    "EDoRALinear is merged, so R and magnitude would get no gradient: call "
                    "unmerge() before training, or run under torch.no_grad() / freeze them")
            return self.base_layer(x)
        dropout = self.dropout if self.training else 0.0
        rows = rows_this_forward(self)
        if rows is not None:
            return self._mixed_forward(x, dropout, rows)
        basis = self.basis_of(self.active_adapter)
        if self.kind.dense:
            return edora_linear(
                x, self._w0(), self.bias, basis.A, basis.B, R, magnitude, basis.scaling,
                dropout=dropout, dropout_mode=self.dropout_mode, detach_norm=self.detach_norm,
                backend=self.backend, norm_terms=self.norm_terms(basis=basis))
        bases.prepare_base(self.base_layer, self.kind)
        terms = self.norm_terms(basis=basis)
        return self._through_epilogue(x, dropout, self.base_layer, lambda y0, x_in: (
            edora_epilogue(y0, x_in, self._bias(y0), basis.A, basis.B, R, magnitude, basis.scaling,
                           norm_terms=terms, detach_norm=self.detach_norm,
                           backend=self.backend)))

    def _through_epilogue(self, x, dropout: float, base, epilogue) -> torch.Tensor:
        """``epilogue(base(x), x)``. With dropout, as PEFT's DoRA on a quantized base: "peft"
        mode runs the base on the dropped input too, ``y = epi(base(x̃), x̃) + base(x) −
        base(x̃)``; "lowrank" feeds the dropped input to the rank-r branch only."""
        y0 = base(x)
        if dropout == 0.0:
            return epilogue(y0, x)
        x_drop = F.dropout(x, p=dropout, training=True)
        if self.dropout_mode == "lowrank":
            return epilogue(y0, x_drop)
        y0_drop = base(x_drop)
        correction = y0 - y0_drop  # first: the epilogue may add into y0_drop in place
        return epilogue(y0_drop, x_drop) + correction

    def _mixed_forward(self, x: torch.Tensor, dropout: float, rows) -> torch.Tensor:
        """Each leading row of ``x`` with its own adapter (``rows``): one base pass for
        the batch, the rank-r term and g per row (``edora_kernels.mixed``). Only the adapters
        the batch uses take part, however many the layer holds; adapters of another basis
        (``extra_bases``) take the rank-r term on their rows from it."""
        assignment = as_assignment(rows, x, self._display_name())
        if self.merged:
            raise RuntimeError(f"{self._display_name()} is merged; unmerge() before a batch "
                               "with adapter_names")
        if self.kind.dense:
            def base(inp):
                return F.linear(inp, self._w0(), self.bias)
        else:
            bases.prepare_base(self.base_layer, self.kind)
            base = self.base_layer
        names = self.adapter_names
        groups: dict[int, list[int]] = {}  # basis (by id) -> the indices of its adapters used
        for index in sorted(set(assignment.values) - {len(names)}):
            groups.setdefault(id(self.basis_of(names[index])), []).append(index)
        if not groups:  # the base model's rows only
            return base(x)
        parts = [self._basis_rows(members, assignment, x) for members in groups.values()]
        if len(parts) == 1 and dropout == 0.0:
            basis, tables, local, adapters = parts[0]
            if self._mixed_on_triton(x, basis.rank):
                y0 = None if self.kind.dense else base(x)
                return mixed_on_triton(x, y0, self._w0() if self.kind.dense else None,
                                       self._bias(x if y0 is None else y0),
                                       basis.A, basis.B, tables, basis.scaling,
                                       *self._row_index(assignment, local, x, tables))
            if self.kind.dense:  # the base product inside the mixed step (one node)
                return mixed_epilogue(None, x, self.bias, basis.A, basis.B, tables,
                                      basis.scaling, assignment.index(local, x.device),
                                      weight=self._w0(), base_rows=len(tables.g) > adapters)
        return self._through_epilogue(x, dropout, base, lambda y0, x_in: self._mixed_epilogue(
            y0, x_in, parts, assignment))

    def _basis_rows(self, members: list[int], assignment, x: torch.Tensor) -> tuple:
        """What one basis's rows of a mixed batch need: (basis, the tables of its adapters
        ``members`` (indices in ``adapter_names``) — or, for a Triton training step with
        detached norms, the adapters' weights (:class:`~edora_kernels.mixed.KernelTables`),
        from which the kernels form them —, each row's index in them on the host —
        ``len(members)``, the base row of the tables, for a row of another basis or of the
        base model; the tables hold that row only if some row takes it —, ``len(members)``)."""
        names = self.adapter_names
        used = [names[i] for i in members]
        basis = self.basis_of(used[0])
        position = {index: i for i, index in enumerate(members)}
        local = [position.get(i, len(members)) for i in assignment.values]
        base_row = len(members) in local
        weights = [p for name in used for p in self.adapter_weights(name)]
        training = torch.is_grad_enabled() and any(p.requires_grad for p in weights)
        if training and self.detach_norm and self._mixed_on_triton(x, basis.rank):
            # the kernels form the tables and norms themselves, in the step's first launch
            tables = KernelTables(tuple(weights[0::2]), tuple(weights[1::2]),
                                  self.norm_terms(basis=basis), base_row)
        else:
            tables = self._row_tables(used, weights, not training, basis,
                                      compute_dtype(x.dtype), base_row)
        return basis, tables, local, len(members)

    @staticmethod
    def _row_index(assignment, local: list[int], x: torch.Tensor, tables) -> tuple:
        """``local`` on x's device per leading row (int64) and per token (int32, for the
        Triton kernels' table rows), and with gradients the leading rows of each row of the
        ``tables`` (int32, ``RowAssignment.table_order``), made once per forward."""
        tokens = x[0].numel() // x.shape[-1] if x.shape[0] else 1
        table_rows = (len(tables.cores) + tables.base_row if isinstance(tables, KernelTables)
                      else len(tables.g))
        order = None  # only a backward sums per table row
        if torch.is_grad_enabled():
            order = assignment.table_order(local, table_rows, x.device)
        return (assignment.index(local, x.device),
                assignment.index(local, x.device, repeat=tokens, dtype=torch.int32), order)

    def _row_tables(self, used: list[str], weights: list, serving: bool, basis, cdt,
                    base_row: bool) -> RowTables:
        """The tables of the adapters ``used`` (one basis; ``weights`` their R and m in turn),
        with the base model's row if ``base_row``. Served adapters (``serving``: nothing needs
        a gradient) keep theirs while their R and m and the norm terms stay the same: a batch
        served again gathers from them, nothing stacked or divided."""
        key = (tuple(used), cdt, base_row)
        terms = None if torch.compiler.is_compiling() else self.norm_terms(basis=basis)
        if serving and terms is not None:
            kept = self._served_tables.get(key, weights, terms)
            if kept is not None:
                return kept
        cores, magnitudes = weights[0::2], weights[1::2]
        # A dozen small passes over K×out beside the norms' GEMMs (2K·out·r² multiply-adds):
        # on a CPU, one thread until those GEMMs outweigh waking the others for each pass
        # (measured on 2 vCPUs: one thread is faster at 64 adapters × 256 rows, r = 16, slower
        # at 4096 rows)
        with cpu_threads_for(len(used) * self.out_features * basis.rank ** 2 // 8):
            tables = row_tables(cores, magnitudes, self._adapter_norms(used, cores, basis),
                                cdt, base_row)
        if serving and terms is not None:
            self._served_tables.put(key, weights, terms, tables)
        return tables

    def _mixed_epilogue(self, y0: torch.Tensor, x: torch.Tensor, parts: list[tuple],
                        assignment) -> torch.Tensor:
        """The adapters' rows of ``y0 = base(x)``, one basis at a time; with several bases each
        takes its own rows (the rows of none keep ``y0``). A dense base's y0 comes from our own
        ``F.linear`` (no hook of the base layer holds it), so the epilogue adds into it."""
        if len(parts) == 1:
            basis, tables, local, _ = parts[0]
            if self._mixed_on_triton(x, basis.rank):
                return mixed_on_triton(x, y0, None, self._bias(y0), basis.A, basis.B, tables,
                                       basis.scaling,
                                       *self._row_index(assignment, local, x, tables))
            return mixed_epilogue(y0, x, self._bias(y0), basis.A, basis.B, tables, basis.scaling,
                                  assignment.index(local, x.device), own_y0=self.kind.dense)
        y = y0
        for basis, tables, local, adapters in parts:
            own = [i for i, index in enumerate(local) if index < adapters]
            where = assignment.index(own, x.device)
            x_own, own_local = x[where], [local[i] for i in own]
            if self._mixed_on_triton(x, basis.rank):
                rows_y = mixed_on_triton(x_own, y0[where], None, self._bias(y0), basis.A, basis.B,
                                         tables, basis.scaling,
                                         *self._row_index(assignment, own_local, x_own,
                                                         tables))
            else:
                rows_y = mixed_epilogue(y0[where], x_own, self._bias(y0), basis.A, basis.B, tables,
                                        basis.scaling, assignment.index(own_local, x.device),
                                        own_y0=True)
            y = y.index_copy(0, where, rows_y)
        return y

    def _bias(self, y0: torch.Tensor) -> torch.Tensor | None:
        """The base's bias in the dtype of its output ``y0``: a quantized base computes (and
        holds its bias) in its compute dtype and casts its output back to the input's, as
        bitsandbytes' 4-bit layer does with bf16 compute and fp32 activations."""
        return None if self.bias is None else self.bias.to(y0.dtype)

    def _mixed_on_triton(self, x: torch.Tensor, rank: int) -> bool:
        """Whether a mixed batch runs on the Triton kernels (serving or training): the layer's
        backend resolves to Triton for x, outside torch.compile, for x's dtype and the rank."""
        from .backends import resolve

        if torch.compiler.is_compiling() or resolve(self.backend, x.device) != "triton":
            return False
        from .backends.triton.configs import use_torch_path

        return not use_torch_path(x.dtype, rank)

    def _adapter_norms(self, names: list[str], cores, basis) -> torch.Tensor:
        """‖W0 + s·B R_a A‖ per row for the adapters ``names`` of ``basis`` (K×out, float64),
        whose R are ``cores``. Detached norms (``detach_norm``) are kept for
        the set ``names`` while every R in it and the norm terms stay the same, and are
        recomputed all at once otherwise: one set of GEMMs for all K costs less than picking
        out the changed ones (and a device index of them)."""
        terms = self.norm_terms(basis=basis)
        if terms is None:  # under torch.compile
            terms = compute_norm_terms(self.base_weight(), basis.A)
        if not self.detach_norm or torch.compiler.is_compiling():
            n = adapter_norms(terms, basis.B, torch.stack(cores), basis.scaling)
            return n.detach() if self.detach_norm else n
        n = self._norm_rows.get(tuple(names), cores, terms)
        if n is None:
            with torch.no_grad():
                n = adapter_norms(terms, basis.B, torch.stack(cores), basis.scaling)
            self._norm_rows.put(tuple(names), cores, terms, n)
        return n

    # --- norm terms -----------------------------------------------------------------------------

    def norm_terms(self, cached: bool = True, basis=None):
        """The float64 norm terms of (W0, A) — A of ``basis``, the layer's own by default —
        cached with that basis and recomputed when W0 or A changes (docs/DESIGN.md §2); a
        quantized W0 is dequantized only then. None under torch.compile for a dense base, where
        the op computes them in the graph (a cache keyed on storages and version counters
        cannot be traced)."""
        basis = self if basis is None else basis
        if not cached:
            return compute_norm_terms(self.base_weight(), basis.A)
        if torch.compiler.is_compiling():
            if self.kind.dense:
                return None
            return compute_norm_terms(self.base_weight(), basis.A)
        terms = basis.norm_cache.get(bases.stamped_weight(self.base_layer, self.kind), basis.A,
                                     self.base_weight)
        if os.environ.get(VERIFY_NORM_ENV, "0") not in ("", "0"):
            fresh = compute_norm_terms(self.base_weight(), basis.A)
            for name, cached_term, exact in zip(terms._fields, terms, fresh):
                if not torch.allclose(cached_term, exact, rtol=1e-12, atol=0):
                    raise RuntimeError(
                        f"{self._display_name()}: cached norm term {name} is stale (weight or "
                        "A was written without moving its version counter, e.g. through "
                        "`.data`); call edora_kernels.refresh_norm_terms(model) after such "
                        "writes")
        return terms

    def refresh_norm_terms(self) -> None:
        """Forget the cached norm terms; the next forward recomputes them from W0 and A."""
        for basis in (self, *self.extra_bases.values()):
            basis.norm_cache.clear()
        self._norm_rows.clear()
        self._served_tables.clear()

    def _display_name(self) -> str:
        return getattr(self, "adapted_name", None) or f"EDoRALinear({self.extra_repr()})"

    def __getstate__(self) -> dict:
        # W0's digest is kept with a weak reference to W0's storage and belongs to it: a
        # pickle or a copy starts without it (NormTermsCache and StampedEntries do the same
        # for themselves).
        state = self.__dict__.copy()
        state.pop("_weight_digest", None)
        return state

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda(): the cached terms belong to the old tensors; free them now.
        self.refresh_norm_terms()
        result = super()._apply(fn, recurse)
        # model.to(bf16) must not round R and m to half: an optimizer step of 1e-4 relative
        # would not move them (as PEFT keeps adapters in fp32 on half models).
        for param in (p for name in self.adapter_names for p in self.adapter_weights(name)):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return result

    # --- merging ------------------------------------------------------------------------------

    def _norm_and_direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖V‖ and V = W0 + s·B R A for the active adapter on its basis."""
        w0 = self.base_weight()
        cdt = compute_dtype(w0.dtype)
        R, _ = self._active()
        basis = self.basis_of(self.active_adapter)
        P = basis.B.to(cdt) @ R.detach().to(cdt)
        n = row_norm(compute_norm_terms(w0, basis.A), P, basis.scaling)
        return n, w0.detach().to(cdt) + basis.scaling * (P @ basis.A.to(cdt))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``(m / ‖V‖)[:, None] · V`` with ``V = W0 + s·BRA`` (out×in, dense): the weight of the
        merged layer."""
        if self.merged:
            return self._w0().detach().clone()
        n, V = self._norm_and_direction()
        g = self._active()[1].detach().to(n.dtype) / n
        return (g.unsqueeze(1) * V).to(bases.weight_dtype(self.base_layer, self.kind))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base's weight (in place), so that forward is the base's.

        Refused for a quantized base (the merged weight would have to be quantized again:
        ``merge_and_unload`` does that, into a new base layer), when a magnitude entry is 0
        (that row of W0 would be erased and :meth:`unmerge` could not restore it), and while
        W0 is tied to another parameter of the model.
        """
        if self.merged:
            raise RuntimeError("EDoRALinear is already merged")
        if not self.kind.dense:
            raise RuntimeError(
                f"cannot merge {self._display_name()} in place: its {self.kind.name} base would "
                "have to be quantized again; edora_kernels.merge_and_unload(model) returns a "
                "model whose base layers hold the merged weight, quantized again")
        if self.tied_to and self._w0().untyped_storage().data_ptr() == self.tied_storage:
            raise RuntimeError(
                f"cannot merge {self._display_name()}: its weight is tied to {self.tied_to}, "
                "which merging in place would change too; untie it first (give the layer its "
                "own copy: layer.weight = nn.Parameter(layer.weight.detach().clone(), "
                "requires_grad=False))")
        R, magnitude = self._active()
        zero = (magnitude == 0).nonzero().flatten()
        if zero.numel():
            raise RuntimeError(f"cannot merge: magnitude is 0 for rows {zero[:8].tolist()}; "
                               "merging would erase those rows of W0 for good")
        n, V = self._norm_and_direction()
        self._merge_snapshot = (R.detach().clone(), magnitude.detach().clone(), n,
                                self.basis_of(self.active_adapter))
        # W0's digest before its bits change: the fingerprint of the base the adapter was
        # trained on, merged or unmerged again (a file saved then loads into that base)
        self._digest_before_merge = basis_digest.weight_digest(self)
        self._w0().copy_((magnitude.to(n.dtype) / n).unsqueeze(1) * V)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 from the (R, m, n) that :meth:`merge` used."""
        if not self.merged:
            raise RuntimeError("EDoRALinear is not merged")
        self._w0().copy_(self.base_weight())
        self._merge_snapshot = None
        self.merged = False
        basis_digest.keep_digest(self, self._digest_before_merge)

    # --- state ----------------------------------------------------------------------------------

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W0 (out×in): the weight itself (a view for Conv1D), dequantized for a quantized base,
        or — merged — the weight unmerge() would restore (a copy)."""
        if not self.merged:
            return bases.dequantized_weight(self.base_layer, self.kind).detach()
        merged = self._w0()
        *snapshot, basis = self._merge_snapshot
        R, m, n = (t.to(merged.device) for t in snapshot)
        cdt = n.dtype
        delta = basis.scaling * (basis.B.to(cdt) @ R.to(cdt) @ basis.A.to(cdt))
        w0 = merged.detach().to(cdt) * (n / m.to(cdt)).unsqueeze(1) - delta
        return w0.to(merged.dtype)

    @staticmethod
    def _state_dict_holds_w0(layer, state_dict, prefix, local_metadata) -> None:
        """A state dict always holds W0 (and only tensors): a merged layer writes the weight
        that unmerge() would restore, so the file loads into any layer, merged or not. (A hook:
        it runs after the base layer wrote its merged weight.)"""
        if layer.merged:
            w0 = layer.base_weight()
            state_dict[prefix + "base_layer.weight"] = w0.T if layer.kind is bases.CONV1D else w0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The base model's own keys (weight, bias) load into the base layer: a checkpoint of
        # the unadapted model fills a model built with EDoRA already in place (meta-device
        # initialisation, FSDP).
        for name in ("weight", "bias"):
            if prefix + name in state_dict and prefix + "base_layer." + name not in state_dict:
                state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)
        # What is loaded is W0 and an adapter: the layer is unmerged afterwards.
        if self.merged and prefix + "base_layer.weight" in state_dict:
            self.merged, self._merge_snapshot = False, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        o = self.options
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={o.alpha}, dropout={o.dropout}, "
                f"dropout_mode={o.dropout_mode!r}, base={self.kind.name}, "
                f"bias={self.bias is not None}, detach_norm={o.detach_norm}, "
                f"backend={o.backend!r}, merged={self.merged}")


def refresh_norm_terms(module: nn.Module) -> int:
    """Drop the cached norm terms of every EDoRA layer in ``module`` (itself included), and the
    norms and g tables mixed batches keep, so the next forward recomputes them. Needed only
    after writes the version counter cannot see: ``layer.weight.data.mul_(…)`` (or R's, m's),
    ``.data.copy_``, in-place initialisers run on ``.data``, writes through a numpy view.
    Returns how many layers were refreshed."""
    layers = [m for m in module.modules() if isinstance(m, EDoRALinear)]
    for layer in layers:
        layer.refresh_norm_terms()
    return len(layers)


def freeze_all_but_adapters(model: nn.Module, trainable: bool = True) -> None:
    """Freeze every parameter; R and magnitude of the EDoRA layers train unless ``trainable`` is
    False (inference)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, EDoRALinear):
            for p in module.adapter_weights(module.active_adapter):
                p.requires_grad_(trainable)


def check_adapter_name(name, existing: list[str]) -> None:
    """A new adapter's name: a non-empty string without dots (a module name), not the base
    model's row name, not taken."""
    if not isinstance(name, str) or not name or "." in name or name == BASE_NAME:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '.', other "
                         f"than {BASE_NAME!r}")
    if name in existing:
        raise ValueError(f"an adapter {name!r} exists already (adapters: {existing})")
