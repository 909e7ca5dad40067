"""A cost model of one layer's step (docs/DESIGN.md §4): every launch with its FLOPs, its bytes
to and from device memory and its roofline time on a named GPU, and the predicted ratio to the
frozen layer. ``edora-kernels plan`` prints it.

The launch list is the one the backends issue (``tests/test_plan.py`` checks it against the
launches counted on CPU); the times rest on the assumptions in ``ASSUMPTIONS``, stated in
docs/DESIGN.md §4. A prediction, not a measurement: ``bench/gpu_check.sh`` measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .backends.triton.configs import cdiv

# Dense peak FLOP/s by operand dtype (tensor cores; TF32 for fp32) and HBM bandwidth, from the
# vendors' data sheets (SXM parts).
# "fp32_simt": fp32 without TF32 (torch's default for matmul), what the initialiser computes in;
# "fp64": the float64 tensor cores (the adapters' norms in torch); "fp64_simt": float64 FMAs
# without them (the norms in the mixed prologue's rank-1 updates).
DEVICES = {
    "h100": {"name": "NVIDIA H100 SXM", "bf16": 989e12, "fp16": 989e12, "fp32": 495e12,
             "fp32_simt": 67e12, "fp64": 67e12, "fp64_simt": 34e12, "hbm": 3.35e12},
    "h200": {"name": "NVIDIA H200 SXM", "bf16": 989e12, "fp16": 989e12, "fp32": 495e12,
             "fp32_simt": 67e12, "fp64": 67e12, "fp64_simt": 34e12, "hbm": 4.8e12},
    "a100": {"name": "NVIDIA A100 SXM", "bf16": 312e12, "fp16": 312e12, "fp32": 156e12,
             "fp32_simt": 19.5e12, "fp64": 19.5e12, "fp64_simt": 9.7e12, "hbm": 2.039e12},
}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ASSUMPTIONS = {
    # cuBLAS reaches about 75% of the dense peak on these large GEMMs (the frozen layer).
    "gemm_efficiency": 0.75,
    # The fused GEMMs run the same tiles over the same operands: the same efficiency, their
    # epilogue's extra work counted on top at the same rates.
    "fused_gemm_efficiency": 0.75,
    # A streaming kernel reaches about 85% of the memory bandwidth.
    "memory_efficiency": 0.85,
    # Every kernel costs at least this much device time (launch, ramp-up, tail), and a kernel
    # that depends on the previous one starts this much after it ends, the host keeping ahead.
    "min_kernel_us": 3.0,
    "gap_us": 1.0,
    # The initialiser's small dense work on a GPU: a batched thin QR (geqrf + orgqr on blocks
    # of at most 11008×20) and the Rayleigh–Ritz SVD of the Wᵀ-products (≤ 4096×120 a matrix)
    # are chains of many small kernels, taken at a fixed cost per call (not yet measured).
    "thin_qr_us": 150.0,
    "small_svd_us": 3000.0,
}
BACKENDS = ("triton", "cuda")


@dataclass
class Launch:
    name: str     # as counted: triton::<kernel>, _C.<function> (the CUDA extension), aten::<op>
    phase: str    # "fwd" or "bwd"
    flops: float
    bytes: float
    gemm: bool    # tensor-core bound at the GEMM efficiency, else streaming
    operand: str = ""  # the DEVICES rate its FLOPs run at; "" for the plan's dtype
    seconds: float = 0.0
    bound: str = ""


@dataclass
class LayerCase:
    """The layer and batch a plan is made for, on a named GPU."""

    device: str
    dtype: str
    tokens: int
    in_features: int
    out_features: int
    rank: int


@dataclass
class Plan(LayerCase):
    backend: str = "triton"
    exact_norm: bool = False
    launches: list[Launch] = field(default_factory=list)
    frozen: list[Launch] = field(default_factory=list)

    def seconds(self, launches: list[Launch], phases=("fwd", "bwd")) -> float:
        return sum(launch.seconds for launch in launches if launch.phase in phases)

    @property
    def forward_ratio(self) -> float:
        return self.seconds(self.launches, ("fwd",)) / self.seconds(self.frozen, ("fwd",))

    @property
    def step_ratio(self) -> float:
        return self.seconds(self.launches) / self.seconds(self.frozen)


def plan_step(backend: str, tokens: int, in_features: int, out_features: int, rank: int,
              dtype: str = "bf16", device: str = "h100", exact_norm: bool = False,
              assumptions: dict | None = None) -> Plan:
    """The launches of one training step (forward, then backward with x needing a gradient) of
    ``backend`` and of the frozen layer, each timed by the roofline of ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {tuple(DEVICES)}, got {device!r}")
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype must be one of {tuple(ELEMENT_BYTES)}, got {dtype!r}")
    plan = Plan(device, dtype, tokens, in_features, out_features, rank, backend=backend,
                exact_norm=exact_norm)
    shape = _Shape(tokens, in_features, out_features, rank, ELEMENT_BYTES[dtype])
    plan.launches = (_triton_step if backend == "triton" else _cuda_step)(shape, exact_norm)
    plan.frozen = _frozen_step(shape)
    a = {**ASSUMPTIONS, **(assumptions or {})}
    for launch in plan.launches + plan.frozen:
        _time(launch, DEVICES[device], dtype, a, fused=launch in plan.launches)
    return plan


