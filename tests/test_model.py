"""``apply_edora`` on a small RoBERTa built offline, parameter counts, and the adapter file."""
import copy

import pytest
import torch
from helpers import assert_close
from safetensors.torch import save_file
from torch import nn

from edora_kernels.layer import EDoRALinear
from edora_kernels.model import (
    apply_edora,
    edora_state_dict,
    load_edora_state_dict,
    save_edora,
)

transformers = pytest.importorskip("transformers")

# The paper's GLUE targets. As names they match query, value, attention.output.dense and the
# block's output.dense (768×3072 in RoBERTa-base); "output.dense" also covers the attention one.
TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
RANK = 4


def tiny_config(**overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return transformers.RobertaConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return transformers.RobertaModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def outputs(model, input_ids):
    with torch.no_grad():
        return model(input_ids).last_hidden_state


def edora_copy(base, **kwargs):
    model = copy.deepcopy(base)
    summary = apply_edora(model, TARGETS, RANK, progress=False, **kwargs)
    return model, summary


def target_linears(model):
    suffixes = ("query", "value", "output.dense")
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(suffixes)}


@pytest.mark.parametrize("init", ["rsvd", "svd", "random"])
def test_outputs_at_init_equal_the_base_model(base, input_ids, init):
    model, _ = edora_copy(base, init=init, sigma=0.0, seed=0)
    assert_close(outputs(model, input_ids), outputs(base, input_ids).double(), torch.float32,
                 f"last_hidden_state, R = 0, init={init}")
    layer = model.encoder.layer[0].attention.self.query
    if init != "random":  # B = U_r: orthonormal columns
        assert (layer.B.mT @ layer.B - torch.eye(RANK)).abs().max() < 1e-5


def test_default_sigma_moves_outputs_by_about_sigma(base, input_ids):
    # R ~ N(0, 1e-5²) tilts each direction by O(s·σ): far below any training signal.
    model, _ = edora_copy(base, seed=0)
    diff = (outputs(model, input_ids) - outputs(base, input_ids)).abs().max().item()
    assert 0 < diff < 1e-3


def test_replaced_layers_and_trainable_count(base):
    model, summary = edora_copy(base, seed=0)
    expected_names = sorted(target_linears(base))
    assert sorted(summary.layers) == expected_names and len(expected_names) == 4 * 2
    layers = {n: m for n, m in model.named_modules() if isinstance(m, EDoRALinear)}
    assert sorted(layers) == expected_names
    sum_out = sum(m.out_features for m in target_linears(base).values())
    assert summary.trainable_params == sum_out + len(expected_names) * RANK**2
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in expected_names for t in ("R", "magnitude")}
    text = str(summary)
    assert "8 layers" in text and f"{summary.trainable_params:,}" in text


@pytest.mark.parametrize("rank", [8, 16])
def test_roberta_base_trainable_count_on_meta_device(rank):
    # RobertaConfig() has RoBERTa-base's dimensions; on the meta device nothing is allocated
    # and nothing is downloaded. 48 layers, Σ out_features = 48·768 = 36,864.
    with torch.device("meta"):
        model = transformers.RobertaModel(transformers.RobertaConfig())
    summary = apply_edora(model, TARGETS, rank, progress=False)
    assert len(summary.layers) == 48
    assert summary.trainable_params == 36_864 + 48 * rank**2
    if rank == 16:
        assert summary.trainable_params == 49_152
    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in summary.layers})
    assert shapes == [(768, 768), (768, 3072)]


def test_regex_target_and_memory_budget_chunking(base, input_ids):
    # A one-byte budget forces one matrix per chunk: the result must not depend on chunking.
    model = copy.deepcopy(base)
    summary = apply_edora(model, r".*\.(query|value)", RANK, sigma=0.0, progress=False,
                          memory_budget_bytes=1)
    assert len(summary.layers) == 4
    assert all(n.endswith(("query", "value")) for n in summary.layers)
    assert_close(outputs(model, input_ids), outputs(base, input_ids).double(), torch.float32)


