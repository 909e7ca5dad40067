"""What the op pairs (``ops``, ``dropout``) share: the gate, the kept z columns where m = 0, the
adapter gradients from the column sums, the fakes of those outputs, the in-place check.

Everything here is O(out·r²) or smaller, except the N×k z columns (k = number of zero
magnitudes, almost always 0).
"""
import torch

from .norm import TERMS_DTYPE, NormTerms, exact_norm_grad_P, row_norm


def gate(terms: NormTerms, B, R, magnitude, scaling, cdt):
    """P = B R and n in float64 (docs/DESIGN.md §2), g = m / n rounded to the compute dtype."""
    P = B.to(TERMS_DTYPE) @ R.to(TERMS_DTYPE)
    n = row_norm(terms, P, scaling)
    return P, n, (magnitude.to(TERMS_DTYPE) / n).to(cdt)


def epilogue_terms(c0, C, A):
    a = A.to(TERMS_DTYPE)
    return NormTerms(c0, C, a @ a.T)


def zero_columns(magnitude, save, n_rows, z_columns):
    """Where m = 0, g = 0 and y = b holds no trace of z, which dm needs: forward keeps those
    columns of z (``z_columns(idx)``, N×k; k is 0 unless a magnitude entry is exactly 0).

    Finding them reads m on the host: one device sync per training forward.
    """
    idx = magnitude.new_empty(0, dtype=torch.long)
    if not save:
        return idx, magnitude.new_empty(0, 0)
    idx = (magnitude == 0).nonzero().flatten()
    if idx.numel() == 0:
        return idx, magnitude.new_empty(n_rows, 0)
    return idx, z_columns(idx)


def fake_zero_columns(rows_like, save):
    idx = rows_like.new_empty(0, dtype=torch.long)
    if not save:
        return idx, rows_like.new_empty(0, 0)
    k = torch.library.get_ctx().new_dynamic_size()
    return rows_like.new_empty(k, dtype=torch.long), rows_like.new_empty(rows_like.shape[0], k)


def sum_gy_z(gy, colsum, zero_idx, zcols, magnitude, n):
    """``S = Σ_rows gy ⊙ z`` per column in float64, from ``colsum = Σ_rows gy ⊙ (y − b)``
    (= g ⊙ S, so S = colsum·n/m); where m = 0, from the z columns forward kept."""
    f64 = TERMS_DTYPE
    m = magnitude.to(f64)
    S = colsum.to(f64) * n / torch.where(m == 0, 1.0, m)
    if zero_idx.numel():
        zsum = (gy[:, zero_idx].to(f64) * zcols.to(f64)).sum(0)
        S = S.index_copy(0, zero_idx, zsum)
    return S


def adapter_grads(t, v, S, terms, B, R, magnitude, n, scaling, detach_norm, need_dR, need_dm):
    """dR = s·tᵀ v (+ the norm's share when not detached) and dm = S/n, with
    ``S = Σ_rows gy ⊙ z`` (None when neither needs it); the O(out·r²) parts in float64."""
    f64 = TERMS_DTYPE
    dR = R.new_empty(0)
    if need_dR:
        dR_c = scaling * (t.to(f64).T @ v.to(f64))
        if not detach_norm:
            P = B.to(f64) @ R.to(f64)
            grad_n = -magnitude.to(f64) * S / (n * n)
            dR_c = dR_c + B.to(f64).T @ exact_norm_grad_P(terms, P, n, grad_n, scaling)
        dR = dR_c.to(R.dtype)
    dm = (S / n).to(magnitude.dtype) if need_dm else magnitude.new_empty(0)
    return dR, dm


def fake_adapter_grads(R, magnitude, need_dR, need_dm):
    return (R.new_empty(R.shape if need_dR else (0,)),
            magnitude.new_empty(magnitude.shape if need_dm else (0,)))


def saved_tensors(ctx, op: str):
    """``ctx.saved_tensors`` with autograd's in-place error made specific: backward reads y."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError(
            f"{op}: a tensor its backward needs was modified in place after the forward — "
            "usually its output y (an in-place activation such as ReLU(inplace=True), y += ..., "
            "y.mul_()); EDoRA's backward reads y for the magnitude gradient. Apply such ops out "
            "of place (F.relu(y), y = y + ...)") from err
