"""``EDoRALinear``: a drop-in replacement for ``nn.Linear`` that calls the ``edora_linear`` op."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_dropout_backend, check_dropout_mode, check_finite_number, check_rank
from .norm import NormTermsCache, compute_dtype, compute_norm_terms, row_norm
from .ops import edora_linear
from .svd import edora_factors

# Recompute the norm terms on every forward and compare with the cached ones (debugging writes
# that bypass the version counter); read at each forward so a test or a session can flip it.
VERIFY_NORM_ENV = "EDORA_VERIFY_NORM"


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Trainable tensors stay in fp32 on half-precision models (as PEFT's autocast_adapter_dtype):
    # the optimizer needs the precision, and ‖W0‖ may exceed the fp16 range.
    return compute_dtype(weight_dtype)


class EDoRALinear(nn.Module):
    """``y = m/‖W0 + s·BRA‖_row ⊙ (x W0ᵀ + s·x Aᵀ Rᵀ Bᵀ) + b`` with W0, b, A, B frozen.

    Parameters: ``weight`` and ``bias`` (frozen), ``R`` and ``magnitude`` (trainable).
    Buffers: ``A`` and ``B`` (frozen, saved with the adapter since SVD signs make them
    non-reproducible). Build one with :meth:`from_linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 16.0,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        dropout_mode: str = "peft",
        detach_norm: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        check_dropout_backend(dropout, backend)
        check_dropout_mode(dropout_mode)
        check_finite_number("alpha", alpha)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.dropout, self.dropout_mode = float(alpha), float(dropout), dropout_mode
        self.detach_norm, self.backend = detach_norm, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False)
                     if bias else None)
        self.register_buffer("A", torch.zeros(rank, in_features, **factory))
        self.register_buffer("B", torch.zeros(out_features, rank, **factory))
        adapter = {"device": device, "dtype": _adapter_dtype(self.weight.dtype)}
        self.R = nn.Parameter(torch.zeros(rank, rank, **adapter))
        self.magnitude = nn.Parameter(torch.ones(out_features, **adapter))
        self.merged = False
        # (R, m, n) as merge() used them: unmerge() inverts exactly that, whatever happened to
        # the parameters in between (an optimizer step on leftover gradients, a load).
        self._merge_snapshot: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.norm_cache = NormTermsCache()
        self.adapter_disabled = False  # EDoRAModel.disable_adapter(): run W0 alone
        # Set by apply_edora: other parameters of the model that share W0's storage (tied
        # embeddings) and that storage; merge() would change them too, so it refuses while the
        # layer still holds that storage.
        self.tied_to: list[str] = []
        self.tied_storage: int | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        *,
        init: str = "rsvd",
        split: str = "u",
        sigma: float = 1e-5,
        dropout: float = 0.0,
        dropout_mode: str = "peft",
        detach_norm: bool = True,
        backend: str = "auto",
        seed: int | None = None,
    ) -> "EDoRALinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied) and initialise A, B, R, m.

        ``init``: "rsvd" (randomised SVD), "svd" (exact) or "random" (ablation). ``split``: "u"
        (B = U_r, A = U_rᵀ W0, the paper's choice) or "sqrt". ``sigma``: std of R's Gaussian init
        (0 gives zeros). ``seed`` makes the random parts reproducible.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        A, B = edora_factors(linear.weight, rank, init=init, split=split, seed=seed)
        return cls.from_factors(linear, A, B, alpha, sigma=sigma, dropout=dropout,
                                dropout_mode=dropout_mode, detach_norm=detach_norm,
                                backend=backend, seed=seed)

    @classmethod
    def from_factors(
        cls,
        linear: nn.Linear,
        A: torch.Tensor,
        B: torch.Tensor,
        alpha: float = 16.0,
        *,
        sigma: float = 1e-5,
        dropout: float = 0.0,
        dropout_mode: str = "peft",
        detach_norm: bool = True,
        backend: str = "auto",
        seed: int | None = None,
    ) -> "EDoRALinear":
        """Like :meth:`from_linear` with precomputed factors (used by batched initialisation)."""
        weight = linear.weight
        out_features, in_features = weight.shape
        rank = A.shape[0]
        layer = cls(in_features, out_features, rank, alpha, bias=linear.bias is not None,
                    dropout=dropout, dropout_mode=dropout_mode, detach_norm=detach_norm,
                    backend=backend,
                    device="meta")
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        layer.bias = (None if linear.bias is None
                      else nn.Parameter(linear.bias.detach(), requires_grad=False))
        if tuple(A.shape) != (rank, in_features) or tuple(B.shape) != (out_features, rank):
            raise ValueError(f"factors must be A ({rank}, {in_features}) and B ({out_features}, "
                             f"{rank}); got A {tuple(A.shape)}, B {tuple(B.shape)}")
        layer.A = A.detach().to(device=weight.device, dtype=weight.dtype).contiguous()
        layer.B = B.detach().to(device=weight.device, dtype=weight.dtype).contiguous()
        adapter = {"device": weight.device, "dtype": _adapter_dtype(weight.dtype)}
        gen = None
        if seed is not None:
            gen = torch.Generator(device=weight.device).manual_seed(seed + 1)
        R = torch.randn(rank, rank, generator=gen, **adapter) * sigma
        layer.R = nn.Parameter(R)
        # m = ‖W0 + s·B R A‖ at init, so that g = 1 and the layer starts as the base layer.
        cdt = compute_dtype(weight.dtype)
        n = row_norm(compute_norm_terms(weight, layer.A), layer.B.to(cdt) @ R.to(cdt),
                     layer.scaling)
        layer.magnitude = nn.Parameter(n.to(adapter["dtype"]))
        return layer

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return F.linear(x, self.base_weight(), self.bias)
        if self.merged:
            if torch.is_grad_enabled() and (self.R.requires_grad or self.magnitude.requires_grad):
                raise RuntimeError(
                    "EDoRALinear is merged, so R and magnitude would get no gradient: call "
                    "unmerge() before training, or run under torch.no_grad() / freeze them")
            return F.linear(x, self.weight, self.bias)
        return edora_linear(
            x, self.weight, self.bias, self.A, self.B, self.R, self.magnitude, self.scaling,
            dropout=self.dropout if self.training else 0.0, dropout_mode=self.dropout_mode,
            detach_norm=self.detach_norm, backend=self.backend, norm_terms=self.norm_terms(),
        )

    # --- norm terms -----------------------------------------------------------------------------

    def norm_terms(self):
        """The float64 norm terms of (weight, A), cached here and recomputed when either tensor
        changes (docs/DESIGN.md §2); None under torch.compile, where the op computes them in the
        graph (a cache keyed on storages and version counters cannot be traced)."""
        if torch.compiler.is_compiling():
            return None
        terms = self.norm_cache.get(self.weight, self.A)
        if os.environ.get(VERIFY_NORM_ENV, "0") not in ("", "0"):
            fresh = compute_norm_terms(self.weight, self.A)
            for name, cached, exact in zip(terms._fields, terms, fresh):
                if not torch.allclose(cached, exact, rtol=1e-12, atol=0):
                    raise RuntimeError(
                        f"{self._display_name()}: cached norm term {name} is stale (weight or "
                        "A was written without moving its version counter, e.g. through "
                        "`.data`); call edora_kernels.refresh_norm_terms(model) after such "
                        "writes")
        return terms

    def refresh_norm_terms(self) -> None:
        """Forget the cached norm terms; the next forward recomputes them from weight and A."""
        self.norm_cache.clear()

    def _display_name(self) -> str:
        return getattr(self, "adapted_name", None) or f"EDoRALinear({self.extra_repr()})"

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda(): the cached terms belong to the old tensors; free them now.
        self.norm_cache.clear()
        result = super()._apply(fn, recurse)
        # model.to(bf16) must not round R and m to half: an optimizer step of 1e-4 relative
        # would not move them (as PEFT keeps adapters in fp32 on half models).
        for param in (self.R, self.magnitude):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return result

    # --- merging ------------------------------------------------------------------------------

    def _norm_and_direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        cdt = compute_dtype(self.weight.dtype)
        P = self.B.to(cdt) @ self.R.detach().to(cdt)
        n = row_norm(compute_norm_terms(self.weight, self.A), P, self.scaling)
        return n, self.weight.detach().to(cdt) + self.scaling * (P @ self.A.to(cdt))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``(m / ‖V‖)[:, None] · V`` with ``V = W0 + s·BRA``: the weight of the merged layer."""
        if self.merged:
            return self.weight.detach().clone()
        n, V = self._norm_and_direction()
        g = self.magnitude.detach().to(n.dtype) / n
        return (g.unsqueeze(1) * V).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (in place) so that forward is a plain ``F.linear``.

        Refused when a magnitude entry is 0: that row of W0 would be erased and
        :meth:`unmerge` could not restore it.
        """
        if self.merged:
            raise RuntimeError("EDoRALinear is already merged")
        if self.tied_to and self.weight.untyped_storage().data_ptr() == self.tied_storage:
            raise RuntimeError(
                f"cannot merge {self._display_name()}: its weight is tied to {self.tied_to}, "
                "which merging in place would change too; untie it first (give the layer its "
                "own copy: layer.weight = nn.Parameter(layer.weight.detach().clone(), "
                "requires_grad=False))")
        zero = (self.magnitude == 0).nonzero().flatten()
        if zero.numel():
            raise RuntimeError(f"cannot merge: magnitude is 0 for rows {zero[:8].tolist()}; "
                               "merging would erase those rows of W0 for good")
        n, V = self._norm_and_direction()
        self._merge_snapshot = (self.R.detach().clone(), self.magnitude.detach().clone(), n)
        self.weight.copy_((self.magnitude.to(n.dtype) / n).unsqueeze(1) * V)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``weight = W0`` from the (R, m, n) that :meth:`merge` used."""
        if not self.merged:
            raise RuntimeError("EDoRALinear is not merged")
        self.weight.copy_(self.base_weight())
        self._merge_snapshot = None
        self.merged = False

    # --- state ----------------------------------------------------------------------------------

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W0: the weight itself, or — merged — the weight unmerge() would restore (a copy)."""
        if not self.merged:
            return self.weight.detach()
        R, m, n = (t.to(self.weight.device) for t in self._merge_snapshot)
        cdt = n.dtype
        delta = self.scaling * (self.B.to(cdt) @ R.to(cdt) @ self.A.to(cdt))
        w0 = self.weight.detach().to(cdt) * (n / m.to(cdt)).unsqueeze(1) - delta
        return w0.to(self.weight.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            # A state dict always holds W0 (and only tensors): a merged layer writes the weight
            # that unmerge() would restore, so the file loads into any layer, merged or not.
            destination[prefix + "weight"] = self.base_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # What is loaded is W0 and an adapter: the layer is unmerged afterwards.
        if self.merged and prefix + "weight" in state_dict:
            self.merged, self._merge_snapshot = False, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
                f"dropout_mode={self.dropout_mode!r}, "
                f"bias={self.bias is not None}, detach_norm={self.detach_norm}, "
                f"backend={self.backend!r}, merged={self.merged}")


def refresh_norm_terms(module: nn.Module) -> int:
    """Drop the cached norm terms of every EDoRA layer in ``module`` (itself included), so the
    next forward recomputes them. Needed only after writes the version counter cannot see:
    ``layer.weight.data.mul_(…)``, ``.data.copy_``, in-place initialisers run on ``.data``, writes
    through a numpy view. Returns how many layers were refreshed."""
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
            module.R.requires_grad_(trainable)
            module.magnitude.requires_grad_(trainable)
