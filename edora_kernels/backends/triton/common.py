"""@triton.jit helpers shared by the forward, epilogue and backward kernels: tile ordering, the
two-accumulator main loop, the rank-r epilogue product, the scale-and-shift and masked stores."""
import triton
import triton.language as tl


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

