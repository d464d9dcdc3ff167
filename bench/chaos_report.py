"""The chaos soak's report: what each fault cost, delivery lag, resources, the oracle's verdict; as text or JSON."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .chaos_clients import REQUEST_TIMEOUT, World
from .chaos_faults import WEIGHTS, Fault
from .chaos_fleet import Incarnation, Slot
from .chaos_oracle import Judgement

RSS_GROWTH_MIB = 50.0  # an instance process growing more than this is flagged
FDS_GROWTH = 200  # descriptors beyond its sockets' own, grown by more than this, flagged


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values already sorted; 0 for none."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def lag_stats(values: list[float]) -> dict[str, float]:
    values.sort()
    return {"count": len(values), "p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3,
            "max_ms": (values[-1] if values else 0.0) * 1e3}


def resources(slots: list[Slot]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per instance: its longest-lived process's readings and the most any of its processes grew;
    the flags raised."""
    rows, flags = [], []
    for slot in slots:
        measured = [i for i in slot.incarnations if i.samples]
        if not measured:
            continue
        longest = max(measured, key=lambda i: (i.ended or i.last_seen) - i.started)
        for incarnation in measured:
            rss_growth = (incarnation.rss_kib[1] - incarnation.rss_kib[0]) / 1024
            fds_growth = incarnation.extra_fds[1] - incarnation.extra_fds[0]
            if rss_growth > RSS_GROWTH_MIB:
                flags.append(f"instance {incarnation.name}: RSS grew {rss_growth:.0f} MiB (over {RSS_GROWTH_MIB:.0f})")
            if fds_growth > FDS_GROWTH:
                flags.append(f"instance {incarnation.name}: descriptors beyond its sockets grew by {fds_growth} (over {FDS_GROWTH})")
            if incarnation.evicted:
                flags.append(f"instance {incarnation.name}: {incarnation.evicted} slow consumers evicted")
        rows.append({
            "instance": slot.name,
            "processes": len(slot.incarnations),
            "longest": _incarnation(longest),
            "max_rss_growth_mib": round(max((i.rss_kib[1] - i.rss_kib[0]) / 1024 for i in measured), 1),
            "max_extra_fds_growth": max(i.extra_fds[1] - i.extra_fds[0] for i in measured),
            "evicted": sum(i.evicted for i in slot.incarnations),
            "bus_gaps": sum(i.gaps for i in slot.incarnations),
        })
    return rows, flags


def _incarnation(i: Incarnation) -> dict[str, Any]:
    return {
        "name": i.name, "seconds": round((i.ended or i.last_seen) - i.started, 1), "samples": i.samples,
        "rss_mib": [round(v / 1024, 1) for v in i.rss_kib], "fds": list(i.fds), "sockets": list(i.sockets),
    }


