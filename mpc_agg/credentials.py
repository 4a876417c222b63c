"""Token grants: the credentials one aggregator issues to a client or to the collector.

README, "Deploying across organisations"; docs/design.md, "Keys and identities". Each
aggregator authorises clients and the collector itself: ``mpc-agg token`` run at aggregator
``i`` (with ``i``'s party directory) writes a *grant*, a small YAML file holding ``i``'s
token for one client (or for the collector). A client holds one grant per aggregator, so no
single organisation can mint an identity the others accept::

    format: mpc_agg/token-grant/v1
    role: client               # or: collector
    client: alice              # the client id the token is bound to (absent for the collector)
    aggregator: 0              # the index of the aggregator that issued it
    issuer: 3b6a27bc...        # that aggregator's signing key (hex), as its card names it
    token: 9f86d081...         # the bearer token (64 hex characters)

:func:`tokens_for` puts a set of grants in aggregator order for a topology and checks each
against it: every index present once, one client id, and each grant issued by the
aggregator the topology names at that index (its ``signing_key``), so a grant from another
deployment is refused by name instead of failing later as a 403. Grant files are written
mode 0600; no repr or message here contains a token.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mpc_agg.config.load import read_small_document
from mpc_agg.config.schema import Topology
from mpc_agg.errors import ConfigError, UsageError
from mpc_agg.transport.auth import client_token

GRANT_FORMAT = "mpc_agg/token-grant/v1"
GRANT_SUFFIX = ".token"
ROLES = ("client", "collector")
_MAX_GRANT_BYTES = 1 << 14


@dataclass(frozen=True, repr=False)
class TokenGrant:
    """Aggregator ``aggregator``'s token for ``client`` (role ``client``) or for the
    collector (role ``collector``, ``client`` None). ``issuer``: the issuing aggregator's
    signing public key (64 hex characters)."""

    role: str
    client: str | None
    aggregator: int
    issuer: str
    token: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UsageError(f"a grant's role is client or collector, got {self.role!r}")
        if (self.role == "client") != (self.client is not None):
            raise UsageError("a client grant names its client id; a collector grant names none")

    def __repr__(self) -> str:
        who = f"client {self.client!r}" if self.client is not None else "the collector"
        return f"TokenGrant({who}, aggregator {self.aggregator}, <token hidden>)"

    def to_yaml(self) -> str:
        """The grant file's text."""
        doc: dict[str, Any] = {"format": GRANT_FORMAT, "role": self.role}
        if self.client is not None:
            doc["client"] = self.client
        doc.update(aggregator=self.aggregator, issuer=self.issuer, token=self.token)
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the grant to ``path`` (mode 0600; an existing file only with
        ``overwrite``); returns the path.

        The token never goes through a symbolic link or into a file made by someone else:
        a new file is created exclusively (``O_EXCL | O_NOFOLLOW``, which refuses a link
        planted at ``path``); ``overwrite`` writes a new 0600 file beside it and renames it
        over ``path`` (which replaces a link itself, never its target)."""
        path = Path(path)
        if not overwrite:
            try:
                _write_exclusive(path, self.to_yaml())
            except FileExistsError:
                raise UsageError(
                    f"{str(path)!r} already exists; pass --force to replace it"
                ) from None
            return path
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        _write_exclusive(tmp, self.to_yaml())
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @property
    def default_name(self) -> str:
        """``<client>-<aggregator>.token``, or ``collector-<aggregator>.token``."""
        who = self.client if self.client is not None else "collector"
        return f"{who}-{self.aggregator}{GRANT_SUFFIX}"


def _write_exclusive(path: Path, text: str) -> None:
    """Create ``path`` mode 0600 and write ``text``; never follows a symbolic link and
    never opens an existing file (FileExistsError)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # whatever the umask, before the token is written
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def issue_client_grant(party_dir: str | Path, client_id: str) -> TokenGrant:
    """The grant of the aggregator whose party directory is ``party_dir`` for client
    ``client_id`` (its token is HMAC(token key, client id): issuing twice gives the same)."""
    from mpc_agg.core import codec
    from mpc_agg.identity import read_card, token_key

    client_id = codec.check_id("client", client_id)
    card = read_card(Path(party_dir))
    return TokenGrant(
        role="client",
        client=client_id,
        aggregator=card.index,
        issuer=card.signing_key,
        token=client_token(token_key(Path(party_dir)), client_id),
    )


def issue_collector_grant(party_dir: str | Path) -> TokenGrant:
    """The grant of the aggregator whose party directory is ``party_dir`` for the collector."""
    from mpc_agg.identity import collector_token, read_card

    card = read_card(Path(party_dir))
    return TokenGrant(
        role="collector",
        client=None,
        aggregator=card.index,
        issuer=card.signing_key,
        token=collector_token(Path(party_dir)),
    )