@dataclass(frozen=True)
class _Shape:
    N: int
    In: int
    Out: int
    r: int
    e: int       # bytes per element of x, W0, y
    f32: int = 4
    f64: int = 8

    @property
    def row_parts(self) -> int:
        """Row-block partial sums of the backward pre-pass (64 rows each at these sizes)."""
        return cdiv(self.N, 64)


def _frozen_step(s: _Shape) -> list[Launch]:
    gemm = 2.0 * s.N * s.In * s.Out
    return [
        Launch("aten::mm", "fwd", gemm, (s.N * s.In + s.Out * s.In + s.N * s.Out) * s.e, True),
        Launch("aten::mm", "bwd", gemm, (s.N * s.Out + s.Out * s.In + s.N * s.In) * s.e, True),
    ]


def _gate_bytes(s: _Shape) -> float:
    """B, R, C, c0, m, G in; P (float64 and s·P), n, g, slots out."""
    return (s.Out * s.r * (s.e + 2 * s.f64 + s.e) + s.Out * (2 * s.f64 + 3 * s.f32)
            + 2 * s.r * s.r * s.f64)


def _finalize(s: _Shape, exact: bool) -> list[Launch]:
    parts = s.row_parts
    reads = parts * (s.Out + s.r * s.r) * s.f32 + s.Out * (s.f32 + s.f64)
    launches = [Launch("triton::finalize_kernel", "bwd", 2.0 * s.Out * s.r * s.r * exact,
                       reads + s.Out * s.f32 + s.r * s.r * s.f32, False)]
    if exact:
        launches.append(Launch("triton::finalize_exact_kernel", "bwd", 0.0,
                               cdiv(s.Out, 32) * s.r * s.r * s.f64, False))
    return launches


def _triton_step(s: _Shape, exact: bool) -> list[Launch]:
    """backends/triton: prologue, GEMM; pre-pass, finalize, dx GEMM."""
    N, In, Out, r, e = s.N, s.In, s.Out, s.r, s.e
    return [
        Launch("triton::prologue_kernel", "fwd", 2.0 * N * In * r + 4.0 * Out * r * r,
               N * In * e + r * In * e + N * r * s.f32 + _gate_bytes(s), False),
        Launch("triton::edora_fwd_kernel", "fwd", 2.0 * N * In * Out + 2.0 * N * r * Out,
               (N * In + Out * In + N * Out) * e + N * r * s.f32 + Out * r * e, True),
        Launch("triton::prepass_kernel", "bwd", 2.0 * N * Out * r + 4.0 * N * r * r,
               2 * N * Out * e + N * r * (s.f32 + e) + Out * r * e
               + s.row_parts * (Out + r * r) * s.f32, False),
        *_finalize(s, exact),
        Launch("triton::edora_dx_kernel", "bwd", 2.0 * N * Out * In + 2.0 * N * r * In,
               (N * Out + Out * In + N * In) * e + N * r * e + r * In * e, True),
    ]


