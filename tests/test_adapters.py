"""Many adapters on one basis (edora_kernels.mixed, edora_kernels.basis, EDoRAModel's multi-adapter
API): mixed batches in one pass — serving and training — against per-adapter runs and the float64
reference; save/load of several adapters bit-exact; the basis stored once and fingerprinted; hot
swaps that read no W0; the W0 reads of a mixed batch counted."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    add_second_basis,
    assert_close,
    check_served_mixed_batch,
    jitter_adapters,
    mixed_training_results,
    reference_row,
    tiny_bert_classifier,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from edora_kernels import (
    EDoRAConfig,
    EDoRALinear,
    EDoRAModel,
    export_peft_dora,
    get_edora_model,
)
from edora_kernels.adapter_io import edora_layers
from edora_kernels.backends.triton.launch import kernel_name
from edora_kernels.mixed import BASE_NAME
from edora_kernels.reference import edora_linear_reference

transformers = pytest.importorskip("transformers")

NAMES = ["default", "a", BASE_NAME, "b", "a", "default"]
BF16 = torch.bfloat16


def classifier(seed=0):
    return tiny_bert_classifier(seed).double()


def config(seed=0, **changes):
    settings = {"r": 4, "alpha": 8.0, "target_modules": ["query", "value"],
                "task_type": "SEQ_CLS", **changes}
    return EDoRAConfig(seed=seed, **settings)


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


def _check_multi_tenant_step(model, names: list[str]) -> None:
    """One backward of a batch mixing ``names`` (one per row of IDS) gives every adapter
    exactly the gradient of a separate step on its own rows."""
    adapters = list(dict.fromkeys(n for n in names if n != BASE_NAME))
    model.train()
    model.set_adapter(adapters)
    loss = F.cross_entropy(model(input_ids=IDS, adapter_names=names).logits, LABELS,
                           reduction="sum")
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(mixed) == len(adapters) * (4 * 2 + 2)  # 4 layers × (R, m) + the classifier
    separate = {}
    for name in adapters:
        model.zero_grad()
        model.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        F.cross_entropy(model(input_ids=IDS[rows]).logits, LABELS[rows],
                        reduction="sum").backward()
        separate.update({n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad})
    assert sorted(separate) == sorted(mixed)
    for key, grad in separate.items():
        torch.testing.assert_close(mixed[key], grad, rtol=0, atol=1e-12, msg=key)


def test_a_mixed_batch_trains_each_adapter_on_its_own_rows_only():
    """Multi-tenant training: one pass over the base for K users; each adapter's gradient is
    the one a separate step on its own rows gives."""
    _check_multi_tenant_step(three_adapters(), NAMES)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_mixed_batch_trains_under_gradient_checkpointing(reentrant):
    """transformers' gradient checkpointing reruns each block's forward inside backward, after
    EDoRAModel has cleared the rows: the recomputation runs every row with its adapter again
    (either checkpoint flavour), so each adapter still gets exactly its own rows' gradient."""
    model = three_adapters()
    model.base_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # its segments pass gradients only to inputs that need them
        model.base_model.enable_input_require_grads()
    _check_multi_tenant_step(model, NAMES)
    # A no-grad forward between a step's forward and its backward (a reference pass, as DPO
    # runs one) leaves the rows the recomputation takes
    grads = []
    for reference_pass in (False, True):
        model.zero_grad()
        model.set_adapter(["default", "a", "b"])
        loss = F.cross_entropy(model(input_ids=IDS, adapter_names=NAMES).logits, LABELS)
        if reference_pass:
            with torch.no_grad():
                model(input_ids=IDS[:2], adapter_names=[BASE_NAME, "b"])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_two_mixed_forwards_before_one_backward_under_gradient_checkpointing(reentrant):
    """A contrastive step records two forwards, each with its own rows, then one backward:
    each checkpointed block recomputes with the rows of the forward that recorded it."""
    second = ["b", "default", BASE_NAME, "a", "b", "a"]

    def step(model):
        model.train()  # transformers checkpoints in training mode only
        model.zero_grad()
        model.set_adapter(["default", "a", "b"])
        first = F.cross_entropy(model(input_ids=IDS, adapter_names=NAMES).logits, LABELS)
        other = F.cross_entropy(model(input_ids=IDS.flip(0), adapter_names=second).logits,
                                LABELS)
        (first + 2 * other).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = step(three_adapters())
    model = three_adapters()
    model.base_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.base_model.enable_input_require_grads()
    checkpointed = step(model)
    assert sorted(checkpointed) == sorted(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=0, atol=1e-12, msg=key)


def test_a_batch_of_base_rows_only_trains_as_a_step_without_adapter_gradients():
    """A batch whose rows all run the base model (a small batch of a multi-tenant data set)
    still backpropagates, every adapter's gradient left None, and its outputs are the base
    model's."""
    model = three_adapters()
    model.train()
    model.set_adapter(["default", "a", "b"])
    out = model(input_ids=IDS[:2], adapter_names=[BASE_NAME] * 2, labels=LABELS[:2])
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    model.set_adapter("default")
    with model.disable_adapter():
        base = model(input_ids=IDS[:2], labels=LABELS[:2])
    assert torch.equal(out.logits, base.logits) and torch.equal(out.loss, base.loss)
    # frozen: no anchor, outputs as the base model gives them
    model.set_trainable(False)
    assert not model(input_ids=IDS[:2], adapter_names=[BASE_NAME] * 2).logits.requires_grad


def test_the_batch_is_read_from_the_inputs_that_hold_it():
    """A broadcast position_ids (batch 1) given first does not hide the batch of input_ids."""
    model = three_adapters()
    with torch.no_grad():
        expected = model(input_ids=IDS, adapter_names=NAMES).logits
        positions = torch.arange(IDS.shape[1])[None]
        got = model(position_ids=positions, input_ids=IDS, adapter_names=NAMES).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_threads_sharing_a_model_each_get_their_own_rows():
    """Forwards from two threads on one model, each with its own adapter_names, interleave
    without reading each other's rows (one forward at a time per model)."""
    import threading

    model = three_adapters()
    batches = [(IDS[:3], NAMES[:3]), (IDS[3:], ["a", "a", BASE_NAME])]
    with torch.no_grad():
        expected = [model(input_ids=ids, adapter_names=names).logits for ids, names in batches]
    wrong = []

    def serve(i):
        ids, names = batches[i]
        for _ in range(20):
            with torch.no_grad():
                got = model(input_ids=ids, adapter_names=names).logits
            if not torch.equal(got, expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"num_beams": 3,
                                                          "num_return_sequences": 2}])
