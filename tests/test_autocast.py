"""Mixed precision: torch.autocast runs the op at the autocast dtype like F.linear, with R, m and
the norm untouched; model.to(bf16) keeps the adapter in fp32 so optimizer steps still move it."""
import pytest
import torch
from torch import nn

from edora_kernels import EDoRALinear, edora_epilogue, edora_linear
from edora_kernels.norm import base_norm_terms, compute_norm_terms
from edora_kernels.testing import make_case


def test_autocast_bf16_matches_an_explicit_bf16_call():
    args = make_case(16, 32, 24, 4).op_args()
    R = args["R"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = edora_linear(**{**args, "R": R})
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert R.grad.dtype == torch.float32
    # the norm comes from the uncast fp32 weight, as the layer's cached terms would
    terms = compute_norm_terms(args["weight"], args["A"])
    explicit = edora_linear(**{**args, "x": args["x"].bfloat16(), "weight":
                               args["weight"].bfloat16(), "bias": args["bias"].bfloat16()},
                            norm_terms=terms)
    assert torch.equal(y.detach(), explicit)


def test_autocast_epilogue_on_a_base_layer_that_autocasts():
    args = make_case(8, 20, 12, 3).op_args()
    c0, C = base_norm_terms(args["weight"], args["A"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = torch.nn.functional.linear(args["x"], args["weight"], args["bias"])  # bf16
        y = edora_epilogue(y0, args["x"], args["bias"], args["A"], args["B"], args["R"],
                           args["magnitude"], args["scaling"], base_norm_sq=c0, base_times_A=C)
    assert y0.dtype == y.dtype == torch.bfloat16


def test_layer_under_autocast_trains():
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(32, 24), 4, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(torch.randn(5, 32)).float().pow(2).mean()
    loss.backward()
    assert layer.R.grad is not None and layer.magnitude.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_to_half_keeps_the_adapter_in_fp32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(EDoRALinear.from_linear(nn.Linear(32, 24), 4, seed=0)).to(dtype)
    layer = model[0]
    assert layer.weight.dtype == dtype
    assert layer.R.dtype == layer.magnitude.dtype == torch.float32
    before = layer.magnitude.detach().clone()
    opt = torch.optim.AdamW([layer.R, layer.magnitude], lr=1e-4)
    layer(torch.randn(6, 32, dtype=dtype)).float().pow(2).mean().backward()
    opt.step()
    # every entry moves by about lr: invisible had m been rounded to half precision
    assert (layer.magnitude.detach() != before).float().mean() > 0.9
