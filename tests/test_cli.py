"""The ``edora-kernels`` command line on tiny shapes: info, bench (CSV and JSON; op, --init),
plot, check."""
import csv
import importlib.util
import json

import pytest
import torch

from edora_kernels import backends
from edora_kernels.backends import torch_backend
from edora_kernels.bench import init as init_bench
from edora_kernels.bench.io import BENCH_COLUMNS, append_rows
from edora_kernels.cli import main
from edora_kernels.svd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLE
from edora_kernels.tolerances import TOLERANCE

HAS_PEFT = importlib.util.find_spec("peft") is not None
PROVIDERS = ["frozen", "reference", "torch"] + (["peft_lora", "peft_dora"] if HAS_PEFT else [])
TOKENS, IN, OUT, RANK = 16, 24, 40, 4
TINY = ["--tokens", str(TOKENS), "--shapes", f"{IN}x{OUT}", "--ranks", str(RANK),
        "--repeats", "3", "--warmup", "1", "--providers", ",".join(PROVIDERS)]


# The LLaMA-7B init case at 1/64 of every dimension (64x64 .. 172x64), on CPU: a few seconds.
INIT_RANK, INIT_REPEATS = 4, 2
INIT_TINY = ["bench", "--init", "--init-llama7b", "--init-shrink", "64", "--init-device", "cpu",
             "--ranks", str(INIT_RANK), "--repeats", str(INIT_REPEATS), "--warmup", "0"]
OP_TINY = ["bench", "--tokens", "8", "--shapes", "16x16", "--ranks", "2", "--repeats", "1",
           "--warmup", "0", "--providers", "frozen,torch", "--modes", "fwd"]


@pytest.fixture
def no_init_pause(monkeypatch):
    """The init benchmark sleeps before each timed call to let BLAS threads idle: not needed
    to test its output, and most of its time here."""
    monkeypatch.setattr(init_bench, "PAUSE_S", 0.0)


