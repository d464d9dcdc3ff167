"""A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# The CA is marked as one and the server certificate names its host in subjectAltName: what
# a verifying client (Python's ssl, with its host name check) insists on.
_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc")  # fast to generate


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate: what a client verifies the server against
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """Generate a CA and a server certificate it signed, valid for a day, into `directory`."""
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, request = directory / "server.crt", directory / "server.key", directory / "server.csr"
    _openssl(
        "req", "-x509", "-config", config, "-extensions", "ca", *_EC_KEY, "-keyout", ca_key, "-out", ca,
        "-days", "1", "-subj", "/CN=webapp test CA",
    )
    _openssl("req", "-new", "-config", config, *_EC_KEY, "-keyout", key, "-out", request, "-subj", "/CN=localhost")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-set_serial", "1", "-days", "1",
        "-extfile", config, "-extensions", "server", "-out", cert,
    )
    return Certs(ca=ca, cert=cert, key=key)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
