"""The ``edora_linear`` op (torch backend) against the dense reference."""
import pytest
import torch
import torch.nn.functional as F
from helpers import as_float64, assert_close, reference_with_grads, run_with_grads

from edora_kernels import edora_linear
from edora_kernels.reference import edora_linear_reference
from edora_kernels.testing import make_case

SHAPES = [(77, 93), (130, 67)]  # (in, out): not multiples of 16, tall and wide
RANKS = [1, 3, 8, 16, 64]
ROWS = [0, 1, 37, 256]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def op(**args):
    return edora_linear(**args, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows", ROWS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, rank, n_rows, dtype):
    # alpha = 2: dR's entries stay O(1), where the table's normalisation is relative.
    args = make_case(n_rows, *shape, rank, dtype=dtype, seed=rank + n_rows, alpha=2.0).op_args()
    y, grads = run_with_grads(op, args)
    y_ref, grads_ref = reference_with_grads(args)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize("detach_norm", [True, False])
def test_exact_norm_gradient_matches_reference(detach_norm):
    args = make_case(19, 45, 33, 5, dtype=torch.float64).op_args()
    _, grads = run_with_grads(op, args, detach_norm=detach_norm)
    _, grads_ref = reference_with_grads(args, detach_norm=detach_norm)
    for name in grads:
        assert_close(grads[name], grads_ref[name], torch.float64, f"d{name}")
    if not detach_norm:  # the two modes must actually differ in dR
        _, detached = run_with_grads(op, args, detach_norm=True)
        assert (detached["R"] - grads["R"]).abs().max() > 1e-6


def test_gradcheck_exact_norm():
    args = make_case(6, 11, 9, 3, dtype=torch.float64).op_args()
    x, R, m = (args.pop(k).requires_grad_() for k in ("x", "R", "magnitude"))
    fn = lambda x, R, m: op(x=x, R=R, magnitude=m, **args, detach_norm=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, R, m))


def test_gradcheck_detached_norm():
    """With the norm detached, the gradient in x and m is the true one; R's is checked against
    the reference above (gradcheck would see the norm's dependence on R)."""
    args = make_case(6, 11, 9, 3, dtype=torch.float64).op_args()
    x, m = (args.pop(k).requires_grad_() for k in ("x", "magnitude"))
    fn = lambda x, m: op(x=x, magnitude=m, **args, detach_norm=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, m))


def test_bias_gradient():
    args = make_case(7, 12, 10, 2, dtype=torch.float64).op_args()
    bias = args["bias"].clone().requires_grad_()
    y = op(**{**args, "bias": bias})
    (gb,) = torch.autograd.grad(y.sum(), bias)
    assert torch.equal(gb, torch.full_like(gb, 7.0))


@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 5), ()], ids=str)
def test_leading_dims(lead):
    args = make_case(1, 20, 14, 4, dtype=torch.float64).op_args()
    x = torch.randn(*lead, 20, dtype=torch.float64)
    y = op(**{**args, "x": x})
    expected = edora_linear_reference(**{**args, "x": x})
    assert y.shape == (*lead, 14)
    assert_close(y, expected, torch.float64)


def test_non_contiguous_input():
    args = make_case(1, 24, 18, 4, dtype=torch.float32).op_args()
    base = torch.randn(24, 40)
    for x in (base.t(), torch.randn(40, 48)[:, ::2], torch.randn(3, 40, 24).transpose(0, 1)):
        assert not x.is_contiguous()
        expected = edora_linear_reference(**as_float64({**args, "x": x}))
        assert_close(op(**{**args, "x": x}), expected, torch.float32)


def test_empty_batch_gives_empty_output_and_zero_grads():
    args = make_case(0, 16, 12, 4).op_args()
    y, grads = run_with_grads(op, args)
    assert y.shape == (0, 12)
    assert grads["x"].shape == (0, 16)
    assert torch.equal(grads["R"], torch.zeros(4, 4))
    assert torch.equal(grads["magnitude"], torch.zeros(12))


def test_non_finite_input_propagates_like_linear():
    args = make_case(6, 16, 12, 4).op_args()
    x = args["x"].clone()
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    y = op(**{**args, "x": x})
    base = F.linear(x, args["weight"], args["bias"])
    assert torch.equal(torch.isnan(y[1]), torch.isnan(base[1]))
    assert torch.equal(torch.isfinite(y), torch.isfinite(base))


def test_zero_magnitude_entry_gives_bias_only():
    args = make_case(5, 16, 12, 4).op_args()
    args["magnitude"][3] = 0.0
    y, grads = run_with_grads(op, args)
    assert torch.equal(y[:, 3], args["bias"][3].expand(5))
    assert torch.isfinite(grads["magnitude"]).all()


