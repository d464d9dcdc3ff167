"""REST hooks, auth and probes through the app factory (in process, in-memory bus)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from webapp import Settings, create_app
from webapp.auth.tokens import TokenSigner

from .harness import API_KEY, SECRET_KEY, free_port

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def test_emit_is_accepted(client: Client) -> None:
    for path in ("/api/emit/all", "/api/emit/authenticated", "/api/emit/users/alice@example.com"):
        response = await client.post(path, json={"event": "news", "data": {"n": 1}}, headers=AUTH)
        assert response.status_code == 202, path
        body = await response.get_json()
        assert body["accepted"] is True and len(body["id"]) == 32


async def test_data_is_optional(client: Client) -> None:
    response = await client.post("/api/emit/all", json={"event": "ping"}, headers=AUTH)
    assert response.status_code == 202


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic " + API_KEY}],
)
async def test_missing_or_wrong_key_is_401(client: Client, headers: dict[str, str]) -> None:
    response = await client.post("/api/emit/all", json={"event": "x"}, headers=headers)
    assert response.status_code == 401
    assert (await response.get_json())["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_no_keys_configured_is_401(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, api_keys=()))
    async with app.test_app():
        response = await app.test_client().post("/api/emit/all", json={"event": "x"}, headers=AUTH)
    assert response.status_code == 401
    assert "API_KEYS" in (await response.get_json())["error"]["message"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe{}", b""])
async def test_malformed_json_is_400(client: Client, raw: bytes) -> None:
    response = await client.post("/api/emit/all", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert (await response.get_json())["error"]["code"] == "malformed_json"


@pytest.mark.parametrize(
    ("path", "body", "mentions"),
    [
        ("/api/emit/all", {}, "event"),
        ("/api/emit/all", {"event": ""}, "event"),
        ("/api/emit/all", {"event": "connect"}, "reserved"),
        ("/api/emit/all", {"event": "x" * 129}, "128"),
        ("/api/emit/all", {"event": 5}, "event"),
        ("/api/emit/all", {"event": "x", "extra": 1}, "extra"),
        ("/api/emit/all", [1, 2], "object"),
        ("/api/emit/users/bad%20user", {"event": "x"}, "user_id"),
        ("/api/tokens", {"user_id": "no spaces please"}, "user_id"),
        ("/api/tokens", {"user_id": "alice", "ttl": 1}, "ttl"),
        ("/api/tokens", {"user_id": "alice", "ttl": 10**9}, "ttl"),
        ("/api/tokens", {"user_id": "alice", "ttl": "soon"}, "ttl"),
    ],
)
async def test_bad_fields_are_422(client: Client, path: str, body: object, mentions: str) -> None:
    response = await client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422
    error = (await response.get_json())["error"]
    assert error["code"] == "invalid_fields" and mentions in error["message"]


async def test_oversized_body_is_413(client: Client) -> None:
    response = await client.post("/api/emit/all", json={"event": "x", "data": "y" * 5000}, headers=AUTH)
    assert response.status_code == 413
    assert (await response.get_json())["error"]["code"] == "payload_too_large"


async def test_unknown_path_is_json_404(client: Client) -> None:
    response = await client.get("/api/nothing-here", headers=AUTH)
    assert response.status_code in (401, 404)
    response = await client.get("/nothing-here")
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == "not_found"


async def test_api_token_verifies_everywhere(client: Client) -> None:
    response = await client.post("/api/tokens", json={"user_id": "bob", "ttl": 60}, headers=AUTH)
    assert response.status_code == 201
    body = await response.get_json()
    assert TokenSigner(SECRET_KEY).verify(body["token"]) == "bob"
    assert body["expires_at"].endswith("Z")


def form_token(page: str) -> str:
    """The CSRF token a page's forms carry."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return match[1]


async def test_page_login_token_logout(client: Client) -> None:
    page = await (await client.get("/")).get_data(as_text=True)
    assert 'name="username"' in page and "unit" in page
    assert (await client.get("/auth/token")).status_code == 401

    response = await client.post("/login", form={"username": "alice", "csrf_token": form_token(page)})
    assert response.status_code == 302
    page = await (await client.get("/")).get_data(as_text=True)
    assert "alice" in page and 'id="message"' in page

    response = await client.get("/auth/token")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert TokenSigner(SECRET_KEY).verify((await response.get_json())["token"]) == "alice"

    assert (await client.post("/logout")).status_code == 403  # no token: the session stays
    assert (await client.get("/auth/token")).status_code == 200
    await client.post("/logout", form={"csrf_token": form_token(page)})
    assert (await client.get("/auth/token")).status_code == 401


async def test_login_refuses_bad_names_and_cross_origin(client: Client) -> None:
    token = form_token(await (await client.get("/")).get_data(as_text=True))
    response = await client.post("/login", form={"username": "bad name!", "csrf_token": token})
    assert response.status_code == 302 and "error=" in response.headers["Location"]
    assert (await client.get("/auth/token")).status_code == 401
    response = await client.post(
        "/login", form={"username": "alice", "csrf_token": token}, headers={"Origin": "https://evil.test"}
    )
    assert response.status_code == 403


