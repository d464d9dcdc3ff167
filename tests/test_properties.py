"""Property-based tests: random REST bodies and socket payloads never break anything."""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp import Settings, create_app

from .harness import API_KEY, SECRET_KEY, Instance, LoopThread, Probe, instance_env, unique

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


event_names = st.text(max_size=140) | st.sampled_from(["connect", "disconnect", "newListener", "", "ok"])
rest_bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"event": event_names | scalars, "data": json_values}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"event": st.just("deep"), "data": st.integers(0, 1200).map(nested)}).map(
        lambda v: json.dumps(v).encode()
    ),
    st.text(max_size=300).map(lambda t: ('{"event": "x", "data": "' + t + '"}').encode("utf-8", "surrogatepass")),
    st.binary(max_size=50).map(lambda b: b'{"event": "x", "data": "' + b + b'"}'),
    st.integers(4000, 6000).map(lambda n: json.dumps({"event": "big", "data": "y" * n}).encode()),
)


@pytest.fixture(scope="module")
def rest() -> Iterator[tuple[LoopThread, Any]]:
    """One app on the in-memory bus, served to hypothesis through the Quart test client."""
    base = Settings.from_env({"SECRET_KEY": SECRET_KEY, "API_KEYS": API_KEY, "MAX_PAYLOAD_BYTES": "4096"})
    app = create_app(dataclasses.replace(base, drain_on_sigterm=False))
    loop = LoopThread()
    serving = app.test_app()
    loop.run(serving.__aenter__())
    try:
        yield loop, app.test_client()
    finally:
        loop.run(serving.__aexit__(None, None, None))
        loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=rest_bodies, path=st.sampled_from(["/api/emit/all", "/api/emit/authenticated", "/api/emit/users/al.ice", "/api/tokens"]))
def test_rest_bodies_get_a_clear_answer_never_a_500(rest: tuple[LoopThread, Any], body: bytes, path: str) -> None:
    loop, client = rest

    async def post() -> tuple[int, Any]:
        response = await client.post(path, data=body, headers=AUTH)
        return response.status_code, await response.get_json()

    status, answer = loop.run(post())
    assert status in (201, 202, 400, 413, 422), (status, answer)
    if status >= 400:
        assert set(answer["error"]) == {"code", "message"} and answer["error"]["message"]


socket_payloads = st.one_of(
    json_values,
    st.binary(max_size=100),
    st.lists(st.binary(max_size=10), max_size=3),
    st.integers(0, 400).map(nested),
    st.integers(60_000, 80_000).map(lambda n: "z" * n),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    st.dictionaries(st.text(max_size=5), st.binary(max_size=5) | scalars, max_size=3),
)


@pytest.fixture(scope="module")
def socket_pair() -> Iterator[tuple[LoopThread, Instance, Probe, Probe]]:
    """A real instance (Redis bus, generous rate limit) and two sockets of one user on it."""
    instance = Instance("props", instance_env(unique("props"), SOCKET_RATE="100000", SOCKET_BURST="100000")).start()
    loop = LoopThread()
    try:
        instance.wait_serving()
        from .harness import token_for

        token = loop.run(token_for(instance.url, "pat"))
        asker, other = Probe("asker"), Probe("other")
        loop.run(asker.connect(instance.url, token))
        loop.run(other.connect(instance.url, token))
        yield loop, instance, asker, other
        loop.run(asker.close())
        loop.run(other.close())
    finally:
        loop.close()
        instance.stop(signal.SIGKILL)
    assert "Traceback" not in instance.output(), instance.output()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=socket_payloads, event=st.sampled_from(["events", "stream"]))
def test_socket_payloads_get_an_answer_or_a_clear_error(
    socket_pair: tuple[LoopThread, Instance, Probe, Probe], payload: Any, event: str
) -> None:
    loop, _, asker, other = socket_pair
    ack = loop.run(asker.client.call(event, payload, timeout=10))
    if ack["ok"]:
        assert event == "events" or ack["answers"] >= 1
    else:
        assert ack["error"] in ("bad_payload", "payload_too_large"), ack
        assert loop.run(asker.wait_for("error"))[-1]["code"] == ack["error"]
    # the consumer is alive and both sockets are still served, whatever came before
    assert asker.client.connected and other.client.connected
    marker = unique("alive")
    loop.run(asker.client.call("events", marker, timeout=10))
    loop.run(other.wait_until(lambda: marker in other.of("events"), "the marker on the other socket"))
    asker.events.clear()
    other.events.clear()
