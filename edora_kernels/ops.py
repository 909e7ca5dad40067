"""The public ops: validation, backend dispatch, autograd and the torch.library registration.

Each op runs one backend step (docs/DESIGN.md §4): the backend's forward returns y plus what
backward keeps (``op_common.Saved``: v = x Aᵀ, P, n, g, the zero-magnitude slots and their z
columns), its backward turns gy into the input gradients, reading y itself for the magnitude's
(docs/DESIGN.md §3). In eager mode an ``autograd.Function`` runs the step with no more host work
than the step needs; under ``torch.compile`` the same step is a pair of ``torch.library`` custom
ops (forward, backward) with shape-only fakes, so ``fullgraph=True`` traces without breaks.

- ``edora_linear``: dense frozen weight, ``z = x W0ᵀ + s·v Pᵀ``.
- ``edora_epilogue``: any base layer, ``z = y0 − b + s·v Pᵀ`` with ``y0 = base(x)`` computed by
  the caller; the base layer's own autograd takes ``dy0 = gy ⊙ g``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends
from .checks import (
    check_adapter_args,
    check_dropout_backend,
    check_dropout_mode,
    check_frozen,
    check_linear_args,
    check_norm_terms,
)
from .dropout import linear_with_dropout
from .norm import TERMS_DTYPE, NormTerms, compute_dtype, compute_norm_terms, row_norm
from .op_common import (
    Saved,
    fake_adapter_grads,
    fake_saved,
    saved_tensors,
    slot_capacity,
)


def _kept_for_backward(saved, C: Tensor, G: Tensor, detach_norm: bool) -> tuple:
    """``(*saved, C, G)`` as backward keeps them: P, C and G serve only the norm's share of dR
    (detach_norm=False), so they are dropped otherwise."""
    if detach_norm:
        empty = C.new_empty(0)
        return (*Saved(*saved)._replace(P=empty), empty, empty)
    return (*saved, C, G)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _capacity(magnitude: Tensor, R: Tensor, detach_norm: bool, save: bool, backend: str) -> int:
    """Zero-magnitude slots: needed only where backward forms the magnitude sums S."""
    needs_sums = magnitude.requires_grad or (R.requires_grad and not detach_norm)
    return slot_capacity(magnitude, save and needs_sums, backend)


# --- edora_linear: the step in eager mode ---------------------------------------------------------

class _LinearStep(torch.autograd.Function):
    """One autograd node around the backend's forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, impl,
                capacity):
        y, saved = impl.forward(x, weight, bias, A, B, R, magnitude, terms, scaling, True,
                                capacity)
        ctx.save_for_backward(weight, bias, A, B, R, magnitude, y,
                              *_kept_for_backward(saved, terms.C, terms.G, detach_norm))
        ctx.scaling, ctx.detach_norm, ctx.impl = scaling, detach_norm, impl
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        if gy is None:  # y did not reach the loss
            return (None,) * 12
        weight, bias, A, B, R, magnitude, y, *saved, C, G = saved_tensors(ctx, "edora_linear")
        need_dx, _, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
        dx, dR, dm = ctx.impl.backward(
            gy, weight, bias, A, B, R, magnitude, NormTerms(None, C, G), ctx.scaling,
            ctx.detach_norm, y, Saved(*saved), need_dx, need_dR, need_dm)
        return (dx if need_dx else None, None, gy.sum(0) if need_dbias else None, None, None,
                dR if need_dR else None, dm if need_dm else None, *([None] * 5))


# --- edora_linear: the step under torch.compile -------------------------------------------------

