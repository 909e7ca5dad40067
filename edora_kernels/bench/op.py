"""The op benchmark: every provider on each (tokens, in×out, rank) case, both modes, timed in
turns, plus bytes kept for backward, peak device memory and the error against float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import NAMES
from ..testing import Case, make_case
from ..tolerances import normalised_error
from .providers import BUILDERS, MODES, Runner, Unavailable, oracle_name
from .results import FLOP_NOTE, GEMMS_PER_MODE, Result, Run, progress_bar
from .timing import peak_bytes, round_robin, saved_bytes

KERNEL = "edora_linear"
BASELINE = "frozen"
DEFAULT_PROVIDERS = ("frozen", "reference", "peft_lora", "peft_dora", *NAMES)


@dataclass
class OpConfig:
    tokens: list[int]
    shapes: list[tuple[int, int]]   # (in, out)
    ranks: list[int]
    dtype: torch.dtype
    providers: list[str]
    modes: list[str]
    repeats: int
    warmup: int
    device: torch.device
    alpha: float = 16.0


def default_config(device: torch.device) -> OpConfig:
    """Sized to the device. CPU: the reference measurement (fp32, N=2048, 1024×1024, r=16) plus a
    narrow-and-tall shape, under 2 minutes on 2 cores. GPU: LLaMA-7B and 13B layer shapes in
    bf16 at N=8192 (attention projection, MLP up, MLP down)."""
    if device.type == "cuda":
        return OpConfig(
            tokens=[8192],
            shapes=[(4096, 4096), (4096, 11008), (11008, 4096),
                    (5120, 5120), (5120, 13824), (13824, 5120)],
            ranks=[16], dtype=torch.bfloat16, providers=list(DEFAULT_PROVIDERS),
            modes=list(MODES), repeats=30, warmup=5, device=device)
    return OpConfig(tokens=[2048], shapes=[(1024, 1024), (512, 2048)], ranks=[16],
                    dtype=torch.float32, providers=list(DEFAULT_PROVIDERS), modes=list(MODES),
                    repeats=25, warmup=3, device=device)


def _max_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(normalised_error(a, e) for a, e in zip(actual, expected))


def _measure_case(cfg: OpConfig, case: Case, runners: dict[str, Runner], bar) -> list[Result]:
    tokens, in_f, out_f, rank = case.dims
    label = f"{tokens}x{in_f}x{out_f} r{rank}"
    shape = f"N={tokens};in={in_f};out={out_f};r={rank}"
    # The oracle gets this case's (rounded) inputs: the error is the computation's own.
    case64 = case.to(torch.float64)
    results = []
    for mode in cfg.modes:
        samples = round_robin(
            {name: (r.reset, lambda r=r: r.step(mode)) for name, r in runners.items()},
            cfg.device, cfg.repeats, cfg.warmup, bar.update)
        expected: dict[str, list[torch.Tensor]] = {}
        for name, runner in runners.items():
            oracle = oracle_name(name)
            if oracle not in expected:
                expected[oracle] = BUILDERS[oracle](case64).outputs(mode)
            training = mode == "fwd+bwd"
            runner.reset()
            results.append(Result(
                kernel=KERNEL, provider=name, mode=mode, x=label, shape=shape,
                dtype=str(cfg.dtype).removeprefix("torch."), seconds=samples[name],
                ratios=[t / b for t, b in zip(samples[name], samples[BASELINE])],
                baseline=BASELINE, flops=2.0 * tokens * in_f * out_f * GEMMS_PER_MODE[mode],
                saved_bytes=(saved_bytes(lambda: runner.fn(runner.x), runner.state)
                             if training else None),
                peak_bytes=peak_bytes(lambda: runner.step(mode), cfg.device),
                max_error=_max_error(runner.outputs(mode), expected[oracle]),
            ))
    return results


def run_op_bench(cfg: OpConfig, settings: dict) -> Run:
    run = Run(settings=settings)
    providers = [BASELINE] + [p for p in cfg.providers if p != BASELINE]
    if BASELINE not in cfg.providers:
        run.notes.append(f"added provider {BASELINE!r}: every ratio is taken against it")
    cases = [(n, i, o, r) for n in cfg.tokens for (i, o) in cfg.shapes for r in cfg.ranks]
    skipped: dict[str, str] = {}
    bar = progress_bar(len(cases) * len(cfg.modes) * (cfg.repeats + cfg.warmup) * len(providers),
                       "bench")
    with bar:
        for tokens, in_f, out_f, rank in cases:
            case = make_case(tokens, in_f, out_f, rank, cfg.dtype, cfg.device, alpha=cfg.alpha)
            runners = {}
            for name in providers:
                try:
                    runners[name] = BUILDERS[name](case)
                except Unavailable as why:
                    skipped[name] = str(why)
                    bar.total -= len(cfg.modes) * (cfg.repeats + cfg.warmup)
            run.results += _measure_case(cfg, case, runners, bar)
    run.notes += [f"skipped {name}: {why}" for name, why in skipped.items()]
    run.notes.append("fwd = inference forward (no_grad); fwd+bwd = x requires grad, R and "
                     "magnitude (PEFT: lora_A, lora_B, magnitude) trainable, backward of a "
                     "fixed gy")
    run.notes.append("saved MiB = distinct storages autograd keeps for backward, weights and "
                     "adapter parameters excluded; max err = max normalised error of y, dx and "
                     "parameter grads against float64 (EDoRA providers: the naive reference)")
    run.notes.append("ratio = per-round time / frozen's time in the same round (providers run "
                     "in turns), p50 [p20-p80]")
    run.notes.append(FLOP_NOTE)
    return run