def summarise(
    world: World, faults: list[Fault], verdict: Judgement, settings: dict[str, Any], skipped: int
) -> dict[str, Any]:
    """Everything the soak measured, as one JSON-ready dict."""
    emits = world.emits
    kind_of = {fault.id: fault.kind for fault in faults}
    kinds = [*WEIGHTS, "calm"]
    per_kind: dict[str, dict[str, Any]] = {k: Counter() for k in kinds}
    durations: dict[str, list[float]] = defaultdict(list)
    for fault in faults:
        per_kind[fault.kind]["count"] += 1
        durations[fault.kind].append(fault.seconds)
    for emit in emits:
        kind = kind_of.get(emit.fault, "calm")
        per_kind[kind]["emits"] += 1
        if emit.status == 503:
            per_kind[kind]["refused"] += 1
        elif not emit.acked:
            per_kind[kind]["unanswered"] += 1  # no answer: its instance died, or hung
    for session in world.sessions:
        if session.fault:
            per_kind[kind_of[session.fault]]["fresh_sessions"] += 1
    for (fault_id, outcome), count in world.reconnects.items():
        per_kind[kind_of.get(fault_id, "calm")][outcome] += count
    for (fault_id, reason), count in world.recovery_failed.items():
        per_kind[kind_of.get(fault_id, "calm")][f"recovery_failed:{reason}"] += count
    for fault_id, count in verdict.excused.items():
        per_kind[kind_of.get(fault_id, "calm")]["excused"] += count
    for fault_id, count in verdict.lost_plain.items():
        per_kind[kind_of.get(fault_id, "calm")]["missed_not_opted_in"] += count
    live: dict[str, list[float]] = defaultdict(list)
    everything_live: list[float] = []
    replayed: list[float] = []
    for session in world.sessions:
        for emit_id, lag, again in zip(session.received, session.lags, session.replayed):
            if again:
                replayed.append(lag)
            elif emit_id < len(emits):
                everything_live.append(lag)
                live[kind_of.get(emits[emit_id].fault, "calm")].append(lag)
    table = []
    for kind in kinds:
        row = dict(per_kind[kind])
        if kind != "calm" and not row.get("count"):
            continue
        row["kind"] = kind
        row["mean_seconds"] = round(sum(durations[kind]) / len(durations[kind]), 1) if durations[kind] else None
        row["live_lag"] = lag_stats(live[kind])
        table.append(row)
    rows, flags = resources(world.fleet.slots)
    hung = [f"instance {name}: {count} REST calls got no answer within {REQUEST_TIMEOUT:.0f}s (neither 202 nor 503)"
            for name, count in sorted(world.hung.items())]
    failures = [*world.failures, *hung, *flags]
    if not verdict.ok:
        failures.append(
            f"oracle: {verdict.missing} missing, {verdict.duplicated} duplicated, "
            f"{verdict.misdelivered} misdelivered, {verdict.unknown} unknown"
        )
    scopes = Counter(e.scope for e in emits if e.acked)
    return {
        "settings": settings,
        "ok": not failures,
        "failures": failures,
        "examples": verdict.examples,
        "emits": {"sent": len(emits), "acknowledged": sum(scopes.values()), "by_scope": dict(scopes),
                  "refused": sum(1 for e in emits if e.status == 503),
                  "unanswered": sum(1 for e in emits if e.status == 0), "skipped_ticks": skipped},
        "oracle": {
            "checked": verdict.checked, "delivered": verdict.delivered, "required": verdict.required,
            "missing": verdict.missing, "duplicated": verdict.duplicated, "misdelivered": verdict.misdelivered,
            "unknown": verdict.unknown, "refused_but_delivered": verdict.refused_but_delivered,
            "excused_by_recovery_failed": sum(verdict.excused.values()),
            "missed_by_sockets_not_opted_in": sum(verdict.lost_plain.values()),
        },
        "sessions": len(world.sessions),
        "lag": {"live": lag_stats(everything_live), "replayed": lag_stats(replayed)},
        "per_fault_kind": table,
        "faults": [{"id": f.id, "at": f.wall, "kind": f.kind, "target": f.target, "seconds": round(f.seconds, 2), **f.detail}
                   for f in faults],
        "resources": rows,
        "notes": dict(world.notes),
    }


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def text(summary: dict[str, Any]) -> str:
    """The report for a terminal (and, trimmed, for the README)."""
    s, e, o, lag = summary["settings"], summary["emits"], summary["oracle"], summary["lag"]
    lines = [
        (f"chaos soak: {s['minutes']} min, seed {s['seed']}, {s['instances']} instances, {s['sockets']} sockets "
         f"({s['recovering']} opted in to recovery, {s['signed_in']} signed in over {s['users']} users), "
         f"{s['rate']} emits/s, a fault every {s['gap'][0]}-{s['gap'][1]} s after the last healed"),
        (f"emits: {e['acknowledged']:,} acknowledged of {e['sent']:,} "
         f"({', '.join(f'{k} {v:,}' for k, v in sorted(e['by_scope'].items()))}); "
         f"{e['refused']:,} refused (503), {e['unanswered']:,} unanswered"),
        (f"deliveries: {o['delivered']:,} checked in {summary['sessions']:,} socket sessions; live lag p50 "
         f"{_ms(lag['live']['p50_ms'])} ms, p99 {_ms(lag['live']['p99_ms'])} ms, max {_ms(lag['live']['max_ms'])} ms; "
         f"{lag['replayed']['count']:,} replayed by recoveries (lag p50 {_ms(lag['replayed']['p50_ms'])} ms, "
         f"p99 {_ms(lag['replayed']['p99_ms'])} ms)"),
        "",
        ("| fault | count | mean s | REST emits: 503 / no answer / sent | sockets back: resumed / fresh | recovery_failed | "
         "events excused by recovery_failed | events missed by sockets not opted in | live lag p50 / p99 ms |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["per_fault_kind"]:
        failed = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(row.items()) if k.startswith("recovery_failed:"))
        lines.append(
            f"| {row['kind']} | {row.get('count', '-')} | {row['mean_seconds'] if row['mean_seconds'] is not None else '-'} "
            f"| {row.get('refused', 0)} / {row.get('unanswered', 0)} / {row.get('emits', 0)} "
            f"| {row.get('resumed', 0)} / {row.get('fresh', 0)} "
            f"| {failed or 0} | {row.get('excused', 0):,} | {row.get('missed_not_opted_in', 0):,} "
            f"| {_ms(row['live_lag']['p50_ms'])} / {_ms(row['live_lag']['p99_ms'])} |"
        )
    lines += [
        "",
        ("| instance | processes | longest-lived: s, RSS MiB start / peak / end, fds start / peak / end | "
         "most growth of a process: RSS MiB, fds beyond sockets | evicted |"),
        "| --- | --- | --- | --- | --- |",
    ]
    for row in summary["resources"]:
        x = row["longest"]
        lines.append(
            f"| {row['instance']} | {row['processes']} | {x['seconds']:.0f} s, {' / '.join(map(str, x['rss_mib']))}, "
            f"{' / '.join(map(str, x['fds']))} | {row['max_rss_growth_mib']}, {row['max_extra_fds_growth']} "
            f"| {row['evicted']} |"
        )
    lines.append("")
    if summary["ok"]:
        lines.append(
            f"oracle: PASS. {o['required']:,} owed deliveries all arrived exactly once; no duplicate, no misdelivery, "
            f"no eviction, no unexplained disconnect; {o['excused_by_recovery_failed']:,} excused by recovery_failed, "
            f"{o['missed_by_sockets_not_opted_in']:,} missed by sockets not opted in whose instance died, "
            f"{o['refused_but_delivered']} answered 503 yet delivered (documented)"
        )
    else:
        lines.append(f"oracle: FAIL ({len(summary['failures'])} findings)")
        lines += [f"  - {failure}" for failure in summary["failures"][:40]]
        lines += [f"  e.g. {example}" for example in summary["examples"][:15]]
    return "\n".join(lines)
