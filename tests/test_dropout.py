"""Dropout in two dense GEMMs each way: both semantics against a dense reference fed the very same
mask, the mask regenerated (never stored), reproducible from torch.manual_seed."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, run_with_grads

from edora_kernels import edora_linear
from edora_kernels.dropout import draw_seed, dropout_levels, keep_mask
from edora_kernels.testing import make_case

P_DROP = 0.3
SEED = 11


def reference_with_mask(x, weight, bias, A, B, R, magnitude, scaling, *, mode, detach_norm=True):
    """Both semantics, dense and in the inputs' dtype, with the mask the op will draw after
    ``torch.manual_seed(SEED)``."""
    mask = keep_mask(int(_seed()), x.shape, P_DROP, x.device)
    x_drop = x * mask * dropout_levels(P_DROP)[1]
    norm = (weight + scaling * B.to(x.dtype) @ R.to(x.dtype) @ A.to(x.dtype)).norm(dim=1)
    g = magnitude.to(x.dtype) / (norm.detach() if detach_norm else norm)
    low = scaling * F.linear(F.linear(F.linear(x_drop, A.to(x.dtype)), R.to(x.dtype)),
                             B.to(x.dtype))
    b = 0 if bias is None else bias
    if mode == "peft":
        return F.linear(x, weight) + b + (g - 1) * F.linear(x_drop, weight) + g * low
    return g * (F.linear(x, weight) + low) + b


def _seed():
    torch.manual_seed(SEED)
    return draw_seed()


def op(mode, **kwargs):
    def run(**args):
        torch.manual_seed(SEED)
        return edora_linear(**args, dropout=P_DROP, dropout_mode=mode, backend="torch", **kwargs)
    return run


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("mode", ["peft", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_the_dense_formula_with_the_same_mask(dtype, mode, detach_norm):
    args = make_case(37, 45, 33, 5, dtype=dtype, seed=2).op_args()
    trainable = ("x", "R", "magnitude", "bias")
    y, grads = run_with_grads(op(mode, detach_norm=detach_norm), args, trainable=trainable)
    ref_args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    y_ref, grads_ref = run_with_grads(reference_with_mask, ref_args, trainable=trainable,
                                      mode=mode, detach_norm=detach_norm)
    assert_close(y, y_ref, dtype, "y")
    for name in trainable:
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


def test_the_two_modes_differ_and_the_mask_matters():
    args = make_case(16, 24, 20, 4, dtype=torch.float64).op_args()
    peft, lowrank = op("peft")(**args), op("lowrank")(**args)
    plain = edora_linear(**args)
    assert not torch.allclose(peft, lowrank) and not torch.allclose(peft, plain)


def test_mask_rate_and_scale():
    k, scale = dropout_levels(P_DROP)
    assert abs(k / 2**15 - P_DROP) <= 2**-16 and scale == 1 / (1 - k / 2**15)
    mask = keep_mask(123, (400, 501), P_DROP, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (400, 501)
    assert abs(1 - mask.float().mean().item() - P_DROP) < 0.005
    assert torch.equal(mask, keep_mask(123, (400, 501), P_DROP, "cpu"))
    # independent columns and rows: no stripes from the 4-per-word packing
    assert (1 - mask.float().mean(0)).std() < 0.05 and (1 - mask.float().mean(1)).std() < 0.05
    assert abs((mask == 0).float().mean().item() - P_DROP) < 0.01


def test_reproducible_from_manual_seed_and_fresh_each_call():
    args = make_case(8, 16, 12, 2).op_args()
    torch.manual_seed(0)
    first, second = (edora_linear(**args, dropout=0.5) for _ in range(2))
    torch.manual_seed(0)
    again = edora_linear(**args, dropout=0.5)
    assert torch.equal(first, again) and not torch.equal(first, second)


@pytest.mark.parametrize("mode", ["peft", "lowrank"])
def test_the_mask_is_not_stored(mode):
    """Backward keeps no N×in tensor (the mask or x̃): it regenerates the mask from a seed."""
    n_rows, in_f, out_f, rank = 64, 96, 40, 4
    args = make_case(n_rows, in_f, out_f, rank).op_args()
    args["R"].requires_grad_()
    args["x"].requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        edora_linear(**args, dropout=P_DROP, dropout_mode=mode)
    assert (n_rows, in_f) not in sizes
    # peft keeps z̃ (N×out, which dm needs); lowrank keeps only the output y besides ṽ
    assert sizes.count((n_rows, out_f)) == 1


def test_zero_magnitude_columns_with_lowrank_dropout():
    args = make_case(20, 24, 16, 3, dtype=torch.float64, seed=4).op_args()
    args["magnitude"][[1, 9]] = 0.0
    trainable = ("x", "R", "magnitude")
    _, grads = run_with_grads(op("lowrank"), args, trainable=trainable)
    _, grads_ref = run_with_grads(reference_with_mask, args, trainable=trainable, mode="lowrank")
    for name in trainable:
        assert_close(grads[name], grads_ref[name], torch.float64, f"d{name}")


def test_bad_mode_is_refused():
    args = make_case(2, 8, 8, 2).op_args()
    with pytest.raises(ValueError, match="dropout_mode must be one of"):
        edora_linear(**args, dropout=0.1, dropout_mode="all")
