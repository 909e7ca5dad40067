"""Per-layer ranks and alphas (``rank_pattern`` / ``alpha_pattern``): PEFT's matching rule on
real model names, one batched factorisation per shape group, and the pattern kept through
save/load, the LoraConfig converter and the PEFT DoRA export."""
import copy

import pytest
import torch
from helpers import tiny_bert_classifier

from edora_kernels import (
    EDoRAConfig,
    EDoRALinear,
    EDoRAModel,
    apply_edora,
    export_peft_dora,
    get_edora_model,
)
from edora_kernels.adapter_io import edora_layers
from edora_kernels.checks import pattern_value

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["query", "key", "value", "dense"]
RANKS = {"query": 8, r"layer\.1\..*value": 2, "output.dense": 6}
ALPHAS = {"key": 4.0, "attention.output.dense": 32.0}
IDS = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))


def _ranks(model):
    return {n: (m.rank, m.alpha) for n, m in model.named_modules() if isinstance(m, EDoRALinear)}


def test_pattern_matching_is_peft_s_on_real_model_names():
    from peft.utils.other import get_pattern_key

    names = [n for n, _ in tiny_bert_classifier().named_modules() if n]
    for pattern in (RANKS, ALPHAS, {"dense": 1, "output.dense": 2}, {"layer.0": 3}):
        for name in names:
            key = get_pattern_key(pattern.keys(), name)
            assert pattern_value(name, pattern, None) == pattern.get(key), (pattern, name)


def test_per_layer_ranks_as_peft_assigns_them_from_the_same_lora_config():
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern=RANKS,
                           alpha_pattern=ALPHAS, task_type="SEQ_CLS")
    reference = peft.get_peft_model(tiny_bert_classifier(), lora)
    peft_layers = {n.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
                   for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    model = get_edora_model(tiny_bert_classifier(), EDoRAConfig.from_lora_config(lora))
    ours = {n.removeprefix("base_model.model."): v for n, v in _ranks(model).items()}
    assert ours == peft_layers
    assert len(set(r for r, _ in ours.values())) == 4  # 2, 4, 6 and 8: the patterns did work


def test_one_batched_factorisation_per_shape_group(monkeypatch):
    from edora_kernels import model as model_module

    calls = []
    original = model_module.edora_factors

    def counted(stack, rank, **kwargs):
        calls.append((tuple(stack.shape), rank))
        return original(stack, rank, **kwargs)

    monkeypatch.setattr(model_module, "edora_factors", counted)
    model = tiny_bert_classifier()
    summary = apply_edora(model, TARGETS, 4, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                          seed=0, progress=False, init="svd")
    # 32×32 (q, k, v, attention.output.dense, the pooler), 48×32 and 32×48 (the FFN): three
    # groups, each factorised once at its largest rank
    assert sorted(calls) == sorted([((9, 32, 32), 8), ((2, 48, 32), 4), ((2, 32, 48), 6)])
    assert "ranks 2-8" in str(summary) and "alphas 4-32" in str(summary)
    # a smaller rank takes the leading directions of its group's factorisation: the same
    # projection U_r U_rᵀ W0 as a rank-2 factorisation of that weight alone
    value = model.bert.encoder.layer[1].attention.self.value
    alone = EDoRALinear.from_linear(copy.deepcopy(value.base_layer), 2, init="svd")
    assert value.rank == 2
    torch.testing.assert_close(value.B @ value.A, alone.B @ alone.A, rtol=1e-4, atol=1e-5)


def test_per_layer_ranks_survive_save_load_and_export(tmp_path):
    config = EDoRAConfig(r=4, alpha=8.0, target_modules=TARGETS, rank_pattern=RANKS,
                         alpha_pattern=ALPHAS, task_type="SEQ_CLS", seed=0)
    model = get_edora_model(tiny_bert_classifier(), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "edora")
    restored = EDoRAModel.from_pretrained(tiny_bert_classifier(), tmp_path / "edora")
    assert _ranks(restored) == _ranks(model)
    assert restored.edora_config.rank_pattern == RANKS
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS).logits, expected)
    export_peft_dora(model, tmp_path / "peft")
    as_peft = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "peft")
    assert as_peft.peft_config["default"].rank_pattern
    with torch.no_grad():
        torch.testing.assert_close(as_peft(input_ids=IDS).logits, expected, rtol=1e-5,
                                   atol=1e-5)


def test_pattern_refusals():
    model = tiny_bert_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank_pattern\['query'\]: rank must be an int >= 1"):
        apply_edora(model, TARGETS, 4, rank_pattern={"query": 0}, progress=False)
    with pytest.raises(ValueError, match=r"rank_pattern key '\(' is not a valid regex"):
        apply_edora(model, TARGETS, 4, rank_pattern={"(": 2}, progress=False)
    with pytest.raises(ValueError, match=r"rank 40 exceeds .*query"):
        apply_edora(model, TARGETS, 4, rank_pattern={"query": 40}, progress=False)
    with pytest.raises(ValueError, match=r"alpha_pattern\['key'\]"):
        apply_edora(model, TARGETS, 4, alpha_pattern={"key": float("nan")}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lora = peft.LoraConfig(r=4, target_modules=TARGETS, rank_pattern=RANKS, use_rslora=True)
    with pytest.raises(ValueError, match="use_rslora=True with rank_pattern"):
        EDoRAConfig.from_lora_config(lora)
    base = get_edora_model(tiny_bert_classifier(), EDoRAConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="rank 40 exceeds .*query"):
        base.add_adapter("other", EDoRAConfig(r=4, target_modules=TARGETS,
                                              rank_pattern={"query": 40}))
    assert base.adapter_names() == ["default"]


def test_an_adapter_added_with_a_rank_pattern_gets_a_basis_of_those_ranks():
    patterned = EDoRAConfig(r=4, target_modules=TARGETS, rank_pattern=RANKS)
    base = get_edora_model(tiny_bert_classifier(), EDoRAConfig(r=4, target_modules=TARGETS))
    base.add_adapter("other", patterned)
    alone = get_edora_model(tiny_bert_classifier(), patterned)
    ranks = {n: layer.basis_of("other").rank for n, layer in edora_layers(base).items()}
    assert ranks == {n: layer.rank for n, layer in edora_layers(alone).items()}
    assert len(set(ranks.values())) > 1
