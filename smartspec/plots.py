"""Figures of a load run."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def latencies(requests: list[dict], path: Path) -> None:
    """Histogram and CDF of end-to-end latency and TTFT over the requests that succeeded."""
    # Figure + Agg canvas instead of pyplot: no global backend switch for the host process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    hist, cdf = fig.subplots(1, 2)
    series = {
        label: np.sort([r[name] for r in requests if r["error"] is None and r[name] is not None])
        for name, label in (("e2e_ms", "E2E"), ("ttft_ms", "TTFT"))
    }
    everything = np.concatenate(list(series.values()))
    # Shared bins, so the two histograms compare bar for bar.
    bins = np.histogram_bin_edges(everything, bins=30) if everything.size else 30
    for label, values in series.items():
        if values.size:
            hist.hist(values, bins=bins, alpha=0.6, label=label)
            cdf.plot(values, np.arange(1, values.size + 1) / values.size, drawstyle="steps-post", label=label)
    for ax, ylabel in ((hist, "requests"), (cdf, "fraction of requests")):
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel(ylabel)
        if ax.has_data():
            ax.legend()
    hist.set_title("Latency histogram")
    cdf.set_title("Latency CDF")
    fig.savefig(path, dpi=100)
