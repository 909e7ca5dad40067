"""The ``edora-kernels`` command line on tiny shapes: info, bench (CSV and JSON), plot, check."""
import csv
import importlib.util
import json

import pytest
import torch

from edora_kernels import backends
from edora_kernels.backends import torch_backend
from edora_kernels.bench.io import BENCH_COLUMNS, append_rows
from edora_kernels.cli import main
from edora_kernels.tolerances import TOLERANCE

HAS_PEFT = importlib.util.find_spec("peft") is not None
PROVIDERS = ["frozen", "reference", "torch"] + (["peft_lora", "peft_dora"] if HAS_PEFT else [])
TOKENS, IN, OUT, RANK = 16, 24, 40, 4
TINY = ["--tokens", str(TOKENS), "--shapes", f"{IN}x{OUT}", "--ranks", str(RANK),
        "--repeats", "3", "--warmup", "1", "--providers", ",".join(PROVIDERS)]


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
    # The torch backend keeps v (N×r), z (N×out) and the per-step norm n (out) for backward.
    saved = float(metrics[("torch", "fwd+bwd", "saved_bytes")]["p50"])
    assert saved == (TOKENS * (OUT + RANK) + OUT) * 4
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
    pytest.importorskip("edora_kernels.model", reason="apply_edora is not there yet")
    assert main(["bench", "--model", "micro", "--ranks", "4", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_*.csv")
    rows = _read_csv(path)
    providers = {r["provider"] for r in rows}
    assert {"peft_lora", "peft_dora", "torch"} <= providers
    assert {r["kernel"] for r in rows} == {"llama_train_step"}
    errors = [float(r["p50"]) for r in rows if r["metric"] == "max_error"]
    assert errors and max(errors) < 1e-4  # every adapter starts at (nearly) the base model
