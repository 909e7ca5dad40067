"""``edora-kernels`` command line: ``info`` (versions, device, backends)."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, backend_info


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    print(f"device        {_device_name()}")
    print("backends:")
    for name, state in backend_info().items():
        mark = "yes" if state["available"] else "no "
        print(f"  {name:<7} {mark}  {state['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, the device and which backends can run"
                   ).set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
