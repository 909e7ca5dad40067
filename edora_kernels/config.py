"""``EDoRAConfig``: what ``get_edora_model`` builds, as a JSON-able, PEFT-shaped config — and the
one converter from a PEFT ``LoraConfig``, which refuses every field EDoRA cannot honour.

It imports no PEFT: a ``LoraConfig`` is read by its attributes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .options import LayerOptions

PEFT_TYPE = "EDORA"
# The heads PEFT trains and saves with the adapter for each task type, whatever
# ``modules_to_save`` says besides.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}

# LoraConfig fields whose non-default value changes what PEFT would build and that EDoRA cannot
# honour; each maps to the value that means "off".
UNSUPPORTED_LORA_FIELDS = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "bias": "none",
    "init_lora_weights": True,
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
_DEFAULTS = LayerOptions()


@dataclass
class EDoRAConfig:
    """What ``get_edora_model`` builds; round-trips through JSON (``to_dict``/``from_dict``).

    ``r``, ``alpha`` (scaling alpha / r), ``rank_pattern`` and ``alpha_pattern`` (other values
    for the layers they match, PEFT's rule), ``target_modules`` and ``exclude_modules`` (PEFT's
    matching rules, "all-linear" included), ``modules_to_save`` (heads trained and saved with
    the adapter; the heads of ``task_type`` are added, as PEFT does), ``inference_mode``
    (everything frozen), the layer options of ``LayerOptions`` and, in a saved config, the
    ``basis`` fingerprint.
    """

    r: int = 16
    alpha: float = _DEFAULTS.alpha
    # Other ranks / alphas for some layers, by PEFT's rule (edora_kernels.checks.pattern_value)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    dropout: float = _DEFAULTS.dropout
    dropout_mode: str = _DEFAULTS.dropout_mode
    init: str = _DEFAULTS.init
    seed: int | None = 0
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    detach_norm: bool = _DEFAULTS.detach_norm
    backend: str = _DEFAULTS.backend
    inference_mode: bool = False
    # The fingerprint of the basis (A, B) the adapter was trained on; written by
    # save_pretrained (edora_kernels.basis), checked when the adapter is loaded.
    basis: dict | None = None
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def layer_options(self) -> LayerOptions:
        """The options every layer of this config gets (checked)."""
        return LayerOptions(alpha=self.alpha, dropout=self.dropout,
                            dropout_mode=self.dropout_mode, detach_norm=self.detach_norm,
                            backend=self.backend, init=self.init)

    def heads(self) -> list[str]:
        """``modules_to_save`` and PEFT's heads for ``task_type``, each once."""
        return list(dict.fromkeys([*(self.modules_to_save or []),
                                   *TASK_HEADS.get(self.task_type or "", [])]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EDoRAConfig":
        values = dict(values)
        if values.pop("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError("not an EDoRA config (peft_type is not 'EDORA')")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EDoRAConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_lora_config(cls, lora_config) -> "EDoRAConfig":
        """The EDoRA counterpart of a PEFT ``LoraConfig``: ``r``, ``lora_alpha`` (rsLoRA's
        alpha/√r kept), ``rank_pattern``, ``alpha_pattern``, ``lora_dropout``,
        ``target_modules``, ``exclude_modules``,
        ``modules_to_save``, ``task_type``, ``inference_mode``. ``use_dora`` is irrelevant
        (EDoRA always splits magnitude and direction) and ``fan_in_fan_out`` is read from the
        layers themselves (GPT-2's Conv1D); every other field PEFT offers with no EDoRA
        counterpart (``rank_pattern``, ``layer_replication``, other initialisations, ...) is
        refused by name when set, rather than dropped."""
        for name, off in UNSUPPORTED_LORA_FIELDS.items():
            value = getattr(lora_config, name, off)
            if value not in (off, None, {}, []):
                raise ValueError(f"LoraConfig.{name}={value!r} has no EDoRA counterpart; "
                                 f"leave it at {off!r}")
        rank = lora_config.r
        use_rslora = getattr(lora_config, "use_rslora", False)
        rslora = math.sqrt(rank) if use_rslora else 1.0
        rank_pattern = dict(getattr(lora_config, "rank_pattern", None) or {})
        alpha_pattern = dict(getattr(lora_config, "alpha_pattern", None) or {})
        if use_rslora and (rank_pattern or alpha_pattern):
            # rsLoRA scales by alpha/√r per layer: EDoRA's alpha would depend on which rank
            # and alpha patterns each layer matches, which one config cannot express.
            raise ValueError("LoraConfig.use_rslora=True with rank_pattern or alpha_pattern has "
                             "no EDoRA counterpart; give the per-layer alphas explicitly "
                             "(alpha_l = lora_alpha_l * sqrt(r_l)) in an EDoRAConfig")
        task = getattr(lora_config, "task_type", None)
        return cls(r=rank, alpha=lora_config.lora_alpha * rslora,
                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   target_modules=_plain(lora_config.target_modules),
                   exclude_modules=_plain(getattr(lora_config, "exclude_modules", None)),
                   dropout=lora_config.lora_dropout,
                   modules_to_save=_plain(getattr(lora_config, "modules_to_save", None)),
                   task_type=None if task is None else str(getattr(task, "value", task)),
                   inference_mode=bool(getattr(lora_config, "inference_mode", False)))


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value
