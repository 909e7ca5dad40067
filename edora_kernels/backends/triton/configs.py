"""Launch configurations of the Triton kernels and the rules that pick them.

Per-architecture candidate tiles, the shared-memory and register model that prunes them (also
used by the ahead-of-time checks, where no device is at hand), the token-count bucket the
autotuner keys on, and the TF32 / fallback rules that decide which inputs the kernels take.
"""
from __future__ import annotations

import os

import torch
import triton

# Read once, like ``triton.jit`` does when it decides between compiling and interpreting.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_RANK = 128  # largest rank the kernels take; larger ranks use the torch backend
MIN_RANK_PAD = 16  # tl.dot needs every dimension ≥ 16
FIXED_CONFIG_ENV = "EDORA_TRITON_FIXED_CONFIG"


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def _gemm_config(block_m, block_n, block_k, stages, warps, group_m=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_stages=stages, num_warps=warps,
    )


# Candidates for the two fused GEMMs (forward, dx), per architecture family. Hopper (sm_90) gets
# wgmma-sized tiles (a warpgroup owns 64 rows); Ampere (sm_80/86/89) mma.sync tiles with fewer
# accumulator registers per thread, 64×128 with 8 warps for ranks above 64. BLOCK_K = 32
# variants keep fp32 (TF32) inputs inside shared memory.
GEMM_CONFIGS_SM90 = [
    _gemm_config(128, 256, 64, 3, 8),
    _gemm_config(128, 128, 64, 4, 8),
    _gemm_config(128, 128, 32, 3, 8),
    _gemm_config(64, 128, 64, 4, 4),
    _gemm_config(64, 128, 32, 3, 8),
]
GEMM_CONFIGS_SM80 = [
    _gemm_config(128, 128, 32, 4, 8),
    _gemm_config(64, 128, 32, 4, 4),
    _gemm_config(64, 128, 32, 3, 8),
    _gemm_config(64, 64, 32, 4, 4),
]
# The interpreter runs one program at a time in numpy: one small, fixed config, no tuning.
GEMM_CONFIG_INTERPRET = _gemm_config(64, 64, 32, 1, 4)

EPILOGUE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=1, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_stages=1, num_warps=8),
]
EPILOGUE_CONFIG_INTERPRET = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8},
                                          num_stages=1, num_warps=4)

# The small kernels run one fixed config each (no timing): they are memory-bound or tiny, and a
# fixed config fixes the order of every reduction, so dR and dm are the same bits in every run.
# Row programs (the prologue's x·Aᵀ, the backward pre-pass) each stream a contiguous row panel;
# their height is the largest of ROW_BLOCKS that still gives every SM a program.
ROW_BLOCKS = (16, 32, 64)
ROW_PROGRAMS_PER_SM = 1


def prologue_config(block_m: int) -> triton.Config:
    """16 output rows per gate program (two float64 BLOCK_O × RANK_PAD tiles in registers),
    block_m tokens per x·Aᵀ program over 64-wide slices of the input."""
    return triton.Config({"BLOCK_O": 16, "BLOCK_M": block_m, "BLOCK_K": 64}, num_warps=4,
                         num_stages=2)


def mixed_prologue_config(block_m: int, r_pad: int) -> triton.Config:
    """The prologue's config for a batch mixing adapters: its row programs also hold t's
    chunks and their operands beside v, so from r_pad = 64 they take 32 rows (measured ahead
    of time under triton 3.6: 64 rows spilled 8 B at fp32 on sm_80 at r_pad = 128, 16 rows left
    an 8 B stack frame at bf16 on sm_90 at r_pad = 64)."""
    return prologue_config(32 if r_pad >= 64 else block_m)


def prepass_config(block_m: int, r_pad: int, elt_size: int) -> triton.Config:
    """block_m rows per program (at most 32 once a row of t holds 256 bytes of operands, 16
    from 512: the t tile and its operand fragments then leave no registers for the streamed
    gy and y tiles; measured ahead of time) over 32-wide slices of the output columns (64-wide
    ones left ptxas a stack frame at fp16, 32 rows, r = 16)."""
    width = r_pad * elt_size
    block_m = min(block_m, 16 if width >= 512 else 32 if width >= 256 else block_m)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_K": 32}, num_warps=small_warps(r_pad),
                         num_stages=2)


def finalize_config(r_pad: int) -> triton.Config:
    """32 columns per column program (the norm's share holds float64 32 × RANK_PAD tiles),
    16 × 16 entries of dR per tile program."""
    return triton.Config({"BLOCK_O": 32, "DR_TILE": 16}, num_warps=small_warps(r_pad),
                         num_stages=1)


def small_warps(r_pad: int) -> int:
    """The r×r tiles of the pre-pass and the finalize spread over more threads above r = 64."""
    return 8 if r_pad > 64 else 4


