"""pytest-benchmark suite for the op: ``pytest bench --benchmark-only``.

Kept out of the tests (``testpaths = ["tests"]``): these measure, they do not judge. Small
shapes, so that the suite runs in a minute on CPU; ``edora-kernels bench`` is the benchmark that
reports ratios (providers interleaved); this suite gives pytest-benchmark's statistics and its
``--benchmark-compare`` history. Groups are one mode on one shape, so each group's table reads
as providers side by side.
"""
import pytest
import torch

from edora_kernels.bench import providers
from edora_kernels.bench.io import default_device
from edora_kernels.bench.providers import BUILDERS, MODES, Unavailable
from edora_kernels.bench.timing import synchronize
from edora_kernels.testing import make_case

DEVICE = default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# (N, in, out, r): a square layer, and a wide one with a larger rank.
SHAPES = [(512, 256, 256, 8), (256, 512, 1024, 16)]
# From the registry, so that a new backend is benchmarked here too. Not "compiled": each of its
# cases would first wait for a torch.compile.
PROVIDERS = [name for name in providers.PROVIDERS if name != "compiled"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_{}x{}_r{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_op(benchmark, provider, mode, shape):
    try:
        runner = BUILDERS[provider](make_case(*shape, DTYPE, DEVICE))
    except Unavailable as why:
        pytest.skip(str(why))

    def step():
        runner.step(mode)
        synchronize(DEVICE)  # time the device's work, not the launch

    benchmark.group = f"{mode} N={shape[0]} {shape[1]}x{shape[2]} r={shape[3]} {DTYPE}"
    benchmark.extra_info.update(provider=provider, device=str(DEVICE))
    benchmark.pedantic(step, setup=runner.reset, rounds=20, warmup_rounds=3)
