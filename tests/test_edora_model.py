"""The PEFT-shaped wrapper: config JSON round trip, task heads trained and saved, save_pretrained
/ from_pretrained restoring outputs bit-exactly on a real transformers model, disable_adapter,
merge_and_unload, and PEFT's loader refusing an EDoRA directory instead of dropping it."""
import pytest
import torch
from helpers import tiny_bert_classifier

from edora_kernels import (
    EDoRAConfig,
    EDoRALinear,
    EDoRAModel,
    export_peft_dora,
    get_edora_model,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def classifier(seed=0):
    return tiny_bert_classifier(seed)


CONFIG = EDoRAConfig(r=4, alpha=8.0, target_modules=["query", "value"], task_type="SEQ_CLS",
                     seed=0)
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def test_config_json_round_trip_and_from_lora_config():
    assert EDoRAConfig.from_dict(CONFIG.to_dict()) == CONFIG
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], lora_dropout=0.1,
                           task_type="SEQ_CLS", use_rslora=True)
    config = EDoRAConfig.from_lora_config(lora)
    assert (config.r, config.dropout, config.task_type) == (8, 0.1, "SEQ_CLS")
    assert config.alpha == pytest.approx(16 * 8 ** 0.5)
    with pytest.raises(ValueError, match="unknown EDoRAConfig fields \\['rank'\\]"):
        EDoRAConfig.from_dict({"rank": 4})


def test_task_head_trains_and_only_adapter_and_head_do():
    model = get_edora_model(classifier(), CONFIG)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("classifier" in n or n.endswith((".R", ".magnitude")) for n in trainable)
    model.print_trainable_parameters()


def test_save_and_from_pretrained_restore_outputs_bit_exactly(tmp_path):
    model = get_edora_model(classifier(), CONFIG)
    with torch.no_grad():  # "train" the adapter and the head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    restored = EDoRAModel.from_pretrained(classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS).logits, expected)
    assert not any(p.requires_grad for p in restored.parameters())
    trainable = EDoRAModel.from_pretrained(classifier(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_save_pretrained_from_a_gathered_state_dict_and_only_on_the_main_process(tmp_path):
    """Trainer's FSDP path hands save_pretrained a gathered state dict and says which process
    writes: the files equal a plain save, and a non-main process writes nothing."""
    from safetensors.torch import load_file

    model = get_edora_model(classifier(), CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "plain")
    # the wrapper's own keys (Trainer) and the base model's keys both work
    for name, state in [("wrapper", model.state_dict()),
                        ("base", model.get_base_model().state_dict())]:
        given = {k: v.clone() for k, v in state.items()}
        model.save_pretrained(tmp_path / name, state_dict=given, is_main_process=True)
        for file in ("adapter_model.safetensors", "modules_to_save.safetensors"):
            got, want = load_file(tmp_path / name / file), load_file(tmp_path / "plain" / file)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
    # the tensors come from the given state dict, not from the model
    doubled = {k: v * 2 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "doubled", state_dict=doubled)
    key = "bert.encoder.layer.0.attention.self.query.R"
    assert torch.equal(load_file(tmp_path / "doubled" / "adapter_model.safetensors")[key],
                       2 * model.base_model.get_submodule(key[:-2]).R.detach())
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    partial = {k: v for k, v in model.state_dict().items() if not k.endswith(".magnitude")}
    with pytest.raises(ValueError, match="state_dict lacks the adapter tensors .*magnitude"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    headless = {k: v for k, v in model.state_dict().items() if "classifier" not in k}
    with pytest.raises(ValueError, match="lacks the trained head tensor 'classifier"):
        model.save_pretrained(tmp_path / "headless", state_dict=headless)
    assert not (tmp_path / "partial").exists() and not (tmp_path / "headless").exists()


def test_peft_loader_refuses_an_edora_directory(tmp_path):
    get_edora_model(classifier(), CONFIG).save_pretrained(tmp_path)
    with pytest.raises((KeyError, ValueError)):
        peft.PeftModel.from_pretrained(classifier(), tmp_path)


def test_disable_adapter_and_merge_and_unload():
    base = classifier()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    model = get_edora_model(base, CONFIG)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.normal_(0, 0.5)
        adapted = model(input_ids=IDS).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=IDS).logits, plain)
        assert not torch.allclose(adapted, plain)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, EDoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, rtol=1e-4,
                                   atol=1e-5)


class _Random(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 97, (9,), generator=gen),
                "labels": torch.randint(0, 3, (), generator=gen)}


def _trainer(out, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
        learning_rate=5e-3, report_to=[], use_cpu=True, seed=0, logging_steps=100,
        dataloader_num_workers=0)
    model = get_edora_model(classifier(), CONFIG)
    return transformers.Trainer(model=model, args=args, train_dataset=_Random()), model


