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
    # left operand (x forward, gy in dx), offset to the tile's first row: rows × K
    lhs_ptr, stride_lm, stride_lk,
    # per-k scale folded into the left operand as it is loaded (g in dx), read when SCALE_K
    kscale_ptr,
    # main right operand (W0ᵀ forward, W0 in dx), offset to the tile's first column: K × cols
    main_ptr, stride_mk, stride_mn,
    # rank-r right operand (Aᵀ forward, B in dx): K × RANK
    rank_ptr, stride_rk, stride_rr,
    # valid rows and columns of this tile, reduction length, rank
    rows, cols, K, RANK,
    HAS_MAIN: tl.constexpr, SCALE_K: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One pass over K accumulating ``lhs·main`` (BLOCK_M×BLOCK_N, when HAS_MAIN) and
    ``lhs·rank`` (BLOCK_M×RANK_PAD) in fp32: the left tile is loaded once for both products."""
    dtype = lhs_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RANK_PAD)
    lhs_ptrs = lhs_ptr + offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lk
    main_ptrs = main_ptr + offs_k[:, None] * stride_mk + offs_n[None, :] * stride_mn
    rank_ptrs = rank_ptr + offs_k[:, None] * stride_rk + offs_r[None, :] * stride_rr
    row_mask = offs_m[:, None] < rows
    col_mask = offs_n[None, :] < cols
    rank_mask = offs_r[None, :] < RANK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_rank = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # --- loads; out-of-range k read as 0 so partial tiles add nothing
        k_mask = offs_k < K - k0
        lhs = tl.load(lhs_ptrs, mask=row_mask & k_mask[None, :], other=0.0)
        if SCALE_K:
            scale = tl.load(kscale_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            lhs = (lhs.to(tl.float32) * scale[None, :]).to(dtype)
        rank_tile = tl.load(rank_ptrs, mask=k_mask[:, None] & rank_mask, other=0.0).to(dtype)
        # --- products
        acc_rank = tl.dot(lhs, rank_tile, acc_rank, input_precision=INPUT_PRECISION)
        if HAS_MAIN:
            main = tl.load(main_ptrs, mask=k_mask[:, None] & col_mask, other=0.0)
            acc = tl.dot(lhs, main, acc, input_precision=INPUT_PRECISION)
            main_ptrs += BLOCK_K * stride_mk
        lhs_ptrs += BLOCK_K * stride_lk
        rank_ptrs += BLOCK_K * stride_rk
    return acc, acc_rank


@triton.jit
def add_lowrank(
    acc, low,
    # Q, a RANK × cols slice offset to the tile's first column (Pᵀ in the forward, R A in dx)
    q_ptr, stride_qr, stride_qn,
    cols, RANK, scaling,
    RANK_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc + s·low·Q`` for the rank-r rows ``low`` (v forward, t in dx), already rounded to the
    operand dtype as the torch backend stores v and t; s is folded into the small Q tile instead
    of the BLOCK_M×BLOCK_N result."""
    offs_r = tl.arange(0, RANK_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                mask=(offs_r[:, None] < RANK) & (offs_n[None, :] < cols), other=0.0)
    q = (q.to(tl.float32) * scaling).to(low.dtype)
    return tl.dot(low, q, acc, input_precision=INPUT_PRECISION)


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

