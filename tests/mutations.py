"""Every negative assertion can fail: apply each listed mutation to webapp/, run the test that must
catch it, expect a failure, and put the file back, always.

    .venv/bin/python -m tests.mutations            # every mutation, one after another
    .venv/bin/python -m tests.mutations --list     # names, files and tests, nothing run
    .venv/bin/python -m tests.mutations NAME ...   # only these
    .venv/bin/python -m tests.mutations --baseline NAME  # first check the test passes unmutated

A mutation is one exact text replacement (the text must occur exactly once, so a moved line fails
loudly instead of mutating nothing). The original file is copied to `<file>.unmutated` before it is
changed and restored from memory in a `finally`, on Ctrl-C and on SIGTERM too; a copy left behind
by a hard kill is put back at the next start. Results print as the table kept in tests/README.md.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
BACKUP_SUFFIX = ".unmutated"


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root, under webapp/
    old: str  # must occur exactly once
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids that must fail with the mutation in place
    what: str  # the negative check it proves can fail

    @property
    def files(self) -> str:
        return ", ".join(dict.fromkeys(edit.file for edit in self.edits))


MUTATIONS = [
    Mutation(
        "malformed-packet-kept-open",
        (Edit(
            "webapp/realtime/server.py",
            "            self._refuse(eio_sid, exc)\n            await self.eio.disconnect(eio_sid)\n",
            "            self._refuse(eio_sid, exc)\n",
        ),),
        ("tests/test_hostile.py::test_garbage_frames_never_hurt_the_instance",),
        "the misbehaving client is closed",
    ),
    Mutation(
        "malformed-packet-not-counted",
        (Edit("webapp/realtime/server.py", "        self.malformed_packets += 1\n", ""),),
        ("tests/test_hostile.py::test_garbage_frames_never_hurt_the_instance",),
        "the misbehaving client is counted (malformed_packets)",
    ),
    Mutation(
        "late-misdelivery-on-one-partition",
        (Edit(
            "webapp/realtime/propagator.py",
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n\n    def _recipients',
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n'
            '        if env.scope == "user":  # MUTATION: hold this partition, then deliver to everyone else\n'
            "            await asyncio.sleep(0.3)\n"
            '            self.deliver([s for s in self.state.all_sids() if s not in sids], env.event or "", env.data, mark, channel)\n'
            "\n    def _recipients",
        ),),
        ("tests/test_cluster.py::test_user_scope_reaches_exactly_that_users_sockets[redis-cluster-a]",),
        "a user event never reaches others (the fence waits for every partition on a cluster)",
    ),
    Mutation(
        "server-disconnect-as-transport-close",
        (Edit(
            "webapp/realtime/propagator.py",
            "        task = asyncio.ensure_future(self.sio.disconnect(sid))\n",
            "        task = asyncio.ensure_future(  # MUTATION: the transport ends, no Socket.IO DISCONNECT\n"
            "            self.sio.eio.sockets[self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)].close(wait=True, abort=True)\n"
            "        )\n",
        ),),
        ("tests/test_rooms.py::test_the_backend_disconnects_a_user_everywhere_and_clients_stay_away",),
        "disconnected clients stay away (python-socketio and the official JS client)",
    ),
    Mutation(
        "user-event-to-every-signed-in-socket",
        (Edit(
            "webapp/realtime/propagator.py",
            "        sids: Iterable[str] = scopes.row(env.scope).recipients(self._local, env)\n",
            "        sids: Iterable[str] = scopes.row(env.scope).recipients(self._local, env)\n"
            '        if env.scope == "user":  # MUTATION: every signed-in socket here\n'
            "            sids = self.state.authenticated_sids()\n",
        ),),
        ("tests/test_extension.py::test_the_readme_example_propagates_a_gateway_answer_across_instances",),
        "bob's gateway answer never reaches alice (checked behind a fence, not at once)",
    ),
    Mutation(
        "late-duplicate-broadcast",
        (Edit(
            "webapp/realtime/propagator.py",
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n\n    def _recipients',
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n'
            '        if env.scope == "all":  # MUTATION: a second copy, 0.2 s later (the partition held meanwhile)\n'
            "            await asyncio.sleep(0.2)\n"
            '            self.deliver(sids, env.event or "", env.data, mark, channel)\n'
            "\n    def _recipients",
        ),),
        ("tests/test_nginx.py::test_three_instances_behind_nginx_serve_every_client_through_a_drain",),
        "the broadcast after a drain reaches every client exactly once (not: at least once)",
    ),
    Mutation(
        "late-duplicate-user-event",
        (Edit(
            "webapp/realtime/propagator.py",
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n\n    def _recipients',
            '        self.deliver(sids, env.event or "", env.data, mark, channel)\n'
            '        if env.scope == "user":  # MUTATION: a second copy, 0.2 s later (the partition held meanwhile)\n'
            "            await asyncio.sleep(0.2)\n"
            '            self.deliver(sids, env.event or "", env.data, mark, channel)\n'
            "\n    def _recipients",
        ),),
        ("tests/test_faults.py::test_sigkill_leaves_the_other_instance_serving[redis]",),
        "an event after a crash reaches each of the user's sockets exactly once (not: at least once)",
    ),
    Mutation(
        "outbox-publishes-twice",
        (
            Edit(
                "webapp/realtime/outbox.py",
                "                try:\n                    await self._bus.publish(channel, message)\n",
                "                try:\n                    await self._bus.publish(channel, message)\n"
                "                    await self._bus.publish(channel, message)  # MUTATION: published twice\n",
            ),
            Edit(
                "webapp/realtime/propagator.py",
                "        if self._seen.seen(env.id, mark):\n",
                "        if False and self._seen.seen(env.id, mark):  # MUTATION: no deduplication\n",
            ),
        ),
        ("tests/test_faults.py::test_redis_restart_under_traffic",),
        "an answer held in the outbox during an outage reaches the user's other socket exactly once",
    ),
    Mutation(
        "reap-announces-every-share",
        (Edit(
            "webapp/realtime/presence.py",
            "            if result == -1\n",
            "            if result in (-1, 0)  # MUTATION: a leave for every reaped share, not per user\n",
        ),),
        ("tests/test_presence.py::test_a_killed_instance_is_forgotten_within_the_ttl_and_its_leaves_announced[redis]",),
        "a killed instance's users leave once per user, and not while still in the room elsewhere",
    ),
    Mutation(
        "heartbeat-claims-twice-the-ttl",
        (Edit(
            "webapp/realtime/presence.py",
            "pipe.zadd(self._instances_key, {self._tag: (time.time() + self._ttl) * 1000})",
            "pipe.zadd(self._instances_key, {self._tag: (time.time() + 2 * self._ttl) * 1000})  # MUTATION",
        ),),
        ("tests/test_presence.py::test_a_killed_instance_is_forgotten_within_the_ttl_and_its_leaves_announced[redis]",),
        "no answer counts a SIGKILLed instance's sockets once PRESENCE_TTL has passed; its leaves within 2x",
    ),
    Mutation(
        "close-drops-the-queue",
        (Edit(
            "webapp/realtime/transport.py",
            "        closing = not (self.closed or self.closing)\n        writer = self._writer\n",
            "        closing = not (self.closed or self.closing)\n        writer = self._writer\n"
            "        while abort and not self.queue.empty():  # MUTATION: what was queued is dropped\n"
            "            self.queue.get_nowait()\n"
            "            self.queue.task_done()\n",
        ),),
        ("tests/test_faults.py::test_sigterm_flushes_what_was_sent_before_each_socket_closes[queued]",),
        "on SIGTERM nothing queued for a socket is lost before it closes",
    ),
    Mutation(
        "room-leave-written-late",
        (Edit(
            "webapp/realtime/presence.py",
            "            del self._rooms[room, user_id]\n        self._mark_room(room, user_id)\n",
            "            del self._rooms[room, user_id]\n"
            "        asyncio.get_running_loop().call_later(0.3, self._mark_room, room, user_id)  # MUTATION: late\n",
        ),),
        ("tests/test_presence.py::test_presence_counts_stay_exact_under_churn_and_kills[redis]",),
        "presence counts are exact at a fence after every step (not: eventually)",
    ),
    # Who may receive what, from which offset (tests/test_entitlement.py and its neighbours).
    Mutation(
        "gateway-hands-out-scope-rooms",
        (Edit(
            "webapp/realtime/gateway.py",
            '    if scopes.reserved(str(room)) or not scopes.member_may_publish("room"):\n',
            "    if False:  # MUTATION: the scopes' own rooms go to the join policy like any other\n",
        ),),
        ("tests/test_entitlement.py::test_the_scopes_rooms_are_refused_whatever_the_join_policy",),
        "nobody room_sends to `authenticated` (bob gets no room_message behind a fence)",
    ),
    Mutation(
        "backend-leave-kept-in-the-session",
        (Edit(
            "webapp/realtime/propagator.py",
            "        if session is not None and room in session.rooms:\n            # However",
            "        if session is not None and room in session.rooms and not by_backend:  # MUTATION\n            # However",
        ),),
        ("tests/test_entitlement.py::test_a_room_the_backend_took_away_does_not_come_back_on_recovery[live]",),
        "a room the backend took away gets nothing to the socket after its recovery",
    ),
    Mutation(
        "replay-ignores-join-offsets",
        (Edit(
            "webapp/realtime/membership.py",
            "            if joined is not None and entry.mark.offset <= joined and entry.channel == room_channel(room):\n",
            "            if False:  # MUTATION: a room's whole history is replayed\n",
        ),),
        ("tests/test_entitlement.py::test_a_sigkilled_sessions_self_join_replays_nothing_from_before_it",),
        "nothing sent to a room before the socket joined it is replayed",
    ),
    Mutation(
        "replay-ignores-ops",
        (Edit(
            "webapp/realtime/membership.py",
            "            _apply_op(env, user_id, member, pending, plan)\n",
            "            pass  # MUTATION: ops in the history change no membership\n",
        ),),
        ("tests/test_entitlement.py::test_a_room_the_backend_took_away_does_not_come_back_on_recovery[while away]",),
        "a room taken away while the socket was away gets nothing replayed",
    ),
    Mutation(
        "replay-keeps-copies",
        (Edit("webapp/realtime/membership.py", "        if env.id in seen:\n", "        if False:  # MUTATION\n"),),
        ("tests/test_entitlement.py::test_an_answer_recorded_twice_is_replayed_once",),
        "an envelope recorded twice is replayed once",
    ),
    Mutation(
        "outage-joins-at-the-consumed-position",
        (Edit(
            "webapp/realtime/membership.py",
            "        if bus.ready:\n            return\n",
            "        return  # MUTATION: a socket accepted in an outage joins where the instance stopped\n",
        ),),
        ("tests/test_entitlement.py::test_a_socket_accepted_during_an_outage_is_caught_up_only_from_its_connect",),
        "a socket accepted during an outage gets nothing from before its connect",
    ),
    Mutation(
        "replay-in-one-turn",
        (Edit(
            "webapp/realtime/propagator.py",
            "        chunk = max(1, self.writer.max_queue // 2)\n",
            "        chunk = max(1, len(session.replay))  # MUTATION: the whole replay queued at once\n",
        ),),
        ("tests/test_large_recovery.py::test_nine_thousand_missed_events_are_recovered_whole_on_the_other_instance",),
        "a client that reads is never evicted during its replay",
    ),
    Mutation(
        "recoveries-unbounded",
        (Edit(
            "webapp/realtime/recovery.py",
            "            await asyncio.wait_for(self._turns.acquire(), self._wait)\n",
            "            await asyncio.wait_for(asyncio.sleep(0), self._wait)  # MUTATION: no limit\n",
        ),),
        ("tests/test_large_recovery.py::test_a_crowd_of_recoveries_waits_its_turn_and_publishes_keep_answering",),
        "a crowd of recoveries fails none for Redis timing out (only `busy`)",
    ),
    Mutation(
        "join-race-keeps-the-channel",
        (Edit(
            "webapp/realtime/propagator.py",
            "                if not self._members_here(room):\n                    await self.bus.unsubscribe(channel)\n                return\n",
            "                return  # MUTATION: the channel stays held\n",
        ),),
        ("tests/test_churn.py::test_cut_off_handshakes_and_joins_racing_disconnects_leak_nothing",),
        "a join racing its socket's disconnect leaves no channel held",
    ),
]


class Interrupted(BaseException):
    """SIGTERM while a mutation is applied: unwinds through the `finally` that restores the file."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def restore_leftovers() -> list[Path]:
    """Put back any file a hard-killed earlier run left mutated."""
    restored = []
    for backup in (ROOT / "webapp").rglob(f"*{BACKUP_SUFFIX}"):
        original = backup.with_name(backup.name.removesuffix(BACKUP_SUFFIX))
        original.write_bytes(backup.read_bytes())
        backup.unlink()
        restored.append(original)
    return restored


