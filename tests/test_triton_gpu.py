"""The Triton kernels compiled on a GPU at real layer sizes, against the fp64 reference on the GPU.

Marked ``gpu`` and skipped without CUDA. ``test_triton`` runs the same checks on odd small
shapes (in the interpreter without a GPU).
"""
import pytest
import torch
from helpers import (
    add_second_basis,
    assert_close,
    check_backend,
    check_outputs,
    check_served_mixed_batch,
    jitter_adapters,
    mixed_training_results,
    op_outputs,
    requires_cuda,
)

from edora_kernels import EDoRALinear, edora_linear
from edora_kernels.backends.triton import configs as triton_configs
from edora_kernels.backends.triton import epilogue_only as triton_epilogue
from edora_kernels.backends.triton import fwd as triton_fwd
from edora_kernels.backends.triton import mixed as triton_mixed
from edora_kernels.backends.triton.launch import kernel_name, launch
from edora_kernels.mixed import RowAssignment
from edora_kernels.norm import compute_norm_terms
from edora_kernels.testing import make_case

pytestmark = [pytest.mark.gpu, requires_cuda]
DEVICE = "cuda"
BF16 = torch.bfloat16


@pytest.mark.parametrize("n,in_f,out_f,rank", [
    (4096, 4096, 4096, 16),
    (4096, 4096, 4096, 64),
    (4096, 4096, 11008, 16),
    (4096, 11008, 4096, 64),
])
def test_bf16_matches_reference(n, in_f, out_f, rank):
    case = make_case(n, in_f, out_f, rank, BF16, DEVICE, seed=rank)
    check_backend(case, "triton", BF16, f"bf16 N={n} {in_f}x{out_f} r={rank}")


@pytest.mark.parametrize("n", [1, 77, 4095])
def test_bf16_odd_token_counts(n):
    """Decode (one token) and token counts that leave partial row tiles."""
    case = make_case(n, 4096, 4096, 16, BF16, DEVICE, seed=n)
    check_backend(case, "triton", BF16, f"bf16 N={n}")


# ------------------------------------------------------------------------------------------------
# The forward's TMA path: sm_90 only
# ------------------------------------------------------------------------------------------------

def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


requires_hopper = pytest.mark.skipif(not _on_hopper(), reason="the TMA path runs on sm_90")


@pytest.fixture
def forward_launches(monkeypatch):
    """The TMA flag of each forward GEMM launch (training and serving), with the TMA path
    switched on; the mixed prologue and slots launches beside it are not recorded."""
    monkeypatch.setenv(triton_configs.TMA_ENV, "1")
    launches = []

    def record(kernel, grid, **args):
        if kernel_name(kernel) == "edora_fwd_kernel":
            launches.append(args["TMA"])
        launch(kernel, grid, **args)

    monkeypatch.setattr(triton_fwd, "launch", record)
    monkeypatch.setattr(triton_mixed, "launch", record)
    return launches


@requires_hopper
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("n,in_f,out_f,rank", [
    (4096, 4096, 4096, 16),
    (1, 4096, 4096, 64),      # decode: fewer tiles than SMs
    (77, 4096, 11008, 3),     # partial row tile
    (2048, 4104, 4093, 1),    # in a multiple of 8 but of no block, out odd
])
def test_tma_forward_on_hopper(forward_launches, dtype, n, in_f, out_f, rank):
    case = make_case(n, in_f, out_f, rank, dtype, DEVICE, seed=rank + n)
    check_backend(case, "triton", dtype, f"TMA {dtype} N={n} {in_f}x{out_f} r={rank}")
    assert forward_launches == [True]


@requires_hopper
def test_tma_forward_fp32_adapters_and_zero_magnitudes(forward_launches):
    case = make_case(2048, 4096, 4096, 16, BF16, DEVICE, adapter_dtype=torch.float32, seed=23)
    case.magnitude[[0, 300, 4095]] = 0.0
    check_backend(case, "triton", BF16, "TMA, fp32 adapters, zero magnitudes")
    assert forward_launches == [True]


@requires_hopper
def test_unaligned_rows_keep_the_pointer_path_on_hopper(forward_launches):
    """in = 4095: x's and W0's rows are not 16-byte multiples, TMA cannot read them."""
    case = make_case(512, 4095, 4096, 16, BF16, DEVICE, seed=29)
    check_backend(case, "triton", BF16, "pointer path, in = 4095")
    assert forward_launches == [False]


