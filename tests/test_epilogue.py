"""``edora_epilogue`` (any base layer) against the dense reference."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, epilogue_on_dense_base, reference_with_grads, run_with_grads

from edora_kernels import base_norm_terms, edora_epilogue
from edora_kernels.testing import make_case


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("n_rows, rank", [(0, 3), (1, 1), (37, 16), (64, 64)])
def test_matches_reference(n_rows, rank, detach_norm, dtype):
    args = make_case(n_rows, 77, 93, rank, dtype=dtype, seed=rank).op_args()
    y, grads = run_with_grads(epilogue_on_dense_base, args, detach_norm=detach_norm)
    y_ref, grads_ref = reference_with_grads(args, detach_norm=detach_norm)
    assert_close(y, y_ref, dtype, "y")
    for name in grads:
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


def test_gradcheck_including_bias():
    args = make_case(5, 11, 9, 3, dtype=torch.float64).op_args()
    x, R, m, b = (args.pop(k).requires_grad_() for k in ("x", "R", "magnitude", "bias"))
    fn = lambda x, R, m, b: epilogue_on_dense_base(x, bias=b, R=R, magnitude=m, **args,  # noqa
                                                    detach_norm=False)
    assert torch.autograd.gradcheck(fn, (x, R, m, b))


def test_three_dim_input_and_no_grad():
    args = make_case(1, 20, 14, 4).op_args()
    x = torch.randn(2, 3, 20)
    y = epilogue_on_dense_base(**{**args, "x": x})
    assert y.shape == (2, 3, 14)
    with torch.no_grad():
        assert torch.equal(epilogue_on_dense_base(**{**args, "x": x}), y.detach())


def test_opcheck():
    args = make_case(6, 12, 10, 3, dtype=torch.float64).op_args()
    c0, C = base_norm_terms(args["weight"], args["A"])
    G = args["A"] @ args["A"].T
    x = args["x"].requires_grad_()
    y0 = F.linear(x, args["weight"], args["bias"]).detach().requires_grad_()
    torch.library.opcheck(torch.ops.edora.epilogue_fwd.default, (
        y0, x, args["bias"], args["A"], args["B"], args["R"].requires_grad_(),
        args["magnitude"].requires_grad_(), c0, C, G, args["scaling"], True, 1, False, "torch"))


@pytest.mark.parametrize("changes, words", [
    ({"y0": torch.randn(4, 9)}, ["y0 must have shape (4, 10)"]),
    ({"base_norm_sq": torch.randn(9)}, ["base_norm_sq must have shape (10,)"]),
    ({"base_times_A": torch.randn(10, 2)}, ["base_times_A must have shape (10, 3)"]),
    ({"y0": torch.randn(4, 10, dtype=torch.float64)}, ["y0 (torch.float64, cpu) must match x"]),
])
def test_bad_input(changes, words):
    args = make_case(4, 12, 10, 3).op_args()
    c0, C = base_norm_terms(args["weight"], args["A"])
    call = {"y0": F.linear(args["x"], args["weight"], args["bias"]), "base_norm_sq": c0,
            "base_times_A": C, **{k: v for k, v in args.items() if k != "weight"}}
    call.update(changes)
    with pytest.raises((ValueError, TypeError)) as info:
        edora_epilogue(**call)
    for word in words:
        assert word in str(info.value)
