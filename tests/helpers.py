"""Helpers shared by the tests: the tolerance check, gradients of a fixed gy, GPU skips.

Problems come from the project's one builder, ``edora_kernels.testing.make_case``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edora_kernels import base_norm_terms, edora_epilogue, edora_linear
from edora_kernels.reference import edora_linear_reference
from edora_kernels.tolerances import TOLERANCE, normalised_error

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``, by the one table
    (edora_kernels.tolerances)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = normalised_error(actual, expected)  # NaN when finiteness differs
    assert err <= TOLERANCE[dtype], (
        f"{what}: normalised error {err:.3g} > {TOLERANCE[dtype]:.3g} ({dtype})")


def as_float64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


TRAINABLE = ("x", "R", "magnitude")
OUTPUTS = ("y", "dx", "dR", "dm")


def run_with_grads(fn, args, gy_seed=1, trainable=TRAINABLE, gy_dtype=None, **kwargs):
    """``fn(**args)`` with the ``trainable`` inputs requiring grad; y and their grads for a gy
    drawn from ``gy_seed`` and rounded to ``gy_dtype`` (default: y's), so that a float64 oracle
    sees exactly the gy of the run it checks."""
    args = {k: (v.detach().clone().requires_grad_(k in trainable) if isinstance(v, torch.Tensor)
                else v) for k, v in args.items()}
    y = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(gy_dtype or y.dtype)
    gy = gy.to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [args[k] for k in trainable], gy, allow_unused=True)
    return y.detach(), dict(zip(trainable, grads))


def reference_with_grads(args, **kwargs):
    """The float64 reference on float64 copies of ``args``, fed the gy the run in args' dtype
    got."""
    return run_with_grads(edora_linear_reference, as_float64(args), gy_dtype=args["x"].dtype,
                          **kwargs)


# --- a backend through the op, as (y, dx, dR, dm), against the float64 reference ---------------

def op_outputs(case, backend=None, x=None, grad_x=True, detach_norm=True):
    """(y, dx, dR, dm) of ``edora_linear`` on a Case (x replaced when given; dx is None when x
    needs no gradient); ``backend=None`` runs the float64 reference on float64 copies."""
    args = case.op_args() if x is None else {**case.op_args(), "x": x}
    trainable = TRAINABLE if grad_x else TRAINABLE[1:]
    if backend is None:
        y, grads = reference_with_grads(args, detach_norm=detach_norm)
    else:
        y, grads = run_with_grads(edora_linear, args, trainable=trainable,
                                  detach_norm=detach_norm, backend=backend)
    return (y, grads.get("x"), grads["R"], grads["magnitude"])


def check_outputs(actual, expected, dtype, label, baseline=None):
    """Each of (y, dx, dR, dm) against the float64 reference by the tolerance table.

    dR and dm are sums over tokens of products stored in ``dtype``; when the sum cancels, the
    torch backend at the same dtype misses the table as well. There, and only there, the rule of
    docs/DESIGN.md §8 applies: no more than twice the torch backend's error.
    """
    for i, (name, a, e) in enumerate(zip(OUTPUTS, actual, expected)):
        if a is None:
            continue
        torch_error = normalised_error(baseline[i], e) if baseline is not None else 0.0
        if torch_error <= TOLERANCE[dtype]:
            assert_close(a, e, dtype, f"{label} {name}")
        else:
            err = normalised_error(a, e)
            assert name in ("dR", "dm") and err <= 2 * torch_error, (
                f"{label} {name}: error {err:.3g}, torch backend {torch_error:.3g} ({dtype})")


def check_backend(case, backend, dtype, label, **kwargs):
    """``backend`` through the op against the reference, the torch backend as the baseline;
    returns (actual, expected)."""
    actual = op_outputs(case, backend, **kwargs)
    baseline = op_outputs(case, "torch", **kwargs)
    expected = op_outputs(case, None, **kwargs)
    check_outputs(actual, expected, dtype, label, baseline)
    return actual, expected


def epilogue_on_dense_base(x, weight, bias, A, B, R, magnitude, scaling, backend="torch",
                           **kwargs):
    """The epilogue fed by a plain F.linear base: must equal edora_linear exactly in math."""
    c0, C = base_norm_terms(weight, A)
    return edora_epilogue(F.linear(x, weight, bias), x, bias, A, B, R, magnitude, scaling,
                          base_norm_sq=c0, base_times_A=C, backend=backend, **kwargs)


def tiny_bert_classifier(seed: int = 0):
    """A 2-layer BERT with a 3-way classification head (transformers), the same for a seed, in
    eval mode and without dropout."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=40, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def jitter_adapters(layer, scale: float) -> None:
    """Move every adapter of an EDoRA layer off its initial state (R and m by ``scale``)."""
    with torch.no_grad():
        for name in layer.adapter_names:
            for p in layer.adapter_weights(name):
                p.add_(scale * torch.randn_like(p))


def add_second_basis(layer, name: str, rank: int, alpha: float, seed: int) -> None:
    """A second basis on an EDoRA layer (W0's factors at ``rank``, scaling ``alpha / rank``)
    with the adapter ``name`` on it."""
    from edora_kernels.svd import edora_factors

    A, B = edora_factors(layer.base_weight().double(), rank, init="svd", seed=seed)
    layer.add_basis("second", A, B, alpha)
    layer.add_adapter(name, seed=seed, basis="second")


def reference_row(layer, name: str, x):
    """The float64 reference of ``x`` through ``layer`` with adapter ``name`` on its basis."""
    R, m = layer.adapter_weights(name)
    basis = layer.basis_of(name)
    return edora_linear_reference(x.double(), layer.base_weight().double(),
                                  layer.bias.double(), basis.A.double(), basis.B.double(),
                                  R.detach().double(), m.detach().double(), basis.scaling)


def mixed_training_results(layer, rows, x, gy) -> list[torch.Tensor]:
    """y, dx and every adapter's dR and dm of one mixed training step of ``layer`` (``rows``:
    each leading row's adapter index) on ``x`` with output gradient ``gy``."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    layer.row_adapters = rows
    y = layer(x)
    layer.row_adapters = None
    y.backward(gy.to(y.dtype))
    return [y, x.grad, *(p.grad for name in layer.adapter_names
                         for p in layer.adapter_weights(name))]


def check_served_mixed_batch(layer, rows: torch.Tensor, x: torch.Tensor, dtype: torch.dtype):
    """A batch mixing the layer's adapters (``rows``: each leading row's adapter index, the
    base model's being ``len(layer.adapter_names)``), served without grad on the layer's backend:
    against the composed torch path, and row by row against the float64 reference (base rows:
    the base layer). The layer is left on the torch backend."""
    layer.row_adapters = rows
    with torch.no_grad():
        served = layer(x)
        layer.backend = "torch"
        composed = layer(x)
    layer.row_adapters = None
    assert_close(served, composed.double(), dtype, "served vs composed")
    w0, b = layer.base_weight().double(), layer.bias.double()
    for i, index in enumerate(rows.tolist()):
        if index == len(layer.adapter_names):
            want = F.linear(x[i].double(), w0, b)
        else:
            want = reference_row(layer, layer.adapter_names[index], x[i])
        assert_close(served[i], want, dtype, f"row {i}")
