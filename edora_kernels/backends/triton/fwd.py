"""Fused Triton forward for EDoRA (DESIGN §4) and the epilogue-only kernel.

Forward, one kernel: each program owns a BLOCK_M×BLOCK_N tile of y. A single loop over ``in``
accumulates ``x·W0ᵀ`` (BLOCK_M×BLOCK_N) and ``x·Aᵀ`` (BLOCK_M×R_PAD, the rank padded to a power of
two ≥ 16 by masks, never in memory); the epilogue adds ``s·v·Pᵀ``, scales by g, adds b and stores
y, plus z and (from the first column of programs) v when training.

Epilogue-only, one kernel: given ``y0 = base(x)`` and ``v = x Aᵀ``, ``z = y0 − b + s·v·Pᵀ`` and
``y = g ⊙ z + b``, for base layers that are not a dense weight.

The @triton.jit helpers here (tile ordering, the two-accumulator main loop, the rank-r epilogue
product, masked stores) and the config/prune machinery are shared with ``triton_bwd``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import torch_backend

# Read once, like ``triton.jit`` does when it decides between compiling and interpreting.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_RANK = 128  # largest rank the kernels take; larger ranks use the torch backend
MIN_R_PAD = 16  # tl.dot needs every dimension ≥ 16


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

# Shared memory per block on each architecture family (opt-in maximum), used when no device is
# at hand (ahead-of-time checks); on a device the driver's own figure is used.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# fp32 accumulator registers per thread allowed (main + rank accumulator), measured with the
# ahead-of-time checks: past this the main loop's operands or the epilogue's temporaries spill.
# mma.sync (Ampere) holds operand fragments in registers as well; wgmma reads them from shared.
ACC_REG_BUDGET = {80: 88, 90: 136}


def gemm_configs(arch: int) -> list:
    """The candidate list of the GEMM kernels for a compute capability (major·10 + minor)."""
    return GEMM_CONFIGS_SM90 if arch >= 90 else GEMM_CONFIGS_SM80


def gemm_smem_bytes(config, arch: int, elt_size: int, r_pad: int) -> int:
    """Operand tiles (x or gy, W0, the rank-r factor) in flight — num_stages buffers with
    Hopper's async wgmma pipeline, num_stages − 1 with Ampere's cp.async one — plus the rank
    accumulator's trip through shared memory on its way to the epilogue product."""
    kw = config.kwargs
    per_stage = kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"] + r_pad) * elt_size
    buffers = config.num_stages if arch >= 90 else max(config.num_stages - 1, 1)
    return buffers * per_stage + kw["BLOCK_M"] * r_pad * elt_size


def gemm_acc_regs(config, r_pad: int) -> float:
    """fp32 accumulator registers per thread: BLOCK_M×(BLOCK_N + R_PAD) over the threads."""
    kw = config.kwargs
    return kw["BLOCK_M"] * (kw["BLOCK_N"] + r_pad) / (32 * config.num_warps)


def gemm_candidates(arch: int, elt_size: int, r_pad: int, smem_limit: int | None = None) -> list:
    """Every config the autotuner may pick on ``arch`` for this dtype size and padded rank.

    The shape-independent part of the prune filter: shared memory within the chip's limit and
    the accumulators within the register budget. Never empty: the config needing the least
    shared memory is the fallback.
    """
    family = 90 if arch >= 90 else 80
    limit = SMEM_LIMIT[family] if smem_limit is None else smem_limit
    configs = gemm_configs(arch)
    kept = [
        c for c in configs
        if gemm_smem_bytes(c, arch, elt_size, r_pad) <= limit
        and gemm_acc_regs(c, r_pad) <= ACC_REG_BUDGET[family]
    ]
    return kept or [min(configs, key=lambda c: gemm_smem_bytes(c, arch, elt_size, r_pad))]


def fit_to_problem(configs: list, m_bucket: int, n: int) -> list:
    """Drop tiles far larger than the problem (a 128-row tile for 8 tokens); never empties."""
    n_bucket = triton.next_power_of_2(max(n, 1))
    smallest_m = min(c.kwargs["BLOCK_M"] for c in configs)
    smallest_n = min(c.kwargs["BLOCK_N"] for c in configs)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(m_bucket, smallest_m)
        and c.kwargs["BLOCK_N"] <= max(n_bucket, smallest_n)
    ]
    return kept or configs[-1:]


def device_arch_and_smem(t: torch.Tensor) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(t.device)
    props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
    return major * 10 + minor, props["max_shared_mem"]


