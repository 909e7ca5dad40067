"""edora_kernels: fused kernels for EDoRA fine-tuning.

Public entry points: ``edora_linear`` (the op), ``edora_epilogue`` (the op on any base layer),
``EDoRALinear`` (the layer), ``apply_edora`` and the adapter save/load (whole models),
``EDoRAConfig``/``get_edora_model`` (a PEFT-shaped wrapper with save_pretrained and
from_pretrained), ``merge_and_unload``, ``unload`` and ``export_peft_dora`` (leaving EDoRA),
``randomized_svd`` (the batched initialiser), ``weight_energy`` / ``gradient_share`` /
``suggest_ranks`` (which rank where), ``refresh_norm_terms``, ``backend_info``.
The optional CUDA extension is never imported here; backends load on first use.
"""
__version__ = "0.1.0"

from .adapter_io import edora_state_dict, load_edora_state_dict, save_edora  # noqa: E402
from .backends import info as backend_info  # noqa: E402
from .config import EDoRAConfig  # noqa: E402
from .edora_model import EDoRAModel, get_edora_model  # noqa: E402
from .export import export_peft_dora, merge_and_unload, unload  # noqa: E402
from .layer import EDoRALinear, refresh_norm_terms  # noqa: E402
from .model import apply_edora  # noqa: E402
from .norm import base_norm_terms  # noqa: E402
from .ops import edora_epilogue, edora_linear  # noqa: E402
from .ranks import gradient_share, suggest_ranks, weight_energy  # noqa: E402
from .svd import randomized_svd  # noqa: E402

__all__ = [
    "EDoRAConfig",
    "EDoRALinear",
    "EDoRAModel",
    "apply_edora",
    "backend_info",
    "base_norm_terms",
    "edora_epilogue",
    "edora_linear",
    "edora_state_dict",
    "export_peft_dora",
    "get_edora_model",
    "gradient_share",
    "load_edora_state_dict",
    "merge_and_unload",
    "randomized_svd",
    "refresh_norm_terms",
    "save_edora",
    "suggest_ranks",
    "unload",
    "weight_energy",
    "__version__",
]