@torch.library.custom_op("edora::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor,
    magnitude: Tensor, c0: Tensor, C: Tensor, G: Tensor, scaling: float, save: bool,
    capacity: int, detach_norm: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, saved = backends.load(backend).forward(x, weight, bias, A, B, R, magnitude,
                                              NormTerms(c0, C, G), scaling, save, capacity)
    return y, *saved


@_linear_fwd.register_fake
def _(x, weight, bias, A, B, R, magnitude, c0, C, G, scaling, save, capacity, detach_norm,
      backend):
    saved = fake_saved(x, A.shape[0], weight.shape[0], save, capacity)
    return x.new_empty(x.shape[0], weight.shape[0]), *saved


@torch.library.custom_op("edora::linear_bwd", mutates_args=())
def _linear_bwd(
    gy: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor,
    magnitude: Tensor, C: Tensor, G: Tensor, y: Tensor, v: Tensor, P: Tensor, n: Tensor,
    g: Tensor, slots: Tensor, zbuf: Tensor, scaling: float, detach_norm: bool, need_dx: bool,
    need_dR: bool, need_dm: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return backends.load(backend).backward(
        gy, weight, bias, A, B, R, magnitude, NormTerms(None, C, G), scaling, detach_norm, y,
        Saved(v, P, n, g, slots, zbuf), need_dx, need_dR, need_dm)


@_linear_bwd.register_fake
def _(gy, weight, bias, A, B, R, magnitude, C, G, y, v, P, n, g, slots, zbuf, scaling,
      detach_norm, need_dx, need_dR, need_dm, backend):
    dx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_dx else (0,))
    return dx, *fake_adapter_grads(R, magnitude, need_dR, need_dm)


def _linear_setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, R, magnitude, c0, C, G, scaling, save, capacity, detach_norm,
     backend) = inputs
    # y is the output itself (no copy): the next op usually keeps it anyway.
    y, *saved = output
    *saved, C, G = _kept_for_backward(saved, C, G, detach_norm)
    ctx.save_for_backward(weight, bias, A, B, R, magnitude, C, G, y, *saved)
    ctx.scaling, ctx.detach_norm, ctx.backend = scaling, detach_norm, backend
    ctx.set_materialize_grads(False)  # v, n, ... get no gradient: skip zero fills


def _linear_backward(ctx, gy, *_unused):
    if gy is None:  # grads are not materialised: y did not reach the loss
        return (None,) * 15
    saved = saved_tensors(ctx, "edora_linear")
    need_dx, _, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
    dx, dR, dm = _linear_bwd(gy, *saved, ctx.scaling, ctx.detach_norm, need_dx, need_dR,
                             need_dm, ctx.backend)
    return (dx if need_dx else None, None, gy.sum(0) if need_dbias else None, None, None,
            dR if need_dR else None, dm if need_dm else None, *([None] * 8))


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _step(custom_op, function, forward: str, args: tuple, differentiable: tuple, terms,
          scaling, detach_norm, backend):
    """The op's output for 2-D inputs and checked arguments: ``custom_op`` under torch.compile,
    the autograd ``function`` when one of ``differentiable`` needs a gradient, the backend's
    ``forward`` alone otherwise. ``args`` end with R and magnitude."""
    R, magnitude = args[-2:]
    save = _needs_grad(*differentiable)
    capacity = _capacity(magnitude, R, detach_norm, save, backend)
    if torch.compiler.is_compiling():
        return custom_op(*args, *terms, scaling, save, capacity, detach_norm, backend)[0]
    impl = backends.load(backend)
    if save:
        return function.apply(*args, terms, scaling, detach_norm, impl, capacity)
    return getattr(impl, forward)(*args, terms, scaling, False, 0)[0]


def _linear_step(x, weight, bias, A, B, R, magnitude, terms, scaling, detach_norm, backend):
    """y for 2-D x (``_step`` of the linear op)."""
    return _step(_linear_fwd, _LinearStep, "forward", (x, weight, bias, A, B, R, magnitude),
                 (x, R, magnitude, bias), terms, scaling, detach_norm, backend)


