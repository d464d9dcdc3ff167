"""Logging: our lines on stderr when nobody configured logging, and no token in any log line."""

from __future__ import annotations

import logging
import re

# `token=<value>` in a query string (a handshake URL): the value is a bearer credential.
_TOKEN_IN_URL = re.compile(r"((?:^|[?&\s\"])token=)[^&\s\"]+")
# Loggers that may print request URLs: hypercorn's access log (when enabled) and its errors.
_URL_LOGGERS = ("hypercorn.access", "hypercorn.error")


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


def install() -> None:
    """Redact tokens from the loggers that print URLs, and show our INFO lines on stderr when
    nobody configured logging (hypercorn configures only its own)."""
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
    root, ours = logging.getLogger(), logging.getLogger("webapp")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
