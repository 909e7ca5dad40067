"""Leaving EDoRA: merge_and_unload / unload give plain nn.Linear models (a torch.save of the
state dict loads into the untouched architecture), and export_peft_dora gives a directory that
stock PEFT loads as DoRA with the same outputs."""
import pytest
import torch
from torch import nn

from edora_kernels import (
    EDoRALinear,
    apply_edora,
    export_peft_dora,
    merge_and_unload,
    unload,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"query": nn.Linear(16, 12), "value": nn.Linear(16, 12)})
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder["query"](x) + self.encoder["value"](x)))


def trained(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    apply_edora(model, ["query", "value"], 4, seed=seed, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.normal_(0, 0.3)
                layer.magnitude.mul_(1.1)
    return model


def test_merge_and_unload_gives_plain_linears_with_the_same_outputs():
    model = trained()
    x = torch.randn(7, 16)
    with torch.no_grad():
        expected = model(x)
    w0 = model.encoder["query"].weight.detach().clone()
    merge_and_unload(model)
    assert not any(isinstance(m, EDoRALinear) for m in model.modules())
    assert type(model.encoder["query"]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    fresh = Tiny()
    fresh.load_state_dict(model.state_dict())  # the untouched architecture, strict
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.encoder["query"].weight, w0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_unpickled_model_merges_and_unloads(how, tmp_path):
    """A layer's base kind survives copy.deepcopy and torch.save(model): merge_and_unload of
    the copy rebuilds plain nn.Linear layers (a copied kind once compared unequal to every
    kind, and the copy was taken for an 8-bit bitsandbytes layer)."""
    import copy

    model = trained()
    x = torch.randn(7, 16)
    with torch.no_grad():
        expected = model(x)
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    merge_and_unload(copied)
    assert type(copied.encoder["query"]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(copied(x), expected, rtol=1e-5, atol=1e-6)


def test_unload_restores_the_base_model():
    torch.manual_seed(0)
    base = Tiny()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = base(x)
    apply_edora(base, ["query"], 2, seed=0, progress=False)
    base.encoder["query"].merge()  # even merged, unload gives back W0
    unload(base)
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)


def test_export_loads_in_stock_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = trained()
    x = torch.randn(6, 16)
    with torch.no_grad():
        expected = model(x)
    export_peft_dora(model, tmp_path)
    torch.manual_seed(0)
    base = Tiny()  # the same base weights (same seed)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    assert peft_model.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_rebuilt_layers_keep_the_model_training_mode(training):
    """A rebuilt layer (merge_and_unload; unload of a merged layer) is in the mode of the layer
    it replaces, not a fresh layer's training mode (in which an 8-bit bitsandbytes layer
    computes differently)."""
    model = trained().train(training)
    merge_and_unload(model)
    assert all(m.training == training for m in model.modules())
    model = trained().train(training)
    model.encoder["query"].merge()
    unload(model)
    assert all(m.training == training for m in model.modules())


def _mixed_model(which):
    """A base model whose targets mix GPT-2 Conv1D and nn.Linear layers, in either order: the
    targets, an input, and the output to compare."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if which == "gpt2":  # Conv1D layers, then the nn.Linear lm_head
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16)).eval()
        return (model, ["c_attn", "lm_head"], torch.randint(0, 100, (2, 8), generator=gen),
                lambda out: out.logits)
    model = nn.Sequential(nn.Linear(16, 12), transformers.pytorch_utils.Conv1D(12, 12),
                          nn.Linear(12, 5))
    return model, ["0", "1", "2"], torch.randn(3, 16, generator=gen), lambda out: out


@pytest.mark.parametrize("which", ["gpt2", "linear_first"])
def test_export_mixing_conv1d_and_linear_layers(which, tmp_path):
    """GPT-2 Conv1D and nn.Linear layers (GPT-2's lm_head) in one adapter: fan_in_fan_out is
    written for the Conv1D layers and stock PEFT sets it per layer by the layer's type."""
    peft = pytest.importorskip("peft")
    model, targets, x, output = _mixed_model(which)
    apply_edora(model, targets, 4, seed=0, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.normal_(0, 0.3)
                layer.magnitude.mul_(1.1)
        expected = output(model(x))
    export_peft_dora(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(_mixed_model(which)[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(peft_model(x)), expected, rtol=1e-5, atol=1e-5)


def test_export_refusal_writes_nothing(tmp_path):
    from pathlib import Path

    with pytest.raises(TypeError, match="base_model_name_or_path must be a str"):
        export_peft_dora(trained(), tmp_path / "out", base_model_name_or_path=Path("base"))
    assert not (tmp_path / "out").exists()
