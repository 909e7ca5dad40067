"""``edora-kernels`` command line.

    info    versions, device, which backends can run
    bench   the op benchmark (or, with --model, a whole-model training step; with --init, the
            initialiser's randomised SVD) on this device
    plot    PNG charts of one benchmark run
    check   every available backend against the reference; non-zero exit on a mismatch
    plan    the cost model of a layer's step on a named GPU: every launch, predicted ratios
    ranks   a rank per layer from a model directory's weights (captured energy vs rank)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, backend_info
from .backends import ENV_VAR, NAMES
from .bench.io import check_csv, csv_path, default_device, device_name, write_atomically
from .bench.results import BenchError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}


def cmd_info(_args: argparse.Namespace) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"edora_kernels {__version__}")
    print(f"python        {sys.version.split()[0]}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton        {triton_version}")
    print(f"device        {device_name()}")
    print("backends:")
    for name, state in backend_info().items():
        mark = "yes" if state["available"] else "no "
        print(f"  {name:<7} {mark}  {state['reason']}")
    try:
        auto = _auto_backend()
    except (ValueError, RuntimeError) as err:
        print(f"edora-kernels info: error: {err}", file=sys.stderr)
        return 1
    print(f"auto          {auto} on {default_device()}"
          + (f" ({ENV_VAR}={os.environ[ENV_VAR]})" if ENV_VAR in os.environ else ""))
    return 0


def _auto_backend() -> str:
    """What backend='auto' runs on this device, ``EDORA_BACKEND`` applied: every layer's forward
    raises what this raises."""
    from .backends import resolve

    return resolve("auto", default_device())


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the argument, exit status 2: a usage block would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- argument types: each names the flag's expected form in its error ----------------------------
# The item parsers raise ValueError; _one and _csv_list turn it into "expected ..., got '...'".

def _one(item, what: str):
    def parse(text: str):
        try:
            return item(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return parse


def _csv_list(item, what: str):
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        # A repeated entry would be measured twice under one name.
        return list(dict.fromkeys(_one(item, what)(part) for part in parts))
    return parse


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value
    return parse


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(text)
    return value


def _shape(text: str) -> tuple[int, int]:
    in_f, out_f = text.lower().split("x")
    return _int_at_least(1)(in_f), _int_at_least(1)(out_f)


def _choice(choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text
    return parse


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(text) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(text)
    return device


def _dtype(text: str) -> torch.dtype:
    return DTYPES[_choice(DTYPES)(text)]


INIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Flags that --init, --model and --host would ignore; --model and --host take --providers from
# their own lists.
NOT_FOR = {"--init": ("tokens", "shapes", "providers", "modes", "compile", "dropout"),
           "--model": ("tokens", "shapes", "modes", "compile", "dropout"),
           "--host": ("modes", "compile", "dropout"),
           "--adapters": ("shapes", "compile", "dropout")}


def _init_case(args: argparse.Namespace) -> str:
    return "llama7b" if args.init_llama7b else "orth" if args.init_orth else "roberta"


def _check_bench(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``args.error`` exits with one line."""
    init_flags = {"init_llama7b": "--init-llama7b", "init_orth": "--init-orth",
                  "init_device": "--init-device", "init_shrink": "--init-shrink"}
    if not args.init:
        for key, flag in init_flags.items():
            if getattr(args, key) not in (None, False):
                args.error(f"{flag} applies to --init only")
    # Rejected rather than ignored: a flag that silently does nothing misleads the reader.
    what = ("--init" if args.init else "--model" if args.model is not None
            else "--host" if args.host else "--adapters" if args.adapters else None)
    for key in NOT_FOR.get(what, ()):
        if getattr(args, key) not in (None, False):
            args.error(f"--{key} does not apply to {what}")
    if what in ("--model", "--host", "--adapters") and args.providers is not None:
        from .bench.adapters import ADAPTER_PROVIDERS
        from .bench.host import HOST_PROVIDERS
        from .bench.model_step import MODEL_PROVIDERS

        allowed = {"--model": MODEL_PROVIDERS, "--host": HOST_PROVIDERS,
                   "--adapters": ADAPTER_PROVIDERS}[what]
        other = [p for p in args.providers if p not in allowed]
        if other:
            args.error(f"argument --providers: with {what}, expected providers from "
                       f"{', '.join(allowed)}, got {other[0]!r}")
    if args.host:
        for flag, values in (("--tokens", args.tokens), ("--shapes", args.shapes),
                             ("--ranks", args.ranks)):
            if values is not None and len(values) > 1:
                args.error(f"argument {flag}: --host measures one case, got {len(values)}")
        if args.ranks:
            from .bench.host import HostConfig

            default = HostConfig()
            in_f, out_f = (args.shapes[0] if args.shapes
                           else (default.in_features, default.out_features))
            _check_rank(args, args.ranks[0], min(in_f, out_f), f"the --host case {in_f}x{out_f}")
    if not args.init:
        return
    case = _init_case(args)
    if args.dtype is not None and (case != "llama7b" or args.dtype not in INIT_DTYPES):
        args.error("--dtype with --init: --init-llama7b only, and fp32, bf16 or fp16")
    if args.init_shrink is not None and case != "llama7b":
        args.error("--init-shrink applies to --init-llama7b only")
    from .bench.init import LLAMA_BLOCK, ROBERTA_BASE, default_init_device

    sizes = (LLAMA_BLOCK.values() if case == "llama7b"
             else [shape for shape, _ in ROBERTA_BASE.values()])
    smallest = min(min(shape) for shape in sizes)
    shrink = args.init_shrink or 1
    if smallest // shrink < 1:
        args.error(f"argument --init-shrink: {shrink} leaves nothing of the {smallest}-wide "
                   f"matrices (at most {smallest})")
    if args.ranks is not None:
        _check_rank(args, args.ranks[0], smallest // shrink,
                    f"the --init case's {smallest // shrink}-wide matrices")
    args.init_device = args.init_device or default_init_device(case)
    if args.init_device.type == "cuda" and not torch.cuda.is_available():
        args.error("CUDA is not available here; pass --init-device cpu")


