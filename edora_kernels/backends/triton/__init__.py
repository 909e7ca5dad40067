"""The Triton backend: fused forward, epilogue-only and backward kernels (see docs/DESIGN.md)."""
from .bwd import backward
from .epilogue_only import epilogue
from .fwd import forward

__all__ = ["backward", "epilogue", "forward"]