# Shared memory per block on each architecture family (opt-in maximum), used when no device is
# at hand (ahead-of-time checks); on a device the driver's own figure is used.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# fp32 accumulator registers per thread allowed (main + rank accumulator), per architecture
# family and operand size, measured with the ahead-of-time checks under triton 3.6 and 3.8: past
# this the main loop's operands or the epilogue's temporaries spill. mma.sync (Ampere) holds
# operand fragments in registers as well, twice as many for TF32 (32-bit) operands; wgmma reads
# them from shared memory.
ACC_REG_BUDGET = {(80, 2): 88, (80, 4): 76, (90, 2): 136, (90, 4): 136}
# The forward's TMA path (sm_90): its persistent loop keeps 60–110 more registers a thread
# live than one tile per program (the epilogue's offsets and masks are hoisted out of the tile
# loop), and the 128×256 tile (128 accumulator registers) spilled 8 B under triton 3.6.
TMA_ACC_REG_BUDGET = 64


def gemm_configs(arch: int) -> list:
    """The candidate list of the GEMM kernels for a compute capability (major·10 + minor)."""
    return GEMM_CONFIGS_SM90 if arch >= 90 else GEMM_CONFIGS_SM80


def gemm_smem_bytes(config, arch: int, elt_size: int) -> int:
    """Operand tiles in flight — num_stages buffers with Hopper's async wgmma pipeline,
    num_stages − 1 with Ampere's cp.async one — plus the epilogue's rank chunks (a BLOCK_M × 16
    and a 16 × BLOCK_N tile) on their way to the tensor cores."""
    kw = config.kwargs
    per_stage = kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"]) * elt_size
    buffers = config.num_stages if arch >= 90 else max(config.num_stages - 1, 1)
    return buffers * per_stage + 16 * (kw["BLOCK_M"] + kw["BLOCK_N"]) * elt_size


def gemm_acc_regs(config) -> float:
    """fp32 accumulator registers per thread: BLOCK_M×BLOCK_N over the threads."""
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * config.num_warps)


def gemm_candidates(arch: int, elt_size: int, smem_limit: int | None = None,
                    aligned: bool = True, gathered_g: bool = False, tma: bool = False) -> list:
    """Every config the autotuner may pick on ``arch`` for this dtype size. The rank does not
    enter: it streams through the epilogue in 16-wide chunks. ``aligned=False``: sizes or row
    strides not divisible by 16, where loads are scalar and masked; measured ahead of time, only
    the 64×128×32, 8-warp tile then stays clear of spills under triton 3.6 and 3.8 (in = 4095:
    128×128×32 spilled 160 B on sm_90, BLOCK_K = 64 tiles up to 912 B). ``gathered_g``: a batch
    mixing adapters, whose epilogue holds a tile of g beside the accumulator: half the
    accumulator budget (128×256 on sm_90 spilled 168 B). ``tma``: the forward's TMA path,
    within TMA_ACC_REG_BUDGET.

    The shape-independent part of the prune filter: shared memory within the chip's limit and
    the accumulator within the register budget. Never empty: the config needing the least
    shared memory is the fallback.
    """
    family = 90 if arch >= 90 else 80
    limit = SMEM_LIMIT[family] if smem_limit is None else smem_limit
    configs = gemm_configs(arch)

    def smem(c):
        return gemm_smem_bytes(c, arch, elt_size)

    budget = ACC_REG_BUDGET[family, elt_size] / (2 if gathered_g else 1)
    if tma:
        budget = min(budget, TMA_ACC_REG_BUDGET)
    kept = [c for c in configs
            if smem(c) <= limit and gemm_acc_regs(c) <= budget
            and (aligned or _unaligned_tile(c))]
    return kept or [min(configs, key=smem)]


def _unaligned_tile(config) -> bool:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps) == (64, 128, 32, 8)


def fit_to_problem(configs: list, m_bucket: int, n: int) -> list:
    """Drop tiles far larger than the problem (a 128-row tile for 8 tokens); never empties."""
    n_bucket = next_power_of_2(max(n, 1))
    smallest_m = min(c.kwargs["BLOCK_M"] for c in configs)
    smallest_n = min(c.kwargs["BLOCK_N"] for c in configs)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(m_bucket, smallest_m)
        and c.kwargs["BLOCK_N"] <= max(n_bucket, smallest_n)
    ]
    return kept or configs[-1:]


def device_arch_and_smem(t: torch.Tensor) -> tuple[int, int]:
    props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
    return device_arch(t), props["max_shared_mem"]


def device_arch(t: torch.Tensor) -> int:
    """Compute capability of t's device (major·10 + minor); 0 off CUDA (the interpreter)."""
    if t.device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


# What TMA copies for the forward GEMM: one of these dtypes, on Hopper. Blackwell has TMA too,
# but the sm_90 configs and their ahead-of-time checks are all that back this path.
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_ARCH = 90
# The TMA path is opt-in until a GPU shows it beats the pointer loads: it is proved in the
# interpreter and compiled ahead of time, never timed (bench/gpu_check.sh times both).
TMA_ENV = "EDORA_TRITON_TMA"