async def test_a_cross_site_form_post_cannot_log_a_browser_in(app: Quart) -> None:
    """Login CSRF: another site's page posts our login form in the victim's browser. Browsers
    send no Origin for some such posts, and the attacker cannot read our cookie: the
    double-submit token stops it."""
    victim = app.test_client()
    await victim.get("/")  # the victim visited us once: the browser holds our CSRF cookie
    for form in ({"username": "mallory"}, {"username": "mallory", "csrf_token": "guessed"}):
        response = await victim.post("/login", form=form)  # no Origin, no Referer
        assert response.status_code == 403
        assert (await response.get_json())["error"]["code"] == "forbidden"
    assert (await victim.get("/auth/token")).status_code == 401
    stranger = app.test_client()  # never saw our page: no cookie at all
    assert (await stranger.post("/login", form={"username": "mallory", "csrf_token": ""})).status_code == 403


async def test_demo_login_can_be_disabled(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, demo_login=False))
    async with app.test_app():
        client = app.test_client()
        assert (await client.post("/login", form={"username": "alice"})).status_code == 404
        assert "disabled" in await (await client.get("/")).get_data(as_text=True)


async def test_probes_on_memory_bus(client: Client) -> None:
    assert (await client.get("/healthz")).status_code == 200
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = await response.get_json()
    # what a load balancer needs, nothing more: no errors, no counters
    assert body == {"ready": True, "bus": {"kind": "memory", "connected": True}}
    assert (await client.get("/api/status")).status_code == 401
    details = await (await client.get("/api/status", headers=AUTH)).get_json()
    assert details["ready"] is True and details["instance"] == "unit" and details["bus"]["kind"] == "memory"
    assert "sockets" in details and "outbox" in details


async def test_bus_unavailable_is_503_never_202(settings: Settings) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    app: Quart = create_app(dataclasses.replace(settings, redis_url=closed, redis_timeout=0.5))
    async with app.test_app():
        client = app.test_client()
        for path in ("/api/emit/all", "/api/emit/authenticated", "/api/emit/users/alice"):
            response = await client.post(path, json={"event": "x"}, headers=AUTH)
            assert response.status_code == 503, path
            assert (await response.get_json())["error"]["code"] == "bus_unavailable"
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/")).status_code == 200


async def test_deeply_nested_data_is_422_not_500(client: Client) -> None:
    deep = b'{"event": "x", "data": ' + b"[" * 400 + b"]" * 400 + b"}"
    response = await client.post("/api/emit/all", data=deep, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422
    too_deep = b'{"event": "x", "data": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    response = await client.post("/api/emit/all", data=too_deep, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400


async def test_batches_are_validated_whole_and_name_the_bad_indexes(client: Client) -> None:
    good = {"scope": "all", "event": "news", "data": 1}
    cases = [
        ({"events": [good, {"scope": "user", "event": "dm"}, good, {"scope": "room", "room": "user:x", "event": "e"}]},
         ["events.1", "events.3"]),
        ({"events": [good, {"scope": "all", "event": "connect"}]}, ["events.1.all.event"]),
        ({"events": [good, {"scope": "everyone", "event": "e"}]}, ["events.1", "'scope'", "'everyone'"]),
        ({"events": []}, ["events"]),
        ({"events": [{"scope": "all", "event": "e"}] * 101}, ["events: at most 100"]),
        ({"user_ids": ["ok", "bad id"], "event": "e"}, None),
    ]
    for body, named in cases:
        path = "/api/emit/users" if "user_ids" in body else "/api/emit/batch"
        response = await client.post(path, json=body, headers=AUTH)
        assert response.status_code == 422, body
        message = (await response.get_json())["error"]["message"]
        for part in named or ["user_ids.1"]:
            assert part in message, (part, message)
    nested: object = 1
    for _ in range(300):
        nested = [nested]
    response = await client.post("/api/emit/batch", json={"events": [good, {**good, "data": nested}]}, headers=AUTH)
    assert response.status_code in (400, 422)  # too deep for the JSON parser or the encoder: nothing sent
    assert (await client.post("/api/emit/batch", json={"events": [good]})).status_code == 401


async def test_a_batch_is_answered_with_one_id_per_event(client: Client) -> None:
    events = [
        {"scope": "all", "event": "a"},
        {"scope": "authenticated", "event": "b", "data": [1]},
        {"scope": "user", "user_id": "alice", "event": "c"},
        {"scope": "room", "room": "team:red", "event": "d"},
    ]
    response = await client.post("/api/emit/batch", json={"events": events}, headers=AUTH)
    assert response.status_code == 202
    body = await response.get_json()
    assert body["accepted"] is True and len(body["ids"]) == 4 and len(set(body["ids"])) == 4
    response = await client.post("/api/emit/users", json={"user_ids": ["a", "b", "a"], "event": "e"}, headers=AUTH)
    assert response.status_code == 202 and len((await response.get_json())["ids"]) == 2  # once per user


async def test_metrics_are_prometheus_text_with_bounded_labels(client: Client) -> None:
    for path, body in (("/api/emit/users/alice-secret-id", {"event": "dm"}), ("/api/emit/all", {"event": "news"})):
        assert (await client.post(path, json=body, headers=AUTH)).status_code == 202
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = await response.get_data(as_text=True)
    for name in (
        "webapp_sockets 0.0", "webapp_ready 1.0", 'webapp_publishes_total{outcome="ok"} 2.0',
        "webapp_publish_seconds_bucket", "webapp_delivery_lag_seconds_count", "webapp_outbox_depth",
        "webapp_malformed_packets_total", 'webapp_recoveries_total{outcome="recovered"} 0.0',
    ):
        assert name in text, name
    assert "alice-secret-id" not in text  # no user ids (or room names) as labels
