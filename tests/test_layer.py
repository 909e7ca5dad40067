"""``EDoRALinear``: construction, merge/unmerge, state, dtype/device moves."""
import io

import pytest
import torch
from helpers import assert_close
from torch import nn

from edora_kernels import EDoRALinear
from edora_kernels.reference import edora_linear_reference


def make_layer(in_f=40, out_f=30, rank=4, **kwargs):
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(in_f, out_f), rank, seed=0, **kwargs)
    with torch.no_grad():  # move away from init so merge/unmerge have something to do
        layer.R.normal_(0, 0.2)
        layer.magnitude.mul_(1.1)
    return layer


def test_from_linear_starts_as_the_base_layer():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30)
    layer = EDoRALinear.from_linear(linear, 4, sigma=0.0)
    x = torch.randn(7, 40)
    assert_close(layer(x), linear(x).double(), torch.float32)
    # the layer wraps the linear itself: W0 is shared, never copied
    assert layer.base_layer is linear and layer.weight is linear.weight


def test_trainable_parameters_are_R_and_magnitude():
    layer = make_layer()
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"R", "magnitude"}
    assert {name for name, _ in layer.named_buffers()} == {"A", "B"}


def test_svd_init_factors():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30)
    layer = EDoRALinear.from_linear(linear, 5, init="svd")
    B, A = layer.B, layer.A
    assert torch.allclose(B.T @ B, torch.eye(5), atol=1e-5)  # B = U_r: orthonormal columns
    assert torch.allclose(A, B.T @ linear.weight, atol=1e-5)  # A = U_rᵀ W0
    S = torch.linalg.svdvals(linear.weight)[:5]
    assert torch.allclose(A.norm(dim=1), S, rtol=1e-4)


def test_sqrt_split_reconstructs_the_same_product():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30)
    u = EDoRALinear.from_linear(linear, 5, split="u", seed=0)
    sqrt = EDoRALinear.from_linear(linear, 5, split="sqrt", seed=0)
    assert torch.allclose(u.B @ u.A, sqrt.B @ sqrt.A, atol=1e-5)


def test_forward_matches_reference_for_leading_dims():
    layer = make_layer()
    x = torch.randn(2, 3, 40)
    expected = edora_linear_reference(
        x.double(), layer.weight.double(), layer.bias.double(), layer.A.double(),
        layer.B.double(), layer.R.double(), layer.magnitude.double(), layer.scaling)
    assert_close(layer(x), expected, torch.float32)


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(9, 40)
    before, weight = layer(x), layer.weight.clone()
    merged_weight = layer.merged_weight()
    layer.merge()
    assert layer.merged
    assert torch.equal(layer.weight, merged_weight)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_errors():
    layer = make_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # R and m would silently get no gradient, in train and in eval mode alike
    for mode in (layer.train, layer.eval):
        with pytest.raises(RuntimeError, match="unmerge\\(\\) before training"):
            mode()(torch.randn(2, 40))
    layer.unmerge()
    with torch.no_grad():
        layer.magnitude[2] = 0.0
    with pytest.raises(RuntimeError, match="magnitude is 0 for rows \\[2\\]"):
        layer.merge()
    assert not layer.merged


def test_state_dict_round_trip_is_exact():
    layer = make_layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    fresh = EDoRALinear(nn.Linear(40, 30), 4)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for name, tensor in layer.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(fresh.state_dict()[name], tensor), name
    x = torch.randn(5, 40)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_of_a_merged_layer_holds_w0_and_only_tensors():
    """A merged layer saves W0 and the adapter (what an unmerged layer saves): the file loads
    into any layer and gives the same outputs; nothing but tensors (sharders, accelerate)."""
    layer = make_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 40)
    expected = layer(x).detach()
    layer.merge()
    state = layer.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    torch.testing.assert_close(state["base_layer.weight"], w0, rtol=1e-5, atol=1e-6)
    fresh = EDoRALinear(nn.Linear(40, 30), 4)
    fresh.load_state_dict(state)
    assert not fresh.merged
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    # loading into a merged layer leaves it unmerged, holding what was loaded
    layer.load_state_dict(state)
    assert not layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_w0_after_an_optimizer_step_in_between():
    """merge → step with leftover gradients → unmerge: W0 comes back from what merge used."""
    layer = make_layer()
    w0 = layer.weight.detach().clone()
    layer(torch.randn(4, 40)).sum().backward()  # leftover grads on R and m
    optimizer = torch.optim.SGD([layer.R, layer.magnitude], lr=0.5)
    layer.merge()
    optimizer.step()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)


def test_to_dtype_and_backward():
    layer = make_layer().to(torch.float64)
    assert layer.weight.dtype == layer.A.dtype == layer.R.dtype == torch.float64
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.R.grad.shape == (4, 4) and layer.magnitude.grad.shape == (30,)
    assert x.grad.shape == x.shape


def test_half_model_keeps_fp32_adapter():
    layer = EDoRALinear.from_linear(nn.Linear(40, 30).to(torch.bfloat16), 4, seed=0)
    assert layer.weight.dtype == layer.A.dtype == torch.bfloat16
    assert layer.R.dtype == layer.magnitude.dtype == torch.float32
    y = layer(torch.randn(3, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(6, 40)
    assert torch.equal(layer.eval()(x), layer(x))
    torch.manual_seed(0)
    assert not torch.equal(layer.train()(x), layer.eval()(x))


def test_extra_repr_and_bad_construction():
    text = repr(make_layer(dropout=0.1))
    for part in ("in_features=40", "out_features=30", "rank=4", "alpha=16.0", "dropout=0.1"):
        assert part in text
    with pytest.raises(ValueError, match="rank must be in"):
        EDoRALinear(nn.Linear(10, 8), 9)
    # a module it cannot wrap is named with its type, its weight's, and what EDoRA wraps
    with pytest.raises(ValueError, match=r"Conv1d \(torch.nn.modules.conv.Conv1d, weight "
                       r"torch.nn.parameter.Parameter\) is not a base layer.*EDoRA wraps "
                       r"torch.nn.Linear"):
        EDoRALinear.from_linear(nn.Conv1d(3, 3, 1), 2)


def test_norm_cache_follows_in_place_updates():
    """An in-place change of W0 or A must reach the cached norm terms."""
    layer = make_layer()
    x = torch.randn(4, 40)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.A.add_(0.1)
    expected = edora_linear_reference(
        x.double(), layer.weight.double(), layer.bias.double(), layer.A.double(),
        layer.B.double(), layer.R.double(), layer.magnitude.double(), layer.scaling)
    assert_close(layer(x), expected, torch.float32)
