"""Ahead-of-time compile checks of the Triton kernels for sm_80 and sm_90, no GPU needed
(docs/DESIGN.md §7).

Every config a kernel may run with is compiled with ``triton.compile`` for the real
``JITFunction``s, specialised the way the JIT specialises aligned contiguous tensors; the
bundled ``cuobjdump --dump-resource-usage`` then reports registers, spills and shared memory.

- the two GEMMs (forward, dx) and the epilogue kernel: every candidate the prune filter may
  keep, per architecture and dtype (the rank is a runtime loop bound there); on sm_90 also the
  forward's TMA path (descriptors made on the device, a persistent grid);
- the small kernels (prologue, pre-pass, finalize, a mixed batch's prologue): their one config
  at every padded rank and row-block height they can be launched with, every optional part
  switched on.

The compiles run in two worker processes (one per architecture) started from this file without
TRITON_INTERPRET: under the interpreter ``@triton.jit`` yields interpreted functions, which
cannot be compiled, and the modules pick their GPU config lists only when not interpreting.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

from edora_kernels.backends.triton import bwd as triton_bwd
from edora_kernels.backends.triton import configs as triton_configs
from edora_kernels.backends.triton import epilogue_only as triton_epilogue
from edora_kernels.backends.triton import fwd as triton_fwd
from edora_kernels.backends.triton import mixed as triton_mixed
from edora_kernels.backends.triton import prologue as triton_prologue

ROOT = Path(__file__).resolve().parents[1]
# The resource table is written to a temporary file unless EDORA_AOT_CSV names where to keep it
# (bench/results/triton_aot_resources.csv holds the committed one).
CSV_ENV = "EDORA_AOT_CSV"
ARCHS = (80, 90)
# fp32 runs in the kernels only where torch allows TF32 (else on the torch path).
DTYPES = ("bfloat16", "float16", "float32")
GEMM_KERNELS = ("forward", "dx")
SMALL_KERNELS = ("prologue", "prepass", "finalize", "finalize_exact", "mixed_prologue")
KERNELS = (*GEMM_KERNELS, "epilogue", *SMALL_KERNELS)
# The other specialisations the launchers produce, compiled once (bf16, first candidate):
# inference forward without bias or slots, a transposed x (no unit stride), fp32 factors on a
# bf16 model (A and B cast as loaded), the epilogue op's pre-pass (writes gz, no u), a finalize
# without the norm's share.
VARIANTS = ("forward:eval", "forward:strided", "dx:fp32-adapters", "prepass:epilogue",
            "finalize:detached")
# Sizes and strides divisible by nothing (37 tokens, in = 4095, out = 45): no load vectorises.
UNALIGNED = ("forward:unaligned", "dx:unaligned")
# A batch mixing adapters (g a table, one row per token's adapter: a BLOCK_M×BLOCK_N load of g
# in the epilogue), compiled with every candidate the autotuner may pick.
MIXED = ("forward:mixed", "epilogue:mixed")
# Training a mixed batch: the pre-pass on tables of g and R (each program on one leading row's
# table row; writes gz) with every config at every padded rank, the dx GEMM on gz (no g in its
# main loop) with every candidate, the finalize per table row (from the adapters' m and n, or
# from a g table), the slots program (over the gate's flags or a g table) and the mixed
# prologue given the tables (serving; no gate programs).
MIXED_TRAINING = ("prepass:mixed", "dx:mixed", "finalize:mixed", "finalize:mixed-tables",
                  "mixed_slots", "mixed_slots:table", "mixed_prologue:tables")
# The forward's TMA path on a persistent grid (sm_90 only): training (bias, slots) with every
# TMA candidate of every dtype, inference without bias or slots, a batch mixing adapters. Its
# signature does not depend on the adapters' dtype (v is fp32, s·P cast to x's dtype by the
# prologue): fp32 adapters on a bf16 model compile as bf16.
TMA = ("forward:tma", "forward:tma-eval", "forward:tma-mixed")
R_PADS = (16, 32, 64, 128)
# Ampere's asynchronous copies (cp.async.ca/cg); TMA's are cp.async.bulk.
AMPERE_ASYNC_COPY = re.compile(r"cp\.async\.c[ag]\b")
FIELDS = ("arch", "kernel", "dtype", "r_pad", "block_m", "block_n", "block_k", "group_m",
          "num_warps", "num_stages", "regs", "stack", "local", "static_shared", "dynamic_shared",
          "wgmma", "cp_async", "tma")


# ------------------------------------------------------------------------------------------------
# Worker side: runs without TRITON_INTERPRET
# ------------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return getattr(torch, name)


def _specialize(fn, args: dict):
    """(signature, constexprs, attrs) as the JIT derives them from these arguments.

    Tensors: pointer type, 16-byte divisibility when aligned. Ints: 1 becomes the constexpr 1,
    multiples of 16 get divisibility 16, except for the kernel's ``do_not_specialize`` ones.
    Floats: fp32. Constexpr parameters: their values.
    """
    import torch
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, args[param.name]
        plain = param.do_not_specialize  # typed by its value, nothing more
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool)
                                  and value == 1 and not plain):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + names[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[name], aligned = "u1", False
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            aligned = value % 16 == 0 and not plain
        elif isinstance(value, float):
            signature[name], aligned = "fp32", False
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _problem_args(kernel: str, dtype: str, r_pad: int, config) -> tuple:
    """(JITFunction, launch arguments) for a problem with rank r_pad; contiguous and aligned
    unless the kernel's variant says otherwise."""
    import torch

    from edora_kernels.norm import NormTerms
    from edora_kernels.op_common import Saved

    dt, f32, f64, i32 = _torch_dtype(dtype), torch.float32, torch.float64, torch.int32
    # sizes only matter through their divisibility
    M, K, N, R = (37, 4095, 45, r_pad) if kernel.endswith(":unaligned") else (256, 512, 384, r_pad)
    adapter = f32 if kernel.endswith(":fp32-adapters") else dt
    e = lambda *shape, d=dt: torch.empty(*shape, dtype=d)  # noqa: E731
    slots = 16
    saved = Saved(v=e(M, R, d=f32), P=e(N, R, d=f64), n=e(N, d=f64), g=e(N, d=f32),
                  slots=e(N, d=i32), zbuf=e(M, slots))
    terms = NormTerms(e(N, d=f64), e(N, R, d=f64), e(R, R, d=f64))
    kw = config.kwargs
    mixed = dict(g_rows=e(M, d=i32)) if kernel.endswith("mixed") else {}
    g = e(5, N, d=f32) if mixed else saved.g  # mixed: a table of 5 adapters' g
    if kernel.startswith("forward"):
        x, w = e(K, M).T if kernel == "forward:strided" else e(M, K), e(N, K)
        train = kernel in ("forward", "forward:strided", "forward:unaligned", "forward:tma")
        zbuf = e(M, slots if train else 0)
        args = triton_fwd.fwd_args(x, w, e(N) if train or mixed else None, saved.v,
                                   e(N, R), g, e(slots + 1, d=i32), e(M, N), zbuf, **mixed)
        args["TMA"] = kernel in TMA and _tma_chosen(x, w)
        fn = triton_fwd.edora_fwd_kernel.fn
    elif kernel.startswith("dx"):
        args = triton_bwd.dx_args(e(M, N), None if kernel == "dx:mixed" else saved.g, e(N, K),
                                  e(M, R), e(R, K, d=adapter), e(M, K))
        fn = triton_bwd.edora_dx_kernel.fn
    elif kernel.startswith("epilogue"):
        args = triton_epilogue.epilogue_args(e(M, N), saved.v, e(N), e(N, R), g,
                                             e(slots + 1, d=i32), e(M, N),
                                             e(M, 0) if mixed else saved.zbuf, **mixed)
        fn = triton_epilogue.edora_epilogue_kernel.fn
    elif kernel == "prologue":
        args = triton_prologue.prologue_args(
            e(M, K), e(R, K, d=adapter), e(N, R), e(R, R, d=f32), e(N, d=f32), terms, 0.5,
            saved.P, e(N, R), saved.n, saved.g, saved.slots, e(slots + 1, d=i32), saved.v,
            slots, kw["BLOCK_O"])
        fn = triton_prologue.prologue_kernel
    elif kernel.startswith("mixed_prologue"):
        # 8 leading rows of 32 tokens; 5 adapters and the base row
        gate = kernel == "mixed_prologue"
        cores, table = e(6, R, R, d=f32), e(6, N, d=f32)
        args = triton_mixed.mixed_prologue_args(
            e(M, K), e(R, K, d=adapter), e(N, R), e(8, d=torch.int64), 0.5,
            e(5, R, R, d=f32) if gate else cores, e(5, R, R, d=f64) if gate else None,
            e(5, N, d=f32) if gate else table,
            terms if gate else None, e(N, R), e(5, N, d=f64), table, cores, e(1, N, d=i32),
            e(M, R, d=f32), e(M, R, d=f32), True, kw["BLOCK_O"])
        fn = triton_mixed.mixed_prologue_kernel
    elif kernel.startswith("mixed_slots"):
        zeros = e(6, N, d=f32) if kernel.endswith(":table") else e(1, N, d=i32)
        args = triton_mixed.slots_args(zeros, e(N, d=i32), e(slots + 1, d=i32), slots)
        fn = triton_mixed.mixed_slots_kernel
    elif kernel.startswith("finalize:mixed"):
        # 8 leading rows of one part each; 5 adapters (m and n), or a g table of 6 rows
        tables = kernel.endswith("-tables")
        rows = 6 if tables else 5
        args = triton_bwd.finalize_args(
            saved._replace(n=None if tables else e(5, N, d=f64)), e(rows, N, d=f32), e(N, R),
            None, 0.5, e(8, N, d=f32), e(8, R, R, d=f32), e(rows, N, d=f32),
            e(rows, R, R, d=f32), e(8, R, R, d=f32), False, kw["BLOCK_O"],
            order=e(6 + 1 + 8, d=i32), table_rows=6, per_row=1)
        fn = triton_bwd.finalize_kernel
    elif kernel.startswith("prepass"):
        epilogue = kernel == "prepass:epilogue"
        parts = M // kw["BLOCK_M"]
        rows = dict(mixed, tokens_per_row=64) if mixed else {}
        args = triton_bwd.prepass_args(
            e(M, N), e(N, R), e(5, R, R, d=f32) if mixed else e(R, R, d=f32), e(M, N), e(N),
            saved._replace(g=g), 0.5, e(0) if epilogue else e(M, R), e(parts, R, R, d=f32),
            e(parts, N, d=f32), e(M, N) if epilogue or mixed else e(0), **rows)
        fn = triton_bwd.prepass_kernel
    elif kernel.startswith("finalize:") or kernel == "finalize":
        exact = kernel == "finalize"
        args = triton_bwd.finalize_args(
            saved, e(N, d=f32), e(N, R), terms, 0.5, e(4, N, d=f32), e(4, R, R, d=f32),
            e(N, d=f32), e(R, R, d=f32), e(12, R, R, d=f64), exact, kw["BLOCK_O"])
        fn = triton_bwd.finalize_kernel
    else:
        args = triton_bwd.finalize_exact_args(e(4, R, R, d=f32), e(12, R, R, d=f64),
                                              e(R, R, d=f32), 4, 0.5)
        fn = triton_bwd.finalize_exact_kernel
    return fn, args


def _small_configs(kernel: str, r_pad: int, dtype: str = "bfloat16"):
    """The configs a small kernel is launched with at this padded rank (distinct ones)."""
    import triton
    if kernel == "prologue":
        return [triton_configs.prologue_config(b) for b in triton_configs.ROW_BLOCKS]
    if kernel == "mixed_prologue":
        configs = {c.kwargs["BLOCK_M"]: c for c in (
            triton_configs.mixed_prologue_config(b, r_pad) for b in triton_configs.ROW_BLOCKS)}
        return list(configs.values())
    if kernel.startswith("mixed_slots"):
        return [triton.Config({}, num_warps=4)]
    if kernel.startswith("prepass"):
        elt = 4 if dtype == "float32" else 2
        configs = {triton_configs.prepass_config(b, r_pad, elt).kwargs["BLOCK_M"]:
                   triton_configs.prepass_config(b, r_pad, elt)
                   for b in triton_configs.ROW_BLOCKS}
        return list(configs.values())
    if kernel.startswith("finalize:") or kernel == "finalize":
        return [triton_configs.finalize_config(r_pad)]
    return [triton.Config({"DR_TILE": triton_configs.finalize_config(r_pad).kwargs["DR_TILE"]},
                          num_warps=4, num_stages=1)]


def _jobs(arch: int):
    """(kernel, dtype, r_pad, config): every config each kernel may run with on ``arch``."""
    import torch

    for dtype in DTYPES:
        elt = torch.empty(0, dtype=_torch_dtype(dtype)).element_size()
        for config in triton_configs.gemm_candidates(arch, elt):
            for kernel in GEMM_KERNELS:
                yield kernel, dtype, 16, config
        for config in triton_configs.EPILOGUE_CONFIGS:
            yield "epilogue", dtype, 16, config
        for kernel in ("prologue", "prepass", "mixed_prologue"):
            for r_pad in R_PADS:
                for config in _small_configs(kernel, r_pad, dtype):
                    yield kernel, dtype, r_pad, config
    for kernel in ("finalize", "finalize_exact"):  # adapter dtypes only: fp32 and bf16
        for dtype in ("float32", "bfloat16"):
            for r_pad in R_PADS:
                for config in _small_configs(kernel, r_pad):
                    yield kernel, dtype, r_pad, config
    first = triton_configs.gemm_candidates(arch, 2)[0]
    for variant in VARIANTS:
        configs = ([first] if variant.split(":")[0] in GEMM_KERNELS
                   else _small_configs(variant, 128)[-1:])
        yield variant, "bfloat16", 128, configs[0]
    for variant in UNALIGNED:
        for config in triton_configs.gemm_candidates(arch, 2, aligned=False):
            yield variant, "bfloat16", 16, config
    for config in triton_configs.gemm_candidates(arch, 2, gathered_g=True):
        yield "forward:mixed", "bfloat16", 16, config
    for config in triton_configs.EPILOGUE_CONFIGS:
        yield "epilogue:mixed", "bfloat16", 16, config
    for r_pad in R_PADS:
        for config in _small_configs("prepass", r_pad):
            yield "prepass:mixed", "bfloat16", r_pad, config
    for config in triton_configs.gemm_candidates(arch, 2):
        yield "dx:mixed", "bfloat16", 16, config
    for r_pad in R_PADS:
        for variant in ("finalize:mixed", "finalize:mixed-tables", "mixed_prologue:tables"):
            for config in _small_configs(variant.split(":")[0], r_pad):
                yield variant, "bfloat16", r_pad, config
    for variant in ("mixed_slots", "mixed_slots:table"):
        yield variant, "bfloat16", 16, _small_configs(variant, 16)[0]
    if arch == triton_configs.TMA_ARCH:
        yield from _tma_jobs(arch)


