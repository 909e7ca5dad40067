"""The Triton backend: fused forward, epilogue-only and backward kernels (see docs/DESIGN.md)."""
from .bwd import backward, epilogue_backward
from .epilogue_only import epilogue_forward
from .fwd import forward

__all__ = ["backward", "epilogue_backward", "epilogue_forward", "forward"]
