"""The model-step benchmark: one training step (forward, backward, AdamW) of a small Llama built
offline from a ``transformers.LlamaConfig``, with EDoRA on every linear of every block (through
``apply_edora``) against PEFT DoRA and PEFT LoRA on the same base model at the same rank."""
from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..backends import BACKENDS, NAMES
from ..tolerances import normalised_error
from .results import BenchError, Result, Run, describe, progress_bar
from .timing import peak_bytes, round_robin, saved_bytes

KERNEL = "llama_train_step"
MODE = "step"
BASELINE = "peft_lora"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EDORA_PROVIDERS = NAMES
MODEL_PROVIDERS = ("peft_lora", "peft_dora", *EDORA_PROVIDERS)

# Llama-shaped, small enough to build in seconds: "tiny" for 2 CPU cores, "small" for one GPU,
# "micro" for smoke tests of the benchmark itself.
MODEL_PRESETS = {
    "micro": dict(hidden=64, intermediate=128, layers=1, heads=2, vocab=128, batch=2, seq=32,
                  dtype=torch.float32),
    "tiny": dict(hidden=256, intermediate=688, layers=2, heads=4, vocab=1024, batch=4, seq=256,
                 dtype=torch.float32),
    "small": dict(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000, batch=4,
                  seq=2048, dtype=torch.bfloat16),
}


@dataclass
class ModelConfig:
    preset: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype
    rank: int
    providers: list[str]
    repeats: int
    warmup: int
    device: torch.device
    alpha: float = 16.0

    @property
    def label(self) -> str:
        return f"llama h{self.hidden} L{self.layers} N{self.batch * self.seq} r{self.rank}"

    @property
    def shape(self) -> str:
        keys = ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank")
        return ";".join(f"{k}={getattr(self, k)}" for k in keys)


def default_model_config(device: torch.device, preset: str = "auto") -> ModelConfig:
    if preset == "auto":
        preset = "small" if device.type == "cuda" else "tiny"
    on_gpu = device.type == "cuda"
    providers = ["peft_lora", "peft_dora"] + [n for n in NAMES if BACKENDS[n].runs_on(device)]
    return ModelConfig(preset=preset, **MODEL_PRESETS[preset], rank=16, providers=providers,
                       repeats=20 if on_gpu else 15, warmup=3 if on_gpu else 2, device=device)


