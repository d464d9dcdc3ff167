"""Typed settings read from the environment, validated once at start-up."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url

log = logging.getLogger(__name__)

DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"
MAX_TOKEN_TTL = 7 * 24 * 3600  # the longest ttl /api/tokens grants
N = TypeVar("N", int, float)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the application reads from its environment."""

    env: str = "development"
    redis_url: str | None = None
    # None: REDIS_TLS_VERIFY is not set, so a rediss:// URL's own ssl_* options apply (redis-py
    # verifies the chain and the host name unless the URL says otherwise).
    redis_tls_verify: bool | None = None
    redis_tls_ca: str | None = None  # a PEM bundle to verify Redis's certificate against
    redis_cluster: bool | None = None  # None: asked of Redis (INFO cluster) at the first connection
    secret_key: str = DEV_SECRET_KEY
    secret_keys: tuple[str, ...] = (DEV_SECRET_KEY,)  # the first signs, every one verifies
    api_keys: tuple[str, ...] = ()
    port: int = 5000
    channel_prefix: str = "webapp"
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Hypercorn's worker processes (the Procfile's config reads it too); each is an instance.
    web_concurrency: int = 1
    cors_origins: tuple[str, ...] = ()
    demo_login: bool = True
    token_ttl: int = 3600
    max_token_ttl: int = MAX_TOKEN_TTL
    max_payload_bytes: int = 64 * 1024
    redis_timeout: float = 2.0
    redis_backoff_max: float = 5.0
    outbox_max_messages: int = 1000
    outbox_max_age: float = 30.0
    # Messages consumed from Redis and waiting for delivery, per subscriber connection: past
    # either bound, live messages are read from the history instead (bounded memory).
    inbox_max_messages: int = 10_000
    inbox_max_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 10.0
    drain_delay: float = 0.0
    socket_rate: float = 20.0
    socket_burst: int = 40
    socket_max_queue: int = 1000
    socket_write_timeout: float = 10.0
    replay_max_len: int = 10_000
    replay_max_age: float = 300.0
    recovery_window: float = 120.0
    recovery_concurrency: int = 16
    presence_ttl: float = 15.0
    disconnect_on_token_expiry: bool = False
    allow_query_token: bool = True
    max_batch: int = 100
    log_format: str = "text"
    access_log: bool = False
    ping_interval: int = 25
    ping_timeout: float = 20.0
    # Off for apps run inside a test process, where SIGTERM belongs to the test runner.
    drain_on_sigterm: bool = True

    @property
    def frame_cap(self) -> int:
        """The largest WebSocket frame taken (Engine.IO's and hypercorn's limit): twice the
        payload limit, so a payload just over it gets a polite refusal, not a closed socket."""
        return 2 * self.max_payload_bytes

    @property
    def production(self) -> bool:
        return self.env == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings; raise ConfigError naming the bad variable."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        app_env = get("WEBAPP_ENV") or "development"
        if app_env not in ("development", "production", "test"):
            raise ConfigError(f"WEBAPP_ENV must be development, production or test, not {app_env!r}")

        redis_url = get("REDIS_URL")
        redis_tls_verify = _tls_verify(get("REDIS_TLS_VERIFY"))
        redis_tls_ca = get("REDIS_TLS_CA")
        if redis_tls_ca is not None:
            _check_ca_file(redis_tls_ca)
            if redis_tls_verify is False:
                raise ConfigError("REDIS_TLS_CA is set but REDIS_TLS_VERIFY=none: nothing would be verified against it")
        if redis_url is not None:
            _check_redis_url(redis_url)
            _check_redis_tls(redis_url, redis_tls_verify, redis_tls_ca)

        # SECRET_KEYS (comma-separated, the first signs, all verify) rotates keys; SECRET_KEY is one.
        secret_keys = _split(get("SECRET_KEYS")) or _split(get("SECRET_KEY"))
        if not secret_keys:
            if app_env == "production":
                raise ConfigError("SECRET_KEY must be set (or SECRET_KEYS) when WEBAPP_ENV=production")
            secret_keys = (DEV_SECRET_KEY,)
        elif app_env == "production" and any(len(key) < 16 for key in secret_keys):
            raise ConfigError("every key of SECRET_KEY / SECRET_KEYS must be at least 16 characters in production")
        elif app_env == "production" and DEV_SECRET_KEY in secret_keys:
            raise ConfigError("SECRET_KEY / SECRET_KEYS holds the public development key; set a secret of your own in production")
        secret_key = secret_keys[0]
        api_keys = _split(get("API_KEYS"))
        if app_env == "production":
            # Production takes its secrets from the platform's config vars, never a default.
            if not api_keys:
                raise ConfigError("API_KEYS must be set when WEBAPP_ENV=production (comma-separated, 16+ characters each)")
            if any(len(key) < 16 for key in api_keys):
                raise ConfigError("every key of API_KEYS must be at least 16 characters in production")

        prefix = get("CHANNEL_PREFIX") or "webapp"
        if not _PREFIX_RE.match(prefix):
            raise ConfigError("CHANNEL_PREFIX must be 1-64 characters of A-Z a-z 0-9 _ . : -")

        values: dict[str, object] = {
            "env": app_env,
            "redis_url": redis_url,
            "redis_tls_verify": redis_tls_verify,
            "redis_tls_ca": redis_tls_ca,
            "redis_cluster": None if get("REDIS_CLUSTER") is None else _bool(get("REDIS_CLUSTER"), "REDIS_CLUSTER", False),
            "secret_key": secret_key,
            "secret_keys": secret_keys,
            "api_keys": api_keys,
            "port": _int(get("PORT"), "PORT", 5000, 1, 65535),
            "channel_prefix": prefix,
            "cors_origins": _cors_origins(get("CORS_ORIGINS"), production=app_env == "production"),
            # Anyone may sign in as anyone through the demo's form: off in production unless asked for.
            "demo_login": _bool(get("DEMO_LOGIN"), "DEMO_LOGIN", app_env != "production"),
            # At most the longest ttl /api/tokens grants: a default it would refuse is a config error.
            "token_ttl": _int(get("TOKEN_TTL"), "TOKEN_TTL", 3600, 10, cls.max_token_ttl),
            "max_payload_bytes": _int(
                get("MAX_PAYLOAD_BYTES"), "MAX_PAYLOAD_BYTES", 64 * 1024, 1024, 16 * 1024 * 1024
            ),
            "redis_timeout": _float(get("REDIS_TIMEOUT"), "REDIS_TIMEOUT", 2.0, 0.05, 60),
            "redis_backoff_max": _float(get("REDIS_BACKOFF_MAX"), "REDIS_BACKOFF_MAX", 5.0, 0.1, 300),
            "outbox_max_messages": _int(get("OUTBOX_MAX_MESSAGES"), "OUTBOX_MAX_MESSAGES", 1000, 0, 1_000_000),
            "outbox_max_age": _float(get("OUTBOX_MAX_AGE"), "OUTBOX_MAX_AGE", 30.0, 0.1, 3600),
            "inbox_max_messages": _int(get("INBOX_MAX_MESSAGES"), "INBOX_MAX_MESSAGES", 10_000, 10, 10_000_000),
            "inbox_max_bytes": _int(get("INBOX_MAX_BYTES"), "INBOX_MAX_BYTES", 16 * 1024 * 1024, 64 * 1024, 1 << 32),
            "drain_delay": _float(get("DRAIN_DELAY"), "DRAIN_DELAY", 0.0, 0.0, 300),
            "shutdown_timeout": _float(get("SHUTDOWN_TIMEOUT"), "SHUTDOWN_TIMEOUT", 10.0, 0.0, 600),
            "socket_rate": _float(get("SOCKET_RATE"), "SOCKET_RATE", 20.0, 0.1, 100_000),
            "socket_burst": _int(get("SOCKET_BURST"), "SOCKET_BURST", 40, 1, 1_000_000),
            # Whole seconds: python-engineio advertises the interval truncated to seconds.
            "ping_interval": _int(get("PING_INTERVAL"), "PING_INTERVAL", 25, 1, 3600),
            "ping_timeout": _float(get("PING_TIMEOUT"), "PING_TIMEOUT", 20.0, 1.0, 3600),
            "replay_max_len": _int(get("REPLAY_MAX_LEN"), "REPLAY_MAX_LEN", 10_000, 0, 10_000_000),
            "replay_max_age": _float(get("REPLAY_MAX_AGE"), "REPLAY_MAX_AGE", 300.0, 1.0, 7 * 24 * 3600),
            "recovery_window": _float(get("RECOVERY_WINDOW"), "RECOVERY_WINDOW", 120.0, 1.0, 7 * 24 * 3600),
            "recovery_concurrency": _int(get("RECOVERY_CONCURRENCY"), "RECOVERY_CONCURRENCY", 16, 1, 10_000),
            "log_format": _choice(get("LOG_FORMAT"), "LOG_FORMAT", "text", ("text", "json")),
            "access_log": _bool(get("ACCESS_LOG"), "ACCESS_LOG", False),
            "max_batch": _int(get("MAX_BATCH"), "MAX_BATCH", 100, 1, 10_000),
            "allow_query_token": _bool(get("ALLOW_QUERY_TOKEN"), "ALLOW_QUERY_TOKEN", True),
            "disconnect_on_token_expiry": _bool(get("DISCONNECT_ON_TOKEN_EXPIRY"), "DISCONNECT_ON_TOKEN_EXPIRY", False),
            "presence_ttl": _float(get("PRESENCE_TTL"), "PRESENCE_TTL", 15.0, 1.0, 3600),
            "socket_max_queue": _int(get("SOCKET_MAX_QUEUE"), "SOCKET_MAX_QUEUE", 1000, 10, 10_000_000),
            "socket_write_timeout": _float(get("SOCKET_WRITE_TIMEOUT"), "SOCKET_WRITE_TIMEOUT", 10.0, 0.5, 600),
            "web_concurrency": _int(get("WEB_CONCURRENCY"), "WEB_CONCURRENCY", 1, 1, 64),
        }
        if values["recovery_window"] > values["replay_max_age"]:  # type: ignore[operator]
            raise ConfigError(
                "RECOVERY_WINDOW must not exceed REPLAY_MAX_AGE: a client can only recover what the history still holds"
            )
        instance_id = get("INSTANCE_ID")
        if instance_id is not None:
            values["instance_id"] = instance_id[:64]
        if hypercorn_worker(values["web_concurrency"]):  # type: ignore[arg-type]
            # One of hypercorn's workers: an instance of its own (presence, its own channels).
            values["instance_id"] = f"{str(values.get('instance_id', socket.gethostname()))[:50]}.{os.getpid()}"
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Settings:
        """Settings from a Quart app's `REALTIME_*` config keys (`REALTIME_REDIS_URL`,
        `REALTIME_CHANNEL_PREFIX`, ...: the environment variables' names with the prefix), read
        and validated as from_env reads the environment; the app's own SECRET_KEY signs tokens
        unless REALTIME_SECRET_KEY(S) is given."""
        values = {
            name.removeprefix("REALTIME_"): _as_text(name, value)
            for name, value in config.items()
            if name.startswith("REALTIME_") and name != "REALTIME_SETTINGS" and value is not None
        }
        if "SECRET_KEY" not in values and "SECRET_KEYS" not in values and config.get("SECRET_KEY"):
            values["SECRET_KEY"] = str(config["SECRET_KEY"])
        return cls.from_env(values)

    def warn_about_defaults(self) -> None:
        """Log what a development default means, loudly where it matters."""
        if self.secret_key == DEV_SECRET_KEY:
            log.warning(
                "SECRET_KEY is not set: using a public development key. Tokens and sessions "
                "are forgeable. Set SECRET_KEY (and WEBAPP_ENV=production) before deploying."
            )
        if self.redis_url is None:
            log.warning(
                "REDIS_URL is not set: using the in-memory bus. Events reach only sockets "
                "of this one instance."
            )
            if self.web_concurrency > 1:
                log.warning(
                    "WEB_CONCURRENCY=%d without REDIS_URL: each worker process is an instance of its "
                    "own, and no event crosses from one to another. Set REDIS_URL, or WEB_CONCURRENCY=1.",
                    self.web_concurrency,
                )
        if not self.api_keys:
            log.warning("API_KEYS is not set: every /api/* call will answer 401.")
        if self.production and self.demo_login:
            log.warning(
                "DEMO_LOGIN is on in production: anyone can sign in as any user through POST /login. "
                "Mint tokens from your backend with /api/tokens instead."
            )
        if self.redis_url is not None and _unverified_tls(self.redis_url, self.redis_tls_verify):
            log.warning(
                "Redis's TLS certificate is not verified (REDIS_TLS_VERIFY=none, or ssl_cert_reqs=none "
                "in REDIS_URL): the connection is encrypted, but a man in the middle can read and "
                "forge every event. Prefer REDIS_TLS_CA with the CA that signed Redis's certificate."
            )


