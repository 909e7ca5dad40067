"""EDoRA with dropout on the adapter's input, in two dense GEMMs each way (docs/DESIGN.md §3).

With the keep mask D (scaled by 1/(1 − p)) and x̃ = D ⊙ x, two semantics:

- ``"peft"`` (PEFT's DoRA and the paper's code):
  ``y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s·x̃ Aᵀ Pᵀ``. Forward: ``x W0ᵀ`` and ``x̃ W0ᵀ``;
  backward: ``dx = gy W0 + D ⊙ ((gy ⊙ (g − 1)) W0 + s·t (R A))`` with ``t = (gy ⊙ g) B``.
  Kept: ``ṽ = x̃ Aᵀ`` (N×r) and ``z̃ = x̃ W0ᵀ + s·ṽ Pᵀ`` (N×out, which dm needs).
- ``"lowrank"`` (dropout on the rank-r branch only, as plain LoRA): ``y = g ⊙ (x W0ᵀ + s·ṽ Pᵀ) +
  b``. One dense GEMM each way, like the op without dropout; a different regulariser (the base
  path sees the clean x). Kept: ṽ and y itself (dm from ``y − b`` as in the op).

The mask is never stored: forward draws a seed from torch's default CPU generator (so
``torch.manual_seed`` reproduces it) and backward regenerates D from it. The 1/(1 − p) scale is
folded into per-column and rank-r factors instead of an N×in pass.
"""
import torch
from torch import Tensor

from .backends import CPU_BACKEND, torch_backend
from .norm import TERMS_DTYPE, NormTerms, compute_dtype
from .op_common import (
    Saved,
    adapter_grads,
    fake_adapter_grads,
    fake_saved,
    gate,
    keep_slot_columns,
    magnitude_sums,
    saved_tensors,
    slot_capacity,
)

# The mask is drawn 15 bits per element, four elements per 64-bit random word (its four 16-bit
# lanes, low 15 bits each; the generator fills 63 bits): a quarter of the generator calls of
# torch.rand, the CPU's main cost here. p is rounded to a multiple of 2⁻¹⁵.
_MASK_BITS = 15


def dropout_levels(p: float) -> tuple[int, float]:
    """(threshold k, scale 1/(1 − k/2¹⁵)): an element is kept when its 15-bit draw is ≥ k, so the
    drop probability is k/2¹⁵ (within 2⁻¹⁶ of p) and the scale keeps E[x̃] = x exactly."""
    k = round(p * 2 ** _MASK_BITS)
    return k, 1.0 / (1.0 - k / 2 ** _MASK_BITS)


def keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """The boolean keep mask of ``shape`` for this seed (the same on every call)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(generator=gen)
    draws = words.view(torch.int16)[:numel].bitwise_and_(2 ** _MASK_BITS - 1)
    return (draws >= dropout_levels(p)[0]).view(shape)


def draw_seed() -> Tensor:
    """A mask seed from the default CPU generator, as a 1-element int64 CPU tensor."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


@torch.library.custom_op("edora::dropout_fwd", mutates_args=())
def _dropout_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor,
    magnitude: Tensor, c0: Tensor, C: Tensor, G: Tensor, scaling: float, p: float,
    lowrank: bool, save: bool, capacity: int, detach_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dtype, cdt = x.dtype, compute_dtype(x.dtype)
    P, n, g, slots = gate(NormTerms(c0, C, G), B, R, magnitude, scaling, cdt, capacity)
    seed = draw_seed()
    q = dropout_levels(p)[1]
    x_keep = x * keep_mask(int(seed), x.shape, p, x.device)  # x̃ = q·x_keep
    v = torch_backend.mm_compute(x_keep, A.T, cdt).mul_(q)
    Pd = P.to(dtype)
    if lowrank:
        z = torch.addmm(x @ weight.T, v.to(dtype), Pd.T, alpha=scaling)
        zbuf = keep_slot_columns(z, slots, capacity)
        y = (z.to(cdt) * g + (0.0 if bias is None else bias.to(cdt))).to(dtype)
        z_drop = x.new_empty(0)
    else:
        # With z_lin = x_keep W0ᵀ + (s/q)·ṽ Pᵀ: z̃ = x̃ W0ᵀ + s·ṽ Pᵀ = q·z_lin (what dm needs) and
        # y = x W0ᵀ + b + s·ṽ Pᵀ + ((g − 1)·q) ⊙ z_lin, so every additive term rides in a GEMM's
        # accumulator and one elementwise pass is left.
        low = v.to(dtype) @ (Pd.T * (scaling / q))
        z_lin = torch.addmm(low, x_keep, weight.T)                   # dense GEMM 2
        if bias is not None:
            low.add_(bias, alpha=1.0 / q)
        y = torch.addmm(low, x, weight.T, beta=q)                    # dense GEMM 1
        y.addcmul_(z_lin, (g - 1) * q)
        z_drop = z_lin if save else x.new_empty(0)
        zbuf = x.new_empty(x.shape[0], 0)
    return y, z_drop, seed, *Saved(v if save else v.new_empty(0), P, n, g, slots, zbuf)