def _base_model(cfg: ModelConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
        max_position_embeddings=cfg.seq, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(device=cfg.device, dtype=cfg.dtype).train()


def _with_edora(base: nn.Module, cfg: ModelConfig, backend: str) -> nn.Module:
    try:
        from ..model import apply_edora
    except ImportError as err:
        raise RuntimeError(f"--model needs edora_kernels.model.apply_edora ({err})") from None
    model = copy.deepcopy(base)
    # apply_edora leaves only R and magnitude trainable: what PEFT trains, the adapters only.
    summary = apply_edora(model, target_modules=list(TARGETS), rank=cfg.rank, alpha=cfg.alpha,
                          seed=0, progress=False, backend=backend)
    if len(summary.layers) != len(TARGETS) * cfg.layers:
        raise RuntimeError(f"apply_edora replaced {len(summary.layers)} linears, expected "
                           f"{len(TARGETS) * cfg.layers} ({', '.join(TARGETS)} per block)")
    return model


def _with_peft(base: nn.Module, cfg: ModelConfig, use_dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                        target_modules=list(TARGETS), use_dora=use_dora)
    with warnings.catch_warnings():
        # PEFT reads a property that transformers 5 deprecates; noise for benchmark users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        return get_peft_model(copy.deepcopy(base), config)


def _build(name: str, base: nn.Module, cfg: ModelConfig) -> nn.Module:
    if name in EDORA_PROVIDERS:
        return _with_edora(base, cfg, name)
    return _with_peft(base, cfg, use_dora=name == "peft_dora")


def _why_unavailable(name: str, device: torch.device) -> str | None:
    from ..backends import info as backend_info

    if name not in MODEL_PROVIDERS:
        return f"not a model-step provider (choose from {', '.join(MODEL_PROVIDERS)})"
    if name.startswith("peft") and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if name in BACKENDS:
        if not BACKENDS[name].runs_on(device):
            return f"benchmarked on {', '.join(BACKENDS[name].devices)} only"
        state = backend_info()[name]
        return None if state["available"] else state["reason"]
    return None


def _check_baseline(failures: dict[str, Exception]) -> None:
    # Every ratio is taken against the baseline: without it there is nothing to report.
    if BASELINE in failures:
        raise BenchError(f"the baseline provider {BASELINE!r} failed: "
                         f"{describe(failures[BASELINE])}")


class _Trainer:
    """One model, its optimizer and its fixed batch; ``step`` is one whole training step."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        self.model, self.tokens = model, tokens
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def loss(self) -> torch.Tensor:
        return self.model(input_ids=self.tokens, labels=self.tokens).loss

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def state(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]


def run_model_bench(cfg: ModelConfig, run: Run) -> None:
    """Time one training step of each provider's model into ``run``, adding each provider's
    result as soon as it is measured. A provider that fails (build, step, measurement) gets an
    error result; the baseline failing ends the benchmark."""
    if importlib.util.find_spec("transformers") is None:
        raise BenchError("--model needs transformers (pip install transformers)")
    providers = []
    for name in [BASELINE] + [p for p in cfg.providers if p != BASELINE]:
        why = _why_unavailable(name, cfg.device)
        if why is None:
            providers.append(name)
        elif name == BASELINE:
            raise BenchError(f"the baseline {BASELINE} cannot run: {why}")
        else:
            run.notes.append(f"skipped {name}: {why}")
    run.notes.append(f"one step = zero_grad + forward + backward + AdamW on the adapters of "
                     f"{', '.join(TARGETS)} in all {cfg.layers} blocks (the base model frozen)")
    run.notes.append("saved MiB = activations autograd keeps for backward (model weights "
                     "excluded); max err = first loss vs the float64 base model (adapters start "
                     "near the identity)")
    run.notes.append(f"ratio = per-round step time / {BASELINE}'s in the same round, "
                     "p50 [p20-p80]")

    base = _base_model(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(cfg.device)
    with torch.no_grad():
        expected = copy.deepcopy(base).double()(input_ids=tokens, labels=tokens).loss
    common = dict(kernel=KERNEL, mode=MODE, x=cfg.label, shape=cfg.shape,
                  dtype=str(cfg.dtype).removeprefix("torch."), baseline=BASELINE)
    trainers: dict[str, _Trainer] = {}
    errors: dict[str, float] = {}
    failures: dict[str, Exception] = {}
    for name in providers:
        try:
            trainers[name] = _Trainer(_build(name, base, cfg), tokens)
            # Before any step every adapter is (nearly) the identity: the loss must match the
            # base model's; taken now, before training moves the adapters.
            with torch.no_grad():
                errors[name] = normalised_error(trainers[name].loss().double(), expected)
        except Exception as err:
            trainers.pop(name, None)
            failures[name] = err
    _check_baseline(failures)
    with progress_bar((cfg.repeats + cfg.warmup) * len(trainers), "model step") as bar:
        samples = round_robin({name: (lambda: None, t.step) for name, t in trainers.items()},
                              cfg.device, cfg.repeats, cfg.warmup, bar.update, failures)
    for name in providers:
        if name not in failures:
            trainer = trainers[name]
            try:
                result = Result(
                    **common, provider=name, seconds=samples[name],
                    ratios=[t / b for t, b in zip(samples[name], samples[BASELINE])],
                    saved_bytes=saved_bytes(trainer.loss, trainer.state()),
                    peak_bytes=peak_bytes(trainer.step, cfg.device), max_error=errors[name])
            except Exception as err:
                failures[name] = err
        if name in failures:
            _check_baseline(failures)
            result = Result(**common, provider=name, seconds=[], ratios=[],
                            error=describe(failures[name]))
        run.add(result)
