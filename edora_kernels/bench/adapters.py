"""The many-adapter benchmark (``bench --adapters K,...``): one mixed batch — row i uses adapter
i mod K — through the tiny Llama of the model-step benchmark with K EDoRA adapters on one basis,
against the same batch with one adapter (the anchor) and against PEFT LoRA's mixed batch with K
LoRA adapters of the same rank. Forward (serving) and forward + backward (multi-tenant
training; PEFT refuses ``adapter_names`` in training, so that row records the refusal)."""
from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .model_step import MODEL_PRESETS, TARGETS, _base_model
from .results import BenchError, Result, Run, describe, progress_bar
from .timing import round_robin

KERNEL = "llama_mixed_adapters"
BASELINE = "edora_one"
ADAPTER_PROVIDERS = ("edora_one", "edora_mixed", "peft_lora_mixed")
ADAPTER_MODES = ("fwd", "fwd+bwd")


@dataclass
class AdaptersConfig:
    counts: list[int] = field(default_factory=lambda: [1, 8, 64])
    rank: int = 16
    modes: list[str] = field(default_factory=lambda: list(ADAPTER_MODES))
    providers: list[str] = field(default_factory=lambda: list(ADAPTER_PROVIDERS))
    seq: int = 16            # tokens per row; the batch has max(counts) rows
    repeats: int = 10
    warmup: int = 2
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    alpha: float = 16.0
    preset: str = "tiny"

    def __post_init__(self) -> None:
        for key, value in MODEL_PRESETS[self.preset].items():
            if key not in ("batch", "seq", "dtype"):
                setattr(self, key, value)

    @property
    def rows(self) -> int:
        return max(self.counts)

    def label(self, count: int) -> str:
        return f"K={count}"

    def shape(self, count: int) -> str:
        return (f"adapters={count};rows={self.rows};seq={self.seq};hidden={self.hidden};"
                f"layers={self.layers};rank={self.rank}")


def default_adapters_config(device: torch.device) -> AdaptersConfig:
    on_gpu = device.type == "cuda"
    return AdaptersConfig(device=device, preset="small" if on_gpu else "tiny",
                          dtype=torch.bfloat16 if on_gpu else torch.float32,
                          seq=128 if on_gpu else 64)


def _edora(base: nn.Module, cfg: AdaptersConfig, count: int):
    from ..config import EDoRAConfig
    from ..edora_model import get_edora_model

    def config(seed):
        return EDoRAConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=list(TARGETS), seed=seed)

    model = get_edora_model(copy.deepcopy(base), config(0))
    for i in range(1, count):
        model.add_adapter(f"user{i}", config(i))
    model.set_adapter(model.adapter_names())
    return model, model.adapter_names()


def _peft_lora(base: nn.Module, cfg: AdaptersConfig, count: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                        target_modules=list(TARGETS), init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        model = get_peft_model(copy.deepcopy(base), config, adapter_name="user0")
        for i in range(1, count):
            model.add_adapter(f"user{i}", config)
    return model, [f"user{i}" for i in range(count)]


class _Case:
    """One provider's model and the call one timed turn makes."""

    def __init__(self, provider: str, base: nn.Module, cfg: AdaptersConfig, count: int,
                 mode: str, ids: torch.Tensor):
        if provider == "peft_lora_mixed":
            if mode != "fwd":
                raise RuntimeError("PEFT refuses adapter_names in training mode (mixed "
                                   "batches are inference-only there)")
            self.model, names = _peft_lora(base, cfg, count)
        else:
            self.model, names = _edora(base, cfg, 1 if provider == BASELINE else count)
        self.kwargs = {"input_ids": ids}
        if provider != BASELINE:
            self.kwargs["adapter_names"] = [names[i % count] for i in range(len(ids))]
        self.training = mode == "fwd+bwd"
        self.model.train(self.training)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def reset(self) -> None:
        with torch.no_grad():
            for p in self.trainable:
                p.grad = None
                if self.training:  # as an optimizer step would: cached norms are stale
                    p.add_(0.0)

    def call(self) -> None:
        if not self.training:
            with torch.no_grad():
                self.model(**self.kwargs)
            return
        self.model(**self.kwargs).logits.float().pow(2).mean().backward()


def _adapter_bytes(cfg: AdaptersConfig) -> dict[str, int]:
    """Bytes of one adapter (fp32 trainables) and of the shared basis, over the model."""
    shapes = {"q_proj": (cfg.hidden, cfg.hidden), "k_proj": (cfg.hidden, cfg.hidden),
              "v_proj": (cfg.hidden, cfg.hidden), "o_proj": (cfg.hidden, cfg.hidden),
              "gate_proj": (cfg.hidden, cfg.intermediate),
              "up_proj": (cfg.hidden, cfg.intermediate),
              "down_proj": (cfg.intermediate, cfg.hidden)}
    r = cfg.rank
    per = {"edora": 0, "lora": 0, "dora": 0, "basis": 0}
    for in_f, out_f in shapes.values():
        per["edora"] += 4 * (r * r + out_f) * cfg.layers
        per["lora"] += 4 * r * (in_f + out_f) * cfg.layers
        per["dora"] += 4 * (r * (in_f + out_f) + out_f) * cfg.layers
        per["basis"] += 4 * r * (in_f + out_f) * cfg.layers
    return per


def run_adapters_bench(cfg: AdaptersConfig, run: Run) -> None:
    """Time each (K, mode) case's providers in turns into ``run``."""
    if importlib.util.find_spec("transformers") is None:
        raise BenchError("--adapters needs transformers (pip install transformers)")
    providers = [BASELINE] + [p for p in cfg.providers if p != BASELINE]
    if "peft_lora_mixed" in providers and importlib.util.find_spec("peft") is None:
        providers.remove("peft_lora_mixed")
        run.notes.append("skipped peft_lora_mixed: peft is not installed")
    sizes = _adapter_bytes(cfg)
    largest = max(cfg.counts)
    run.notes.append(
        f"a mixed batch: {cfg.rows} rows x {cfg.seq} tokens, row i with adapter i mod K; "
        f"edora_one = the same batch with one adapter (the anchor), edora_mixed = K EDoRA "
        f"adapters on one basis (adapter_names=), peft_lora_mixed = PEFT LoRA with K adapters "
        f"(adapter_names=); EDoRA r={cfg.rank} on {', '.join(TARGETS)} of {cfg.layers} blocks")
    run.notes.append(
        f"adapter memory for K={largest}: EDoRA {largest * sizes['edora'] / 2**20:.2f} MiB "
        f"(+ the shared basis {sizes['basis'] / 2**20:.2f} MiB once), PEFT LoRA "
        f"{largest * sizes['lora'] / 2**20:.2f} MiB, PEFT DoRA "
        f"{largest * sizes['dora'] / 2**20:.2f} MiB ({sizes['lora'] / sizes['edora']:.0f}x "
        "an EDoRA adapter per LoRA adapter)")
    run.notes.append(f"ratio = per-round time / {BASELINE}'s in the same round, p50 [p20-p80]")
    base = _base_model(cfg).to(cfg.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab, (cfg.rows, cfg.seq), generator=gen).to(cfg.device)
    cases = [(count, mode) for count in cfg.counts for mode in cfg.modes]
    with progress_bar((cfg.repeats + cfg.warmup) * len(providers) * len(cases),
                      "adapters") as bar:
        for count, mode in cases:
            common = dict(kernel=KERNEL, mode=mode, x=cfg.label(count), shape=cfg.shape(count),
                          dtype=str(cfg.dtype).removeprefix("torch."), baseline=BASELINE)
            built, failures = {}, {}
            for name in providers:
                try:
                    built[name] = _Case(name, base, cfg, count, mode, ids)
                except Exception as err:
                    failures[name] = err
            if BASELINE in failures:
                raise BenchError(f"the anchor {BASELINE} failed: {describe(failures[BASELINE])}")
            samples = round_robin({n: (c.reset, c.call) for n, c in built.items()}, cfg.device,
                                  cfg.repeats, cfg.warmup, bar.update, failures)
            for name in providers:
                if name in failures:
                    run.add(Result(**common, provider=name, seconds=[], ratios=[],
                                   error=describe(failures[name])))
                    continue
                run.add(Result(**common, provider=name, seconds=samples[name],
                               ratios=[t / b for t, b in zip(samples[name],
                                                             samples[BASELINE])]))
