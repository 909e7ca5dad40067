"""The norm terms' lifecycle: owned by the layer, never stale behind a stamp, refreshed on demand,
verified on request, freed with the layer, safe under threads, no thrash at any model size."""
import copy
import gc
import threading
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import edora_kernels.norm as norm
from edora_kernels import EDoRALinear, apply_edora, refresh_norm_terms
from edora_kernels.reference import edora_linear_reference


def make_layer(seed=0, in_features=24, out_features=20, rank=4):
    torch.manual_seed(seed)
    layer = EDoRALinear.from_linear(nn.Linear(in_features, out_features), rank, seed=seed)
    with torch.no_grad():  # move the adapter off its init so the norm matters
        layer.R.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
    return layer


def dense(layer, x):
    """The layer's output recomputed from its current tensors with the dense reference."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return edora_linear_reference(d(x), d(layer.weight), d(layer.bias), d(layer.A), d(layer.B),
                                  d(layer.R), d(layer.magnitude), layer.scaling)


def assert_current(layer, x):
    torch.testing.assert_close(layer(x).double(), dense(layer, x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def count_terms(monkeypatch):
    """How many times the terms are computed (the cache's misses)."""
    calls = []
    original = norm.compute_norm_terms

    def counting(weight, A):
        calls.append(1)
        return original(weight, A)

    monkeypatch.setattr(norm, "compute_norm_terms", counting)
    return calls


# --- writes a stamp can see: always current --------------------------------------------------

@pytest.mark.parametrize("write", [
    "weight.mul_", "A.mul_", "load_state_dict", "data_swap", "to_float64", "optimizer_on_weight",
])
def test_writes_the_stamps_see_are_picked_up(write):
    layer, x = make_layer(), torch.randn(6, 24)
    layer(x)  # fill the cache
    with torch.no_grad():
        if write == "weight.mul_":
            layer.weight.mul_(2)
        elif write == "A.mul_":
            layer.A.mul_(0.5)
        elif write == "load_state_dict":
            layer.load_state_dict(make_layer(seed=1).state_dict())
        elif write == "data_swap":
            layer.weight.data = torch.randn_like(layer.weight)
        elif write == "to_float64":
            layer.double()
            x = x.double()
    if write == "optimizer_on_weight":
        layer.weight.requires_grad_(True)
        layer.weight.grad = torch.ones_like(layer.weight)
        torch.optim.SGD([layer.weight], lr=0.1).step()
        layer.weight.requires_grad_(False)
    assert_current(layer, x)


def test_hidden_writes_need_refresh_and_verify_catches_them(monkeypatch):
    """``.data`` writes and numpy views bypass the version counter: the stale terms are caught
    by EDORA_VERIFY_NORM=1 (naming the layer) and fixed by refresh_norm_terms(model)."""
    model = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 16))
    apply_edora(model, rank=4, target_modules=["0", "2"], seed=0)
    x = torch.randn(5, 24)
    model(x)
    layer = model[0]
    layer.weight.data.mul_(2)               # version counter unmoved
    layer.A.numpy()[:] *= 0.5               # through a numpy view
    stale = layer(x).detach()
    assert not torch.allclose(stale.double(), dense(layer, x), rtol=1e-3, atol=1e-3)
    monkeypatch.setenv("EDORA_VERIFY_NORM", "1")
    with pytest.raises(RuntimeError, match=r"^0: cached norm term \w+ is stale.*refresh_norm"):
        model(x)
    assert refresh_norm_terms(model) == 2
    model(x)  # verified: no error
    assert_current(layer, x)


def test_no_thrash_with_more_layers_than_any_cache(count_terms):
    """300 adapted layers (more than a 256-entry cache ever held): each layer's terms are
    computed once, then reused forward and backward."""
    layers = nn.ModuleList(make_layer(seed=i, in_features=8, out_features=8, rank=2)
                           for i in range(300))
    x = torch.randn(3, 8)
    for _ in range(2):
        y = sum(layer(x).sum() for layer in layers)
        y.backward()
    assert len(count_terms) == 300


def test_backward_with_detached_norm_reads_no_terms(count_terms):
    layer = make_layer()
    layer.detach_norm = True
    y = layer(torch.randn(4, 24, requires_grad=True))
    layer.refresh_norm_terms()
    y.sum().backward()
    assert len(count_terms) == 1 and layer.R.grad is not None


def test_terms_are_freed_with_the_layer():
    layer = make_layer()
    layer(torch.randn(2, 24))
    terms = weakref.ref(layer.norm_cache._entry[2].C)
    del layer
    gc.collect()
    assert terms() is None


def test_copies_and_pickles_own_their_terms():
    layer = make_layer()
    x = torch.randn(3, 24)
    layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.weight.mul_(3)
    assert_current(clone, x)
    assert_current(layer, x)
    buffer = __import__("io").BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert_current(torch.load(buffer, weights_only=False), x)


def _run_threads(*targets):
    errors = []

    def guarded(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_share_layers_safely():
    """16 threads through shared layers: forwards while one thread keeps writing the weights in
    place, then forward + backward; no exception, and every layer is current at the end."""
    layers = [make_layer(seed=i) for i in range(4)]
    x = torch.randn(8, 24)

    def infer():
        with torch.no_grad():
            for _ in range(20):
                for layer in layers:
                    assert torch.isfinite(layer(x)).all()

    def write():
        for i in range(40):
            with torch.no_grad():
                layers[i % 4].weight.mul_(1.001)

    def train():
        for _ in range(10):
            for layer in layers:
                layer(x).sum().backward()

    assert not _run_threads(*[infer] * 16, write)
    assert not _run_threads(*[train] * 16)
    for layer in layers:
        assert_current(layer, x)


def test_numpy_view_is_a_real_view():
    """The hidden-write test relies on numpy sharing A's memory."""
    layer = make_layer()
    view = layer.A.numpy()
    view[0, 0] = 123.0
    assert layer.A[0, 0].item() == np.float32(123.0)
