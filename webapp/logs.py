"""Logging: our lines on stderr when nobody configured logging, one JSON object per line with
LOG_FORMAT=json, request ids, and no token in any log line."""

from __future__ import annotations

import logging
import os
import re
import time
from contextvars import ContextVar

import orjson
from quart import Quart, Response, g, request

# `token=<value>` in a query string (a handshake URL): the value is a bearer credential.
_TOKEN_IN_URL = re.compile(r"((?:^|[?&\s\"])token=)[^&\s\"]+")
# Loggers that may print request URLs: hypercorn's access log (when enabled) and its errors.
_URL_LOGGERS = ("hypercorn.access", "hypercorn.error")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("webapp.access")


def redact(text: str) -> str:
    """The text with every `token=` value in it replaced."""
    return _TOKEN_IN_URL.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Rewrites a record whose message holds a token in a URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = redact(message), None
        return True


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, instance, and the request id."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self._instance = instance

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "instance": self._instance,
        }
        rid = request_id.get()
        if rid is not None:
            line["request_id"] = rid
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def install(instance: str, json_lines: bool = False) -> None:
    """Redact tokens from the loggers that print URLs; show our INFO lines on stderr when nobody
    configured logging (hypercorn configures only its own); with `json_lines`, every line of
    ours and hypercorn's is a JSON object."""
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
    root, ours = logging.getLogger(), logging.getLogger("webapp")
    if not (root.handlers or ours.handlers):
        stderr = logging.StreamHandler()
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(stderr)
        ours.setLevel(logging.INFO)
    if json_lines:
        for logger in (ours, root, *(logging.getLogger(name) for name in _URL_LOGGERS)):
            for handler in logger.handlers:
                handler.setFormatter(JsonLines(instance))


def track_requests(app: Quart, *, access: bool) -> None:
    """Give every request an id (the client's X-Request-Id if it is sane, else a new one), echo
    it in X-Request-Id, and with `access` log one line per /api/* request."""

    @app.before_request
    async def assign() -> None:
        given = request.headers.get("X-Request-Id", "")
        request_id.set(given if _REQUEST_ID.match(given) else os.urandom(16).hex())  # uuid4's hex at a fifth of its CPU
        g.request_started = time.perf_counter()

    @app.after_request
    async def echo(response: Response) -> Response:
        rid = request_id.get()
        if rid is not None:
            response.headers["X-Request-Id"] = rid
        if access and request.path.startswith("/api/"):
            took = time.perf_counter() - g.get("request_started", time.perf_counter())
            access_log.info(
                "%s %s %d %.1fms", request.method, request.path, response.status_code, took * 1000,
                extra={"fields": {"method": request.method, "path": request.path,
                                  "status": response.status_code, "ms": round(took * 1000, 2)}},
            )
        return response
