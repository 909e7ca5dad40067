"""``bench/gpu_check.sh --dry-run``: every step of the GPU script runs on CPU with tiny shapes and
the summary says what each did. This is how CI runs the script's plumbing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install", "info", "plan", "check", "bench", "bench tma", "gpu tests", "bench dropout",
         "bench compile", "bench adapters", "bench host", "init llama7b", "torchrun ddp fsdp2"]
WRITES_RESULTS = {"bench", "bench tma", "bench dropout", "bench compile", "bench adapters",
                  "bench host", "init llama7b"}


@pytest.mark.slow  # about a minute and a half on 2 CPU cores
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["dry_run"] and summary["finished"] and summary["exit_status"] == 0
    assert summary["out"] == str(tmp_path.resolve())
    steps = summary["steps"]
    assert [s["name"] for s in steps] == STEPS
    # The budgets are the GPU run's: under 5 minutes with the preamble.
    assert sum(s["budget_s"] for s in steps) == summary["budget_s"] <= 290
    for s in steps:
        assert s["exit_status"] == 0 and not s["timed_out"], s
        assert 0 <= s["elapsed_s"] <= s["budget_s"]
        assert f"=== {s['name']}: budget {s['budget_s']}s" in proc.stdout
        for name in s["files"]:
            assert (tmp_path / name).is_file()
        if s["name"] == "plan":
            assert s["files"] == ["plan_adapters_h100.json", "plan_h100.json"]
        elif s["name"] == "torchrun ddp fsdp2":  # both ranks' records, both saved adapters
            assert {"distributed/ddp_rank1.pt", "distributed/fsdp2_rank0.pt",
                    "distributed/adapter_fsdp2/adapter_model.safetensors"} <= set(s["files"])
        elif s["name"] in WRITES_RESULTS:
            assert any(name.startswith("bench_") and name.endswith(".csv") for name in s["files"])
            prefix = "init_" if s["name"] == "init llama7b" else "bench_"
            assert any(name.startswith(prefix) and name.endswith(".json") for name in s["files"])
        else:
            assert s["files"] == []
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") >= 2 * len(STEPS)
    for mode in ("ddp", "fsdp2"):  # each checked against one process on the global batch
        assert f"{mode} on 2 process(es), cpu: grads max |diff| vs one process" in proc.stdout


def test_rejects_an_unknown_argument():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "usage: bash bench/gpu_check.sh [--dry-run]\n"
