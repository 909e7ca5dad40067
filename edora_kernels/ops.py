"""The public ``edora_linear`` op: validation, backend dispatch and the torch.library registration.

Two custom ops carry the work so that ``torch.compile(fullgraph=True)`` traces through without
graph breaks: ``edora::linear_fwd`` returns y plus what backward keeps (v = x Aᵀ, z = x W0ᵀ +
s·v Pᵀ, and the per-step norm n), ``edora::linear_bwd`` turns gy into dx, dR and dm. Both hand the
N-sized work to a backend (see ``edora_kernels.backends``) and do the O(out·r²) rest here.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .checks import check_frozen, check_linear_args
from .norm import compute_dtype, exact_norm_grad_P, norm_terms, row_norm


def _step_terms(weight, A, B, R, magnitude, scaling):
    """Per-step small tensors in the compute dtype: terms, P = B R, n and g = m / n."""
    cdt = compute_dtype(weight.dtype)
    terms = norm_terms(weight, A)
    P = B.to(cdt) @ R.to(cdt)
    n = row_norm(terms, P, scaling)
    return terms, P, n, magnitude.to(cdt) / n


@torch.library.custom_op("edora::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    R: Tensor,
    magnitude: Tensor,
    scaling: float,
    save: bool,
    detach_norm: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, P, n, g = _step_terms(weight, A, B, R, magnitude, scaling)
    y, v, z = backends.load(backend).forward(x, weight, bias, A, P, g, scaling, save)
    return y, v, z, n


@_linear_fwd.register_fake
def _(x, weight, bias, A, B, R, magnitude, scaling, save, detach_norm, backend):
    n_rows, (out_features, rank) = x.shape[0], B.shape
    saved = lambda *shape: x.new_empty(shape if save else (0,))  # noqa: E731
    n = x.new_empty(out_features, dtype=compute_dtype(x.dtype))
    return x.new_empty(n_rows, out_features), saved(n_rows, rank), saved(n_rows, out_features), n


@torch.library.custom_op("edora::linear_bwd", mutates_args=())
def _linear_bwd(
    gy: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    R: Tensor,
    magnitude: Tensor,
    v: Tensor,
    z: Tensor,
    n: Tensor,
    scaling: float,
    detach_norm: bool,
    need_dx: bool,
    need_dR: bool,
    need_dm: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    cdt = n.dtype
    R_c, A_c = R.to(cdt), A.to(cdt)
    g = magnitude.to(cdt) / n
    exact = need_dR and not detach_norm
    dx, t, colsum = backends.load(backend).backward(
        gy, weight, B, R_c @ A_c, g, z, scaling, need_dx, need_dR, need_dm or exact
    )
    dR = R.new_empty(0)
    if need_dR:
        dR_c = scaling * (t.to(cdt).T @ v.to(cdt))
        if exact:
            terms = norm_terms(weight, A)
            P = B.to(cdt) @ R_c
            grad_n = -magnitude.to(cdt) * colsum / (n * n)
            dR_c = dR_c + B.to(cdt).T @ exact_norm_grad_P(terms, P, n, grad_n, scaling)
        dR = dR_c.to(R.dtype)
    dm = (colsum / n).to(magnitude.dtype) if need_dm else magnitude.new_empty(0)
    return dx, dR, dm


@_linear_bwd.register_fake
def _(gy, weight, A, B, R, magnitude, v, z, n, scaling, detach_norm, need_dx, need_dR, need_dm,
      backend):
    dx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_dx else (0,))
    dR = R.new_empty(R.shape if need_dR else (0,))
    dm = magnitude.new_empty(magnitude.shape if need_dm else (0,))
    return dx, dR, dm


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, R, magnitude, scaling, save, detach_norm, backend = inputs
    _, v, z, n = output
    ctx.save_for_backward(weight, A, B, R, magnitude, v, z, n)
    ctx.scaling, ctx.detach_norm, ctx.backend = scaling, detach_norm, backend


def _backward(ctx, gy, _gv, _gz, _gn):
    weight, A, B, R, magnitude, v, z, n = ctx.saved_tensors
    need_dx, _, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
    dx, dR, dm = _linear_bwd(
        gy, weight, A, B, R, magnitude, v, z, n, ctx.scaling, ctx.detach_norm,
        need_dx, need_dR, need_dm, ctx.backend,
    )
    dbias = gy.sum(0) if need_dbias else None
    return (
        dx if need_dx else None, None, dbias, None, None,
        dR if need_dR else None, dm if need_dm else None, None, None, None, None,
    )


_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    detach_norm: bool = True,
    backend: str = "auto",
) -> Tensor:
    """EDoRA linear: ``y = m/‖W0 + s·BRA‖_row ⊙ (x W0ᵀ + s·x Aᵀ Rᵀ Bᵀ) + b``.

    Args:
        x: input ``(*, in_features)``.
        weight, bias: the frozen base layer, ``(out, in)`` and ``(out,)`` or None; same dtype as x.
        A, B: frozen factors ``(r, in)`` and ``(out, r)``.
        R, magnitude: trainable ``(r, r)`` core and ``(out,)`` magnitude.
        scaling: ``alpha / r``.
        dropout: PEFT's dropout on the adapter input, always applied when > 0 (pass 0 in eval).
        detach_norm: treat the row norm as a constant in backward (DoRA §4.3), as PEFT does.
        backend: "auto", "torch", "triton" or "cuda"; ``EDORA_BACKEND`` overrides "auto".

    Weight, A and B get no gradient. Adapter tensors may be in another floating dtype than x
    (e.g. fp32 R and magnitude on a bf16 model): n, g and the epilogue run in fp32 (fp64 for
    fp64 input) and the output has x's dtype.
    """
    check_linear_args(x, weight, bias, A, B, R, magnitude, scaling, dropout, backend)
    grad_enabled = torch.is_grad_enabled()
    check_frozen(grad_enabled, weight=weight, A=A, B=B)
    backend = backends.resolve(backend, x.device)
    scaling = float(scaling)
    out_features = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if dropout > 0.0:
        # PEFT's semantics, y = x W0ᵀ + b + (g − 1)⊙(x̃ W0ᵀ) + g⊙s·x̃ Aᵀ Pᵀ, is the dense
        # base output plus the op on x̃ minus x̃'s base product.
        x_drop = F.dropout(x2, p=dropout, training=True)
        adapted = edora_linear(x_drop, weight, None, A, B, R, magnitude, scaling,
                               detach_norm=detach_norm, backend=backend)
        y = F.linear(x2, weight, bias) - F.linear(x_drop, weight) + adapted
        return y.reshape(*x.shape[:-1], out_features)
    trainable = [x, R, magnitude] + ([bias] if bias is not None else [])
    save = grad_enabled and any(t.requires_grad for t in trainable)
    y = _linear_fwd(x2, weight, bias, A, B, R, magnitude, scaling, save, detach_norm, backend)[0]
    return y.reshape(*x.shape[:-1], out_features)
