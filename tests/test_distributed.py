"""Distributed training launched as users launch it — 2 CPU processes over gloo: ``torchrun`` for
DDP and FSDP2 (``fully_shard``), ``accelerate launch`` for Trainer. Gradients and the optimizer
step equal one process on the global batch (float64); the adapter saved from rank 0 reloads to
the same state, in one process and into a fresh sharded model; a Trainer run resumed from its
checkpoint ends where the uninterrupted run ended. The worker is tests/distributed_worker.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_worker import (  # noqa: E402
    MIXED_NAMES,
    base_model,
    batch,
    edora_model,
    mixed_model,
    train_step,
    trainable,
)

from edora_kernels import EDoRAModel  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
MODES = ["ddp", "fsdp2"]


def _command(tool: str, module: str) -> list[str]:
    """The console script beside this Python (what a user types), else its module."""
    script = Path(sys.executable).with_name(tool)
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


TORCHRUN = [*_command("torchrun", "torch.distributed.run"), "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [*_command("accelerate", "accelerate.commands.launch"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
if ACCELERATE[1] != "launch":  # python -m accelerate.commands.launch takes no "launch"
    ACCELERATE.remove("launch")


def _launch(command: list[str], out: Path) -> None:
    """Run a launcher whose workers write under ``out``. A worker that dies by a signal is run
    once more from an empty ``out``: on this shared 2-core machine a gloo worker aborted once
    ("terminate called without an active exception", SIGABRT) in a CI run and never in reruns.
    A second death, or any other failure, fails the test with the launcher's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for attempt in (1, 2):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return
        if attempt == 1 and "Signal " in proc.stderr:  # torch.distributed.run's report
            shutil.rmtree(out, ignore_errors=True)
            continue
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])


def _assert_same(got: dict, want: dict, atol: float) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def one_process():
    """Gradients and state after one step on the global batch, in this process."""
    model = edora_model()
    grads = train_step(model, *batch())
    return {"grads": grads, "state": trainable(model)}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Each mode's run over 2 processes: rank -> what the worker wrote, and the output folder."""
    out = tmp_path_factory.mktemp("distributed")
    results = {}
    _launch([*TORCHRUN, str(WORKER), "step", "--modes", *MODES, "mixed", "--out", str(out)], out)
    for mode in MODES:
        results[mode] = {rank: torch.load(out / f"{mode}_rank{rank}.pt") for rank in (0, 1)}
    return results, out


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one_process_on_the_global_batch(launched, one_process, mode):
    results, _ = launched
    for rank, result in results[mode].items():
        assert result["world"] == 2
        # R, magnitude of 8 Conv1D layers and the score head: every trainable tensor
        assert len(result["grads"]) == 17 and any("score" in n for n in result["grads"])
        _assert_same(result["grads"], one_process["grads"], atol=1e-12)
        _assert_same(result["state"], one_process["state"], atol=1e-12)
        # the adapter saved from rank 0, loaded into a fresh model under the same wrapper
        _assert_same(result["reloaded"], result["state"], atol=0)


def test_a_batch_mixing_adapters_trains_under_ddp_as_one_process(launched):
    """adapter_names= under DDP (find_unused_parameters=True: rank 1's rows leave "default"
    out): every adapter's gradient equals one process on the global batch."""
    results, out = launched
    want = train_step(mixed_model(), *batch(), adapter_names=MIXED_NAMES)
    assert len(want) == 2 * (8 * 2 + 1)  # R and m of 8 Conv1D layers and the score head, each
    for rank in (0, 1):
        got = torch.load(out / f"mixed_rank{rank}.pt")
        assert got["world"] == 2
        _assert_same(got["grads"], want, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_adapter_saved_from_rank_0_reloads_in_one_process(launched, mode):
    results, out = launched
    directory = out / f"adapter_{mode}"
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "modules_to_save.safetensors"]
    model = EDoRAModel.from_pretrained(base_model(), directory)
    _assert_same({n: p.detach() for n, p in model.named_parameters()
                  if n in results[mode][0]["state"]}, results[mode][0]["state"], atol=0)
    # The same outputs as this process's model given rank 0's trained tensors and the saved A
    # and B (the initialiser's last bits depend on the thread count, torchrun's is 1).
    saved = load_file(directory / "adapter_model.safetensors")
    trained = edora_model().eval()  # from_pretrained returns an eval-mode model
    with torch.no_grad():
        for name, t in trained.named_buffers():
            if name.endswith((".A", ".B")):
                t.copy_(saved[name.removeprefix("base_model.model.")])
        for name, p in trained.named_parameters():
            if name in results[mode][0]["state"]:
                p.copy_(results[mode][0]["state"][name])
        ids, _ = batch()
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_trainer_under_accelerate_launch_resumes_to_the_same_state(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch([*ACCELERATE, str(WORKER), "trainer", "--out", str(full)], full)
    # checkpoints written once, by rank 0: adapter-sized, with both ranks' RNG states
    checkpoint = full / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "modules_to_save.safetensors",
            "rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= names
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 50_000
    _launch([*ACCELERATE, str(WORKER), "trainer", "--out", str(resumed),
             "--resume", str(checkpoint)], resumed)
    a, b = torch.load(full / "final.pt"), torch.load(resumed / "final.pt")
    assert a["world"] == b["world"] == 2 and a["steps"] == b["steps"] == 4
    _assert_same(b["state"], a["state"], atol=0)
    before = EDoRAModel.from_pretrained(base_model(), checkpoint)
    assert any(not torch.equal(p, a["state"][n]) for n, p in before.named_parameters()
               if n in a["state"]), "steps 3 and 4 changed nothing: the test would prove nothing"
