"""``apply_edora_from_lora_config``: a PEFT LoraConfig carried over to EDoRA."""
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from edora_kernels import EDoRALinear, apply_edora  # noqa: E402
from edora_kernels.integrations.peft import apply_edora_from_lora_config  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def edora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, EDoRALinear)}


def test_targets_rank_alpha_dropout_carry_over():
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                             target_modules=["q_proj", "v_proj"])
    summary = apply_edora_from_lora_config(model, config, seed=0, progress=False)
    layers = edora_layers(model)
    assert sorted(layers) == sorted(summary.layers) and len(layers) == 4
    assert all(n.endswith(("q_proj", "v_proj")) for n in layers)
    layer = next(iter(layers.values()))
    assert (layer.rank, layer.scaling, layer.dropout) == (4, 2.0, 0.1)
    assert summary.trainable_params == sum(m.out_features + 16 for m in layers.values())
    out = model(torch.randint(0, 64, (2, 5))).logits
    assert out.shape == (2, 5, 64) and torch.isfinite(out).all()


def test_all_linear_skips_the_head_and_honours_excludes():
    model = tiny_llama()
    config = peft.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["down_proj"])
    apply_edora_from_lora_config(model, config, seed=0, progress=False)
    layers = edora_layers(model)
    assert "lm_head" not in layers
    assert not any(n.endswith("down_proj") for n in layers)
    assert len(layers) == 2 * 6  # q, k, v, o, gate, up per block


def test_rslora_scaling_and_modules_to_save():
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"],
                             modules_to_save=["lm_head"])
    apply_edora_from_lora_config(model, config, seed=0, progress=False)
    layer = next(iter(edora_layers(model).values()))
    assert math.isclose(layer.scaling, 8 / math.sqrt(4))
    assert model.lm_head.weight.requires_grad


@pytest.mark.parametrize("field, value", [
    ("layer_replication", [(0, 1)]), ("layers_to_transform", [0]), ("bias", "all"),
])
def test_unsupported_fields_are_refused_by_name(field, value):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], **{field: value})
    with pytest.raises(ValueError, match=f"LoraConfig.{field}="):
        apply_edora_from_lora_config(tiny_llama(), config, progress=False)


def test_no_match_lists_the_linear_layers():
    config = peft.LoraConfig(r=2, target_modules=["query"])
    with pytest.raises(ValueError, match="selects no layer EDoRA can wrap.*q_proj"):
        apply_edora_from_lora_config(tiny_llama(), config, progress=False)


# --- which modules are selected: PEFT's own get_peft_model is the oracle ---------------------


class Nested(nn.Module):
    """Two linears named "b", one nested under the other's path: "a.b" and "x.a.b"."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(8, 8)
        self.x = nn.Module()
        self.x.a = nn.Module()
        self.x.a.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)


def peft_selection(make, config):
    from peft.tuners.lora import LoraLayer
    wrapped = peft.get_peft_model(make(), config)
    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in wrapped.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("make, targets, exclude", [
    (tiny_llama, r".*\.(q|v)_proj", None),
    (tiny_llama, r"model\.layers\.0\..*_proj", None),
    (tiny_llama, ["q_proj", "mlp.up_proj"], None),
    (tiny_llama, ["layers.1.self_attn.k_proj"], None),
    (tiny_llama, ["q_proj", "k_proj"], ["layers.0.self_attn.k_proj"]),
    (tiny_llama, r".*_proj", r".*\.1\..*"),
    (Nested, ["b"], None),
    (Nested, ["a.b"], None),  # "x.a.b" ends in ".a.b": selected too
    (Nested, r"a\.b", None),  # a string matches the whole name: "x.a.b" is not selected
    (Nested, ["b"], ["x.a.b"]),  # excluding "x.a.b" must not exclude "a.b", nor the reverse
])
def test_selection_matches_peft(make, targets, exclude):
    config = peft.LoraConfig(r=2, target_modules=targets, exclude_modules=exclude)
    expected = peft_selection(make, config)
    model = make()
    summary = apply_edora_from_lora_config(model, config, seed=0, progress=False)
    assert sorted(edora_layers(model)) == sorted(summary.layers) == expected
    if exclude is None:  # apply_edora takes target_modules by the same rule
        model = make()
        apply_edora(model, targets, 2, seed=0, progress=False)
        assert sorted(edora_layers(model)) == expected


def test_a_string_is_not_a_substring_search():
    config = peft.LoraConfig(r=2, target_modules="q_proj")
    with pytest.raises(ValueError, match="selects no layer EDoRA can wrap"):
        apply_edora_from_lora_config(tiny_llama(), config, progress=False)
    with pytest.raises(ValueError, match="matched no module"):
        apply_edora(tiny_llama(), "q_proj", 2, progress=False)
