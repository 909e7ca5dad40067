"""The Triton backend: fused forward, epilogue-only and backward kernels (see docs/DESIGN.md)."""
