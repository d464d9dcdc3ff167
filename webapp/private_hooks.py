"""Every private hook this project takes into a library, in one place.

Each entry names the attribute, the parameters the override relies on, the version it was
checked against and who uses it. tests/test_private_hooks.py fails loudly when one is missing
or its signature changed: upgrade the pin only after looking at the new code.
"""

from __future__ import annotations

from typing import NamedTuple


class Hook(NamedTuple):
    target: str  # module:Class.attribute
    parameters: tuple[str, ...] | None  # None: an attribute, not a function
    checked_on: str
    used_by: str


HOOKS: tuple[Hook, ...] = (
    Hook("socketio:AsyncServer._send_packet", ("self", "eio_sid", "pkt"), "python-socketio 5.18.1",
         "server.GuardedServer: the recovery pid in CONNECT replies"),
    Hook("socketio:AsyncServer._handle_eio_connect", ("self", "eio_sid", "environ"), "python-socketio 5.18.1",
         "server.GuardedServer: lean sockets, a lighter environ"),
    Hook("socketio:AsyncServer._handle_eio_message", ("self", "eio_sid", "data"), "python-socketio 5.18.1",
         "server.GuardedServer: malformed packets close the client"),
    Hook("socketio:AsyncServer._handle_event", ("self", "eio_sid", "namespace", "id", "data"),
         "python-socketio 5.18.1", "server.GuardedServer: reserved event names"),
    Hook("socketio:AsyncServer._engineio_server_class", ("self",), "python-socketio 5.18.1",
         "server.GuardedServer: the LeanEngine"),
    Hook("socketio:AsyncClient._handle_connect", ("self", "namespace", "data"), "python-socketio 5.18.1",
         "client.RecoveringClient: the pid of the CONNECT reply"),
    Hook("socketio:AsyncClient._handle_event", ("self", "namespace", "id", "data"), "python-socketio 5.18.1",
         "client.RecoveringClient: strips and keeps the offset"),
    Hook("socketio:AsyncClient._get_real_value", ("self", "value"), "python-socketio 5.18.1",
         "client.RecoveringClient: auth given as a callable"),
    # The client manager's seam is public (methods a manager subclass overrides); its room table
    # `rooms[namespace][room] -> {sid: eio_sid}` is not: tests/test_private_hooks.py checks its layout.
    Hook("socketio:AsyncManager.emit",
         ("self", "event", "data", "namespace", "room", "skip_sid", "callback", "to", "kwargs"),
         "python-socketio 5.18.1", "manager.FleetManager: emits across the fleet"),
    Hook("socketio:AsyncManager.can_disconnect", ("self", "sid", "namespace"), "python-socketio 5.18.1",
         "manager.FleetManager: disconnecting a socket held elsewhere"),
    Hook("socketio:AsyncManager.enter_room", ("self", "sid", "namespace", "room", "eio_sid"),
         "python-socketio 5.18.1", "manager.FleetManager: rooms across the fleet"),
    Hook("socketio:AsyncManager.disconnect", ("self", "sid", "namespace", "kwargs"), "python-socketio 5.18.1",
         "manager.FleetManager: releasing room channels"),
    Hook("socketio.base_manager:BaseManager.basic_enter_room", ("self", "sid", "namespace", "room", "eio_sid"),
         "python-socketio 5.18.1", "propagator.Propagator: local room membership"),
    Hook("socketio.base_manager:BaseManager.basic_leave_room", ("self", "sid", "namespace", "room"),
         "python-socketio 5.18.1", "propagator.Propagator: local room membership"),
    # Overridden with a per-socket index; the override also clears the library's `callbacks`,
    # `pending_connect` and `pending_disconnect` (checked in tests/test_private_hooks.py).
    Hook("socketio.base_manager:BaseManager.basic_disconnect", ("self", "sid", "namespace", "kwargs"),
         "python-socketio 5.18.1", "manager.FleetManager: O(its rooms) per disconnect"),
    Hook("socketio.base_manager:BaseManager.get_rooms", ("self", "sid", "namespace"),
         "python-socketio 5.18.1", "manager.FleetManager: O(its rooms)"),
    Hook("engineio:AsyncServer.generate_id", ("self",), "python-engineio 4.15.1",
         "transport.LeanEngine: sids carry their instance's tag"),
    Hook("engineio:AsyncServer.create_queue", ("self", "args", "kwargs"), "python-engineio 4.15.1",
         "transport.LeanEngine: the LeanQueue"),
    Hook("engineio.async_socket:AsyncSocket.close", ("self", "wait", "abort", "reason"), "python-engineio 4.15.1",
         "transport.LeanSocket, the drain (abort: no close packet)"),
    Hook("engineio.async_socket:AsyncSocket._websocket_handler", ("self", "ws"), "python-engineio 4.15.1",
         "transport.LeanSocket: the WebSocket loops"),
    Hook("engineio.async_socket:AsyncSocket.schedule_ping", ("self",), "python-engineio 4.15.1",
         "transport.LeanSocket: pings on shared timers (Pinger)"),
    Hook("engineio.async_socket:AsyncSocket.check_ping_timeout", ("self",), "python-engineio 4.15.1",
         "transport.LeanSocket.send"),
    # frames.install swaps the stream class these protocols instantiate by their module global.
    Hook("hypercorn.protocol.h11:WSStream", None, "hypercorn 0.18.0", "frames.install: ready frames over HTTP/1.1"),
    Hook("hypercorn.protocol.h2:WSStream", None, "hypercorn 0.18.0", "frames.install: ready frames over HTTP/2"),
    # FrameStream.send_frames reads the stream's state and hands bytes to its connection's send,
    # as app_send does for a websocket.send; frames.stream_of finds the stream behind the ASGI
    # send (the bound app_send, kept by engineio's ASGI WebSocket as `asgi_send`).
    Hook("hypercorn.protocol.ws_stream:WSStream.app_send", ("self", "message"), "hypercorn 0.18.0",
         "frames.stream_of / FrameStream.send_frames"),
    Hook("hypercorn.protocol.ws_stream:WSStream.__init__",
         ("self", "app", "config", "context", "task_group", "ssl", "client", "server", "send", "stream_id"),
         "hypercorn 0.18.0", "FrameStream.send_frames: `send` and `stream_id`"),
    Hook("hypercorn.protocol.ws_stream:ASGIWebsocketState.CONNECTED", None, "hypercorn 0.18.0",
         "FrameStream.send_frames"),
    # FrameStream.handle reads whole client message frames itself and hands everything else
    # (and everything after it) to this method unchanged; it relies on `app_put` (set once
    # accepted), `connection.state`, and the cap below, which hypercorn's own path enforces too.
    Hook("hypercorn.protocol.ws_stream:WSStream.handle", ("self", "event"), "hypercorn 0.18.0",
         "FrameStream.handle: the lean reader"),
    Hook("hypercorn.config:Config.websocket_max_message_size", None, "hypercorn 0.18.0",
         "FrameStream._read: messages past it go to wsproto, which refuses them (1009)"),
    # app_queue.LeanSpawner stands in for the stream's `task_group` (set by WSStream.__init__): the
    # stream calls its spawn_app (its return value is the app's event feed) and spawn.
    Hook("hypercorn.asyncio.task_group:TaskGroup.spawn_app", ("self", "app", "config", "scope", "send"),
         "hypercorn 0.18.0", "app_queue.LeanSpawner: each WebSocket app's receive queue"),
    Hook("hypercorn.asyncio.task_group:TaskGroup.spawn", ("self", "func", "args"), "hypercorn 0.18.0",
         "app_queue.LeanSpawner"),
    Hook("hypercorn.config:Config.max_app_queue_size", None, "hypercorn 0.18.0", "app_queue.AppQueue's bound"),
    # FrameStream.write_now: the stream's `send` is H11Protocol.stream_send, whose protocol's
    # `send` is TCPServer.protocol_send, which writes to `writer` under `send_lock` and drains.
    Hook("hypercorn.protocol.h11:H11Protocol.__init__",
         ("self", "app", "config", "context", "task_group", "connection_state", "ssl", "client", "server", "send"),
         "hypercorn 0.18.0", "FrameStream.write_now: the protocol's `send`"),
    Hook("hypercorn.protocol.h11:H11Protocol.stream_send", ("self", "event"), "hypercorn 0.18.0",
         "FrameStream.write_now: a stream's Data becomes RawData for the connection, unchanged"),
    Hook("hypercorn.asyncio.tcp_server:TCPServer.__init__",
         ("self", "app", "loop", "config", "context", "state", "reader", "writer"), "hypercorn 0.18.0",
         "FrameStream.write_now: `writer` and `send_lock`"),
    Hook("hypercorn.asyncio.tcp_server:TCPServer.protocol_send", ("self", "event"), "hypercorn 0.18.0",
         "FrameStream.write_now: RawData is written under send_lock, then drained"),
    # serving.release_on_eof wraps the connection's reader: once it returns (the client's end of
    # stream), the connection's keep-alive timer `idle_task` (an AsyncioSingleTask made by
    # TCPServer.__init__, checked in tests/test_private_hooks.py) is stopped, so the connection's
    # task group ends and hypercorn closes the socket. tests/test_polling.py's
    # test_a_connection_its_client_closed_is_released_within_a_second fails when this moves.
    Hook("hypercorn.asyncio.tcp_server:TCPServer._read_data", ("self",), "hypercorn 0.18.0",
         "serving.release_on_eof: no CLOSE-WAIT until --keep-alive runs out"),
    Hook("hypercorn.asyncio.worker_context:AsyncioSingleTask.stop", ("self",), "hypercorn 0.18.0",
         "serving.release_on_eof: the keep-alive timer stopped"),
    Hook("engineio.async_drivers.asgi:WebSocket.__call__", ("self", "environ"), "python-engineio 4.15.1",
         "frames.stream_of: `asgi_send` is set from environ['asgi.send']"),
    Hook("redis.asyncio.connection:AbstractConnection.send_command", ("self", "args", "kwargs"), "redis 8.1.0",
         "bus.redis_bus: commands on the subscriber connection (check_health=False)"),
    Hook("redis.asyncio.connection:AbstractConnection.read_response",
         ("self", "disable_decoding", "timeout", "disconnect_on_error", "push_request"), "redis 8.1.0",
         "bus.redis_bus: the reader's timed reads"),
    Hook("redis.asyncio.connection:AbstractConnection.is_connected", None, "redis 8.1.0",
         "bus.redis_bus: no command on a dropped connection"),
)
