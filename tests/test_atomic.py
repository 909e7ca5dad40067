"""apply_edora, the PEFT bridge and load_edora_state_dict validate everything first: on any error
the model is exactly as before, and the message names what is wrong."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edora_kernels import (
    EDoRALinear,
    apply_edora,
    edora_state_dict,
    load_edora_state_dict,
    save_edora,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(12, 10)
        self.value = nn.Linear(12, 10)
        self.out = nn.Linear(10, 12)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Module()
    model.first, model.second = Block(), Block()
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, before):
    state, types = snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys()
    for k in state:
        torch.testing.assert_close(state[k], before[0][k], rtol=0, atol=0, equal_nan=True,
                                   msg=k)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(dropout=1.5), ValueError, "dropout must be in"),
    (dict(backend="cutlass"), ValueError, "backend must be one of"),
    (dict(dropout_mode="all"), ValueError, "dropout_mode must be one of"),
    (dict(alpha=math.nan), ValueError, "alpha must be a finite number"),
    (dict(alpha=math.inf), ValueError, "alpha must be a finite number"),
    (dict(split="half"), ValueError, "split must be one of"),
    (dict(rank=11), ValueError, "rank 11 exceeds"),
    (dict(target_modules=None), TypeError, "target_modules must be a regex string"),
    (dict(target_modules="query("), ValueError, "not a valid regular expression"),
    (dict(target_modules=[]), TypeError, "non-empty list"),
])
def test_apply_refuses_bad_options_without_touching_the_model(kwargs, error, words):
    model = make_model()
    before = snapshot(model)
    args = {"target_modules": ["query", "value"], "rank": 2, **kwargs}
    with pytest.raises(error, match=words):
        apply_edora(model, args.pop("target_modules"), args.pop("rank"), progress=False, **args)
    assert_unchanged(model, before)


def test_nan_in_the_second_target_leaves_the_first_untouched():
    model = make_model()
    with torch.no_grad():
        model.second.value.weight[3, 4] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"second\.value.*NaN"):
        apply_edora(model, ["query", "value"], 2, progress=False)
    assert_unchanged(model, before)


def test_a_module_registered_twice_becomes_one_shared_layer():
    model = make_model()
    model.tied = model.first.query  # the same module under a second name
    summary = apply_edora(model, ["first.query"], 2, progress=False)
    assert isinstance(model.first.query, EDoRALinear) and model.tied is model.first.query
    assert {"first.query", "tied"} <= set(summary.layers)
    x = torch.randn(3, 12)
    assert torch.equal(model.tied(x), model.first.query(x))


def test_merge_refuses_a_weight_tied_to_another_parameter():
    """An lm_head tied to the embedding: merging in place would change the embedding too."""
    model = nn.Module()
    model.embed = nn.Embedding(10, 12)
    model.head = nn.Linear(12, 10, bias=False)
    model.head.weight = model.embed.weight
    apply_edora(model, ["head"], 2, progress=False)
    assert model.head.tied_to == ["embed.weight"]
    before = model.embed.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"tied to \['embed.weight'\].*untie it first"):
        model.head.merge()
    assert torch.equal(model.embed.weight, before) and not model.head.merged
    model.head.weight = nn.Parameter(model.head.weight.detach().clone(), requires_grad=False)
    model.head.merge()
    assert torch.equal(model.embed.weight, before) and model.head.merged


def test_alpha_nan_refused_at_construction():
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        EDoRALinear(nn.Linear(8, 8), 2, alpha=math.nan)


# --- loading ---------------------------------------------------------------------------------

@pytest.fixture
def adapted():
    model = make_model()
    apply_edora(model, ["query", "value"], 2, seed=0, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.normal_()
    return model


@pytest.mark.parametrize("bad, words", [
    (lambda t: t.numpy(), "a ndarray, not a torch.Tensor"),
    (lambda t: torch.empty_like(t, device="meta"), "a meta tensor"),
    (lambda t: t.clone().fill_(math.nan), "contains NaN or Inf"),
    (lambda t: t.clone().fill_(math.inf), "contains NaN or Inf"),
    (lambda t: t.to(torch.int64), "dtype torch.int64 is not floating point"),
])
def test_load_refuses_bad_tensors_by_name(adapted, bad, words):
    state = {k: v.clone() for k, v in edora_state_dict(adapted).items()}
    key = "second.value.R"
    state[key] = bad(state[key])
    before = snapshot(adapted)
    with pytest.raises(ValueError, match=rf"{key}: {words}"):
        load_edora_state_dict(adapted, state)
    assert_unchanged(adapted, before)
    assert isinstance(state[key], (np.ndarray, torch.Tensor))


def _write(path, tensors, metadata):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@pytest.mark.parametrize("edit, words", [
    (lambda meta: meta.pop("edora_config"), "no 'edora_config'"),
    (lambda meta: meta.update(edora_config="{not json"), "not the JSON save_edora writes"),
    (lambda meta: meta.update(edora_config=json.dumps({"nolayers": 1})),
     "not the JSON save_edora writes"),
    (lambda meta: meta.update(edora_config=json.dumps(
        {"layers": {"first.query": {"rank": 2, "alpha": "16", "dropout": 0.0,
                                    "detach_norm": True}}})), "alpha must be a finite number"),
    (lambda meta: meta.update(edora_config=json.dumps(
        {"layers": {"first.query": {"rank": 2.5, "alpha": 16, "dropout": 0.0,
                                    "detach_norm": True}}})), "rank must be an int"),
])
def test_damaged_files_are_refused_clearly(adapted, tmp_path, edit, words):
    path = tmp_path / "adapter.safetensors"
    save_edora(adapted, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    edit(metadata)
    _write(path, edora_state_dict(adapted), metadata)
    fresh = make_model()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=words):
        load_edora_state_dict(fresh, path)
    assert_unchanged(fresh, before)


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_edora_state_dict(make_model(), path)


def test_file_round_trip_rebuilds_a_plain_model_exactly(adapted, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(adapted, path)
    fresh = make_model()
    load_edora_state_dict(fresh, path)
    x = torch.randn(4, 12)
    for name in ("first.query", "second.value"):
        assert torch.equal(fresh.get_submodule(name)(x), adapted.get_submodule(name)(x))


# --- the PEFT bridge -------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _bridge(model, **fields):
    from edora_kernels.integrations.peft import apply_edora_from_lora_config
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], **fields)
    return apply_edora_from_lora_config(model, config, progress=False)


@pytest.mark.parametrize("fields, words", [
    (dict(modules_to_save=["nonexistent_head"]), "modules_to_save entries"),
    (dict(layer_replication=[(0, 1)]), "LoraConfig.layer_replication="),
    (dict(trainable_token_indices=[1, 2]), "LoraConfig.trainable_token_indices="),
    (dict(init_lora_weights="gaussian"), "LoraConfig.init_lora_weights="),
])
def test_bridge_refuses_before_changing_the_model(fields, words):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=words):
        _bridge(model, **fields)
    assert_unchanged(model, before)


def test_bridge_inference_mode_freezes_the_adapters():
    model = make_model()
    summary = _bridge(model, inference_mode=True)
    assert summary.trainable_params == 0
    assert not any(p.requires_grad for p in model.parameters())