def test_seed_makes_it_reproducible(base):
    a, _ = edora_copy(base, seed=5)
    b, _ = edora_copy(base, seed=5)
    for (ka, va), (kb, vb) in zip(edora_state_dict(a).items(), edora_state_dict(b).items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_progress_bar_counts_layers(base, capsys):
    apply_edora(copy.deepcopy(base), TARGETS, RANK)
    assert "8/8" in capsys.readouterr().err


def test_no_match_lists_module_names(base):
    with pytest.raises(ValueError, match=r"matched no module.*'encoder\.layer\.0\.attention"):
        apply_edora(copy.deepcopy(base), ["qkv"], RANK, progress=False)


@pytest.mark.parametrize("targets, kwargs, error, match", [
    (["query"], {"rank": 0}, ValueError, "rank must be an int >= 1"),
    (["query"], {"rank": 33}, ValueError, "rank 33 exceeds"),
    (["query"], {"rank": 2, "lr": 1.0}, TypeError, r"unexpected keyword arguments \['lr'\]"),
    (["query"], {"rank": 2, "init": "pca"}, ValueError, "init must be one of"),
    (["query"], {"rank": 2, "split": "half"}, ValueError, "split must be one of"),
    (["query"], {"rank": 2, "dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    (["LayerNorm"], {"rank": 2}, ValueError, "cannot wrap.*LayerNorm"),
    ([], {"rank": 2}, TypeError, "target_modules must be"),
])
def test_argument_errors(base, targets, kwargs, error, match):
    model = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        apply_edora(model, targets, progress=False, **kwargs)
    assert not any(isinstance(m, EDoRALinear) for m in model.modules()), "nothing replaced"


def test_applying_twice_is_refused(base):
    model, _ = edora_copy(base)
    with pytest.raises(ValueError, match="already EDoRALinear"):
        apply_edora(model, ["query"], RANK, progress=False)
    # nor may a second adaptation reach inside an EDoRA layer: an adapter on its base layer
    # would never run
    with pytest.raises(ValueError, match=r"query\.base_layer'?.*inside EDoRA layers"):
        apply_edora(model, r".*query\.base_layer", RANK, progress=False)


def test_patterns_reach_a_module_registered_under_two_names():
    """PEFT's pattern rule over every name of a shared module: a key matching its second name
    gives it that rank and alpha."""
    model = nn.Module()
    model.a = nn.Linear(16, 12)
    model.b = model.a
    apply_edora(model, ["b"], 4, rank_pattern={"b": 2}, alpha_pattern={"b": 3.0},
                progress=False)
    assert model.a is model.b and (model.b.rank, model.b.alpha) == (2, 3.0)


def test_non_finite_weight_is_named(base):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.value.*NaN"):
        apply_edora(model, TARGETS, RANK, progress=False)


# --- adapter files ------------------------------------------------------------------------------


@pytest.fixture
def trained(base):
    """An EDoRA model moved away from init, as after training."""
    model, _ = edora_copy(base, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.copy_(0.1 * torch.randn(layer.R.shape, generator=gen))
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=gen))
    return model


def test_round_trip_into_a_plain_model_rebuilds_the_layers(base, trained, input_ids, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(trained, path)
    fresh = copy.deepcopy(base)
    result = load_edora_state_dict(fresh, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    saved = edora_state_dict(trained)
    loaded = edora_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert torch.equal(outputs(fresh, input_ids), outputs(trained, input_ids))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in trained.named_parameters() if p.requires_grad}


def test_round_trip_into_an_edora_model(base, trained, input_ids, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(trained, path)
    other, _ = edora_copy(base, seed=1)  # different A, B, R: all overwritten
    load_edora_state_dict(other, path)
    assert torch.equal(outputs(other, input_ids), outputs(trained, input_ids))
    state = edora_state_dict(trained)
    other2, _ = edora_copy(base, seed=2)
    load_edora_state_dict(other2, state)  # a plain dict works into existing layers
    assert torch.equal(outputs(other2, input_ids), outputs(trained, input_ids))


def test_missing_extra_and_misshaped_keys_are_named(base, trained):
    state = dict(edora_state_dict(trained))
    target, _ = edora_copy(base, seed=1)
    before = {k: v.clone() for k, v in edora_state_dict(target).items()}

    missing = dict(state)
    del missing["encoder.layer.0.attention.self.query.R"]
    with pytest.raises(ValueError, match=r"missing keys: 'encoder\.layer\.0\.attention\.self"
                                         r"\.query\.R'"):
        load_edora_state_dict(target, missing)

    stray = {"encoder.layer.0.intermediate.dense.R": torch.zeros(RANK, RANK)}
    extra = {**state, **stray}
    with pytest.raises(ValueError, match=r"unexpected keys: 'encoder\.layer\.0\.intermediate"):
        load_edora_state_dict(target, extra)

    misshaped = {**state, "encoder.layer.1.output.dense.A": torch.zeros(RANK + 1, 48)}
    with pytest.raises(ValueError, match=r"output\.dense\.A: got \(5, 48\), expected \(4, 48\)"):
        load_edora_state_dict(target, misshaped, strict=False)

    for k, v in edora_state_dict(target).items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"

    result = load_edora_state_dict(target, {**missing, **stray}, strict=False)
    assert result.missing_keys == ["encoder.layer.0.attention.self.query.R"]
    assert result.unexpected_keys == ["encoder.layer.0.intermediate.dense.R"]


def test_misshaped_file_is_named(base, trained, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(trained, path)
    small = copy.deepcopy(base)  # different rank in the model than in the file
    apply_edora(small, TARGETS, RANK - 1, progress=False)
    with pytest.raises(ValueError, match=r"query\.R: got \(4, 4\), expected \(3, 3\)"):
        load_edora_state_dict(small, path)


def test_dict_into_plain_model_explains(base, trained):
    with pytest.raises(ValueError, match="no EDoRA layers: pass the save_edora file"):
        load_edora_state_dict(copy.deepcopy(base), edora_state_dict(trained))


def test_alpha_mismatch_and_foreign_file_are_refused(base, trained, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(trained, path)
    other = copy.deepcopy(base)
    apply_edora(other, TARGETS, RANK, alpha=8.0, progress=False)
    with pytest.raises(ValueError, match="alpha differs"):
        load_edora_state_dict(other, path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an EDoRA adapter file"):
        load_edora_state_dict(other, foreign)


def test_merged_layers_refuse_loading(trained, tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_edora(trained, path)
    trained.encoder.layer[0].attention.self.query.merge()
    with pytest.raises(ValueError, match="merged; call unmerge"):
        load_edora_state_dict(trained, path)


def test_saving_a_plain_model_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match="no EDoRALinear layers"):
        save_edora(base, tmp_path / "x.safetensors")
