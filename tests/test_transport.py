"""LeanQueue: the subset of asyncio.Queue that Engine.IO relies on, including cancellation."""

from __future__ import annotations

import asyncio

import pytest

from webapp.realtime.transport import LeanQueue


async def test_items_come_out_in_order_and_getters_wait() -> None:
    queue = LeanQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    for item in ("a", "b", "c"):
        queue.put_nowait(item)
    assert await asyncio.wait_for(getter, 1) == "a"
    assert queue.get_nowait() == "b"
    assert await queue.get() == "c"
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_a_timed_out_getter_loses_nothing() -> None:
    """Engine.IO's long-polling path wraps get() in wait_for; a timeout must not eat an item."""
    queue = LeanQueue()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), 0.01)
    queue.put_nowait("kept")
    assert queue.qsize() == 1
    assert await asyncio.wait_for(queue.get(), 1) == "kept"


async def test_a_woken_getter_that_is_cancelled_passes_the_item_on() -> None:
    queue = LeanQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("only")  # wakes `first`...
    first.cancel()  # ...which leaves before it runs
    assert await asyncio.wait_for(second, 1) == "only"


async def test_join_waits_for_every_task_done() -> None:
    queue = LeanQueue()
    await asyncio.wait_for(queue.join(), 1)  # nothing unfinished: returns at once
    queue.put_nowait(1)
    queue.put_nowait(2)
    joined = asyncio.create_task(queue.join())
    queue.get_nowait()
    queue.task_done()
    await asyncio.sleep(0)
    assert not joined.done()
    queue.get_nowait()
    queue.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError, match="too many"):
        queue.task_done()


async def test_a_discarded_queue_releases_joiners_and_drops_later_items() -> None:
    """When the writer is gone, close(wait=True) must not wait for packets nobody will write."""
    queue = LeanQueue()
    queue.put_nowait("close")
    joined = asyncio.create_task(queue.join())
    await asyncio.sleep(0)
    assert not joined.done()
    queue.discard()
    await asyncio.wait_for(joined, 1)
    queue.put_nowait("late")
    assert queue.qsize() == 0
    await asyncio.wait_for(queue.join(), 1)


def test_packets_use_orjson_but_accept_what_the_library_accepted() -> None:
    from webapp.realtime import jsoncodec

    assert jsoncodec.dumps({"a": [1, "é"], 2: None}, separators=(",", ":")) == '{"a":[1,"é"],"2":null}'
    assert jsoncodec.dumps(2**70) == str(2**70)  # beyond orjson: the library's codec
    assert jsoncodec.dumps(float("nan")) == "null"  # never a bare NaN that JSON.parse rejects
    assert jsoncodec.loads('{"n": 123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    with pytest.raises(ValueError, match="too large"):
        jsoncodec.loads("9" * 200)  # the library's guard against huge integers still holds
    with pytest.raises(TypeError):
        jsoncodec.dumps({"x": object()})


async def test_sockets_of_our_engine_are_adopted_and_others_are_left_alone() -> None:
    import engineio
    from engineio.async_socket import AsyncSocket

    from webapp.realtime.server import GuardedServer
    from webapp.realtime.transport import LeanEngine, LeanSocket

    assert isinstance(GuardedServer(async_mode="asgi").eio, LeanEngine)  # what the app serves with
    ours = AsyncSocket(LeanEngine(async_mode="asgi"), "a")
    LeanSocket.adopt(ours)
    assert type(ours) is LeanSocket and isinstance(ours.queue, LeanQueue)
    stock = AsyncSocket(engineio.AsyncServer(async_mode="asgi"), "b")
    LeanSocket.adopt(stock)  # its asyncio.Queue lacks discard(): the lean loops must not run on it
    assert type(stock) is AsyncSocket


class _IdleConnection:
    """What `LeanSocket.flush` writes to while the writer task sleeps: it takes every write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write_now(self, data: bytes) -> bool:
        self.written.append(data)
        return True


async def test_a_close_that_waits_waits_for_frames_held_until_the_loop_turn_ends() -> None:
    """An event sent in the same loop turn as a waiting close (the SIGTERM drain closes every
    socket so) is held on the socket until the turn ends; the close returns only once it has
    been written."""
    from engineio import packet as eio_packet
    from engineio.async_socket import AsyncSocket

    from webapp.realtime import frames
    from webapp.realtime.transport import LeanEngine, LeanSocket

    sock = AsyncSocket(LeanEngine(async_mode="asgi"), "a")
    LeanSocket.adopt(sock)
    assert isinstance(sock, LeanSocket)
    connection = _IdleConnection()
    sock.connected = sock.upgraded = True  # a WebSocket whose writer is idle
    sock._idle_stream = connection  # type: ignore[assignment]
    event = eio_packet.Packet(eio_packet.MESSAGE, '2["news",{"i":1}]')
    sock.push((event,))
    assert connection.written == []  # held until this turn ends

    async with asyncio.timeout(2):  # not wait_for: its task would start after the flush
        await sock.close(wait=True, abort=True, reason="server shutting down")
    assert connection.written == [frames.frame_of(event)]
    assert sock.closed


async def test_the_app_queue_is_a_bounded_fifo_whose_put_waits_while_full() -> None:
    from webapp.realtime.app_queue import AppQueue

    queue = AppQueue(2)
    await queue.put("a")
    await queue.put("b")
    third = asyncio.create_task(queue.put("c"))
    await asyncio.sleep(0)
    assert not third.done() and queue.qsize() == 2  # full: the producer waits (hypercorn stops reading)
    assert await queue.get() == "a"
    await asyncio.wait_for(third, 1)
    assert [await queue.get(), await queue.get()] == ["b", "c"]

    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    await queue.put("d")
    assert await asyncio.wait_for(getter, 1) == "d"


async def test_an_app_queue_waiter_that_is_cancelled_loses_nothing() -> None:
    from webapp.realtime.app_queue import AppQueue

    queue = AppQueue(0)  # unbounded, as hypercorn's max_app_queue_size <= 0 means
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.put("x")  # wakes `first`...
    first.cancel()  # ...which leaves before taking it: `second` gets it
    assert await asyncio.wait_for(second, 1) == "x"
    with pytest.raises(asyncio.CancelledError):
        await first
    for n in range(100):
        await queue.put(n)
    assert queue.qsize() == 100
