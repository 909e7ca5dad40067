"""The cost model (edora_kernels.plan): its launch list is the one the backend issues, and its
predictions move the way the roofline says they must."""
import json
import re
from pathlib import Path

import pytest
import torch

from edora_kernels import EDoRALinear
from edora_kernels.bench.launches import count_launches, stub_kernels
from edora_kernels.cli import main
from edora_kernels.plan import ASSUMPTIONS, DEVICES, plan_mixed, plan_step

LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]


@pytest.mark.parametrize("exact_norm", [False, True])
def test_triton_plan_lists_the_launches_a_step_issues(exact_norm):
    with stub_kernels():
        torch.manual_seed(0)
        layer = EDoRALinear.from_linear(torch.nn.Linear(48, 40), 8, backend="triton",
                                        detach_norm=not exact_norm)
        layer = layer.to(torch.bfloat16).to("meta")
        x = torch.empty(16, 48, dtype=torch.bfloat16, device="meta", requires_grad=True)
        gy = torch.empty(16, 40, dtype=torch.bfloat16, device="meta")

        def step():
            for t in (x, layer.R, layer.magnitude):
                t.grad = None
            layer(x).backward(gy)

        step()
        issued = count_launches(step).launches
    planned = plan_step("triton", 16, 48, 40, 8, exact_norm=exact_norm).launches
    assert [launch.name for launch in planned] == issued


@pytest.mark.parametrize("in_f,out_f", LLAMA)
def test_ratios_follow_the_roofline(in_f, out_f):
    for backend in ("triton", "cuda"):
        r16, r64 = (plan_step(backend, 8192, in_f, out_f, r) for r in (16, 64))
        for plan in (r16, r64):
            assert 1.0 < plan.forward_ratio and 1.0 < plan.step_ratio
            assert all(launch.seconds > 0 and launch.bound for launch in plan.launches)
        # a larger rank adds work, never removes it
        assert r64.forward_ratio > r16.forward_ratio and r64.step_ratio > r16.step_ratio
        # more memory bandwidth shortens the streaming launches (H200 = H100's compute)
        h200 = plan_step(backend, 8192, in_f, out_f, 16, device="h200")
        assert h200.step_ratio < r16.step_ratio
    # the exact norm gradient costs one more small launch
    detached = plan_step("triton", 8192, in_f, out_f, 16)
    exact = plan_step("triton", 8192, in_f, out_f, 16, exact_norm=True)
    assert len(exact.launches) == len(detached.launches) + 1
    assert exact.step_ratio > detached.step_ratio


@pytest.mark.parametrize("in_f,out_f", LLAMA)
def test_a_served_mixed_batch_costs_little_more_than_one_adapter(in_f, out_f):
    """Serving K adapters takes two launches as one adapter does, the mixed prologue (x Aᵀ and
    each token's core applied to it) and the fused GEMM; K itself only grows the g table the
    GEMM gathers from (in L2)."""
    for rank in (16, 64):
        one, many = (plan_mixed(8192, in_f, out_f, rank, k) for k in (1, 64))
        assert abs(one.ratio - 1.0) < 0.01 and one.ratio <= many.ratio < 1.15
        assert many.ratio - one.ratio < 5e-3
        assert [launch.name for launch in many.launches] == ["triton::mixed_prologue_kernel",
                                                             "triton::edora_fwd_kernel"]


@pytest.mark.parametrize("training", [False, True])
def test_the_mixed_plan_times_the_launches_the_layer_issues(training):
    """plan_mixed times the launches of the layer's own step (run on meta tensors): the same
    names, in the same order, as count_launches counts on that step, none of them a host
    sync; serving is the mixed prologue and the fused GEMM, training adds the slots program,
    the pre-pass, the dx GEMM and the finalize."""
    from edora_kernels.bench.launches import count_launches, measure_launches, stub_kernels
    from edora_kernels.plan import mixed_step_on_meta

    with stub_kernels():
        step = mixed_step_on_meta(64, 64, 48, 8, 8, 8, "bf16", training)
        counted = count_launches(step)
        measured = [cost.name for cost in measure_launches(step)]
    assert counted.syncs == [] and counted.launches == measured
    assert [launch.name for launch in plan_mixed(64, 64, 48, 8, 8, training=training).launches
            ] == measured
    kernels = [name for name in measured if name.startswith("triton::")]
    forward = ["triton::mixed_prologue_kernel", "triton::edora_fwd_kernel"]
    if training:
        forward.insert(1, "triton::mixed_slots_kernel")
    assert kernels == forward + (["triton::prepass_kernel", "triton::edora_dx_kernel",
                                  "triton::finalize_kernel"] if training else [])


