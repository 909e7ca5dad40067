"""The streamed LLaMA-7B initialiser benchmark (``bench --init --init-llama7b`` on CPU) at 1/32 of
every dimension: the same factors as the initialiser on the weights held at once, its memory
accounting, a complete JSON, and no result file left behind by an interrupt."""
import json
import os

import pytest
import torch

from edora_kernels.bench import init as init_bench
from edora_kernels.bench import io as bench_io
from edora_kernels.cli import main
from edora_kernels.model import chunk_factors

SHRINK, RANK, DTYPE = 32, 4, torch.bfloat16
SHAPES = init_bench.llama_shapes(SHRINK)
GROUPS = init_bench.llama_groups(SHAPES)
TOTAL = init_bench.LLAMA_BLOCKS * len(SHAPES)
STREAM = ["bench", "--init", "--init-llama7b", "--init-shrink", str(SHRINK), "--init-device",
          "cpu", "--ranks", str(RANK), "--repeats", "2", "--warmup", "0"]
HAS_PROC = os.path.exists("/proc/self/clear_refs")


@pytest.fixture(scope="module")
def streamed():
    return init_bench.stream_llama(SHAPES, RANK, DTYPE)


@pytest.fixture
def no_pause(monkeypatch):
    monkeypatch.setattr(init_bench, "PAUSE_S", 0.0)


def test_groups_are_a_blocks_runs_of_one_shape():
    assert GROUPS == [("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj"),
                      ("down_proj",)]


def test_streamed_factors_equal_the_initialisers_on_the_weights_held_at_once(streamed):
    assert len(streamed.factors) == TOTAL
    names = [name for _ in range(init_bench.LLAMA_BLOCKS) for name in init_bench.LLAMA_BLOCK]
    for (A, B), name in zip(streamed.factors, names):
        out, inp = SHAPES[name]
        assert A.shape == (RANK, inp) and B.shape == (out, RANK) and A.dtype == B.dtype == DTYPE
    held = list(init_bench.llama_weights(SHAPES, "cpu", DTYPE))  # the whole model at once
    first = 0
    for index, (block, _, weights) in enumerate(held):
        if index in (0, 1, len(held) - 1):  # block 0's q-k-v-o and gate-up, the last down
            A, B = chunk_factors(list(map(init_bench.frozen_linear, weights)), RANK, seed=first)
            for i, w in enumerate(weights):
                a, b = streamed.factors[first + i]
                assert torch.equal(a, A[i].to(DTYPE)) and torch.equal(b, B[i].to(DTYPE))
                # A = Bᵀ W: the factors belong to this weight, not a neighbour's
                torch.testing.assert_close(a.float(), b.float().mT @ w.float(), rtol=0.02,
                                           atol=0.02)
        first += len(weights)
    # The sample kept in the compute dtype is block 0's first matrix of each group.
    assert list(streamed.sample) == [names[0] for names in GROUPS]
    for (U, S), name in zip(streamed.sample.values(), streamed.sample):
        assert U.dtype == S.dtype == torch.float32
        assert torch.equal(U.to(DTYPE), streamed.factors[names.index(name)][1])


def test_sample_weights_are_the_streamed_ones():
    held = [w for _, _, weights in init_bench.llama_weights(SHAPES, "cpu", DTYPE)
            for w in weights]
    sample = init_bench.sample_weights(SHAPES, DTYPE)
    names = list(init_bench.LLAMA_BLOCK)
    for name, w in sample.items():
        assert torch.equal(w, held[names.index(name)])


def test_memory_accounting(streamed):
    mem = streamed.memory
    gate = SHAPES["gate_proj"]
    assert mem.group_weights == 2 * gate[0] * gate[1] * DTYPE.itemsize  # gate-up, the largest
    assert mem.factors == sum(init_bench.LLAMA_BLOCKS * RANK * (o + i) * DTYPE.itemsize
                              for o, i in SHAPES.values())
    assert streamed.init_s > 0 and streamed.wall_s >= streamed.init_s
    if not HAS_PROC:
        assert mem.baseline is mem.init_peak is mem.working is None
        return
    assert 0 < mem.baseline <= mem.init_peak <= mem.process_peak
    assert mem.working == mem.init_peak - mem.baseline - mem.group_weights
    assert mem.working < init_bench.WORKING_BOUND


