"""The benchmark engine shared by the op and the model-step benchmarks: results, CSV/JSON
output, the terminal table and the progress bar.

Every measurement becomes a ``Result`` (one provider, one mode, one case). ``Run.add`` appends
its rows to ``<out>/bench_<device>.csv`` (schema: ``io.BENCH_COLUMNS``) as soon as it is
measured; ``report`` writes the whole run to ``<out>/bench_<device>_<time>.json`` at the end,
also after a failure or an interrupt.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .io import append_rows, csv_path, device_name, json_path, timestamp, versions, write_json
from .timing import quantiles

MIB = 2 ** 20
# TFLOP/s counts the frozen base GEMMs only, 2·N·in·out each: one in the forward, two in forward
# plus backward (dx and y; W0 is frozen, so there is no weight-gradient GEMM). The same count for
# every provider, so the column is the useful-work rate.
GEMMS_PER_MODE = {"fwd": 1, "fwd+bwd": 2}
FLOP_NOTE = ("TFLOP/s counts the base GEMMs only: 2*N*in*out each, 1 for fwd, 2 for fwd+bwd "
             "(W0 is frozen: no weight-gradient GEMM); the same count for every provider")


class BenchError(RuntimeError):
    """The benchmark cannot go on (its baseline failed, a dependency is missing); the message is
    the whole story, printed as one line."""


def describe(err: BaseException) -> str:
    """The exception's type and the first line of its message: how a failure is reported."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


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
    launches: int | None = None    # kernels one call would launch on a GPU (bench --host)
    host_syncs: int | None = None  # ops in one call that make the host wait for the device
    error: str | None = None  # ``describe`` of why this provider failed here; no samples then


def _load_average() -> list[float] | None:
    # Other processes' load is the main source of noise on shared machines: keep it with the run.
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


@dataclass
class Run:
    """One invocation: its results, notes for the reader and the settings it ran with; with
    ``out_dir``, ``add`` saves each result's rows as it comes."""
    settings: dict
    out_dir: Path | None = None
    load_average: list[float] | None = field(default_factory=_load_average)
    device: str = field(default_factory=device_name)
    versions: str = field(default_factory=versions)
    timestamp: str = field(default_factory=timestamp)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *results: Result) -> None:
        """Keep ``results`` and append their rows to the CSV now: a later failure or interrupt
        loses nothing measured."""
        self.results += results
        self.notes += [f"failed {r.provider} on {r.x} {r.mode}: {r.error}"
                       for r in results if r.error is not None]
        if self.out_dir is not None:
            append_rows(csv_path(self.out_dir), rows(self, results))


def _metrics(r: Result) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(metric, unit, (p50, p20, p80)) of one result, in CSV order."""
    if r.error is not None:
        return [("error", r.error.partition(":")[0], (math.nan,) * 3)]
    out = [("time_ms", "ms", tuple(q * 1e3 for q in quantiles(r.seconds))),
           (f"ratio_to_{r.baseline}", "x", quantiles(r.ratios))]
    if r.flops is not None:
        out.append(("tflops", "TFLOP/s", quantiles(r.flops / s / 1e12 for s in r.seconds)))
    for metric, unit, value in (("saved_bytes", "bytes", r.saved_bytes),
                                ("peak_bytes", "bytes", r.peak_bytes),
                                ("max_error", "normalised", r.max_error),
                                ("launches", "count", r.launches),
                                ("host_syncs", "count", r.host_syncs)):
        if value is not None:
            out.append((metric, unit, (value,) * 3))
    return out


def rows(run: Run, results: Iterable[Result] | None = None) -> list[dict]:
    """The CSV rows of ``results`` (default: all of the run's), one per result and metric."""
    out = []
    for r in run.results if results is None else results:
        for metric, unit, (p50, p20, p80) in _metrics(r):
            out.append({
                "kernel": r.kernel, "provider": r.provider, "mode": r.mode, "metric": metric,
                "unit": unit, "x": r.x, "p50": p50, "p20": p20, "p80": p80, "shape": r.shape,
                "dtype": r.dtype, "device": run.device, "versions": run.versions,
                "timestamp": run.timestamp,
            })
    return out


def save_json(run: Run) -> Path:
    """Write the whole run, its rows included, to ``<out_dir>/bench_<device>_<time>.json``."""
    return write_json(json_path(run.out_dir, run.timestamp), {
        "device": run.device, "versions": run.versions, "timestamp": run.timestamp,
        "settings": run.settings, "notes": run.notes,
        "load_average": {"start": run.load_average, "end": _load_average()},
        "results": [asdict(r) for r in run.results], "rows": rows(run),
    })


def _spread(p50: float, p20: float, p80: float, fmt: str) -> str:
    return f"{p50:{fmt}} [{p20:{fmt}}-{p80:{fmt}}]"


def format_table(results: list[Result]) -> str:
    """A plain-text table, columns aligned, one line per result."""
    if not results:
        return "(no results)"
    baseline = results[0].baseline
    show_flops = any(r.flops is not None for r in results)
    show_peak = any(r.peak_bytes is not None for r in results)
    show_launches = any(r.launches is not None for r in results)
    header = ["case", "mode", "provider", "ms p50 [p20-p80]", f"x{baseline} p50 [p20-p80]"]
    header += ["TFLOP/s"] * show_flops + ["saved MiB"] + ["peak MiB"] * show_peak + ["max err"]
    header += ["launches", "syncs"] * show_launches
    lines = [header]
    for r in results:
        if r.error is not None:
            lines.append([r.x, r.mode, r.provider, f"failed: {r.error}"])
            continue
        ms = tuple(q * 1e3 for q in quantiles(r.seconds))
        line = [r.x, r.mode, r.provider, _spread(*ms, ".3f"), _spread(*quantiles(r.ratios), ".3f")]
        if show_flops:
            tflops = None if r.flops is None else r.flops / quantiles(r.seconds)[0] / 1e12
            line.append("-" if tflops is None else f"{tflops:.3f}")
        line.append("-" if r.saved_bytes is None else f"{r.saved_bytes / MIB:.2f}")
        if show_peak:
            line.append("-" if r.peak_bytes is None else f"{r.peak_bytes / MIB:.2f}")
        line.append("-" if r.max_error is None else f"{r.max_error:.2e}")
        if show_launches:
            line += ["-" if v is None else str(v) for v in (r.launches, r.host_syncs)]
        lines.append(line)
    # A failure's message runs on past the columns rather than widen them.
    widths = [max(len(line[i]) for line in lines if len(line) == len(header) or i < 3)
              for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def progress_bar(total: int, desc: str) -> tqdm:
    """On stderr, so the table on stdout stays clean; silent when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)


def report(run: Run) -> Path | None:
    """Print the table and notes, write the run's JSON (its rows are in the CSV already) and say
    where both are; None, and no JSON, when nothing was measured."""
    print(f"device: {run.device}")
    print(f"versions: {run.versions}")
    print(format_table(run.results))
    for note in run.notes:
        print(f"note: {note}")
    if not run.results:
        return None
    path = save_json(run)
    print(f"appended {len(rows(run))} rows to {csv_path(run.out_dir)}; run written to {path}")
    return path
