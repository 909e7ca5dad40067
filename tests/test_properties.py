"""Property-based: ``edora_linear`` against the float64 dense reference over drawn problems —
in/out down to 1, r from 1 to min(in, out), leading dims, N = 0 and 1, strided x, scaling ≤ 0,
both norm modes, fp32 and fp64, the torch backend and (a few, small) the Triton interpreter."""
import pytest
import torch
from helpers import TRAINABLE, assert_close, reference_with_grads, run_with_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edora_kernels import edora_linear
from edora_kernels.testing import make_case


def profile(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_size=24):
    in_f = draw(st.integers(1, max_size))
    out_f = draw(st.integers(1, max_size))
    rank = draw(st.sampled_from(sorted({1, min(in_f, out_f), draw(st.integers(1, min(in_f,
                                                                                 out_f)))})))
    lead = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3)]))
    tokens = 1
    for size in lead:
        tokens *= size
    scaling = draw(st.sampled_from([0.0, -2.5, 0.5, 1.0, 3.0, 16.0 / rank]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    case = make_case(tokens, in_f, out_f, rank, dtype, seed=draw(st.integers(0, 2**16)),
                     bias=draw(st.booleans()))
    args = {**case.op_args(), "scaling": scaling}
    args["x"] = args["x"].reshape(*lead, in_f)  # lead = (): a 1-D x
    if lead and draw(st.booleans()):  # not contiguous: every other column of a wider tensor
        wide = torch.randn(*lead, 2 * in_f, generator=torch.Generator().manual_seed(in_f),
                           dtype=dtype)
        args["x"] = wide[..., ::2]
    return args, dtype, draw(st.booleans())


def check(args, dtype, detach_norm, backend):
    y, grads = run_with_grads(edora_linear, args, detach_norm=detach_norm, backend=backend)
    y_ref, grads_ref = reference_with_grads(args, detach_norm=detach_norm)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name in TRAINABLE:
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


@profile(120)
@given(problems())
def test_torch_backend_matches_reference(problem):
    check(*problem, backend="torch")


@profile(12)
@given(problems(max_size=20))
@pytest.mark.usefixtures("interpreter_bf16_dot")
def test_triton_backend_matches_reference(problem):
    args, dtype, detach_norm = problem
    if dtype == torch.float64:
        dtype = torch.float32  # the kernels' own path (fp64 goes to the torch code)
        args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    check(args, dtype, detach_norm, backend="triton")