def _check_rank(args: argparse.Namespace, rank: int, upper: int, of: str) -> None:
    if rank > upper:
        args.error(f"argument --ranks: rank {rank} exceeds min(in, out) = {upper} of {of}")


def _writable_dir(args: argparse.Namespace, flag: str, path: Path) -> None:
    """Create ``path`` if missing and make sure files can be written in it: checked before any
    work, so that no measurement is lost to a bad path at the end."""
    if path.exists() and not path.is_dir():
        args.error(f"argument {flag}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        args.error(f"argument {flag}: cannot create {path}: {err.strerror}")
    if not os.access(path, os.W_OK | os.X_OK):
        args.error(f"argument {flag}: cannot write to {path}")


def _check_out(args: argparse.Namespace, device: torch.device | None = None) -> None:
    out = Path(args.out)
    _writable_dir(args, "--out", out)
    try:
        check_csv(csv_path(out, device))  # rows can be appended to it
    except (OSError, ValueError) as err:
        args.error(f"argument --out: {err}")


def _bench_init(args: argparse.Namespace, settings: dict) -> None:
    from .bench.init import run_init_bench

    options = {"device": args.init_device, "rank": args.ranks[0] if args.ranks else None,
               "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
               "shrink": args.init_shrink}
    # Unset flags keep run_init_bench's defaults, which are the benchmark's published settings.
    run_init_bench(_init_case(args), args.out, settings=settings,
                   **{k: v for k, v in options.items() if v is not None})


def _model_config(args: argparse.Namespace, device: torch.device):
    from .bench.model_step import default_model_config

    cfg = default_model_config(device, args.model)
    for key in ("dtype", "repeats", "warmup", "providers"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.ranks is not None:
        cfg.rank = args.ranks[0]
    # The smallest linears of a block (q, k, v, o) are hidden x hidden.
    _check_rank(args, cfg.rank, cfg.hidden, f"the {cfg.preset} model's {cfg.hidden}x{cfg.hidden} "
                "linears")
    return cfg


def _host_config(args: argparse.Namespace):
    from dataclasses import replace

    from .bench.host import HostConfig

    cfg = HostConfig()
    changes = {"tokens": args.tokens and args.tokens[0], "rank": args.ranks and args.ranks[0],
               "in_features": args.shapes and args.shapes[0][0],
               "out_features": args.shapes and args.shapes[0][1], "dtype": args.dtype,
               "providers": args.providers and tuple(args.providers), "repeats": args.repeats,
               "warmup": args.warmup}
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def _adapters_config(args: argparse.Namespace, device: torch.device):
    from .bench.adapters import default_adapters_config

    cfg = default_adapters_config(device)
    cfg.counts = args.adapters
    if args.tokens is not None:
        if len(args.tokens) > 1:
            args.error("argument --tokens: --adapters takes one token count per row")
        cfg.seq = args.tokens[0]
    for key in ("dtype", "repeats", "warmup", "providers", "modes"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.ranks is not None:
        cfg.rank = args.ranks[0]
    _check_rank(args, cfg.rank, cfg.hidden, f"the {cfg.preset} model's {cfg.hidden}x"
                f"{cfg.hidden} linears")
    return cfg


def _op_config(args: argparse.Namespace, device: torch.device):
    from .bench.op import default_config

    cfg = default_config(device)
    for key in ("tokens", "shapes", "ranks", "dtype", "providers", "modes", "repeats", "warmup"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.compile and "compiled" not in cfg.providers:
        cfg.providers = [*cfg.providers, "compiled"]
    if args.dropout:
        cfg.dropout = args.dropout
        if args.providers is None:  # the other dropout semantics, side by side
            cfg.providers = [*cfg.providers, "lowrank"]
    for rank in cfg.ranks:
        for in_f, out_f in cfg.shapes:
            _check_rank(args, rank, min(in_f, out_f), f"--shapes {in_f}x{out_f}")
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.results import Run, report

    if args.threads is not None:
        # Before anything runs: the thread count is part of the CPU's name in the results.
        torch.set_num_threads(args.threads)
    settings = {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v)
                for k, v in vars(args).items() if k not in ("func", "error")}
    settings["omp_wait_policy"] = os.environ.get(OMP_POLICY)  # None: unset
    if args.init:
        _check_out(args, args.init_device)
        _bench_init(args, settings)
        return 0
    if args.model is not None:
        from .bench.model_step import run_model_bench

        cfg, bench = _model_config(args, default_device()), run_model_bench
    elif args.host:
        from .bench.host import run_host_bench

        cfg, bench = _host_config(args), run_host_bench
    elif args.adapters:
        from .bench.adapters import run_adapters_bench

        cfg, bench = _adapters_config(args, default_device()), run_adapters_bench
    else:
        from .bench.op import run_op_bench

        cfg, bench = _op_config(args, default_device()), run_op_bench
    _check_out(args)
    run = Run(settings=settings, out_dir=Path(args.out))
    if OMP_POLICY_SET_BY_BENCH in os.environ:
        run.notes.append(OMP_NOTE)
    try:
        bench(cfg, run)
    finally:
        # Also after a failure or an interrupt: the table and the JSON of what was measured.
        report(run)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .bench.plot import plot_rows, ratio_rows

    out = Path(args.out) if args.out is not None else Path(args.results).with_suffix(".png")
    if out.suffix.lower() != ".png":
        args.error(f"argument --out: expected a .png path, got {args.out!r}")
    if out.is_dir():
        args.error(f"argument --out: {out} is a directory, expected a .png path")
    try:
        rows = ratio_rows(args.results, args.run)
    except OSError as err:
        args.error(f"argument results: cannot read {args.results}: {err.strerror}")
    except ValueError as err:
        args.error(f"argument results: {err}")
    _writable_dir(args, "--out", out.parent)
    kernels = ", ".join(dict.fromkeys(r["kernel"] for r in rows))
    print(f"wrote {plot_rows(rows, out)}: run {rows[0]['timestamp']} ({kernels}) of "
          f"{args.results}")
    return 0


# plan: unset flags take these, after _check_plan has refused those that do not apply.
PLAN_DEFAULTS = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "ranks": [16, 64],
                 "tokens": [8192], "backend": "triton"}
PLAN_NOT_FOR = {"--init-llama7b": ("shapes", "tokens", "backend", "exact_norm"),
                "--adapters": ("exact_norm",)}


def _check_plan(args: argparse.Namespace) -> None:
    """Flags that the chosen plan would ignore, and a --json path that cannot be written:
    refused before any work."""
    what = "--init-llama7b" if args.init_llama7b else "--adapters" if args.adapters else None
    for key in PLAN_NOT_FOR.get(what, ()):
        if getattr(args, key) not in (None, False):
            args.error(f"--{key.replace('_', '-')} does not apply to {what}")
    for key, value in PLAN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.json is not None:
        path = Path(args.json)
        if path.is_dir():
            args.error(f"argument --json: {path} is a directory, expected a file path")
        _writable_dir(args, "--json", path.parent)


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_init_plan, format_plan, plan_init, plan_step

    _check_plan(args)
    if args.init_llama7b:
        from .bench.init import LLAMA_BLOCK, LLAMA_BLOCKS

        shapes: dict[tuple[int, int], int] = {}
        for shape in LLAMA_BLOCK.values():
            shapes[shape] = shapes.get(shape, 0) + LLAMA_BLOCKS
        smallest = min(min(shape) for shape in shapes)
        _check_rank(args, args.ranks[0], smallest, "the LLaMA-7B matrices")
        plan = plan_init(shapes, args.ranks[0], args.dtype, args.device)
        print(format_init_plan(plan))
        if args.json:
            _write_plan_json(args, {"device": plan.device, "dtype": plan.dtype,
                                    "rank": plan.rank, "matrices": plan.matrices,
                                    "seconds": plan.seconds,
                                    "chunks": [vars(chunk) for chunk in plan.chunks]})
        return 0
    for rank in args.ranks:
        for in_f, out_f in args.shapes:
            _check_rank(args, rank, min(in_f, out_f), f"--shapes {in_f}x{out_f}")
    if args.adapters:
        return _plan_adapters(args)
    plans = [plan_step(args.backend, tokens, in_f, out_f, rank, args.dtype, args.device,
                       args.exact_norm)
             for tokens in args.tokens for in_f, out_f in args.shapes for rank in args.ranks]
    return _report_plans(
        args, plans, format_plan,
        f"{'N':>6} {'in x out':>12} {'r':>4} {'launches':>8} {'forward':>8} {'fwd+bwd':>8}",
        lambda p: f"{len(p.launches):>8} {p.forward_ratio:>8.3f} {p.step_ratio:>8.3f}",
        lambda p: {"backend": p.backend, "exact_norm": p.exact_norm,
                   "forward_ratio": p.forward_ratio, "step_ratio": p.step_ratio})


def _write_plan_json(args: argparse.Namespace, payload) -> None:
    import json

    write_atomically(args.json, (json.dumps(payload, indent=1) + "\n").encode())
    print(f"wrote {args.json}")


def _plan_adapters(args: argparse.Namespace) -> int:
    """``plan --adapters``: a mixed batch served and trained against one adapter, per shape,
    rank and K."""
    from .plan import format_mixed_plan, plan_mixed

    if args.backend != "triton":
        args.error("argument --adapters: mixed batches run on the triton backend")
    plans = [plan_mixed(tokens, in_f, out_f, rank, count, dtype=args.dtype, device=args.device,
                        training=training)
             for tokens in args.tokens for in_f, out_f in args.shapes for rank in args.ranks
             for count in args.adapters for training in (False, True)]
    return _report_plans(
        args, plans, format_mixed_plan,
        f"{'N':>6} {'in x out':>12} {'r':>4} {'K':>4} {'mode':>8} {'launches':>8} "
        f"{'vs one adapter':>14}",
        lambda p: f"{p.adapters:>4} {'train' if p.training else 'serve':>8} "
                  f"{len(p.launches):>8} {p.ratio:>14.3f}",
        lambda p: {"rows": p.rows, "adapters": p.adapters, "training": p.training,
                   "ratio_to_one_adapter": p.ratio})


def _report_plans(args, plans, format_one, header: str, columns, record) -> int:
    """Each plan's table, then one line per plan (its shape and ``columns(plan)``) under
    ``header``; with ``--json``, each plan's shape, ``record(plan)`` and launches."""
    for plan in plans:
        print(format_one(plan) + "\n")
    print(header)
    for p in plans:
        print(f"{p.tokens:>6} {f'{p.in_features}x{p.out_features}':>12} {p.rank:>4} "
              + columns(p))
    if args.json:
        _write_plan_json(args, [{"device": p.device, "dtype": p.dtype, "tokens": p.tokens,
                                 "in": p.in_features, "out": p.out_features, "rank": p.rank,
                                 **record(p), "launches": [vars(launch) for launch in p.launches]}
                                for p in plans])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .selfcheck import format_report, run_checks

    try:
        _auto_backend()  # a bad EDORA_BACKEND fails every layer though each backend passes
        results = run_checks(default_device(), args.backends)
    except (ValueError, RuntimeError) as err:  # a backend that is unknown or cannot run
        print(f"edora-kernels check: error: {err}", file=sys.stderr)
        return 2
    print(format_report(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


def cmd_ranks(args: argparse.Namespace) -> int:
    from .ranks import suggest_ranks, weight_energy

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        args.error(f"argument model_dir: {model_dir} is not a directory")
    _writable_dir(args, "--out", Path(args.out))
    try:
        curves = weight_energy(model_dir, args.target_modules,
                               exclude_modules=args.exclude_modules, max_rank=args.max_rank)
        advice = suggest_ranks(curves, energy=args.energy, budget=args.budget,
                               measure="weight energy", target_modules=args.target_modules)
    except (ValueError, TypeError) as err:
        print(f"edora-kernels ranks: error: {err}", file=sys.stderr)
        return 1
    print(advice.table())
    stem = Path(args.out) / f"ranks_{model_dir.resolve().name}"
    config, curves = advice.save_json(stem.with_suffix(".json"))
    print(f"wrote {config} (r, rank_pattern, target_modules: EDoRAConfig.from_dict reads it), "
          f"{curves} and {advice.plot(stem.with_suffix('.png'))}")
    return 0


def _targets_arg(text: str):
    """"all-linear", a regex (when it has regex characters) or module names, comma-separated."""
    if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\"):
        return text
    return _csv_list(str, "module names")(text)


def _add_ranks(sub) -> None:
    p = sub.add_parser(
        "ranks", help="a rank per layer from a model directory's weights",
        description="Reads every adapted weight of a Hugging Face model directory (safetensors, "
        "one matrix at a time), prints per layer type the share of the weight's energy "
        "(‖W0‖²) its top-r singular subspace holds at r = 1 … --max-rank, picks a rank per "
        "layer for --energy or --budget, and writes the choice as JSON that EDoRAConfig reads "
        "(r, rank_pattern, target_modules) with a plot beside it (docs/DESIGN.md §14).")
    p.set_defaults(func=cmd_ranks, error=p.error)
    p.add_argument("model_dir", help="a local Hugging Face model directory (config.json and "
                   "model.safetensors or a sharded index)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--energy", type=_one(_share, "a share in (0, 1]"),
                      help="the smallest rank per layer whose subspace holds this share")
    rule.add_argument("--budget", type=_one(_int_at_least(1), "an int >= 1"),
                      help="trainable numbers Σ r² + out to spread over the layers for the "
                           "most captured energy")
    p.add_argument("--target-modules", type=_targets_arg, default="all-linear",
                   help="PEFT's target_modules: all-linear (default), module names a,b,c or a "
                        "regex")
    p.add_argument("--exclude-modules", type=_targets_arg, default=None,
                   help="PEFT's exclude_modules, same forms")
    p.add_argument("--max-rank", type=_one(_int_at_least(1), "an int >= 1"), default=64,
                   help="the largest rank measured (default 64)")
    p.add_argument("--out", default="edora-results",
                   help="folder for ranks_<model>.json, _curves.json and .png (default: "
                        "./edora-results)")


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(text)
    return value


def _add_bench(sub) -> None:
    from .bench.model_step import MODEL_PRESETS, MODEL_PROVIDERS
    from .bench.providers import MODES, PROVIDERS

    p = sub.add_parser(
        "bench", help="time the op (or a model training step) against the frozen linear, PEFT "
        "and the naive reference", description="Unset flags take defaults sized to the device "
        "(CPU: fp32, N=2048, 1024x1024 and 512x2048, r=16; GPU: bf16, N=8192, LLaMA-7B/13B "
        "layer shapes). Each case's rows are appended to <out>/bench_<device>.csv as soon as it is "
        "measured; the whole run goes to a JSON beside it at the end, also after a failure. On "
        "CPU, unless OMP_WAIT_POLICY is set, it re-runs itself with OMP_WAIT_POLICY=PASSIVE.")
    p.set_defaults(func=cmd_bench, error=p.error)
    p.add_argument("--tokens", type=_csv_list(_int_at_least(1), "token counts >= 1 like "
                                              "2048,4096"),
                   help="N, the flattened leading dims of x")
    p.add_argument("--shapes", type=_csv_list(_shape, "shapes INxOUT,... like "
                                              "1024x1024,4096x11008"),
                   help="layer shapes as INxOUT,...")
    p.add_argument("--ranks", type=_csv_list(_int_at_least(1), "ranks >= 1 like 16,64"),
                   help="adapter ranks (--model, --init: the first one; --init default 16)")
    p.add_argument("--dtype", type=_one(_dtype, f"one of {', '.join(DTYPES)}"),
                   help="fp32, bf16, fp16 or fp64 (--init-llama7b: the model's dtype, default "
                        "bf16; the SVDs run in fp32 either way)")
    from .bench.adapters import ADAPTER_PROVIDERS
    from .bench.host import HOST_PROVIDERS

    any_provider = tuple(dict.fromkeys(PROVIDERS + MODEL_PROVIDERS + HOST_PROVIDERS
                                       + ADAPTER_PROVIDERS))
    p.add_argument("--providers", type=_csv_list(_choice(any_provider), "providers from "
                                                 f"{', '.join(any_provider)}"),
                   help=f"op: {', '.join(PROVIDERS)}; --model: {', '.join(MODEL_PROVIDERS)}; "
                        f"--host: {', '.join(HOST_PROVIDERS)}; --adapters: "
                        f"{', '.join(ADAPTER_PROVIDERS)}")
    p.add_argument("--modes", type=_csv_list(_choice(MODES), f"modes from {', '.join(MODES)}"),
                   help="fwd (inference forward), fwd+bwd (training step of the layer)")
    p.add_argument("--repeats", type=_one(_int_at_least(1), "an integer >= 1"),
                   help="timed turns per provider: one call each, on CUDA a burst of calls "
                        "lasting about 10 ms (--init default 3)")
    p.add_argument("--warmup", type=_one(_int_at_least(0), "an integer >= 0"),
                   help="untimed turns per provider first (--init default 1)")
    p.add_argument("--compile", action="store_true",
                   help="add 'compiled': torch.compile(fullgraph=True) of the torch backend")
    p.add_argument("--dropout", type=_one(_probability, "a probability in [0, 1)"),
                   help="dropout on every adapter's input (PEFT: lora_dropout; EDoRA: PEFT's "
                        "semantics, plus provider 'lowrank' with dropout on the rank branch only)")
    p.add_argument("--threads", type=_one(_int_at_least(1), "an integer >= 1"),
                   help="CPU threads for torch (default: torch's choice); on a shared machine "
                        "one thread per process is less disturbed by other processes")
    # Not the tracked bench/results/: a run should not dirty the checkout it runs from.
    p.add_argument("--out", default="edora-results",
                   help="results folder, created if missing (default: ./%(default)s)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", nargs="?", const="auto", choices=["auto", *MODEL_PRESETS],
                      help="time one training step of a small Llama instead of the op "
                           "(auto: tiny on CPU, small on GPU)")
    what.add_argument("--host", action="store_true",
                      help="the host's share of one layer's step instead: a tiny layer (N=16, "
                           "64x64, r=8, bf16 unless --tokens/--shapes/--ranks/--dtype say "
                           "otherwise) with every kernel launch replaced by a no-op, against "
                           "the frozen nn.Linear, with launches and host syncs per call")
    what.add_argument("--adapters", type=_csv_list(_int_at_least(1), "adapter counts >= 1 "
                                                   "like 1,8,64"),
                      help="many adapters instead: a mixed batch (row i with adapter i mod K; "
                           "max(K) rows of --tokens tokens each) through the tiny Llama with K "
                           "EDoRA adapters on one basis, against one adapter and PEFT LoRA's "
                           "mixed batch with K adapters")
    what.add_argument("--init", action="store_true",
                      help="time the initialiser instead: batched randomized_svd against "
                           "per-layer torch.linalg.svd, torch.svd_lowrank and scikit-learn on "
                           "the 48 RoBERTa-base target matrices (CPU, fp32)")
    init = p.add_argument_group(
        "initialiser benchmark", "with --init; --ranks, --repeats, --warmup, --threads and --out "
        "apply too. Results go to <out>/bench_<device>.csv and <out>/init_<device>_<time>.json.")
    case = init.add_mutually_exclusive_group()
    case.add_argument("--init-llama7b", action="store_true",
                      help="instead: the 224 LLaMA-7B matrices (bf16); on CUDA through "
                           "apply_edora, on the CPU streamed a group at a time with its peak "
                           "memory, against scikit-learn (default device: cuda if available)")
    case.add_argument("--init-orth", action="store_true",
                      help="instead: the orthonormalisation choices (Householder QR against "
                           "Cholesky-QR variants) on the sketches of the RoBERTa-base case")
    init.add_argument("--init-device", type=_one(_device, "cpu, cuda or cuda:N"),
                      help="cpu, cuda or cuda:N (default: cpu; with --init-llama7b cuda when "
                           "available)")
    init.add_argument("--init-shrink", type=_one(_int_at_least(1), "an integer >= 1"),
                      help="--init-llama7b: divide every dimension by this, for smoke tests "
                           "(default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edora-kernels", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="print versions, the device and which backends can run"
                   ).set_defaults(func=cmd_info)
    _add_bench(sub)
    plot = sub.add_parser("plot", help="PNG charts (ratio to the baseline) of one benchmark run")
    plot.add_argument("results", help="a CSV written by 'edora-kernels bench' (draws one of its "
                      "runs) or one run's JSON")
    plot.add_argument("--run", metavar="TIMESTAMP",
                      help="the run to draw, by its timestamp (as in the CSV's timestamp column "
                           "or in the run JSON's name); default: the latest run with ratios")
    plot.add_argument("--out", help="PNG path (default: the results' path with .png)")
    plot.set_defaults(func=cmd_plot, error=plot.error)
    check = sub.add_parser("check", help="self-test every available backend against the "
                           "reference; exit status 1 on any mismatch")
    check.add_argument("--backends",
                       type=_csv_list(str, f"backend names from {', '.join(NAMES)}"),
                       help=f"check only these, from {', '.join(NAMES)} (default: every "
                            "available one)")
    check.set_defaults(func=cmd_check)
    _add_plan(sub)
    _add_ranks(sub)
    return parser


def _add_plan(sub) -> None:
    from .plan import BACKENDS, DEVICES, ELEMENT_BYTES

    p = sub.add_parser(
        "plan", help="the cost model of one layer's training step on a named GPU",
        description="Every launch of a training step (forward, then backward with x needing a "
        "gradient) with its FLOPs, bytes and roofline time, and the predicted ratio to the "
        "frozen F.linear, under the efficiency assumptions of docs/DESIGN.md §4. A model, not "
        "a measurement (bench/gpu_check.sh measures).")
    p.set_defaults(func=cmd_plan, error=p.error)
    p.add_argument("--shapes", type=_csv_list(_shape, "shapes INxOUT,... like 4096x11008"),
                   help="layer shapes as INxOUT,... (default: the LLaMA-7B layers)")
    p.add_argument("--ranks", type=_csv_list(_int_at_least(1), "ranks >= 1 like 16,64"),
                   help="adapter ranks (default: 16,64)")
    p.add_argument("--tokens", type=_csv_list(_int_at_least(1), "token counts >= 1"),
                   help="N, the flattened leading dims of x (default: 8192)")
    p.add_argument("--dtype", type=_one(_choice(tuple(ELEMENT_BYTES)),
                                        f"one of {', '.join(ELEMENT_BYTES)}"),
                   default="bf16", help="the layer's dtype (default: bf16)")
    p.add_argument("--device", type=_one(_choice(tuple(DEVICES)), f"one of {', '.join(DEVICES)}"),
                   default="h100", help="the GPU whose data sheet times the launches")
    p.add_argument("--backend", type=_one(_choice(BACKENDS), f"one of {', '.join(BACKENDS)}"),
                   help="the backend whose launches are listed (default: triton)")
    p.add_argument("--exact-norm", action="store_true",
                   help="detach_norm=False: the norm's share of dR (one more small launch)")
    p.add_argument("--json", help="also write the plans to this JSON file (its folder is "
                   "created if missing)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--adapters", type=_csv_list(_int_at_least(1), "adapter counts >= 1 like "
                                                   "1,8,64"),
                      help="instead: a batch mixing K adapters (one row each), served and "
                           "trained, against the same batch with one adapter, per K (triton "
                           "only; no --exact-norm)")
    what.add_argument("--init-llama7b", action="store_true",
                      help="instead: the initialiser's predicted time for the 224 LLaMA-7B "
                           "matrices (the first of --ranks; --dtype is the model's; --shapes, "
                           "--tokens, --backend and --exact-norm do not apply)")


OMP_POLICY = "OMP_WAIT_POLICY"
# Set for the re-executed benchmark: it says who chose the policy and stops a second re-execution.
OMP_POLICY_SET_BY_BENCH = "EDORA_BENCH_SET_OMP_WAIT_POLICY"
OMP_NOTE = (f"{OMP_POLICY}=PASSIVE set by edora-kernels bench (busy-waiting OpenMP threads swing "
            f"CPU timings by up to 2x on shared machines); set {OMP_POLICY} to choose another")


def _rerun_with_passive_openmp(args: argparse.Namespace) -> None:
    """Re-execute a CPU benchmark with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    The OpenMP runtime reads it when torch's library loads, which importing this package has
    done already: hence a new process running the same command."""
    device = args.init_device if args.init else default_device()
    if (device.type != "cpu" or OMP_POLICY in os.environ
            or OMP_POLICY_SET_BY_BENCH in os.environ):
        return
    print(f"edora-kernels bench: {OMP_NOTE}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "edora_kernels", *sys.argv[1:]],
              {**os.environ, OMP_POLICY: "PASSIVE", OMP_POLICY_SET_BY_BENCH: "1"})


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this process's own). From the command line
    (``argv`` None) a CPU benchmark re-executes itself under a passive OpenMP wait policy;
    called with ``argv``, everything runs in this process."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        _check_bench(args)  # an argument error stops here, before any re-execution
        if argv is None:
            _rerun_with_passive_openmp(args)
    try:
        return args.func(args)
    except BenchError as err:
        print(f"edora-kernels {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edora-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
