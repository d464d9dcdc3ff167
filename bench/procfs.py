"""What /proc tells about a server process: its worker child, resident memory, CPU time."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (hypercorn runs its worker in a child process)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (VmRSS), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _has_schedstat() -> bool:
    try:
        int(Path("/proc/self/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return True


# Decided once: both readings of a measurement come from the same source.
_SCHEDSTAT = _has_schedstat()


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used, in seconds: to the nanosecond from the scheduler's
    statistics of each of its threads where the kernel keeps them, else user plus system time
    in clock ticks (10 ms, too coarse for a server that is nearly idle). 0 once it is gone."""
    if _SCHEDSTAT:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return 0.0
        total = 0
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended just now
        return total / 1e9
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces: fields are counted after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
