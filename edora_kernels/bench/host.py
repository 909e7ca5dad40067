"""``edora-kernels bench --host``: the host's share of one layer's step (docs/DESIGN.md §4).

On a GPU, a step whose Python and dispatch take longer than its kernels leaves the device idle.
This measures that share on CPU: each provider's layer runs at a tiny shape, the Triton kernels
(and the CUDA extension's) replaced by no-ops, so what remains is the host's own work — Python,
argument handling, dispatch and allocation — plus, for ATen-only providers (the frozen
``nn.Linear``, PEFT LoRA, EDoRA's torch backend), their tiny CPU kernels. Each provider's
launches per call and host syncs are counted alongside (``bench.launches``).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from ..layer import EDoRALinear
from .launches import count_launches, stub_kernels
from .providers import MODES, OneLinear, Unavailable
from .results import Result, Run, progress_bar
from .timing import round_robin

KERNEL = "host_step"
BASELINE = "frozen"
HOST_PROVIDERS = ("frozen", "peft_lora", "torch", "triton")
# Backends whose kernels are stubbed: their host work alone is measured.
STUBBED = ("triton",)


@dataclass
class HostConfig:
    tokens: int = 16
    in_features: int = 64
    out_features: int = 64
    rank: int = 8
    dtype: torch.dtype = torch.bfloat16
    providers: tuple[str, ...] = HOST_PROVIDERS
    repeats: int = 300
    warmup: int = 30


class _Layer:
    """A provider's layer, its input and upstream gradient, and what gets gradients."""

    def __init__(self, module: nn.Module, cfg: HostConfig):
        gen = torch.Generator().manual_seed(0)
        self.module = module
        self.x = torch.randn(cfg.tokens, cfg.in_features, generator=gen).to(cfg.dtype)
        self.x.requires_grad_()
        self.gy = torch.randn(cfg.tokens, cfg.out_features, generator=gen).to(cfg.dtype)
        self.trainable = [p for p in module.parameters() if p.requires_grad]

    def reset(self) -> None:
        for t in (self.x, *self.trainable):
            t.grad = None

    def step(self, mode: str) -> None:
        if mode == "fwd":
            with torch.no_grad():
                self.module(self.x)
        else:
            self.module(self.x).backward(self.gy)


def _base(cfg: HostConfig) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(cfg.in_features, cfg.out_features)


def _build(name: str, cfg: HostConfig) -> nn.Module:
    if name == "frozen":
        return _base(cfg).requires_grad_(False).to(cfg.dtype)
    if name == "peft_lora":
        if importlib.util.find_spec("peft") is None:
            raise Unavailable("peft is not installed (pip install peft)")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=cfg.rank, lora_alpha=16, target_modules=["linear"])
        return get_peft_model(OneLinear(_base(cfg)), config).base_model.model.linear.to(
            cfg.dtype)
    return EDoRALinear.from_linear(_base(cfg), cfg.rank, backend=name, seed=0).to(cfg.dtype)


def run_host_bench(cfg: HostConfig, run: Run) -> None:
    """Time every provider's step in turns, both modes, and count its launches."""
    run.notes.append(
        f"host time: {', '.join(p for p in cfg.providers if p in STUBBED) or 'no backend'} with "
        "every kernel launch replaced by a no-op (the host's own work); the frozen nn.Linear, "
        "PEFT LoRA and the torch backend run their tiny CPU kernels")
    run.notes.append("launches = kernels one call would launch on a GPU; syncs = ops that make "
                     "the host wait for the device (docs/DESIGN.md §4)")
    label = f"{cfg.tokens}x{cfg.in_features}x{cfg.out_features} r{cfg.rank}"
    shape = f"N={cfg.tokens};in={cfg.in_features};out={cfg.out_features};r={cfg.rank}"
    dtype = str(cfg.dtype).removeprefix("torch.")
    providers = [BASELINE] + [p for p in cfg.providers if p != BASELINE]
    with stub_kernels(record=False), _tf32_allowed():
        layers = {}
        for name in providers:
            try:
                layers[name] = _Layer(_build(name, cfg), cfg)
            except Unavailable as why:
                run.notes.append(f"skipped {name}: {why}")
        bar = progress_bar(len(MODES) * len(layers) * (cfg.repeats + cfg.warmup), "host")
        with bar:
            for mode in MODES:
                samples = round_robin(
                    {name: (layer.reset, lambda layer=layer: layer.step(mode))
                     for name, layer in layers.items()},
                    torch.device("cpu"), cfg.repeats, cfg.warmup, bar.update)
                results = []
                for name, layer in layers.items():
                    layer.reset()
                    with stub_kernels(record=True):
                        log = count_launches(lambda layer=layer: layer.step(mode))
                    results.append(Result(
                        kernel=KERNEL, provider=name, mode=mode, x=label, shape=shape,
                        dtype=dtype, seconds=samples[name], baseline=BASELINE,
                        ratios=[t / b for t, b in zip(samples[name], samples[BASELINE])],
                        launches=log.count, host_syncs=len(log.syncs)))
                run.add(*results)


@contextlib.contextmanager
def _tf32_allowed():
    """fp32 runs in the Triton kernels only where torch allows TF32: allow it here, so an fp32
    host benchmark measures the kernels' path, not the torch fallback's."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous
