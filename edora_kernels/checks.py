"""Argument checks: a bad input to the ops, the layer, the initialiser, ``apply_edora`` or the
adapter loader fails here, naming the argument. One function per rule."""
from __future__ import annotations

import math
import numbers
import re

import torch

from .backends import CHOICES as BACKEND_NAMES
from .options import DROPOUT_MODES, INITS, SPLITS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SHOWN_NAMES = 12  # names quoted in an error message before "... and N more"


def quote(names: list[str]) -> str:
    """Names for an error message: the first dozen, then how many more."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f", ... and {more} more" if more > 0 else "")


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype}, {t.device})"


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _require_shape(name: str, t: torch.Tensor, shape: tuple, meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got {tuple(t.shape)}")


def check_adapter_args(
    x_name: str,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    magnitude: torch.Tensor,
    scaling,
    in_features: int,
    out_features: int,
) -> None:
    """Checks shared by ``edora_linear`` and ``edora_epilogue``.

    Cast rule: x (and weight, bias) fix the dtype of the output and of the big products; A, B, R
    and magnitude may be any supported floating dtype (e.g. fp32 adapters on a bf16 model) and
    are used in the compute dtype (fp32, or fp64 for fp64 inputs). Gradients come back in each
    parameter's own dtype.
    """
    for name, t in (("A", A), ("B", B), ("R", R), ("magnitude", magnitude)):
        _require_tensor(name, t)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{_describe(x_name, x)}: dtype must be one of {SUPPORTED_DTYPES}")
    if bias is not None:
        _require_tensor("bias", bias)
        _require_shape("bias", bias, (out_features,), "out_features")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match {x_name} dtype {x.dtype}")
    if A.dim() != 2:
        raise ValueError(f"A must be 2-D (rank, in_features), got shape {tuple(A.shape)}")
    rank = A.shape[0]
    check_rank(rank, in_features, out_features, what="A of shape (rank, in_features)")
    _require_shape("A", A, (rank, in_features), "rank, in_features")
    _require_shape("B", B, (out_features, rank), "out_features, rank")
    _require_shape("R", R, (rank, rank), "rank, rank")
    _require_shape("magnitude", magnitude, (out_features,), "out_features")
    for name, t in (("A", A), ("B", B), ("R", R), ("magnitude", magnitude)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_describe(name, t)}: dtype must be one of {SUPPORTED_DTYPES}")
    tensors = {"bias": bias, "A": A, "B": B, "R": R, "magnitude": magnitude}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(
                f"all tensors must be on one device: {x_name} is on {x.device}, "
                f"{name} is on {t.device}"
            )
    if torch.compiler.is_compiling():
        # dynamo turns a Python float that changes between calls into a symbolic one, with no
        # value to test; the eager call before compiling saw a real one
        return
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")


def check_frozen(grad_enabled: bool, **frozen: torch.Tensor) -> None:
    """W0, A and B are frozen by design: backward computes no gradient for them."""
    if not grad_enabled:
        return
    for name, t in frozen.items():
        if t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but EDoRA keeps it frozen and computes no gradient for "
                f"it; call {name}.requires_grad_(False) (or pass {name}.detach())"
            )


def check_linear_args(x, weight, bias, A, B, R, magnitude, scaling, dropout, backend) -> None:
    _require_tensor("x", x)
    _require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError("weight must be 2-D (out_features, in_features), got "
                         f"{tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"last dim of x must equal in_features = weight.shape[1] = {in_features}, "
            f"got x of shape {tuple(x.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} must match x dtype {x.dtype} (as in F.linear); "
            f"cast x or the layer"
        )
    if weight.device != x.device:
        raise ValueError(
            f"all tensors must be on one device: x is on {x.device}, weight is on {weight.device}"
        )
    check_adapter_args("x", x, bias, A, B, R, magnitude, scaling, in_features, out_features)
    check_dropout_backend(dropout, backend)


def check_dropout_backend(dropout, backend) -> None:
    check_dropout(dropout)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def check_norm_terms(terms, weight: torch.Tensor, A: torch.Tensor) -> None:
    """Precomputed norm terms: a (c0, C, G) triple of float64 tensors on W0's device, shaped
    (out,), (out, r), (r, r)."""
    out_features, rank = weight.shape[0], A.shape[0]
    if not isinstance(terms, tuple) or len(terms) != 3:
        raise TypeError(f"norm_terms must be a NormTerms(c0, C, G) triple, got "
                        f"{type(terms).__name__}")
    for name, t, shape in zip(("c0", "C", "G"), terms,
                              ((out_features,), (out_features, rank), (rank, rank))):
        _require_tensor(f"norm_terms.{name}", t)
        if tuple(t.shape) != shape or t.dtype != torch.float64 or t.device != weight.device:
            raise ValueError(f"norm_terms.{name} must be float64 of shape {shape} on "
                             f"{weight.device}, got {_describe(name, t)}")


# --- configuration values: one rule each, called wherever the value is accepted ---

def _check_choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_init(init) -> None:
    """One of INITS: how A and B are computed from W0."""
    _check_choice("init", init, INITS)


def check_split(split) -> None:
    """One of SPLITS: how the singular values are shared between A and B."""
    _check_choice("split", split, SPLITS)


def check_dropout_mode(dropout_mode) -> None:
    """One of DROPOUT_MODES."""
    _check_choice("dropout_mode", dropout_mode, DROPOUT_MODES)


def check_dropout(dropout) -> None:
    """A probability in [0, 1) (NaN fails the comparison)."""
    # SymFloat: dynamo may pass the op's dropout as a symbolic float.
    if not isinstance(dropout, (numbers.Real, torch.SymFloat)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def check_rank(rank, in_features: int | None = None, out_features: int | None = None, *,
               what: str = "", dims: str = "in_features, out_features") -> None:
    """An int >= 1, and <= min(in_features, out_features) when the shape is given (``what``
    names the layer or matrix, ``dims`` the two sizes, in the message)."""
    # SymInt: under torch.compile with dynamic shapes the op's rank is A.shape[0], symbolic.
    if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if in_features is None:
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank}")
        return
    upper = min(in_features, out_features)
    if not 1 <= rank <= upper:
        raise ValueError(f"rank must be in [1, min({dims})] = [1, {upper}]"
                         f"{' for ' + what if what else ''}, got rank = {rank}")


def check_layer_options(options) -> None:
    """Every field of a ``LayerOptions`` accepted, or the first bad one named."""
    check_finite_number("alpha", options.alpha)
    check_dropout_backend(options.dropout, options.backend)
    check_dropout_mode(options.dropout_mode)
    if not isinstance(options.detach_norm, bool):
        raise TypeError(f"detach_norm must be True or False, got {options.detach_norm!r}")
    check_init(options.init)
    check_split(options.split)
    check_finite_number("sigma", options.sigma)


def check_finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_target_modules(targets, name: str = "target_modules"):
    """A regex string (compiled here, so a bad pattern is named) or a non-empty list of module
    names; returns the normalised value (a compiled pattern or a list)."""
    if isinstance(targets, str):
        try:
            return re.compile(targets)
        except re.error as err:
            raise ValueError(f"{name} {targets!r} is not a valid regular expression: "
                             f"{err}") from None
    if isinstance(targets, (list, tuple, set, frozenset)) and targets and all(
            isinstance(t, str) for t in targets):
        return list(targets)
    raise TypeError(f"{name} must be a regex string or a non-empty list of module names, got "
                    f"{targets!r}")


def matches_target(name: str, targets) -> bool:
    """PEFT's rule for ``target_modules``: a pattern must match the whole module name; a list
    matches a name equal to an entry or ending in "." + entry. ``targets`` as returned by
    ``check_target_modules``."""
    if isinstance(targets, re.Pattern):
        return targets.fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def exact_names(names) -> str:
    """A pattern that selects exactly these module names: given as a list, ``matches_target``
    would also select every module whose name ends in "." + one of them."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def check_pattern(name: str, pattern, value_check) -> dict:
    """A ``rank_pattern`` / ``alpha_pattern``: a dict of regex → value, every key compiled and
    every value passed to ``value_check(label, value)``; ``None`` is an empty pattern."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"{name} must be a dict of module-name patterns, got "
                        f"{type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regex: {err}") from None
        value_check(f"{name}[{key!r}]", value)
    return dict(pattern)


def pattern_value(module_names: str | list[str], pattern: dict, default):
    """PEFT's rule for ``rank_pattern`` and ``alpha_pattern``: the value of the first key (in
    order) that matches the end of the module name at a "." boundary, else ``default``; for a
    module registered under several names, of the first key that matches any of them."""
    names = [module_names] if isinstance(module_names, str) else module_names
    for key, value in pattern.items():
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


def check_seed(seed) -> None:
    """``seed``: None or an int torch's generators take (an adapter's R is drawn from seed + 1)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2**63 <= seed <= 2**64 - 2):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64 - 2], got {seed!r}")
