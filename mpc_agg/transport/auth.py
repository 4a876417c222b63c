"""Bearer tokens for clients and the collector (sans-I/O).

docs/design.md and README, "Security model": clients authenticate with per-client tokens,
and each aggregator verifies them itself. Aggregator ``i`` holds a 32-byte key ``k_i``;
client ``c``'s token for aggregator ``i`` is
``HMAC-SHA256(k_i, "mpc_agg/client-token/v1" || 0x00 || c)`` in hex, so an aggregator needs
no list of clients, a token is bound to one client id and one aggregator, and one
aggregator's key says nothing about the tokens for the others. The collector presents a
random token of each aggregator's own. Both live in the aggregator's party directory
(``token.key``, ``collector.token``: :mod:`mpc_agg.identity`, which reads and checks them);
:class:`Credentials` is what an aggregator checks tokens against.

Errors: no token or a malformed ``Authorization`` header is :class:`Unauthenticated` (HTTP
401); a token that does not match is :class:`Forbidden` (HTTP 403). Comparisons are
constant-time. No message or repr here contains a key or a token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from mpc_agg.errors import Forbidden, Unauthenticated, UsageError

CLIENT_TOKEN_LABEL = b"mpc_agg/client-token/v1\x00"
KEY_BYTES = 32
MIN_KEY_BYTES = 16
BEARER_CHALLENGE = 'Bearer realm="mpc_agg"'
"""The ``WWW-Authenticate`` challenge every 401 answer carries (RFC 9110 section 11.6.1)."""

# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive
# (RFC 9110 section 11.1).
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,31}")


@dataclass(frozen=True, repr=False)
class Credentials:
    """What an aggregator checks tokens against: its HMAC key for client tokens and the
    collector's token. Never printed."""

    client_key: bytes
    collector_token: str

    def __repr__(self) -> str:
        return "Credentials(<hidden>)"


def client_token(aggregator_key: bytes, client_id: str) -> str:
    """The token client ``client_id`` presents to the aggregator holding ``aggregator_key``.

    64 lowercase hex characters: HMAC-SHA256 over :data:`CLIENT_TOKEN_LABEL` and the UTF-8
    client id.
    """
    if not isinstance(aggregator_key, bytes) or len(aggregator_key) < MIN_KEY_BYTES:
        size = len(aggregator_key) if isinstance(aggregator_key, bytes) else None
        raise UsageError(
            f"aggregator_key must be at least {MIN_KEY_BYTES} bytes, got "
            f"{size if size is not None else type(aggregator_key).__name__}"
        )
    # surrogatepass: a lone surrogate from a mangled id yields a wrong token, never a crash.
    message = CLIENT_TOKEN_LABEL + client_id.encode("utf-8", "surrogatepass")
    return hmac.new(aggregator_key, message, hashlib.sha256).hexdigest()


def verify_client_token(aggregator_key: bytes, client_id: str, presented: str | None) -> None:
    """Return if ``presented`` is ``client_id``'s token at this aggregator, else raise.

    :class:`Unauthenticated` when ``presented`` is ``None`` or empty, :class:`Forbidden` when
    it does not match.
    """
    presented = _check_presented(presented, f"client {client_id!r}")
    expected = client_token(aggregator_key, client_id)
    if not _same(expected, presented):
        raise Forbidden(f"the token does not match client {client_id!r} at this aggregator")


def verify_collector_token(expected: str, presented: str | None) -> None:
    """Return if ``presented`` is the collector token ``expected``, else raise.

    :class:`Unauthenticated` when ``presented`` is ``None`` or empty, :class:`Forbidden` when
    it does not match. An empty ``expected`` is a local mistake (:class:`UsageError`).
    """
    if not expected:
        raise UsageError("the expected collector token is empty; load it from collector.token")
    presented = _check_presented(presented, "the collector")
    if not _same(expected, presented):
        raise Forbidden("the collector token does not match")


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; ``None`` if it is absent.

    Any other scheme, or a malformed header, raises :class:`Unauthenticated` (the header's
    contents are not echoed: they may be a credential).
    """
    if authorization_header is None:
        return None
    value = authorization_header.strip(" \t")
    match = _BEARER_RE.fullmatch(value)
    if match:
        return match.group(1)
    scheme = value.split(" ", 1)[0]
    if scheme and scheme.lower() != "bearer" and _SCHEME_RE.fullmatch(scheme):
        raise Unauthenticated(
            f"Authorization scheme {scheme!r} is not supported; send 'Authorization: Bearer "
            "<token>'"
        )
    raise Unauthenticated("malformed Authorization header; send 'Authorization: Bearer <token>'")


def _check_presented(presented: str | None, whom: str) -> str:
    """``presented`` if it is a non-empty token, else :class:`Unauthenticated`."""
    if presented is None or presented == "":
        raise Unauthenticated(f"no token presented for {whom}")
    if not isinstance(presented, str):
        raise Unauthenticated(f"the token presented for {whom} is not text")
    return presented


def _same(expected: str, presented: str) -> bool:
    # compare_digest takes str only if ASCII; as bytes it takes any token a header can carry.
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), presented.encode("utf-8", "surrogatepass")
    )