def test_generate_gives_beams_and_returned_sequences_their_rows_adapter(settings):
    """generate repeats each input row for its beams and returned sequences: every copy runs
    with its row's adapter, as the row generated alone with that adapter does."""
    model = get_edora_model(_tiny_llama(), EDoRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       seed=0))
    model.add_adapter("a", EDoRAConfig(r=4, target_modules=["q_proj", "v_proj"], seed=1))
    _perturb(model, ["default", "a"])
    prompts = torch.randint(1, 61, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["a", BASE_NAME, "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, **settings)
    mixed = model.generate(input_ids=prompts, adapter_names=names, **kwargs)
    copies = settings.get("num_return_sequences", 1)
    assert mixed.shape[0] == 3 * copies
    for i, name in enumerate(names):
        if name == BASE_NAME:
            with model.disable_adapter():
                alone = model.generate(input_ids=prompts[i:i + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompts[i:i + 1], **kwargs)
        assert torch.equal(mixed[i * copies:(i + 1) * copies], alone), name


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_layer_mixed_rows_against_the_float64_reference(kind):
    """One layer, every row against the dense reference with its adapter's R and m (a
    quantized base: W0 = the dequantized weight); adapter "c" is on a second basis of another
    rank and alpha."""
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
    add_second_basis(layer, "c", rank=5, alpha=3.0, seed=3)
    jitter_adapters(layer, 0.3)
    rows = torch.tensor([1, 0, 4, 3, 2, 1, 3])  # a, default, base, c, b, a, c
    x = torch.randn(7, 2, 64, dtype=dtype, requires_grad=True)
    layer.row_adapters = rows
    y = layer(x)
    layer.row_adapters = None
    w0 = layer.base_weight().double()
    for i, index in enumerate(rows.tolist()):
        if index == 4:
            want = F.linear(x[i].double(), w0, layer.bias.double())
        else:
            want = reference_row(layer, layer.adapter_names[index], x[i].detach())
        torch.testing.assert_close(y[i].double(), want, rtol=tol, atol=tol)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for name in layer.adapter_names
               for p in layer.adapter_weights(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("base_rows", [True, False])
def test_a_mixed_training_step_in_each_dtype_against_float64(dtype, base_rows):
    """A mixed batch trained in fp32, fp16 and bf16 (adapters in fp32 on a half base, as the
    layer makes them) against the same step in float64: y, dx and every adapter's dR and dm
    within the tolerance table — with rows of the base model (y0 carries the bias) and without
    (the epilogue adds it)."""
    from edora_kernels.tolerances import TOLERANCE, normalised_error

    torch.manual_seed(0)
    exact = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0)
    for i in range(1, 4):
        exact.add_adapter(f"user{i}", seed=i)
    jitter_adapters(exact, 0.3)
    low = copy.deepcopy(exact).to(dtype)
    for name in low.adapter_names:  # the adapters as a half model holds them: fp32
        for p in low.adapter_weights(name):
            p.data = p.data.float()
    rows = torch.tensor([2, 0, 4, 3, 1, 2] if base_rows else [2, 0, 3, 3, 1, 2])
    x = torch.randn(6, 5, 37, dtype=torch.float64)
    gy = torch.randn(6, 5, 29, dtype=torch.float64)
    results = {}
    for layer, x_in in ((exact, x), (low, x.to(dtype))):
        x_in = x_in.clone().requires_grad_()
        layer.row_adapters = rows
        y = layer(x_in)
        layer.row_adapters = None
        y.backward(gy.to(y.dtype))
        results[layer] = [y, x_in.grad, *(p.grad for name in layer.adapter_names
                                          for p in layer.adapter_weights(name))]
    for got, want in zip(results[low], results[exact]):
        assert normalised_error(got, want) <= TOLERANCE[dtype]


def _zero_some_magnitudes(layer) -> dict[str, list[int]]:
    """Zero a few columns of two adapters' m (g = 0 there: y = b keeps no trace of z)."""
    zeros = {"default": [0, 5], "user2": [3, 4, 28]}
    with torch.no_grad():
        for name, columns in zeros.items():
            layer.adapter_weights(name)[1][columns] = 0.0
    return zeros


@pytest.mark.parametrize("base_rows", [True, False])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_a_mixed_training_step_with_zero_magnitudes_against_float64(base_rows, detach_norm):
    """Where an adapter's m is 0 the step keeps z's columns: every adapter's dR and dm (those
    columns' dm included) and dx equal the float64 reference run on each adapter's own rows,
    with rows of the base model (z carries the bias) and without (the epilogue adds it)."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0,
                                    detach_norm=detach_norm)
    for i in range(1, 4):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.3)
    zeros = _zero_some_magnitudes(layer)
    rows = torch.tensor([2, 0, 4, 3, 1, 2] if base_rows else [2, 0, 3, 3, 1, 2])
    x = torch.randn(6, 5, 37, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, 5, 29, dtype=torch.float64)
    layer.row_adapters = rows
    layer(x).backward(gy)
    layer.row_adapters = None
    basis, w0 = layer, layer.base_weight().detach()
    x_ref = x.detach().clone().requires_grad_()
    for index, name in enumerate(layer.adapter_names):
        R, m = (p.detach().clone().requires_grad_() for p in layer.adapter_weights(name))
        own = rows == index
        edora_linear_reference(x_ref[own], w0, layer.bias.detach(), basis.A, basis.B, R, m,
                               basis.scaling, detach_norm=detach_norm).backward(gy[own])
        for got, want in zip((p.grad for p in layer.adapter_weights(name)), (R.grad, m.grad)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        if name in zeros:  # the zero columns' dm is a real, non-zero gradient
            assert (m.grad[zeros[name]].abs() > 1e-6).all()
    base_rows_x = rows == len(layer.adapter_names)
    F.linear(x_ref[base_rows_x], w0, layer.bias.detach()).backward(gy[base_rows_x])
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base_rows", [True, False])
def test_a_mixed_training_step_keeps_no_batch_by_out_tensor_beside_its_output(base_rows):
    """Like one adapter's step, a mixed layer keeps y (its output, which the next op usually
    keeps anyway) and nothing else of batch×out size: not z, not y0, not each row's g over its
    tokens (with no zero magnitude, no column of z either); nor its input x."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29), 3, seed=0)
    for i in range(1, 4):
        layer.add_adapter(f"user{i}", seed=i)
    x = torch.randn(6, 5, 37, requires_grad=True)
    kept = []
    layer.row_adapters = torch.tensor([2, 0, 4, 3, 1, 2] if base_rows else [2, 0, 3, 3, 1, 2])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = layer(x)
    layer.row_adapters = None
    big = [t for t in kept if t.shape[-1] == y.shape[-1] and t.numel() >= y.numel()]
    assert big and all(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                       for t in big), [tuple(t.shape) for t in big]
    assert not any(t is x for t in kept)  # nor x: v = x Aᵀ (N×r) is what the rank term needs


@pytest.mark.parametrize("training", [True, False])
def test_a_fused_optimizer_step_refreshes_what_the_adapters_cache(training):
    """torch's fused AdamW (transformers' Trainer default) writes R and m without moving their
    version counters: the norms kept for a trained set of adapters and a served set's tables
    are made again after any optimizer step, so the next batch matches a fresh computation."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29), 3, seed=0)
    for i in range(1, 4):
        layer.add_adapter(f"user{i}", seed=i)
    params = [p for name in layer.adapter_names for p in layer.adapter_weights(name)]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    x, rows = torch.randn(6, 5, 37), torch.tensor([2, 0, 3, 3, 1, 2])

    def run():
        layer.row_adapters = rows
        try:
            if training:
                return layer(x)
            with torch.no_grad():
                return layer(x)
        finally:
            layer.row_adapters = None

    run()  # fills the cache
    versions = [p._version for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert [p._version for p in params] == versions  # what makes the cache blind to it
    kept = run()
    layer.refresh_norm_terms()
    torch.testing.assert_close(kept, run(), rtol=0, atol=0)


def test_a_mixed_step_whose_output_is_written_in_place_says_how_to_fix_it():
    """Backward reads y: an in-place write into it after forward is refused with the fix."""
    layer = EDoRALinear.from_linear(nn.Linear(8, 6), 2, seed=0)
    layer.add_adapter("b", seed=1)
    layer.row_adapters = torch.tensor([1, 0])
    y = layer(torch.randn(2, 3, 8))
    layer.row_adapters = None
    torch.relu_(y)
    with pytest.raises(RuntimeError, match="mixed batch.*modified in place.*out of place"):
        y.sum().backward()


def test_zero_magnitudes_past_the_slots_get_nan_in_a_mixed_step(monkeypatch):
    """Off the CPU the step keeps ZERO_SLOTS columns per adapter (counting the zeros would read
    the device): a zero past them gets dm = NaN, loud, and every other gradient stays exact."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0)
    for i in range(1, 4):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.3)
    zeros = _zero_some_magnitudes(layer)  # user2 has 3 zeros: its third has no slot
    expected = {}
    for capacity in (2, 3):
        monkeypatch.setattr("edora_kernels.mixed.slot_capacity", lambda *args: capacity)
        layer.zero_grad()
        layer.row_adapters = torch.tensor([2, 0, 3, 3, 1, 2])
        layer(torch.randn(6, 5, 37, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))).sum().backward()
        layer.row_adapters = None
        expected[capacity] = {name: [p.grad.clone() for p in layer.adapter_weights(name)]
                              for name in layer.adapter_names}
    nan = expected[2]["user2"][1].isnan()
    assert nan.nonzero().flatten().tolist() == [zeros["user2"][2]]
    for name in layer.adapter_names:
        for got, want in zip(expected[2][name], expected[3][name]):
            torch.testing.assert_close(got[~got.isnan()], want[~got.isnan()], rtol=0, atol=0)