def tma_operands(arch: int, *operands: torch.Tensor) -> bool:
    """Whether the forward GEMM reads its operands (x and W0, each rows × K) through TMA
    descriptors with a persistent grid: with ``EDORA_TRITON_TMA=1``, on sm_90, one dtype TMA
    copies, and TMA's layout rules for every operand — unit stride along K, the row stride and
    the base address 16-byte aligned, no empty dimension. Anything else keeps the pointer
    loads."""
    if os.environ.get(TMA_ENV) != "1":
        return False
    if arch != TMA_ARCH or len({t.dtype for t in operands}) != 1:
        return False
    return operands[0].dtype in TMA_DTYPES and all(
        t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0 for t in operands)


def _main_operands_aligned(args) -> bool:
    """Whether the JIT can prove the big operands' sizes and row strides 16-divisible (what
    vectorised, asynchronous loads need); a unit stride is specialised to 1."""
    lhs_stride = args["stride_xm"] if "stride_xm" in args else args["stride_gym"]
    values = (args["K"], args["N"], lhs_stride, args["stride_wn"], args["stride_wk"])
    return all(v == 1 or v % 16 == 0 for v in values)


def fixed_config() -> bool:
    """``EDORA_TRITON_FIXED_CONFIG=1``: no timing runs; each launch takes the first candidate
    that fits the device, dtypes, rank and problem size. The same config — hence the same
    reduction order and the same dR/dm bits — in every process, at some speed cost."""
    return os.environ.get(FIXED_CONFIG_ENV, "0") not in ("", "0")


def prune_gemm(configs, named_args, **kwargs):
    """``early_config_prune`` of the GEMM kernels: this device's family, resources, problem size."""
    args = {**named_args, **kwargs}
    # W0 shares the dtype of the left operand (x or gy) in both GEMM kernels.
    arch, smem = device_arch_and_smem(args["w_ptr"])
    allowed = gemm_candidates(arch, args["w_ptr"].element_size(), smem,
                              aligned=_main_operands_aligned(args),
                              gathered_g=bool(args.get("G_ROWS", False)),
                              tma=bool(args.get("TMA", False)))
    kept = fit_to_problem([c for c in configs if any(c is a for a in allowed)],
                          args["M_BUCKET"], args["N"])
    return kept[:1] if fixed_config() else kept


def prune_epilogue(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = fit_to_problem(list(configs), args["M_BUCKET"], args["N"])
    return kept[:1] if fixed_config() else kept


def m_bucket(m: int) -> int:
    """The token count as the autotuner sees it: next power of two in [16, 8192]."""
    return min(max(next_power_of_2(max(m, 1)), 16), 8192)


def r_pad(rank: int) -> int:
    return max(next_power_of_2(rank), MIN_RANK_PAD)


def tf32_allowed() -> bool:
    """torch's switch for TF32 in fp32 matmuls; the new ``fp32_precision`` API wins when set."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the legacy flag after mixed API use
        return False


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: TF32 for fp32 on a GPU (the fp32 kernels run only where torch allows
    TF32, see ``use_torch_path``), exact in the interpreter."""
    return "tf32" if dtype == torch.float32 and not INTERPRET else "ieee"


def use_torch_path(dtype: torch.dtype, rank: int) -> bool:
    """Inputs the kernels leave to the torch backend's code path:

    - fp64: a checking dtype, no tensor cores;
    - fp32 where torch forbids TF32: Triton's exact fp32 dot runs on the FMA units and spills
      at these tiles; cuBLAS SGEMM is the better kernel and keeps torch's numerics;
    - ranks above MAX_RANK: the r×r tiles of the gate and the pre-pass would not fit in
      registers.
    """
    if dtype == torch.float64 or rank > MAX_RANK:
        return True
    return dtype == torch.float32 and not INTERPRET and not tf32_allowed()


# Host-side integer helpers: triton's own are constexpr functions, slow to call from Python.

def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()


def row_block(M: int, device: torch.device, leading_rows: int = 1) -> int:
    """Rows per program of the row-panel kernels (prologue's x·Aᵀ, the backward pre-pass): the
    largest of ROW_BLOCKS that still gives every SM a program, when each program's rows lie in
    one of ``leading_rows`` leading rows of M tokens each (a mixed batch; 1: all tokens). A
    function of the shape and the device only, so the pre-pass's partial sums (and dR, dm) are
    the same bits in every run on a machine."""
    if device.type != "cuda":
        return ROW_BLOCKS[0]
    programs = ROW_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    for block in reversed(ROW_BLOCKS):
        if leading_rows * cdiv(M, block) >= programs:
            return block
    return ROW_BLOCKS[0]


def tiles_grid(M, N):
    return lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)


# Programs of a persistent launch off CUDA (the interpreter): few, and not dividing the tile
# counts of the tests, so programs loop over several tiles and some over fewer.
INTERPRET_PROGRAMS = 3


def persistent_grid(M, N, device: torch.device):
    """A program per SM of ``device`` (no more than there are tiles); each loops over every
    programs-th tile."""
    programs = (torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else INTERPRET_PROGRAMS)
    tiles = tiles_grid(M, N)
    return lambda meta: (min(programs, tiles(meta)[0]),)