def edora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    R: Tensor,
    magnitude: Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    dropout_mode: str = "peft",
    detach_norm: bool = True,
    backend: str = "auto",
    norm_terms: NormTerms | None = None,
) -> Tensor:
    """EDoRA linear: ``y = m/‖W0 + s·BRA‖_row ⊙ (x W0ᵀ + s·x Aᵀ Rᵀ Bᵀ) + b``.

    Args:
        x: input ``(*, in_features)``.
        weight, bias: the frozen base layer, ``(out, in)`` and ``(out,)`` or None; same dtype as x.
        A, B: frozen factors ``(r, in)`` and ``(out, r)``.
        R, magnitude: trainable ``(r, r)`` core and ``(out,)`` magnitude.
        scaling: ``alpha / r``.
        dropout: dropout probability on the adapter input, always applied when > 0 (pass 0 in
            eval). The mask is regenerated in backward from a seed drawn from torch's default
            CPU generator, never stored.
        dropout_mode: "peft" (PEFT's and the paper's semantics: the dropped x also feeds the
            magnitude-scaled base path, ``y = x W0ᵀ + b + (g − 1)⊙(x̃ W0ᵀ) + g⊙s·x̃ Aᵀ Pᵀ``; two
            dense GEMMs each way) or "lowrank" (dropout on the rank-r branch only, as plain
            LoRA: ``y = g ⊙ (x W0ᵀ + s·x̃ Aᵀ Pᵀ) + b``; a different regulariser at the cost of
            the op without dropout).
        detach_norm: treat the row norm as a constant in backward (DoRA §4.3), as PEFT does.
        backend: "auto", "torch", "triton" or "cuda"; ``EDORA_BACKEND`` overrides "auto".
        norm_terms: the float64 ``NormTerms(c0, C, G)`` of (weight, A), e.g. from
            ``edora_kernels.norm.compute_norm_terms`` or a layer's cache. When None they are
            computed here, every call: one read of W0 and out·in·(r + 1) fp64 multiply-adds.

    Weight, A and B get no gradient. Adapter tensors may be in another floating dtype than x
    (e.g. fp32 R and magnitude on a bf16 model): n is float64, g and the epilogue run in fp32
    (fp64 for fp64 input) and the output has x's dtype. Under ``torch.autocast`` the op runs at
    the autocast dtype as F.linear does (x, weight, bias cast; R, m and the norm untouched).
    Forward-mode AD (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) and other functorch transforms run a composed-ATen version of
    the same formula.
    """
    cast = _autocast_dtype(x)
    if cast is not None:
        # As F.linear under autocast: x, weight and bias at the autocast dtype; R, m and the
        # float64 norm terms (from the uncast weight) as they are.
        if norm_terms is None and isinstance(weight, Tensor) and isinstance(A, Tensor):
            norm_terms = compute_norm_terms(weight, A)
        with torch.autocast(x.device.type, enabled=False):
            return edora_linear(
                x.to(cast), _cast(weight, cast), _cast(bias, cast), A, B, R, magnitude, scaling,
                dropout=dropout, dropout_mode=dropout_mode, detach_norm=detach_norm,
                backend=backend, norm_terms=norm_terms)
    check_linear_args(x, weight, bias, A, B, R, magnitude, scaling, dropout, backend)
    check_dropout_mode(dropout_mode)
    check_frozen(torch.is_grad_enabled(), weight=weight, A=A, B=B)
    if norm_terms is None:
        norm_terms = compute_norm_terms(weight, A)
    else:
        check_norm_terms(norm_terms, weight, A)
    backend = backends.resolve(backend, x.device)
    scaling = float(scaling) if not isinstance(scaling, torch.SymFloat) else scaling
    x2 = x.reshape(-1, x.shape[-1])
    if _transformed(x2, weight, bias, R, magnitude):
        y = _composed_linear(x2, weight, bias, A, B, R, magnitude, scaling, norm_terms,
                             dropout, dropout_mode, detach_norm)
    elif dropout > 0.0:
        y = linear_with_dropout(x2, weight, bias, A, B, R, magnitude, norm_terms, scaling,
                                dropout, dropout_mode, detach_norm)
    else:
        y = _linear_step(x2, weight, bias, A, B, R, magnitude, norm_terms, scaling, detach_norm,
                         backend)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(x) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives F.linear here, or None outside autocast (and for
    float64 inputs, which autocast leaves alone)."""
    if not isinstance(x, Tensor) or x.dtype not in _AUTOCAST_FROM:
        return None
    device = x.device.type
    # autocast knows no meta tensors (models built under torch.device("meta"))
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_FROM else t


def _transformed(*tensors) -> bool:
    """True under forward-mode AD or a functorch transform (jvp, vmap, grad): the custom ops
    define reverse mode only, so these take the composed path instead of a silent zero
    tangent."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return True
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered
        return False
    return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in present)


def _composed_linear(x, weight, bias, A, B, R, magnitude, scaling, terms, dropout, dropout_mode,
                     detach_norm):
    """The op's formula in differentiable ATen calls (both AD modes), same precisions: n from the
    float64 terms, g and the epilogue in the compute dtype."""
    dtype, cdt = x.dtype, compute_dtype(x.dtype)
    P = B.to(TERMS_DTYPE) @ R.to(TERMS_DTYPE)
    n = row_norm(terms, P, scaling)
    g = (magnitude.to(TERMS_DTYPE) / (n.detach() if detach_norm else n)).to(cdt)
    x_drop = F.dropout(x, p=dropout, training=True) if dropout > 0.0 else x
    low = scaling * F.linear(F.linear(x_drop, A.to(dtype)), P.to(dtype))
    b = 0.0 if bias is None else bias.to(cdt)
    if dropout > 0.0 and dropout_mode == "peft":
        base_drop = F.linear(x_drop, weight)
        y = F.linear(x, weight).to(cdt) + b + (g - 1) * base_drop.to(cdt) + g * low.to(cdt)
    else:
        y = g * (F.linear(x, weight) + low).to(cdt) + b
    return y.to(dtype)


