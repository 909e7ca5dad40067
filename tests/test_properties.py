"""Property-based: ``edora_linear`` against the float64 dense reference over drawn problems.

Each example is a ``Problem`` (a readable spec; hypothesis prints it on failure) built by
``edora_kernels.testing.make_case``: in/out from 1 to 40, rank 1 to min(in, out), x of shape
(in,), (N, in) with N = 0 and 1 among others, or (a, b, in); x contiguous, transposed in memory
or strided (every other column or row of a wider buffer, at an offset); scaling 0, negative,
large (±8, 32/r) or any float in [-8, 8]; R either matched to the scaling (s·R of fixed size) or
drawn for alpha = 16 whatever the scaling (s·B R A from 0 to many times W0); both norm modes;
fp64 and fp32, with and without bias. y and the gradients of x, R, magnitude and bias are held to
the tolerance table (edora_kernels.tolerances). Problems where that table cannot hold for any
fp32 computation (``well_conditioned``: a nearly cancelled row norm, a bias far above the
magnitude, an exact-norm dR that cancels its own shares) are set aside by ``assume``; a few
percent of the draws. The torch backend takes many examples; the Triton backend (the interpreter
without a GPU) a few small fp32 ones, with the torch backend as the baseline of the table's rule
for cancelling sums (docs/DESIGN.md §8). Examples are derandomized: the same ones on every run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from helpers import TRAINABLE, assert_close, check_outputs, reference_with_grads, run_with_grads
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from edora_kernels import edora_linear
from edora_kernels.testing import make_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYOUTS = ("contiguous", "transposed", "strided_columns", "strided_rows")


@dataclass(frozen=True)
class Problem:
    in_features: int
    out_features: int
    rank: int
    lead: tuple[int, ...]        # x is (*lead, in)
    layout: str                  # one of LAYOUTS: how x lies in memory when the op sees it
    scaling: float
    matched_R: bool              # R drawn for this scaling (s·R fixed) or for alpha = 16
    bias: bool
    detach_norm: bool
    dtype: torch.dtype
    seed: int

    @property
    def tokens(self) -> int:
        return math.prod(self.lead)


def profile(examples):
    # derandomize: the same examples on every run and machine; no example database.
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw, max_features=40, max_tokens=24, max_side=5,
             dtypes=(torch.float64, torch.float32), lead_kinds=("N", "N01", "ab", "1d")):
    def features():  # the bounds themselves are always candidates
        return draw(st.one_of(st.sampled_from([1, max_features]),
                              st.integers(1, max_features)))

    in_f, out_f = features(), features()
    top = min(in_f, out_f)
    rank = draw(st.one_of(st.sampled_from([1, top]), st.integers(1, top)))
    lead = draw(st.sampled_from(lead_kinds).flatmap(lambda kind: {
        "N": st.tuples(st.integers(0, max_tokens)),                          # (N, in)
        "N01": st.tuples(st.sampled_from([0, 1])),                           # N = 0 or 1
        "ab": st.tuples(st.integers(1, max_side), st.integers(1, max_side)),  # (a, b, in)
        "1d": st.just(()),                                                   # (in,)
    }[kind]))
    layout = draw(st.sampled_from(LAYOUTS))
    if not lead:  # a 1-D x has no rows to transpose or skip
        layout = "strided_columns" if layout != "contiguous" else layout
    scaling = draw(st.one_of(
        st.sampled_from([0.0, -8.0, 8.0, -1.0]),
        st.sampled_from([1.0, 8.0, 16.0, 32.0]).map(lambda alpha: alpha / rank),
        st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    ))
    return Problem(in_f, out_f, rank, lead, layout, scaling, draw(st.booleans()),
                   draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(dtypes)),
                   draw(st.integers(0, 2**31 - 1)))


def build(p: Problem, device=DEVICE) -> dict:
    """The op's arguments: make_case's well-conditioned layer (magnitude = row norms of W0 times
    1 + 0.1·noise, B orthonormal, A = Bᵀ W0), x reshaped to the leading dims, the drawn scaling.
    R is scaled for ``alpha = |s|·r`` when ``matched_R`` (make_case keeps s·B R A a sizeable
    fraction of W0's top-r part), else for alpha = 16."""
    # |s| floored at 0.1 for R's scale: s -> 0 must not blow R up (entries ~ 0.5 / |s|).
    alpha = max(abs(p.scaling), 0.1) * p.rank if p.matched_R else 16.0
    case = make_case(p.tokens, p.in_features, p.out_features, p.rank, p.dtype, device,
                     alpha=alpha, bias=p.bias, seed=p.seed)
    args = case.op_args()
    args["x"] = args["x"].reshape(*p.lead, p.in_features)
    args["scaling"] = p.scaling
    return args


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the given memory layout, differentiably (the gradient reaches x itself)."""
    if layout == "transposed":  # the last two dims swapped in memory
        return x.mT.contiguous().mT
    if layout in ("strided_columns", "strided_rows"):  # odd entries of a twice-as-wide buffer
        dim = -1 if layout == "strided_columns" else 0
        shape = list(x.shape)
        shape[dim] *= 2
        wide = x.new_zeros(shape).slice_scatter(x, dim=dim, start=1, step=2)
        return wide[..., 1::2] if dim == -1 else wide[1::2]
    return x


# When each layout is not contiguous (size-1 dims have no meaningful stride).
NOT_CONTIGUOUS = {
    "contiguous": lambda shape: False,
    "transposed": lambda shape: len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1,
    "strided_columns": lambda shape: math.prod(shape) > 1,
    "strided_rows": lambda shape: shape[0] > 1,
}


def laid_out_op(layout: str):
    def op(x, **kwargs):
        xv = with_layout(x, layout)
        assert torch.equal(xv, x)
        assert xv.is_contiguous() != NOT_CONTIGUOUS[layout](x.shape), (layout, xv.stride())
        return edora_linear(xv, **kwargs)
    return op


def outputs(p: Problem, args, backend=None):
    """(y, dx, dR, dm) and d bias (None without bias) for a gy from the problem's seed;
    ``backend=None`` is the float64 reference."""
    trainable = TRAINABLE + (("bias",) if p.bias else ())
    kwargs = dict(gy_seed=p.seed + 1, trainable=trainable, detach_norm=p.detach_norm)
    if backend is None:
        y, grads = reference_with_grads(args, **kwargs)
    else:
        y, grads = run_with_grads(laid_out_op(p.layout), args, backend=backend, **kwargs)
    return (y, grads["x"], grads["R"], grads["magnitude"]), grads.get("bias")


def well_conditioned(p: Problem, args, expected) -> bool:
    """Whether the table's bound means something for this problem (most drawn layers pass):

    - no row of V = W0 + s·B R A much cancelled: its norm n at least 1/4 of W0's row norm (the
      op takes n from float64 terms c0 + 2s·… + s²·…, whose rounding grows as ‖W0‖²/n²);
    - |b| at most 10x the magnitude m: the op takes dm from Σ gy ⊙ (y − b) with y the stored
      output, and y − b = g ⊙ z is of size ~m, so a much larger bias (make_case draws a tiny W0
      row at in = 1 now and then) loses y − b to y's rounding;
    - fp32 with the exact norm: dR is the direct share (dR with the norm detached) minus the
      norm's share; where they cancel by more than 3x (always when in = 1 or out = r = 1: y does
      not depend on R then, dR = 0), what is left is fp32 rounding of shares of size ~|s|·N,
      beyond the table's absolute floor for |dR| < 1 (the fp32 reference misses it as well).
    """
    weight, A, B, R = (args[k].double() for k in ("weight", "A", "B", "R"))
    n = (weight + args["scaling"] * B @ R @ A).norm(dim=1)
    if not (n >= 0.25 * weight.norm(dim=1)).all():
        return False
    if p.bias and not (args["bias"].abs() <= 10 * args["magnitude"].abs()).all():
        return False
    if p.dtype == torch.float64 or p.detach_norm:
        return True
    (_, _, direct, _), _ = outputs(replace(p, detach_norm=True), args)
    return bool(direct.abs().max() <= 3 * expected[2].abs().max().clamp_min(1.0))


def check_problem(p: Problem, backend: str):
    args = build(p)
    expected, dbias_ref = outputs(p, args)
    assume(well_conditioned(p, args, expected))
    actual, dbias = outputs(p, args, backend)
    label = f"{backend} {p}"
    y = actual[0]
    assert y.shape == (*p.lead, p.out_features) and y.dtype == p.dtype, (label, y.shape, y.dtype)
    for name, a, e in zip(("y", "dx", "dR", "dm"), actual, expected):
        assert a.dtype == p.dtype and a.shape == e.shape, (label, name, a.dtype, a.shape)
    if p.bias:
        assert_close(dbias, dbias_ref, p.dtype, f"{label} dbias")
    return args, actual, expected


# Corner cases run every time, ahead of the drawn ones.
CORNERS = [
    Problem(1, 1, 1, (1,), "contiguous", 0.0, True, False, True, torch.float32, 0),
    Problem(1, 1, 1, (3, 2), "transposed", -8.0, False, True, False, torch.float64, 1),
    Problem(1, 40, 1, (0,), "strided_rows", 8.0, True, True, False, torch.float32, 2),
    Problem(40, 1, 1, (), "strided_columns", -2.5, False, True, True, torch.float64, 3),
    Problem(40, 33, 33, (17,), "transposed", 16.0 / 33, True, True, False, torch.float32, 4),
    Problem(29, 40, 29, (2, 5), "strided_columns", -8.0, False, False, False, torch.float32, 5),
    Problem(7, 5, 5, (1,), "strided_rows", 32.0, False, True, True, torch.float64, 6),
]


# The Triton kernels take x's strides as they are: each layout once, on rows 0, 1 and many.
TRITON_CORNERS = [
    Problem(12, 9, 3, (0,), "transposed", 2.0, True, True, False, torch.float32, 10),
    Problem(5, 12, 5, (1,), "strided_columns", -8.0, False, False, True, torch.float32, 11),
    Problem(11, 7, 1, (13,), "strided_rows", 8.0, False, True, False, torch.float32, 12),
    Problem(9, 12, 9, (3, 4), "transposed", -0.75, True, True, True, torch.float32, 13),
]


def corner_examples(corners):
    def decorate(test):
        for p in reversed(corners):
            test = example(p)(test)
        return test
    return decorate


@profile(300)
@given(problems())
@corner_examples(CORNERS)
def test_torch_backend_matches_reference(problem):
    _, actual, expected = check_problem(problem, "torch")
    for name, a, e in zip(("y", "dx", "dR", "dm"), actual, expected):
        assert_close(a, e, problem.dtype, f"torch {problem} {name}")


@profile(15)
@given(problems(max_features=12, max_tokens=8, max_side=3, dtypes=(torch.float32,),
                lead_kinds=("N", "ab")))
@corner_examples(TRITON_CORNERS)
def test_triton_backend_matches_reference(problem):
    """fp32 only: fp64 takes the torch code path inside the Triton backend."""
    args, actual, expected = check_problem(problem, "triton")
    baseline, _ = outputs(problem, args, "torch")
    check_outputs(actual, expected, problem.dtype, f"triton {problem}", baseline)
