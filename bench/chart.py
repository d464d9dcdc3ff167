"""One PNG of the medians: latency percentiles, throughput, W5's idle-instance CPU, W4's costs, W2's sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
from matplotlib.typing import HashableList

from .params import P99_LIMIT_MS, Workload

COLOURS = {"ours": "#2b6cb0", "baseline": "#c05621"}
Summary = dict[str, dict[str, dict[str, float]]]
Sweep = dict[str, list[tuple[float, float]]]  # per app: (offered deliveries/s, p99 ms)
LATENCY_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]  # ms, on log axes
THROUGHPUT = {"w1": "deliveries_per_s", "w2": "sustained_deliveries_per_s", "w3": "deliveries_per_s"}


def _values(summary: Summary, labels: list[str], key: str, app: str) -> list[float]:
    return [summary[label][key][app] for label in labels]


def _clean(values: list[float]) -> list[float]:
    return [0.0 if v is None or math.isnan(v) else v for v in values]


def draw(
    summary: Summary, suite: list[Workload], path: Path, caption: str, sweep: Sweep | None = None
) -> None:
    """Draw the panels into `path`; W2's sweep gets the bottom row when there is one."""
    latency = [w.label for w in suite if w.key in ("w1", "w2", "w3", "w5")]
    throughput = [w for w in suite if w.key in THROUGHPUT]
    scaling = [w for w in suite if w.key == "w5"]
    connect = next((w.label for w in suite if w.key == "w4"), None)

    rows: list[HashableList[str]] = [["latency", "throughput"], ["scaling", "connect"]]
    if sweep:
        rows.append(["sweep", "sweep"])
    fig, axes = plt.subplot_mosaic(rows, figsize=(13, 4.25 * len(rows)))
    ax = axes["latency"]
    width = 0.2
    for i, (app, pct) in enumerate(
        (("ours", "p50"), ("ours", "p99"), ("baseline", "p50"), ("baseline", "p99"))
    ):
        xs = [x + (i - 1.5) * width for x in range(len(latency))]
        ax.bar(
            xs,
            _clean(_values(summary, latency, f"{pct}_ms", app)),
            width,
            color=COLOURS[app],
            alpha=1.0 if pct == "p50" else 0.55,
            hatch="" if pct == "p50" else "//",
            label=f"{app} {pct}",
        )
    ax.set_xticks(range(len(latency)), [_short(label) for label in latency], rotation=20)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(LATENCY_TICKS))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency, ms (log)")
    ax.set_title("Delivery latency, p50 and p99")
    ax.legend(fontsize=8)

    ax = axes["throughput"]
    for i, app in enumerate(("ours", "baseline")):
        xs = [x + (i - 0.5) * 0.35 for x in range(len(throughput))]
        ax.bar(
            xs,
            _clean([summary[w.label][THROUGHPUT[w.key]][app] for w in throughput]),
            0.35,
            color=COLOURS[app],
            label=app,
        )
    ax.set_xticks(range(len(throughput)), [_short(w.label) for w in throughput])
    ax.set_ylabel("deliveries/s")
    ax.set_title(f"Throughput (W1, W3 closed loop; W2 highest rate with p99 ≤ {P99_LIMIT_MS:.0f} ms)")
    ax.legend(fontsize=8)

    ax = axes["scaling"]
    sizes = [w.instances for w in scaling]
    for app in ("ours", "baseline"):
        ax.plot(
            sizes,
            _clean(_values(summary, [w.label for w in scaling], "others_cpu_ms_per_1k_emits_sum", app)),
            marker="o",
            color=COLOURS[app],
            label=f"{app}: all other instances together",
        )
        ax.plot(
            sizes,
            _clean(_values(summary, [w.label for w in scaling], "holder_cpu_ms_per_1k_emits", app)),
            marker="s",
            linestyle="--",
            color=COLOURS[app],
            alpha=0.6,
            label=f"{app}: the holder",
        )
    ax.set_xticks(sizes)
    ax.set_xlabel("instances")
    ax.set_ylabel("CPU ms per 1000 emits")
    ax.set_title("W5: emits to users held by one instance")
    ax.legend(fontsize=8, loc="center left")

    ax = axes["connect"]
    if connect is not None:
        keys = [("connects_per_s", "connects/s"), ("kib_per_socket", "RSS KiB/socket")]
        for i, app in enumerate(("ours", "baseline")):
            values = [summary[connect][key][app] for key, _ in keys]
            bars = ax.bar(
                [x + (i - 0.5) * 0.35 for x in range(len(keys))],
                _clean(values),
                0.35,
                color=COLOURS[app],
                label=app,
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(keys)), [name for _, name in keys])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title("W4: opening sockets on one instance")
        ax.legend(fontsize=8)

    if sweep:
        _draw_sweep(axes["sweep"], sweep)

    fig.suptitle("webapp (ours: per-user Redis channels) vs python-socketio AsyncRedisManager (baseline)")
    fig.text(0.5, 0.005, caption, ha="center", fontsize=8, color="#555")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_sweep(ax: Any, sweep: Sweep) -> None:
    """W2: p99 against offered deliveries/s, step by step, up to each app's first failing step."""
    for app, points in sweep.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=COLOURS[app], label=app)
    ax.axhline(P99_LIMIT_MS, color="#888", linestyle=":", label=f"p99 limit {P99_LIMIT_MS:.0f} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Ticks at the steps offered and at round latencies, so the limit line can be read off.
    ax.xaxis.set_major_locator(FixedLocator(sorted({x for points in sweep.values() for x, _ in points})))
    ax.yaxis.set_major_locator(FixedLocator(LATENCY_TICKS))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered deliveries/s (emits/s × sockets, log)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title("W2 broadcast sweep: each app's steps up to its first failing one")
    ax.legend(fontsize=8)


def _short(label: str) -> str:
    return label.replace("W5 instances ", "W5 ").replace("user fan-out", "fan-out")


def caption_for(meta: dict[str, Any]) -> str:
    return (
        f"medians of {meta['runs']} run(s) · {meta['machine']['cpu']} × {meta['machine']['cores']} cores · "
        f"{meta['started']}"
    )