def prune_gemm(configs, named_args, **kwargs):
    """``early_config_prune`` of the GEMM kernels: this device's family, resources, problem size."""
    args = {**named_args, **kwargs}
    arch, smem = device_arch_and_smem(args["c_ptr"])
    elt_size = args["a_ptr"].element_size()
    allowed = gemm_candidates(arch, elt_size, args["R_PAD"], smem)
    kept = [c for c in configs if any(c is a for a in allowed)]
    return fit_to_problem(kept, args["M_BUCKET"], args["N"])


def prune_epilogue(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return fit_to_problem(list(configs), args["M_BUCKET"], args["N"])


def m_bucket(m: int) -> int:
    """The token count as the autotuner sees it: next power of two in [16, 8192]."""
    return min(max(triton.next_power_of_2(max(m, 1)), 16), 8192)


def r_pad(rank: int) -> int:
    return max(triton.next_power_of_2(rank), MIN_R_PAD)


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
    - ranks above MAX_RANK: the rank accumulator would not fit next to the main tile.
    """
    if dtype == torch.float64 or rank > MAX_RANK:
        return True
    return dtype == torch.float32 and not INTERPRET and not tf32_allowed()


# ------------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ------------------------------------------------------------------------------------------------

@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row blocks sweep the columns
    together, so their rows and the weight columns they share are read from L2, not DRAM."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def lowrank_mainloop(
    # left operand (x or gy), offset to the tile's first row: rows × K
    a_ptr, stride_am, stride_ak,
    # per-k scale folded into the left operand as it is loaded (g), read when SCALE_K
    kscale_ptr,
    # right operand, offset to the tile's first column: K × cols
    b_ptr, stride_bk, stride_bn,
    # rank-r right operand (Aᵀ or B): K × R
    l_ptr, stride_lk, stride_lr,
    # valid rows and columns of this tile, reduction length, rank
    rows, cols, K, R,
    HAS_MAIN: tl.constexpr, SCALE_K: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One pass over K accumulating ``a·b`` (BLOCK_M×BLOCK_N, when HAS_MAIN) and ``a·l``
    (BLOCK_M×R_PAD) in fp32: the left tile is loaded once for both products."""
    dtype = a_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    l_ptrs = l_ptr + offs_k[:, None] * stride_lk + offs_r[None, :] * stride_lr
    row_mask = offs_m[:, None] < rows
    col_mask = offs_n[None, :] < cols
    rank_mask = offs_r[None, :] < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_lr = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # --- loads; out-of-range k read as 0 so partial tiles add nothing
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask & k_mask[None, :], other=0.0)
        if SCALE_K:
            scale = tl.load(kscale_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            a = (a.to(tl.float32) * scale[None, :]).to(dtype)
        lr = tl.load(l_ptrs, mask=k_mask[:, None] & rank_mask, other=0.0).to(dtype)
        # --- products
        acc_lr = tl.dot(a, lr, acc_lr, input_precision=INPUT_PRECISION)
        if HAS_MAIN:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            b_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        l_ptrs += BLOCK_K * stride_lk
    return acc, acc_lr


@triton.jit
def add_lowrank(
    acc, lr,
    # Q, an R × cols slice offset to the tile's first column (Pᵀ in the forward, R A in dx)
    q_ptr, stride_qr, stride_qn,
    cols, R, scaling,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc + s·lr·Q`` with lr rounded to Q's operand dtype first, as the torch backend stores v
    and t; s is folded into the small Q tile instead of the BLOCK_M×BLOCK_N result."""
    offs_r = tl.arange(0, R_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < cols), other=0.0)
    q = (q.to(tl.float32) * scaling).to(lr.dtype)
    return tl.dot(lr, q, acc, input_precision=INPUT_PRECISION)


@triton.jit
def store_tile(ptr, value, stride_m, stride_n, rows, cols,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Masked store of a BLOCK_M×BLOCK_N tile at ``ptr`` (the tile's corner) in ptr's dtype."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    tl.store(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
             value.to(ptr.dtype.element_ty),
             mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols))


@triton.jit
def scale_shift(z, g_ptr, bias_ptr, cols, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``g ⊙ z + b`` for a tile whose columns start at g_ptr / bias_ptr."""
    offs_n = tl.arange(0, BLOCK_N)
    g = tl.load(g_ptr + offs_n, mask=offs_n < cols, other=0.0).to(tl.float32)
    y = z * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < cols, other=0.0).to(tl.float32)[None, :]
    return y


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=[GEMM_CONFIG_INTERPRET] if INTERPRET else GEMM_CONFIGS_SM90 + GEMM_CONFIGS_SM80,
    key=["M_BUCKET", "N", "K", "R_PAD"],
    prune_configs_by={"early_config_prune": prune_gemm},
)
@triton.jit
def edora_fwd_kernel(
    # inputs: x (M×K), W0 (N×K), A (R×K), P = B R (N×R), g (N), bias (N)
    a_ptr, w_ptr, lr_ptr, p_ptr, g_ptr, bias_ptr,
    # outputs: y and z (M×N), v (M×R)
    c_ptr, z_ptr, v_ptr,
    # sizes: M tokens, N = out, K = in, R = rank; M_BUCKET only keys the autotuner
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_lr, stride_lk,
    stride_pn, stride_pr,
    stride_cm, stride_cn,
    stride_zm, stride_zn,
    stride_vm, stride_vr,
    scaling,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile; row offsets in 64 bits (M·K may pass 2³¹ elements)
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = pid_n * BLOCK_N
    rows = M - pid_m * BLOCK_M
    cols = N - col0

    # --- z₀ = x·W0ᵀ and v = x·Aᵀ in one pass over K
    acc, v = lowrank_mainloop(
        a_ptr + row0 * stride_am, stride_am, stride_ak,
        g_ptr,
        w_ptr + col0 * stride_wn, stride_wk, stride_wn,
        lr_ptr, stride_lk, stride_lr,
        rows, cols, K, R,
        True, False, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
    )

    # --- epilogue: z = z₀ + s·v·Pᵀ, y = g ⊙ z + b; z is stored before y is formed so the two
    # tiles are never live together
    v = v.to(a_ptr.dtype.element_ty)
    z = add_lowrank(acc, v, p_ptr + col0 * stride_pn, stride_pr, stride_pn,
                    cols, R, scaling, R_PAD, BLOCK_N, INPUT_PRECISION)
    if SAVE:
        store_tile(z_ptr + row0 * stride_zm + col0 * stride_zn, z, stride_zm, stride_zn,
                   rows, cols, BLOCK_M, BLOCK_N)
        if pid_n == 0:
            store_tile(v_ptr + row0 * stride_vm, v, stride_vm, stride_vr, rows, R, BLOCK_M, R_PAD)
    y = scale_shift(z, g_ptr + col0, bias_ptr + col0, cols, HAS_BIAS, BLOCK_N)
    store_tile(c_ptr + row0 * stride_cm + col0 * stride_cn, y, stride_cm, stride_cn,
               rows, cols, BLOCK_M, BLOCK_N)


@triton.autotune(
    configs=[EPILOGUE_CONFIG_INTERPRET] if INTERPRET else EPILOGUE_CONFIGS,
    key=["M_BUCKET", "N", "R_PAD"],
    prune_configs_by={"early_config_prune": prune_epilogue},
)
@triton.jit
def edora_epilogue_kernel(
    # inputs: y0 = base(x) (M×N), v = x·Aᵀ (M×R), P = B R (N×R), g (N), bias (N)
    y0_ptr, v_ptr, p_ptr, g_ptr, bias_ptr,
    # outputs: y and z (M×N)
    c_ptr, z_ptr,
    M, N, R, M_BUCKET,
    stride_y0m, stride_y0n,
    stride_vm, stride_vr,
    stride_pn, stride_pr,
    stride_cm, stride_cn,
    stride_zm, stride_zn,
    scaling,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # --- this program's tile
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = pid_n * BLOCK_N
    rows = M - pid_m * BLOCK_M
    cols = N - col0
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    row_mask = offs_m[:, None] < rows
    col_mask = offs_n < cols

    # --- loads: y0 − b in fp32, v in its own dtype (it feeds the rank-r product)
    z0 = tl.load(y0_ptr + row0 * stride_y0m + offs_m[:, None] * stride_y0m
                 + (col0 + offs_n)[None, :] * stride_y0n,
                 mask=row_mask & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z0 -= tl.load(bias_ptr + col0 + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    v = tl.load(v_ptr + row0 * stride_vm + offs_m[:, None] * stride_vm
                + offs_r[None, :] * stride_vr,
                mask=row_mask & (offs_r[None, :] < R), other=0.0)

    # --- z = y0 − b + s·v·Pᵀ, y = g ⊙ z + b
    z = add_lowrank(z0, v, p_ptr + col0 * stride_pn, stride_pr, stride_pn,
                    cols, R, scaling, R_PAD, BLOCK_N, INPUT_PRECISION)
    if SAVE:
        store_tile(z_ptr + row0 * stride_zm + col0 * stride_zn, z, stride_zm, stride_zn,
                   rows, cols, BLOCK_M, BLOCK_N)
    y = scale_shift(z, g_ptr + col0, bias_ptr + col0, cols, HAS_BIAS, BLOCK_N)
    store_tile(c_ptr + row0 * stride_cm + col0 * stride_cn, y, stride_cm, stride_cn,
               rows, cols, BLOCK_M, BLOCK_N)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def tiles_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def fwd_args(x, weight, bias, A, P, g, scaling, save, y, v, z) -> dict:
    """Arguments of ``edora_fwd_kernel`` except the config's; also used by the AOT checks."""
    (M, K), N, R = x.shape, weight.shape[0], A.shape[0]
    # Unused pointers point at y: never dereferenced, and typed like a real output.
    return dict(
        a_ptr=x, w_ptr=weight, lr_ptr=A, p_ptr=P, g_ptr=g,
        bias_ptr=bias if bias is not None else y,
        c_ptr=y, z_ptr=z if save else y, v_ptr=v if save else y,
        M=M, N=N, K=K, R=R, M_BUCKET=m_bucket(M),
        stride_am=x.stride(0), stride_ak=x.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_lr=A.stride(0), stride_lk=A.stride(1),
        stride_pn=P.stride(0), stride_pr=P.stride(1),
        stride_cm=y.stride(0), stride_cn=y.stride(1),
        stride_zm=z.stride(0) if save else 0, stride_zn=z.stride(1) if save else 0,
        stride_vm=v.stride(0) if save else 0, stride_vr=v.stride(1) if save else 0,
        scaling=float(scaling),
        R_PAD=r_pad(R), HAS_BIAS=bias is not None, SAVE=bool(save),
        INPUT_PRECISION=input_precision(x.dtype),
    )


def forward(x, weight, bias, A, P, g, scaling, save):
    """The backend contract's forward: ``(y, v, z)``, v and z empty unless ``save``.

    Inputs named by ``use_torch_path`` take the torch backend's code path.
    """
    if use_torch_path(x.dtype, A.shape[0]):
        return torch_backend.forward(x, weight, bias, A, P, g, scaling, save)
    (M, _), N, R = x.shape, weight.shape[0], A.shape[0]
    y = x.new_empty(M, N)
    v = x.new_empty(M, R) if save else x.new_empty(0)
    z = x.new_empty(M, N) if save else x.new_empty(0)
    if M == 0:
        return y, v, z
    edora_fwd_kernel[tiles_grid(M, N)](**fwd_args(x, weight, bias, A, P, g, scaling, save, y, v, z))
    return y, v, z


def epilogue_args(y0, v, bias, P, g, scaling, save, y, z) -> dict:
    """Arguments of ``edora_epilogue_kernel`` except the config's."""
    (M, N), R = y0.shape, v.shape[1]
    return dict(
        y0_ptr=y0, v_ptr=v, p_ptr=P, g_ptr=g, bias_ptr=bias if bias is not None else y,
        c_ptr=y, z_ptr=z if save else y,
        M=M, N=N, R=R, M_BUCKET=m_bucket(M),
        stride_y0m=y0.stride(0), stride_y0n=y0.stride(1),
        stride_vm=v.stride(0), stride_vr=v.stride(1),
        stride_pn=P.stride(0), stride_pr=P.stride(1),
        stride_cm=y.stride(0), stride_cn=y.stride(1),
        stride_zm=z.stride(0) if save else 0, stride_zn=z.stride(1) if save else 0,
        scaling=float(scaling),
        R_PAD=r_pad(R), HAS_BIAS=bias is not None, SAVE=bool(save),
        INPUT_PRECISION=input_precision(y0.dtype),
    )


def epilogue(y0, v, bias, P, g, scaling, save):
    """``z = y0 − b + s·v·Pᵀ`` and ``y = g ⊙ z + b`` in one kernel; returns ``(y, z)``.

    y0 (N×out) is the base layer's output including its bias, v = x Aᵀ (N×r) in y0's dtype,
    bias (out) in y0's dtype or None, P = B R (out×r) and g = m/n (out) in the compute dtype.
    y and z come back in y0's dtype; z is empty unless ``save``. Inputs named by
    ``use_torch_path`` take the torch backend's code path.
    """
    N, R = y0.shape[0], v.shape[1]
    if use_torch_path(y0.dtype, R):
        return torch_backend.epilogue(y0, v, bias, P, g, scaling, save)
    out = y0.shape[1]
    y = y0.new_empty(N, out)
    z = y0.new_empty(N, out) if save else y0.new_empty(0)
    if N == 0:
        return y, z
    args = epilogue_args(y0, v, bias, P, g, scaling, save, y, z)
    edora_epilogue_kernel[tiles_grid(N, out)](**args)
    return y, z
