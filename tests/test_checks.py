"""Every bad input fails before any work, with a message naming the argument."""
import pytest
import torch
from torch import nn

from edora_kernels import EDoRALinear, apply_edora, edora_linear
from edora_kernels.svd import edora_factors
from edora_kernels.testing import make_case


def call(**changes):
    args = make_case(4, 12, 10, 3).op_args()
    args.update(changes)
    return edora_linear(**args)


@pytest.mark.parametrize("changes, error, words", [
    ({"x": torch.randn(4, 11)}, ValueError, ["last dim of x", "in_features", "12", "(4, 11)"]),
    ({"weight": torch.randn(10)}, ValueError, ["weight must be 2-D", "(10,)"]),
    ({"A": torch.randn(3, 11)}, ValueError, ["A must have shape (3, 12)", "(3, 11)"]),
    ({"A": torch.randn(3)}, ValueError, ["A must be 2-D"]),
    ({"B": torch.randn(9, 3)}, ValueError, ["B must have shape (10, 3)", "(9, 3)"]),
    ({"R": torch.randn(3, 2)}, ValueError, ["R must have shape (3, 3)"]),
    ({"magnitude": torch.randn(9)}, ValueError, ["magnitude must have shape (10,)"]),
    ({"bias": torch.randn(11)}, ValueError, ["bias must have shape (10,)", "(11,)"]),
    ({"A": torch.randn(0, 12), "B": torch.randn(10, 0), "R": torch.randn(0, 0)}, ValueError,
     ["rank", "[1, 10]", "= 0"]),
    ({"A": torch.randn(11, 12), "B": torch.randn(10, 11), "R": torch.randn(11, 11)}, ValueError,
     ["rank", "[1, 10]", "= 11"]),
    ({"x": torch.randn(4, 12, dtype=torch.float64)}, TypeError,
     ["weight dtype torch.float32", "x dtype torch.float64"]),
    ({"x": torch.randint(0, 3, (4, 12))}, TypeError, ["x", "torch.int64"]),
    ({"bias": torch.randn(10, dtype=torch.float16)}, TypeError, ["bias dtype torch.float16"]),
    ({"R": torch.randn(3, 3).to(torch.int32)}, TypeError, ["R", "torch.int32"]),
    ({"R": torch.randn(3, 3, device="meta")}, ValueError, ["one device", "R is on meta"]),
    ({"weight": torch.randn(10, 12, device="meta")}, ValueError, ["weight is on meta"]),
    ({"scaling": float("nan")}, ValueError, ["scaling must be finite", "nan"]),
    ({"scaling": float("inf")}, ValueError, ["scaling must be finite"]),
    ({"scaling": torch.tensor(1.0)}, TypeError, ["scaling must be a Python float"]),
    ({"x": [1.0] * 12}, TypeError, ["x must be a torch.Tensor", "list"]),
])
def test_bad_input_raises_with_a_clear_message(changes, error, words):
    with pytest.raises(error) as info:
        call(**changes)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("name", ["weight", "A", "B"])
def test_frozen_tensor_requiring_grad_raises(name):
    args = make_case(4, 12, 10, 3).op_args()
    args[name].requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad.*frozen"):
        edora_linear(**args)
    with torch.no_grad():  # fine when no graph is being built
        edora_linear(**args)


@pytest.mark.parametrize("kwargs, words", [
    ({"dropout": 1.0}, ["dropout must be in [0, 1)"]),
    ({"dropout": -0.1}, ["dropout must be in [0, 1)"]),
    ({"backend": "cutlass"}, ["backend must be one of", "'cutlass'"]),
])
def test_bad_options(kwargs, words):
    with pytest.raises(ValueError) as info:
        edora_linear(**make_case(4, 12, 10, 3).op_args(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_unusable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable: .*"):
        edora_linear(**make_case(4, 12, 10, 3).op_args(), backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("EDORA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        edora_linear(**make_case(4, 12, 10, 3).op_args())


# --- configuration values: one rule each, so every entry point says the same -------------------


@pytest.mark.parametrize("option, value, message", [
    ("init", "pca", "init must be one of ('rsvd', 'svd', 'random'), got 'pca'"),
    ("split", "half", "split must be one of ('u', 'sqrt'), got 'half'"),
    ("dropout_mode", "all", "dropout_mode must be one of ('peft', 'lowrank'), got 'all'"),
    ("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
])
def test_an_option_is_refused_alike_everywhere(option, value, message):
    entry_points = {
        "from_linear": lambda kw: EDoRALinear.from_linear(nn.Linear(12, 10), 2, **kw),
        "apply_edora": lambda kw: apply_edora(nn.Sequential(nn.Linear(12, 10)), ["0"], 2,
                                              progress=False, **kw),
    }
    if option in ("init", "split"):
        entry_points["edora_factors"] = lambda kw: edora_factors(torch.randn(10, 12), 2, **kw)
    else:
        entry_points["edora_linear"] = lambda kw: call(**kw)
    for name, entry_point in entry_points.items():
        with pytest.raises(ValueError) as info:
            entry_point({option: value})
        assert str(info.value) == message, name
