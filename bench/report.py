"""Medians over repetitions, the ours/baseline table, recovery on against off, and the verdicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .params import LOADGEN_BOUND_PCT, P99_LIMIT_MS, Workload
from .workloads import FAULTS

Record = dict[str, Any]  # {"rep", "app", "workload", "key", "ok", "metrics", "error"}
Summary = dict[str, dict[str, dict[str, float]]]
APPS = ("ours", "baseline")
REFERENCE = "node"  # bench/reference, with --reference: in the table beside the two, not in the chart


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher", "lower" or "" (informative)
    digits: int = 1
    # A sweep's result: 0 means "below the lowest step", whose value this metric key holds.
    floor: str = ""
    compare: bool = True  # False: a figure of each app, no ratio (e.g. the load generator's CPU)


_DELIVERY = [
    Metric("deliveries_per_s", "deliveries/s", "higher", 0),
    Metric("p50_ms", "p50 latency ms", "lower", 2),
    Metric("p99_ms", "p99 latency ms", "lower", 2),
    Metric("max_ms", "max latency ms", "lower", 1),
    Metric("server_cpu_us_per_delivery", "server CPU µs/delivery", "lower", 0),
]
def _client_cpu(key: str, when: str, what: str) -> Metric:
    """The load generator's CPU (% of its one core), shown per app: at LOADGEN_BOUND_PCT or more,
    the client, not the server, set the figure beside it."""
    return Metric(key, f"load generator CPU % {when} (≥ {LOADGEN_BOUND_PCT:.0f}: it set {what})", "", 0, compare=False)


# Each app at half of its own saturation: the emits/s differ between the apps.
_HALF_LOAD = [
    Metric("half_load_rate", "half-load emits/s", "", 0),
    Metric("half_load_p99_ms", "p99 ms at half load", "lower", 2),
]
SHOWN: dict[str, list[Metric]] = {
    "w1": _DELIVERY + _HALF_LOAD,
    "w2": [
        Metric(
            "sustained_deliveries_per_s",
            f"sustained deliveries/s, p99 ≤ {P99_LIMIT_MS:.0f} ms",
            "higher",
            0,
            floor="lowest_offered_deliveries_per_s",
        ),
        # From the highest passing rate, else the lowest rate: not the same rate for both apps.
        Metric("p50_ms", "p50 ms at that rate", "lower", 2),
        Metric("p99_ms", "p99 ms at that rate", "lower", 2),
        Metric("max_ms", "max ms at that rate", "lower", 1),
        Metric("server_cpu_us_per_delivery", "server CPU µs/delivery at that rate", "lower", 0),
        # The same rate for both apps: what the CPU goal is judged on (see with_common_rate).
        Metric("common_rate", "common rate, emits/s (highest all runs sustained)", "", 0, compare=False),
        Metric("common_cpu_us_per_delivery", "server CPU µs/delivery at the common rate", "lower", 0),
        _client_cpu("stop_loadgen_cpu_pct", "where the sweep stopped", "the limit"),
    ],
    "w3": _DELIVERY + _HALF_LOAD,
    "w1b": _DELIVERY + _HALF_LOAD,
    "w3f": _DELIVERY
    + _HALF_LOAD
    + [
        Metric("one_in_flight_p50_ms", "p50 ms, one in flight", "lower", 2),
        Metric("one_in_flight_p99_ms", "p99 ms, one in flight", "lower", 2),
    ],
    "w6": _DELIVERY,
    "w4": [
        Metric("connects_per_s", "connects/s", "higher", 0),
        Metric("connect_p50_ms", "connect p50 ms", "lower", 1),
        Metric("connect_p99_ms", "connect p99 ms", "lower", 1),
        Metric("server_cpu_us_per_connect", "server CPU µs/connect", "lower", 0),
        _client_cpu("loadgen_cpu_pct", "while connecting", "the pace"),
        Metric("kib_per_socket", "RSS KiB/socket", "lower", 1),
        Metric("idle_cpu_us_per_socket_s", "server CPU µs/s per idle socket", "lower", 2),
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


def values_of(records: list[Record], app: str, label: str, key: str) -> list[float]:
    return [
        r["metrics"][key]
        for r in records
        if r["app"] == app and r["workload"] == label and r["ok"] and r["metrics"].get(key) is not None
    ]


def median_of(records: list[Record], app: str, label: str, key: str) -> float:
    values = values_of(records, app, label, key)
    return statistics.median(values) if values else math.nan


def spread_of(records: list[Record], app: str, label: str, key: str) -> float:
    """Half the range of the runs, in % of their median: the ± the table prints (NaN for one run)."""
    values = values_of(records, app, label, key)
    if len(values) < 2 or not statistics.median(values):
        return math.nan
    return (max(values) - min(values)) / 2 / abs(statistics.median(values)) * 100


def fault_total(records: list[Record], app: str, label: str, key: str) -> int:
    return sum(
        int(r["metrics"].get(key) or 0)
        for r in records
        if r["app"] == app and r["workload"] == label and r["ok"]
    )


def summarise(records: list[Record], suite: list[Workload]) -> Summary:
    """{workload label: {metric: {"ours", "baseline", "ratio"}}}, medians; fault counts are totals.

    A sweep's row may also hold "ratio_low" and/or "ratio_high": the ratio is only known to lie
    above or below them, when an app passed none of the sweep's steps.
    """
    summary: Summary = {}
    records = with_common_rate(records, suite)
    for workload in suite:
        rows: dict[str, dict[str, float]] = {}
        reference = any(r["app"] == REFERENCE and r["workload"] == workload.label for r in records)
        for metric in SHOWN[workload.key]:
            ours = median_of(records, "ours", workload.label, metric.key)
            base = median_of(records, "baseline", workload.label, metric.key)
            rows[metric.key] = {"ours": ours, "baseline": base, "ratio": _ratio(ours, base)}
            apps = (*APPS, REFERENCE) if reference else APPS
            for app in apps:
                rows[metric.key][f"spread_{app}"] = spread_of(records, app, workload.label, metric.key)
            if reference:
                node = median_of(records, REFERENCE, workload.label, metric.key)
                rows[metric.key].update({REFERENCE: node, "ratio_node": _ratio(ours, node)})
            if metric.floor:
                floor = median_of(records, "ours", workload.label, metric.floor)
                if math.isnan(floor):
                    floor = median_of(records, "baseline", workload.label, metric.floor)
                rows[metric.key].update(_bounds(ours, base, floor), floor=floor)
                rows[metric.key].update(_open_bounds(records, workload.label, ours, base))
        for key in FAULTS:
            apps = (*APPS, REFERENCE) if reference else APPS
            rows[key] = {app: fault_total(records, app, workload.label, key) for app in apps}
        summary[workload.label] = rows
    return summary


def with_common_rate(records: list[Record], suite: list[Workload]) -> list[Record]:
    """The records, W2's with its figures at one rate common to every run of both apps.

    Each app's sweep reports its own highest passing step, so their CPU per delivery comes from
    different rates (and a busier server spends less per delivery). The common rate is the highest
    that every run of both apps sustained, else the lowest step (every run measured it).
    """
    out = list(records)
    for workload in (w for w in suite if w.key == "w2"):
        runs = [
            i for i, r in enumerate(out) if r["workload"] == workload.label and r["ok"] and r["app"] in APPS
        ]
        if not runs:
            continue
        steps = [out[i]["metrics"]["steps"] for i in runs]
        passed = set.intersection(*({s["rate"] for s in run if s.get("pass")} for run in steps))
        rate = max(passed) if passed else min(workload.params["rates"])
        for i, run in zip(runs, steps):
            step = next((s for s in run if s["rate"] == rate), None)
            cpu = step.get("server_cpu_us_per_delivery") if step else None
            out[i] = {
                **out[i],
                "metrics": {**out[i]["metrics"], "common_rate": rate, "common_cpu_us_per_delivery": cpu},
            }
    return out


def _open_bounds(records: list[Record], label: str, ours: float, base: float) -> dict[str, float]:
    """A sweep that never reached the server's limit (every step passed, or the load generator was
    saturated where it stopped) gives a lower bound for that app: the ratio becomes a bound too."""

    def open_above(app: str) -> bool:
        flags = [
            bool(r["metrics"].get("sweep_capped") or r["metrics"].get("loadgen_bound"))
            for r in records
            if r["app"] == app and r["workload"] == label and r["ok"]
        ]
        return sum(flags) * 2 > len(flags)

    if math.isnan(ours) or math.isnan(base) or ours == 0 or base == 0:
        return {}
    ours_open, base_open = open_above("ours"), open_above("baseline")
    if ours_open and base_open:
        return {"ratio_low": 0.0, "ratio_high": math.inf, "open": 1.0}
    if ours_open:
        return {"ratio_low": ours / base}
    if base_open:
        return {"ratio_high": ours / base}
    return {}


def _ratio(ours: float, base: float) -> float:
    if math.isnan(ours) or math.isnan(base) or base == 0:
        return math.nan
    return ours / base


def _bounds(ours: float, base: float, floor: float) -> dict[str, float]:
    """An app that passed no step is somewhere below `floor`: the ratio is then a bound, not a value."""
    if not floor > 0 or math.isnan(ours) or math.isnan(base):
        return {}
    if ours == 0 and base == 0:
        return {"ratio_low": 0.0, "ratio_high": math.inf}
    if base == 0:
        return {"ratio_low": ours / floor}
    if ours == 0:
        return {"ratio_high": floor / base}
    return {}


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _cell(row: dict[str, float], app: str, digits: int) -> str:
    # A sweep's 0 means "not even the lowest step": say below what.
    if row.get("floor", 0) > 0 and row[app] == 0:
        return f"< {row['floor']:,.{digits}f}"
    spread = row.get(f"spread_{app}", math.nan)
    text = _fmt(row[app], digits)
    # The spread across runs: ± half their range, in % of the median.
    return text if math.isnan(spread) or text == "—" else f"{text} ±{spread:.0f}%"


def _ratio_text(row: dict[str, float]) -> str:
    if "ratio_low" in row and "ratio_high" in row:
        return "neither limit reached" if row.get("open") else "none passes"
    if "ratio_low" in row:
        return f"> {row['ratio_low']:.2f}"
    if "ratio_high" in row:
        return f"< {row['ratio_high']:.2f}"
    return _fmt(row["ratio"], 2)


def table(summary: Summary, suite: list[Workload], markdown: bool = False) -> str:
    """The results as text (or a Markdown table): medians ± their spread, ratio ours/baseline,
    fault totals; with the Node reference, its medians and ours/node too."""
    shown = [w for w in suite if not w.recover]  # recovery-on runs: in recovery_table instead
    reference = any(REFERENCE in summary[w.label]["lost"] for w in shown)
    header = ["workload", "metric", "ours", "baseline", "ours/baseline"]
    if reference:
        header += [REFERENCE, f"ours/{REFERENCE}"]
    lines: list[list[str]] = []
    for workload in shown:
        rows = summary[workload.label]
        with_node = REFERENCE in rows["lost"]
        for metric in SHOWN[workload.key]:
            row = rows[metric.key]
            arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")
            cells = [
                workload.label,
                metric.label + arrow,
                _cell(row, "ours", metric.digits),
                _cell(row, "baseline", metric.digits),
                _ratio_text(row) if metric.compare else "",
            ]
            if reference:
                cells += (
                    [_cell(row, REFERENCE, metric.digits), _fmt(row["ratio_node"], 2)] if with_node else ["", ""]
                )
            lines.append(cells)
        faults = [f"{rows['lost'][app]:.0f} / {rows['duplicated'][app]:.0f}" for app in APPS]
        cells = [workload.label, "lost / duplicated (total)", *faults, ""]
        if reference:
            node = rows["lost"].get(REFERENCE)
            cells += [f"{node:.0f} / {rows['duplicated'][REFERENCE]:.0f}" if node is not None else "", ""]
        lines.append(cells)
    return _grouped(header, lines, markdown)


def _grouped(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    """A table whose first column names a group of rows, shown once per group."""
    if markdown:
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += [
            "| "
            + " | ".join(["" if i and lines[i - 1][0] == cells[0] else f"**{cells[0]}**", *cells[1:]])
            + " |"
            for i, cells in enumerate(lines)
        ]
        return "\n".join(md)
    widths = _widths(header, lines)
    out: list[str] = [_align(header, widths, 2), _align(["-" * w for w in widths], widths, 2)]
    previous: str | None = None
    for cells in lines:
        label = cells[0]
        if previous is not None and label != previous:
            out.append("")
        out.append(_align(["" if label == previous else label, *cells[1:]], widths, 2))
        previous = label
    return "\n".join(out)


def _widths(header: list[str], lines: list[list[str]]) -> list[int]:
    return [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]


def _align(cells: list[str], widths: list[int], left: int) -> str:
    """One plain-text row: the first `left` columns flush left, the rest flush right."""
    cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(cells).rstrip()


@dataclass(frozen=True)
class Goal:
    """One target of the issue, judged on the medians of this run."""

    text: str
    key: str  # the workload
    metric: str
    limit: float
    higher: bool  # the figure must be at least (True) or at most (False) `limit`
    absolute: bool = False  # ours alone (in `unit`), not the ratio ours/baseline
    unit: str = "ms"


# The second performance round's goals (issue 13), and the first round's that it did not raise.
GOALS = [
    Goal("W1 deliveries/s at saturation ≥ 2×", "w1", "deliveries_per_s", 2.0, True),
    Goal("W1 server CPU per delivery ≤ 0.5×", "w1", "server_cpu_us_per_delivery", 0.5, False),
    Goal("W2 server CPU per delivery at a common rate ≤ 0.25×", "w2", "common_cpu_us_per_delivery", 0.25, False),
    Goal(
        f"W2 sustained deliveries/s (p99 ≤ {P99_LIMIT_MS:.0f} ms) ≥ 3×",
        "w2",
        "sustained_deliveries_per_s",
        3.0,
        True,
    ),
    # W3's deliveries/s counts the far copies only, one per emit: it is emits/s.
    Goal("W3 emits/s at saturation ≥ 2×", "w3", "deliveries_per_s", 2.0, True),
    Goal("W1 p99 at half of our saturation ≤ 10 ms", "w1", "half_load_p99_ms", 10.0, False, absolute=True),
    Goal("W3 p99 at half of our saturation ≤ 10 ms", "w3", "half_load_p99_ms", 10.0, False, absolute=True),
    # Half of what the seed's Node app delivered on this machine (111,000/s).
    Goal("W3f deliveries/s ≥ 55,000", "w3f", "deliveries_per_s", 55_000, True, absolute=True, unit="/s"),
    Goal("W3f p99 at one emit in flight ≤ 3 ms", "w3f", "one_in_flight_p99_ms", 3.0, False, absolute=True),
    Goal("W4 memory per idle connection ≤ 0.75×", "w4", "kib_per_socket", 0.75, False),
    Goal("W4 connects/s ≥ 1.5×", "w4", "connects_per_s", 1.5, True),
]
OTHER_SHARE_LIMIT = 5.0  # W5: % of the holder's CPU per emit that any other instance may spend


def targets(summary: Summary, records: list[Record], suite: list[Workload]) -> list[list[str]]:
    """[target, what this run measured, "met" / "not met" / "unknown" / "no data"] per target."""
    labels = {w.key: w.label for w in suite if w.key != "w5" and not w.recover}
    rows = []
    for goal in (g for g in GOALS if g.key in labels):
        figures = summary[labels[goal.key]]
        measured, verdict = _judge(goal, figures[goal.metric])
        if goal.metric == "sustained_deliveries_per_s":
            measured += _saturated_client(figures["stop_loadgen_cpu_pct"], "where {} stopped", "CPU per delivery")
        elif goal.metric == "connects_per_s":
            measured += _saturated_client(figures["loadgen_cpu_pct"], "connecting to {}", "CPU per connect")
        rows.append([goal.text, measured, verdict])
    sizes = [w for w in suite if w.key == "w5"]
    if sizes:
        rows.append(_w5_target(records, sizes))
    rows += [_recovery_target(pair) for pair in recovery(records, suite)]
    rows.append(_correctness_target(records))
    return rows


# --- connection state recovery: ours with recovery on against ours with recovery off -------------

RECOVERY_CPU_LIMIT = 1.25  # the bar: server CPU per delivery, on / off
_CPU = "server_cpu_us_per_delivery"
_RECOVERY_SHOWN = [
    Metric("deliveries_per_s", "deliveries/s", "higher", 0),
    Metric("p50_ms", "p50 latency ms", "lower", 2),
    Metric("p99_ms", "p99 latency ms", "lower", 2),
    Metric(_CPU, "server CPU µs/delivery", "lower", 0),
]
_RECOVERY_FAULTS = ("lost", "duplicated", "misdelivered", "offset_faults")


def _compared(metrics: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """The figures of one run that recovery on and off are compared on (W2: one step's)."""
    if rate is not None:
        metrics = next(step for step in metrics["steps"] if step["rate"] == rate)
        metrics = {**metrics, "deliveries_per_s": metrics["achieved_deliveries_per_s"]}
    return {m.key: metrics.get(m.key) for m in _RECOVERY_SHOWN}


def _common_rate(off: dict[str, Any], on: dict[str, Any]) -> float | None:
    """W2: the highest sweep step both runs measured (their sweeps may stop at different steps)."""
    rates = [{step["rate"] for step in m.get("steps", []) if step.get(_CPU) is not None} for m in (off, on)]
    return max(rates[0] & rates[1], default=None)


def recovery(records: list[Record], suite: list[Workload]) -> list[dict[str, Any]]:
    """Per workload run with recovery on: its runs paired with the recovery-off runs of the same
    repetition (ours), the medians of both and their ratio on / off.

    W2's figures come from the highest step both runs of a pair measured, so a pair compares the
    same rate (its sweep reports the highest passing step, which may differ between on and off).
    """
    pairs = []
    for on_w in (w for w in suite if w.recover):
        off_w = next((w for w in suite if w.group == on_w.group and not w.recover), None)
        if off_w is None:
            continue
        ours = {
            (r["workload"], r["rep"]): r
            for r in records
            if r["app"] == "ours" and r["workload"] in (on_w.label, off_w.label)
        }
        runs = []
        for rep in sorted({rep for _, rep in ours}):
            off, on = ours.get((off_w.label, rep)), ours.get((on_w.label, rep))
            if off is None or on is None or not (off["ok"] and on["ok"]):
                continue
            rate = _common_rate(off["metrics"], on["metrics"]) if "steps" in off["metrics"] else None
            if "steps" in off["metrics"] and rate is None:
                continue
            run = {
                "rep": rep,
                "rate": rate,
                "off": _compared(off["metrics"], rate),
                "on": _compared(on["metrics"], rate),
            }
            run["cpu_ratio"] = _ratio(_num(run["on"][_CPU]), _num(run["off"][_CPU]))
            runs.append(run)
        medians = {
            side: {m.key: _median([_num(run[side][m.key]) for run in runs]) for m in _RECOVERY_SHOWN}
            for side in ("off", "on")
        }
        faults = {
            side: {key: fault_total(records, "ours", w.label, key) for key in _RECOVERY_FAULTS}
            for side, w in (("off", off_w), ("on", on_w))
        }
        pairs.append(
            {
                "workload": off_w.label,
                "key": on_w.key,
                "runs": runs,
                **medians,
                "ratio": {
                    m.key: _ratio(medians["on"][m.key], medians["off"][m.key]) for m in _RECOVERY_SHOWN
                },
                # Paired within a repetition, so drift between repetitions cancels: informative,
                # the verdict is on the ratio of the medians like every other figure here.
                "run_cpu_ratio_median": _median([run["cpu_ratio"] for run in runs]),
                "faults": faults,
                "checks": {
                    key: sum(
                        int(r["metrics"].get(key) or 0)
                        for r in records
                        if r["app"] == "ours" and r["workload"] == on_w.label and r["ok"]
                    )
                    for key in ("offsets_seen", "recoverable_sockets")
                },
            }
        )
    return pairs


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _rates_text(pair: dict[str, Any]) -> str:
    rates = sorted({run["rate"] for run in pair["runs"] if run["rate"] is not None})
    return ", ".join(f"{rate:g}" for rate in rates)


def recovery_table(pairs: list[dict[str, Any]], markdown: bool = False) -> str:
    """Recovery off and on (ours), medians of the paired runs, and the ratio on / off."""
    header = ["workload", "metric", "recovery off", "recovery on", "on/off"]
    lines: list[list[str]] = []
    for pair in pairs:
        label = pair["workload"]
        if pair["key"] == "w2":
            lines.append([label, "compared at emits/s (highest step both ran)", _rates_text(pair), "", ""])
        for metric in _RECOVERY_SHOWN:
            arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")
            lines.append(
                [
                    label,
                    metric.label + arrow,
                    _fmt(pair["off"][metric.key], metric.digits),
                    _fmt(pair["on"][metric.key], metric.digits),
                    _fmt(pair["ratio"][metric.key], 2),
                ]
            )
        per_run = ", ".join(_fmt(run["cpu_ratio"], 2) for run in pair["runs"]) or "—"
        if len(pair["runs"]) > 1:
            per_run += f" (median {_fmt(pair['run_cpu_ratio_median'], 2)})"
        lines.append([label, "CPU/delivery on/off, each run", "", "", per_run])
        faults = [
            " / ".join(str(pair["faults"][side][key]) for key in _RECOVERY_FAULTS) for side in ("off", "on")
        ]
        lines.append([label, "lost / dup. / misdel. / offset faults", *faults, ""])
        lines.append([label, "offsets checked (recovery on)", "", f"{pair['checks']['offsets_seen']:,}", ""])
    return _grouped(header, lines, markdown)


def _recovery_target(pair: dict[str, Any]) -> list[str]:
    text = f"{pair['key'].upper()} recovery on: CPU per delivery ≤ {RECOVERY_CPU_LIMIT:g}× off"
    ratio = pair["ratio"][_CPU]
    if math.isnan(ratio):
        return [text, "—", "no data"]
    measured = f"{ratio:.2f}×"
    if len(pair["runs"]) > 1:
        measured += " (runs " + ", ".join(_fmt(run["cpu_ratio"], 2) for run in pair["runs"]) + ")"
    if pair["key"] == "w2":
        measured += f" at {_rates_text(pair)} emits/s"
    return [text, measured, "met" if ratio <= RECOVERY_CPU_LIMIT else "not met"]


def _saturated_client(row: dict[str, float], where: str, instead: str) -> str:
    """Say so where the load generator, not the server, set an app's limit (W2's sweep, W4)."""
    bound = [app for app in APPS if row.get(app, math.nan) >= LOADGEN_BOUND_PCT]
    if not bound:
        return ""
    return f" (load generator saturated {where.format(' and '.join(bound))}: compare {instead})"


def _ratio_range(row: dict[str, float]) -> tuple[float, float]:
    if "ratio_low" in row or "ratio_high" in row:
        return row.get("ratio_low", 0.0), row.get("ratio_high", math.inf)
    return row["ratio"], row["ratio"]


def _judge(goal: Goal, row: dict[str, float]) -> tuple[str, str]:
    if goal.absolute:
        digits = 2 if goal.unit == "ms" else 0
        return f"{_fmt(row['ours'], digits)} {goal.unit}", _verdict(goal, row["ours"], row["ours"])
    text = _ratio_text(row)
    return (text + "×" if text[-1].isdigit() else text), _verdict(goal, *_ratio_range(row))


def _verdict(goal: Goal, low: float, high: float) -> str:
    """Met when the whole range the figure may lie in meets the goal; not met when none of it does."""
    if math.isnan(low) or math.isnan(high):
        return "no data"

    def meets(value: float) -> bool:
        return value >= goal.limit if goal.higher else value <= goal.limit

    worst, best = (low, high) if goal.higher else (high, low)
    if meets(worst):
        return "met"
    return "unknown" if meets(best) else "not met"


def _w5_target(records: list[Record], sizes: list[Workload]) -> list[str]:
    """Ours: the busiest non-holder instance's CPU per emit as a share of the holder's, at every size."""
    shares = [_median_other_share(records, w.label) for w in sizes]
    measured = ", ".join(f"{_fmt(share, 1)} %" for share in shares)
    measured += " at n=" + ", ".join(str(w.instances) for w in sizes)
    if any(math.isnan(share) for share in shares):
        verdict = "no data"
    else:
        verdict = "met" if max(shares) <= OTHER_SHARE_LIMIT else "not met"
    sizes_text = f"n={sizes[0].instances}…{sizes[-1].instances}"
    return [
        f"W5 non-holder CPU per emit ≤ {OTHER_SHARE_LIMIT:.0f} % of the holder's, {sizes_text}",
        measured,
        verdict,
    ]


def _median_other_share(records: list[Record], label: str) -> float:
    shares = [
        m["max_other_cpu_ms_per_1k_emits"] / m["holder_cpu_ms_per_1k_emits"] * 100
        for m in (r["metrics"] for r in records if r["app"] == "ours" and r["workload"] == label and r["ok"])
        if m.get("max_other_cpu_ms_per_1k_emits") is not None and m.get("holder_cpu_ms_per_1k_emits")
    ]
    return statistics.median(shares) if shares else math.nan


def _correctness_target(records: list[Record]) -> list[str]:
    """Every run (both apps) 0 lost, 0 duplicated (and no offset fault); a crashed run proves
    nothing either way."""
    done = [r for r in records if r["ok"]]
    lost = sum(int(r["metrics"].get("lost") or 0) for r in done)
    duplicated = sum(int(r["metrics"].get("duplicated") or 0) for r in done)
    offset_faults = sum(int(r["metrics"].get("offset_faults") or 0) for r in done)
    crashed = len(records) - len(done)
    measured = f"{lost} lost, {duplicated} duplicated in {len(records)} runs"
    if offset_faults:
        measured += f", {offset_faults} offset faults"
    if lost or duplicated or offset_faults:
        verdict = "not met"
    elif crashed:
        verdict, measured = "unknown", measured + f" ({crashed} crashed)"
    else:
        verdict = "met"
    return ["every run 0 lost, 0 duplicated", measured, verdict]


def targets_table(rows: list[list[str]], markdown: bool = False) -> str:
    header = ["target (ratios ours/baseline)", "this run", "verdict"]
    if markdown:
        return "\n".join(["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * 3, *rows]])
    widths = _widths(header, rows)
    return "\n".join(_align(cells, widths, 3) for cells in [header, ["-" * w for w in widths], *rows])


def sweep(records: list[Record], label: str) -> dict[str, list[tuple[float, float]]]:
    """Per app: (offered deliveries/s, median p99 ms of the runs that reached that step), ascending."""
    points: dict[str, list[tuple[float, float]]] = {}
    for app in APPS:
        by_offered: dict[float, list[float]] = {}
        for r in records:
            if r["app"] != app or r["workload"] != label or not r["ok"]:
                continue
            for step in r["metrics"].get("steps", []):
                if step.get("p99_ms") is not None:
                    by_offered.setdefault(step["offered_deliveries_per_s"], []).append(step["p99_ms"])
        points[app] = sorted((x, statistics.median(ys)) for x, ys in by_offered.items())
    return points


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
