"""What multi-process training needs of the adapter files: a tensor FSDP2 has sharded (a
``DTensor``) gathered whole or written from a whole one, and which process writes a file.

Saving gathers each sharded tensor (a collective: under FSDP2 every rank calls the save, or
passes a state dict gathered already, as Trainer does); only the main process writes. Loading
reads the whole file on every rank and keeps each rank's own shard. Nothing here imports
``torch.distributed.tensor`` before a sharded tensor is met.
"""
from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered whole if it is sharded (a collective), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def sharded_registered(model: torch.nn.Module) -> None:
    """Have FSDP2's sharded parameters registered on every module it wraps in ``model``: after
    a forward that no backward follows (an evaluation) a module keeps its unsharded ones
    registered, whose memory FSDP2 frees, and a read would see freed storage. ``reshard()`` is
    local (no communication)."""
    for module in model.modules():
        if any(c.__name__ == "FSDPModule" for c in type(module).__mro__):
            module.reshard()


def copy_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``value`` is the whole tensor and ``target`` may be one
    rank's shard of it (every rank holds ``value``: no communication)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(device=target.device, dtype=target.dtype),
                                  target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def main_process(is_main_process: bool | None = None) -> bool:
    """Whether this process writes files: ``is_main_process`` when given, else rank 0 of the
    default process group (every process when none is initialised)."""
    if is_main_process is not None:
        return bool(is_main_process)
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
