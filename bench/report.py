"""Medians over repetitions, the ours/baseline table, and the correctness verdict."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .params import Workload

Record = dict[str, Any]  # {"rep", "app", "workload", "key", "ok", "metrics", "error"}
FAULTS = ("lost", "duplicated", "misdelivered", "rest_failures")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher", "lower" or "" (informative)
    digits: int = 1


_DELIVERY = [
    Metric("deliveries_per_s", "deliveries/s", "higher", 0),
    Metric("p50_ms", "p50 latency ms", "lower", 2),
    Metric("p99_ms", "p99 latency ms", "lower", 2),
    Metric("max_ms", "max latency ms", "lower", 1),
    Metric("server_cpu_us_per_delivery", "server CPU µs/delivery", "lower", 0),
]
SHOWN: dict[str, list[Metric]] = {
    "w1": _DELIVERY,
    "w2": _DELIVERY,
    "w3": _DELIVERY,
    "w4": [
        Metric("connects_per_s", "connects/s", "higher", 0),
        Metric("connect_p50_ms", "connect p50 ms", "lower", 1),
        Metric("connect_p99_ms", "connect p99 ms", "lower", 1),
        Metric("kib_per_socket", "RSS KiB/socket", "lower", 1),
    ],
    "w5": [
        Metric("deliveries_per_s", "deliveries/s", "higher", 0),
        Metric("p50_ms", "p50 latency ms", "lower", 2),
        Metric("p99_ms", "p99 latency ms", "lower", 2),
        Metric("holder_cpu_ms_per_1k_emits", "holder CPU ms/1k emits", "lower", 0),
        Metric("other_cpu_pct", "each other instance CPU %", "lower", 2),
        Metric("others_cpu_ms_per_1k_emits_sum", "all others CPU ms/1k emits", "lower", 0),
    ],
}


def median_of(records: list[Record], app: str, label: str, key: str) -> float:
    values = [
        r["metrics"][key]
        for r in records
        if r["app"] == app and r["workload"] == label and r["ok"] and r["metrics"].get(key) is not None
    ]
    return statistics.median(values) if values else math.nan


def fault_total(records: list[Record], app: str, label: str, key: str) -> int:
    return sum(
        int(r["metrics"].get(key) or 0)
        for r in records
        if r["app"] == app and r["workload"] == label and r["ok"]
    )


def summarise(records: list[Record], suite: list[Workload]) -> dict[str, dict[str, dict[str, float]]]:
    """{workload label: {metric: {"ours", "baseline", "ratio"}}}, medians; fault counts are totals."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for workload in suite:
        rows: dict[str, dict[str, float]] = {}
        for metric in SHOWN[workload.key]:
            ours = median_of(records, "ours", workload.label, metric.key)
            base = median_of(records, "baseline", workload.label, metric.key)
            rows[metric.key] = {"ours": ours, "baseline": base, "ratio": _ratio(ours, base)}
        for key in FAULTS:
            rows[key] = {app: fault_total(records, app, workload.label, key) for app in ("ours", "baseline")}
        summary[workload.label] = rows
    return summary


def _ratio(ours: float, base: float) -> float:
    if math.isnan(ours) or math.isnan(base) or base == 0:
        return math.nan
    return ours / base


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def table(
    summary: dict[str, dict[str, dict[str, float]]], suite: list[Workload], markdown: bool = False
) -> str:
    """The results as text (or a Markdown table): medians, ratio ours/baseline, fault totals."""
    header = ["workload", "metric", "ours", "baseline", "ours/baseline"]
    lines: list[list[str]] = []
    for workload in suite:
        rows = summary[workload.label]
        for metric in SHOWN[workload.key]:
            row = rows[metric.key]
            arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")
            lines.append(
                [
                    workload.label,
                    metric.label + arrow,
                    _fmt(row["ours"], metric.digits),
                    _fmt(row["baseline"], metric.digits),
                    _fmt(row["ratio"], 2),
                ]
            )
        faults = [f"{rows['lost'][app]:.0f} / {rows['duplicated'][app]:.0f}" for app in ("ours", "baseline")]
        lines.append([workload.label, "lost / duplicated (total)", *faults, ""])
    if markdown:
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += [
            "| "
            + " | ".join(["" if i and lines[i - 1][0] == cells[0] else f"**{cells[0]}**", *cells[1:]])
            + " |"
            for i, cells in enumerate(lines)
        ]
        return "\n".join(md)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out: list[str] = [render(header), render(["-" * w for w in widths])]
    previous: str | None = None
    for cells in lines:
        label = cells[0]
        if previous is not None and label != previous:
            out.append("")
        out.append(render(["" if label == previous else label, *cells[1:]]))
        previous = label
    return "\n".join(out)


def failures(records: list[Record]) -> list[str]:
    """Every crash, loss, duplicate, misdelivery or refused emit, one line each."""
    problems = []
    for r in records:
        where = f"run {r['rep'] + 1} {r['workload']} {r['app']}"
        if not r["ok"]:
            problems.append(f"{where}: {r.get('error', 'failed')}")
            continue
        faults = {key: r["metrics"].get(key) or 0 for key in FAULTS}
        if any(faults.values()):
            problems.append(f"{where}: " + ", ".join(f"{k}={v}" for k, v in faults.items() if v))
    return problems