def test_a_trained_mixed_batch_moves_nothing_of_batch_size_outside_the_kernels():
    """In a planned mixed training step at a LLaMA shape every pass over the batch is in the
    Triton kernels: outside them the adapters' R and m are stacked, the zero-magnitude flags
    set and R G formed in float64 (K r×r products), nothing of batch size."""
    N, in_f, out_f, e, K, r = 8192, 4096, 11008, 2, 64, 16
    plan = plan_mixed(N, in_f, out_f, r, K, training=True)
    outside = [launch for launch in plan.launches if not launch.name.startswith("triton::")]
    assert [launch.name for launch in outside] == ["aten::stack", "aten::stack", "aten::fill_",
                                                   "aten::copy_", "aten::mm"]
    assert all(launch.bytes < N * in_f * e for launch in outside)
    assert sum(launch.flops for launch in outside) == 2.0 * K * r ** 3
    assert 1.0 < plan.ratio < 1.15


def test_frozen_gemms_are_compute_bound_at_the_assumed_efficiency():
    plan = plan_step("triton", 8192, 4096, 4096, 16, device="a100")
    gemm = plan.frozen[0]
    expected = 2 * 8192 * 4096 * 4096 / (DEVICES["a100"]["bf16"] * 0.75) + 1e-6
    assert gemm.bound == "compute" and gemm.seconds == pytest.approx(expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="device must be one of"):
        plan_step("triton", 8, 16, 16, 4, device="v100")
    with pytest.raises(ValueError, match="backend must be one of"):
        plan_step("torch", 8, 16, 16, 4)


