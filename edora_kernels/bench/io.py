"""The one CSV schema for every benchmark result in the project, and the run metadata in it.

One row per (kernel, provider, mode, case, metric). Timing rows carry the 50th/20th/80th
percentiles; single-valued metrics (bytes, errors) repeat the value in all three so that every
row reads the same way. ``x`` is the case label a chart puts on its axis; ``shape`` spells the
same case out as ``key=value`` pairs for programs.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import torch

BENCH_COLUMNS = (
    "kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80",
    "shape", "dtype", "device", "versions", "timestamp",
)
_VERSIONED = ("edora-kernels", "torch", "triton", "peft", "transformers")


def append_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Append ``rows`` (dicts with exactly ``BENCH_COLUMNS``) to the CSV at ``path``.

    Writes the header when the file is new; refuses to append to a file with another header,
    so that one file never mixes schemas.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if set(row) != set(BENCH_COLUMNS):
            raise ValueError(f"row keys {sorted(row)} do not match BENCH_COLUMNS {BENCH_COLUMNS}")
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != BENCH_COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {BENCH_COLUMNS}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BENCH_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a benchmark CSV, with p50/p20/p80 as floats."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != BENCH_COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {BENCH_COLUMNS}")
        rows = list(reader)
    for row in rows:
        for key in ("p50", "p20", "p80"):
            row[key] = float(row[key])
    return rows


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def save_run(out_dir: str | os.PathLike, rows: list[dict], payload: dict, *, stamp: str,
             device: torch.device | None = None, json_prefix: str = "bench") -> tuple[Path, Path]:
    """Append ``rows`` to ``<out_dir>/bench_<device>.csv`` and write ``payload`` with the rows
    to ``<out_dir>/<json_prefix>_<device>_<stamp>.json``; return both paths.

    Every benchmark shares the one CSV per device (one schema); the JSON keeps the whole run.
    ``stamp`` is the run's ``timestamp()``, put into the file name without separators.
    """
    out_dir, slug = Path(out_dir), device_slug(device)
    csv_path = append_rows(out_dir / f"bench_{slug}.csv", rows)
    compact = stamp.replace("-", "").replace(":", "").replace(".", "")
    json_path = write_json(out_dir / f"{json_prefix}_{slug}_{compact}.json",
                           {**payload, "rows": rows})
    return csv_path, json_path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | None = None) -> str:
    """The GPU's name, or the CPU model with the thread count torch uses."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device | None = None) -> str:
    """``device_name`` as a file-name part: lower case, letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")[:60]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions(extra: tuple[str, ...] = ()) -> str:
    """``name=version`` pairs of the packages that decide the numbers, ``;``-separated;
    ``extra`` names further distributions (as pip spells them) a benchmark depends on."""
    def version(name: str) -> str:
        try:
            return f"{name}={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{name}=none"

    # extras after cuda: where the init benchmark's rows have always had scikit-learn.
    return ";".join([*map(version, _VERSIONED), f"cuda={torch.version.cuda or 'none'}",
                     *map(version, extra)])


def timestamp() -> str:
    """UTC, ISO 8601, to the millisecond: it names a run, and runs can be a second apart."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