def _cuda_step(s: _Shape, exact: bool) -> list[Launch]:
    """backends/cuda: prologue, cuBLAS GEMM, rescale; pre-pass, finalize, cuBLAS dx and its
    rank-r update."""
    N, In, Out, r, e = s.N, s.In, s.Out, s.r, s.e
    finalize = [Launch(launch.name.replace("triton::finalize_kernel", "_C.finalize")
                       .replace("triton::finalize_exact_kernel", "_C.finalize_exact"),
                       launch.phase, launch.flops, launch.bytes, launch.gemm)
                for launch in _finalize(s, exact)]
    return [
        Launch("_C.prologue", "fwd", 2.0 * N * In * r + 4.0 * Out * r * r,
               N * In * e + r * In * e + N * r * s.f32 + _gate_bytes(s), False),
        Launch("aten::mm", "fwd", 2.0 * N * In * Out, (N * In + Out * In + N * Out) * e, True),
        Launch("_C.rescale", "fwd", 2.0 * N * r * Out,
               2 * N * Out * e + N * r * s.f32 + Out * r * s.f32, False),
        Launch("_C.prepass", "bwd", 2.0 * N * Out * r + 4.0 * N * r * r,
               3 * N * Out * e + N * r * (s.f32 + e) + s.row_parts * (Out + r * r) * s.f32,
               False),
        *finalize,
        Launch("aten::mm", "bwd", 2.0 * N * Out * In, (N * Out + Out * In + N * In) * e, True),
        Launch("aten::addmm_", "bwd", 2.0 * N * r * In, (2 * N * In + N * r + r * In) * e,
               False),
    ]


@dataclass
class MixedPlan(LayerCase):
    """A batch mixing ``adapters`` adapters on Triton, served (one layer's forward) or trained
    (forward and backward), against the same batch with one adapter (``one``)."""

    adapters: int = 1
    rows: int = 1
    training: bool = False
    launches: list[Launch] = field(default_factory=list)
    one: list[Launch] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return sum(x.seconds for x in self.launches) / sum(x.seconds for x in self.one)


OPERAND_RATES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32_simt",
                 "float64": "fp64"}


def plan_mixed(tokens: int, in_features: int, out_features: int, rank: int, adapters: int,
               rows: int | None = None, dtype: str = "bf16", device: str = "h100",
               training: bool = False, assumptions: dict | None = None) -> MixedPlan:
    """One layer of ``tokens`` tokens in ``rows`` leading rows (default: one per adapter, in
    turn) mixing ``adapters`` adapters on the Triton backend — served, or with ``training`` a
    forward and backward after an optimizer step (so every adapter's norms and tables are made
    again) — against the same batch with one adapter (:func:`plan_step`'s launches: the
    forward's, or all). The launches are the layer's own (:func:`mixed_step_on_meta`), each
    timed by the roofline of ``device``."""
    from .bench.launches import measure_launches, stub_kernels

    rows = adapters if rows is None else rows
    one = plan_step("triton", tokens, in_features, out_features, rank, dtype, device,
                    assumptions=assumptions)
    plan = MixedPlan(device, dtype, tokens, in_features, out_features, rank, adapters=adapters,
                     rows=rows, training=training)
    with stub_kernels():
        costs = measure_launches(mixed_step_on_meta(tokens, in_features, out_features, rank,
                                                    adapters, rows, dtype, training))
    plan.launches = [Launch(c.name, c.phase, c.flops, c.bytes, c.gemm,
                            OPERAND_RATES[str(c.dtype).removeprefix("torch.")]
                            if c.name.startswith("aten::") and c.gemm else c.operand)
                     for c in costs]
    a = {**ASSUMPTIONS, **(assumptions or {})}
    for launch in plan.launches:
        _time(launch, DEVICES[device], dtype, a, fused=True)
    plan.one = one.launches if training else [x for x in one.launches if x.phase == "fwd"]
    return plan


