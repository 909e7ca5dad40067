"""The base layers an EDoRA layer can wrap, and what it needs of each (docs/DESIGN.md §11).

A kind is recognised without importing its library (a model can only hold a transformers or
bitsandbytes module once that library is imported):

- ``linear``: a plain ``nn.Linear`` — W0 is its weight; the fused op computes the layer.
- ``conv1d``: transformers' ``Conv1D`` (GPT-2) — W0 is its weight transposed, a view with
  strides (no copy); the fused op as for ``linear``.
- ``bnb_4bit``, ``bnb_8bit``: bitsandbytes ``Linear4bit`` (nf4/fp4) and ``Linear8bitLt``;
  ``torchao_int8``: an ``nn.Linear`` whose weight torchao replaced by an int8 weight-only tensor.
  The base layer's own forward gives ``y0 = base(x)`` and the epilogue op adds the adapter; W0
  is dequantized only to compute the norm terms (once, and again only when the base changes).
  An 8-bit layer with ``has_fp16_weights`` (bitsandbytes' default) keeps a float weight that
  every forward quantizes afresh: W0 is that weight.

Anything else is refused, naming the module, its type, its weight's type and the kinds above
(``SUPPORTED``).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Kind:
    name: str
    dense: bool        # W0 is a plain tensor of the module: the fused op
    description: str

    # One object per kind, compared with ``is``: a copied or unpickled layer keeps it.
    def __copy__(self) -> "Kind":
        return self

    def __deepcopy__(self, memo) -> "Kind":
        return self

    def __reduce__(self):
        return _kind_named, (self.name,)


LINEAR = Kind("linear", True, "torch.nn.Linear")
CONV1D = Kind("conv1d", True, "transformers.pytorch_utils.Conv1D (GPT-2's layout: weight in×out)")
BNB_4BIT = Kind("bnb_4bit", False, "bitsandbytes.nn.Linear4bit (nf4, fp4)")
BNB_8BIT = Kind("bnb_8bit", False, "bitsandbytes.nn.Linear8bitLt")
TORCHAO_INT8 = Kind("torchao_int8", False,
                    "torch.nn.Linear with a torchao int8 weight-only weight (Int8WeightOnlyConfig)")
KINDS = (LINEAR, CONV1D, BNB_4BIT, BNB_8BIT, TORCHAO_INT8)


def _kind_named(name: str) -> Kind:
    return next(kind for kind in KINDS if kind.name == name)


def _loaded(module_name: str):
    return sys.modules.get(module_name)


def _is_torchao_int8(weight) -> bool:
    torchao = _loaded("torchao.quantization")
    int8 = getattr(torchao, "Int8Tensor", None) if torchao is not None else None
    return int8 is not None and isinstance(weight, int8)


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of ``module`` as a base layer, or None when EDoRA cannot wrap it."""
    bnb = _loaded("bitsandbytes.nn")
    if bnb is not None:
        if isinstance(module, bnb.Linear4bit):
            return BNB_4BIT
        if isinstance(module, bnb.Linear8bitLt):
            return BNB_8BIT
    pytorch_utils = _loaded("transformers.pytorch_utils")
    if pytorch_utils is not None and type(module) is pytorch_utils.Conv1D:
        return CONV1D
    # nn.Linear subclasses (nn.MultiheadAttention's out_proj, whose weight is read directly)
    # are not wrapped: the swap would be silently ignored.
    if type(module) is nn.Linear:
        weight = module.weight
        if type(weight) in (torch.Tensor, nn.Parameter):
            return LINEAR
        if _is_torchao_int8(weight):
            return TORCHAO_INT8
    return None


SUPPORTED = "EDoRA wraps " + "; ".join(k.description for k in KINDS)


def unsupported(name: str, module: nn.Module) -> str:
    """``module`` (registered as ``name``) described for an error: its type and its weight's
    (torchao keeps the module an ``nn.Linear`` and swaps the weight). Follow it with
    ``SUPPORTED``."""
    weight = getattr(module, "weight", None)
    weight_type = ("" if weight is None
                   else f", weight {type(weight).__module__}.{type(weight).__name__}")
    return f"{name} ({type(module).__module__}.{type(module).__name__}{weight_type})"


def features(module: nn.Module, kind: Kind) -> tuple[int, int]:
    """(in_features, out_features)."""
    if kind is CONV1D:
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def dense_weight(module: nn.Module, kind: Kind) -> torch.Tensor:
    """W0 (out×in) of a dense base: the weight itself, or Conv1D's transposed (a view)."""
    return module.weight.T if kind is CONV1D else module.weight


def _float_8bit(module: nn.Module, kind: Kind) -> bool:
    """A bitsandbytes 8-bit layer with ``has_fp16_weights``: its weight stays float and every
    forward quantizes it afresh (never stored as int8)."""
    return kind is BNB_8BIT and module.state.has_fp16_weights


