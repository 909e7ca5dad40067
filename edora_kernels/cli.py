"""``edora-kernels`` command line.

    info    versions, device, which backends can run
    bench   the op benchmark (or, with --model, a whole-model training step; with --init, the
            initialiser's randomised SVD) on this device
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


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return device


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


INIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OP_ONLY = ("tokens", "shapes", "providers", "modes", "compile")


def _init_case(args: argparse.Namespace) -> str:
    return "llama7b" if args.init_llama7b else "orth" if args.init_orth else "roberta"


def _check_bench(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``args.error`` exits with the usage."""
    init_flags = {"init_llama7b": "--init-llama7b", "init_orth": "--init-orth",
                  "init_device": "--init-device", "init_shrink": "--init-shrink"}
    if not args.init:
        for key, flag in init_flags.items():
            if getattr(args, key) not in (None, False):
                args.error(f"{flag} applies to --init only")
        return
    # Rejected rather than ignored: a flag that silently does nothing misleads the reader.
    for key in OP_ONLY:
        if getattr(args, key) not in (None, False):
            args.error(f"--{key} does not apply to --init")
    case = _init_case(args)
    if args.dtype is not None and (case != "llama7b" or args.dtype not in INIT_DTYPES):
        args.error("--dtype with --init: --init-llama7b only, and fp32, bf16 or fp16")
    if args.init_shrink is not None and case != "llama7b":
        args.error("--init-shrink applies to --init-llama7b only")
    from .bench.init import default_init_device

    device = args.init_device or default_init_device(case)
    if device.type == "cuda" and not torch.cuda.is_available():
        args.error("CUDA is not available here; pass --init-device cpu (with --init-shrink for "
                   "--init-llama7b)")


def _bench_init(args: argparse.Namespace, settings: dict) -> None:
    from .bench.init import run_init_bench

    options = {"device": args.init_device, "rank": args.ranks[0] if args.ranks else None,
               "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
               "shrink": args.init_shrink}
    # Unset flags keep run_init_bench's defaults, which are the benchmark's published settings.
    run_init_bench(_init_case(args), args.out, settings=settings,
                   **{k: v for k, v in options.items() if v is not None})


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.results import report

    _check_bench(args)
    if args.threads is not None:
        # Before anything runs: the thread count is part of the CPU's name in the results.
        torch.set_num_threads(args.threads)
    device = default_device()
    settings = {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v)
                for k, v in vars(args).items() if k not in ("func", "error")}
    if args.init:
        _bench_init(args, settings)
        return 0
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
    p.set_defaults(func=cmd_bench, error=p.error)
    p.add_argument("--tokens", type=_csv_list(_positive_int, "token counts like 2048,4096"),
                   help="N, the flattened leading dims of x")
    p.add_argument("--shapes", type=_csv_list(_shape, "INxOUT,... like 1024x1024,4096x11008"),
                   help="layer shapes as INxOUT,...")
    p.add_argument("--ranks", type=_csv_list(_positive_int, "ranks like 16,64"),
                   help="adapter ranks (--model, --init: the first one; --init default 16)")
    p.add_argument("--dtype", type=_dtype, help="fp32, bf16, fp16 or fp64 (--init-llama7b: the "
                   "model's dtype, default bf16; the SVDs run in fp32 either way)")
    any_provider = tuple(dict.fromkeys(PROVIDERS + MODEL_PROVIDERS))
    p.add_argument("--providers", type=_csv_list(_choice(any_provider), "provider names"),
                   help=f"op: {', '.join(PROVIDERS)}; --model: {', '.join(MODEL_PROVIDERS)}")
    p.add_argument("--modes", type=_csv_list(_choice(MODES), f"modes from {', '.join(MODES)}"),
                   help="fwd (inference forward), fwd+bwd (training step of the layer)")
    p.add_argument("--repeats", type=_positive_int,
                   help="timed calls per provider (--init default 3)")
    p.add_argument("--warmup", type=int, help="untimed calls per provider first (--init default 1)")
    p.add_argument("--compile", action="store_true",
                   help="add 'compiled': torch.compile(fullgraph=True) of the torch backend")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for torch (default: torch's choice); on a shared machine "
                        "one thread per process is less disturbed by other processes")
    # Not the tracked bench/results/: a run should not dirty the checkout it runs from.
    p.add_argument("--out", default="edora-results",
                   help="results folder, created if missing (default: ./%(default)s)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", nargs="?", const="auto", choices=["auto", *MODEL_PRESETS],
                      help="time one training step of a small Llama instead of the op "
                           "(auto: tiny on CPU, small on GPU)")
    what.add_argument("--init", action="store_true",
                      help="time the initialiser instead: batched randomized_svd against "
                           "per-layer torch.linalg.svd, torch.svd_lowrank and scikit-learn on "
                           "the 48 RoBERTa-base target matrices (CPU, fp32)")
    init = p.add_argument_group(
        "initialiser benchmark", "with --init; --ranks, --repeats, --warmup, --threads and --out "
        "apply too. Results go to <out>/bench_<device>.csv and <out>/init_<device>_<time>.json.")
    case = init.add_mutually_exclusive_group()
    case.add_argument("--init-llama7b", action="store_true",
                      help="instead: the 224 LLaMA-7B matrices through apply_edora (default "
                           "device cuda)")
    case.add_argument("--init-orth", action="store_true",
                      help="instead: the orthonormalisation choices (Householder QR against "
                           "Cholesky-QR variants) on the sketches of the RoBERTa-base case")
    init.add_argument("--init-device", type=_device,
                      help="cpu, cuda or cuda:N (default: cpu; cuda with --init-llama7b)")
    init.add_argument("--init-shrink", type=_positive_int,
                      help="--init-llama7b: divide every dimension by this, for smoke tests "
                           "(default: 1)")


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
