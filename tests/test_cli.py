"""The ``edora-kernels`` command line on tiny shapes: info, bench (CSV and JSON; op, --init;
the OpenMP policy on CPU; burst timing on CUDA with fake events), plot (one run), check;
one-line argument errors, results saved as they are measured, failing providers."""
import csv
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from edora_kernels import backends
from edora_kernels.backends import torch_backend
from edora_kernels.bench import init as init_bench
from edora_kernels.bench import model_step, op, providers, timing
from edora_kernels.bench.io import BENCH_COLUMNS, append_rows, compact_stamp, csv_path
from edora_kernels.bench.plot import ratio_rows
from edora_kernels.cli import OMP_NOTE, OMP_POLICY, OMP_POLICY_SET_BY_BENCH, main
from edora_kernels.svd import DEFAULT_N_ITER, default_oversample
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


@pytest.fixture
def init_held(monkeypatch):
    """The LLaMA-7B init case with every weight held, as on a GPU: on the CPU it streams by
    default (tests/test_init_stream.py)."""
    run = functools.partial(init_bench.run_init_bench, stream=False)
    monkeypatch.setattr(init_bench, "run_init_bench", run)


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
    # The torch backend keeps its output y (N×out), v (N×r), the per-step float64 norm n and
    # the fp32 gate g (out each).
    saved = float(metrics[("torch", "fwd+bwd", "saved_bytes")]["p50"])
    assert saved == TOKENS * (OUT + RANK) * 4 + OUT * (8 + 4)
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
    y_mib, x_mib = (TOKENS * n * 4 / 2 ** 20 for n in (OUT, IN))
    (memory,) = [note for note in run["notes"] if note.startswith("saved MiB: the EDoRA")]
    assert f"y {y_mib:.3g} vs x {x_mib:.3g} MiB at {TOKENS}x{IN}x{OUT};" in memory


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


def test_bench_init_writes_csv_and_json(tmp_path, no_init_pause, init_held):
    assert main([*INIT_TINY, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("bench_*.csv")
    (json_path,) = tmp_path.glob("init_*.json")
    rows = _read_csv(csv_path)
    rsvd = f"edora_kernels.randomized_svd(p={default_oversample(INIT_RANK)},q={DEFAULT_N_ITER})"
    lowrank = f"torch.svd_lowrank(q={INIT_RANK + 10},niter=4)"
    accuracy = {"residual_ratio_mean", "residual_ratio_max", "sigma_rel_error_max",
                "energy_min", "energy_mean", "subspace_cos2_min", "subspace_cos2_mean"}
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
    assert len(rows) == 2 + 2 * (2 + len(accuracy))
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
    (INIT_TINY, "init_svd", "init_", 20),
], ids=["op", "init"])
def test_bench_default_out_dir(tmp_path, monkeypatch, no_init_pause, init_held, args, kernel,
                               json_prefix, n_rows):
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
    (["--init", "--ranks", "769"], "--ranks"),
    (["--init", "--init-llama7b", "--init-shrink", "64", "--ranks", "65"], "--ranks"),
    (["--init", "--init-llama7b", "--init-shrink", "5000"], "--init-shrink"),
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


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A CSV holding two op runs (the second with dropout), and the first run's JSON."""
    out = tmp_path_factory.mktemp("two_runs")
    assert main([*OP_TINY, "--out", str(out)]) == 0
    (first_json,) = out.glob("bench_*.json")
    assert main([*OP_TINY, "--dropout", "0.1", "--out", str(out)]) == 0
    stamps = sorted({r["timestamp"] for r in _read_csv(csv_path(out))})
    return csv_path(out), first_json, stamps