def stamped_weight(module: nn.Module, kind: Kind) -> torch.Tensor:
    """A plain tensor whose storage and version change whenever W0 does (what the norm cache
    stamps): the weight, or the quantized data beneath it."""
    if kind.dense:
        return dense_weight(module, kind)
    if _float_8bit(module, kind):
        return module.weight  # not .data: that has its own version counter
    if kind is TORCHAO_INT8:
        return module.weight.qdata
    return module.weight.data  # bitsandbytes: the packed or int8 data


def dequantized_weight(module: nn.Module, kind: Kind) -> torch.Tensor:
    """W0 (out×in) as a dense tensor: a view for dense bases, the weight itself for a float
    8-bit one, dequantized otherwise."""
    weight = module.weight
    if kind.dense:
        return dense_weight(module, kind)
    if kind is TORCHAO_INT8:
        return weight.dequantize()
    import bitsandbytes.functional as bnb_f

    if kind is BNB_4BIT:
        data, state = weight.data, weight.quant_state
        if _cpu_packed(weight):  # on copies: the layer keeps its layout
            data, state = _standard_layout(data.clone(), copy.deepcopy(state))
        return bnb_f.dequantize_4bit(data, state)
    if _float_8bit(module, kind):
        return weight
    if weight.dtype != torch.int8:
        # Not quantized yet (never moved to a device): its first forward quantizes it, from
        # fp16 as here, and W0 is what that gives.
        data, scales, _ = bnb_f.int8_vectorwise_quant(weight.data.to(torch.float16))
        return bnb_f.int8_vectorwise_dequant(data, scales)
    # The row scales move from the weight to the layer's state at its first forward.
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return bnb_f.int8_vectorwise_dequant(weight.data, scales)


def _cpu_packed(weight) -> bool:
    return getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)


def _standard_layout(data: torch.Tensor, state):
    """A 4-bit weight bitsandbytes re-laid out for its CPU inference kernel, back in the layout
    its training path and ``dequantize_4bit`` read. bitsandbytes' own inverse leaves unnested
    block scales transposed (bitsandbytes 0.50): they are put back here. The scales stay as the
    re-layout rounded them (bf16): that change of W0 cannot be undone."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    if not nested:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def prepare_base(module: nn.Module, kind: Kind) -> None:
    """Keep a bitsandbytes 4-bit base in its standard layout. On AVX512-BF16 CPUs an eval-mode
    forward without grad re-lays the weight out for a bf16 inference kernel — rounding the
    block scales to bf16, a silent change of W0, after which a forward on an input that
    requires grad fails (evaluate, then train). A wrapped base does not re-lay (its eval
    forward computes as training does); a weight re-laid before wrapping, or by a caller
    re-enabling it, is put back before the next forward."""
    if kind is not BNB_4BIT:
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if _cpu_packed(weight):
        weight.data, weight.quant_state = _standard_layout(weight.data, weight.quant_state)


def weight_dtype(module: nn.Module, kind: Kind) -> torch.dtype:
    """The dtype the layer computes in: W0's, or the quantized base's compute dtype."""
    if kind.dense:
        return module.weight.dtype
    if kind is BNB_4BIT:
        return module.compute_dtype or torch.float32
    if kind is TORCHAO_INT8 or _float_8bit(module, kind):
        return module.weight.dtype
    return module.bias.dtype if module.bias is not None else torch.float32


def rebuilt(module: nn.Module, kind: Kind, weight: torch.Tensor) -> nn.Module:
    """A new base layer of ``module``'s kind holding ``weight`` (out×in, dense) as W0 and the
    same bias: Linear and Conv1D exactly, quantized kinds quantized again with the base's own
    settings (a fresh quantization error, of the scheme's size)."""
    bias = None if module.bias is None else module.bias.detach()
    in_f, out_f = weight.shape[1], weight.shape[0]
    device = weight.device
    if kind is CONV1D:
        new = type(module)(out_f, in_f)
        new.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return new
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
    if kind is LINEAR:
        return linear
    if kind is TORCHAO_INT8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
        return linear
    import bitsandbytes as bnb

    # Built on meta and given the new weight on the CPU: moving it to a device quantizes it.
    if kind is BNB_4BIT:
        old = module.weight
        scheme = {"compress_statistics": old.compress_statistics, "quant_type": old.quant_type,
                  "quant_storage": old.quant_storage}
        new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None,
                                compute_dtype=module.compute_dtype, device="meta", **scheme)
        new.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32),
                                       requires_grad=False, blocksize=old.blocksize,
                                       module=new, **scheme)
        # As the wrapped base (prepare_base): no bf16 re-layout, which bitsandbytes 0.50
        # would also undo wrongly when saving an unnested weight.
        new.support_avx512bf16_for_cpu = module.support_avx512bf16_for_cpu
    else:
        fp16_weights = module.state.has_fp16_weights
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None,
                                  has_fp16_weights=fp16_weights,
                                  threshold=module.state.threshold, device="meta")
        new.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False,
                                       has_fp16_weights=fp16_weights)
    if bias is not None:
        new.bias = nn.Parameter(bias.cpu().clone(), requires_grad=False)
    return new.to(device)
