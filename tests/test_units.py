"""Unit level: socket state, tokens, envelopes, config, the in-memory bus."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from itsdangerous import URLSafeSerializer

from webapp.auth.tokens import InvalidToken, TokenSigner
from webapp.config import ConfigError, Settings
from webapp.logs import RedactTokens, redact
from webapp.realtime import envelope
from webapp.realtime.bus import ZERO, BusUnavailable, Entry, Mark, MemoryBus, Offset, Position
from webapp.realtime.bus.cluster import Topology
from webapp.realtime.bus.partitions import Partitions
from webapp.realtime.bus.redis_bus import offset_of
from webapp.realtime.limits import RateLimiter
from webapp.realtime.membership import RecentIds, ReplayPlan, plan_replay
from webapp.realtime.outbox import Outbox
from webapp.realtime.propagator import _KeyedLocks
from webapp.realtime.state import SocketState


class TestSocketState:
    def test_first_and_last_socket_of_a_user(self) -> None:
        state = SocketState()
        assert state.add("s1", "alice") is True
        assert state.add("s2", "alice") is False
        assert state.add("s3", None) is False
        assert sorted(state.sids_of("alice")) == ["s1", "s2"]
        assert sorted(state.authenticated_sids()) == ["s1", "s2"]
        assert sorted(state.all_sids()) == ["s1", "s2", "s3"]
        assert state.remove("s1") == ("alice", False)
        assert state.remove("s2") == ("alice", True)
        assert state.remove("s3") == (None, False)
        assert len(state) == 0 and state.users() == [] and not state.holds_user("alice")

    def test_unknown_and_duplicate_sockets(self) -> None:
        state = SocketState()
        assert state.remove("nope") == (None, False)
        state.add("s1", "bob")
        with pytest.raises(ValueError):
            state.add("s1", "bob")
        assert state.user_of("s1") == "bob" and state.user_of("nope") is None


class TestTokens:
    signer = TokenSigner("key-one")

    def test_round_trip(self) -> None:
        token = self.signer.mint("alice@example.com", ttl=60)
        assert self.signer.verify(token.value) == "alice@example.com"
        assert token.expires_at_iso.endswith("Z")

    def test_expired(self) -> None:
        token = self.signer.mint("alice", ttl=60, now=1_000_000)
        assert self.signer.verify(token.value, now=1_000_059) == "alice"
        with pytest.raises(InvalidToken, match="expired"):
            self.signer.verify(token.value, now=1_000_060)

    def test_tampered(self) -> None:
        value = self.signer.mint("alice", ttl=60).value
        _, _, signature = value.rpartition(".")
        forged = TokenSigner("key-one")._serializer.dump_payload({"sub": "mallory", "exp": 2**40})
        for bad in (value[:-2] + "xx", forged.decode() + "." + signature, "", "x" * 5000, None, 42):
            with pytest.raises(InvalidToken):
                self.signer.verify(bad)

    def test_other_key(self) -> None:
        value = TokenSigner("key-two").mint("alice", ttl=60).value
        with pytest.raises(InvalidToken, match="signature"):
            self.signer.verify(value)

    def test_refuses_invalid_user(self) -> None:
        with pytest.raises(ValueError):
            self.signer.mint("not valid!", ttl=60)

    def test_signed_with_hmac_sha256(self) -> None:
        value = self.signer.mint("alice", ttl=60).value
        payload, _, signature = value.rpartition(".")
        salted = hashlib.sha256(b"webapp.socket-token.v1" + b"signer" + b"key-one").digest()
        expected = hmac.new(salted, payload.encode(), hashlib.sha256).digest()
        assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected

    def test_rotation_first_key_signs_every_key_verifies(self) -> None:
        rotated = TokenSigner(["key-new", "key-one"])
        old = self.signer.mint("alice", ttl=60).value
        new = rotated.mint("bob", ttl=60).value
        assert rotated.verify(old) == "alice" and rotated.verify(new) == "bob"
        assert TokenSigner("key-new").verify(new) == "bob"
        with pytest.raises(InvalidToken):
            self.signer.verify(new)  # a key that is no longer configured does not verify

    def test_tokens_signed_before_the_upgrade_still_verify(self) -> None:
        sha1 = URLSafeSerializer("key-one", salt="webapp.socket-token.v1")  # itsdangerous's default, HMAC-SHA1
        assert self.signer.verify(sha1.dumps({"sub": "alice", "exp": 2**40})) == "alice"


class TestEnvelope:
    def test_round_trip(self) -> None:
        envelope_id, raw = envelope.make("user", "events", {"x": [1, 2]}, user_id="bob", instance="A", sid="s1")
        env = envelope.parse(raw)
        assert (env.id, env.scope, env.event, env.data, env.user_id) == (envelope_id, "user", "events", {"x": [1, 2]}, "bob")
        assert env.origin.instance == "A" and env.origin.sid == "s1"

    @pytest.mark.parametrize(
        "raw",
        [
            b"not json",
            b"\xff\xfe",
            b"[]",
            b'{"v": 2, "id": "x", "scope": "all", "event": "e", "ts": 1}',
            b'{"v": 1, "id": "x", "scope": "nobody", "event": "e", "ts": 1}',
            b'{"v": 1, "id": "x", "scope": "all", "event": "", "ts": 1}',
            b'{"v": 1, "id": "x", "scope": "all", "event": "disconnect", "ts": 1}',
            b'{"v": 1, "id": "x", "scope": "user", "event": "e", "ts": 1}',
            b'{"v": 1, "id": "x", "scope": "user", "user_id": "no spaces", "event": "e", "ts": 1}',
            b'{"v": 1, "scope": "all", "event": "e", "ts": 1}',
        ],
    )
    def test_rejects(self, raw: bytes) -> None:
        with pytest.raises(envelope.BadEnvelope):
            envelope.parse(raw)

    def test_never_pickles(self) -> None:
        _, raw = envelope.make("all", "e", None, instance="A")
        assert orjson.loads(raw)["v"] == 1


class TestConfig:
    def test_a_default_ttl_above_the_maximum_is_refused_at_start(self) -> None:
        with pytest.raises(ConfigError, match="TOKEN_TTL must be between 10 and 604800"):
            Settings.from_env({"TOKEN_TTL": str(8 * 24 * 3600)})
        assert Settings.from_env({"TOKEN_TTL": str(7 * 24 * 3600)}).token_ttl == 604800

    def test_secret_keys_rotate_and_secret_key_still_works(self) -> None:
        rotated = Settings.from_env({"SECRET_KEYS": "new-key, old-key", "SECRET_KEY": "ignored"})
        assert (rotated.secret_key, rotated.secret_keys) == ("new-key", ("new-key", "old-key"))
        single = Settings.from_env({"SECRET_KEY": "only-key"})
        assert (single.secret_key, single.secret_keys) == ("only-key", ("only-key",))
        with pytest.raises(ConfigError, match="at least 16 characters"):
            Settings.from_env({"WEBAPP_ENV": "production", "SECRET_KEYS": "long-enough-key-1234,short"})

    def test_defaults(self) -> None:
        settings = Settings.from_env({})
        assert settings.redis_url is None and settings.port == 5000 and settings.channel_prefix == "webapp"
        assert settings.api_keys == () and settings.cors_origins == ()

    async def test_redis_cluster_forced_either_way_asks_redis_nothing(self) -> None:
        assert Settings.from_env({"REDIS_CLUSTER": "1"}).redis_cluster is True
        assert Settings.from_env({"REDIS_CLUSTER": "0"}).redis_cluster is False
        assert Settings.from_env({}).redis_cluster is None  # asked of Redis at the first connection
        nobody = "redis://127.0.0.1:1/0"  # nothing listens there: asking would fail
        assert await Topology(nobody, forced=True, timeout=0.2).cluster() is True
        assert await Topology(nobody, forced=False, timeout=0.2).cluster() is False
        with pytest.raises(redis.exceptions.ConnectionError):
            await Topology(nobody, forced=None, timeout=0.2).cluster()

    def test_an_apps_realtime_config_reads_as_the_environment_would(self) -> None:
        settings = Settings.from_config(
            {"SECRET_KEY": "app-secret", "REALTIME_CORS_ORIGINS": ["https://a.test", "https://b.test"],
             "REALTIME_DEMO_LOGIN": False, "REALTIME_SOCKET_RATE": 5, "OTHER": object()}
        )
        assert settings.cors_origins == ("https://a.test", "https://b.test")
        assert settings.demo_login is False and settings.socket_rate == 5 and settings.secret_keys == ("app-secret",)
        with pytest.raises(ConfigError, match="REALTIME_PORT must be"):
            Settings.from_config({"REALTIME_PORT": object()})

    def test_production_turns_the_demo_login_off_unless_asked(self, caplog: pytest.LogCaptureFixture) -> None:
        secrets = {"WEBAPP_ENV": "production", "SECRET_KEY": "k" * 32, "API_KEYS": "a" * 20}
        assert Settings.from_env(secrets).demo_login is False
        asked = Settings.from_env({**secrets, "DEMO_LOGIN": "true"})
        assert asked.demo_login is True
        asked.warn_about_defaults()
        assert "DEMO_LOGIN is on in production" in caplog.text
        assert Settings.from_env({}).demo_login is True  # development: the demo works out of the box

    def test_parses_lists(self) -> None:
        settings = Settings.from_env({"API_KEYS": "a, b,,c", "CORS_ORIGINS": "https://x.test"})
        assert settings.api_keys == ("a", "b", "c") and settings.cors_origins == ("https://x.test",)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"WEBAPP_ENV": "production"}, "SECRET_KEY must be set"),
            ({"REDIS_URL": "http://localhost"}, "REDIS_URL must start with"),
            ({"REDIS_URL": "redis://localhost:99999"}, "REDIS_URL"),
            ({"PORT": "eighty"}, "PORT must be an integer"),
            ({"CHANNEL_PREFIX": "has space"}, "CHANNEL_PREFIX"),
            ({"DEMO_LOGIN": "maybe"}, "DEMO_LOGIN"),
            ({"RECOVERY_WINDOW": "600", "REPLAY_MAX_AGE": "300"}, "RECOVERY_WINDOW must not exceed REPLAY_MAX_AGE"),
        ],
    )
    def test_refuses_bad_values(self, env: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env)


async def no_gap(reason: str) -> None:
    raise AssertionError(f"unexpected gap: {reason}")


class TestMemoryBus:
    async def test_delivers_only_subscribed_channels_in_order(self) -> None:
        bus = MemoryBus()
        got: list[tuple[str, bytes]] = []
        done = asyncio.Event()

        async def handler(channel: str, message: bytes, mark: Mark | None) -> None:
            got.append((channel, message))
            if message == b"last":
                done.set()

        await bus.start(handler, no_gap)
        try:
            assert await bus.subscribe("a")
            await bus.publish("b", b"not for us")
            for n in range(3):
                await bus.publish("a", str(n).encode())
            await bus.unsubscribe("a")
            await bus.publish("a", b"after unsubscribe")
            await bus.subscribe("z")
            await bus.publish("z", b"last")
            await asyncio.wait_for(done.wait(), 5)
        finally:
            await bus.close()
        assert got == [("a", b"0"), ("a", b"1"), ("a", b"2"), ("z", b"last")]

    async def test_handler_errors_do_not_stop_consumption(self) -> None:
        bus = MemoryBus()
        done = asyncio.Event()

        async def handler(channel: str, message: bytes, mark: Mark | None) -> None:
            if message == b"boom":
                raise RuntimeError("boom")
            done.set()

        await bus.start(handler, no_gap)
        try:
            await bus.subscribe("a")
            await bus.publish("a", b"boom")
            await bus.publish("a", b"fine")
            await asyncio.wait_for(done.wait(), 5)
        finally:
            await bus.close()

    async def test_publish_when_closed_is_unavailable(self) -> None:
        with pytest.raises(BusUnavailable):
            await MemoryBus().publish("a", b"x")


async def test_keyed_locks_are_released() -> None:
    locks = _KeyedLocks()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with locks.hold("alice"):
            order.append(name + "+")
            await asyncio.sleep(0)
            order.append(name + "-")

    await asyncio.gather(hold("one"), hold("two"))
    assert order == ["one+", "one-", "two+", "two-"]
    assert len(locks) == 0


class TestOutbox:
    async def test_keeps_order_and_flushes_when_the_bus_returns(self) -> None:
        bus = MemoryBus()  # not started yet: every publish is refused, as with Redis down
        outbox = Outbox(bus, max_messages=10, max_age=30, retry_every=0.01)
        outbox.start()
        got: list[bytes] = []
        all_in = asyncio.Event()

        async def handler(channel: str, message: bytes, mark: Mark | None) -> None:
            got.append(message)
            if len(got) == 3:
                all_in.set()

        try:
            for n in range(3):
                assert await outbox.publish("a", str(n).encode())
            assert len(outbox) == 3
            await bus.subscribe("a")
            await bus.start(handler, no_gap)
            await asyncio.wait_for(all_in.wait(), 5)
            assert got == [b"0", b"1", b"2"]
            assert outbox.status() == {"waiting": 0, "delivered_late": 3, "dropped": 0}
        finally:
            await outbox.close()
            await bus.close()

    async def test_drops_what_is_too_many_or_too_old(self) -> None:
        bus = MemoryBus()
        outbox = Outbox(bus, max_messages=2, max_age=0.05, retry_every=0.01)
        outbox.start()
        try:
            assert await outbox.publish("a", b"1")
            assert await outbox.publish("a", b"2")
            assert not await outbox.publish("a", b"3")  # full
            deadline = asyncio.get_running_loop().time() + 5
            while len(outbox) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)  # polling a counter; the flusher expires them by age
            assert outbox.status() == {"waiting": 0, "delivered_late": 0, "dropped": 3}
        finally:
            await outbox.close()


class TestRateLimiter:
    def test_burst_then_rate(self) -> None:
        limiter = RateLimiter(rate=2, burst=3)
        assert [limiter.allow("s", now=0) for _ in range(4)] == [True, True, True, False]
        assert limiter.allow("s", now=0.5) is True  # one token back after 0.5 s at 2/s
        assert limiter.allow("s", now=0.5) is False
        assert limiter.allow("other", now=0.5) is True  # per socket
        limiter.forget("s")
        assert len(limiter) == 1


class TestOffsets:
    def test_parse_and_order(self) -> None:
        assert Offset.parse("1700000000000-3") == Offset(1700000000000, 3)
        assert Offset.parse(b"5-0") == Offset(5, 0)
        assert str(Offset(12, 7)) == "12-7"
        for bad in ("", "5", "5-", "-1-0", "a-b", "1-2-3", None, 5, "9" * 20 + "-0"):
            assert Offset.parse(bad) is None, bad
        assert Offset(5, 9) < Offset(6, 0) and Offset(6, 0) < Offset(6, 1) and ZERO < Offset(0, 1)

    def test_live_offsets_are_read_from_the_spliced_field_and_sanity_checked(self) -> None:
        now = 1_700_000_000_000
        assert offset_of(b'{"offset":"1700000000000-2","v":1}', now) == Offset(1700000000000, 2)
        assert offset_of(b'{"v":1,"offset":"1-0"}', now) is None  # only where the publish script puts it
        assert offset_of(b'{"offset":"junk","v":1}', now) is None
        assert offset_of(b"garbage", now) is None
        # far ahead of Redis's clock: forged by someone publishing on our channels
        assert offset_of(b'{"offset":"99999999999999-0","v":1}', now) is None
        assert offset_of(b'{"offset":"1700000059000-0","v":1}', now) == Offset(1700000059000, 0)
        assert offset_of(b'{"offset":"1700000061000-0","v":1}', now) is None

    def test_a_position_is_an_offset_per_partition(self) -> None:
        one = Position.parse("1700000000000-3", 1)
        assert one == Position({0: Offset(1700000000000, 3)}) and str(one) == "1700000000000-3"
        many = Position.parse("7:5-1,2:9-0", 16)
        assert many is not None and str(many) == "2:9-0,7:5-1"  # one spelling, by partition
        for bad in ("", "junk", "16:5-1", "2:5-1,2:6-0", "-1:5-1", "2:5-1,", "2:5", ",".join(f"{p}:1-0" for p in range(17))):
            assert Position.parse(bad, 16) is None, bad
        assert Position.parse("3:5-1", 1) is None  # a cluster's position on one node
        assert many.covers(Mark(2, Offset(9, 0))) and not many.covers(Mark(2, Offset(9, 1)))
        assert not many.covers(Mark(4, Offset(0, 1)))  # a partition it knows nothing of
        assert many.advance(Mark(4, Offset(1, 0))) and not many.advance(Mark(4, Offset(0, 9)))
        merged = Position({1: Offset(5, 0), 2: Offset(1, 0)}).merged(Position({2: Offset(3, 0), 3: Offset(1, 1)}))
        assert merged == Position({1: Offset(5, 0), 2: Offset(3, 0), 3: Offset(1, 1)})
        assert merged.only([2, 9]) == Position({2: Offset(3, 0)})

    def test_partitions_spread_over_the_slots_and_keep_channel_and_history_in_one(self) -> None:
        from redis.crc import key_slot

        single = Partitions("{wa}:replay")
        assert single.wire("wa:user:alice") == "wa:user:alice" and single.stream(0) == "{wa}:replay"
        parts = Partitions("{wa}:replay", 16, sharded=True)
        slots = [key_slot(parts.stream(p).encode()) for p in range(16)]
        assert [slot * 16 // 16384 for slot in slots] == list(range(16))  # one per sixteenth
        for n in range(200):
            channel = f"wa:user:u{n}"
            wired = parts.wire(channel)
            assert key_slot(wired.encode()) == slots[parts.of(channel)]
            assert parts.unwire(wired) == (channel, parts.of(channel))
        assert parts.unwire("wa:user:alice") is None  # not ours: no tag
        other = parts.wire("wa:user:u1").replace("wa:user:u1", "wa:user:u2")
        assert parts.of("wa:user:u1") == parts.of("wa:user:u2") or parts.unwire(other) is None

    def test_recent_ids_last_as_long_as_the_history(self) -> None:
        """Two entries a partition, ten seconds: an id is forgotten once its entry would be."""
        recent = RecentIds(2, 10.0)
        at = [Mark(0, Offset(1_000, n)) for n in range(4)]
        assert not recent.seen("a", at[0])
        assert recent.seen("a", at[1])
        assert not recent.seen("x", Mark(1, Offset(1_000, 0)))  # another partition keeps its own two
        assert not recent.seen("b", at[1]) and not recent.seen("c", at[2])
        assert not recent.seen("a", at[3])  # forgotten: only the last two of partition 0 are kept
        assert not recent.seen("old", Mark(2, Offset(1_000, 0)))
        assert not recent.seen("new", Mark(2, Offset(11_001, 0)))
        assert not recent.seen("old", Mark(2, Offset(11_002, 0)))  # older than the history's age


class TestMemoryHistory:
    async def test_offsets_increase_and_history_reads_after_one(self) -> None:
        bus = MemoryBus(history_max=100)
        got: list[Mark | None] = []

        async def handler(channel: str, message: bytes, mark: Mark | None) -> None:
            got.append(mark)

        await bus.start(handler, no_gap)
        try:
            await bus.subscribe("a")
            for n in range(5):
                await bus.publish("a" if n % 2 == 0 else "b", str(n).encode())
            end = await bus.end()
            history = await bus.history(Position(), ["a"])
            assert [e.message for e in history.entries] == [b"0", b"2", b"4"]
            assert history.complete and history.end == end
            offsets = [e.mark.offset for e in history.entries]
            assert offsets == sorted(offsets) and len(set(offsets)) == 3
            later = await bus.history(Position({0: offsets[0]}), ["a", "b"])
            assert [e.message for e in later.entries] == [b"1", b"2", b"3", b"4"]
        finally:
            await bus.close()

    async def test_trimmed_history_is_reported_incomplete(self) -> None:
        bus = MemoryBus(history_max=2)
        await bus.start(lambda *_: asyncio.sleep(0), no_gap)
        try:
            await bus.publish("a", b"0")
            first = await bus.end()
            for n in range(1, 4):
                await bus.publish("a", str(n).encode())
            history = await bus.history(first, ["a"])
            assert not history.complete  # "1" was trimmed
            assert [e.message for e in history.entries] == [b"2", b"3"]
            assert (await bus.history(Position({0: history.entries[0].mark.offset}), ["a"])).complete
        finally:
            await bus.close()

    async def test_remembered_values_expire(self) -> None:
        bus = MemoryBus()
        await bus.remember("k", b"v", ttl=60)
        await bus.remember("gone", b"v", ttl=0.001)
        assert await bus.recall("k") == b"v"
        await asyncio.sleep(0.01)
        assert await bus.recall("gone") is None


def test_the_server_entry_point_settles_the_garbage_collector() -> None:
    """Importing webapp.asgi (what hypercorn does) freezes the start-up heap and raises the
    young threshold, so broadcasts stop triggering collections (see webapp/gcpolicy.py)."""
    import subprocess
    import sys

    from .harness import ROOT, instance_env, unique

    probe = "import gc, webapp.asgi; print(gc.get_threshold()[0], gc.get_freeze_count() > 10_000)"
    env = {**instance_env(unique("gc"), redis_url=None), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20000", "True"]


def test_tokens_in_urls_are_redacted_from_hypercorn_log_lines() -> None:
    record = logging.LogRecord(
        "hypercorn.access", logging.INFO, __file__, 1, '%(h)s "%(r)s" %(s)s',
        ({"h": "127.0.0.1", "r": "GET /socket.io/?EIO=4&token=abc.def-ghi&transport=polling", "s": 200},), None,
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == '127.0.0.1 "GET /socket.io/?EIO=4&token=[redacted]&transport=polling" 200'
    assert redact("GET /x?token=secret") == "GET /x?token=[redacted]"
    assert redact("no credentials here; mytoken=1") == "no credentials here; mytoken=1"


def test_hypercorn_refuses_frames_past_the_apps_own_cap() -> None:
    from hypercorn.config import Config

    from webapp.serving import frame_cap

    assert frame_cap({"MAX_PAYLOAD_BYTES": "1024"}) == 2048 == Settings(max_payload_bytes=1024).frame_cap
    assert frame_cap({"MAX_PAYLOAD_BYTES": "nonsense"}) == frame_cap({}) == 2 * 64 * 1024
    # what the Procfile's --config loads (16 MiB is hypercorn's own default)
    assert Config.from_object("webapp.serving.hypercorn").websocket_max_message_size == frame_cap()
    assert "--config python:webapp.serving.hypercorn" in (Path(__file__).parent.parent / "Procfile").read_text()


def test_hypercorns_grace_outlasts_the_drain() -> None:
    from hypercorn.config import Config

    from webapp.serving import GRACE_MARGIN, graceful_timeout

    assert graceful_timeout({"SHUTDOWN_TIMEOUT": "20"}) == 20 + GRACE_MARGIN
    assert graceful_timeout({"SHUTDOWN_TIMEOUT": "soon"}) == graceful_timeout({}) == Settings.shutdown_timeout + GRACE_MARGIN
    assert Config.from_object("webapp.serving.hypercorn").graceful_timeout == graceful_timeout()


def test_web_concurrency_sets_hypercorns_workers() -> None:
    """One worker serves in hypercorn's own process (where SIGTERM lands); more are processes of
    their own. A value the app refuses at start leaves hypercorn's default to that one line."""
    from hypercorn.config import Config

    from webapp.serving import worker_count

    assert worker_count({}) == worker_count({"WEB_CONCURRENCY": "1"}) == worker_count({"WEB_CONCURRENCY": "x"}) == 0
    assert worker_count({"WEB_CONCURRENCY": "3"}) == 3
    assert Config.from_object("webapp.serving.hypercorn").workers == worker_count()
    assert "--workers" not in (Path(__file__).parent.parent / "Procfile").read_text()  # the config decides
    with pytest.raises(ConfigError, match="WEB_CONCURRENCY"):
        Settings.from_env({"WEB_CONCURRENCY": "0"})