SHOW = False  # --show: print why each run failed (pytest's short summary)


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "--tb=line", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if SHOW:
        print("\n".join(line[:400] for line in lines if line.startswith(("FAILED", "E ", "/"))), file=sys.stderr)
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-200:]


def apply_and_run(mutation: Mutation, timeout: float) -> tuple[bool, str, float]:
    """(caught, pytest's last line, seconds): every file is the original again when this returns or raises."""
    originals: dict[Path, bytes] = {}
    for edit in mutation.edits:
        path = ROOT / edit.file
        text = (originals.get(path) or path.read_bytes()).decode()
        found = text.count(edit.old)
        if found != 1:
            raise SystemExit(f"{mutation.name}: the text to mutate occurs {found} times in {edit.file}; update the list")
        originals.setdefault(path, path.read_bytes())
    started = time.monotonic()
    try:
        for path, original in originals.items():
            path.with_name(path.name + BACKUP_SUFFIX).write_bytes(original)
        mutated = {path: original.decode() for path, original in originals.items()}
        for edit in mutation.edits:
            mutated[ROOT / edit.file] = mutated[ROOT / edit.file].replace(edit.old, edit.new)
        for path, text in mutated.items():
            path.write_text(text)
        code, last = run_tests(mutation.tests, timeout)
    finally:
        for path, original in originals.items():
            path.write_bytes(original)
            path.with_name(path.name + BACKUP_SUFFIX).unlink(missing_ok=True)
    return code == 1, last, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="run each test unmutated first: it must pass")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--show", action="store_true", help="print why each run failed")
    args = parser.parse_args(argv)
    global SHOW
    SHOW = args.show
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"no such mutation: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.files}\t{' '.join(m.tests)}\t{m.what}")
        return 0
    for path in restore_leftovers():
        print(f"restored {path.relative_to(ROOT)} from a run that was killed", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    missed = 0
    print("| test | mutation | result |\n| --- | --- | --- |")
    try:
        for m in chosen:
            if args.baseline:
                code, last = run_tests(m.tests, args.timeout)
                if code != 0:
                    print(f"| {' '.join(m.tests)} | (none: baseline) | FAILS UNMUTATED: {last} |")
                    missed += 1
                    continue
            caught, last, took = apply_and_run(m, args.timeout)
            missed += not caught
            verdict = "caught" if caught else "NOT CAUGHT"
            tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in m.tests)
            print(f"| {tests} | `{m.name}` ({m.files}): {m.what} | {verdict} ({last}; {took:.0f} s) |", flush=True)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: the mutated file was restored", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
