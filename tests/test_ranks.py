"""The rank advisors (edora_kernels.ranks): energies equal an exact SVD's, the gradient share
equals the dense formula, the suggestions obey their rule, and the command writes a config that
EDoRAConfig reads, whole or not at all."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert_classifier

from edora_kernels import EDoRAConfig, EDoRALinear, get_edora_model
from edora_kernels import ranks as ranks_module
from edora_kernels.bench.io import write_atomically
from edora_kernels.cli import main
from edora_kernels.ranks import (
    LayerCurve,
    gradient_norm2,
    gradient_share,
    suggest_ranks,
    weight_energy,
)
from edora_kernels.svd import randomized_svd

transformers = pytest.importorskip("transformers")


def exact_energy(W: torch.Tensor, max_rank: int) -> list[float]:
    sigma = torch.linalg.svdvals(W.double())
    return (sigma[:max_rank].pow(2).cumsum(0) / sigma.pow(2).sum()).tolist()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                     n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("shard", [False, True])
def test_directory_energies_equal_an_exact_svd(tmp_path, shard):
    model = tiny_bert_classifier()
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    curves = weight_energy(tmp_path, ["query", "value", "intermediate.dense"], max_rank=40,
                           progress=False)
    assert [c.name for c in curves] == [f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in
                                        ("attention.self.query", "attention.self.value",
                                         "intermediate.dense")]
    for curve in curves:
        W = model.get_submodule(curve.name).weight.detach()
        assert (curve.in_features, curve.out_features) == (W.shape[1], W.shape[0])
        assert len(curve.share) == min(40, *W.shape)
        torch.testing.assert_close(torch.tensor(curve.share),
                                   torch.tensor(exact_energy(W, 40)), rtol=0, atol=1e-12)
    from_model = weight_energy(model, ["query", "value", "intermediate.dense"], max_rank=40,
                               progress=False)
    assert [c.share for c in from_model] == [c.share for c in curves]


def test_conv1d_layers_read_in_their_orientation(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    curves = weight_energy(tmp_path, ["c_attn", "c_fc"], max_rank=8, progress=False)
    first = model.transformer.h[0].attn.c_attn
    assert (curves[0].in_features, curves[0].out_features) == (32, 96) == (first.weight.shape)
    torch.testing.assert_close(torch.tensor(curves[0].share),
                               torch.tensor(exact_energy(first.weight.detach().T, 8)),
                               rtol=0, atol=1e-12)


def test_big_matrices_take_the_randomised_svd_and_agree(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(300, 120, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(200, 120, generator=gen, dtype=torch.float64)).Q
    W = (U * torch.arange(1, 121, dtype=torch.float64).pow(-1.0)) @ V.T
    monkeypatch.setattr(ranks_module, "EXACT_UP_TO", 100)
    called = []
    monkeypatch.setattr(ranks_module, "randomized_svd",
                        lambda *a, **k: called.append(a[1]) or randomized_svd(*a, **k))
    layer = torch.nn.Linear(200, 300, bias=False)
    layer.weight.data = W.float()
    model = torch.nn.Sequential(layer)
    curve, = weight_energy(model, ["0"], max_rank=16, progress=False)
    assert called == [16]
    torch.testing.assert_close(torch.tensor(curve.share), torch.tensor(exact_energy(W, 16)),
                               rtol=1e-5, atol=0)


def dense_gradient_share(model, batches, names, max_rank):
    """Σ_b ‖U_rᵀ G_b V_r‖² / Σ_b ‖G_b‖² with G_b the weight gradient autograd computes."""
    weights = {n: model.get_submodule(n).weight for n in names}
    bases = {n: randomized_svd(w.detach(), min(max_rank, *w.shape), seed=0)
             for n, w in weights.items()}
    projected = {n: torch.zeros(min(max_rank, *w.shape), dtype=torch.float64)
                 for n, w in weights.items()}
    total = dict.fromkeys(names, 0.0)
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
        for n, G in zip(names, grads):
            U, _, Vh = bases[n]
            M = (U.double().T @ G.double() @ Vh.double().T)
            projected[n] += torch.stack([M[:r, :r].pow(2).sum()
                                         for r in range(1, M.shape[0] + 1)])
            total[n] += G.double().pow(2).sum()
    for w in weights.values():
        w.requires_grad_(False)
    return {n: (projected[n] / total[n]).tolist() for n in names}


def test_gradient_share_equals_the_dense_formula():
    model = tiny_bert_classifier().train()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 97, (3, 7), generator=gen),
                "labels": torch.randint(0, 3, (3,), generator=gen)} for _ in range(3)]
    # dropout is 0: every forward of a batch gives the same gradient
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense",
             "classifier"]
    curves = gradient_share(model, batches, target_modules=names, max_rank=24, progress=False)
    expected = dense_gradient_share(model, batches, names, 24)
    for curve in curves:
        torch.testing.assert_close(torch.tensor(curve.share), torch.tensor(expected[curve.name]),
                                   rtol=1e-5, atol=1e-9)
    assert curves[-1].share[-1] < 1.0  # classifier: 3 outputs, its rank-3 core misses most of
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_gradient_norm_without_the_product_both_ways():
    gen = torch.Generator().manual_seed(2)
    for n in (5, 400):  # few rows: Gram blocks; many: column blocks of gyᵀ x
        x, gy = torch.randn(n, 30, generator=gen), torch.randn(n, 20, generator=gen)
        torch.testing.assert_close(gradient_norm2(x, gy),
                                   (gy.double().T @ x.double()).pow(2).sum(), rtol=1e-12, atol=0)


def test_gradient_share_refuses_bad_input_by_name():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="one-element tensor"):
        gradient_share(model, [{"input_ids": torch.tensor([[1, 2]])}],
                       lambda m, b: m(**b).logits, target_modules=["query"], progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        gradient_share(model, [], target_modules=["query"], progress=False)
    with pytest.raises(ValueError, match="layer 'classifier': no gradient reached"):
        gradient_share(model, [{"input_ids": torch.tensor([[1, 2]])}],
                       lambda m, b: m.bert(**b).last_hidden_state.pow(2).sum(),
                       target_modules=["query", "classifier"], progress=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def curve(name, share, out=10):
    return LayerCurve(name, 8, out, share)


def test_energy_rule_takes_the_smallest_rank_that_reaches_it():
    curves = [curve("a", [0.5, 0.8, 0.95, 1.0]), curve("b", [0.2, 0.3, 0.4])]
    advice = suggest_ranks(curves, energy=0.8)
    assert advice.ranks == {"a": 2, "b": 3} and advice.short == ["b"]
    assert advice.config() == {"r": 2, "rank_pattern": {"b": 3}, "target_modules": r"(.*\.)?(a|b)"}
    assert advice.trainable() == 4 + 10 + 9 + 10
    # a curve measured to full rank holds everything, though its last share rounds below 1
    full = suggest_ranks([curve("c", [0.6, 0.9, 0.999999999], out=3)], energy=1.0)
    assert full.ranks == {"c": 3} and full.short == []


def test_budget_rule_spends_at_most_the_budget_and_matches_the_best_choice():
    shares = [[0.6, 0.75, 0.85, 0.9], [0.3, 0.55, 0.7, 0.8], [0.1, 0.2, 0.3, 0.4]]
    curves = [curve(str(i), s, out=5) for i, s in enumerate(shares)]
    for budget in range(18, 64, 3):
        advice = suggest_ranks(curves, budget=budget)
        assert advice.trainable() <= budget
        best = max(sum(s[r - 1] for s, r in zip(shares, combo))
                   for combo in itertools.product(range(1, 5), repeat=3)
                   if sum(r * r + 5 for r in combo) <= budget)
        got = sum(c.at(advice.ranks[c.name]) for c in curves)
        assert got == pytest.approx(best, abs=1e-12), (budget, advice.ranks)


def best_by_cost(curves, budget) -> float:
    """The most summed share within ``budget``, by a dynamic programme over every total cost."""
    spare = budget - sum(1 + c.out_features for c in curves)
    held = [0.0] + [-math.inf] * spare  # the most share at exactly this cost above r = 1
    for c in curves:
        held = [max(held[b - r * r + 1] + s if r * r - 1 <= b else -math.inf
                    for r, s in enumerate(c.share, 1)) for b in range(spare + 1)]
    return max(held)


@pytest.mark.parametrize("concave", [True, False], ids=["energy-like", "gradient-like"])
def test_budget_rule_finds_the_best_mix_where_a_greedy_does_not(concave):
    """Growing the best share per number first leaves budget that another mix holds more with
    (such a greedy misses the best in 4 of these 40 cases with concave curves, in 24 of 40 with
    curves that are not, as gradient shares need not be)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        curves = []
        for i in range(10):
            gains = torch.rand(int(torch.randint(1, 12, (), generator=gen)), generator=gen,
                               dtype=torch.float64) ** 3
            gains = gains.sort(descending=True).values if concave else gains
            share = (gains.cumsum(0) / (2 * gains.sum())).tolist()
            curves.append(curve(f"l{i}", share, out=int(torch.randint(1, 9, (), generator=gen))))
        floor = sum(1 + c.out_features for c in curves)
        for budget in torch.randint(floor, floor + 400, (5,), generator=gen).tolist():
            advice = suggest_ranks(curves, budget=budget)
            assert advice.trainable() <= budget
            got = sum(c.at(advice.ranks[c.name]) for c in curves)
            assert got == pytest.approx(best_by_cost(curves, budget), abs=1e-9)


