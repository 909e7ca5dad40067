"""The Triton backend: fused forward, epilogue-only and backward kernels (see docs/DESIGN.md)."""
from .bwd import backward
from .fwd import epilogue, forward

__all__ = ["backward", "epilogue", "forward"]