def _tma_jobs(arch: int):
    """The forward's TMA path: every candidate it may run with, per dtype and variant."""
    import torch

    for dtype in DTYPES:
        elt = torch.empty(0, dtype=_torch_dtype(dtype)).element_size()
        for config in triton_configs.gemm_candidates(arch, elt, tma=True):
            yield "forward:tma", dtype, 16, config
    yield "forward:tma-eval", "bfloat16", 128, triton_configs.gemm_candidates(arch, 2,
                                                                              tma=True)[0]
    for config in triton_configs.gemm_candidates(arch, 2, gathered_g=True, tma=True):
        yield "forward:tma-mixed", "bfloat16", 16, config


def _resource_usage(cubin: bytes) -> dict:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in usage.items()}


def _compile_all(arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton_configs.INTERPRET, "the AOT worker must run without TRITON_INTERPRET"
    rows = []
    for kernel, dtype, r_pad, config in _jobs(arch):
        fn, args = _problem_args(kernel, dtype, r_pad, config)
        args.update(config.kwargs)
        signature, constexprs, attrs = _specialize(fn, args)
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        kw = config.kwargs
        rows.append(dict(
            arch=arch, kernel=kernel, dtype=dtype, r_pad=r_pad,
            block_m=kw.get("BLOCK_M", kw.get("BLOCK_O", 0)), block_n=kw.get("BLOCK_N", 0),
            block_k=kw.get("BLOCK_K", 0),
            group_m=kw.get("GROUP_M", 0), num_warps=config.num_warps,
            num_stages=config.num_stages, regs=usage["REG"], stack=usage["STACK"],
            local=usage["LOCAL"], static_shared=usage["SHARED"],
            dynamic_shared=compiled.metadata.shared,
            wgmma="wgmma.mma_async" in ptx, cp_async=AMPERE_ASYNC_COPY.search(ptx) is not None,
            tma="cp.async.bulk.tensor" in ptx,
        ))
    return rows


# ------------------------------------------------------------------------------------------------
# Test side
# ------------------------------------------------------------------------------------------------

def _print_table(rows):
    header = (f"{'arch':>4} {'kernel':<17} {'dtype':<12} {'r_pad':>5} {'tile':>12} {'w':>2} "
              f"{'s':>2} {'regs':>4} {'spill':>5} {'shared':>7} {'wgmma':>5} {'async':>5} "
              f"{'tma':>3}")
    print("\n" + header)
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    for r in rows:
        tile = f"{r['block_m']}x{r['block_n']}x{r['block_k']}"
        print(f"{r['arch']:>4} {r['kernel']:<17} {r['dtype']:<12} {r['r_pad']:>5} {tile:>12} "
              f"{r['num_warps']:>2} {r['num_stages']:>2} {r['regs']:>4} "
              f"{r['stack'] + r['local']:>5} {r['static_shared'] + r['dynamic_shared']:>7} "
              f"{yes(r['wgmma']):>5} {yes(r['cp_async']):>5} {yes(r['tma']):>3}")


@pytest.fixture(scope="module")
def aot_csv(tmp_path_factory) -> Path:
    return Path(os.environ.get(CSV_ENV) or tmp_path_factory.mktemp("aot") / "resources.csv")


@pytest.fixture(scope="module")
def aot_rows(aot_csv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    workers = [
        subprocess.Popen([sys.executable, __file__, str(arch)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in ARCHS
    ]
    rows = []
    for arch, worker in zip(ARCHS, workers):
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, f"sm_{arch} AOT worker failed:\n{err[-4000:]}"
        rows += json.loads(out.strip().splitlines()[-1])
    _print_table(rows)
    aot_csv.parent.mkdir(parents=True, exist_ok=True)
    with aot_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _select(rows, arch, kernel, dtype):
    found = [r for r in rows if (r["arch"], r["kernel"], r["dtype"]) == (arch, kernel, dtype)]
    assert found, f"nothing compiled for sm_{arch} {kernel} {dtype}"
    return found


def _label(r):
    return (f"sm_{r['arch']} {r['kernel']} {r['dtype']} r_pad={r['r_pad']} "
            f"{r['block_m']}x{r['block_n']}x{r['block_k']} w{r['num_warps']} s{r['num_stages']}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_shared_memory_fits(aot_rows, arch, kernel):
    dtypes = ("float32", "bfloat16") if kernel.startswith("finalize") else DTYPES
    for dtype in dtypes:
        for r in _select(aot_rows, arch, kernel, dtype):
            assert r["stack"] == 0 and r["local"] == 0, f"{_label(r)} spills: {r}"
            shared = r["static_shared"] + r["dynamic_shared"]
            limit = triton_configs.SMEM_LIMIT[arch]
            assert shared <= limit, f"{_label(r)} needs {shared} B shared memory"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_kernels_pipeline_and_use_wgmma_on_hopper(aot_rows, arch, kernel, dtype):
    """The pointer loads of the main loop are pipelined as asynchronous copies (cp.async, on
    sm_80 and on sm_90's pointer path alike) whenever num_stages ≥ 2."""
    for r in _select(aot_rows, arch, kernel, dtype):
        if r["num_stages"] > 1:
            assert r["cp_async"], f"{_label(r)} is not pipelined with cp.async"
        if arch == 90:
            assert r["wgmma"], f"{_label(r)} does not use wgmma"


@pytest.mark.parametrize("dtype", DTYPES)
def test_tma_forward_on_hopper(aot_rows, dtype):
    """The forward's TMA path compiles for sm_90 with every candidate it may pick: TMA loads,
    wgmma, no spills, shared memory within the limit."""
    rows = _select(aot_rows, 90, "forward:tma", dtype)
    if dtype == "bfloat16":
        rows += [r for v in TMA[1:] for r in _select(aot_rows, 90, v, dtype)]
    elt = 4 if dtype == "float32" else 2
    tiles = {(r["block_m"], r["block_n"], r["block_k"], r["num_warps"], r["num_stages"])
             for r in rows if r["kernel"] == "forward:tma"}
    assert tiles == {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                      c.num_stages) for c in triton_configs.gemm_candidates(90, elt, tma=True)}
    for r in rows:
        assert r["tma"] and r["wgmma"], f"{_label(r)}: tma={r['tma']} wgmma={r['wgmma']}"
        assert r["stack"] == 0 and r["local"] == 0, f"{_label(r)} spills: {r}"
        shared = r["static_shared"] + r["dynamic_shared"]
        assert shared <= triton_configs.SMEM_LIMIT[90], f"{_label(r)} needs {shared} B"


def test_unaligned_problems_keep_the_pointer_path():
    """On sm_90 the chooser gives the aligned problem TMA and the unaligned one (in = 4095)
    the pointer loads, whose compiles the checks above cover."""
    first = triton_configs.gemm_candidates(90, 2)[0]
    _, aligned = _problem_args("forward:tma", "bfloat16", 16, first)
    _, unaligned = _problem_args("forward:unaligned", "bfloat16", 16, first)
    assert aligned["TMA"]
    assert not _tma_chosen(unaligned["x_ptr"], unaligned["w_ptr"])


def _tma_chosen(x, w) -> bool:
    """The chooser's answer for these operands on Hopper with the TMA path switched on (the
    tensors are on the CPU)."""
    with mock.patch.dict(os.environ, {triton_configs.TMA_ENV: "1"}):
        return triton_configs.tma_operands(triton_configs.TMA_ARCH, x, w)


@pytest.mark.parametrize("arch", ARCHS)
def test_variants_compile_without_spills(aot_rows, arch):
    for variant in VARIANTS + UNALIGNED + MIXED + MIXED_TRAINING:
        for r in _select(aot_rows, arch, variant, "bfloat16"):
            assert r["stack"] == 0 and r["local"] == 0, f"{_label(r)} spills: {r}"
            # Rows of 4095 bf16 elements cannot be copied asynchronously (cp.async needs at
            # least 4-byte aligned sources): those loads are synchronous by necessity.
            if variant.split(":")[0] in GEMM_KERNELS and variant != "forward:unaligned":
                assert r["cp_async"], f"{_label(r)} is not pipelined with cp.async"
            assert not r["tma"], f"{_label(r)} is on the pointer path but uses TMA"


def test_every_candidate_config_compiled(aot_rows, aot_csv):
    """Each config of each architecture's list appears for every dtype it may be picked for."""
    for arch in ARCHS:
        for dtype in DTYPES:
            for kernel in GEMM_KERNELS:
                tiles = {(r["block_m"], r["block_n"], r["block_k"], r["num_warps"],
                          r["num_stages"]) for r in _select(aot_rows, arch, kernel, dtype)}
                elt = 4 if dtype == "float32" else 2
                for c in triton_configs.gemm_candidates(arch, elt):
                    kw = c.kwargs
                    key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps,
                           c.num_stages)
                    assert key in tiles, f"sm_{arch} {kernel} {dtype}: {key} not compiled"
            for kernel in ("prologue", "prepass", "mixed_prologue"):
                compiled = {r["r_pad"] for r in _select(aot_rows, arch, kernel, dtype)}
                assert compiled == set(R_PADS), f"sm_{arch} {kernel} {dtype}: {compiled}"
    with aot_csv.open() as f:
        assert len(list(csv.DictReader(f))) == len(aot_rows)


if __name__ == "__main__":
    # Worker: compile everything for one architecture, print the rows as JSON on the last line.
    print(json.dumps(_compile_all(int(sys.argv[1]))))