@pytest.mark.parametrize("base_rows", [True, False])
def test_a_mixed_training_step_takes_a_permuted_gradient(base_rows):
    """The gradient reaching a mixed layer may be a permuted view (attention reshapes its
    projections into heads): backward gives the same dx, dR and dm as for a contiguous one."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0)
    for i in range(1, 4):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.3)
    rows = torch.tensor([2, 0, 4, 3, 1, 2] if base_rows else [2, 0, 3, 3, 1, 2])
    x = torch.randn(6, 5, 37, dtype=torch.float64)
    weights = torch.randn(6, 29, 5, dtype=torch.float64)
    grads = []
    for permuted in (True, False):
        x_in = x.clone().requires_grad_()
        layer.zero_grad()
        layer.row_adapters = rows
        y = layer(x_in)
        layer.row_adapters = None
        if permuted:  # the gradient arrives as weights.transpose(1, 2), not contiguous
            (y.transpose(1, 2) * weights).sum().backward()
        else:
            y.backward(weights.transpose(1, 2).contiguous())
        grads.append([x_in.grad, *(p.grad for name in layer.adapter_names
                                   for p in layer.adapter_weights(name))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["peft", "lowrank"])
@pytest.mark.parametrize("second", [False, True])
def test_layer_mixed_rows_with_dropout_against_the_float64_reference(mode, second,
                                                                      monkeypatch):
    """Training-mode dropout in a mixed batch (base rows; one basis or two), with the dropout
    mask fixed: "peft" runs the base on the dropped input too and corrects by base(x) −
    base(x̃), "lowrank" feeds x̃ to the rank-r branch only."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0, dropout=0.25,
                                    dropout_mode=mode)
    layer.add_adapter("a", seed=1)
    if second:
        add_second_basis(layer, "c", rank=5, alpha=3.0, seed=3)
    else:
        layer.add_adapter("c", seed=3)
    jitter_adapters(layer, 0.3)
    x = torch.randn(5, 4, 37, dtype=torch.float64)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.25).double()
    monkeypatch.setattr(F, "dropout", lambda inp, p, training: inp * mask / (1 - p))
    rows = torch.tensor([2, 0, 3, 1, 2])  # c, default, base, a, c
    layer.train()
    layer.row_adapters = rows
    y = layer(x)
    layer.row_adapters = None
    w0, x_drop = layer.base_weight(), x * mask / 0.75
    for i, index in enumerate(rows.tolist()):
        if index == 3:
            want = F.linear(x[i], w0, layer.bias)
        elif mode == "peft":
            want = reference_row(layer, layer.adapter_names[index], x_drop[i]) \
                + (x[i] - x_drop[i]) @ w0.T
        else:
            name = layer.adapter_names[index]
            R, m = layer.adapter_weights(name)
            basis = layer.basis_of(name)
            V = w0 + basis.scaling * basis.B @ R.detach() @ basis.A
            low = basis.scaling * x_drop[i] @ (basis.B @ R.detach() @ basis.A).T
            want = (m.detach() / V.norm(dim=1)) * (x[i] @ w0.T + low) + layer.bias
        torch.testing.assert_close(y[i], want, rtol=0, atol=1e-12, msg=f"row {i}")


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_mixed_epilogue_node_passes_gradcheck(with_bias):
    """The one autograd node of a mixed training batch, in float64: gradients for y0 (the
    base's dx), x, the cores and the g table (so R, m and the norms), base rows included; the
    node running a dense base's product itself (dx through W0 too)."""
    from edora_kernels.mixed import mixed_epilogue, row_tables

    gen = torch.Generator().manual_seed(0)
    K, r, batch, T, in_f, out_f = 3, 4, 5, 3, 7, 6

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    y0, x = rand(batch, T, out_f, grad=True), rand(batch, T, in_f, grad=True)
    Rs, ms = rand(K, r, r, grad=True), rand(K, out_f, grad=True)
    A, B, bias = rand(r, in_f), rand(out_f, r), rand(out_f) if with_bias else None
    norms = (rand(K, out_f).abs() + 1.0).requires_grad_()  # as with detach_norm=False
    rows = torch.tensor([0, 3, 1, 2, 1])  # 3: a row of the base model

    def tables(Rs, ms, norms, base_row=True):  # each adapter's R and m its own tensor
        return row_tables(Rs.unbind(), ms.unbind(), norms, torch.float64, base_row)

    def epilogue(y0, x, Rs, ms, norms):
        return mixed_epilogue(y0, x, bias, A, B, tables(Rs, ms, norms), 0.7, rows)

    assert torch.autograd.gradcheck(epilogue, (y0, x, Rs, ms, norms))
    trained = epilogue(y0, x, Rs, ms, norms)
    with torch.no_grad():  # served (no autograd): the same values
        served = epilogue(y0, x, Rs, ms, norms)
    torch.testing.assert_close(served, trained, rtol=0, atol=1e-14)
    assert torch.equal(trained[1], y0[1]) and torch.equal(served[1], y0[1])  # the base row

    # Given the dense base's weight instead of y0, the node runs the base product itself
    weight = rand(out_f, in_f)

    def step(x, Rs, ms, norms):
        return mixed_epilogue(None, x, bias, A, B, tables(Rs, ms, norms), 0.7, rows,
                              weight=weight)

    assert torch.autograd.gradcheck(step, (x, Rs, ms, norms))
    base = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(step(x, Rs, ms, norms), epilogue(base, x, Rs, ms, norms),
                               rtol=0, atol=1e-14)
    with torch.no_grad():
        assert torch.equal(step(x, Rs, ms, norms)[1], base[1])

    # No row of the base model: the tables lack its row and the bias joins in the epilogue
    adapter_rows = torch.tensor([0, 2, 1, 2, 1])

    def step_without_base_rows(x, Rs, ms, norms):
        return mixed_epilogue(None, x, bias, A, B, tables(Rs, ms, norms, base_row=False), 0.7,
                              adapter_rows, weight=weight, base_rows=False)

    assert torch.autograd.gradcheck(step_without_base_rows, (x, Rs, ms, norms))
    with_base_row = mixed_epilogue(base, x, bias, A, B, tables(Rs, ms, norms), 0.7, adapter_rows)
    torch.testing.assert_close(step_without_base_rows(x, Rs, ms, norms), with_base_row,
                               rtol=0, atol=1e-14)