def _trained_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_trainer_writes_adapter_checkpoints_and_resumes_bit_exactly(tmp_path):
    """A 4-step run saves at step 2 and 4; a fresh model resumed from step 2 ends where the
    uninterrupted run ended, bit for bit (same R, m and head)."""
    trainer, straight = _trainer(tmp_path / "straight", 4)
    trainer.train()
    expected = _trained_state(straight)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files  # adapter-sized, not the whole model
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < sum(p.numel() * 4 for p in classifier().parameters()) / 5

    trainer, resumed = _trainer(tmp_path / "resumed", 4)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    got = _trained_state(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    trainer.save_model(str(tmp_path / "final"))  # what a user ships
    restored = EDoRAModel.from_pretrained(classifier(), tmp_path / "final")
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS).logits, resumed.eval()(input_ids=IDS).logits)


def test_accelerate_save_state_and_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = get_edora_model(classifier(), CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(input_ids=IDS, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    saved = _trained_state(model)
    accelerator.save_state(str(tmp_path / "state"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    accelerator.load_state(str(tmp_path / "state"))
    for name, value in _trained_state(model).items():
        assert torch.equal(value, saved[name]), name


def test_export_of_an_edora_model_carries_its_head_to_stock_peft(tmp_path):
    model = get_edora_model(classifier(), CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        expected = model.eval()(input_ids=IDS).logits
    export_peft_dora(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(classifier(), tmp_path).eval()
    assert peft_model.peft_config["default"].task_type == "SEQ_CLS"
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, rtol=1e-5,
                                   atol=1e-5)


# --- PEFT's semantics where users rely on them ----------------------------------------------------

def test_task_heads_join_modules_to_save_as_in_peft():
    """LoraConfig(modules_to_save=["pooler"], task_type="SEQ_CLS"): PEFT trains and saves the
    pooler and the classifier; so does EDoRA."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                           modules_to_save=["pooler"], task_type="SEQ_CLS")
    model = get_edora_model(classifier(), EDoRAConfig.from_lora_config(lora))
    assert sorted(model.head_names()) == ["bert.pooler", "classifier"]
    trainable = {n.split(".trained_module")[0] for n, p in model.named_parameters()
                 if p.requires_grad and "trained_module" in n}
    assert trainable == {"base_model.model.bert.pooler", "base_model.model.classifier"}


def test_disable_adapter_runs_the_original_heads_bit_exactly():
    base = classifier()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    model = get_edora_model(base, CONFIG)
    with torch.no_grad():  # a trained adapter and head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        assert not torch.equal(model(input_ids=IDS).logits, plain)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, plain)
        assert not torch.equal(model(input_ids=IDS).logits, plain)


def test_from_pretrained_names_a_missing_directory_and_leaves_the_model(tmp_path):
    get_edora_model(classifier(), CONFIG).save_pretrained(tmp_path)
    for missing in (tmp_path / "checkpoint-500", tmp_path / "adapter_model.safetensors"):
        model = classifier()
        with pytest.raises(FileNotFoundError, match="not a directory"):
            EDoRAModel.from_pretrained(model, missing)
        assert not any(isinstance(m, EDoRALinear) for m in model.modules())


def test_a_refused_base_is_named_with_both_digests(tmp_path):
    trained = get_edora_model(classifier(), CONFIG)
    trained.save_pretrained(tmp_path)
    other = classifier(seed=1)
    ours = get_edora_model(classifier(seed=1), CONFIG).basis_fingerprint()["digest"]
    saved = trained.basis_fingerprint()["digest"]
    with pytest.raises(ValueError, match=f"basis {saved}, not on the one this model and the "
                                         f"file make \\({ours}\\)"):
        EDoRAModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, EDoRALinear) for m in other.modules())


def test_an_adapter_saved_merged_or_after_unmerge_loads_into_its_base(tmp_path):
    """merge() and unmerge() restore W0 to rounding only; the adapter is still the one trained
    on the pristine base, and its file says so."""
    model = get_edora_model(classifier(), CONFIG)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, EDoRALinear):
                layer.R.normal_(0, 0.3)
    layers = [m for m in model.modules() if isinstance(m, EDoRALinear)]
    for layer in layers:
        layer.merge()
    model.save_pretrained(tmp_path / "merged")
    for layer in layers:
        layer.unmerge()
    model.save_pretrained(tmp_path / "unmerged")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    for saved in ("merged", "unmerged"):
        restored = EDoRAModel.from_pretrained(classifier(), tmp_path / saved)
        with torch.no_grad():
            torch.testing.assert_close(restored(input_ids=IDS).logits, expected, rtol=0,
                                       atol=1e-6)


def test_from_pretrained_returns_an_eval_model_unless_trainable(tmp_path):
    model = get_edora_model(classifier(), CONFIG)
    model.train()
    model.save_pretrained(tmp_path)
    restored = EDoRAModel.from_pretrained(classifier().train(), tmp_path)
    assert not restored.training and not restored.base_model.training
    assert EDoRAModel.from_pretrained(classifier().train(), tmp_path,
                                      is_trainable=True).training


@pytest.mark.parametrize("field, value", [("layer_replication", [(0, 1)]),
                                          ("trainable_token_indices", [1]),
                                          ("layers_to_transform", [0]),
                                          ("bias", "all")])
def test_both_lora_paths_refuse_what_edora_cannot_honour(field, value):
    from edora_kernels.integrations.peft import apply_edora_from_lora_config
    lora = peft.LoraConfig(r=4, target_modules=["query"], **{field: value})
    with pytest.raises(ValueError, match=f"LoraConfig.{field}=.*has no EDoRA counterpart"):
        EDoRAConfig.from_lora_config(lora)
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"LoraConfig.{field}="):
        apply_edora_from_lora_config(model, lora, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loading_keeps_ties_and_shared_modules_as_applying_does(tmp_path):
    """A head tied to the embedding and a module registered under two names: after a save and a
    load into a fresh model, merge() still refuses the tied head and the shared module is one
    EDoRA layer at both names."""
    from torch import nn

    from edora_kernels import apply_edora, load_edora_state_dict, save_edora

    def model_():
        torch.manual_seed(0)
        m = nn.ModuleDict({"embed": nn.Embedding(10, 16), "head": nn.Linear(16, 10, bias=False),
                           "proj": nn.Linear(16, 16)})
        m.head.weight = m.embed.weight
        m["alias"] = m.proj
        return m

    source = model_()
    apply_edora(source, ["head", "proj"], 2, seed=0, progress=False)
    save_edora(source, tmp_path / "adapter.safetensors")
    fresh = model_()
    load_edora_state_dict(fresh, tmp_path / "adapter.safetensors")
    assert isinstance(fresh.proj, EDoRALinear) and fresh.alias is fresh.proj
    assert fresh.head.tied_to == ["embed.weight"]
    with pytest.raises(RuntimeError, match="tied to \\['embed.weight'\\]"):
        fresh.head.merge()


def test_import_loads_no_optional_library():
    """import edora_kernels (and the CLI's module) imports no PEFT, transformers,
    bitsandbytes or torchao: they load when a feature needs them."""
    import subprocess
    import sys
    code = ("import sys, edora_kernels, edora_kernels.cli\n"
            "found = sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'transformers', "
            "'bitsandbytes', 'torchao', 'triton'})\n"
            "print(found)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[]"


def test_the_peft_subclass_appears_once_peft_is_imported():
    model = get_edora_model(classifier(), CONFIG)
    assert isinstance(model, EDoRAModel) and isinstance(model, peft.PeftModel)


def test_the_wrapped_model_compiles_whole():
    """torch.compile(fullgraph=True) traces EDoRAModel's forward (its per-model lock is not
    taken while compiling: dynamo cannot trace one)."""
    model = get_edora_model(classifier(), CONFIG)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, model(input_ids=IDS).logits,
                                   rtol=0, atol=0)


def test_trainer_reaches_the_model_where_peft_keeps_it(tmp_path):
    """transformers reaches a PEFT model's model as ``base_model.model``: Trainer's label
    smoothing shifts a causal LM's labels by that model's class name, NEFTune hooks its input
    embeddings. EDoRAModel lays itself out the same way."""
    from transformers.integrations.neftune import activate_neftune
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    model = get_edora_model(llama, EDoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert model.base_model.model is llama is model.get_base_model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1,
                                          report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    expected = LabelSmoother(0.1)(model(input_ids=ids), ids, shift_labels=True)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    activate_neftune(model, 5.0).remove()


def test_loading_into_the_trained_adapter_keeps_it_trainable(tmp_path):
    """Trainer's load_best_model_at_end loads the best checkpoint into "default" without
    is_trainable: the adapter keeps training, as PEFT's does (an adapter the load adds is for
    inference unless is_trainable)."""
    model = get_edora_model(classifier(), CONFIG)
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "default")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before
    model.load_adapter(tmp_path, "other")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)


def test_all_linear_leaves_the_task_heads_to_modules_to_save():
    """PEFT's "all-linear" with a task type adapts no head it trains whole (the classifier)."""
    lora = peft.LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    model = get_edora_model(classifier(), EDoRAConfig.from_lora_config(lora))
    reference = peft.get_peft_model(classifier(), lora)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                   if hasattr(m, "lora_A")}
    ours = {n for n, m in model.get_base_model().named_modules() if isinstance(m, EDoRALinear)}
    assert ours == peft_layers and not any("classifier" in n for n in ours)