# --- edora_epilogue: the same step on a base layer's output ------------------------------------

class _EpilogueStep(torch.autograd.Function):
    """One autograd node around the backend's epilogue forward and backward."""

    @staticmethod
    def forward(ctx, y0, x, bias, A, B, R, magnitude, terms, scaling, detach_norm, impl,
                capacity):
        y, saved = impl.epilogue_forward(y0, x, bias, A, B, R, magnitude, terms, scaling, True,
                                         capacity)
        ctx.save_for_backward(bias, A, B, R, magnitude, y, *saved, terms.c0, terms.C, terms.G)
        ctx.scaling, ctx.detach_norm, ctx.impl = scaling, detach_norm, impl
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        if gy is None:
            return (None,) * 12
        bias, A, B, R, magnitude, y, *saved, c0, C, G = saved_tensors(ctx, "edora_epilogue")
        saved = Saved(*saved)
        need_dy0, need_dx, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
        dy0, dx, dR, dm = ctx.impl.epilogue_backward(
            gy, bias, A, B, R, magnitude, NormTerms(c0, C, G), ctx.scaling, ctx.detach_norm, y,
            saved, need_dy0, need_dx, need_dR, need_dm)
        return (dy0 if need_dy0 else None, dx if need_dx else None,
                _epilogue_dbias(gy, saved.g) if need_dbias else None, None, None,
                dR if need_dR else None, dm if need_dm else None, *([None] * 5))


def _epilogue_dbias(gy, g):
    """y depends on b directly (+b) and through z (−b): ∂y/∂b = 1 − g."""
    return (gy * (1 - g).to(gy.dtype)).sum(0)