def test_cli_plan_adapters(tmp_path, capsys):
    out = tmp_path / "mixed.json"
    assert main(["plan", "--adapters", "1,8", "--shapes", "64x48", "--ranks", "4", "--tokens",
                 "32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mixed batch served on triton" in text and "x one adapter" in text
    assert "mixed batch trained (forward and backward) on triton" in text
    rows = json.loads(out.read_text())
    assert [(r["adapters"], r["rows"], r["training"]) for r in rows] == [
        (1, 1, False), (1, 1, True), (8, 8, False), (8, 8, True)]
    assert all(len(r["launches"]) == 2 for r in rows if not r["training"])
    assert all(len(r["launches"]) == 11 for r in rows if r["training"])
    assert all(r["ratio_to_one_adapter"] > 0.95 for r in rows)
    with pytest.raises(SystemExit):
        main(["plan", "--adapters", "8", "--backend", "cuda"])
    assert "mixed batches run on the triton backend" in capsys.readouterr().err


def test_cli_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--shapes", "64x48", "--ranks", "4,8", "--tokens", "16", "--device",
                 "h200", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "triton::edora_fwd_kernel" in text and "predicted: forward" in text
    rows = json.loads(out.read_text())
    assert [(r["rank"], r["device"], len(r["launches"])) for r in rows] == [(4, "h200", 5),
                                                                           (8, "h200", 5)]
    with pytest.raises(SystemExit) as info:
        main(["plan", "--shapes", "16x16", "--ranks", "32"])
    assert info.value.code == 2
    assert "rank 32 exceeds" in capsys.readouterr().err


def test_cli_plan_json_into_a_new_folder(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "plan.json"
    assert main(["plan", "--shapes", "64x48", "--ranks", "4", "--json", str(out)]) == 0
    assert [r["rank"] for r in json.loads(out.read_text())] == [4]
    with pytest.raises(SystemExit) as info:
        main(["plan", "--shapes", "64x48", "--ranks", "4", "--json", str(tmp_path)])
    assert info.value.code == 2
    assert f"argument --json: {tmp_path} is a directory" in capsys.readouterr().err


def test_cli_init_plan_writes_its_json(tmp_path, capsys):
    out = tmp_path / "init.json"
    assert main(["plan", "--init-llama7b", "--ranks", "32", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert (plan["rank"], plan["matrices"]) == (32, 224)
    assert sum(c["matrices"] for c in plan["chunks"]) == 224
    assert f"{plan['seconds']:.2f} s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--init-llama7b", "--ranks", "4097"],
     "argument --ranks: rank 4097 exceeds min(in, out) = 4096 of the LLaMA-7B matrices"),
    (["--init-llama7b", "--shapes", "64x48"], "--shapes does not apply to --init-llama7b"),
    (["--init-llama7b", "--tokens", "8"], "--tokens does not apply to --init-llama7b"),
    (["--init-llama7b", "--backend", "cuda"], "--backend does not apply to --init-llama7b"),
    (["--init-llama7b", "--exact-norm"], "--exact-norm does not apply to --init-llama7b"),
    (["--init-llama7b", "--adapters", "8"], "argument --adapters: not allowed with argument "
                                            "--init-llama7b"),
    (["--adapters", "1", "--shapes", "64x48", "--ranks", "4", "--exact-norm"],
     "--exact-norm does not apply to --adapters"),
])
def test_cli_plan_refuses_what_it_would_ignore(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["plan", *argv, "--json", str(tmp_path / "plan.json")])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"edora-kernels plan: error: {message}\n"
    assert not (tmp_path / "plan.json").exists()


def test_the_init_plan_has_the_chunks_apply_edora_makes(monkeypatch):
    """The initialiser's plan batches the 224 LLaMA-7B matrices as apply_edora does (counted on
    meta weights: no memory), and each chunk streams its weights the passes randomized_svd
    makes, one more where A needs its own product (out > in)."""
    from edora_kernels import apply_edora
    from edora_kernels import model as model_module
    from edora_kernels.bench.init import LLAMA_BLOCK, LLAMA_BLOCKS, frozen_linear, llama_container
    from edora_kernels.plan import ASSUMPTIONS, plan_init
    from edora_kernels.svd import DEFAULT_N_ITER

    calls = []
    original = model_module.chunk_factors

    def counted(modules, rank, **kwargs):
        calls.append((tuple(modules[0].weight.shape), len(modules)))
        return original(modules, rank, **kwargs)

    monkeypatch.setattr(model_module, "chunk_factors", counted)
    blocks = [{name: frozen_linear(torch.empty(shape, dtype=torch.bfloat16, device="meta"))
               for name, shape in LLAMA_BLOCK.items()} for _ in range(LLAMA_BLOCKS)]
    apply_edora(llama_container(blocks), list(LLAMA_BLOCK), 16, progress=False)
    shapes = {}
    for shape in LLAMA_BLOCK.values():
        shapes[shape] = shapes.get(shape, 0) + LLAMA_BLOCKS
    plan = plan_init(shapes, 16, "bf16", "h100")
    assert sorted(calls) == sorted((c.shape, c.matrices) for c in plan.chunks)
    assert plan.matrices == 224
    for chunk in plan.chunks:
        out_f, in_f = chunk.shape
        reads = 2 * DEFAULT_N_ITER + 2 + (out_f > in_f)
        assert chunk.bytes == chunk.matrices * out_f * in_f * (2 + 4 + 4 * reads)
        floor = chunk.bytes / (DEVICES["h100"]["hbm"] * ASSUMPTIONS["memory_efficiency"])
        assert chunk.seconds > floor


def test_the_design_notes_floor_table_is_the_models():
    """docs/DESIGN.md §4 tabulates the plan's floor (x read once more forward, gy and y
    backward, the rank term in both GEMMs, one dependent launch each way) beside the
    predictions: both columns recomputed here from ASSUMPTIONS and plan_step."""
    a = ASSUMPTIONS
    design = (Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md").read_text()
    section = design.split("**The floor of this plan.**")[1].split("\n\n")[1]
    rows = re.findall(r"\| (\d+) × (\d+) \| (\d+) \| \**([\d.]+)\** \| ([\d.]+) \| "
                      r"([\d.]+) / ([\d.]+) \|", section)
    assert len(rows) == 4
    h100, N, e = DEVICES["h100"], 8192, 2
    tensor = h100["bf16"] * a["gemm_efficiency"]
    stream = h100["hbm"] * a["memory_efficiency"]
    for in_f, out_f, r, fwd_floor, step_floor, fwd, step in rows:
        in_f, out_f, r = int(in_f), int(out_f), int(r)
        gemm = 2 * N * in_f * out_f / tensor
        forward = gemm + N * in_f * e / stream + 2 * N * r * out_f / tensor + a["gap_us"] * 1e-6
        backward = gemm + 2 * N * out_f * e / stream + 2 * N * r * in_f / tensor \
            + a["gap_us"] * 1e-6
        assert float(fwd_floor) == round(forward / gemm, 3)
        assert float(step_floor) == round((forward + backward) / (2 * gemm), 3)
        plan = plan_step("triton", N, in_f, out_f, r)
        assert (float(fwd), float(step)) == (round(plan.forward_ratio, 3),
                                             round(plan.step_ratio, 3))
        assert plan.forward_ratio >= forward / gemm and plan.step_ratio >= \
            (forward + backward) / (2 * gemm)
