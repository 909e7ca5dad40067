"""Benchmarks behind ``edora-kernels bench``: the op, a model training step and the initialiser.

``results`` (Result, Run, table, saving), ``io`` (the one CSV schema, device names), ``timing``
(round-robin timing, saved bytes, peak memory), ``providers`` (the op's contenders), ``op``,
``model_step``, ``init`` (the benchmarks) and ``plot``.
"""
