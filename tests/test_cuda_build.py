"""The CUDA C++ extension (csrc/) builds without a GPU.

- Each ``csrc/*.cu`` compiles on its own with nvcc (no torch) for sm_80 and sm_90, with torch's
  half/bfloat16 restrictions, and no kernel spills or uses a stack.
- ``setup.py`` builds ``edora_kernels._C`` against the installed CUDA build of torch when asked,
  the module imports without a GPU and rejects CPU tensors with a clear message; without the
  request (or with the skip switch, or without torch) setup.py builds nothing and says why.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90")
# The flags torch's extension build passes to nvcc that constrain the source: the kernels must not
# rely on implicit half/bfloat16 conversions or operators.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
EXPECTED_FUNCTIONS = ("prologue", "rescale", "prepass", "finalize", "finalize_exact")
EXPECTED_CONSTANTS = {"MAX_RANK": 128, "PREPASS_TILE_ROWS": 32, "FINALIZE_SHARE_COLUMNS": 32,
                      "SLOT_NONE": -1, "SLOT_FULL": -2, "NORM_SQ_FLOOR": 1e-24}

requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_resource_usage(log: str) -> list[dict]:
    """One entry per compiled kernel: name, arch, registers, stack, spill stores and loads."""
    kernels = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append({"name": m[1], "arch": m[2]})
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif kernels and (m := _REGS.search(line)):
            kernels[-1]["registers"] = int(m[1])
    return kernels


def test_there_are_kernels_to_build():
    assert CU_FILES, f"no .cu files in {CSRC}"


@requires_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_alone_without_spills(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *gencode, *TORCH_NVCC_DEFINES, "--resource-usage",
           "-I", str(CSRC), str(source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed:\n{log}"
    kernels = parse_resource_usage(log)
    for arch in ARCHS:
        assert any(k["arch"] == arch for k in kernels), f"no kernel compiled for {arch}:\n{log}"
    for k in kernels:
        assert {"stack", "spill_stores", "spill_loads", "registers"} <= k.keys(), f"{k}\n{log}"
        assert k["spill_stores"] == k["spill_loads"] == k["stack"] == 0, f"spills: {k}"


# --- setup.py -----------------------------------------------------------------------------------

def run_setup(args, env_changes, tmp_path, timeout=60):
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDORA_BUILD_CUDA", "EDORA_SKIP_CUDA_BUILD")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def setup_message(result) -> str:
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("edora_kernels: CUDA extension")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("env, expected", [
    ({}, "not built: not requested"),
    ({"EDORA_BUILD_CUDA": "1", "EDORA_SKIP_CUDA_BUILD": "1"}, "not built: EDORA_SKIP_CUDA_BUILD=1"),
    ({"EDORA_BUILD_CUDA": "1", "PYTHONPATH": "{no_torch}"}, "not built: torch is not importable"),
], ids=["default", "skip-switch", "no-torch"])
def test_setup_builds_nothing_unless_asked_and_able(env, expected, tmp_path):
    # A torch that fails to import, as under pip's build isolation.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = {k: v.format(no_torch=tmp_path) for k, v in env.items()}
    result = run_setup(["--name"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in setup_message(result)


@pytest.mark.slow
@requires_nvcc
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a build without CUDA")
def test_extension_builds_and_imports_without_gpu(tmp_path):
    """About 40 s of CPU time (mostly torch/extension.h): one arch keeps it at that."""
    env = {"EDORA_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
           "CUDA_HOME": os.environ.get("CUDA_HOME") or "/usr/local/cuda"}
    result = run_setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
                        str(tmp_path / "tmp")], env, tmp_path, timeout=900)
    log = result.stdout + result.stderr
    assert "will be built" in setup_message(result), log
    assert result.returncode == 0, log[-6000:]
    (library,) = (tmp_path / "lib" / "edora_kernels").glob("_C*.so")
    # torch first (the extension links against its libraries), then the module from its file.
    probe = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("edora_kernels._C", {str(library)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for name in {EXPECTED_FUNCTIONS!r}:
    assert callable(getattr(module, name)), name
for name, value in {EXPECTED_CONSTANTS!r}.items():
    assert getattr(module, name) == value, name
x, v, f64 = torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(4, 2, dtype=torch.float64)
calls = [
    lambda: module.prologue(x, torch.zeros(2, 4), torch.zeros(4, 2), torch.zeros(2, 2),
                            torch.ones(4), f64[:, 0], f64, f64[:2], 1.0, 0),
    lambda: module.rescale(x, v, f64, torch.zeros(4), None, torch.zeros(0, dtype=torch.int32),
                           0, 1.0, False, False),
    lambda: module.prepass(x, x, None, torch.zeros(4), torch.zeros(4, 2), torch.zeros(2, 2),
                           torch.zeros(2, 5), v, torch.zeros(0, dtype=torch.int32),
                           torch.zeros(3, 0), 1.0, 32, True, True, True, True, False),
    lambda: module.finalize(torch.zeros(1, 4), torch.zeros(1, 2, 2), torch.ones(4),
                            f64[:, 0], torch.zeros(0, dtype=torch.int32), torch.zeros(4, 2),
                            f64, f64, f64[:2], torch.zeros(2, 2), 1.0, True, True, False),
    lambda: module.finalize_exact(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(2, 2),
                                  1.0),
]
for call in calls:
    try:
        call()
    except RuntimeError as err:
        print(str(err).splitlines()[0])
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "edora_kernels._C.prologue: x must be a CUDA tensor, got one on cpu",
        "edora_kernels._C.rescale: base must be a CUDA tensor, got one on cpu",
        "edora_kernels._C.prepass: gy must be a CUDA tensor, got one on cpu",
        "edora_kernels._C.finalize: n must be a CUDA tensor, got one on cpu",
        "edora_kernels._C.finalize_exact: shares must be a CUDA tensor, got one on cpu",
    ]