def _plotted_run(capsys, args: list[str], tmp_path) -> str:
    """Plot ``args``; the run the command says it drew, after checking the PNG exists."""
    png = tmp_path / "chart.png"
    assert main(["plot", *args, "--out", str(png)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {png}: run ") and png.is_file()
    return line.split(": run ", 1)[1].split(" ", 1)[0]


def test_plot_draws_the_latest_run_by_default(two_runs, tmp_path, capsys):
    path, _, (_, second) = two_runs
    assert _plotted_run(capsys, [str(path)], tmp_path) == second
    assert {r["timestamp"] for r in ratio_rows(path)} == {second}


@pytest.mark.parametrize("how", ["timestamp", "compact", "json"])
def test_plot_draws_the_run_asked_for(two_runs, tmp_path, capsys, how):
    path, first_json, (first, _) = two_runs
    results, run = {"timestamp": (path, first), "compact": (path, compact_stamp(first)),
                    "json": (first_json, None)}[how]
    args = [str(results)] + (["--run", run] if run else [])
    assert _plotted_run(capsys, args, tmp_path) == first
    rows = ratio_rows(results, run)
    assert {r["timestamp"] for r in rows} == {first}
    assert not [r for r in rows if "p0.1" in r["x"]]  # the dropout run's cases


def test_plot_rejects_a_run_that_is_not_there(two_runs, capsys):
    path, _, (first, second) = two_runs
    err = _one_line_error(capsys, ["plot", str(path), "--run", "2000-01-01T00:00:00.000Z"])
    assert (f"has no run '2000-01-01T00:00:00.000Z' with ratio_to_* rows; its runs: "
            f"{first}, {second}") in err


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


def test_a_bad_edora_backend_is_reported_where_it_is_read(monkeypatch, capsys):
    """EDORA_BACKEND replaces backend='auto' in every layer: info and check say what is wrong
    with it, and so does the layer's forward."""
    from edora_kernels import EDoRALinear

    monkeypatch.setenv("EDORA_BACKEND", "torch")
    assert main(["info"]) == 0
    assert "auto          torch on " in capsys.readouterr().out
    monkeypatch.setenv("EDORA_BACKEND", "foo")
    message = ("EDORA_BACKEND='foo' is not a backend; expected one of auto, torch, triton, cuda "
               "(or unset)")
    assert main(["info"]) == 1
    assert capsys.readouterr().err == f"edora-kernels info: error: {message}\n"
    assert main(["check", "--backends", "torch"]) == 2
    assert capsys.readouterr().err == f"edora-kernels check: error: {message}\n"
    layer = EDoRALinear.from_linear(torch.nn.Linear(16, 8), rank=2, seed=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(3, 16))
    if not torch.cuda.is_available():  # a backend that cannot run here, named by the variable
        monkeypatch.setenv("EDORA_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="EDORA_BACKEND=cuda: backend 'cuda' is not usable"):
            layer(torch.randn(3, 16))


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


# --- errors: one line naming the argument, exit status 2, before any work ------------------------

def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "usage:" not in err
    return err


@pytest.fixture
def no_op_bench(monkeypatch):
    """Records op benchmark runs instead of running them: a rejected command must run none."""
    calls = []
    monkeypatch.setattr(op, "run_op_bench", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize("args, message", [
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    (["--dropout", "1.5"], "argument --dropout: expected a probability in [0, 1), got '1.5'"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["--shapes", "8x8", "--ranks", "16"],
     "argument --ranks: rank 16 exceeds min(in, out) = 8 of --shapes 8x8"),
    (["--ranks", "2,0"], "argument --ranks: expected ranks >= 1 like 16,64, got '0'"),
    (["--tokens", "8,x"], "argument --tokens: expected token counts >= 1"),
    (["--providers", "frozen,nope"], "argument --providers: expected providers from frozen,"),
    (["--modes", "fwd,bwd"], "argument --modes: expected modes from fwd, fwd+bwd, got 'bwd'"),
    (["--dtype", "fp8"], "argument --dtype: expected one of fp32,"),
    (["--model", "micro", "--providers", "frozen"],
     "argument --providers: with --model, expected providers from peft_lora,"),
    (["--model", "micro", "--ranks", "65"], "argument --ranks: rank 65 exceeds min(in, out) = 64"),
    (["--model", "micro", "--modes", "fwd"], "--modes does not apply to --model"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_rejects_bad_arguments(tmp_path, monkeypatch, capsys, no_op_bench, args, message):
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, ["bench", *args])
    assert err.startswith("edora-kernels bench: error: ") and message in err
    assert not any(tmp_path.iterdir()) and not no_op_bench


def _bad_out(tmp_path, kind: str):
    if kind == "a file":
        (tmp_path / "results").write_text("not a folder\n")
        return tmp_path / "results"
    if kind == "under a file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "results"
    if kind.startswith("/proc"):
        return kind
    if kind == "read-only":
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    # A CSV of another schema where the results would be appended.
    csv_path(tmp_path).write_text("a,b\n1,2\n")
    return tmp_path


@pytest.mark.parametrize("kind, message", [
    ("a file", "exists and is not a directory"),
    ("under a file", "cannot create"),
    ("/proc/x", "cannot create /proc/x"),
    ("/proc/self", "cannot write to /proc/self"),  # exists, not writable even for root
    pytest.param("read-only", "cannot write to", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes through permissions")),
    ("another schema's CSV", "is not a bench CSV"),
])
def test_bench_rejects_a_bad_out_before_running(tmp_path, capsys, no_op_bench, kind, message):
    out = _bad_out(tmp_path, kind)
    err = _one_line_error(capsys, [*OP_TINY, "--out", str(out)])
    assert err.startswith("edora-kernels bench: error: argument --out: ") and message in err
    assert not no_op_bench


def test_bench_init_rejects_a_bad_out_before_running(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(init_bench, "run_init_bench", lambda *args, **kwargs: calls.append(args))
    err = _one_line_error(capsys, [*INIT_TINY, "--out", str(_bad_out(tmp_path, "a file"))])
    assert "argument --out: " in err and not calls


@pytest.mark.parametrize("name, content, message", [
    ("bench.csv", None, "cannot read"),
    ("bench.csv", "", "is empty"),
    ("bench.csv", "a,b\n1,2\n", "is not a bench CSV"),
    ("bench.csv", ",".join(BENCH_COLUMNS) + "\n", "has no ratio_to_* rows"),
    ("run.json", "{", "is not valid JSON"),
    ("run.json", '{"results": []}', "has no 'rows' list"),
    ("run.json", '{"rows": [{"kernel": "op"}]}', "rows[0]: expected the keys (kernel, provider,"),
], ids=["missing", "empty", "other columns", "no rows", "bad json", "json without rows",
        "json row keys"])
def test_plot_rejects_bad_results(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    err = _one_line_error(capsys, ["plot", str(path)])
    assert err.startswith("edora-kernels plot: error: argument results: ") and message in err
    assert not path.with_suffix(".png").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_plot_rejects_a_ratio_that_is_not_finite(bench_dir, tmp_path, capsys, value):
    (path,) = bench_dir.glob("bench_*.csv")
    rows = _read_csv(path)
    row = next(r for r in rows if r["metric"].startswith("ratio_to_"))
    row["p80"] = value
    bad = tmp_path / "bench.csv"
    append_rows(bad, rows)
    err = _one_line_error(capsys, ["plot", str(bad)])
    assert (f"argument results: {bad}: {row['metric']} of {row['provider']} on {row['x']} "
            f"{row['mode']}: p80 is {value}, not a finite number") in err
    assert not bad.with_suffix(".png").exists()


def test_plot_rejects_an_out_that_is_not_png(bench_dir, tmp_path, capsys):
    (path,) = bench_dir.glob("bench_*.csv")
    err = _one_line_error(capsys, ["plot", str(path), "--out", str(tmp_path / "chart.pdf")])
    assert "argument --out: expected a .png path" in err


@pytest.mark.parametrize("args", [["bench", "--warmup", "-1"], ["bench", "--init-shrink", "4"],
                                  ["plot", "missing.csv"]], ids=["bench", "bench checks", "plot"])
def test_error_is_one_line_without_traceback(tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "edora_kernels", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"edora-kernels {args[0]}: ")
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr


# --- failures during a run: the others go on, nothing measured is lost ---------------------------

FAIL_TINY = ["bench", "--tokens", "8", "--shapes", "16x16", "--ranks", "2,4", "--repeats", "2",
             "--warmup", "0", "--providers", "frozen,reference,torch"]


def _raise(err):
    def fn(*args):
        raise err
    return fn


def _patch_builder(monkeypatch, name: str, *, rank=None, at: str, err: BaseException):
    """BUILDERS[name] raises ``err`` at build, or its runner at each step, on cases of ``rank``
    (every case when None)."""
    real = providers.BUILDERS[name]

    def build(case, dropout=0.0):
        if rank is not None and case.dims[3] != rank:
            return real(case)
        if at == "build":
            raise err
        runner = real(case)
        runner.fn = _raise(err)
        return runner

    monkeypatch.setitem(providers.BUILDERS, name, build)


def _by_key(rows):
    return {(r["provider"], r["x"], r["mode"], r["metric"]): r for r in rows}


@pytest.mark.parametrize("at", ["build", "step"])
def test_bench_reports_a_failing_provider_and_runs_the_others(tmp_path, monkeypatch, capsys, at):
    _patch_builder(monkeypatch, "torch", at=at,
                   err=RuntimeError("torch.compile failed\nthe rest of a long message"))
    assert main([*FAIL_TINY, "--out", str(tmp_path)]) == 0
    rows = _by_key(_read_csv(csv_path(tmp_path)))
    for x in ("8x16x16 r2", "8x16x16 r4"):
        for mode in ("fwd", "fwd+bwd"):
            for name in ("frozen", "reference"):
                assert float(rows[(name, x, mode, "time_ms")]["p50"]) > 0
            error = rows[("torch", x, mode, "error")]
            assert error["unit"] == "RuntimeError" and math.isnan(float(error["p50"]))
            assert ("torch", x, mode, "time_ms") not in rows
    (json_path,) = tmp_path.glob("bench_*.json")
    run = json.loads(json_path.read_text())
    message = "RuntimeError: torch.compile failed"
    assert f"failed torch on 8x16x16 r4 fwd+bwd: {message}" in run["notes"]
    assert not any("long message" in note for note in run["notes"])
    failed = [r for r in run["results"] if r["error"] is not None]
    assert {r["provider"] for r in failed} == {"torch"} and len(failed) == 4
    table = capsys.readouterr().out
    assert f"failed: {message}" in table and "long message" not in table


def test_bench_provider_failing_in_one_mode_keeps_the_other(tmp_path, monkeypatch):
    real = providers.BUILDERS["torch"]

    def build(case, dropout=0.0):
        runner = real(case)
        forward = runner.fn

        def fn(x):
            if torch.is_grad_enabled():
                raise ValueError("no backward here")
            return forward(x)

        runner.fn = fn
        return runner

    monkeypatch.setitem(providers.BUILDERS, "torch", build)
    assert main([*FAIL_TINY, "--ranks", "2", "--out", str(tmp_path)]) == 0
    rows = _by_key(_read_csv(csv_path(tmp_path)))
    assert float(rows[("torch", "8x16x16 r2", "fwd", "time_ms")]["p50"]) > 0
    assert rows[("torch", "8x16x16 r2", "fwd+bwd", "error")]["unit"] == "ValueError"
    assert float(rows[("reference", "8x16x16 r2", "fwd+bwd", "time_ms")]["p50"]) > 0


@pytest.mark.parametrize("at", ["build", "step"])
def test_bench_baseline_failing_late_loses_nothing(tmp_path, monkeypatch, capsys, at):
    """The baseline failing on the second case ends the run (exit 1, one line); the first case's
    rows were on disk before the second began, and the JSON still has them."""
    path = csv_path(tmp_path)
    _patch_builder(monkeypatch, "frozen", rank=4, at=at, err=RuntimeError("out of memory"))
    failing = providers.BUILDERS["frozen"]
    on_disk = []

    def build(case, dropout=0.0):
        if case.dims[3] == 4:
            on_disk.append(len(_read_csv(path)))
        return failing(case)

    monkeypatch.setitem(providers.BUILDERS, "frozen", build)
    assert main([*FAIL_TINY, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    where = "8x16x16 r4" + (" fwd" if at == "step" else "")
    assert err == (f"edora-kernels bench: error: the baseline provider 'frozen' failed on {where}: "
                   "RuntimeError: out of memory\n")
    rows = _read_csv(path)
    # 3 providers x 2 modes x (time, ratio, tflops, max_error), saved_bytes in fwd+bwd
    assert len(rows) == on_disk[0] == 3 * (2 * 4 + 1) + 3 * torch.cuda.is_available() * 2
    assert {r["x"] for r in rows} == {"8x16x16 r2"}
    (json_path,) = tmp_path.glob("bench_*.json")
    run = json.loads(json_path.read_text())
    assert len(run["results"]) == 6 and len(run["rows"]) == len(rows)


def test_bench_interrupted_keeps_what_was_measured(tmp_path, monkeypatch, capsys):
    _patch_builder(monkeypatch, "torch", rank=4, at="build", err=KeyboardInterrupt())
    assert main([*FAIL_TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "edora-kernels bench: interrupted\n"
    assert {r["x"] for r in _read_csv(csv_path(tmp_path))} == {"8x16x16 r2"}
    (json_path,) = tmp_path.glob("bench_*.json")
    assert {r["x"] for r in json.loads(json_path.read_text())["results"]} == {"8x16x16 r2"}


@pytest.mark.skipif(not HAS_PEFT or importlib.util.find_spec("transformers") is None,
                    reason="needs peft and transformers")
def test_bench_model_step_reports_a_failing_provider(tmp_path, monkeypatch):
    monkeypatch.setattr(model_step, "_with_edora", _raise(RuntimeError("apply_edora failed")))
    assert main(["bench", "--model", "micro", "--ranks", "4", "--repeats", "1", "--warmup", "0",
                 "--providers", "peft_lora,torch", "--out", str(tmp_path)]) == 0
    rows = _read_csv(csv_path(tmp_path))
    assert float(next(r for r in rows if r["provider"] == "peft_lora"
                      and r["metric"] == "time_ms")["p50"]) > 0
    (error,) = [r for r in rows if r["provider"] == "torch"]
    assert (error["metric"], error["unit"]) == ("error", "RuntimeError")


def test_bench_compiled_over_two_ranks(tmp_path):
    """torch.compile of the op on two ranks, whose python-float scalings differ, runs through."""
    assert main(["bench", "--tokens", "64", "--shapes", "32x48", "--ranks", "4,8", "--compile",
                 "--providers", "frozen", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    rows = _read_csv(csv_path(tmp_path))
    assert not [r for r in rows if r["metric"] == "error"]
    timed = {(r["x"], r["mode"]) for r in rows
             if r["provider"] == "compiled" and r["metric"] == "time_ms"}
    assert timed == {(f"64x32x48 r{rank}", mode) for rank in (4, 8) for mode in ("fwd", "fwd+bwd")}


def test_bench_with_dropout_times_both_semantics_without_an_oracle(tmp_path):
    assert main(["bench", "--tokens", "32", "--shapes", "24x20", "--ranks", "4", "--repeats",
                 "2", "--warmup", "0", "--dropout", "0.2", "--providers",
                 "frozen,peft_dora,torch,lowrank", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_*.csv")
    rows = _read_csv(path)
    providers = {r["provider"] for r in rows if r["metric"] == "time_ms"}
    assert providers == {"frozen", "peft_dora", "torch", "lowrank"}
    # each provider draws its own mask: no comparison with a float64 oracle is reported
    assert not [r for r in rows if r["metric"] == "max_error"]
    assert not [r for r in rows if r["metric"] == "error"]


# --- the OpenMP wait policy of a CPU benchmark ---------------------------------------------------

@NO_CUDA
@pytest.mark.parametrize("policy", [None, "ACTIVE"], ids=["unset", "set by the user"])
def test_bench_runs_under_a_passive_openmp_policy_unless_one_is_set(tmp_path, policy):
    """From the command line, a CPU benchmark re-executes itself with OMP_WAIT_POLICY=PASSIVE
    and says so; a policy the user set is kept. Either way the results record it."""
    env = {k: v for k, v in os.environ.items() if k not in (OMP_POLICY, OMP_POLICY_SET_BY_BENCH)}
    if policy is not None:
        env[OMP_POLICY] = policy
    proc = subprocess.run([sys.executable, "-m", "edora_kernels", *OP_TINY, "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = policy or "PASSIVE"
    (json_path,) = tmp_path.glob("bench_*.json")
    run = json.loads(json_path.read_text())
    assert run["settings"]["omp_wait_policy"] == seen  # as the measuring process saw it
    assert {r["versions"].rpartition(";")[2] for r in _read_csv(csv_path(tmp_path))} == {
        f"{OMP_POLICY}={seen}"}
    said = policy is None
    assert proc.stderr.count(OMP_NOTE) == said and (OMP_NOTE in run["notes"]) == said


# --- timing: CUDA bursts, on a fake clock ---------------------------------------------------------

@pytest.mark.parametrize("seconds, calls", [
    (1.0, 1), (timing.BURST_S, 1), (0.004, 3), (3e-4, 34), (1e-6, timing.MAX_BURST),
    (0.0, timing.MAX_BURST),
])
def test_burst_calls_last_about_burst_s(seconds, calls):
    assert timing.burst_calls(seconds) == calls


def test_round_robin_on_cuda_times_bursts_with_one_sync_each(monkeypatch):
    """CUDA events replaced by a fake clock that only the calls advance by their cost (and
    resets by a lot, which must stay out of the times): each turn is one burst sized from the
    provider's last time, ended by the one synchronisation."""
    now, log = [0.0], []  # ms; what happened, in order

    class Event:
        def __init__(self, enable_timing: bool):
            assert enable_timing

        def record(self):
            self.ms = now[0]

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end: "Event") -> float:
            return end.ms - self.ms

    def call(name: str, ms: float):
        def step():
            now[0] += ms
            log.append(name)
        return step

    def reset():
        now[0] += 100.0
        log.append("reset")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    samples = timing.round_robin({"slow": (reset, call("slow", 4.0)),
                                  "fast": (reset, call("fast", 0.3))},
                                 torch.device("cuda"), repeats=2, warmup=1)
    assert samples == {"slow": [pytest.approx(0.004)] * 2, "fast": [pytest.approx(3e-4)] * 2}
    bursts = " ".join(log).split(" sync")
    # Turns in rotation; the first of each provider is one call, the next ones last ~10 ms.
    assert [b.split() for b in bursts[:-1]] == [
        ["reset", "slow"], ["reset", "fast"],
        ["reset", "slow"] * 3, ["reset", "fast"] * 34,
        ["reset", "slow"] * 3, ["reset", "fast"] * 34,
    ] and bursts[-1] == ""


def test_bench_host_counts_launches_and_times_the_host(tmp_path, capsys):
    """bench --host: the triton step with its kernels stubbed (5 launches, no sync) and the
    frozen layer as the baseline, rows in the CSV."""
    assert main(["bench", "--host", "--providers", "frozen,triton", "--repeats", "3",
                 "--warmup", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_*.csv")
    metrics = {(r["provider"], r["mode"], r["metric"]): float(r["p50"])
               for r in _read_csv(path)}
    assert metrics[("triton", "fwd+bwd", "launches")] == 5
    assert metrics[("triton", "fwd", "launches")] == 2
    assert metrics[("triton", "fwd+bwd", "host_syncs")] == 0
    assert metrics[("frozen", "fwd+bwd", "ratio_to_frozen")] == 1.0
    assert metrics[("triton", "fwd+bwd", "ratio_to_frozen")] > 0
    assert "every kernel launch replaced by a no-op" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--host", "--modes", "fwd"], "--modes does not apply to --host"),
    (["--host", "--providers", "peft_dora"], "with --host, expected providers from"),
    (["--host", "--ranks", "8,16"], "--host measures one case"),
    (["--host", "--ranks", "80"], "rank 80 exceeds min(in, out) = 64"),
])
def test_bench_host_argument_errors(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv, "--out", str(tmp_path)])
    assert info.value.code == 2 and words in capsys.readouterr().err