def test_fp16_and_fp32_adapters():
    case = make_case(2048, 4096, 4096, 32, torch.float16, DEVICE, adapter_dtype=torch.float32,
                     seed=5)
    check_backend(case, "triton", torch.float16, "fp16 model, fp32 adapters")


def test_exact_norm_deterministic():
    case = make_case(4096, 4096, 4096, 16, BF16, DEVICE, seed=9)
    first, _ = check_backend(case, "triton", BF16, "exact norm", detach_norm=False)
    second = op_outputs(case, "triton", detach_norm=False)
    for name, a, b in zip(("y", "dx", "dR", "dm"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_epilogue_kernel():
    case = make_case(4096, 4096, 4096, 64, BF16, DEVICE, seed=13)
    y0 = torch.nn.functional.linear(case.x, case.weight, case.bias)
    y, saved = triton_epilogue.epilogue_forward(
        y0, case.x, case.bias, case.A, case.B, case.R, case.magnitude,
        compute_norm_terms(case.weight, case.A), case.scaling, False, 0)
    v = case.x.double() @ case.A.double().T
    ez = (y0.double() - case.bias.double()) + case.scaling * v @ saved.P.T
    assert_close(y, saved.g.double() * ez + case.bias.double(), BF16, "y")


def test_tf32_only_when_torch_allows_it():
    """fp32: TF32 kernels where torch allows TF32, torch's own fp32 path where it does not."""
    case = make_case(1024, 4096, 4096, 16, torch.float32, DEVICE, seed=17)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert triton_configs.use_torch_path(torch.float32, 16)
        check_backend(case, "triton", torch.float32, "fp32 without TF32")
        matmul.fp32_precision = "tf32"
        assert not triton_configs.use_torch_path(torch.float32, 16)
        # TF32 keeps 10 mantissa bits, bf16 7: bf16's bound holds.
        check_outputs(op_outputs(case, "triton"), op_outputs(case), BF16, "fp32 with TF32")
    finally:
        matmul.fp32_precision = saved


def test_torch_compile_fullgraph():
    """The op traces without graph breaks and gives eager's results."""
    case = make_case(1024, 4096, 4096, 16, BF16, DEVICE, seed=19)
    args = (case.weight, case.bias, case.A, case.B)

    def step(x, R, m):
        return edora_linear(x, *args, R, m, case.scaling, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = case.x.detach().requires_grad_()
        R, m = case.R.detach().requires_grad_(), case.magnitude.detach().requires_grad_()
        y = fn(x, R, m)
        results.append((y.detach(),) + torch.autograd.grad(y, (x, R, m), torch.ones_like(y)))
    for name, eager, comp in zip(("y", "dx", "dR", "dm"), *results):
        assert_close(comp, eager.double(), BF16, f"compiled {name}")


def test_training_step_captures_in_a_cuda_graph():
    """Nothing in a training step reads device data on the host (no sync, no data-dependent
    shape): forward and backward capture into one CUDA graph, and a replay gives the eager
    step's output and gradients."""
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, device=DEVICE, dtype=BF16)
    layer = EDoRALinear.from_linear(base, 16, backend="triton")
    x = torch.randn(2048, 4096, device=DEVICE, dtype=BF16, requires_grad=True)
    gy = torch.randn(2048, 4096, device=DEVICE, dtype=BF16)

    def step():
        y = layer(x)
        y.backward(gy)
        return y

    def clear():
        for t in (x, layer.R, layer.magnitude):
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and the norm terms happen here, not in capture
        for _ in range(3):
            clear()
            step()
    torch.cuda.current_stream().wait_stream(side)
    clear()
    eager_y = step().detach().clone()
    eager = [t.grad.clone() for t in (x, layer.R, layer.magnitude)]
    clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager_y)
    for name, got, want in zip(("dx", "dR", "dm"), (x.grad, layer.R.grad, layer.magnitude.grad),
                               eager):
        assert torch.equal(got, want), f"{name} differs after a graph replay"


def _two_bases_layer(dtype):
    """A 1024² layer with "default" and "user1" on its r = 16 basis and "wide" on an r = 32
    basis; rows of each and of the base model (index 3)."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(torch.nn.Linear(1024, 1024, device=DEVICE, dtype=dtype),
                                    16, seed=0, backend="triton")
    layer.add_adapter("user1", seed=1)
    add_second_basis(layer, "wide", rank=32, alpha=32.0, seed=2)
    jitter_adapters(layer, 0.05)
    return layer, torch.tensor([0, 3, 1, 2, 2, 0, 1, 3])


def test_mixed_batch_over_two_bases_is_served_without_a_host_sync():
    """Served (the fused GEMM for the first basis's rows, one epilogue pass for the second's)
    against the composed path and the float64 reference; then, warm, a forward under CUDA's
    sync check set to error: the row indices reach the device without the host waiting."""
    layer, rows = _two_bases_layer(BF16)
    x = torch.randn(len(rows), 64, 1024, device=DEVICE, dtype=BF16)
    check_served_mixed_batch(layer, rows, x, BF16)
    layer.backend = "triton"
    with torch.no_grad():
        layer.row_adapters = RowAssignment(rows)
        layer(x)
        layer.row_adapters = RowAssignment(rows)  # the next forward: indices copied afresh
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            layer.row_adapters = None


def test_mixed_training_in_the_kernels_matches_float64(monkeypatch):
    """A bf16 mixed training step at 1024² r = 16 on the Triton kernels (the mixed prologue and
    slots, the forward GEMM, the pre-pass, the dx GEMM, the finalize), with a zero magnitude in
    one adapter and base rows: y, dx and every adapter's dR and dm against the same step of the
    float64 layer."""
    import copy

    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(torch.nn.Linear(1024, 1024, device=DEVICE, dtype=BF16),
                                    16, seed=0, backend="triton")
    for i in (1, 2):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.05)
    with torch.no_grad():
        layer.adapter_weights("user1")[1][[3, 700]] = 0.0
    rows = torch.tensor([0, 3, 1, 2, 2, 0, 1, 3])
    x = torch.randn(len(rows), 64, 1024, device=DEVICE)
    gy = torch.randn(len(rows), 64, 1024, device=DEVICE)
    exact = copy.deepcopy(layer).double()
    exact.backend = "torch"
    want = mixed_training_results(exact, rows, x.double(), gy)
    kernels = []
    monkeypatch.setattr(triton_mixed, "launch", lambda kernel, grid, **args:
                        kernels.append(kernel_name(kernel)) or launch(kernel, grid, **args))
    got = mixed_training_results(layer, rows, x.to(BF16), gy)
    assert kernels == ["mixed_prologue_kernel", "mixed_slots_kernel", "edora_fwd_kernel",
                       "prepass_kernel", "edora_dx_kernel", "finalize_kernel"]
    for i, (actual, reference) in enumerate(zip(got, want)):
        assert_close(actual, reference, BF16, f"result {i}")


def test_mixed_training_batch_over_two_bases_gives_each_adapter_its_rows_gradient():
    """One backward of the mixed batch (fp32 on the GPU) against a separate step per adapter on
    its own rows: dR, dm and dx."""
    layer, rows = _two_bases_layer(torch.float32)
    x = torch.randn(len(rows), 64, 1024, device=DEVICE, requires_grad=True)
    gy = torch.randn(len(rows), 64, 1024, device=DEVICE)
    layer.row_adapters = rows
    layer(x).backward(gy)
    layer.row_adapters = None
    mixed = {name: [p.grad.clone() for p in layer.adapter_weights(name)]
             for name in layer.adapter_names}
    for index, name in enumerate(layer.adapter_names):
        own = (rows == index).nonzero().flatten().tolist()
        for p in layer.adapter_weights(name):
            p.grad = None
        layer.set_active_adapter(name)
        x_own = x.detach()[own].requires_grad_()
        layer(x_own).backward(gy[own])
        for got, want, what in zip(mixed[name], layer.adapter_weights(name), ("dR", "dm")):
            assert_close(got, want.grad.double(), torch.float32, f"{name} {what}")
        assert_close(x.grad[own], x_own.grad.double(), torch.float32, f"{name} dx")


def test_mixed_adapter_batch_served_by_the_fused_forward(forward_launches):
    """A batch mixing 8 adapters and base rows, bf16 at a real size: the Triton serve path (the
    mixed prologue, then one GEMM launch with g per token from a table) against the composed
    path in fp32 and the float64 reference row by row."""
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, device=DEVICE, dtype=BF16)
    layer = EDoRALinear.from_linear(base, 16, seed=0, backend="triton")
    for i in range(1, 8):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.05)
    rows = torch.tensor([i % 9 for i in range(16)])  # 8 adapters and the base (index 8)
    x = torch.randn(16, 64, 4096, device=DEVICE, dtype=BF16)
    check_served_mixed_batch(layer, rows, x, BF16)
    assert forward_launches == [_on_hopper()]  # TMA on Hopper, G_ROWS and all
