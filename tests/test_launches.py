"""What one layer's step asks of a GPU, counted without one (docs/DESIGN.md §4): the kernels it
launches and whether the host would wait.

The layer runs on meta tensors with the Triton kernels stubbed (edora_kernels.bench.launches):
every ATen op is a shape computation there, and one that needs device data on the host (a
``.item()``, ``nonzero``, a data-dependent shape) fails outright, so a step that completes needs
nothing from the device. The profiler gives the launches in issue order.
"""
import pytest
import torch

from edora_kernels import EDoRALinear, base_norm_terms, edora_epilogue
from edora_kernels.bench.launches import count_launches, stub_kernels

FORWARD = ["triton::prologue_kernel", "triton::edora_fwd_kernel"]
BACKWARD = ["triton::prepass_kernel", "triton::finalize_kernel", "triton::edora_dx_kernel"]
STEP_BUDGET, INFERENCE_BUDGET = 8, 3


@pytest.fixture
def stubbed():
    with stub_kernels():
        yield


def _meta_layer(bias=True, dtype=torch.bfloat16, **options):
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(torch.nn.Linear(48, 40, bias=bias), 8, backend="triton",
                                    **options)
    return layer.to(dtype).to("meta")


def _step(layer, x, gy):
    def run():
        for t in (x, layer.R, layer.magnitude):
            t.grad = None
        layer(x).backward(gy)
    run()  # the first call computes the layer's norm terms
    return count_launches(run)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_step_launches_five_kernels_and_never_syncs(stubbed, bias, dtype):
    layer = _meta_layer(bias, dtype)
    x = torch.empty(3, 7, 48, dtype=dtype, device="meta", requires_grad=True)
    log = _step(layer, x, torch.empty(3, 7, 40, dtype=dtype, device="meta"))
    assert log.launches == FORWARD + BACKWARD
    assert log.count <= STEP_BUDGET and not log.syncs


def test_exact_norm_gradient_adds_one_launch(stubbed):
    layer = _meta_layer(detach_norm=False)
    x = torch.empty(16, 48, dtype=torch.bfloat16, device="meta", requires_grad=True)
    log = _step(layer, x, torch.empty(16, 40, dtype=torch.bfloat16, device="meta"))
    assert log.launches == FORWARD + BACKWARD[:2] + ["triton::finalize_exact_kernel",
                                                     BACKWARD[2]]
    assert log.count <= STEP_BUDGET and not log.syncs


def test_first_layer_skips_dx(stubbed):
    """x needs no gradient (the first adapted layer after frozen embeddings): no dx GEMM."""
    layer = _meta_layer()
    x = torch.empty(16, 48, dtype=torch.bfloat16, device="meta")
    log = _step(layer, x, torch.empty(16, 40, dtype=torch.bfloat16, device="meta"))
    assert log.launches == FORWARD + BACKWARD[:2] and not log.syncs


def test_inference_forward_launches_two_kernels(stubbed):
    layer = _meta_layer()
    x = torch.empty(16, 48, dtype=torch.bfloat16, device="meta")
    with torch.no_grad():
        layer(x)
        log = count_launches(lambda: layer(x))
    assert log.launches == FORWARD
    assert log.count <= INFERENCE_BUDGET and not log.syncs


def test_epilogue_step_on_a_base_layer_output(stubbed):
    """The epilogue op (quantised bases): the prologue and one pass forward, the pre-pass (which
    writes the base layer's gradient), a rank-r GEMM for dx and the finalize backward."""
    layer = _meta_layer()
    c0, C = base_norm_terms(layer.weight, layer.A)
    x = torch.empty(16, 48, dtype=torch.bfloat16, device="meta", requires_grad=True)
    y0 = torch.empty(16, 40, dtype=torch.bfloat16, device="meta", requires_grad=True)
    gy = torch.empty(16, 40, dtype=torch.bfloat16, device="meta")

    def run():
        for t in (x, y0, layer.R, layer.magnitude):
            t.grad = None
        y = edora_epilogue(y0, x, layer.bias, layer.A, layer.B, layer.R, layer.magnitude,
                           layer.scaling, base_norm_sq=c0, base_times_A=C, backend="triton")
        y.backward(gy)

    run()
    log = count_launches(run)
    # G = A Aᵀ is formed per call by the functional op (a conversion and a GEMM); dx is u A
    assert log.launches == ["aten::copy_", "aten::mm", "triton::prologue_kernel",
                            "triton::edora_epilogue_kernel", "triton::prepass_kernel",
                            "triton::finalize_kernel", "aten::mm"]
    assert log.count <= STEP_BUDGET and not log.syncs


def test_counter_sees_host_syncs():
    """The counter itself: an op that reads device data on the host is reported (else the
    no-sync assertions above could not fail)."""
    x = torch.randn(8)
    log = count_launches(lambda: (x > 0).nonzero())
    assert "aten::nonzero" in log.syncs and "aten::gt" in log.launches
    assert count_launches(lambda: float(x.sum())).syncs
