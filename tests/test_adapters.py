"""Many adapters on one basis (edora_kernels.mixed, edora_kernels.basis, EDoRAModel's multi-adapter
API): mixed batches in one pass — serving and training — against per-adapter runs and the float64
reference; save/load of several adapters bit-exact; the basis stored once and fingerprinted; hot
swaps that read no W0; the W0 reads of a mixed batch counted."""
import pytest
import torch
import torch.nn.functional as F
from helpers import check_served_mixed_batch, jitter_adapters, tiny_bert_classifier
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from edora_kernels import EDoRAConfig, EDoRALinear, EDoRAModel, get_edora_model
from edora_kernels.mixed import BASE_NAME
from edora_kernels.reference import edora_linear_reference

transformers = pytest.importorskip("transformers")

NAMES = ["default", "a", BASE_NAME, "b", "a", "default"]


def classifier(seed=0):
    return tiny_bert_classifier(seed).double()


def config(seed=0, **changes):
    return EDoRAConfig(r=4, alpha=8.0, target_modules=["query", "value"], task_type="SEQ_CLS",
                       seed=seed, **changes)


def _perturb(model, names):
    """Move the given adapters' R, m and heads away from their start (each differently)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in names:
            for layer in model.base_model.modules():
                if isinstance(layer, EDoRALinear):
                    for p in layer.adapter_weights(name):
                        p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            for head in model.heads().values():
                for p in head.module_for(name).parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def three_adapters():
    model = get_edora_model(classifier(), config())
    model.add_adapter("a", config(seed=3))
    model.add_adapter("b", config(seed=5))
    _perturb(model, ["default", "a", "b"])
    return model


IDS = torch.randint(0, 97, (len(NAMES), 9), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1, 0, 2])


def _alone(model, name, rows):
    """The rows run by themselves with one adapter (the base model for BASE_NAME)."""
    if name == BASE_NAME:
        with model.disable_adapter():
            return model(input_ids=IDS[rows]).logits
    model.set_adapter(name)
    return model(input_ids=IDS[rows]).logits


def test_a_mixed_batch_equals_each_row_with_its_own_adapter():
    model = three_adapters()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[i], _alone(model, name, [i])[0], rtol=0,
                                       atol=1e-12)
        # the base model's rows are the base model's outputs: bit for bit up to the head,
        # which runs on the base rows only (a GEMM of another height rounds its own way)
        with model.disable_adapter():
            base = model(input_ids=IDS, output_hidden_states=True)
        hidden = model(input_ids=IDS, adapter_names=NAMES, output_hidden_states=True)
        assert torch.equal(hidden.hidden_states[-1][2], base.hidden_states[-1][2])
        torch.testing.assert_close(mixed[2], base.logits[2], rtol=0, atol=1e-15)
        # the adapters really differ: the test would notice a row with the wrong adapter
        logits = {n: _alone(model, n, [0]) for n in ("default", "a", "b", BASE_NAME)}
        assert all((logits[a] - logits[b]).abs().max() > 1e-3
                   for a in logits for b in logits if a < b)


def test_a_mixed_batch_trains_each_adapter_on_its_own_rows_only():
    """Multi-tenant training: one pass over the base for K users; each adapter's gradient is
    the one a separate step on its own rows gives."""
    model = three_adapters()
    model.train()
    model.set_adapter(["default", "a", "b"])
    loss = F.cross_entropy(model(input_ids=IDS, adapter_names=NAMES).logits, LABELS,
                           reduction="sum")
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(mixed) == 3 * (4 * 2 + 2)  # 4 layers × (R, m) + the classifier, per adapter
    separate = {}
    for name in ("default", "a", "b"):
        model.zero_grad()
        model.set_adapter(name)
        rows = [i for i, n in enumerate(NAMES) if n == name]
        F.cross_entropy(model(input_ids=IDS[rows]).logits, LABELS[rows],
                        reduction="sum").backward()
        separate.update({n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad})
    assert sorted(separate) == sorted(mixed)
    for key, grad in separate.items():
        torch.testing.assert_close(mixed[key], grad, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_layer_mixed_rows_against_the_float64_reference(kind):
    """One layer, every row against the dense reference with its adapter's R and m (a
    quantized base: W0 = the dequantized weight)."""
    torch.manual_seed(0)
    if kind == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32)
        base.load_state_dict(nn.Linear(64, 48).state_dict())
        base, dtype, tol = base.to("cpu"), torch.float32, 1e-4
    elif kind == "conv1d":
        base, dtype, tol = transformers.pytorch_utils.Conv1D(48, 64).double(), torch.float64, 1e-12
        nn.init.normal_(base.bias)
    else:
        base, dtype, tol = nn.Linear(64, 48).double(), torch.float64, 1e-12
    layer = EDoRALinear.from_linear(base, 3, seed=0)
    layer.add_adapter("a", seed=1)
    layer.add_adapter("b", seed=2)
    with torch.no_grad():
        for name in layer.adapter_names:
            for p in layer.adapter_weights(name):
                p.add_(0.3 * torch.randn_like(p))
    rows = torch.tensor([1, 0, 3, 2, 1])  # a, default, base, b, a
    x = torch.randn(5, 2, 64, dtype=dtype, requires_grad=True)
    layer.row_adapters = rows
    y = layer(x)
    layer.row_adapters = None
    w0 = layer.base_weight().double()
    b = layer.bias.double()
    for i, index in enumerate(rows.tolist()):
        if index == 3:
            want = F.linear(x[i].double(), w0, b)
        else:
            R, m = layer.adapter_weights(layer.adapter_names[index])
            want = edora_linear_reference(x[i].detach().double(), w0, b, layer.A.double(),
                                          layer.B.double(), R.detach().double(),
                                          m.detach().double(), layer.scaling)
        torch.testing.assert_close(y[i].double(), want, rtol=tol, atol=tol)
    y.sum().backward()
    assert layer.R.grad is not None and torch.isfinite(x.grad).all()


class _W0Reads(TorchDispatchMode):
    """Counts the compute ops that read a given storage (views and metadata ops aside)."""

    VIEWS = {"t", "transpose", "view", "expand", "detach", "alias", "_unsafe_view", "as_strided",
             "permute", "reshape", "unsqueeze", "squeeze", "slice", "select"}

    def __init__(self, storages):
        super().__init__()
        self.storages, self.reads = set(storages), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                    if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() in self.storages for t in flat):
                self.reads += 1
        return func(*args, **(kwargs or {}))


def _w0_reads(adapters: int) -> tuple[int, int]:
    """W0 reads of one mixed training step with ``adapters`` adapters, and the layer count."""
    model = get_edora_model(classifier(), config())
    for i in range(1, adapters):
        model.add_adapter(f"user{i}", config(seed=i))
    model.set_adapter(model.adapter_names())
    model.train()
    layers = [m for m in model.modules() if isinstance(m, EDoRALinear)]
    names = [model.adapter_names()[i % adapters] for i in range(len(IDS))]
    model(input_ids=IDS, adapter_names=names)  # norm terms cached (one read each, once)
    storages = [layer.weight.untyped_storage().data_ptr() for layer in layers]
    with _W0Reads(storages) as mode:
        model(input_ids=IDS, adapter_names=names).logits.sum().backward()
    return mode.reads, len(layers)


def test_a_mixed_batch_reads_w0_at_most_twice_per_layer_however_many_adapters():
    one, layers = _w0_reads(1)
    many, _ = _w0_reads(8)
    # x W0ᵀ forward, gy W0 backward (layer 0's query and value get no dx: their input is
    # the frozen embedding's output)
    assert one == many == 2 * layers - 2


def test_save_and_load_several_adapters_bit_exactly(tmp_path):
    model = three_adapters()
    with torch.no_grad():
        expected = model(input_ids=IDS, adapter_names=NAMES).logits
    model.save_pretrained(tmp_path)
    # PEFT's layout; the basis (A, B) once, in the default's file
    from safetensors.torch import load_file
    root = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".A") for k in root)
    for name in ("a", "b"):
        cores = load_file(tmp_path / name / "adapter_model.safetensors")
        assert cores and all(k.endswith((".R", ".magnitude")) for k in cores)
        assert (tmp_path / name / "modules_to_save.safetensors").is_file()
    restored = EDoRAModel.from_pretrained(classifier(), tmp_path)
    restored.load_adapter(tmp_path / "a", "a")
    restored.load_adapter(tmp_path / "b", "b")
    assert restored.adapter_names() == ["default", "a", "b"]
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS, adapter_names=NAMES).logits, expected)
    # an adapter in a subdirectory loads into a fresh model by itself: the basis from the root
    alone = EDoRAModel.from_pretrained(classifier(), tmp_path / "b", adapter_name="b")
    assert alone.active_adapter == "b"
    with torch.no_grad():
        model.set_adapter("b")
        assert torch.equal(alone(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_an_adapter_of_another_basis_is_refused_naming_what_differs(tmp_path):
    model = three_adapters()
    model.save_pretrained(tmp_path)
    other = classifier()
    with torch.no_grad():
        other.bert.encoder.layer[1].attention.self.value.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"layer 'bert\.encoder\.layer\.1\.attention\.self\."
                                         r"value': W0's bytes differ"):
        EDoRAModel.from_pretrained(other, tmp_path)
    reseeded = get_edora_model(classifier(), config(seed=9))
    with pytest.raises(ValueError, match="trained on basis .*: seed: adapter 0, model 9"):
        reseeded.load_adapter(tmp_path / "a", "a")
    assert reseeded.adapter_names() == ["default"]  # nothing added


def test_hot_swap_reads_no_w0_and_leaves_other_adapters_untouched(tmp_path, monkeypatch):
    model = three_adapters()
    model.save_pretrained(tmp_path)
    served = EDoRAModel.from_pretrained(classifier(), tmp_path)
    served.load_adapter(tmp_path / "a", "a")
    with torch.no_grad():
        served(input_ids=IDS, adapter_names=["default", "a"] * 3)  # norm terms cached
    before = {n: p.clone() for n, p in served.named_parameters() if ".a." not in n}
    from edora_kernels import basis, layer, norm
    reads = []
    monkeypatch.setattr(basis, "_digest", lambda t: reads.append("digest"))
    monkeypatch.setattr(norm, "compute_norm_terms", lambda *a: reads.append("norm"))
    monkeypatch.setattr(layer, "compute_norm_terms", lambda *a: reads.append("norm"))
    served.load_adapter(tmp_path / "b", "b")       # a new one
    served.load_adapter(tmp_path / "b", "a")       # replace one
    served.delete_adapter("b")
    with torch.no_grad():
        served(input_ids=IDS, adapter_names=["default", "a"] * 3)
    assert reads == []
    assert all(torch.equal(p, before[n]) for n, p in served.named_parameters() if n in before)
    with pytest.raises(ValueError, match="no adapter \\['b'\\]"):
        served.set_adapter("b")
    with pytest.raises(ValueError, match=r"adapter_names holds \['b'\], not adapters"):
        served(input_ids=IDS, adapter_names=["b"] * len(IDS))


def test_hot_swap_into_a_compiled_model_does_not_recompile(tmp_path):
    torch._dynamo.reset()
    model = three_adapters()
    model.save_pretrained(tmp_path)
    served = EDoRAModel.from_pretrained(classifier(), tmp_path)
    compiled = torch.compile(served)
    with torch.no_grad():
        compiled(input_ids=IDS)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        served.load_adapter(tmp_path / "a", "default")  # new R, m in the served slot
        got = compiled(input_ids=IDS).logits
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
        model.set_adapter("a")
        torch.testing.assert_close(got, model(input_ids=IDS).logits, rtol=0, atol=1e-12)


def test_adapter_api_refusals():
    model = get_edora_model(classifier(), config())
    with pytest.raises(ValueError, match="r=8 differs from the model's basis"):
        model.add_adapter("x", EDoRAConfig(r=8, alpha=8.0, target_modules=["query", "value"],
                                           task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="targets other layers"):
        model.add_adapter("x", EDoRAConfig(r=4, alpha=8.0, target_modules=["query"]))
    for bad in (BASE_NAME, "with.dot", ""):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(bad, config())
    model.add_adapter("x", config())
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("x", config())
    with pytest.raises(ValueError, match="'default' holds the basis"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="3 names for a batch of 6 rows"):
        model(input_ids=IDS, adapter_names=["x"] * 3)
    model.set_adapter(["default", "x"])
    with pytest.raises(ValueError, match="active together: pass adapter_names"):
        model(input_ids=IDS)
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=IDS, adapter_names="x")


def test_lora_config_adds_an_adapter_and_new_adapters_start_as_the_base():
    peft = pytest.importorskip("peft")
    model = get_edora_model(classifier(), config())
    model.add_adapter("fresh", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query",
                                                                                   "value"],
                                               task_type="SEQ_CLS"))
    with torch.no_grad():
        fresh = model(input_ids=IDS, adapter_names=["fresh"] * len(IDS)).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    # R ~ N(0, 1e-10) and m = ‖W0 + s·BRA‖: the base model, to within sigma's effect
    torch.testing.assert_close(fresh, base, rtol=0, atol=1e-6)


def test_bench_adapters_writes_each_provider_and_the_peft_refusal(tmp_path):
    import csv

    from edora_kernels.cli import main

    peft_installed = pytest.importorskip("peft") is not None
    assert main(["bench", "--adapters", "1,3", "--tokens", "4", "--repeats", "2", "--warmup",
                 "0", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_*.csv")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kernel"] == "llama_mixed_adapters"]
    cases = {(r["x"], r["mode"], r["provider"], r["metric"]) for r in rows}
    for k in ("K=1", "K=3"):
        for mode in ("fwd", "fwd+bwd"):
            assert (k, mode, "edora_mixed", "ratio_to_edora_one") in cases
        assert (k, "fwd", "peft_lora_mixed", "ratio_to_edora_one") in cases
        assert peft_installed and (k, "fwd+bwd", "peft_lora_mixed", "error") in cases
    assert all(float(r["p50"]) > 0 for r in rows if r["metric"] == "time_ms")


@pytest.mark.parametrize("kind, in_f, out_f, rank, tokens", [
    ("linear", 37, 45, 1, 1), ("linear", 64, 48, 3, 7), ("linear", 40, 24, 16, 5),
    ("nf4", 64, 48, 3, 7)])  # bitsandbytes' CPU 4-bit kernel takes multiples of 64
def test_triton_serves_a_mixed_batch_in_one_launch(kind, in_f, out_f, rank, tokens,
                                                    monkeypatch):
    """Serving (no grad) on the Triton backend: one launch of the forward GEMM (or of the
    epilogue pass over a quantized base's y0) with g per token from the adapters' table,
    against the composed path and the float64 reference; base rows are the base layer."""
    from edora_kernels.backends.triton import mixed as triton_mixed

    torch.manual_seed(0)
    if kind == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(in_f, out_f, quant_type="nf4", compute_dtype=torch.float32)
        base.load_state_dict(nn.Linear(in_f, out_f).state_dict())
        base = base.to("cpu")
    else:
        base = nn.Linear(in_f, out_f)
    layer = EDoRALinear.from_linear(base, rank, seed=0, backend="triton")
    for name, seed in (("a", 1), ("b", 2)):
        layer.add_adapter(name, seed=seed)
    jitter_adapters(layer, 0.3)
    launches = []
    monkeypatch.setattr(triton_mixed, "launch",
                        lambda kernel, grid, **args: launches.append(args) or
                        kernel[grid](**args))
    rows = torch.tensor([1, 0, 3, 2, 1])  # a, default, base, b, a
    check_served_mixed_batch(layer, rows, torch.randn(5, tokens, in_f), torch.float32)
    assert len(launches) == 1 and launches[0]["G_ROWS"]
