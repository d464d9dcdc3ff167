"""The queue between hypercorn and the app for each WebSocket, in a tenth of the memory.

hypercorn gives every ASGI connection an `asyncio.Queue` of the events the app has not received
yet (bounded by `max_app_queue_size`). An idle `asyncio.Queue` holds three deques and an Event
with one more: about 3 KiB, a tenth of what an idle socket costs here, for a queue that rarely
holds a message. `AppQueue` is the same bounded FIFO in a few lists; `LeanSpawner` hands one to
each app that `FrameStream` (webapp/realtime/frames.py) starts. HTTP requests keep hypercorn's.
The hypercorn internals this relies on are listed in webapp/private_hooks.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.config import Config


class AppQueue:
    """A bounded FIFO (`limit` <= 0: unbounded) for one producer and one consumer, as
    `asyncio.Queue`'s `put` and `get` behave: `put` waits while it is full."""

    __slots__ = ("_getters", "_items", "_limit", "_putters")

    def __init__(self, limit: int) -> None:
        self._items: list[Any] = []
        self._limit = limit
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []

    def qsize(self) -> int:
        return len(self._items)

    async def put(self, item: Any) -> None:
        while 0 < self._limit <= len(self._items):
            await _wait_in(self._putters)
        self._items.append(item)
        _wake_first(self._getters)

    async def get(self) -> Any:
        while not self._items:
            await _wait_in(self._getters)
        item = self._items.pop(0)
        _wake_first(self._putters)
        return item


async def _wait_in(waiters: list[asyncio.Future[None]]) -> None:
    """Wait until woken. A waiter woken but cancelled passes the wake-up on: nothing stalls,
    and a wake-up nobody needed costs only a look (every waiter checks again)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except BaseException:
        if waiter in waiters:
            waiters.remove(waiter)
        elif not waiter.cancelled():
            _wake_first(waiters)
        raise


def _wake_first(waiters: list[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return


class Started:
    """How many apps got an `AppQueue` (the status shows it: 0 with WebSockets open would mean
    hypercorn no longer starts apps through `spawn_app`, and every socket pays for its queue)."""

    apps = 0


STARTED = Started()


class LeanSpawner:
    """A connection's hypercorn task group, seen by one WebSocket stream: apps it starts
    receive from an `AppQueue`; everything else goes to the task group itself."""

    def __init__(self, group: TaskGroup) -> None:
        self._group = group

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._group.spawn(func, *args)

    async def spawn_app(
        self, app: Any, config: Config, scope: dict[str, Any], send: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """Start `app` for this stream's scope, as hypercorn's task group does; return the
        coroutine function that hands it events (the stream awaits it, so a full queue
        stops the stream reading from the connection)."""
        queue = AppQueue(config.max_app_queue_size)
        self._group.spawn(_run_app, app, config, scope, queue.get, send)
        STARTED.apps += 1
        return queue.put


async def _run_app(
    app: Any,
    config: Config,
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    """Run an app to its end: its failure is logged as hypercorn logs it, and the stream is
    told the app is done (`send(None)`) however it ended."""
    try:
        await app(scope, receive, send, _no_sync_spawn, _no_call_soon)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - any failure of the app is logged, as hypercorn does
        await config.log.exception("Error in ASGI Framework")
    finally:
        await send(None)


# hypercorn's app wrappers take two helpers for synchronous (WSGI) apps, which never serve a
# WebSocket (hypercorn's WSGI wrapper closes one at once); shared functions, not a pair of
# closures kept for every socket's lifetime.
def _no_sync_spawn(*args: Any) -> Any:
    raise RuntimeError("a WebSocket app runs on the event loop, not in a thread")


def _no_call_soon(*args: Any) -> Any:
    raise RuntimeError("a WebSocket app runs on the event loop, not in a thread")


def lean_group(group: Any) -> Any:
    """`group`, wrapped when it is asyncio hypercorn's task group (a trio worker's is left alone:
    `AppQueue` waits on asyncio futures)."""
    return LeanSpawner(group) if isinstance(group, TaskGroup) else group
