"""TLS options for every Redis client the app builds from REDIS_URL (REDIS_TLS_VERIFY, REDIS_TLS_CA)."""

from __future__ import annotations

import logging
import ssl
from typing import TypedDict
from urllib.parse import urlsplit


class TlsOptions(TypedDict, total=False):
    """Keyword arguments of redis-py's `from_url` (they reach `SSLConnection`)."""

    ssl_cert_reqs: str
    ssl_check_hostname: bool
    ssl_ca_certs: str


def tls_options(url: str | None, verify: bool | None, ca: str | None) -> TlsOptions:
    """What REDIS_TLS_VERIFY (None: not set) and REDIS_TLS_CA ask of a client for `url`.

    Empty without a URL, for redis:// and unix:// (redis-py's plain connections take no ssl_*
    arguments), and for rediss:// with neither set: then the URL's own ssl_* options, or redis-py's
    default (verify the chain and the host name), apply. Settings.from_env refuses a URL whose options
    disagree with the settings: redis-py lets the URL's options win over these arguments.
    """
    if url is None or urlsplit(url).scheme != "rediss":
        return {}
    options = TlsOptions()
    if verify is not None:
        options["ssl_cert_reqs"] = "required" if verify else "none"
        options["ssl_check_hostname"] = verify
    if ca is not None:
        options["ssl_ca_certs"] = ca
    return options


def certificate_problem(exc: BaseException) -> str | None:
    """Why Redis's certificate was refused, when that is what `exc` comes from (redis-py wraps
    the ssl error in a ConnectionError, and we wrap that in BusUnavailable)."""
    seen: BaseException | None = exc
    for _ in range(10):  # a bounded walk: chains can loop
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def log_failure(log: logging.Logger, what: str, exc: BaseException, delay: float) -> None:
    """Say why Redis could not be used and when it is tried again. A refused certificate is an
    error that retrying alone does not mend: the message says what to change."""
    problem = certificate_problem(exc)
    if problem is not None:
        log.error(
            "Redis's TLS certificate could not be verified (%s); retrying in %.1fs. Set "
            "REDIS_TLS_CA to the CA that signed it (REDIS_TLS_VERIFY=none encrypts without "
            "verifying: a man in the middle can then read and forge every event)",
            problem, delay,
        )
    else:
        log.warning("%s (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
