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
