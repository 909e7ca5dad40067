"""The options of an EDoRA layer, with their vocabularies and defaults: one place, used by the
layer, ``apply_edora``, the adapter files, ``EDoRAConfig`` and the ``LoraConfig`` converter.

A leaf module: it imports nothing of the package at import time (the checks run on
construction).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

INITS = ("rsvd", "svd", "random")          # how A and B are computed from W0
SPLITS = ("u", "sqrt")                     # how the singular values are shared between A and B
DROPOUT_MODES = ("peft", "lowrank")        # docs/DESIGN.md §1


@dataclass(frozen=True)
class LayerOptions:
    """How one EDoRA layer computes and is initialised (the rank is its factors' own).

    ``alpha``: the scaling is alpha / r (16, the paper's GLUE setting). ``dropout`` on the
    adapter's input with ``dropout_mode`` "peft" (PEFT's and the paper's semantics) or
    "lowrank" (the rank-r branch only). ``detach_norm``: the row norm is a constant in backward
    (DoRA §4.3). ``backend``: "auto", "torch", "triton" or "cuda". Initialisation: ``init``
    ("rsvd" batched randomised SVD, "svd" exact, "random" the paper's ablation), ``split`` ("u":
    B = U_r, A = U_rᵀ W0; "sqrt"), ``sigma`` (std of R's Gaussian start; 0 gives zeros).
    """

    alpha: float = 16.0
    dropout: float = 0.0
    dropout_mode: str = "peft"
    detach_norm: bool = True
    backend: str = "auto"
    init: str = "rsvd"
    split: str = "u"
    sigma: float = 1e-5

    # What an adapter file records of a layer, beside its tensors and shapes.
    SAVED = ("alpha", "dropout", "dropout_mode", "detach_norm")

    def __post_init__(self) -> None:
        from .checks import check_layer_options  # the checks import this module's vocabularies

        check_layer_options(self)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "sigma", float(self.sigma))

    def replace(self, **changes) -> "LayerOptions":
        return dataclasses.replace(self, **changes)

    def saved(self) -> dict:
        """The fields an adapter file records."""
        return {name: getattr(self, name) for name in self.SAVED}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, where: str, **kwargs) -> "LayerOptions":
        """Options from keyword arguments, an unknown name refused naming ``where``."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{where}: unexpected keyword arguments {unknown}; the layer options "
                            f"are {list(cls.names())}")
        return cls(**kwargs)