def test_fp16_row_norms_beyond_fp16_range():
    """‖W0‖ > 65504 per row: the norm is taken in fp32 so g and y stay finite."""
    args = make_case(8, 256, 32, 4, dtype=torch.float16).op_args()
    args["weight"] = (args["weight"].float() * 1e5).half()
    args["x"] = args["x"] * 1e-3
    args["magnitude"] = args["weight"].float().norm(dim=1)  # fp32 adapter tensors
    assert args["magnitude"].min() > 65504
    y = op(**args)
    assert torch.isfinite(y).all()
    assert_close(y, edora_linear_reference(**as_float64(args)), torch.float16)


def test_fp32_adapter_on_half_model():
    """The documented cast rule: adapters in fp32, base and x in bf16; output bf16, grads fp32."""
    args = make_case(9, 40, 24, 4, dtype=torch.bfloat16).op_args()
    for k in ("A", "B", "R", "magnitude"):
        args[k] = args[k].float()
    y, grads = run_with_grads(op, args)
    assert y.dtype == torch.bfloat16
    assert grads["R"].dtype == grads["magnitude"].dtype == torch.float32
    y_ref, grads_ref = reference_with_grads(args)
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(grads["R"], grads_ref["R"], torch.bfloat16)


def test_deterministic():
    args = make_case(64, 40, 24, 4).op_args()
    first = run_with_grads(op, args)
    second = run_with_grads(op, args)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name])


def test_no_grad_path_matches_training_path():
    args = make_case(13, 40, 24, 4).op_args()
    with torch.no_grad():
        y_eval = op(**args)
    y_train, _ = run_with_grads(op, args)
    assert torch.equal(y_eval, y_train)


def _saved_storages(args, **kwargs):
    """(bytes of each storage autograd keeps that is not an input, the output)."""
    inputs = {t.untyped_storage().data_ptr() for t in args.values() if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = op(**args, **kwargs)
    return storages, y


@pytest.mark.parametrize("detach_norm", [True, False])
def test_saved_for_backward_beyond_the_output_is_v_and_small_terms(detach_norm):
    """Backward keeps y (the output itself, usually kept by the next op anyway), v (N×r) and
    O(out·r) terms (n and g; P, C and G for the exact norm gradient): no N×out tensor of its
    own, never x, never an out×in tensor."""
    n_rows, in_f, out_f, rank = 64, 96, 80, 8
    args = make_case(n_rows, in_f, out_f, rank).op_args()
    x, R, m = (args[k].requires_grad_() for k in ("x", "R", "magnitude"))
    storages, y = _saved_storages(args, detach_norm=detach_norm)
    assert x.untyped_storage().data_ptr() not in storages
    own = {ptr: size for ptr, size in storages.items() if ptr != y.untyped_storage().data_ptr()}
    exact = 0 if detach_norm else 8 * (2 * out_f * rank + rank * rank)  # P, C, G
    assert sum(own.values()) <= n_rows * rank * 4 + 8 * out_f + 4 * out_f + exact


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_zero_magnitude_columns(dtype, detach_norm):
    """g = 0 where m = 0, so y = b there and holds no trace of z: dm comes from the z columns
    forward kept, and matches the reference."""
    args = make_case(37, 40, 24, 4, dtype=dtype, seed=3).op_args()
    args["magnitude"][[2, 11, 23]] = 0.0
    y, grads = run_with_grads(op, args, detach_norm=detach_norm)
    y_ref, grads_ref = reference_with_grads(args, detach_norm=detach_norm)
    assert_close(y, y_ref, dtype, "y")
    for name in grads:
        assert_close(grads[name], grads_ref[name], dtype, f"d{name}")
    assert grads["magnitude"][[2, 11, 23]].abs().min() > 0


def test_in_place_write_to_the_output_raises_clearly():
    args = make_case(8, 20, 16, 4).op_args()
    args["R"].requires_grad_()
    y = op(**args)
    y.relu_()
    with pytest.raises(RuntimeError, match="modified in place.*out of place"):
        y.sum().backward()


def test_small_cpu_ops_run_on_one_thread_and_the_count_is_restored(monkeypatch):
    """The torch backend's rank-r ops on a small layer run on one CPU thread (waking OpenMP's
    others costs more than such an op); the caller's thread count is back afterwards, also when
    the op raises, and big work keeps every thread."""
    import edora_kernels.backends.torch_backend as torch_backend
    from edora_kernels.op_common import SMALL_CPU_WORK, cpu_threads_for

    seen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: seen[-1] if seen else 4)
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    inner = []
    original = torch_backend.mm_compute
    monkeypatch.setattr(torch_backend, "mm_compute",
                        lambda *a: inner.append(torch.get_num_threads()) or original(*a))
    case = make_case(16, 24, 20, 3)
    edora_linear(case.x, case.weight, case.bias, case.A, case.B, case.R, case.magnitude,
                 case.scaling, backend="torch")
    assert inner == [1] and seen[-1] == 4

    seen.clear()
    with pytest.raises(ValueError), cpu_threads_for(0):
        raise ValueError
    assert seen == [1, 4]
    seen.clear()
    with cpu_threads_for(SMALL_CPU_WORK):
        pass
    assert seen == []
