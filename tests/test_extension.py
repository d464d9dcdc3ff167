"""`Realtime` as a Quart extension in another app: the README's example, run on two real instances."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from quart import Quart

from bench.cluster import forget
from webapp.auth.tokens import TokenSigner
from webapp.realtime import Realtime

from .harness import REDIS_URL, ROOT, Instance, Probe, unique

SECRET = "example-secret-0123456789abcdef"


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", readme, re.DOTALL)
    assert found, "README.md lost its example block"
    return found.group(1)


def test_the_readme_example_is_short() -> None:
    code = [line for line in readme_example().splitlines() if line.strip() and not line.startswith(("from ", "import "))]
    assert len(code) <= 10, code


def test_gateways_belong_to_the_app_that_declares_them() -> None:
    app = Quart(__name__)
    app.config.update(SECRET_KEY=SECRET, REALTIME_CHANNEL_PREFIX="ext-unit")
    realtime = Realtime()

    @realtime.gateway("before")
    async def before(sid: str, data: object) -> object:
        return data

    realtime.init_app(app)

    @realtime.gateway("after")
    async def after(sid: str, data: object) -> object:
        return data

    handlers = realtime.sio.handlers["/"]
    assert {"before", "after", "connect", "join"} <= set(handlers)
    assert "events" not in handlers and "stream" not in handlers  # the demo's, not the core's
    assert realtime.settings.channel_prefix == "ext-unit" and realtime.settings.redis_url is None
    with pytest.raises(ValueError, match="registered already"):
        realtime.gateway("after")(after)
    for taken in ("connect", "join", "disconnect"):  # the server's own, and Socket.IO's reserved names
        with pytest.raises(ValueError):
            realtime.gateway(taken)
    assert app.extensions["tokens"] is realtime.signer


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[list[Instance], str]]:
    (tmp_path / "example.py").write_text(readme_example())
    prefix = unique("example")
    env = {
        "PYTHONPATH": str(tmp_path),
        "QUART_SECRET_KEY": SECRET,
        "QUART_REALTIME_REDIS_URL": REDIS_URL,
        "QUART_REALTIME_CHANNEL_PREFIX": prefix,
    }
    instances = [Instance(name, env, app="example:asgi").start() for name in ("A", "B")]
    try:
        for instance in instances:
            # The example has no /healthz: Engine.IO answering a handshake says it serves.
            instance.wait_answering("/socket.io/?EIO=4&transport=polling", body=b"0{")
        yield instances, prefix
    finally:
        for instance in instances:
            instance.stop()
        client = redis.Redis.from_url(REDIS_URL)
        forget(client, prefix)
        client.close()


@pytest.mark.cluster
async def test_the_readme_example_propagates_a_gateway_answer_across_instances(
    example: tuple[list[Instance], str],
) -> None:
    (a, b), _ = example
    token = TokenSigner(SECRET).mint("alice", 600).value
    here, there, bob = Probe("alice@A"), Probe("alice@B"), Probe("bob@A")
    try:
        await here.connect(a.url, token)
        await there.connect(b.url, token)
        ack = await here.client.call("chat", {"text": "hi"}, timeout=10)
        assert ack == {"ok": True, "answers": 1}
        assert await here.wait_for("chat") == [{"echo": {"text": "hi"}}]
        assert await there.wait_for("chat") == [{"echo": {"text": "hi"}}]  # through Redis
        await bob.connect(a.url, TokenSigner(SECRET).mint("bob", 600).value)  # beside alice's first socket
        await bob.client.call("chat", {"text": "mine"}, timeout=10)
        assert await bob.wait_for("chat") == [{"echo": {"text": "mine"}}]
        # A fence without the REST hooks the example lacks: alice's second socket answers, and
        # her first gets it through Redis after anything published before it (one Redis node:
        # A consumes in publish order), bob's answer included, had it been sent her way.
        await there.client.call("chat", {"text": "later"}, timeout=10)
        await here.wait_for("chat", 2)
        for probe in (here, there):  # each answer once, and bob's never
            assert probe.of("chat") == [{"echo": {"text": "hi"}}, {"echo": {"text": "later"}}], probe.name
        assert bob.of("chat") == [{"echo": {"text": "mine"}}]  # bob's answer is bob's alone
    finally:
        for probe in (here, there, bob):
            await probe.close()