def test_bad_rules_are_refused_by_name():
    curves = [curve("a", [0.5, 1.0])]
    with pytest.raises(ValueError, match="exactly one of energy"):
        suggest_ranks(curves)
    with pytest.raises(ValueError, match="energy must be a share"):
        suggest_ranks(curves, energy=1.5)
    with pytest.raises(ValueError, match="below the least .* 11"):
        suggest_ranks(curves, budget=10)


def test_the_command_writes_a_config_that_edora_reads(tmp_path, capsys):
    model = tiny_bert_classifier()
    model.save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    assert main(["ranks", str(tmp_path / "bert"), "--budget", "900", "--target-modules",
                 "query,value,intermediate.dense", "--max-rank", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.*.attention.self.query" in printed and "budget 900" in printed
    config = EDoRAConfig.from_dict(json.loads((out / "ranks_bert.json").read_text()))
    chosen = json.loads((out / "ranks_bert_curves.json").read_text())["ranks"]
    assert (out / "ranks_bert.png").stat().st_size > 1000
    assert len(set(chosen.values())) > 1
    edora = get_edora_model(tiny_bert_classifier(), config)
    got = {n: m.rank for n, m in edora.get_base_model().named_modules()
           if isinstance(m, EDoRALinear)}
    assert got == chosen
    assert sum(r * r + 48 * ("intermediate" in n) + 32 * ("intermediate" not in n)
               for n, r in got.items()) <= 900


def test_an_interrupt_leaves_no_file(tmp_path, monkeypatch):
    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    calls = []

    def interrupted(W, max_rank):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [1.0] * max_rank
    monkeypatch.setattr(ranks_module, "_energy", interrupted)
    assert main(["ranks", str(tmp_path / "bert"), "--energy", "0.5", "--out", str(out)]) == 130
    assert list(out.iterdir()) == []

    def torn(path, data):  # part of the bytes reach the disk, then the write fails
        with open(path, "wb") as f:
            f.write(data[:1])
        raise OSError("disk full")
    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(out / "x.json", b"{}")
    assert list(out.iterdir()) == []


def test_the_command_names_what_is_wrong(tmp_path, capsys):
    assert main(["ranks", str(tmp_path), "--energy", "0.5", "--out", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    assert main(["ranks", str(tmp_path / "bert"), "--energy", "0.5", "--target-modules", "nope",
                 "--out", str(tmp_path / "o")]) == 1
    assert "selected no layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ranks", str(tmp_path / "bert"), "--energy", "0.5", "--budget", "9"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("tied", ["gpt2", "llama"])
def test_a_head_tied_to_the_embeddings_is_read_from_them(tmp_path, tied):
    """save_pretrained writes a tied weight once, under the embeddings' name."""
    if tied == "gpt2":
        model = tiny_gpt2()
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=30, tie_word_embeddings=True))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    from_directory, = weight_energy(tmp_path, ["lm_head"], max_rank=8, progress=False)
    from_model, = weight_energy(model, ["lm_head"], max_rank=8, progress=False)
    assert from_directory == from_model


def _broken(directory: Path, how: str) -> str:
    """Break the checkpoint saved in ``directory``; the file the error must name."""
    if how == "corrupt weights":
        (directory / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"garbage!")
        return str(directory / "model.safetensors")
    if how == "config not JSON":
        (directory / "config.json").write_text("{not json")
        return str(directory / "config.json")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["bert.encoder.layer.1.attention.self.query.weight"]
    if how == "missing shard":
        shard.unlink()
        return str(shard)
    if how == "corrupt shard":
        shard.write_bytes(b"\x10" + b"\0" * 7 + b"garbage!")
        return str(shard)
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return str(directory / "model.safetensors.index.json")


@pytest.mark.parametrize("how", ["corrupt weights", "config not JSON", "missing shard",
                                 "corrupt shard", "index without weight_map"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, how):
    sharded = how not in ("corrupt weights", "config not JSON")
    tiny_bert_classifier().save_pretrained(tmp_path / "bert",
                                           **({"max_shard_size": "20KB"} if sharded else {}))
    path = _broken(tmp_path / "bert", how)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["ranks", str(tmp_path / "bert"), "--energy", "0.5", "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err  # after the progress bar, for a shard read on the way
    assert "Traceback" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith("edora-kernels ranks: error: ") and path in err


@pytest.mark.parametrize("flag", ["--target-modules", "--exclude-modules"])
def test_a_bad_pattern_is_named_once(tmp_path, capsys, flag):
    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    assert main(["ranks", str(tmp_path / "bert"), "--energy", "0.5", flag, "[", "--out",
                 str(tmp_path / "o")]) == 1
    name = flag.removeprefix("--").replace("-", "_")
    assert capsys.readouterr().err == (f"edora-kernels ranks: error: {name} '[' is not a valid "
                                       "regular expression: unterminated character set at "
                                       "position 0\n")