def test_a_layer_merges_and_unmerges_an_adapter_of_its_second_basis():
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29).double(), 3, seed=0)
    add_second_basis(layer, "c", rank=5, alpha=3.0, seed=3)
    jitter_adapters(layer, 0.3)
    layer.set_active_adapter("c")
    x = torch.randn(4, 37, dtype=torch.float64)
    with torch.no_grad():
        want, w0 = layer(x), layer.weight.clone()
        torch.testing.assert_close(want, reference_row(layer, "c", x), rtol=0, atol=1e-12)
        layer.merge()
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.base_weight(), w0, rtol=0, atol=1e-12)
        layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-12)


def test_a_mixed_batch_makes_the_host_wait_nowhere_and_serves_in_few_launches():
    """Which rows use which adapter is read on the host (heads included), each index reaches
    the device once per forward, and a served batch's tables are kept: no op that waits for
    the device, and on Triton two launches, the mixed prologue and the fused GEMM."""
    from edora_kernels.bench.launches import count_launches, stub_kernels
    from edora_kernels.mixed import RowAssignment
    from edora_kernels.plan import plan_mixed

    model = three_adapters()
    with torch.no_grad():
        model(input_ids=IDS, adapter_names=NAMES)
        log = count_launches(lambda: model(input_ids=IDS, adapter_names=NAMES))
    assert log.syncs == []
    with stub_kernels():  # on meta tensors: the ops a GPU would run
        layer = EDoRALinear.from_linear(nn.Linear(64, 48), 8, seed=0, backend="triton")
        for i in range(1, 8):
            layer.add_adapter(f"user{i}", seed=i)
        layer = layer.to(torch.bfloat16).to("meta")
        x = torch.empty(8, 4, 64, dtype=torch.bfloat16, device="meta")
        rows = torch.tensor([3, 0, 8, 1, 7, 7, 2, 5])
        layer.row_adapters = RowAssignment(rows)
        with torch.no_grad():
            layer(x)  # the served adapters' tables are made once
            layer.row_adapters = RowAssignment(rows)  # the next forward
            first = count_launches(lambda: layer(x))  # + each index's copy to the device
            again = count_launches(lambda: layer(x))  # the next layer of the same forward
    assert first.syncs == again.syncs == []
    # the launch list the cost model times (edora-kernels plan --adapters)
    assert again.launches == [launch.name for launch in plan_mixed(32, 64, 48, 8, 8).launches]
    assert again.launches == ["triton::mixed_prologue_kernel", "triton::edora_fwd_kernel"]
    assert first.launches == ["aten::copy_"] * 2 + again.launches  # rows, tokens' rows