@_dropout_fwd.register_fake
def _(x, weight, bias, A, B, R, magnitude, c0, C, G, scaling, p, lowrank, save, capacity,
      detach_norm):
    n_rows, out_features = x.shape[0], weight.shape[0]
    z_drop = x.new_empty((n_rows, out_features) if save and not lowrank else (0,))
    seed = torch.empty(1, dtype=torch.int64)
    return (x.new_empty(n_rows, out_features), z_drop, seed,
            *fake_saved(x, A.shape[0], out_features, save, capacity))


@torch.library.custom_op("edora::dropout_bwd", mutates_args=())
def _dropout_bwd(
    gy: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, R: Tensor,
    magnitude: Tensor, C: Tensor, G: Tensor, y: Tensor, z_drop: Tensor, seed: Tensor,
    v: Tensor, P: Tensor, n: Tensor, g: Tensor, slots: Tensor, zbuf: Tensor, scaling: float,
    p: float, lowrank: bool, detach_norm: bool, need_dx: bool, need_dR: bool, need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype, cdt = gy.dtype, compute_dtype(gy.dtype)
    saved = Saved(v, P, n, g, slots, zbuf)
    q = dropout_levels(p)[1]
    t = torch_backend.mm_compute(gy, B.to(cdt) * g[:, None], cdt)  # (gy ⊙ g) B, no N×out pass
    dx = gy.new_empty(0)
    if need_dx:
        keep = keep_mask(int(seed), (gy.shape[0], weight.shape[1]), p, gy.device)
        low = (t @ (scaling * q * (R.to(cdt) @ A.to(cdt)))).to(dtype)  # s·t (R A), x̃'s share
        if lowrank:
            dx = torch.addmm(low.mul_(keep), _scale_columns(gy, g), weight)
        else:                                                        # the two dense GEMMs
            dropped = torch.addmm(low, _scale_columns(gy, (g - 1) * q), weight)
            dx = torch.addmm(dropped.mul_(keep), gy, weight)
    S = None
    if need_dm or (need_dR and not detach_norm):
        if lowrank:
            S = magnitude_sums(torch_backend.grad_colsum(gy, y, bias, cdt), gy, saved,
                               magnitude)
        else:
            S = q * torch.linalg.vecdot(gy.to(cdt), z_drop.to(cdt), dim=0).to(TERMS_DTYPE)
    return dx, *adapter_grads(t, v, S, NormTerms(None, C, G), B, R, P, magnitude, n, scaling,
                              detach_norm, need_dR, need_dm)


def _scale_columns(gy, col_scale):
    return gy * col_scale.to(gy.dtype)


@_dropout_bwd.register_fake
def _(gy, weight, bias, A, B, R, magnitude, C, G, y, z_drop, seed, v, P, n, g, slots, zbuf,
      scaling, p, lowrank, detach_norm, need_dx, need_dR, need_dm):
    dx = gy.new_empty((gy.shape[0], weight.shape[1]) if need_dx else (0,))
    return dx, *fake_adapter_grads(R, magnitude, need_dR, need_dm)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, R, magnitude, c0, C, G, scaling, p, lowrank, save, capacity,
     detach_norm) = inputs
    y, z_drop, seed, *saved = output
    if detach_norm:  # C and G serve only the exact norm gradient
        C, G = C.new_empty(0), G.new_empty(0)
    kept_y = y if lowrank else y.new_empty(0)  # the peft mode's dm reads z̃, not y
    ctx.save_for_backward(weight, bias, A, B, R, magnitude, C, G, kept_y, z_drop, seed, *saved)
    ctx.scaling, ctx.p, ctx.lowrank, ctx.detach_norm = scaling, p, lowrank, detach_norm
    ctx.set_materialize_grads(False)


def _backward(ctx, gy, *_unused):
    if gy is None:
        return (None,) * 16
    saved = saved_tensors(ctx, "edora_linear (dropout)")
    need_dx, _, need_dbias, _, _, need_dR, need_dm = ctx.needs_input_grad[:7]
    dx, dR, dm = _dropout_bwd(gy, *saved, ctx.scaling, ctx.p, ctx.lowrank, ctx.detach_norm,
                              need_dx, need_dR, need_dm)
    return (dx if need_dx else None, None, gy.sum(0) if need_dbias else None, None, None,
            dR if need_dR else None, dm if need_dm else None, *([None] * 9))


_dropout_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_with_dropout(x, weight, bias, A, B, R, magnitude, terms, scaling, p, mode,
                        detach_norm):
    """The op's dropout path on 2-D x (arguments checked by ``edora_linear``)."""
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, R, magnitude, bias))
    lowrank = mode == "lowrank"
    # Only the lowrank mode reads y for dm; the peft mode keeps z̃ whole.
    capacity = slot_capacity(magnitude, save and lowrank, CPU_BACKEND)  # the path is torch's
    return _dropout_fwd(x, weight, bias, A, B, R, magnitude, *terms, scaling, p, lowrank, save,
                        capacity, detach_norm)[0]
