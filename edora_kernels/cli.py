"""``edora-kernels`` command line.

    info    versions, device, which backends can run
    bench   the op benchmark (or, with --model, a whole-model training step) on this device
    plot    PNG charts of a benchmark CSV
    check   every available backend against the reference; non-zero exit on a mismatch
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, backend_info
from .backends import NAMES
from .bench.io import default_device, device_name

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
    return 0


# --- argument types: each names the flag's expected form in its error ----------------------------

def _csv_list(item_type, what: str):
    def parse(text: str) -> list:
        try:
            items = [item_type(part.strip()) for part in text.split(",") if part.strip()]
        except (ValueError, KeyError) as err:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} ({err})") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty list")
        return items
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} < 1")
    return value


def _shape(text: str) -> tuple[int, int]:
    in_f, out_f = text.lower().split("x")
    return _positive_int(in_f), _positive_int(out_f)


def _choice(choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.results import report

    if args.threads is not None:
        # Before anything runs: the thread count is part of the CPU's name in the results.
        torch.set_num_threads(args.threads)
    device = default_device()
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v)
                for k, v in vars(args).items() if k != "func"}
    if args.model is not None:
        from .bench.model_step import default_model_config, run_model_bench

        cfg = default_model_config(device, args.model)
        for key in ("dtype", "repeats", "warmup"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
        if args.ranks is not None:
            cfg.rank = args.ranks[0]
        if args.providers is not None:
            cfg.providers = args.providers
        run = run_model_bench(cfg, settings)
    else:
        from .bench.op import default_config, run_op_bench

        cfg = default_config(device)
        for key in ("tokens", "shapes", "ranks", "dtype", "providers", "modes", "repeats",
                    "warmup"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
        if args.compile and "compiled" not in cfg.providers:
            cfg.providers = [*cfg.providers, "compiled"]
        run = run_op_bench(cfg, settings)
    report(run, args.out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .bench.plot import plot_csv

    path = plot_csv(args.csv, args.out)
    print(f"wrote {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .selfcheck import format_report, run_checks

    try:
        results = run_checks(default_device(), args.backends)
    except (ValueError, RuntimeError) as err:  # a named backend that is unknown or cannot run
        print(f"edora-kernels check: error: {err}", file=sys.stderr)
        return 2
    print(format_report(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


def _add_bench(sub) -> None:
    from .bench.model_step import MODEL_PRESETS, MODEL_PROVIDERS
    from .bench.providers import MODES, PROVIDERS

    p = sub.add_parser(
        "bench", help="time the op (or a model training step) against the frozen linear, PEFT "
        "and the naive reference", description="Unset flags take defaults sized to the device "
        "(CPU: fp32, N=2048, 1024x1024 and 512x2048, r=16; GPU: bf16, N=8192, LLaMA-7B/13B "
        "layer shapes). Results are appended to <out>/bench_<device>.csv.")
    p.add_argument("--tokens", type=_csv_list(_positive_int, "token counts like 2048,4096"),
                   help="N, the flattened leading dims of x")
    p.add_argument("--shapes", type=_csv_list(_shape, "INxOUT,... like 1024x1024,4096x11008"),
                   help="layer shapes as INxOUT,...")
    p.add_argument("--ranks", type=_csv_list(_positive_int, "ranks like 16,64"),
                   help="adapter ranks (--model: the first one)")
    p.add_argument("--dtype", type=_dtype, help="fp32, bf16, fp16 or fp64")
    any_provider = tuple(dict.fromkeys(PROVIDERS + MODEL_PROVIDERS))
    p.add_argument("--providers", type=_csv_list(_choice(any_provider), "provider names"),
                   help=f"op: {', '.join(PROVIDERS)}; --model: {', '.join(MODEL_PROVIDERS)}")
    p.add_argument("--modes", type=_csv_list(_choice(MODES), f"modes from {', '.join(MODES)}"),
                   help="fwd (inference forward), fwd+bwd (training step of the layer)")
    p.add_argument("--repeats", type=_positive_int, help="timed calls per provider")
    p.add_argument("--warmup", type=int, help="untimed calls per provider first")
    p.add_argument("--compile", action="store_true",
                   help="add 'compiled': torch.compile(fullgraph=True) of the torch backend")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for torch (default: torch's choice); on a shared machine "
                        "one thread per process is less disturbed by other processes")
    p.add_argument("--out", default="bench/results", help="results folder (default: %(default)s)")
    p.add_argument("--model", nargs="?", const="auto", choices=["auto", *MODEL_PRESETS],
                   help="time one training step of a small Llama instead of the op "
                        "(auto: tiny on CPU, small on GPU)")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edora-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, the device and which backends can run"
                   ).set_defaults(func=cmd_info)
    _add_bench(sub)
    plot = sub.add_parser("plot", help="PNG charts (ratio to the frozen linear) of a bench CSV")
    plot.add_argument("csv", help="a CSV written by 'edora-kernels bench'")
    plot.add_argument("--out", help="PNG path (default: the CSV's path with .png)")
    plot.set_defaults(func=cmd_plot)
    check = sub.add_parser("check", help="self-test every available backend against the "
                           "reference; exit status 1 on any mismatch")
    check.add_argument("--backends",
                       type=_csv_list(str, f"backend names from {', '.join(NAMES)}"),
                       help=f"check only these, from {', '.join(NAMES)} (default: every "
                            "available one)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