def test_a_mixed_training_step_makes_the_host_wait_nowhere():
    """Forward and backward of a mixed batch on the tensors a GPU would hold (meta): the K
    adapters' norms, tables and per-adapter sums need nothing read back, with and without rows
    of the base model."""
    from edora_kernels.bench.launches import count_launches, stub_kernels
    from edora_kernels.mixed import RowAssignment

    with stub_kernels():
        layer = EDoRALinear.from_linear(nn.Linear(64, 48), 4, seed=0, backend="triton")
        for i in range(1, 12):  # K = 12 > 2r: the norms' row-feature GEMMs
            layer.add_adapter(f"user{i}", seed=i)
        layer = layer.to("meta")
        x = torch.empty(12, 3, 64, device="meta", requires_grad=True)
        for rows in (torch.arange(12), torch.tensor([12, *range(11)])):  # 12: the base model
            def step(rows=rows):
                layer.row_adapters = RowAssignment(rows)
                layer(x).sum().backward()

            step()  # the norm terms are made once
            log = count_launches(step)
            assert log.syncs == [] and len(log.launches) > 0


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


def _w0_reads(adapters: int, second_basis: bool = False) -> tuple[int, int]:
    """W0 reads of one mixed training step with ``adapters`` adapters (every other one on a
    second basis of rank 6), and the layer count."""
    model = get_edora_model(classifier(), config())
    for i in range(1, adapters):
        model.add_adapter(f"user{i}", config(seed=i, r=6 if second_basis and i % 2 else 4))
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
    two_bases, _ = _w0_reads(8, second_basis=True)
    # x W0ᵀ forward, gy W0 backward (layer 0's query and value get no dx: their input is
    # the frozen embedding's output)
    assert one == many == two_bases == 2 * layers - 2


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


def test_a_model_that_served_and_saved_adapters_pickles(tmp_path):
    """The caches a mixed batch and save_pretrained leave behind (norms per adapter, W0's
    digest: weak references to storages) do not travel into a pickle or a copy."""
    import io

    model, _, _ = _served_on_two_bases(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=IDS, adapter_names=TWO_BASES).logits
    model.save_pretrained(tmp_path / "saved")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS, adapter_names=TWO_BASES).logits, expected)
    assert restored.basis_fingerprint("c") == model.basis_fingerprint("c")


def test_an_adapter_of_another_basis_is_refused_naming_what_differs(tmp_path):
    model = three_adapters()
    model.save_pretrained(tmp_path)
    other = classifier()
    with torch.no_grad():
        other.bert.encoder.layer[1].attention.self.value.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"layer 'bert\.encoder\.layer\.1\.attention\.self\."
                                         r"value': W0's bytes differ"):
        EDoRAModel.from_pretrained(other, tmp_path)
    assert not edora_layers(other)  # refused: the model as it came
    tweaked = get_edora_model(other, config())
    with pytest.raises(ValueError, match=r"basis .* of another base model than this one .*"
                                         r"layer 'bert\.encoder\.layer\.1\.attention\.self\."
                                         r"value': W0's bytes differ"):
        tweaked.load_adapter(tmp_path / "a", "a")
    # the same base model, another seed: the tree carries that basis, but not where the
    # adapter's directory alone is found
    alone = tmp_path / "elsewhere" / "a"
    shutil.copytree(tmp_path / "a", alone)
    reseeded = get_edora_model(classifier(), config(seed=9))
    with pytest.raises(ValueError, match="trained on basis .*: seed: adapter 0, model 9.*does "
                                         "not carry that basis"):
        reseeded.load_adapter(alone, "a")
    with pytest.raises(ValueError, match="not the one 'default' holds.*another name"):
        reseeded.load_adapter(tmp_path, "default")
    narrower = get_edora_model(classifier(), config(r=6, target_modules=["query"]))
    narrower.save_pretrained(tmp_path / "narrower")
    with pytest.raises(ValueError, match=r"adapts other layers than this model's adapters \(only "
                                         r"the adapter: \[\], only the model: \['bert\.encoder"
                                         r"\.layer\.0\.attention\.self\.value'"):
        reseeded.load_adapter(tmp_path / "narrower", "narrower")
    assert reseeded.adapter_names() == ["default"]  # nothing added
    assert all(not layer.extra_bases for layer in edora_layers(reseeded).values())


def _second_tree(tmp_path):
    """A tree trained on the same base model with another basis (r=6, alpha 3, seed 9):
    "default" at its root, "c" in a subdirectory (R and m only)."""
    settings = {"r": 6, "alpha": 3.0, "target_modules": ["query", "value"],
                "task_type": "SEQ_CLS"}
    other = get_edora_model(classifier(), EDoRAConfig(seed=9, **settings))
    other.add_adapter("c", EDoRAConfig(seed=11, **settings))
    _perturb(other, ["default", "c"])
    other.save_pretrained(tmp_path)
    return other


