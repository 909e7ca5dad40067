"""``edora-kernels plot``: one benchmark run as bar charts of the ratio to the baseline (the
frozen linear for the op), one panel per kernel and mode, one group of bars per case, one bar
per provider with its p20-p80 range. Exactly one run, so that a figure shows the very run a
table beside it quotes: a CSV holds every run on its device, told apart by ``timestamp``."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .io import compact_stamp, read_json_rows, read_rows
from .providers import LABELS


def ratio_rows(path: str | Path, run: str | None = None) -> list[dict]:
    """The ratio rows of one run, what ``plot_rows`` draws: from a run's JSON (``*.json``) or a
    bench CSV, the run whose timestamp is ``run`` (as in the rows or in the JSON's file name)
    or by default the latest with ratio rows. ValueError when the file is not a bench CSV or
    JSON, has no such run or a ratio of it is not finite, OSError when it cannot be read."""
    read = read_json_rows if Path(path).suffix.lower() == ".json" else read_rows
    rows = [r for r in read(path) if r["metric"].startswith("ratio_to_")]
    if not rows:
        raise ValueError(f"{path} has no ratio_to_* rows to plot")
    runs = sorted({r["timestamp"] for r in rows})  # ISO 8601: sorted is chronological
    chosen = runs[-1] if run is None else next(
        (stamp for stamp in runs if compact_stamp(run) == compact_stamp(stamp)), None)
    if chosen is None:
        raise ValueError(f"{path} has no run {run!r} with ratio_to_* rows; its runs: "
                         f"{', '.join(runs)}")
    chosen_rows = [r for r in rows if r["timestamp"] == chosen]
    for r in chosen_rows:
        for key in ("p50", "p20", "p80"):
            if not math.isfinite(r[key]):  # no bar to draw, nor an axis to draw it on
                raise ValueError(f"{path}: {r['metric']} of {r['provider']} on {r['x']} "
                                 f"{r['mode']}: {key} is {r[key]}, not a finite number")
    return chosen_rows


def plot_rows(rows: list[dict], out: str | Path) -> Path:
    """Write the PNG of ``ratio_rows`` to ``out`` and return its path."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        panels[(row["kernel"], row["mode"])].append(row)

    # One colour per provider in every panel.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {p: palette[i % len(palette)]
               for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows))}
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, ((kernel, mode), panel) in zip(axes[:, 0], panels.items()):
        cases = list(dict.fromkeys(r["x"] for r in panel))
        providers = list(dict.fromkeys(r["provider"] for r in panel))
        width = 0.8 / max(len(providers), 5)  # a lone case keeps bars of a readable width
        for k, provider in enumerate(providers):
            by_case = {r["x"]: r for r in panel if r["provider"] == provider}
            xs = [i + (k - (len(providers) - 1) / 2) * width
                  for i, c in enumerate(cases) if c in by_case]
            mids = [by_case[c]["p50"] for c in cases if c in by_case]
            spread = [[by_case[c]["p50"] - by_case[c]["p20"] for c in cases if c in by_case],
                      [by_case[c]["p80"] - by_case[c]["p50"] for c in cases if c in by_case]]
            bars = ax.bar(xs, mids, width, yerr=spread, capsize=2, color=colours[provider],
                          label=LABELS.get(provider, provider))
            ax.bar_label(bars, labels=[f"{m:.2f}" for m in mids], fontsize=7, padding=2)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(cases)), cases)
        ax.set_xlim(-0.5, len(cases) - 0.5)
        baseline = panel[0]["metric"].removeprefix("ratio_to_")
        ax.set_ylabel(f"time / {baseline} (lower is better)")
        ax.set_title(f"{kernel}, {mode}, {panel[0]['dtype']}")
        ax.legend(fontsize=8, ncols=min(len(providers), 6), loc="upper left")
        ax.set_ylim(0, max(r["p80"] for r in panel) * 1.25)
    fig.suptitle(f"{rows[0]['device']}, run {rows[0]['timestamp']}  (bars: p50, whiskers: "
                 "p20-p80)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
