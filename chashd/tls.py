# -*- test-case-name: tests.unit.test_security,tests.integration.test_tls -*-
"""TLS for the links between daemons: the CA they verify each other against (``--tls-ca``).

Listeners take TLS through their endpoint strings (``ssl:11212:privateKey=key.pem:certKey=cert.pem``). The
outgoing links use this module when a daemon is given ``--tls-ca FILE`` (PEM, one CA certificate or several):

- ``client_endpoint`` wraps the TCP endpoint of a line-protocol link (a gateway's pools to kvstores, the
  handoff's links between kvstores) in TLS that verifies the peer's certificate against the CA and checks
  that it names the host connected to (a DNS name or an IP address in its subjectAltName);
- ``https_policy`` does the same for the HTTP client (the gateways' health probes of kvstores, the kvstores'
  registration, ring watch and drain calls to ``https://`` gateway URLs).

Without ``--tls-ca`` the links are plain TCP and ``https://`` URLs are verified against the system's CAs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

from chashd.errors import ConfigError

__all__ = ["TrustRoot", "client_endpoint", "https_policy", "load_ca"]

#: A ``twisted.internet._sslverify.IOpenSSLTrustRoot`` (Twisted does not export the interface publicly).
TrustRoot = Any

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def load_ca(path: str | None) -> TrustRoot | None:
    """The trust root of the PEM certificates in ``path`` (None without one); ``ConfigError`` naming
    ``--tls-ca`` when the file cannot be read or holds no certificate."""
    if path is None:
        return None
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--tls-ca: cannot read {path}: {e.strerror}") from None
    certificates = []
    for block in data.split(_BEGIN)[1:]:
        try:
            certificates.append(Certificate.loadPEM(_BEGIN + block))
        except Exception:
            raise ConfigError(f"--tls-ca: {path} holds a certificate that is not valid PEM") from None
    if not certificates:
        raise ConfigError(f"--tls-ca: {path} holds no PEM certificate")
    return trustRootFromCertificates(certificates)


def client_endpoint(
    reactor: Any, host: str, port: int, connect_timeout: float, ca: TrustRoot | None
) -> IStreamClientEndpoint:
    """A TCP endpoint to ``host:port``, in TLS verified against ``ca`` when one is given."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    if ca is None:
        return endpoint
    from twisted.internet.ssl import optionsForClientTLS

    return wrapClientTLS(optionsForClientTLS(host, trustRoot=ca), endpoint)


def https_policy(ca: TrustRoot | None) -> IPolicyForHTTPS | None:
    """The HTTP client's TLS policy: verify servers against ``ca`` (None: the client's default, the system's
    CAs)."""
    return BrowserLikePolicyForHTTPS(trustRoot=ca) if ca is not None else None
