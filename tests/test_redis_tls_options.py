"""REDIS_TLS_VERIFY / REDIS_TLS_CA: how they are read and checked, and what redis-py is handed."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from webapp.config import ConfigError, Settings
from webapp.realtime.bus import BusUnavailable
from webapp.realtime.bus.tls import certificate_problem, tls_options

from .certs import Certs, make_certs

URL = "rediss://127.0.0.1:6380/0"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


class TestTlsOptions:
    @pytest.mark.parametrize("url", [None, "redis://127.0.0.1:6379/0", "unix:///run/redis.sock"])
    def test_nothing_for_connections_without_tls(self, url: str | None) -> None:
        # redis-py's plain connections refuse ssl_* arguments
        assert tls_options(url, True, "/ca.pem") == {}

    def test_the_settings_become_redis_py_arguments(self) -> None:
        assert tls_options(URL, None, None) == {}
        assert tls_options(URL, True, None) == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        assert tls_options(URL, False, None) == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
        assert tls_options(URL, None, "/ca.pem") == {"ssl_ca_certs": "/ca.pem"}

    @pytest.mark.parametrize(
        ("url", "verify", "ca", "expected"),
        [
            (URL, None, None, (ssl.CERT_REQUIRED, True, None)),  # redis-py's default: full verification
            (URL, True, "/ca.pem", (ssl.CERT_REQUIRED, True, "/ca.pem")),
            (URL, False, None, (ssl.CERT_NONE, False, None)),
            (URL + "?ssl_cert_reqs=none", None, None, (ssl.CERT_NONE, False, None)),  # the URL's own option
        ],
    )
    def test_what_a_connection_ends_up_with(
        self, url: str, verify: bool | None, ca: str | None, expected: tuple[ssl.VerifyMode, bool, str | None]
    ) -> None:
        pool = ConnectionPool.from_url(url, **tls_options(url, verify, ca))
        context = pool.make_connection().ssl_context  # type: ignore[no-untyped-call]
        assert (context.cert_reqs, context.check_hostname, context.ca_certs) == expected


class TestCertificateProblem:
    def test_found_through_redis_py_and_bus_wrapping(self) -> None:
        refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
        refused.verify_message = "self-signed certificate in certificate chain"
        try:
            try:
                try:
                    raise refused
                except OSError as exc:  # as redis-py does: a new ConnectionError, the ssl error as context
                    raise RedisConnectionError(f"Error connecting: {exc}") from None
            except RedisConnectionError as exc:
                raise BusUnavailable(f"Redis did not answer: {exc}") from None
        except BusUnavailable as exc:
            assert certificate_problem(exc) == "self-signed certificate in certificate chain"

    def test_other_errors_are_not_certificate_problems(self) -> None:
        assert certificate_problem(RedisConnectionError("Connection refused")) is None
        assert certificate_problem(ssl.SSLError(1, "wrong version number")) is None


class TestSettings:
    @pytest.mark.parametrize(("value", "expected"), [("full", True), ("ON", True), ("none", False), ("off", False)])
    def test_verify_values(self, value: str, expected: bool) -> None:
        settings = Settings.from_env({"REDIS_URL": URL, "REDIS_TLS_VERIFY": value})
        assert settings.redis_tls_verify is expected

    def test_unset_leaves_it_to_the_url(self) -> None:
        settings = Settings.from_env({"REDIS_URL": URL + "?ssl_cert_reqs=none"})
        assert settings.redis_tls_verify is None and settings.redis_tls_ca is None

    def test_a_ca_bundle_is_taken(self, certs: Certs) -> None:
        settings = Settings.from_env({"REDIS_URL": URL, "REDIS_TLS_CA": str(certs.ca)})
        assert settings.redis_tls_ca == str(certs.ca)
        agreeing = URL + f"?ssl_ca_certs={certs.ca}&ssl_cert_reqs=required"
        assert Settings.from_env({"REDIS_URL": agreeing, "REDIS_TLS_CA": str(certs.ca)}).redis_tls_ca == str(certs.ca)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"REDIS_TLS_VERIFY": "maybe"}, "REDIS_TLS_VERIFY must be full"),
            ({"REDIS_TLS_CA": "/no/such/ca.pem"}, "REDIS_TLS_CA must name a CA bundle file"),
            ({"REDIS_TLS_CA": "<not pem>"}, "REDIS_TLS_CA .* could not be loaded"),
            ({"REDIS_TLS_CA": "<ca>", "REDIS_TLS_VERIFY": "none"}, "nothing would be verified"),
            ({"REDIS_URL": "redis://127.0.0.1/0", "REDIS_TLS_VERIFY": "full"}, "need a rediss:// REDIS_URL"),
            ({"REDIS_URL": "redis://127.0.0.1/0", "REDIS_TLS_CA": "<ca>"}, "need a rediss:// REDIS_URL"),
            ({"REDIS_URL": URL + "?ssl_cert_reqs=none", "REDIS_TLS_VERIFY": "full"}, "REDIS_TLS_VERIFY=full contradicts"),
            ({"REDIS_URL": URL + "?ssl_check_hostname=false", "REDIS_TLS_VERIFY": "on"}, "contradicts"),
            ({"REDIS_URL": URL + "?ssl_cert_reqs=required", "REDIS_TLS_VERIFY": "none"}, "REDIS_TLS_VERIFY=none contradicts"),
            ({"REDIS_URL": URL + "?ssl_ca_certs=/other.pem", "REDIS_TLS_CA": "<ca>"}, "different files"),
            ({"REDIS_URL": URL + "?ssl_cert_reqs=sometimes"}, "ssl_cert_reqs must be none, optional or required"),
            ({"REDIS_URL": URL + "?socket_timeout=soon"}, "REDIS_URL: Invalid value for 'socket_timeout'"),
        ],
    )
    def test_refuses_what_would_be_ignored_or_overruled(
        self, env: dict[str, str], message: str, certs: Certs, tmp_path: Path
    ) -> None:
        not_pem = tmp_path / "not.pem"
        not_pem.write_text("not a certificate\n")
        files = {"<ca>": str(certs.ca), "<not pem>": str(not_pem)}
        environ = {"REDIS_URL": URL, **{name: files.get(value, value) for name, value in env.items()}}
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(environ)

    @pytest.mark.parametrize(
        ("env", "warned"),
        [
            ({"REDIS_URL": URL, "REDIS_TLS_VERIFY": "none"}, True),
            ({"REDIS_URL": URL + "?ssl_cert_reqs=none"}, True),
            ({"REDIS_URL": URL}, False),
            ({"REDIS_URL": "redis://127.0.0.1/0"}, False),
        ],
    )
    def test_an_unverified_connection_is_logged(
        self, env: dict[str, str], warned: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="webapp.config"):
            Settings.from_env(env).warn_about_defaults()
        assert ("man in the middle can read and forge every event" in caplog.text) is warned