def _read_csv(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == BENCH_COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One tiny op benchmark run, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    return out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "backends:" in text


def test_bench_writes_valid_csv(bench_dir):
    (path,) = bench_dir.glob("bench_*.csv")
    rows = _read_csv(path)
    metrics = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    for provider in PROVIDERS:
        for mode in ("fwd", "fwd+bwd"):
            time = metrics[(provider, mode, "time_ms")]
            p20, p50, p80 = (float(time[k]) for k in ("p20", "p50", "p80"))
            assert 0 < p20 <= p50 <= p80
            assert float(metrics[(provider, mode, "ratio_to_frozen")]["p50"]) > 0
            assert float(metrics[(provider, mode, "tflops")]["p50"]) > 0
            assert float(metrics[(provider, mode, "max_error")]["p50"]) <= TOLERANCE[torch.float32]
        assert (provider, "fwd+bwd", "saved_bytes") in metrics
    assert float(metrics[("frozen", "fwd", "ratio_to_frozen")]["p50"]) == 1.0
    # The torch backend keeps v (N×r), z (N×out) and the per-step float64 norm n (out).
    saved = float(metrics[("torch", "fwd+bwd", "saved_bytes")]["p50"])
    assert saved == TOKENS * (OUT + RANK) * 4 + OUT * 8
    row = rows[0]
    assert row["kernel"] == "edora_linear" and row["dtype"] == "float32"
    assert row["shape"] == f"N={TOKENS};in={IN};out={OUT};r={RANK}"
    assert row["device"] and "torch=" in row["versions"] and row["timestamp"].endswith("Z")
    assert len({r["timestamp"] for r in rows}) == 1


def test_bench_writes_json(bench_dir):
    (path,) = bench_dir.glob("bench_*.json")
    run = json.loads(path.read_text())
    assert {r["provider"] for r in run["results"]} == set(PROVIDERS)
    assert all(len(r["seconds"]) == 3 for r in run["results"])
    assert run["settings"]["repeats"] == 3
    assert len(run["rows"]) == len(_read_csv(next(bench_dir.glob("bench_*.csv"))))


def test_bench_appends_to_the_csv(tmp_path):
    args = ["bench", "--tokens", "8", "--shapes", "16x16", "--ranks", "2", "--repeats", "1",
            "--warmup", "0", "--providers", "frozen,torch", "--modes", "fwd",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    (path,) = tmp_path.glob("bench_*.csv")
    assert path.read_text().count("kernel,provider,mode") == 1
    # 2 runs x 2 providers x (time, ratio, tflops, max_error); no saved_bytes in fwd mode, and
    # peak_bytes only on CUDA.
    rows = _read_csv(path)
    assert len(rows) == 2 * 2 * (4 + torch.cuda.is_available())
    assert len({r["timestamp"] for r in rows}) == 2


def test_bench_init_writes_csv_and_json(tmp_path, no_init_pause):
    assert main([*INIT_TINY, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("bench_*.csv")
    (json_path,) = tmp_path.glob("init_*.json")
    rows = _read_csv(csv_path)
    rsvd = f"edora_kernels.randomized_svd(p={DEFAULT_OVERSAMPLE},q={DEFAULT_N_ITER})"
    lowrank = f"torch.svd_lowrank(q={INIT_RANK + 10},niter=4)"
    accuracy = {"residual_ratio_mean", "residual_ratio_max", "sigma_rel_error_max"}
    metrics = {}
    for row in rows:
        metrics.setdefault(row["provider"], {})[row["metric"]] = row
    # apply_edora: time and speedup; the two factorisers also their accuracy on 3 matrices.
    assert set(metrics) == {"edora_kernels.apply_edora", rsvd, lowrank}
    assert set(metrics["edora_kernels.apply_edora"]) == {"time_s", "speedup_vs_svd_lowrank"}
    for provider in (rsvd, lowrank):
        assert set(metrics[provider]) == {"time_s", "speedup_vs_svd_lowrank"} | accuracy
        ratio = metrics[provider]["residual_ratio_max"]
        assert 1 - 1e-6 <= float(ratio["p50"]) < 1.1  # the rank-r optimum is a lower bound
    assert len(rows) == 2 + 2 * 5
    assert float(metrics[lowrank]["speedup_vs_svd_lowrank"]["p50"]) == pytest.approx(1.0)
    for by_metric in metrics.values():
        time = by_metric["time_s"]
        assert 0 < float(time["p20"]) <= float(time["p50"]) <= float(time["p80"])
    row = rows[0]
    assert {r["kernel"] for r in rows} == {"init_svd"}
    assert row["x"] == "llama-7b-224-shrink64" and row["dtype"] == "bfloat16"
    assert row["shape"].startswith("q_proj=64x64;") and f";rank={INIT_RANK};" in row["shape"]
    assert "scikit-learn=" in row["versions"] and len({r["timestamp"] for r in rows}) == 1
    run = json.loads(json_path.read_text())
    assert run["case"] == "llama-7b-224-shrink64" and len(run["rows"]) == len(rows)
    assert {e["provider"] for e in run["entries"]} == set(metrics)
    assert all(len(e["seconds"]) == INIT_REPEATS for e in run["entries"])
    settings = run["settings"]
    assert (settings["case"], settings["rank"], settings["shrink"], settings["dtype"]) == (
        "llama7b", INIT_RANK, 64, "bfloat16")


@pytest.mark.parametrize("args, kernel, json_prefix, n_rows", [
    # op: 2 providers x (time, ratio, tflops, max_error), plus peak_bytes on CUDA
    (OP_TINY, "edora_linear", "bench_", 2 * (4 + torch.cuda.is_available())),
    (INIT_TINY, "init_svd", "init_", 12),
], ids=["op", "init"])
def test_bench_default_out_dir(tmp_path, monkeypatch, no_init_pause, args, kernel, json_prefix,
                               n_rows):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["edora-results"]
    out = tmp_path / "edora-results"
    (csv_path,) = out.glob("bench_*.csv")
    rows = _read_csv(csv_path)
    assert len(rows) == n_rows and {r["kernel"] for r in rows} == {kernel}
    (json_path,) = out.glob("*.json")
    assert json_path.name.startswith(json_prefix)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("args, flag", [
    (["--init", "--init-shrink", "0"], "--init-shrink"),
    (["--init", "--init-device", "tpu"], "--init-device"),
    (["--init-orth"], "--init-orth"),
    (["--init-llama7b", "--init-shrink", "4"], "--init-llama7b"),
    (["--init", "--init-shrink", "4"], "--init-shrink"),  # the RoBERTa case has fixed sizes
    (["--init", "--init-orth", "--init-llama7b"], "--init-llama7b"),
    (["--init", "--model"], "--init"),
    (["--init", "--tokens", "8"], "--tokens"),
    (["--init", "--compile"], "--compile"),
    (["--init", "--init-orth", "--dtype", "bf16"], "--dtype"),
    (["--init", "--init-llama7b", "--dtype", "fp64"], "--dtype"),
    (["--init", "--ranks", "0"], "--ranks"),
    pytest.param(["--init", "--init-llama7b"], "--init-device", marks=NO_CUDA),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_init_rejects_bad_flags(tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "edora-kernels bench: error:" in err and flag in err.split("error:", 1)[1]
    assert not any(tmp_path.iterdir())  # rejected before anything ran


def test_append_refuses_another_schema(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        append_rows(path, [])


def test_bench_rejects_a_bad_shape(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--shapes", "1024"])
    assert exit_info.value.code == 2
    assert "INxOUT" in capsys.readouterr().err


def test_plot_writes_png(bench_dir, tmp_path):
    (path,) = bench_dir.glob("bench_*.csv")
    png = tmp_path / "chart.png"
    assert main(["plot", str(path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_passes(capsys):
    assert main(["check", "--backends", "torch"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    real_forward = torch_backend.forward

    def wrong_forward(*args):
        y, v, z = real_forward(*args)
        return y * (1 + 1e-3), v, z

    # backends.load caches the backend's functions: clear it so the patch is seen, and again after.
    monkeypatch.setattr(torch_backend, "forward", wrong_forward)
    backends.load.cache_clear()
    try:
        assert main(["check", "--backends", "torch"]) == 1
    finally:
        monkeypatch.undo()
        backends.load.cache_clear()
    assert "FAIL" in capsys.readouterr().out


def test_check_rejects_an_unknown_backend(capsys):
    assert main(["check", "--backends", "nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_PEFT or importlib.util.find_spec("transformers") is None,
                    reason="needs peft and transformers")
def test_bench_model_step(tmp_path):
    assert main(["bench", "--model", "micro", "--ranks", "4", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_*.csv")
    rows = _read_csv(path)
    providers = {r["provider"] for r in rows}
    assert {"peft_lora", "peft_dora", "torch"} <= providers
    assert {r["kernel"] for r in rows} == {"llama_train_step"}
    errors = [float(r["p50"]) for r in rows if r["metric"] == "max_error"]
    assert errors and max(errors) < 1e-4  # every adapter starts at (nearly) the base model
