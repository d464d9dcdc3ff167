"""Official Socket.IO JavaScript clients in a node process, recorded line by line for async tests.

Connection state recovery lives in the JavaScript client (it keeps the session id and the last offset it
saw and sends them back when it reconnects); python-socketio's client does not implement it, so tests of
recovery drive the real `socket.io-client` from npm through `tests/js/clients.mjs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .harness import WAIT

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "clients.mjs"
_STDERR_KEPT = 8000  # characters of node's stderr kept for error messages
_LINE_LIMIT = 64 * 1024 * 1024  # one stdout line is one event: let big payloads through


def node_or_fail() -> str:
    """Where `node` is, or a clear error: the JS clients are part of the suite, never skipped."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: run scripts/test.sh (it installs nodejs and npm)")
    if not (JS_DIR / "node_modules" / "socket.io-client" / "package.json").is_file():
        raise RuntimeError(
            f"{JS_DIR / 'node_modules'} has no socket.io-client: run scripts/test.sh "
            "(or `npm ci --prefix tests/js`)"
        )
    return node


def client_spec(
    name: str, token: str | None = None, *, recover: bool = False, transports: Sequence[str] = ("websocket",)
) -> dict[str, Any]:
    """One entry of `clients` for JsClients.start, with the defaults spelled out."""
    return {"name": name, "token": token, "recover": recover, "transports": list(transports)}


class JsClients:
    """A node process holding one socket.io-client socket per configured client.

    Every line the process prints is kept, in arrival order, per client; `wait_until` wakes up on each
    new line instead of polling. Use `await JsClients.start(...)` and `await clients.close()` (or
    `async with await JsClients.start(...) as clients:`).
    """

    def __init__(self, proc: asyncio.subprocess.Process, names: Sequence[str]) -> None:
        self.proc = proc
        self.names = list(names)
        self.records: list[dict[str, Any]] = []  # every stdout line, decoded, in arrival order
        self.by_client: dict[str, list[dict[str, Any]]] = {name: [] for name in self.names}
        self.ready = False
        self._stderr = ""
        self._changed = asyncio.Event()
        self._stdout_done = False
        self._closed = False
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="jsclients-stdout"),
            asyncio.create_task(self._read_stderr(), name="jsclients-stderr"),
        ]

    @classmethod
    async def start(
        cls, url: str, clients: Sequence[Mapping[str, Any]], *, wait_ready: bool = True, timeout: float = WAIT
    ) -> JsClients:
        """Spawn `node tests/js/clients.mjs CONFIG`; with `wait_ready`, return once every client connected.

        Each client is a mapping with "name" and optionally "token" (None: anonymous), "recover"
        (default False) and "transports" (default ["websocket"]); see `client_spec`.
        """
        node = node_or_fail()
        specs = [
            client_spec(
                str(c["name"]),
                c.get("token"),
                recover=bool(c.get("recover", False)),
                transports=c.get("transports", ("websocket",)),
            )
            for c in clients
        ]
        config = json.dumps({"url": url, "clients": specs})
        proc = await asyncio.create_subprocess_exec(
            node,
            str(SCRIPT),
            config,
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        running = cls(proc, [s["name"] for s in specs])
        if wait_ready:
            try:
                await running.wait_ready(timeout)
            except BaseException:
                await running.close()
                raise
        return running

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    record = json.loads(line)
                except ValueError:  # not ours (a library printing to stdout): keep it for error messages
                    self._stderr = (self._stderr + f"[stdout] {line.decode(errors='replace')}")[
                        -_STDERR_KEPT:
                    ]
                    continue
                self.records.append(record)
                client = record.get("client")
                if client is None and record.get("type") == "ready":
                    self.ready = True
                elif client is not None:
                    self.by_client.setdefault(client, []).append(record)
                self._changed.set()
        finally:
            self._stdout_done = True  # the process is gone (or going): waiters must stop waiting
            self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self._stderr = (self._stderr + chunk.decode(errors="replace"))[-_STDERR_KEPT:]

    # -- what the clients saw ---------------------------------------------------------------------------

    def of_type(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.by_client.get(name, []) if r["type"] == kind]

    def events(self, name: str) -> list[tuple[str, list[Any]]]:
        """Every event client `name` received: (event, args), args exactly as the client got them."""
        return [(r["event"], r["args"]) for r in self.of_type(name, "event")]

    def of(self, name: str, event: str) -> list[list[Any]]:
        """The args of every `event` client `name` received, in order."""
        return [args for ev, args in self.events(name) if ev == event]

    def connects(self, name: str) -> list[dict[str, Any]]:
        """Each connection of client `name`: {"type": "connect", "id", "recovered", "client", "t"}."""
        return self.of_type(name, "connect")

    def disconnects(self, name: str) -> list[str]:
        return [r["reason"] for r in self.of_type(name, "disconnect")]

    def connect_errors(self, name: str) -> list[dict[str, Any]]:
        return self.of_type(name, "connect_error")

    @property
    def stderr(self) -> str:
        return self._stderr

    def _context(self) -> str:
        lines = "\n".join(json.dumps(r) for r in self.records[-50:])
        status = "running" if self.proc.returncode is None else f"exited with {self.proc.returncode}"
        return f"node {status}; last records:\n{lines}\nnode stderr:\n{self._stderr or '(empty)'}"

    # -- waiting and driving ----------------------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
        """Wait, woken by each new line, until `predicate()` holds; fail with context after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if self._stdout_done:
                await self._reap()
                raise AssertionError(f"node exited while waiting for {what}; {self._context()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self._context()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_ready(self, timeout: float = WAIT) -> None:
        await self.wait_until(lambda: self.ready, "every client's first connect", timeout)

    async def _send(self, command: Mapping[str, Any]) -> None:
        stdin = self.proc.stdin
        if self._closed or stdin is None or stdin.is_closing() or self.proc.returncode is not None:
            raise RuntimeError(f"the JS clients are not running; {self._context()}")
        stdin.write(json.dumps(command).encode() + b"\n")
        await stdin.drain()

    async def emit(self, client: str, event: str, data: Any = None) -> None:
        """`socket.emit(event, data)` on client `client` (fire and forget, like the JS call)."""
        if client not in self.by_client:
            raise ValueError(f"no client named {client!r}; have {self.names}")
        await self._send({"cmd": "emit", "client": client, "event": event, "data": data})

    async def _reap(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self, timeout: float = 5.0) -> int | None:
        """Close every socket and wait for node to exit (killed after `timeout`); returns its exit code."""
        if not self._closed:
            self._closed = True
            stdin = self.proc.stdin
            if self.proc.returncode is None and stdin is not None and not stdin.is_closing():
                with contextlib.suppress(ConnectionError):
                    stdin.write(b'{"cmd": "close"}\n')
                    await stdin.drain()
                stdin.close()  # node leaves on EOF too, should the command have been lost
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            for reader in self._readers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader, timeout)  # pipes hit EOF once the process is gone
        return self.proc.returncode