@torch.library.custom_op("edora::epilogue_fwd", mutates_args=())
def _epilogue_fwd(
    y0: Tensor, x: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor,
    magnitude: Tensor, c0: Tensor, C: Tensor, G: Tensor, scaling: float, save: bool,
    capacity: int, detach_norm: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, saved = backends.load(backend).epilogue_forward(
        y0, x, bias, A, B, R, magnitude, NormTerms(c0, C, G), scaling, save, capacity)
    return y, *saved


@_epilogue_fwd.register_fake
def _(y0, x, bias, A, B, R, magnitude, c0, C, G, scaling, save, capacity, detach_norm,
      backend):
    return y0.new_empty(y0.shape), *fake_saved(y0, A.shape[0], y0.shape[1], save, capacity)


@torch.library.custom_op("edora::epilogue_bwd", mutates_args=())
def _epilogue_bwd(
    gy: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor, magnitude: Tensor,
    c0: Tensor, C: Tensor, G: Tensor, y: Tensor, v: Tensor, P: Tensor, n: Tensor, g: Tensor,
    slots: Tensor, zbuf: Tensor, scaling: float, detach_norm: bool, need_dy0: bool,
    need_dx: bool, need_dR: bool, need_dm: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.load(backend).epilogue_backward(
        gy, bias, A, B, R, magnitude, NormTerms(c0, C, G), scaling, detach_norm, y,
        Saved(v, P, n, g, slots, zbuf), need_dy0, need_dx, need_dR, need_dm)


@_epilogue_bwd.register_fake
def _(gy, bias, A, B, R, magnitude, c0, C, G, y, v, P, n, g, slots, zbuf, scaling,
      detach_norm, need_dy0, need_dx, need_dR, need_dm, backend):
    dy0 = gy.new_empty(gy.shape if need_dy0 else (0,))
    dx = gy.new_empty((gy.shape[0], A.shape[1]) if need_dx else (0,))
    return dy0, dx, *fake_adapter_grads(R, magnitude, need_dR, need_dm)


def _epilogue_setup_context(ctx, inputs, output):
    (y0, x, bias, A, B, R, magnitude, c0, C, G, scaling, save, capacity, detach_norm,
     backend) = inputs
    ctx.save_for_backward(bias, A, B, R, magnitude, c0, C, G, *output)
    ctx.scaling, ctx.detach_norm, ctx.backend = scaling, detach_norm, backend
    ctx.set_materialize_grads(False)


def _epilogue_backward(ctx, gy, *_unused):
    if gy is None:  # grads are not materialised: y did not reach the loss
        return (None,) * 15
    saved = saved_tensors(ctx, "edora_epilogue")
    need_dy0, need_dx, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
    dy0, dx, dR, dm = _epilogue_bwd(gy, *saved, ctx.scaling, ctx.detach_norm, need_dy0,
                                    need_dx, need_dR, need_dm, ctx.backend)
    g = saved[12]
    return (dy0 if need_dy0 else None, dx if need_dx else None,
            _epilogue_dbias(gy, g) if need_dbias else None, None, None,
            dR if need_dR else None, dm if need_dm else None, *([None] * 8))


_epilogue_fwd.register_autograd(_epilogue_backward, setup_context=_epilogue_setup_context)


def edora_epilogue(
    y0: Tensor,
    x: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    R: Tensor,
    magnitude: Tensor,
    scaling: float,
    *,
    base_norm_sq: Tensor | None = None,
    base_times_A: Tensor | None = None,
    norm_terms: NormTerms | None = None,
    detach_norm: bool = True,
    backend: str = "auto",
) -> Tensor:
    """EDoRA on top of any base layer: ``y = g ⊙ (y0 − b + s·x Aᵀ Rᵀ Bᵀ) + b``.

    For base layers that are not a dense weight (quantised, custom): ``y0 = base(x)`` (bias
    included) is computed by the caller and its gradient ``gy ⊙ g`` flows back through the base
    layer's own autograd. The norm needs two frozen terms of the (dequantised) base weight W0,
    computed once with :func:`edora_kernels.base_norm_terms`: ``base_norm_sq = rowsum(W0 ⊙ W0)``
    (out) and ``base_times_A = W0 Aᵀ`` (out×r) — or all three float64 terms as ``norm_terms``
    (``NormTerms(c0, C, G)``, e.g. a layer's cache; G = A Aᵀ is then not formed per call).
    Other arguments as in :func:`edora_linear`.
    """
    for name, t in (("y0", y0), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    cast = _autocast_dtype(x)
    if cast is not None:  # as for edora_linear: the activations at the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            return edora_epilogue(
                _cast(y0, cast), x.to(cast), _cast(bias, cast), A, B, R, magnitude, scaling,
                base_norm_sq=base_norm_sq, base_times_A=base_times_A, norm_terms=norm_terms,
                detach_norm=detach_norm, backend=backend)
    out_features, in_features = B.shape[0], x.shape[-1]
    if tuple(y0.shape[:-1]) != tuple(x.shape[:-1]) or y0.shape[-1] != out_features:
        raise ValueError(f"y0 must have shape {(*x.shape[:-1], out_features)} (x's leading dims, "
                         f"out_features = B.shape[0]), got {tuple(y0.shape)}")
    if y0.dtype != x.dtype or y0.device != x.device:
        raise TypeError(f"y0 ({y0.dtype}, {y0.device}) must match x ({x.dtype}, {x.device})")
    check_adapter_args("y0", y0, bias, A, B, R, magnitude, scaling, in_features, out_features)
    if norm_terms is not None:
        if base_norm_sq is not None or base_times_A is not None:
            raise ValueError("pass norm_terms or base_norm_sq and base_times_A, not both")
        check_norm_terms(norm_terms, B, A)
    else:
        for name, t, shape in (("base_norm_sq", base_norm_sq, (out_features,)),
                               ("base_times_A", base_times_A, (out_features, A.shape[0]))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape {shape}, got {got}")
    check_dropout_backend(0.0, backend)
    check_frozen(torch.is_grad_enabled(), A=A, B=B)
    backend = backends.resolve(backend, x.device)
    if norm_terms is None:
        a = A.detach().to(TERMS_DTYPE)
        norm_terms = NormTerms(base_norm_sq.detach().to(TERMS_DTYPE),
                               base_times_A.detach().to(TERMS_DTYPE), a @ a.T)
    y = _epilogue_step(y0.reshape(-1, out_features), x.reshape(-1, in_features), bias, A, B, R,
                       magnitude, norm_terms, float(scaling), detach_norm, backend)
    return y.reshape(y0.shape)


def _epilogue_step(y0, x, bias, A, B, R, magnitude, terms, scaling, detach_norm, backend):
    """y for 2-D y0 and x (``_step`` of the epilogue op)."""
    return _step(_epilogue_fwd, _EpilogueStep, "epilogue_forward",
                 (y0, x, bias, A, B, R, magnitude), (y0, x, R, magnitude, bias), terms, scaling,
                 detach_norm, backend)
