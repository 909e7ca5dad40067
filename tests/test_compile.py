"""torch.library registration: opcheck, and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch
from helpers import run_with_grads

import edora_kernels  # noqa: F401  (registers the ops)
from edora_kernels import EDoRALinear, edora_linear
from edora_kernels.norm import compute_norm_terms
from edora_kernels.testing import make_case


def _fwd_args(save):
    args = make_case(9, 20, 14, 4, dtype=torch.float64).op_args()
    for k in ("x", "R", "magnitude"):
        args[k].requires_grad_(save)
    terms = compute_norm_terms(args["weight"], args["A"])
    return (args["x"], args["weight"], args["bias"], args["A"], args["B"], args["R"],
            args["magnitude"], *terms, args["scaling"], save)


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("save", [True, False])
def test_opcheck_forward(save, detach_norm):
    torch.library.opcheck(torch.ops.edora.linear_fwd.default,
                          (*_fwd_args(save), 2 if save else 0, detach_norm, "torch"))


@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_opcheck_backward(zero_magnitude):
    x, weight, bias, A, B, R, m, c0, C, G, s, _ = _fwd_args(False)
    if zero_magnitude:  # forward keeps those columns of z
        m = m.detach().clone().index_fill_(0, torch.tensor([1, 5]), 0.0)
    y, *saved = torch.ops.edora.linear_fwd(x, weight, bias, A, B, R, m, c0, C, G, s, True, 2,
                                           False, "torch")
    slots, zbuf = saved[-2:]
    assert zbuf.shape == (9, 2) and slots.tolist().count(-1) == (12 if zero_magnitude else 14)
    gy = torch.randn(9, 14, dtype=torch.float64)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.edora.linear_bwd.default,
                              (gy, weight, bias, A, B, R, m, C, G, y, *saved, s, False, *flags,
                               "torch"))


def assert_compiled_matches_eager(fn, args):
    """y and the gradients of ``fn`` under torch.compile(fullgraph=True) equal eager's."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, grads = run_with_grads(fn, args)
    y_c, grads_c = run_with_grads(compiled, args)
    torch.testing.assert_close(y_c, y)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name])


@pytest.mark.parametrize("detach_norm", [True, False])
def test_compile_fullgraph_matches_eager(detach_norm):
    args = make_case(12, 24, 18, 4).op_args()

    def fn(**a):
        return edora_linear(**a, detach_norm=detach_norm)

    assert_compiled_matches_eager(fn, args)


def test_compile_layer_with_inductor():
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(torch.nn.Linear(24, 18), 4, seed=0)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = layer(x)
    y_c = compiled(x)
    torch.testing.assert_close(y_c, y)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_c,) = torch.autograd.grad(y_c.sum(), x)
    torch.testing.assert_close(gx_c, gx)


def test_compile_with_a_changing_python_float_scaling():
    """Dynamo turns a Python float that changes between calls into a symbolic float: the
    argument checks must accept it, and each call must use its own value."""
    args = make_case(6, 16, 12, 4).op_args()
    args.pop("scaling")
    compiled = torch.compile(edora_linear, fullgraph=True, backend="aot_eager")
    for scaling in (0.5, 2.0, 3.0):
        torch.testing.assert_close(compiled(**args, scaling=scaling),
                                   edora_linear(**args, scaling=scaling))


def test_compile_with_zero_magnitude_columns():
    """The kept z columns (a fixed number of slots under compile, as many as zeros in eager on
    CPU): compiled and eager agree, gradients included."""
    args = make_case(10, 20, 16, 4).op_args()
    with torch.no_grad():
        args["magnitude"][[0, 7]] = 0.0

    def fn(**a):
        return edora_linear(**a)

    assert_compiled_matches_eager(fn, args)