def _served_on_two_bases(tmp_path, is_trainable=False):
    """The three-adapter tree's model, then the second tree's adapters loaded beside them."""
    model = three_adapters()
    model.save_pretrained(tmp_path / "first")
    other = _second_tree(tmp_path / "second")
    served = EDoRAModel.from_pretrained(classifier(), tmp_path / "first",
                                        is_trainable=is_trainable)
    served.load_adapter(tmp_path / "first" / "a", "a", is_trainable=is_trainable)
    served.load_adapter(tmp_path / "second", "other", is_trainable=is_trainable)  # its root
    served.load_adapter(tmp_path / "second" / "c", "c", is_trainable=is_trainable)
    return served, model, other


TWO_BASES = ["other", "default", BASE_NAME, "c", "a", "other"]


def test_an_adapter_of_another_basis_loads_with_the_basis_its_tree_carries(tmp_path):
    served, model, other = _served_on_two_bases(tmp_path)
    for layer in edora_layers(served).values():  # the second basis once, shared by two
        assert [b.rank for b in layer.extra_bases.values()] == [6]
        assert layer.basis_of("other") is layer.basis_of("c") is not layer
    assert served.basis_fingerprint("c") == other.basis_fingerprint()
    assert served.basis_fingerprint("a") == model.basis_fingerprint()
    source = {"default": (model, "default"), "a": (model, "a"), "other": (other, "default"),
              "c": (other, "c"), BASE_NAME: (model, BASE_NAME)}
    with torch.no_grad():
        mixed = served(input_ids=IDS, adapter_names=TWO_BASES).logits
        for i, name in enumerate(TWO_BASES):
            trained, adapter = source[name]
            torch.testing.assert_close(mixed[i], _alone(trained, adapter, [i])[0], rtol=0,
                                       atol=1e-12, msg=name)
            torch.testing.assert_close(_alone(served, name, [i])[0], mixed[i], rtol=0,
                                       atol=1e-12, msg=name)
    # saved once more: the second basis goes with the first adapter written on it, once
    served.save_pretrained(tmp_path / "both")
    from safetensors.torch import load_file
    keys = {n: set(load_file(tmp_path / "both" / n / "adapter_model.safetensors"))
            for n in ("a", "other", "c")}
    assert any(k.endswith(".A") for k in keys["other"])
    assert all(k.endswith((".R", ".magnitude")) for k in keys["a"] | keys["c"])
    restored = EDoRAModel.from_pretrained(classifier(), tmp_path / "both")
    for name in ("a", "other", "c"):
        restored.load_adapter(tmp_path / "both" / name, name)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=IDS, adapter_names=TWO_BASES).logits, mixed)
    # saved alone, "c" carries its basis (its own seed is not the basis's) and loads by itself
    served.save_pretrained(tmp_path / "only_c", selected_adapters=["c"])
    alone = EDoRAModel.from_pretrained(classifier(), tmp_path / "only_c" / "c", adapter_name="c")
    with torch.no_grad():
        assert torch.equal(alone(input_ids=IDS).logits, _alone(served, "c", slice(None)))
    # the basis leaves with its last adapter
    served.delete_adapter("other")
    assert all(len(layer.extra_bases) == 1 for layer in edora_layers(served).values())
    served.delete_adapter("c")
    assert all(not layer.extra_bases for layer in edora_layers(served).values())
    assert served.adapter_names() == ["default", "a"]


def test_an_adapter_added_with_another_rank_gets_the_basis_get_edora_model_builds(tmp_path):
    model = three_adapters()
    big = config(seed=9, r=6, alpha=3.0)
    model.add_adapter("big", big)
    fresh = get_edora_model(classifier(), big)
    for name, layer in edora_layers(model).items():
        own = layer.basis_of("big")
        assert own is not layer and (own.rank, own.alpha) == (6, 3.0)
        assert torch.equal(own.A, edora_layers(fresh)[name].A)
        assert torch.equal(own.B, edora_layers(fresh)[name].B)
    assert model.basis_fingerprint("big") == fresh.basis_fingerprint()
    with torch.no_grad():  # it starts as the base model (to within R's tiny random start)
        model.set_adapter("big")
        started = model(input_ids=IDS).logits
        with model.disable_adapter():
            torch.testing.assert_close(started, model(input_ids=IDS).logits, rtol=0,
                                       atol=1e-6)
    # an adapter trained on that basis elsewhere loads onto it (the tree's copy is not used)
    _perturb(fresh, ["default"])
    fresh.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "trained")
    for layer in edora_layers(model).values():
        assert layer.basis_of("trained") is layer.basis_of("big")
        assert len(layer.extra_bases) == 1
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["trained", "a", "big"] * 2).logits
        torch.testing.assert_close(mixed[0::3], fresh(input_ids=IDS[0::3]).logits, rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(mixed[2::3], started[2::3], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"alpha=5\.0 differs from its basis \(alpha=3\.0\)"):
        model.add_adapter("louder", config(seed=9, r=6, alpha=5.0))
    with pytest.raises(ValueError, match="rank 40 exceeds"):
        model.add_adapter("huge", config(r=40))
    assert model.adapter_names() == ["default", "a", "b", "big", "trained"]


def test_an_adapter_of_a_second_basis_exports_to_peft_and_merges(tmp_path):
    """The active adapter's own basis (rank 6, alpha 3) is what PEFT DoRA and the merged
    weight get."""
    peft = pytest.importorskip("peft")
    served, _, other = _served_on_two_bases(tmp_path)
    served.set_adapter("c")
    with torch.no_grad():
        expected = served(input_ids=IDS).logits
        other.set_adapter("c")
        torch.testing.assert_close(expected, other(input_ids=IDS).logits, rtol=0, atol=1e-12)
    export_peft_dora(served, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(classifier(), tmp_path / "peft").eval()
    assert exported.peft_config["default"].r == 6
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=IDS).logits, expected, rtol=1e-5,
                                   atol=1e-5)
        merged = served.merge_and_unload()
        assert not edora_layers(merged)
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)