def hypercorn_worker(web_concurrency: int) -> bool:
    """Whether this process is one of WEB_CONCURRENCY > 1 workers hypercorn spawned."""
    return web_concurrency > 1 and multiprocessing.parent_process() is not None


def _as_text(name: str, value: object) -> str:
    """A config value as the environment would spell it: lists comma-joined, booleans as words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    raise ConfigError(f"{name} must be a string, a number, a boolean or a list of strings, got {type(value).__name__}")


def _check_redis_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {parts.scheme!r}://")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL has an invalid port: {exc}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("REDIS_URL has no host")
    if port is not None and not 0 < port < 65536:
        raise ConfigError("REDIS_URL port must be between 1 and 65535")


def _check_redis_tls(url: str, verify: bool | None, ca: str | None) -> None:
    """Refuse TLS settings a URL would ignore or overrule: redis-py lets the URL's own ssl_*
    options win over the arguments we pass, so a disagreement must stop the start."""
    scheme = urlsplit(url).scheme
    if scheme != "rediss":
        if verify is not None or ca is not None:
            raise ConfigError(f"REDIS_TLS_VERIFY and REDIS_TLS_CA need a rediss:// REDIS_URL; {scheme}:// is not encrypted")
        return
    options = _url_options(url)
    cert_reqs, check_hostname = options.get("ssl_cert_reqs"), options.get("ssl_check_hostname")
    if cert_reqs is not None and cert_reqs not in ("none", "optional", "required"):
        raise ConfigError(f"REDIS_URL's ssl_cert_reqs must be none, optional or required, got {cert_reqs!r}")
    # A client treats "optional" as "required": the server always presents a certificate.
    if verify is True and (cert_reqs == "none" or check_hostname is False):
        raise ConfigError("REDIS_TLS_VERIFY=full contradicts REDIS_URL's ssl_cert_reqs=none / ssl_check_hostname=false: drop one")
    if verify is False and (cert_reqs in ("optional", "required") or check_hostname is True):
        raise ConfigError("REDIS_TLS_VERIFY=none contradicts REDIS_URL's ssl_cert_reqs / ssl_check_hostname: drop one")
    url_ca = options.get("ssl_ca_certs")
    if ca is not None and url_ca is not None and url_ca != ca:
        raise ConfigError("REDIS_TLS_CA and REDIS_URL's ssl_ca_certs name different files: drop one")


def _url_options(url: str) -> dict[str, object]:
    """The URL's options exactly as redis-py's `from_url` will read them."""
    try:
        return dict(parse_url(url))
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: {exc}") from None


def _unverified_tls(url: str, verify: bool | None) -> bool:
    if urlsplit(url).scheme != "rediss":
        return False
    return verify is False or (verify is None and _url_options(url).get("ssl_cert_reqs") == "none")


def _check_ca_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"REDIS_TLS_CA must name a CA bundle file; {path!r} is not a file")
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError included: not PEM, or no certificate in it
        raise ConfigError(f"REDIS_TLS_CA {path!r} could not be loaded as a PEM CA bundle: {exc}") from None


def _tls_verify(value: str | None) -> bool | None:
    """REDIS_TLS_VERIFY: full (or on) verifies, none (or off) does not; None when not set."""
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("full", "none"):
        return lowered == "full"
    try:
        return _bool(value, "REDIS_TLS_VERIFY", True)
    except ConfigError:
        raise ConfigError(f"REDIS_TLS_VERIFY must be full (or on) or none (or off), got {value!r}") from None


def _cors_origins(value: str | None, *, production: bool) -> tuple[str, ...]:
    """CORS_ORIGINS: the origins whose pages may open sockets; `*` (any page) only outside production."""
    origins = _split(value)
    if production and "*" in origins:
        raise ConfigError("CORS_ORIGINS must list explicit origins in production, not '*' (any web page could open sockets)")
    return origins


def _split(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    return _number(value, name, default, low, high, int, "an integer")


def _float(value: str | None, name: str, default: float, low: float, high: float) -> float:
    return _number(value, name, default, low, high, float, "a number")


def _number(value: str | None, name: str, default: N, low: N, high: N, cast: Callable[[str], N], kind: str) -> N:
    if value is None:
        return default
    try:
        number = cast(value)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _choice(value: str | None, name: str, default: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return default
    if value.lower() not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _bool(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")
