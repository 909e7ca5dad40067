"""setuptools entry point. All metadata lives in pyproject.toml.

This file adds the optional CUDA extension ``edora_kernels._C`` (csrc/, see csrc/README.md). It is
built only when asked for with ``EDORA_BUILD_CUDA=1`` and when a CUDA build of torch and nvcc are
both there; ``EDORA_SKIP_CUDA_BUILD=1`` always skips it. Anything else installs the pure-Python
package: a plain ``pip install -e .`` never compiles and never fails because of the extension
(with pip's build isolation torch is not importable here, which just means "not built").
"""
import glob
import os
import sys

from setuptools import setup

EXTENSION = "edora_kernels._C"
# Without a visible GPU torch cannot detect the architecture (and raises IndexError): build for
# the GPUs the kernels target, Ampere and Hopper.
DEFAULT_ARCH_LIST = "8.0;9.0"


def _cuda_extension():
    """(setup keyword arguments, message): the extension when it can and should be built."""
    if os.environ.get("EDORA_SKIP_CUDA_BUILD", "0") == "1":
        return {}, "not built: EDORA_SKIP_CUDA_BUILD=1"
    if os.environ.get("EDORA_BUILD_CUDA", "0") != "1":
        return {}, "not built: not requested (set EDORA_BUILD_CUDA=1 to build it)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        return {}, (f"not built: torch is not importable ({err}); with pip, pass "
                    "--no-build-isolation so that the installed torch is used")
    if torch.version.cuda is None:
        return {}, f"not built: torch {torch.__version__} is a build without CUDA"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return {}, f"not built: nvcc not found (CUDA_HOME={cuda_home}); set CUDA_HOME"
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return {}, (f"not built: no CUDA headers under CUDA_HOME={cuda_home}; set CUDA_HOME to "
                    "the toolkit root (e.g. /usr/local/cuda)")
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/*.cu"))]
    extension = cpp_extension.CUDAExtension(
        EXTENSION, sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}
    )
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
    return ({"ext_modules": [extension],
             "cmdclass": {"build_ext": cpp_extension.BuildExtension}},
            f"will be built with nvcc from {cuda_home} for torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), arch {arch}")


_kwargs, _message = _cuda_extension()
print(f"edora_kernels: CUDA extension {EXTENSION} {_message}", file=sys.stderr)
setup(**_kwargs)