def test_adapters_on_two_bases_train_in_one_mixed_batch(tmp_path):
    served, _, _ = _served_on_two_bases(tmp_path, is_trainable=True)
    _check_multi_tenant_step(served, TWO_BASES)


def test_a_loaded_second_basis_serves_hot_swaps_without_reading_w0(tmp_path, monkeypatch):
    served, _, other = _served_on_two_bases(tmp_path)
    with torch.no_grad():
        served(input_ids=IDS, adapter_names=TWO_BASES)  # norm terms of both bases cached
    from edora_kernels import basis, layer, norm
    reads = []
    monkeypatch.setattr(basis, "_digest", lambda t: reads.append("digest"))
    monkeypatch.setattr(norm, "compute_norm_terms", lambda *a: reads.append("norm"))
    monkeypatch.setattr(layer, "compute_norm_terms", lambda *a: reads.append("norm"))
    served.load_adapter(tmp_path / "second" / "c", "c2")  # a new one on the loaded basis
    served.load_adapter(tmp_path / "second", "c")          # replace one
    served.load_adapter(tmp_path / "second" / "c", "a")    # one of the model's basis, too
    with torch.no_grad():
        got = served(input_ids=IDS, adapter_names=["c2", "c", "a"] * 2).logits
    assert reads == []
    with torch.no_grad():
        for rows, adapter in ((slice(0, None, 3), "c"), (slice(1, None, 3), "default"),
                              (slice(2, None, 3), "c")):
            other.set_adapter(adapter)
            torch.testing.assert_close(got[rows], other(input_ids=IDS[rows]).logits, rtol=0,
                                       atol=1e-12)
    layers = edora_layers(served).values()
    assert all(layer.basis_of("a") is layer.basis_of("c") for layer in layers)


def test_a_damaged_adapter_of_another_basis_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    served, _, _ = _served_on_two_bases(tmp_path)
    served.delete_adapter("other")
    served.delete_adapter("c")
    before = {n: t.clone() for n, t in served.state_dict().items()}
    damaged = tmp_path / "second" / "damaged"
    shutil.copytree(tmp_path / "second" / "c", damaged)
    state = load_file(damaged / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith(".R"))
    state[key] = state[key][:, :5].contiguous()
    save_file(state, damaged / "adapter_model.safetensors",
              metadata={"format": "edora_kernels.adapter_cores", "format_version": "1"})
    for name in ("a", "new"):  # replacing one of the model's basis, adding one
        with pytest.raises(ValueError, match=rf"as adapter '{name}': bad tensors: .*R: got "
                                             r"\(6, 5\), expected \(6, 6\)"):
            served.load_adapter(damaged, name)
    assert served.adapter_names() == ["default", "a"]
    assert all(not layer.extra_bases for layer in edora_layers(served).values())
    after = served.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[n], t) for n, t in before.items())


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
    with pytest.raises(ValueError, match=r"alpha=2\.0 differs from its basis \(alpha=8\.0\)"):
        model.add_adapter("x", config(alpha=2.0))
    with pytest.raises(ValueError, match=r"dropout=0\.1 differs from its basis"):
        model.add_adapter("x", config(r=6, dropout=0.1))
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
    model.set_adapter(["default", "x", "default"])
    assert model.active_adapters == ["default", "x"]
    with pytest.raises(ValueError, match="active together: pass adapter_names"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match=r"merge_and_unload takes one adapter, and "
                                         r"\['default', 'x'\] are active"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="export_peft_dora takes one adapter"):
        export_peft_dora(model, "never-written")
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


def _triton_layer_with_adapters(kind, in_f, out_f, rank, dtype, second):
    """A Triton layer on a dense ("linear", in ``dtype``) or nf4 base with adapters "default",
    "a" and "b" (and "c" on a second basis if ``second``), all moved off their initial state."""
    torch.manual_seed(0)
    if kind == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(in_f, out_f, quant_type="nf4", compute_dtype=torch.float32)
        base.load_state_dict(nn.Linear(in_f, out_f).state_dict())
        base = base.to("cpu")
    else:
        base = nn.Linear(in_f, out_f, dtype=dtype)
    layer = EDoRALinear.from_linear(base, rank, seed=0, backend="triton")
    for name, seed in (("a", 1), ("b", 2)):
        layer.add_adapter(name, seed=seed)
    if second:
        add_second_basis(layer, "c", rank=rank + 2, alpha=5.0, seed=4)
    jitter_adapters(layer, 0.3)
    return layer


@pytest.mark.parametrize("kind, in_f, out_f, rank, tokens, second, dtype", [
    ("linear", 37, 45, 1, 1, False, torch.float32), ("linear", 64, 48, 3, 7, False, BF16),
    ("linear", 40, 24, 16, 5, False, torch.float32), ("linear", 37, 45, 3, 2, True, BF16),
    ("linear", 37, 45, 3, 2, True, torch.float32),
    ("nf4", 64, 48, 3, 7, False, torch.float32),  # bnb's CPU 4-bit kernel: 64 | in
    ("nf4", 64, 48, 3, 2, True, torch.float32)])
def test_triton_serves_a_mixed_batch_in_one_launch(kind, in_f, out_f, rank, tokens, second,
                                                    dtype, monkeypatch, interpreter_bf16_dot):
    """Serving (no grad) on the Triton backend: two launches — the prologue (x Aᵀ and each
    token's core applied to it) and the forward GEMM (or the epilogue pass over a quantized
    base's y0) with g per token from the adapters' table —, against the composed path and the
    float64 reference; base rows are the base layer. With adapters on a second basis: the two
    per basis, the epilogue over the shared y0. In fp32 and in bf16 (the serving dtype; fp32
    adapters)."""
    from edora_kernels.backends.triton import mixed as triton_mixed
    from edora_kernels.backends.triton.launch import kernel_name

    layer = _triton_layer_with_adapters(kind, in_f, out_f, rank, dtype, second)
    launches = []
    monkeypatch.setattr(triton_mixed, "launch",
                        lambda kernel, grid, **args: launches.append((kernel_name(kernel), args))
                        or kernel[grid](**args))
    rows = torch.tensor([1, 0, 4, 2, 1, 3] if second else [1, 0, 3, 2, 1])
    x = torch.randn(len(rows), tokens, in_f).to(dtype)
    check_served_mixed_batch(layer, rows, x, dtype)
    main = "edora_fwd_kernel" if kind == "linear" and not second else "edora_epilogue_kernel"
    assert [name for name, _ in launches] == ["mixed_prologue_kernel", main] * (1 + second)
    assert all(args["G_ROWS"] for name, args in launches if name == main)


