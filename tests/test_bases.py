"""EDoRA around every base layer it wraps (edora_kernels.bases): GPT-2's Conv1D, bitsandbytes
4-bit (nf4, fp4) and 8-bit, torchao int8 weight-only — each against the float64 reference with
W0 = the weight it holds (transposed for Conv1D, dequantized for the quantized ones), with
gradients for x, R and m; the dequantizations a step costs; reload, merge and export per kind;
the refusals.

bitsandbytes and torchao run their layers on CPU, so none of this needs a GPU.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from edora_kernels import (
    EDoRAConfig,
    EDoRALinear,
    apply_edora,
    export_peft_dora,
    get_edora_model,
    load_edora_state_dict,
    merge_and_unload,
    save_edora,
)
from edora_kernels.bench.providers import OneLinear
from edora_kernels.reference import edora_linear_reference

IN, OUT, RANK = 40, 48, 4


def _dense():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def _conv1d():
    from transformers.pytorch_utils import Conv1D
    dense = _dense()
    conv = Conv1D(OUT, IN)
    conv.weight.data = dense.weight.data.T.contiguous()
    conv.bias.data = dense.bias.data.clone()
    return conv


def _bnb(quant, moved=True):
    bnb = pytest.importorskip("bitsandbytes")
    dense = _dense()
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(IN, OUT, quant_type=quant, compute_dtype=torch.float32)
    layer.load_state_dict(dense.state_dict())
    # moving the weight to a device quantizes it; an 8-bit layer never moved quantizes itself
    # at its first forward
    return layer.to("cpu") if moved else layer


def _torchao():
    quantization = pytest.importorskip("torchao.quantization")
    model = OneLinear(_dense())
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model.linear


BASES = {"conv1d": _conv1d, "nf4": lambda: _bnb("nf4"), "fp4": lambda: _bnb("fp4"),
         "int8": lambda: _bnb("int8"), "int8_unmoved": lambda: _bnb("int8", moved=False),
         "torchao_int8": _torchao}
KIND_NAMES = {"conv1d": "conv1d", "nf4": "bnb_4bit", "fp4": "bnb_4bit", "int8": "bnb_8bit",
              "int8_unmoved": "bnb_8bit", "torchao_int8": "torchao_int8"}


def _trained(layer):
    with torch.no_grad():  # away from the start, so that every term moves the output
        layer.R.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        layer.magnitude.mul_(1.1)
    return layer


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("detach_norm", [True, False])
def test_against_the_float64_reference(kind, detach_norm):
    layer = _trained(EDoRALinear.from_linear(BASES[kind](), RANK, seed=0,
                                             detach_norm=detach_norm))
    assert layer.kind.name == KIND_NAMES[kind]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, IN, generator=gen).requires_grad_()
    y = layer(x)
    gy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, (x, layer.R, layer.magnitude), gy)
    w0 = layer.base_weight().double()  # Conv1D: its weight transposed; quantized: dequantized
    d = [t.detach().double().requires_grad_() for t in (x, layer.R, layer.magnitude)]
    expected = edora_linear_reference(d[0], w0, layer.bias.double(), layer.A.double(),
                                      layer.B.double(), d[1], d[2], layer.scaling,
                                      detach_norm=detach_norm)
    assert_close(y, expected, torch.float32, f"{kind} y")
    for name, got, want in zip(("dx", "dR", "dm"), grads,
                               torch.autograd.grad(expected, d, gy.double())):
        assert_close(got, want, torch.float32, f"{kind} {name}")


def test_a_4bit_base_computing_in_bf16_takes_fp32_activations():
    """The QLoRA set-up: a 4-bit base with bf16 compute (bitsandbytes then holds its bias in
    bf16 and casts its output back to the input's fp32); the epilogue takes the bias in the
    output's dtype. y = g ⊙ (y0 − b + s·x Aᵀ Rᵀ Bᵀ) + b with y0 the base's own output."""
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.bfloat16)
    base.load_state_dict(_dense().state_dict())
    layer = _trained(EDoRALinear.from_linear(base.to("cpu"), RANK, seed=0))
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    f64 = [t.detach().double() for t in (layer.base_weight(), layer.bias, layer.A, layer.B,
                                         layer.R, layer.magnitude, x)]
    w0, b, A, B, R, m, x64 = f64
    delta = layer.scaling * B @ R @ A
    g = m / (w0 + delta).norm(dim=1)
    with torch.no_grad():
        y0 = base(x).double()
    expected = g * (y0 - b + x64 @ delta.T) + b
    torch.testing.assert_close(y.detach().double(), expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and layer.R.grad is not None


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_a_step_dequantizes_no_more_than_the_base_layer(quant, monkeypatch):
    """The norm terms come from the dequantized weight once; a step then dequantizes exactly as
    often as the plain base layer's own forward and backward do."""
    functional = pytest.importorskip("bitsandbytes.functional")
    calls = []
    for name in ("dequantize_4bit", "int8_vectorwise_dequant"):
        original = getattr(functional, name)

        def counted(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        monkeypatch.setattr(functional, name, counted)

    def step(module):
        x = torch.randn(5, IN, requires_grad=True)
        module(x).sum().backward()

    base = BASES[quant]()
    step(base)
    calls.clear()
    step(base)
    plain = len(calls)
    layer = EDoRALinear.from_linear(BASES[quant](), RANK, seed=0)
    step(layer)  # the first step computes the norm terms
    calls.clear()
    for _ in range(3):
        step(layer)
    assert len(calls) == 3 * plain


@pytest.mark.parametrize("kind", BASES)
def test_reload_is_exact_and_merge_keeps_the_kind(kind, tmp_path):
    model = OneLinear(BASES[kind]())
    apply_edora(model, ["linear"], RANK, seed=0, progress=False)
    _trained(model.linear)
    x = torch.randn(6, IN)
    y = model(x).detach()
    save_edora(model, tmp_path / "adapter.safetensors")
    fresh = OneLinear(BASES[kind]())
    load_edora_state_dict(fresh, tmp_path / "adapter.safetensors")
    assert torch.equal(fresh(x), y)

    base_type = type(model.linear.base_layer)
    quantization_error = (model.linear.base_layer(x) - F.linear(
        x, model.linear.base_weight(), model.linear.bias)).abs().max()
    dense_error = (model.linear.base_layer(x) - _dense()(x)).abs().max()
    merged = merge_and_unload(model)
    assert type(merged.linear) is base_type
    error = (merged(x) - y).abs().max()
    if kind == "conv1d":
        assert error < 1e-5
    else:  # quantized again: a fresh quantization error, of the size the base itself has
        assert error <= 2 * dense_error + quantization_error + 1e-5


def test_bnb_8bit_float_weights_against_the_float64_dense_computation():
    """bitsandbytes' default 8-bit layer (``has_fp16_weights=True``) keeps its float weight and
    quantizes it afresh at every forward: W0 is that weight (it was once read as int8 data and
    came out ~1/1000 of it), the norm and the merge use it, and the merge gives a layer of the
    same state."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = _dense()
    base = bnb.nn.Linear8bitLt(IN, OUT)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2))
    base(x)  # leaves the scales of its on-the-fly quantization in the layer's state
    layer = _trained(EDoRALinear.from_linear(base, RANK, seed=0))
    assert torch.equal(layer.base_weight(), dense.weight)
    y = layer(x)
    W, b, x64 = dense.weight.double(), dense.bias.double(), x.double()
    A, B, R, m = (t.detach().double() for t in (layer.A, layer.B, layer.R, layer.magnitude))
    V = W + layer.scaling * B @ R @ A
    g = m / V.norm(dim=1)
    # the dense formula, plus the base's own quantization error (its output against x Wᵀ + b)
    base_error = base(x).double() - (x64 @ W.T + b)
    assert_close(y, g * (x64 @ V.T) + b + g * base_error, torch.float32, "y")

    merged = merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is bnb.nn.Linear8bitLt and merged.state.has_fp16_weights
    assert merged.weight.dtype == dense.weight.dtype
    assert_close(merged.weight, g.unsqueeze(1) * V, torch.float32, "merged weight")


@pytest.mark.parametrize("quant_type, blocksize, nested, storage, compute", [
    ("fp4", 128, False, torch.uint8, torch.float32),
    ("nf4", 256, True, torch.bfloat16, torch.bfloat16)])
def test_merge_quantizes_again_with_the_base_4bit_settings(quant_type, blocksize, nested,
                                                           storage, compute):
    """The merged 4-bit layer holds the merged weight quantized exactly as the base was: its
    quant type, block size, nesting, storage and compute dtype (not bitsandbytes' defaults)."""
    bnb = pytest.importorskip("bitsandbytes")
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    dense = nn.Linear(256, 64)
    scheme = {"quant_type": quant_type, "compress_statistics": nested, "quant_storage": storage}
    base = bnb.nn.Linear4bit(256, 64, compute_dtype=compute, **scheme)
    base.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False,
                                    blocksize=blocksize, module=base, **scheme)
    base.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    layer = _trained(EDoRALinear.from_linear(base.to("cpu"), RANK, seed=0))
    expected = functional.quantize_4bit(layer.merged_weight().float(), blocksize=blocksize,
                                        **scheme)
    merged = merge_and_unload(nn.Sequential(layer))[0]
    state = merged.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == (quant_type, blocksize, nested)
    assert merged.weight.dtype == storage and merged.compute_dtype == compute
    assert torch.equal(functional.dequantize_4bit(merged.weight.data, state),
                       functional.dequantize_4bit(*expected))


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao_int8"])
def test_merge_in_place_is_refused_for_a_quantized_base(kind):
    layer = EDoRALinear.from_linear(BASES[kind](), RANK, seed=0)
    with pytest.raises(RuntimeError, match="quantized again.*merge_and_unload"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize("mode", ["peft", "lowrank"])
def test_dropout_on_a_quantized_base(mode):
    """PEFT's semantics on a quantized base run it on the dropped input too:
    y = base(x) + (g − 1)⊙(x̃W0ᵀ) + g⊙s·x̃AᵀPᵀ; "lowrank" drops the rank-r branch's input only."""
    layer = _trained(EDoRALinear.from_linear(BASES["nf4"](), RANK, seed=0, dropout=0.3,
                                             dropout_mode=mode))
    x = torch.randn(9, IN)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_drop = F.dropout(x, 0.3, training=True)
    w0, b = layer.base_weight(), layer.bias
    P = layer.B @ layer.R.detach()
    g = layer.magnitude.detach() / (w0 + layer.scaling * P @ layer.A).norm(dim=1)
    low = layer.scaling * x_drop @ layer.A.T @ P.T
    if mode == "peft":
        expected = x @ w0.T + b + (g - 1) * (x_drop @ w0.T) + g * low
    else:
        expected = g * (x @ w0.T + low) + b
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                      n_positions=16)).eval()


def test_gpt2_conv1d_model_end_to_end(tmp_path):
    """GPT-2's c_attn, c_proj and c_fc: wrapped (W0 read through a view, never copied),
    exported to PEFT DoRA with fan_in_fan_out, merged into Conv1D layers that plain transformers
    reloads."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    base = _tiny_gpt2()
    source = copy.deepcopy(base)
    c_attn = source.transformer.h[0].attn.c_attn
    model = get_edora_model(source, EDoRAConfig(r=4, target_modules=["c_attn", "c_proj",
                                                                      "c_fc"]))
    layer = source.transformer.h[0].attn.c_attn
    assert layer.base_layer is c_attn and layer.kind.name == "conv1d"
    for module in source.modules():
        if isinstance(module, EDoRALinear):
            _trained(module)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    y = model(ids).logits.detach()

    export_peft_dora(model, tmp_path / "peft")
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        assert '"fan_in_fan_out": true' in f.read()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(ids).logits, y, rtol=1e-5, atol=1e-5)

    merged = merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(plain(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_qlora_style_model_from_a_lora_config(tmp_path):
    """A model whose linears are 4-bit, adapted from a LoraConfig (QLoRA's workflow): trains,
    saves, reloads into a fresh 4-bit model bit-exactly."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig

    def quantized_model():
        torch.manual_seed(0)  # bitsandbytes' CPU 4-bit kernel takes multiples of 64
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        for i in (0, 2):
            q = bnb.nn.Linear4bit(*reversed(model[i].weight.shape), compute_dtype=torch.float32)
            q.load_state_dict(model[i].state_dict())
            model[i] = q.to("cpu")
        return model

    config = EDoRAConfig.from_lora_config(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                     target_modules=["0", "2"]))
    model = get_edora_model(quantized_model(), config)
    x = torch.randn(8, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)
    from edora_kernels import EDoRAModel
    reloaded = EDoRAModel.from_pretrained(quantized_model(), tmp_path)
    assert not reloaded.training
    # bitsandbytes' CPU layer computes inference (no grad) with another kernel, on a weight it
    # repacks at the first such call: compare inference with inference, after one call each
    with torch.no_grad():
        model(x), reloaded(x)
        assert torch.equal(reloaded(x), model(x))


def test_unsupported_modules_are_named_with_their_weight_type():
    mha = nn.MultiheadAttention(16, 2)  # out_proj: an nn.Linear subclass whose weight is read
    with pytest.raises(ValueError, match=r"out_proj \(torch.nn.modules.linear."
                       r"NonDynamicallyQuantizableLinear, weight torch.nn.parameter.Parameter\)"
                       r".*EDoRA wraps torch.nn.Linear"):
        apply_edora(nn.ModuleDict({"attn": mha}), ["out_proj"], 2, progress=False)


def test_models_built_under_the_meta_device(tmp_path):
    """Apply on meta, forward on meta, then to_empty + the base model's own checkpoint + the
    adapter file reproduce the source model exactly (the flow of FSDP2's meta initialisation and
    accelerate's empty weights)."""
    def model_():
        return nn.Sequential(nn.Linear(IN, OUT), nn.GELU(), nn.Linear(OUT, IN))

    torch.manual_seed(0)
    source = model_()
    base_state = {k: v.clone() for k, v in source.state_dict().items()}
    apply_edora(source, ["0", "2"], 4, seed=0, progress=False)
    for module in source.modules():
        if isinstance(module, EDoRALinear):
            _trained(module)
    save_edora(source, os.path.join(tmp_path, "adapter.safetensors"))
    x = torch.randn(2, 9, IN)
    expected = source(x)

    with torch.device("meta"):
        model = model_()
    apply_edora(model, ["0", "2"], 4, seed=0, progress=False)
    out = model(x.to("meta"))
    assert out.device.type == "meta" and out.shape == expected.shape
    model.to_empty(device="cpu")
    # the unadapted model's checkpoint (keys weight, bias) fills the base layers; the adapter
    # comes from its own file
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"{n}.{t}" for n in ("0", "2")
                                     for t in ("A", "B", "R", "magnitude"))
    load_edora_state_dict(model, os.path.join(tmp_path, "adapter.safetensors"))
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("nested", [True, False])
def test_bnb_4bit_cpu_inference_layout(nested):
    """bitsandbytes re-lays a 4-bit weight out for its CPU inference kernel at an eval-mode
    forward without grad (AVX512-BF16 CPUs), rounding the block scales to bf16. A wrapped base
    never re-lays; one re-laid before wrapping (evaluate, then apply EDoRA, then train) is put
    back in the standard layout — with unnested scales too, which bitsandbytes' own inverse
    leaves transposed — and the layer matches the reference on the weight it then holds."""
    functional = pytest.importorskip("bitsandbytes.functional")
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32,
                             compress_statistics=nested)
    base.load_state_dict(nn.Linear(128, 64).state_dict())
    base = base.to("cpu")
    weight = base.weight
    before = functional.dequantize_4bit(weight.data, weight.quant_state)
    # the re-layout (done by hand: it needs 32-row blocks of 64-column quantization blocks)
    weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state)
    layer = _trained(EDoRALinear.from_linear(base, RANK, seed=0))
    assert not weight.quant_state.packing_format_for_cpu
    assert not base.support_avx512bf16_for_cpu  # eval forwards compute as training does
    w0 = layer.base_weight()
    # every element within the bf16 rounding of its block's scale (scales left transposed
    # would put errors of the weight's own size on most elements)
    torch.testing.assert_close(w0, before, rtol=2.0 ** -8, atol=1e-7)
    x = torch.randn(6, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    expected = edora_linear_reference(x.detach().double(), w0.double(), layer.bias.double(),
                                      layer.A.double(), layer.B.double(),
                                      layer.R.detach().double(),
                                      layer.magnitude.detach().double(), layer.scaling)
    assert_close(y, expected, torch.float32, "y")
    # a caller re-laying the weight behind the layer's back: put back before the next forward
    weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state)
    assert_close(layer(x), y, torch.bfloat16, "y after a second re-layout")
    assert not weight.quant_state.packing_format_for_cpu
