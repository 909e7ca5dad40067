"""The benchmark engine shared by the op and the model-step benchmarks: results, CSV/JSON
output, the terminal table and the progress bar.

Every measurement becomes a ``Result`` (one provider, one mode, one case); ``save`` appends its
rows to ``<out>/bench_<device>.csv`` (schema: ``bench_io.BENCH_COLUMNS``) and writes the whole run
to ``<out>/bench_<device>_<time>.json``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .io import device_name, save_run, timestamp, versions
from .timing import quantiles

MIB = 2 ** 20
# TFLOP/s counts the frozen base GEMMs only, 2·N·in·out each: one in the forward, two in forward
# plus backward (dx and y; W0 is frozen, so there is no weight-gradient GEMM). The same count for
# every provider, so the column is the useful-work rate.
GEMMS_PER_MODE = {"fwd": 1, "fwd+bwd": 2}
FLOP_NOTE = ("TFLOP/s counts the base GEMMs only: 2*N*in*out each, 1 for fwd, 2 for fwd+bwd "
             "(W0 is frozen: no weight-gradient GEMM); the same count for every provider")


@dataclass
class Result:
    kernel: str
    provider: str
    mode: str
    x: str                   # the case as a chart labels it
    shape: str               # the case as key=value pairs
    dtype: str
    seconds: list[float]
    ratios: list[float]      # per round: this provider's time / the baseline's in that round
    baseline: str
    flops: float | None = None
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    max_error: float | None = None


def _load_average() -> list[float] | None:
    # Other processes' load is the main source of noise on shared machines: keep it with the run.
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


@dataclass
class Run:
    """One invocation: its results, notes for the reader and the settings it ran with."""
    settings: dict
    load_average: list[float] | None = field(default_factory=_load_average)
    device: str = field(default_factory=device_name)
    versions: str = field(default_factory=versions)
    timestamp: str = field(default_factory=timestamp)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _metrics(r: Result) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(metric, unit, (p50, p20, p80)) of one result, in CSV order."""
    out = [("time_ms", "ms", tuple(q * 1e3 for q in quantiles(r.seconds))),
           (f"ratio_to_{r.baseline}", "x", quantiles(r.ratios))]
    if r.flops is not None:
        out.append(("tflops", "TFLOP/s", quantiles(r.flops / s / 1e12 for s in r.seconds)))
    for metric, unit, value in (("saved_bytes", "bytes", r.saved_bytes),
                                ("peak_bytes", "bytes", r.peak_bytes),
                                ("max_error", "normalised", r.max_error)):
        if value is not None:
            out.append((metric, unit, (value,) * 3))
    return out


def rows(run: Run) -> list[dict]:
    """The CSV rows of ``run``: one per result and metric."""
    out = []
    for r in run.results:
        for metric, unit, (p50, p20, p80) in _metrics(r):
            out.append({
                "kernel": r.kernel, "provider": r.provider, "mode": r.mode, "metric": metric,
                "unit": unit, "x": r.x, "p50": p50, "p20": p20, "p80": p80, "shape": r.shape,
                "dtype": r.dtype, "device": run.device, "versions": run.versions,
                "timestamp": run.timestamp,
            })
    return out


def save(run: Run, out_dir: str | Path) -> tuple[Path, Path]:
    """Append the run's rows to the device's CSV and write the run's JSON; return both paths."""
    return save_run(out_dir, rows(run), {
        "device": run.device, "versions": run.versions, "timestamp": run.timestamp,
        "settings": run.settings, "notes": run.notes,
        "load_average": {"start": run.load_average, "end": _load_average()},
        "results": [asdict(r) for r in run.results],
    }, stamp=run.timestamp)


def _spread(p50: float, p20: float, p80: float, fmt: str) -> str:
    return f"{p50:{fmt}} [{p20:{fmt}}-{p80:{fmt}}]"


def format_table(results: list[Result]) -> str:
    """A plain-text table, columns aligned, one line per result."""
    if not results:
        return "(no results)"
    baseline = results[0].baseline
    show_flops = any(r.flops is not None for r in results)
    show_peak = any(r.peak_bytes is not None for r in results)
    header = ["case", "mode", "provider", "ms p50 [p20-p80]", f"x{baseline} p50 [p20-p80]"]
    header += ["TFLOP/s"] * show_flops + ["saved MiB"] + ["peak MiB"] * show_peak + ["max err"]
    lines = [header]
    for r in results:
        ms = tuple(q * 1e3 for q in quantiles(r.seconds))
        line = [r.x, r.mode, r.provider, _spread(*ms, ".3f"), _spread(*quantiles(r.ratios), ".3f")]
        if show_flops:
            tflops = None if r.flops is None else r.flops / quantiles(r.seconds)[0] / 1e12
            line.append("-" if tflops is None else f"{tflops:.3f}")
        line.append("-" if r.saved_bytes is None else f"{r.saved_bytes / MIB:.2f}")
        if show_peak:
            line.append("-" if r.peak_bytes is None else f"{r.peak_bytes / MIB:.2f}")
        line.append("-" if r.max_error is None else f"{r.max_error:.2e}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def progress_bar(total: int, desc: str) -> tqdm:
    """On stderr, so the table on stdout stays clean; silent when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)


def report(run: Run, out_dir: str | Path) -> tuple[Path, Path]:
    """Print the table and notes, save the run, print where it went."""
    print(f"device: {run.device}")
    print(f"versions: {run.versions}")
    print(format_table(run.results))
    for note in run.notes:
        print(f"note: {note}")
    csv_path, json_path = save(run, out_dir)
    print(f"appended {len(rows(run))} rows to {csv_path}; run written to {json_path}")
    return csv_path, json_path
