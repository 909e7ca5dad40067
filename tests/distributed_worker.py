"""One process of the distributed tests (tests/test_distributed.py), started the way users start
training: ``torchrun`` for DDP and FSDP2, ``accelerate launch`` for Trainer. Not collected by
pytest; the test compares what rank 0 writes with one process on the global batch.

    torchrun --nproc_per_node 2 tests/distributed_worker.py step --modes ddp fsdp2 mixed --out DIR
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py trainer --out DIR

Everything runs in float64 (CPU, gloo) so that sums split across ranks agree with the one-process
sums to ~1e-15; ``--device cuda`` runs the step under NCCL and ``--compare`` has rank 0 check it
against one process itself (bench/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from edora_kernels import EDoRAConfig, get_edora_model

GLOBAL_BATCH = 4
SEQ = 10
VOCAB = 101
CONFIG = EDoRAConfig(r=3, alpha=6.0, target_modules=["c_attn", "c_proj", "c_fc"],
                     task_type="SEQ_CLS", seed=0)


def base_model(device="cpu"):
    """A tiny GPT-2 classifier (Conv1D layers and a ``score`` head), the same in every process."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=SEQ, num_labels=3, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=1,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2ForSequenceClassification(config).to(device, torch.float64)


def edora_model(device="cpu"):
    """The base with EDoRA; R moved off zero so that every gradient is non-trivial."""
    model = get_edora_model(base_model(device), CONFIG)
    with torch.no_grad():
        for i, (name, p) in enumerate(n for n in model.named_parameters() if n[0].endswith(".R")):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    return model


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    return ids.to(device), labels.to(device)


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole, by its name in the unwrapped model (a collective when
    sharded)."""
    return {n.removeprefix("module."): whole(p.detach()).cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def train_step(model, ids, labels, **kwargs) -> dict[str, torch.Tensor]:
    """Loss on this process's rows, backward, one AdamW step; the gradients (whole)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=labels, **kwargs).loss.backward()
    grads = {n.removeprefix("module."): whole(p.grad).cpu().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads


MIXED_NAMES = ["default", "b", "b", "__base__"]  # rank 1 of 2 has no row of "default"


def mixed_model(device="cpu"):
    """The EDoRA model with a second adapter "b" on the same basis, both training together."""
    model = edora_model(device)
    model.add_adapter("b", CONFIG)
    model.set_adapter(["default", "b"])
    with torch.no_grad():  # b's R and head moved off default's, as a trained b would be
        for i, (name, p) in enumerate(model.named_parameters()):
            if ".b." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i),
                                   dtype=p.dtype) * 0.3)
    return model


def run_mixed(out: str) -> None:
    """A batch mixing adapters row by row under DDP: a rank whose rows leave an adapter out
    gives it no gradient, so DDP needs find_unused_parameters=True (it says so itself)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, labels = batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    model = torch.nn.parallel.DistributedDataParallel(mixed_model(), find_unused_parameters=True)
    grads = train_step(model, ids[rows], labels[rows], adapter_names=MIXED_NAMES[rows])
    torch.save({"grads": grads, "world": world}, os.path.join(out, f"mixed_rank{rank}.pt"))


def shard(model, mode):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # the last block stays in the root group: FSDP2 keeps its parameters unsharded after
        # a forward no backward follows, which a save must not read
        for block in model.base_model.transformer.h[:-1]:
            fully_shard(block)
        return fully_shard(model)
    return model


def run_step(mode: str, out: str, device: str, compare: bool) -> None:
    """Gradients and one optimizer step on the global batch split across the ranks, the adapter
    saved from rank 0 and loaded back into a fresh sharded model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out, exist_ok=True)
    ids, labels = batch(device)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    model = shard(edora_model(device), mode)
    grads = train_step(model, ids[rows], labels[rows])
    state = trainable(model)
    adapter_dir = os.path.join(out, f"adapter_{mode}")
    if mode == "ddp":  # DDP's replicas are whole: rank 0 alone saves
        if rank == 0:
            model.module.save_pretrained(adapter_dir)
    else:  # FSDP2 gathers the shards: every rank calls, rank 0 writes
        with torch.no_grad():  # an evaluation first
            model.eval()(ids[rows])
        model.train()
        # a state dict gathered by the caller (as Trainer does): rank 0 alone saves from it,
        # with no collective (the W0 digests come from it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        if rank == 0:
            model.save_pretrained(adapter_dir + "_gathered", state_dict=gathered)
        model.save_pretrained(adapter_dir)
    dist.barrier()
    if mode == "fsdp2" and rank == 0:
        from safetensors.torch import load_file

        for file in ("adapter_model.safetensors", "modules_to_save.safetensors"):
            a = load_file(os.path.join(adapter_dir, file))
            b = load_file(os.path.join(adapter_dir + "_gathered", file))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    resumed = shard(edora_model(device), mode)
    (resumed.module if mode == "ddp" else resumed).load_adapter(adapter_dir, is_trainable=True)
    reloaded = trainable(resumed)
    torch.save({"grads": grads, "state": state, "reloaded": reloaded, "world": world},
               os.path.join(out, f"{mode}_rank{rank}.pt"))
    if compare and rank == 0:
        single = edora_model(device)
        want = {"grads": train_step(single, ids, labels), "state": trainable(single)}
        got = {"grads": grads, "state": state}
        for what in want:
            err = max((got[what][k] - want[what][k]).abs().max().item() for k in want[what])
            print(f"{mode} on {world} process(es), {device}: {what} max |diff| vs one process "
                  f"{err:.1e}")
            assert err < 1e-10, f"{mode}: {what} differ from one process by {err}"
        assert all(torch.equal(reloaded[k], state[k]) for k in state), "reload differs"


def run_trainer(out: str, resume: str | None, max_steps: int) -> None:
    """Trainer (DDP on CPU under accelerate launch): adapter checkpoints every 2 steps."""
    import transformers

    ids, labels = batch()
    data = [{"input_ids": ids[i % GLOBAL_BATCH], "labels": labels[i % GLOBAL_BATCH]}
            for i in range(16)]
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, use_cpu=True, report_to=[], logging_steps=1, seed=0,
        disable_tqdm=True)
    model = edora_model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.args.world_size == int(os.environ.get("WORLD_SIZE", 1))
    if trainer.args.process_index == 0:
        torch.save({"state": trainable(model), "world": trainer.args.world_size,
                    "steps": trainer.state.global_step}, os.path.join(out, "final.pt"))
    if dist.is_initialized():  # Trainer leaves its process group open: close it before exit
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["step", "trainer"])
    parser.add_argument("--modes", nargs="+", choices=["ddp", "fsdp2", "mixed"], default=["ddp"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--resume")
    parser.add_argument("--max-steps", type=int, default=4)
    args = parser.parse_args()
    if args.what == "trainer":
        run_trainer(args.out, args.resume, args.max_steps)
        return
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        os.makedirs(args.out, exist_ok=True)
        for mode in args.modes:
            if mode == "mixed":
                run_mixed(args.out)
            else:
                run_step(mode, args.out, device, args.compare)
        # Tear down together: rank 0 may still be comparing while rank 1 would already close
        # its connections (a gloo worker aborted once at such an uneven exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