class TestPlanReplay:
    """What a resumed session is replayed, from the history's emits and ops, in order."""

    @staticmethod
    def entry(n: int, channel: str, **fields: Any) -> Entry:
        body = {"v": 1, "id": fields.pop("id", f"id{n}"), "ts": 1.0, "origin": {"instance": "i"}, **fields}
        return Entry(Mark(0, Offset(1_000, n)), channel, orjson.dumps(body))

    def plan(self, history: list[Entry], **kwargs: Any) -> ReplayPlan:
        return plan_replay(
            history,
            home=lambda channel, env: True,
            room_channel=lambda room: f"p:room:{room}",
            user_id="carol",
            origin="origin-sid",
            **{"kept": {}, "given": (), **kwargs},
        )

    def sent(self, plan: ReplayPlan) -> list[Any]:
        return [env.data for _, env in plan.entries]

    def test_a_room_counts_from_the_offset_it_was_joined_at(self) -> None:
        room = "p:room:r"
        history = [self.entry(n, room, scope="room", room="r", event="m", data=n) for n in (1, 2, 3)]
        assert self.sent(self.plan(history, kept={"r": Offset(1_000, 2)})) == [3]
        assert self.sent(self.plan(history, kept={"r": None})) == [1, 2, 3]
        assert self.sent(self.plan(history)) == []  # never a member

    def test_a_room_given_while_away_counts_from_the_op_that_gave_it(self) -> None:
        history = [
            self.entry(1, "p:room:r", scope="room", room="r", event="m", data="before"),
            self.entry(2, "p:user:carol", scope="user", user_id="carol", op="join", room="r"),
            self.entry(3, "p:room:r", scope="room", room="r", event="m", data="after"),
        ]
        plan = self.plan(history, given=["r"])
        assert self.sent(plan) == ["after"] and plan.rooms == {"r"} and plan.ended == set()

    def test_a_leave_op_or_a_close_ends_a_membership_however_it_began(self) -> None:
        for op in (
            self.entry(2, "p:user:carol", scope="user", user_id="carol", op="leave", room="r"),
            self.entry(2, "p:room:r", scope="room", room="r", op="close"),
        ):
            history = [
                self.entry(1, "p:room:r", scope="room", room="r", event="m", data="member"),
                op,
                self.entry(3, "p:room:r", scope="room", room="r", event="m", data="gone"),
            ]
            plan = self.plan(history, kept={"r": None})
            assert self.sent(plan) == ["member"] and plan.rooms == set() and plan.ended == {"r"}

    def test_other_targets_own_answers_and_copies_are_skipped(self) -> None:
        history = [
            self.entry(1, "p:user:dave", scope="user", user_id="dave", event="m", data="dave's"),
            self.entry(2, "p:user:carol", scope="user", user_id="carol", event="m", data="own",
                       origin={"sid": "origin-sid"}),
            self.entry(3, "p:user:carol", scope="user", user_id="carol", event="m", data="once", id="same"),
            self.entry(4, "p:user:carol", scope="user", user_id="carol", event="m", data="once", id="same"),
            self.entry(5, "p:all", scope="all", event="m", data="all"),
        ]
        plan = self.plan(history)
        assert self.sent(plan) == ["once", "all"] and plan.duplicates == 1