def mixed_step_on_meta(tokens: int, in_features: int, out_features: int, rank: int,
                       adapters: int, rows: int, dtype: str, training: bool):
    """An EDoRA layer on meta tensors (``backend="triton"``: run it under
    ``bench.launches.stub_kernels``) holding ``adapters`` adapters and a batch of ``rows``
    leading rows (row i: adapter i mod K); returns the step :func:`plan_mixed` times, run once
    already (the norm terms made, the served tables kept, the row indices on the device, as
    for every layer after a forward's first) — and for ``training`` with every R changed
    since, as an optimizer step leaves them."""
    import torch
    from torch import nn

    from .layer import EDoRALinear
    from .mixed import RowAssignment

    if tokens % rows:
        raise ValueError(f"tokens ({tokens}) must be a multiple of rows ({rows})")
    meta = dict(device="meta", dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16",
                                                     "fp32": "float32"}[dtype]))
    layer = EDoRALinear.from_factors(nn.Linear(in_features, out_features, **meta),
                                     torch.empty(rank, in_features, **meta),
                                     torch.empty(out_features, rank, **meta), backend="triton")
    for i in range(1, adapters):
        layer.add_adapter(f"adapter{i}")
    x = torch.empty(rows, tokens // rows, in_features, **meta, requires_grad=training)
    gy = torch.empty(rows, tokens // rows, out_features, **meta)
    assignment = RowAssignment(torch.arange(rows) % adapters)

    def step():
        layer.row_adapters = assignment
        if not training:
            with torch.no_grad():
                return layer(x)
        layer(x).backward(gy)
        for p in layer.parameters():  # as an optimizer step leaves them (with no launch here)
            if p.requires_grad:
                torch.autograd.graph.increment_version(p)
                p.grad = None
        x.grad = None

    step()
    return step


def format_mixed_plan(plan: MixedPlan) -> str:
    dev = DEVICES[plan.device]
    what = "trained (forward and backward)" if plan.training else "served"
    lines = [f"mixed batch {what} on triton, {dev['name']}, {plan.dtype}: N={plan.tokens} in "
             f"{plan.rows} rows, in={plan.in_features} out={plan.out_features} r={plan.rank}, "
             f"K={plan.adapters} adapters", *_launch_table(plan.launches, phases=plan.training)]
    one = sum(x.seconds for x in plan.one)
    lines.append(f"  one adapter ({len(plan.one)} launches): {one * 1e6:.1f} us")
    lines.append(f"  predicted: {plan.ratio:.3f}x one adapter, {len(plan.launches)} launches")
    return "\n".join(lines)


def _launch_table(launches: list[Launch], phases: bool) -> list[str]:
    """A header and one line per launch: (phase,) name, GFLOP, MB, µs, what bounds it."""
    def phase(name: str) -> str:
        return f"{name:<5} " if phases else ""

    header = f"  {phase('phase')}{'launch':<32} {'GFLOP':>9} {'MB':>9} {'us':>8}  bound"
    return [header] + [f"  {phase(launch.phase)}{launch.name:<32} {launch.flops / 1e9:9.2f} "
                       f"{launch.bytes / 1e6:9.1f} {launch.seconds * 1e6:8.1f}  {launch.bound}"
                       for launch in launches]


def _time(launch: Launch, device: dict, dtype: str, a: dict, fused: bool) -> None:
    efficiency = a["fused_gemm_efficiency"] if fused else a["gemm_efficiency"]
    compute = launch.flops / (device[launch.operand or dtype] * (efficiency if launch.gemm else
                                               a["memory_efficiency"]))
    memory = launch.bytes / (device["hbm"] * a["memory_efficiency"])
    floor = a["min_kernel_us"] * 1e-6
    body = max(compute, memory, floor)
    launch.bound = ("launch" if body == floor else "compute" if compute >= memory
                    else "memory")
    launch.seconds = body + a["gap_us"] * 1e-6


def format_plan(plan: Plan) -> str:
    """The launch table of one plan, then its totals and predicted ratios."""
    dev = DEVICES[plan.device]
    lines = [f"{plan.backend} on {dev['name']}, {plan.dtype}: N={plan.tokens} "
             f"in={plan.in_features} out={plan.out_features} r={plan.rank}"
             f"{' (exact norm gradient)' if plan.exact_norm else ''}",
             *_launch_table(plan.launches, phases=True)]
    frozen_fwd, frozen = plan.seconds(plan.frozen, ("fwd",)), plan.seconds(plan.frozen)
    lines.append(f"  frozen F.linear: forward {frozen_fwd * 1e6:.1f} us, forward+backward "
                 f"{frozen * 1e6:.1f} us")
    lines.append(f"  predicted: forward {plan.forward_ratio:.3f}x frozen, forward+backward "
                 f"{plan.step_ratio:.3f}x frozen, {len(plan.launches)} launches")
    return "\n".join(lines)


# --- the initialiser ---------------------------------------------------------------------------


@dataclass
class InitChunk:
    shape: tuple[int, int]   # (out, in)
    matrices: int
    bytes: float
    flops: float
    small_calls: int         # thin QRs; plus one small SVD
    seconds: float = 0.0


@dataclass
class InitPlan:
    device: str
    dtype: str
    rank: int
    chunks: list[InitChunk] = field(default_factory=list)

    @property
    def matrices(self) -> int:
        return sum(c.matrices for c in self.chunks)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.chunks)


def plan_init(shapes: dict[tuple[int, int], int], rank: int = 16, dtype: str = "bf16",
              device: str = "h100", assumptions: dict | None = None) -> InitPlan:
    """The batched initialiser (``apply_edora``'s chunks of ``model.chunk_factors``) on
    ``shapes`` ((out, in) → how many matrices) on a GPU: each chunk stacks its weights in fp32,
    makes ``2·n_iter + 2`` skinny products over them (2·b flops per 4-byte element, b = r +
    oversample: memory-bound), one more for A where out > in (for out ≤ in A comes from the
    Rayleigh–Ritz step), ``1 + 2·n_iter`` thin QRs and one small SVD."""
    import torch

    from .model import DEFAULT_MEMORY_BUDGET, _bytes_per_matrix
    from .svd import DEFAULT_N_ITER, default_oversample

    a = {**ASSUMPTIONS, **(assumptions or {})}
    dev, element = DEVICES[device], ELEMENT_BYTES[dtype]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    b, passes = rank + default_oversample(rank), 2 * DEFAULT_N_ITER + 2
    plan = InitPlan(device, dtype, rank)
    for (out_f, in_f), count in shapes.items():
        per_chunk = max(1, DEFAULT_MEMORY_BUDGET // _bytes_per_matrix(out_f, in_f, rank,
                                                                      torch_dtype, "rsvd"))
        for start in range(0, count, per_chunk):
            k = min(per_chunk, count - start)
            size = k * out_f * in_f
            reads = passes + (1 if out_f > in_f else 0)
            chunk = InitChunk((out_f, in_f), k, bytes=size * (element + 4 + 4 * reads),
                              flops=2.0 * size * b * reads, small_calls=1 + 2 * DEFAULT_N_ITER)
            streaming = max(chunk.bytes / (dev["hbm"] * a["memory_efficiency"]),
                            chunk.flops / dev["fp32_simt"])
            chunk.seconds = (streaming + chunk.small_calls * a["thin_qr_us"] * 1e-6
                             + a["small_svd_us"] * 1e-6)
            plan.chunks.append(chunk)
    return plan


def format_init_plan(plan: InitPlan) -> str:
    dev = DEVICES[plan.device]
    lines = [f"initialiser on {dev['name']}, {plan.dtype} model, r={plan.rank}: "
             f"{plan.matrices} matrices in {len(plan.chunks)} batched chunks",
             f"  {'out x in':>12} {'matrices':>8} {'chunks':>6} {'GB moved':>9} {'s':>8}"]
    by_shape: dict[tuple[int, int], list[InitChunk]] = {}
    for chunk in plan.chunks:
        by_shape.setdefault(chunk.shape, []).append(chunk)
    for (out_f, in_f), chunks in by_shape.items():
        lines.append(f"  {f'{out_f}x{in_f}':>12} {sum(c.matrices for c in chunks):>8} "
                     f"{len(chunks):>6} {sum(c.bytes for c in chunks) / 1e9:9.1f} "
                     f"{sum(c.seconds for c in chunks):8.3f}")
    lines.append(f"  predicted: {plan.seconds:.2f} s, {plan.matrices / plan.seconds:.0f} "
                 "matrices/s (a model, not a measurement: bench --init --init-llama7b measures)")
    return "\n".join(lines)