def test_cli_writes_complete_rows_and_json(tmp_path, no_pause, capsys):
    assert main([*STREAM, "--out", str(tmp_path)]) == 0
    (csv_file,) = tmp_path.glob("bench_*.csv")
    (json_file,) = tmp_path.glob("init_*.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([csv_file.name, json_file.name])
    run = json.loads(json_file.read_text())
    rows = bench_io.read_rows(csv_file)
    assert bench_io.read_json_rows(json_file) == rows
    assert run["case"] == f"llama-7b-224-shrink{SHRINK}" and run["settings"]["stream"] is True
    ours, theirs = run["entries"]
    assert ours["mode"] == "streamed" and theirs["provider"] == init_bench.SKLEARN
    assert len(ours["speedup"]) == len(theirs["seconds"]) == 2
    metrics = {(r["provider"], r["metric"]): r["p50"] for r in rows}
    assert metrics[(ours["provider"], "matrices_per_s")] == pytest.approx(
        TOTAL / ours["seconds"][0])
    for key in ("process_peak_rss", "group_weights", "factors", "wall_s", "energy_min",
                "speedup_vs_sklearn") + (("baseline_rss", "init_peak_rss") if HAS_PROC else ()):
        assert metrics[(ours["provider"], key)] > 0
    # (at this size within a page or two of 0, either side: the heap had room already)
    assert ((ours["provider"], "working_memory") in metrics) == HAS_PROC
    assert {"energy_min", "matrices_per_s"} <= {m for p, m in metrics if p == init_bench.SKLEARN}
    assert set(run["memory"]) == {"process_peak", "baseline", "init_peak", "group_weights",
                                  "factors", "working"}
    assert [s["name"] for s in run["sample"]] == [names[0] for names in GROUPS]
    for s in run["sample"]:
        assert 0.9 < s["energy"] <= 1 + 1e-6 and 0.9 < s["sklearn_energy"] <= 1 + 1e-6
        assert len(s["sklearn_seconds"]) == 2
    checks = run["checks"]
    assert {checks["working_memory"], checks["rate"]} <= {"PASS", "FAIL"}
    assert checks["rate_vs_sklearn"] == pytest.approx(metrics[(ours["provider"],
                                                               "speedup_vs_sklearn")])
    assert isinstance(checks["energy_below_sklearn"], list)
    out = capsys.readouterr().out
    assert f"{checks['working_memory']}  working memory" in out
    assert f"{checks['rate']}  rate" in out


def test_an_interrupt_leaves_no_result_file(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return chunk_factors(*args, **kwargs)

    monkeypatch.setattr(init_bench, "chunk_factors", interrupted)
    assert main([*STREAM, "--out", str(tmp_path)]) == 130
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "interrupted: no results written" in err and "bench: interrupted" in err


def test_an_interrupt_while_saving_keeps_each_file_whole(tmp_path, monkeypatch):
    row = dict.fromkeys(bench_io.BENCH_COLUMNS, "1")
    csv_file = bench_io.append_rows(tmp_path / "bench.csv", [row])
    before = csv_file.read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_io.append_rows(csv_file, [row, row])
    with pytest.raises(KeyboardInterrupt):
        bench_io.write_json(tmp_path / "run.json", {"rows": [row]})
    assert csv_file.read_bytes() == before  # the old file, whole; no new one, no temporary
    assert [p.name for p in tmp_path.iterdir()] == ["bench.csv"]
    monkeypatch.undo()
    bench_io.append_rows(csv_file, [row, row])
    assert len(bench_io.read_rows(csv_file)) == 3


def test_the_llama_case_streams_on_the_cpu_where_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_bench.default_init_device("llama7b") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert init_bench.default_init_device("llama7b") == torch.device("cuda")
    assert init_bench.default_init_device("roberta") == torch.device("cpu")
