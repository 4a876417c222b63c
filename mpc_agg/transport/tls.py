"""TLS contexts with pinned certificates, for party links and the HTTPS API.

README, "Security model"; docs/design.md, "Keys and identities". There is no certificate
authority: every certificate is self-signed and the topology names each aggregator's two
certificates (``party_cert``, ``http_cert``). A context trusts exactly the certificates it
is given, so a peer is accepted only if it presents one of them:

* party links are mutual TLS 1.3. The connecting side pins the one certificate of the
  party it dials; the listening side accepts only the certificates of the parties that
  dial it, and then checks that the certificate is the one of the index the peer claims
  (:func:`pinned_index`) before it reads a byte of its messages.
* clients and the collector pin each aggregator's ``http_cert`` (host name checked
  against its SubjectAltName).

Everything here builds :class:`ssl.SSLContext` objects; nothing listens or connects.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import Sequence
from pathlib import Path

from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.errors import UsageError

SEND_CHUNK = 256 * 1024
"""Bytes handed to a TLS connection per write when sending a long body: TLS encrypts one
write into an output buffer that grows with it, and on a new connection one 8 MB write
costs about 20 ms here against 4 ms in 256 KiB pieces (README, "Cost model and
performance")."""

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
PARTY_TLS_VERSION = ssl.TLSVersion.TLSv1_3


def der_of(pem: str) -> bytes:
    """The DER bytes of a PEM certificate."""
    return ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")


def cert_digest(pem: str) -> str:
    """SHA-256 (hex) of a PEM certificate's DER bytes: what a pin compares."""
    return hashlib.sha256(der_of(pem)).hexdigest()


def party_server_context(cert_key: tuple[Path, Path], peers: Sequence[str]) -> ssl.SSLContext:
    """The listening side of party links: present our certificate, require a client
    certificate that is one of ``peers`` (PEM); TLS 1.3 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = PARTY_TLS_VERSION
    context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata="".join(p.strip() + "\n" for p in peers))
    return context


def party_client_context(cert_key: tuple[Path, Path], peer: str) -> ssl.SSLContext:
    """The dialling side of a party link to the party whose certificate is ``peer`` (PEM):
    present our certificate, accept exactly ``peer``'s; TLS 1.3 only.

    Host names are not checked: the pin is stronger (one certificate, not any a CA made
    for that name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = PARTY_TLS_VERSION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    context.load_verify_locations(cadata=peer.strip() + "\n")
    return context


def pinned_index(peer_der: bytes | None, pins: dict[int, str]) -> int | None:
    """The index whose pinned certificate (PEM, by index) is exactly ``peer_der``, else
    None."""
    if peer_der is None:
        return None
    for index, pem in pins.items():
        if der_of(pem) == peer_der:
            return index
    return None


def https_server_context(cert_key: tuple[Path, Path]) -> ssl.SSLContext:
    """An aggregator's HTTPS API (TLS >= 1.2, no client certificate: clients present
    tokens)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS_VERSION
    context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    return context


@functools.lru_cache(maxsize=64)
def _https_client_context(pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MIN_TLS_VERSION
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem.strip() + "\n")
    return context


def https_client_context(address: AggregatorAddress) -> ssl.SSLContext | None:
    """A client context that trusts exactly ``address``'s ``http_cert`` (None for plain
    HTTP). Raises :class:`~mpc_agg.errors.UsageError` for an https address without a
    certificate (a template)."""
    if address.scheme == "http":
        return None
    if address.http_cert is None:
        raise UsageError(
            f"aggregator {address.index} has no http_cert in this topology (a template): load "
            "the topology the aggregators run (the launcher prints the provisioned file)"
        )
    return _https_client_context(address.http_cert)