def read_grant(path: str | Path) -> TokenGrant:
    """One grant file; :class:`ConfigError` naming the file and the key on anything wrong."""
    source = str(path)
    doc = read_small_document(path, "a token grant", _MAX_GRANT_BYTES)
    if not isinstance(doc, dict) or doc.get("format") != GRANT_FORMAT:
        raise ConfigError("format", f"not a token grant (expected format: {GRANT_FORMAT})", source)
    expected = {"format", "role", "client", "aggregator", "issuer", "token"}
    unknown = sorted(str(k) for k in doc if k not in expected)
    if unknown:
        raise ConfigError(unknown[0], "unknown key in a token grant", source)
    role, client, index = doc.get("role"), doc.get("client"), doc.get("aggregator")
    issuer, token = doc.get("issuer"), doc.get("token")
    if role not in ROLES:
        raise ConfigError("role", f"expected client or collector, got {role!r}", source)
    if role == "client" and not isinstance(client, str):
        raise ConfigError("client", "a client grant names its client id", source)
    if role == "collector" and client is not None:
        raise ConfigError("client", "a collector grant names no client", source)
    if isinstance(client, str):
        from mpc_agg.core import codec
        from mpc_agg.errors import InvalidRequest

        try:
            codec.check_id("client", client)
        except InvalidRequest as exc:
            raise ConfigError("client", str(exc), source) from None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError("aggregator", f"expected an index >= 0, got {index!r}", source)
    for key, value in (("issuer", issuer), ("token", token)):
        if not (isinstance(value, str) and len(value) == 64 and _is_hex(value)):
            raise ConfigError(key, "expected 64 lowercase hex characters", source)
    assert isinstance(issuer, str) and isinstance(token, str)
    return TokenGrant(role=role, client=client, aggregator=index, issuer=issuer, token=token)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def read_grants(paths: Iterable[str | Path]) -> list[tuple[Path, TokenGrant]]:
    """The grants in ``paths``: files, or directories whose ``*.token`` files are read."""
    out: list[tuple[Path, TokenGrant]] = []
    for p in paths:
        path = Path(p)
        files = sorted(path.glob(f"*{GRANT_SUFFIX}")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise ConfigError("<file>", f"no *{GRANT_SUFFIX} files in this directory", str(path))
        out.extend((f, read_grant(f)) for f in files)
    return out


def tokens_for(
    topology: Topology,
    grants: Sequence[tuple[Path, TokenGrant]],
    role: str,
    client_id: str | None = None,
) -> list[str]:
    """The tokens of ``grants`` in aggregator order for ``topology``.

    Every grant must have role ``role`` (and, for clients, one client id, ``client_id`` if
    given) and be issued by the aggregator the topology names at its index; every index
    must be covered exactly once. Raises :class:`ConfigError` naming the grant file.
    """
    by_index: dict[int, tuple[Path, TokenGrant]] = {}
    for path, grant in grants:
        where = str(path)
        if grant.role != role:
            raise ConfigError(
                "role", f"a {grant.role} grant, where {role} grants are needed", where
            )
        if role == "client":
            if client_id is None:
                client_id = grant.client
            elif grant.client != client_id:
                raise ConfigError(
                    "client",
                    f"issued for client {grant.client!r}, not {client_id!r}",
                    where,
                )
        if grant.aggregator >= topology.m:
            raise ConfigError(
                "aggregator",
                f"aggregator {grant.aggregator} is not in {topology.name} "
                f"({topology.m} aggregators)",
                where,
            )
        address = topology.aggregators[grant.aggregator]
        if address.signing_key is not None and grant.issuer != address.signing_key:
            raise ConfigError(
                "issuer",
                f"issued by another aggregator {grant.aggregator} than the one topology "
                f"{topology.name} names (signing keys differ): a grant of another deployment",
                where,
            )
        if grant.aggregator in by_index:
            other = by_index[grant.aggregator][0]
            raise ConfigError(
                "aggregator", f"aggregator {grant.aggregator} also has a grant in {other}", where
            )
        by_index[grant.aggregator] = (path, grant)
    missing = [i for i in range(topology.m) if i not in by_index]
    if missing:
        who = f"client {client_id!r}" if role == "client" else "the collector"
        raise ConfigError(
            "<grants>",
            f"no token grant for {who} from aggregator(s) {', '.join(map(str, missing))}: "
            "each aggregator issues its own (mpc-agg token at that aggregator)",
        )
    return [by_index[i][1].token for i in range(topology.m)]
