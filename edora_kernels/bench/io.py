"""The one CSV schema for every benchmark result in the project, and the run metadata in it.

One row per (kernel, provider, mode, case, metric). Timing rows carry the 50th/20th/80th
percentiles; single-valued metrics (bytes, errors) repeat the value in all three so that every
row reads the same way. ``x`` is the case label a chart puts on its axis; ``shape`` spells the
same case out as ``key=value`` pairs for programs. A provider that failed on a case gets, per
mode, one row with metric ``error``, the exception's type as unit and NaN values (the message is
in the run's JSON). ``versions`` holds what besides the device decides the numbers (package
versions and, when set, ``OMP_WAIT_POLICY``); ``timestamp`` names the run, whose JSON carries it
in its file name (``compact_stamp``).
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
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


def _check_header(path: Path, header: list[str]) -> None:
    if tuple(header) != BENCH_COLUMNS:
        raise ValueError(f"{path} is not a bench CSV: columns ({', '.join(header)}), expected "
                         f"({', '.join(BENCH_COLUMNS)})")


def check_csv(path: str | os.PathLike) -> None:
    """Raise ValueError unless ``path`` is missing, empty or a CSV with ``BENCH_COLUMNS``: what
    ``append_rows`` can add to."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if path.stat().st_size == 0:
        return
    with path.open(newline="") as f:
        _check_header(path, next(csv.reader(f), []))


def append_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Append ``rows`` (dicts with exactly ``BENCH_COLUMNS``) to the CSV at ``path``.

    Writes the header when the file is new; refuses to append to a file with another header,
    so that one file never mixes schemas. The file is replaced whole (``write_atomically``).
    """
    path = Path(path)
    for row in rows:
        if set(row) != set(BENCH_COLUMNS):
            raise ValueError(f"row keys {sorted(row)} do not match BENCH_COLUMNS {BENCH_COLUMNS}")
    check_csv(path)
    old = path.read_bytes() if path.exists() else b""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=BENCH_COLUMNS)
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, old + text.getvalue().encode())
    return path


def _numbers(row: dict, where: str) -> None:
    """p50/p20/p80 of ``row`` as floats, in place; ValueError naming ``where`` otherwise."""
    for key in ("p50", "p20", "p80"):
        try:
            row[key] = float(row[key])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {key} is not a number: {row[key]!r}") from None


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a benchmark CSV, with p50/p20/p80 as floats; ValueError naming the file (and
    line) when it is not one."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"{path} is empty, expected a CSV written by "
                                 "'edora-kernels bench'")
            _check_header(path, reader.fieldnames)
            rows = list(reader)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    except csv.Error as err:
        raise ValueError(f"{path} is not a valid CSV ({err})") from None
    for line, row in enumerate(rows, start=2):
        # DictReader fills short rows with None and files extra cells under the key None.
        if None in row or None in row.values():
            raise ValueError(f"{path} line {line}: expected {len(BENCH_COLUMNS)} fields")
        _numbers(row, f"{path} line {line}")
    return rows


def read_json_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of one run's JSON (``save_run``, ``results.save_json``), with p50/p20/p80 as
    floats; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path} has no 'rows' list: expected a run's JSON written by "
                         "'edora-kernels bench'")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(BENCH_COLUMNS):
            raise ValueError(f"{path} rows[{i}]: expected the keys ({', '.join(BENCH_COLUMNS)})")
        _numbers(row, f"{path} rows[{i}]")
    return rows


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it to ``path``: an
    interrupt (Ctrl-C, an error) leaves the old file or the new one, never part of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # gone already unless the write was cut short
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """``payload`` as indented JSON, written whole or not at all (``write_atomically``)."""
    return write_atomically(path, (json.dumps(payload, indent=1, default=str) + "\n").encode())


def csv_path(out_dir: str | os.PathLike, device: torch.device | None = None) -> Path:
    """``<out_dir>/bench_<device>.csv``: every benchmark on a device shares it (one schema)."""
    return Path(out_dir) / f"bench_{device_slug(device)}.csv"


def compact_stamp(stamp: str) -> str:
    """A ``timestamp()`` without separators, as run files are named: 20261203T073545965Z."""
    return stamp.replace("-", "").replace(":", "").replace(".", "")


def json_path(out_dir: str | os.PathLike, stamp: str, device: torch.device | None = None,
              prefix: str = "bench") -> Path:
    """``<out_dir>/<prefix>_<device>_<compact stamp>.json``."""
    return Path(out_dir) / f"{prefix}_{device_slug(device)}_{compact_stamp(stamp)}.json"


def save_run(out_dir: str | os.PathLike, rows: list[dict], payload: dict, *, stamp: str,
             device: torch.device | None = None, json_prefix: str = "bench") -> tuple[Path, Path]:
    """Append ``rows`` to ``csv_path(out_dir)`` and write ``payload`` with the rows to
    ``json_path(out_dir, stamp)``; return both paths. The CSV gets every run; the JSON keeps
    the whole of this one."""
    return (append_rows(csv_path(out_dir, device), rows),
            write_json(json_path(out_dir, stamp, device, json_prefix), {**payload, "rows": rows}))


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
    ``extra`` names further distributions (as pip spells them) a benchmark depends on. Last,
    when set, ``OMP_WAIT_POLICY=...``: CPU timings depend on it as much."""
    def version(name: str) -> str:
        try:
            return f"{name}={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{name}=none"

    # extras after cuda: where the init benchmark's rows have always had scikit-learn.
    pairs = [*map(version, _VERSIONED), f"cuda={torch.version.cuda or 'none'}",
             *map(version, extra)]
    if "OMP_WAIT_POLICY" in os.environ:
        pairs.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    return ";".join(pairs)


def timestamp() -> str:
    """UTC, ISO 8601, to the millisecond: it names a run, and runs can be a second apart."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
