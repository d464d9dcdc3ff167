"""One real instance: the in-memory product mode, Redis unreachable, bad configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import pytest
import socketio

from .harness import (
    API_KEY,
    ROOT,
    Instance,
    Probe,
    api,
    fence,
    free_port,
    http_get,
    instance_env,
    token_for,
    unique,
    wait_until,
    without_fences,
)

pytestmark = pytest.mark.cluster


async def test_memory_bus_delivers_on_one_instance() -> None:
    instance = Instance("solo", instance_env(unique("solo"), redis_url=None)).start()
    alice = Probe("alice")
    anon = Probe("anon")
    try:
        instance.wait_serving()
        assert "in-memory bus" in instance.output()
        await alice.connect(instance.url, await token_for(instance.url, "alice"))
        await anon.connect(instance.url)
        assert (await api(instance.url, "/api/emit/users/alice", {"event": "dm", "data": 1}))[0] == 202
        assert (await api(instance.url, "/api/emit/authenticated", {"event": "members"}))[0] == 202
        await fence(instance.url, [alice, anon])
        assert without_fences(alice) == [("dm", 1), ("members", None)]
        assert without_fences(anon) == []
    finally:
        await alice.close()
        await anon.close()
        instance.stop()


async def test_redis_unreachable_gives_503_and_the_process_keeps_serving() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    instance = Instance("lonely", instance_env(unique("down"), redis_url=closed)).start()
    anon = Probe("anon")
    try:
        instance.wait_serving(ready=False)
        status, body = instance.readyz()
        assert status == 503 and body["ready"] is False and body["bus"]["connected"] is False
        for path in ("/api/emit/all", "/api/emit/authenticated", "/api/emit/users/alice"):
            status, answer = await api(instance.url, path, {"event": "x"})
            assert status == 503 and answer["error"]["code"] == "bus_unavailable", path
        # sockets are still accepted (subscriptions are made on recovery), and answered directly
        await anon.connect(instance.url)
        assert await anon.client.call("events", "echo", timeout=10) == {"ok": True, "answers": 1}
        assert await anon.wait_for("events") == ["echo"]
        assert http_get(instance.url + "/healthz")[0] == 200
        assert instance.proc is not None and instance.proc.poll() is None
    finally:
        await anon.close()
        instance.stop()


def test_a_graceful_timeout_shorter_than_the_drain_is_a_clear_error() -> None:
    instance = Instance("grace", instance_env(unique("grace"), SHUTDOWN_TIMEOUT="20"), args=("--graceful-timeout", "15"))
    instance.start()
    try:
        assert instance.proc is not None
        assert instance.proc.wait(30) == 2
        output = instance.output()
        assert "webapp: configuration error: SHUTDOWN_TIMEOUT (20s) exceeds hypercorn's --graceful-timeout (15s)" in output
        assert "Traceback" not in output
    finally:
        instance.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "http://nope"}, "REDIS_URL must start with"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": ""}, "SECRET_KEY must be set"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": "short"}, "every key of SECRET_KEY / SECRET_KEYS must be at least 16"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": "k" * 32, "API_KEYS": ""}, "API_KEYS must be set"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": "k" * 32, "API_KEYS": "a" * 20 + ",short"},
         "every key of API_KEYS must be at least 16 characters"),
        ({"WEBAPP_ENV": "production", "SECRET_KEYS": "k" * 32 + ",tiny", "API_KEYS": "a" * 20},
         "every key of SECRET_KEY / SECRET_KEYS must be at least 16"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": "dev-insecure-secret-key-change-me", "API_KEYS": "a" * 20},
         "SECRET_KEY / SECRET_KEYS holds the public development key"),
        ({"WEBAPP_ENV": "production", "SECRET_KEY": "k" * 32, "API_KEYS": "a" * 20, "CORS_ORIGINS": "https://a.test,*"},
         "CORS_ORIGINS must list explicit origins in production"),
        ({"REDIS_URL": "rediss://127.0.0.1:6380/0", "REDIS_TLS_VERIFY": "sometimes"}, "REDIS_TLS_VERIFY must be"),
        ({"REDIS_TLS_CA": "/nonexistent/ca.pem"}, "REDIS_TLS_CA must name a CA bundle file"),
        ({"SOCKET_WRITE_TIMEOUT": "0"}, "SOCKET_WRITE_TIMEOUT must be between"),
        ({"TOKEN_TTL": "999999"}, "TOKEN_TTL must be between 10 and 604800"),
        ({"PING_INTERVAL": "1.5"}, "PING_INTERVAL must be an integer"),
    ],
)
def test_bad_configuration_is_a_clear_error(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import webapp.asgi"],
        check=False,
        cwd=ROOT,
        env={**instance_env("cfg"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"webapp: configuration error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_cors_origins_are_explicit() -> None:
    instance = Instance("cors", instance_env(unique("cors"), CORS_ORIGINS="https://app.test")).start()
    allowed, refused = Probe("allowed"), Probe("refused")
    try:
        instance.wait_serving()
        await allowed.client.connect(instance.url, headers={"Origin": "https://app.test"}, transports=["websocket"])
        assert allowed.client.connected
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.client.connect(
                instance.url, headers={"Origin": "https://other.test"}, transports=["websocket"], wait_timeout=5
            )
    finally:
        await allowed.close()
        await refused.close()
        instance.stop()


async def test_query_tokens_can_be_refused_and_never_reach_a_log() -> None:
    """With hypercorn's access log on and logging query strings (its default format does not), a
    handshake URL's token is redacted; ALLOW_QUERY_TOKEN=0 makes a query token count for nothing
    (the socket is anonymous)."""
    strict = Instance(
        "strict", instance_env(unique("query"), redis_url=None, ALLOW_QUERY_TOKEN="0"),
        args=("--access-logfile", "-", "--access-logformat", '%(h)s "%(m)s %(U)s?%(q)s" %(s)s'),
    ).start()
    probes = [Probe("query"), Probe("auth")]
    try:
        strict.wait_serving()
        token = await token_for(strict.url, "alice")
        await probes[0].connect(strict.url, token, how="query", transports=("polling", "websocket"))
        assert (await probes[0].client.call("whoami", timeout=10))["user_id"] is None
        await probes[1].connect(strict.url, token)  # auth.token is not a URL: still accepted
        assert (await probes[1].client.call("whoami", timeout=10))["user_id"] == "alice"
        log = strict.output()
        assert "GET /socket.io/?" in log and "token=[redacted]" in log, log
        assert token not in log
    finally:
        for probe in probes:
            await probe.close()
        strict.stop()


async def test_json_logs_carry_the_instance_and_the_request_id() -> None:
    instance = Instance(
        "jsonlog", instance_env(unique("jsonlog"), redis_url=None, LOG_FORMAT="json", ACCESS_LOG="1")
    ).start()
    try:
        instance.wait_serving()
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "req-42"}
            async with session.post(instance.url + "/api/emit/all", json={"event": "news"}, headers=headers) as reply:
                assert reply.status == 202 and reply.headers["X-Request-Id"] == "req-42"
            async with session.post(
                instance.url + "/api/tokens", json={"user_id": "alice"}, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as reply:
                minted = (await reply.json())["token"]
                generated = reply.headers["X-Request-Id"]
        assert len(generated) == 32  # none given: one is made
        await wait_until(lambda: '"req-42"' in instance.output(), "the access line")
        ours = [json.loads(line) for line in instance.output().splitlines() if line.startswith("{")]
        access = [line for line in ours if line["logger"] == "webapp.access"]
        assert {"request_id": "req-42", "path": "/api/emit/all", "status": 202, "instance": "jsonlog"}.items() <= access[0].items()
        assert any(line.get("request_id") == generated for line in access)
        assert all({"ts", "level", "logger", "message", "instance"} <= line.keys() for line in ours)
        assert any(line["logger"] == "webapp.config" for line in ours)  # the start-up warnings too
        assert minted not in instance.output()
    finally:
        instance.stop()