@pytest.mark.parametrize("kind, in_f, out_f, rank, tokens, second, dtype, zeros, detach", [
    ("linear", 37, 45, 1, 1, False, torch.float32, False, True),
    ("linear", 64, 48, 3, 7, False, BF16, True, True),
    ("linear", 40, 24, 16, 5, False, torch.float32, True, True),
    ("linear", 40, 24, 16, 5, False, torch.float32, True, False),  # tables made by torch
    ("linear", 37, 45, 3, 70, False, torch.float32, False, True),  # several row blocks a row
    ("linear", 70, 66, 64, 3, False, torch.float32, False, True),
    ("linear", 37, 45, 3, 2, True, BF16, False, True),  # a second basis: an epilogue per basis
    ("nf4", 64, 48, 3, 7, False, torch.float32, True, True)])
def test_triton_trains_a_mixed_batch_in_its_kernels(kind, in_f, out_f, rank, tokens, second,
                                                    dtype, zeros, detach, monkeypatch,
                                                    interpreter_bf16_dot):
    """Training (forward and backward) on the Triton backend: the prologue (the adapters' norms
    and tables, v and each token's t), the slots of the zero-g columns, the forward GEMM (or
    epilogue pass) with g per token; the pre-pass with each program on one row's adapter, the
    dx GEMM and the finalize (each adapter's dR and dm from its rows' partials), nothing else
    of batch×out size; y, dx and every adapter's dR and dm against the
    float64 layer (a quantized base: against the composed fp32 path), with zero magnitudes in
    two adapters (their dm included), odd shapes, r ∈ {1, 3, 16, 64}, base rows. With the
    norm's gradient (detach_norm=False) torch makes the tables and the norms, differentiably,
    and the finalize gives the tables' gradients."""
    from edora_kernels.backends.triton import mixed as triton_mixed

    layer = _triton_layer_with_adapters(kind, in_f, out_f, rank, dtype, second)
    layer.detach_norm = detach
    if zeros:
        with torch.no_grad():
            layer.adapter_weights("default")[1][[0, 5]] = 0.0
            layer.adapter_weights("a")[1][[3, 4, out_f - 1]] = 0.0
    rows = torch.tensor([1, 0, 4, 2, 1, 3] if second else [1, 0, 3, 2, 1])
    x = torch.randn(len(rows), tokens, in_f).to(dtype)
    gy = torch.randn(len(rows), tokens, out_f)
    if kind == "nf4":
        expected_dtype, expected = dtype, copy.deepcopy(layer)
    else:
        expected_dtype, expected = torch.float64, copy.deepcopy(layer).double()
    expected.backend = "torch"
    want = mixed_training_results(expected, rows, x.to(expected_dtype), gy)
    kernels = []
    monkeypatch.setattr(triton_mixed, "launch", lambda kernel, grid, **args:
                        kernels.append(kernel_name(kernel)) or kernel[grid](**args))
    got = mixed_training_results(layer, rows, x, gy)
    for i, (actual, reference) in enumerate(zip(got, want)):
        assert_close(actual, reference.double(), dtype, f"result {i}")
    if zeros:  # the zero columns' dm is a real gradient
        assert (layer.adapter_weights("a")[1].grad[[3, 4]].abs() > 1e-6).all()
    main = "edora_fwd_kernel" if kind == "linear" and not second else "edora_epilogue_kernel"
    forward = ["mixed_prologue_kernel", "mixed_slots_kernel", main]
    backward = (["prepass_kernel"] + (["edora_dx_kernel"] if main == "edora_fwd_kernel" else [])
                + ["finalize_kernel"])
    assert kernels == forward * (1 + second) + backward * (1 + second)


def test_zero_magnitudes_past_the_slots_get_nan_in_a_triton_mixed_step(monkeypatch):
    """The Triton step keeps z for every token at the columns where some adapter's g is 0, up
    to ZERO_SLOTS of them on a GPU: a zero past them gets dm = NaN for the adapters zero there,
    and every other gradient is the one with room for all (to fp32 rounding)."""
    torch.manual_seed(0)
    layer = EDoRALinear.from_linear(nn.Linear(37, 29), 3, seed=0, backend="triton")
    for i in range(1, 3):
        layer.add_adapter(f"user{i}", seed=i)
    jitter_adapters(layer, 0.3)
    with torch.no_grad():
        layer.adapter_weights("default")[1][[0, 5]] = 0.0
        layer.adapter_weights("user2")[1][[3, 5]] = 0.0  # columns 0, 3, 5: two slots leave 5
    x, gy = torch.randn(4, 5, 37), torch.randn(4, 5, 29)
    results = {}
    for capacity in (2, 3):
        monkeypatch.setattr("edora_kernels.mixed.slot_capacity", lambda *args: capacity)
        results[capacity] = mixed_training_results(layer, torch.tensor([2, 0, 1, 2]), x, gy)
    for name, (R_index, nan_columns) in {"default": (2, [5]), "user1": (4, []),
                                         "user2": (6, [5])}.items():
        dm = results[2][R_index + 1]
        assert dm.isnan().nonzero().flatten().tolist() == nan_columns, name
    for got, want in zip(results[2], results[3]):
        finite = ~got.isnan()
        # (an adapter nonzero at a column that lost its slot takes Σ gy ⊙ (y − b) / m there
        # instead of Σ gy ⊙ z: the same number, rounded differently)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=1e-7)
