"""The basis a model's adapters share, and its fingerprint (docs/DESIGN.md §13).

EDoRA's frozen factors A, B are functions of W0 and the initialisation settings (rank, init,
split, seed), so every adapter trained on one base model can share them; an adapter is then only
R and m. A basis is identified by its **fingerprint**: per adapted layer a SHA-256 of W0's bytes
(dequantized for a quantized base) with its shape, dtype and rank, and the settings. Every saved
adapter records it; an adapter is loaded only onto the basis it was trained on — the model's, or
a second one on the same W0 that the saved tree carries (``base_difference``).

A layer's digest is kept with the stamp of the tensor that carries W0 (its storage, offset,
version: §2's cache rule), so a fingerprint read again — loading or swapping adapters — reads
no W0 unless W0 changed.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from . import bases
from .distributed import is_sharded, whole
from .norm import _same, _stamp

VERSION = 1
_CHUNK_BYTES = 64 << 20


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes (row-major), read to the host in chunks."""
    h = hashlib.sha256()
    flat = t.detach().contiguous().reshape(-1)
    step = max(1, _CHUNK_BYTES // max(flat.element_size(), 1))
    for chunk in flat.split(step):
        # a copy: a numpy view of W0's own storage would pin it (FSDP2 frees and regrows the
        # storage of an unsharded parameter)
        h.update(chunk.to("cpu", copy=True).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weight_digest(layer: nn.Module, gathered: torch.Tensor | None = None) -> str:
    """The digest of ``layer``'s W0, cached on the layer while W0 keeps its stamp. A sharded
    W0 (FSDP2) whose digest is not cached is gathered (a collective), or taken from
    ``gathered``, the base weight from a state dict the caller gathered (not cached: every rank
    keeps the same cache, so later collectives still match)."""
    stamped = bases.stamped_weight(layer.base_layer, layer.kind)
    if stamped.device.type == "meta":
        return "meta"
    if getattr(layer, "merged", False):  # the W0 merge() folded the adapter into
        return layer._digest_before_merge
    cached = getattr(layer, "_weight_digest", None)
    if is_sharded(stamped):  # FSDP2: a frozen W0 keeps the digest it had when whole
        if cached is None and gathered is not None and layer.kind.dense:
            return _digest(gathered.T if layer.kind is bases.CONV1D else gathered)
        if cached is None:
            layer._weight_digest = (None, _digest(whole(layer.base_weight())))
        return layer._weight_digest[1]
    if cached is not None and cached[0] is not None and _same(cached[0], stamped):
        return cached[1]
    stamp = _stamp(stamped)
    digest = _digest(layer.base_weight())
    layer._weight_digest = (stamp, digest)
    return digest


def keep_digest(layer: nn.Module, digest: str) -> None:
    """``digest`` stands for ``layer``'s W0 as it is now: unmerge() restores W0 from what
    merge() kept, to rounding (~1e-8), and the base model is the one the digest names."""
    layer._weight_digest = (_stamp(bases.stamped_weight(layer.base_layer, layer.kind)), digest)


def fingerprint(layers: dict[str, nn.Module], *, init: str, split: str = "u",
                seed: int | None, ranks: dict[str, int] | None = None,
                state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The basis of ``layers`` (name → EDoRA layer) as a JSON-able dict: the settings, each
    layer's W0 digest, shape, dtype and rank (``ranks[name]``, else the layer's own), and one
    ``digest`` over all of it."""
    ranks, state = ranks or {}, state_dict or {}
    per_layer = {name: {"shape": [layer.out_features, layer.in_features],
                        "dtype": str(bases.weight_dtype(layer.base_layer, layer.kind)),
                        "rank": ranks.get(name, layer.rank),
                        "weight": weight_digest(layer, state.get(f"{name}.base_layer.weight"))}
                 for name, layer in sorted(layers.items())}
    settings = {"version": VERSION, "init": init, "split": split, "seed": seed}
    h = hashlib.sha256(repr((sorted(settings.items()),
                             [(n, sorted(v.items())) for n, v in per_layer.items()])).encode())
    return {**settings, "digest": h.hexdigest()[:32], "layers": per_layer}


def difference(saved: dict, current: dict) -> str | None:
    """Why an adapter saved on basis ``saved`` does not fit ``current``: the first setting or
    layer that differs, or None when they are the same basis."""
    if saved.get("digest") == current.get("digest"):
        return None
    for key in ("version", "init", "split", "seed"):
        if saved.get(key) != current.get(key):
            return f"{key}: adapter {saved.get(key)!r}, model {current.get(key)!r}"
    return base_difference(saved, current, ("rank",)) or "the digests differ"


def base_difference(saved: dict, current: dict, also: tuple[str, ...] = ()) -> str | None:
    """The first adapted layer of ``saved`` and ``current`` whose base differs — missing from
    one of them, another shape, dtype or W0 — (or whose ``also`` fields differ), or None: an
    adapter of such a basis was trained on the same base model, with other settings."""
    for name in sorted(set(saved["layers"]) | set(current["layers"])):
        a, b = saved["layers"].get(name), current["layers"].get(name)
        if a is None or b is None:
            where = "the model" if b is None else "the adapter"
            return f"layer {name!r} is not in {where}"
        for key in ("shape", "dtype", *also, "weight"):
            if a[key] != b[key]:
                what = "W0's bytes" if key == "weight" else key
                return f"layer {name!r}: {what} differ (adapter {a[key]}, model {b[key]})"
    return None
