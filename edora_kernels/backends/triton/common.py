"""@triton.jit helpers shared by the kernels: tile ordering, the GEMM main loop (pointer loads, or
TMA on Hopper), the rank-r epilogue product, the output store (scale, shift and the
zero-magnitude z columns) and masked stores."""
import triton
import triton.language as tl


def mixed_args(g, g_rows) -> dict:
    """The kernels' arguments for a batch mixing adapters: ``g`` a table (adapters × N) and
    ``g_rows`` the table row of each token (int32); without ``g_rows``, g is one vector."""
    if g_rows is None:
        return dict(grow_ptr=g, stride_gk=0, G_ROWS=False)  # never dereferenced
    return dict(grow_ptr=g_rows, stride_gk=g.stride(0), G_ROWS=True)


# Width of the rank chunks of the epilogue products (tl.dot needs every dimension ≥ 16): the
# rank-r operands stream through in 16-wide chunks, so no tile grows with the rank.
RANK_CHUNK = tl.constexpr(16)


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile ``pid`` in grouped order: GROUP_M row blocks sweep the columns
    together, so their rows and the weight columns they share are read from L2, not DRAM."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def mainloop(
    # left operand (x, or gy in dx), offset to the tile's first row: rows × K
    lhs_ptr, stride_lm, stride_lk,
    # per-k scale folded into the left operand as it is loaded (g in dx), read when SCALE_K
    kscale_ptr,
    # right operand, offset to the tile's first column: K × cols (W0ᵀ or Aᵀ forward, W0 in dx)
    rhs_ptr, stride_rk, stride_rn,
    rows, cols, K,
    SCALE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``lhs·rhs`` over K in fp32, the right operand cast to the left one's dtype as it is
    loaded (fp32 factors on a bf16 model)."""
    dtype = lhs_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    lhs_ptrs = lhs_ptr + offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lk
    rhs_ptrs = rhs_ptr + offs_k[:, None] * stride_rk + offs_n[None, :] * stride_rn
    row_mask = offs_m[:, None] < rows
    col_mask = offs_n[None, :] < cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # --- loads; out-of-range k read as 0 so partial tiles add nothing
        k_mask = offs_k < K - k0
        lhs = tl.load(lhs_ptrs, mask=row_mask & k_mask[None, :], other=0.0)
        if SCALE_K:
            scale = tl.load(kscale_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            lhs = (lhs.to(tl.float32) * scale[None, :]).to(dtype)
        rhs = tl.load(rhs_ptrs, mask=k_mask[:, None] & col_mask, other=0.0).to(dtype)
        acc = tl.dot(lhs, rhs, acc, input_precision=INPUT_PRECISION)
        lhs_ptrs += BLOCK_K * stride_lk
        rhs_ptrs += BLOCK_K * stride_rk
    return acc


@triton.jit
def mainloop_tma(lhs_desc, rhs_desc, row0, col0, K, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``mainloop`` on Hopper for the forward's operands: ``lhs·rhsᵀ`` over K in fp32, both
    read by TMA from descriptors of rows × K (x) and cols × K (W0) in one dtype. TMA fills
    boxes past the edges with zeros, so nothing is masked."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        lhs = lhs_desc.load([row0, k0])
        rhs = rhs_desc.load([col0, k0])
        acc = tl.dot(lhs, rhs.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def add_lowrank(
    acc,
    # L, the tile's BLOCK_M rows × RANK (v forward, u in dx), offset to the tile's first row
    low_ptr, stride_lm, stride_lr,
    # Q, RANK × the tile's columns (s·Pᵀ forward, A in dx), offset to the tile's first column
    q_ptr, stride_qr, stride_qn,
    rows, cols, RANK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """``acc + L·Q``, both factors rounded to DTYPE (the main product's operand dtype, as the
    torch backend rounds v and P), the scaling already in one of them. The rank runs in
    RANK_CHUNK-wide chunks: the registers needed do not grow with r."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, RANK_CHUNK)
    for r0 in range(0, RANK, RANK_CHUNK):
        r_mask = (r0 + offs_c) < RANK
        low = tl.load(low_ptr + offs_m[:, None] * stride_lm + (r0 + offs_c)[None, :] * stride_lr,
                      mask=(offs_m[:, None] < rows) & r_mask[None, :], other=0.0)
        q = tl.load(q_ptr + (r0 + offs_c)[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                    mask=r_mask[:, None] & (offs_n[None, :] < cols), other=0.0)
        acc = tl.dot(low.to(DTYPE), q.to(DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def store_output(y_ptr, stride_ym, stride_yn, z, g_ptr, bias_ptr, index_ptr, zbuf_ptr,
                 stride_zm, grow_ptr, stride_gk, col0, rows, cols, HAS_BIAS: tl.constexpr,
                 HAS_SLOTS: tl.constexpr, G_ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``y = g ⊙ z + b`` (z in fp32) and the z columns of zero magnitudes into their slots
    of zbuf (docs/DESIGN.md §3). ``y_ptr``, ``g_ptr`` and ``bias_ptr`` are offset to the tile's
    first column (col0), ``zbuf_ptr`` and ``grow_ptr`` to its first row.

    With G_ROWS (a batch mixing adapters, docs/DESIGN.md §13) g is a table, one row per adapter
    (``stride_gk`` apart), and row m of the tile takes table row ``grow[m]``.

    The slot index lists the columns that took a slot (almost always none): each one in this
    tile is reduced out of z and stored alone, so no scattered store or second tile of z ever
    needs the registers of the widest GEMM tiles."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_in = offs_n < cols
    row_mask = offs_m < rows
    if HAS_SLOTS:
        for k in range(0, tl.load(index_ptr)):
            c = tl.load(index_ptr + 1 + k) - col0
            if (c >= 0) & (c < BLOCK_N):
                z_c = tl.sum(tl.where(offs_n[None, :] == c, z, 0.0), axis=1)
                tl.store(zbuf_ptr + offs_m * stride_zm + k, z_c, mask=row_mask)
    if G_ROWS:
        adapter = tl.load(grow_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        y = z * tl.load(g_ptr + adapter[:, None] * stride_gk + offs_n[None, :],
                        mask=row_mask[:, None] & col_in[None, :], other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs_n, mask=col_in, other=0.0).to(tl.float32)
        y = z * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_in[None, :])


@triton.jit
def store_tile(ptr, value, stride_m, stride_n, rows, cols,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Masked store of a BLOCK_M×BLOCK_N tile at ``ptr`` (the tile's corner) in ptr's dtype."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    tl.store(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
             value.to(ptr.dtype.element_ty),
             mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols))
