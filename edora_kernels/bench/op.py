"""The op benchmark: every provider on each (tokens, in×out, rank) case, both modes, timed in
turns, plus bytes kept for backward, peak device memory and the error against float64."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import NAMES
from ..testing import Case, make_case
from ..tolerances import normalised_error
from .providers import BUILDERS, MODES, Runner, Unavailable, oracle_name
from .results import (
    FLOP_NOTE,
    GEMMS_PER_MODE,
    MIB,
    BenchError,
    Result,
    Run,
    describe,
    progress_bar,
)
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
    dropout: float = 0.0


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


def _label(case: Case, dropout: float = 0.0) -> str:
    """The case as tables and plots name it (dropout runs are other cases)."""
    tokens, in_f, out_f, rank = case.dims
    return f"{tokens}x{in_f}x{out_f} r{rank}" + (f" p{dropout:g}" if dropout else "")


def _kept_output_note(cfg: OpConfig, cases: list[tuple[int, int, int, int]]) -> str:
    """What EDoRA's saved MiB holds against PEFT LoRA's, with the sizes of this run's cases."""
    mib = cfg.dtype.itemsize / MIB
    sizes = ", ".join(dict.fromkeys(  # once per layer shape, whatever the ranks
        f"y {n * o * mib:.3g} vs x {n * i * mib:.3g} MiB at {n}x{i}x{o}" for n, i, o, _ in cases))
    return ("saved MiB: the EDoRA backends keep their output y (N x out) for backward where PEFT "
            f"LoRA keeps its input x (N x in): {sizes}; y costs nothing when the next op keeps "
            "it anyway (a following linear, activation or residual that saves its input), "
            "N x out when it does not")


def _check_baseline(failures: dict[str, Exception], where: str) -> None:
    # Every ratio is taken against the baseline: without it the case has nothing to report.
    if BASELINE in failures:
        raise BenchError(f"the baseline provider {BASELINE!r} failed on {where}: "
                         f"{describe(failures[BASELINE])}")


def _measure(cfg: OpConfig, case: Case, case64: Case, mode: str, providers: list[str],
             runners: dict[str, Runner], build_failures: dict[str, Exception],
             bar) -> list[Result]:
    """One result per provider in ``mode``: measured, or the error that stopped it (at build,
    in a timed step or in the measurements after)."""
    tokens, in_f, out_f, rank = case.dims
    label = _label(case, cfg.dropout)
    dropout = f";dropout={cfg.dropout:g}" if cfg.dropout else ""
    common = dict(kernel=KERNEL, mode=mode, x=label, shape=f"N={tokens};in={in_f};out={out_f};"
                  f"r={rank}{dropout}", dtype=str(cfg.dtype).removeprefix("torch."),
                  baseline=BASELINE)
    failures = dict(build_failures)
    samples = round_robin(
        {name: (r.reset, lambda r=r: r.step(mode)) for name, r in runners.items()},
        cfg.device, cfg.repeats, cfg.warmup, bar.update, failures)
    _check_baseline(failures, f"{label} {mode}")
    expected: dict[str, list[torch.Tensor]] = {}
    results = []
    for name in providers:
        if name in failures:
            results.append(Result(**common, provider=name, seconds=[], ratios=[],
                                  error=describe(failures[name])))
            continue
        if name not in runners:  # unavailable here
            continue
        runner, oracle = runners[name], oracle_name(name)
        try:
            # Under dropout every provider draws its own mask: no oracle to compare with (the
            # tests check the dropout formulas against the reference with the same mask).
            if oracle not in expected and not cfg.dropout:
                expected[oracle] = BUILDERS[oracle](case64).outputs(mode)
            runner.reset()
            results.append(Result(
                **common, provider=name, seconds=samples[name],
                ratios=[t / b for t, b in zip(samples[name], samples[BASELINE])],
                flops=2.0 * tokens * in_f * out_f * GEMMS_PER_MODE[mode],
                saved_bytes=(saved_bytes(lambda: runner.fn(runner.x), runner.state)
                             if mode == "fwd+bwd" else None),
                peak_bytes=peak_bytes(lambda: runner.step(mode), cfg.device),
                max_error=(None if cfg.dropout else
                           _max_error(runner.outputs(mode), expected[oracle])),
            ))
        except Exception as err:
            failures[name] = err
            _check_baseline(failures, f"{label} {mode}")
            results.append(Result(**common, provider=name, seconds=[], ratios=[],
                                  error=describe(err)))
    return results


def run_op_bench(cfg: OpConfig, run: Run) -> None:
    """Measure every case into ``run``, adding each mode's results as soon as they are done."""
    providers = [BASELINE] + [p for p in cfg.providers if p != BASELINE]
    if BASELINE not in cfg.providers:
        run.notes.append(f"added provider {BASELINE!r}: every ratio is taken against it")
    run.notes.append("fwd = inference forward (no_grad); fwd+bwd = x requires grad, R and "
                     "magnitude (PEFT: lora_A, lora_B, magnitude) trainable, backward of a "
                     "fixed gy")
    run.notes.append("saved MiB = distinct storages autograd keeps for backward, weights and "
                     "adapter parameters excluded; max err = max normalised error of y, dx and "
                     "parameter grads against float64 (EDoRA providers: the naive reference)")
    run.notes.append("ratio = per-round time / frozen's time in the same round (providers run "
                     "in turns), p50 [p20-p80]")
    run.notes.append(FLOP_NOTE)
    if cfg.dropout:
        run.notes.append(f"dropout p={cfg.dropout} on every adapter (PEFT: lora_dropout; "
                         "EDoRA: PEFT's semantics, 'lowrank': the rank branch only); no max err: "
                         "each provider draws its own mask")
    cases = [(n, i, o, r) for n in cfg.tokens for (i, o) in cfg.shapes for r in cfg.ranks]
    if "fwd+bwd" in cfg.modes:
        run.notes.append(_kept_output_note(cfg, cases))
    skipped: set[str] = set()
    bar = progress_bar(len(cases) * len(cfg.modes) * (cfg.repeats + cfg.warmup) * len(providers),
                       "bench")
    with bar:
        for tokens, in_f, out_f, rank in cases:
            case = make_case(tokens, in_f, out_f, rank, cfg.dtype, cfg.device, alpha=cfg.alpha)
            runners, failures = {}, {}
            for name in providers:
                try:
                    runners[name] = BUILDERS[name](case, dropout=cfg.dropout)
                except Unavailable as why:
                    if name not in skipped:
                        skipped.add(name)
                        run.notes.append(f"skipped {name}: {why}")
                except Exception as err:  # e.g. torch.compile: reported, the others go on
                    failures[name] = err
                if name not in runners:
                    bar.total -= len(cfg.modes) * (cfg.repeats + cfg.warmup)
            _check_baseline(failures, _label(case, cfg.dropout))
            # The oracle gets this case's (rounded) inputs: the error is the computation's own.
            case64 = case.to(torch.float64)
            for mode in cfg.modes:
                run.add(*_measure(cfg, case, case64, mode, providers, runners, failures, bar))
