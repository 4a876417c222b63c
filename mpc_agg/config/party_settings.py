"""A party's own settings: where it keeps its state and where it listens.

README, "Running aggregators". The topology is shared and fingerprinted; these settings are
local to one aggregator, so each organisation chooses them without changing the topology.
They come from three places, highest precedence first:

1. the party's command line: ``--data-dir DIR`` (relative to the current directory, like
   any path on a command line) and ``--bind ADDRESS``;
2. ``party.yaml`` in the party directory (optional): ``data_dir`` (relative to the party
   directory), ``bind`` and ``stream_above_mb`` (``--stream-above-mb``);
3. the topology: its ``data_dir`` (relative to the topology file) and the aggregator's own
   ``host`` as the listening address.

``data_dir`` means what it means in a topology: the party keeps its journals, round index
and privacy ledger in ``<data_dir>/aggregator-<i>/``. ``bind`` is the address both
listeners (HTTP API, party links) use; the topology's ``host`` stays what the others
connect to. ``0.0.0.0`` listens on every IPv4 interface, ``::`` on every IPv6 one (IPv6
only: asyncio sets ``IPV6_V6ONLY``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpc_agg.config.load import Section, read_document
from mpc_agg.config.schema import Topology, check_host, is_loopback
from mpc_agg.errors import ConfigError

PARTY_SETTINGS = "party.yaml"
KEYS = ("bind", "data_dir", "stream_above_mb")


@dataclass(frozen=True)
class PartySettings:
    """Settings of one party that no other party sees (none of them is fingerprinted).

    ``data_dir``: replaces the topology's ``data_dir`` (absolute once resolved), or None.
    ``bind``: the address to listen on, or None for the topology's ``host``.
    """

    data_dir: Path | None = None
    bind: str | None = None
    stream_above_mb: float | None = None
    """Vectors whose full share is larger than this many MiB are received as a stream
    (``--stream-above-mb``), or None for the default."""

    def over(self, other: PartySettings) -> PartySettings:
        """These settings, with ``other``'s where these have none (``self`` wins)."""
        return PartySettings(
            data_dir=self.data_dir if self.data_dir is not None else other.data_dir,
            bind=self.bind if self.bind is not None else other.bind,
            stream_above_mb=self.stream_above_mb
            if self.stream_above_mb is not None
            else other.stream_above_mb,
        )


def read_party_settings(party_dir: Path) -> PartySettings:
    """The settings in ``party_dir/party.yaml`` (none if there is no such file); a relative
    ``data_dir`` there is resolved against ``party_dir``. Raises :class:`ConfigError`
    naming the file and the key."""
    path = Path(party_dir) / PARTY_SETTINGS
    if not path.exists():
        return PartySettings()
    source = str(path)
    document = read_document(path)
    try:
        if document is None:
            return PartySettings()
        if not isinstance(document, dict):
            raise ConfigError("<root>", f"expected a mapping of {', '.join(KEYS)}")
        section = Section(document, "", KEYS)
        data_dir = section.get("data_dir", str, "")
        bind = section.get("bind", str, "")
        stream_above = section.get("stream_above_mb", object, None)
        if stream_above is not None and (
            isinstance(stream_above, bool) or not isinstance(stream_above, int | float)
        ):
            raise ConfigError("stream_above_mb", f"expected a number of MiB, got {stream_above!r}")
        return PartySettings(
            data_dir=(Path(party_dir) / _path(data_dir, "data_dir")).resolve()
            if data_dir
            else None,
            bind=check_host(bind, "bind") if bind else None,
            stream_above_mb=None if stream_above is None else float(stream_above),
        )
    except ConfigError as exc:
        raise ConfigError(exc.path, exc.detail, source) from None


def _path(value: str, key: str) -> str:
    """``value`` if it can name a file (no NUL byte), else :class:`ConfigError`."""
    if "\x00" in value:
        raise ConfigError(key, f"not a usable path: {value!r}")
    return value


def command_line_settings(data_dir: str | None, bind: str | None) -> PartySettings:
    """The settings given as ``--data-dir`` / ``--bind`` (a relative directory resolves
    against the current directory). Raises :class:`ConfigError` for a malformed address."""
    return PartySettings(
        data_dir=Path(_path(data_dir, "--data-dir")).resolve() if data_dir else None,
        bind=check_host(bind, "--bind") if bind else None,
    )


def check_bind(topology: Topology, bind: str | None) -> None:
    """Refuse a bind address that would expose an ``insecure`` topology (plain HTTP, no
    tokens) beyond this machine: its ``insecure: true`` is allowed only because every
    host is a loopback address, and the party listens on ``bind`` instead of its host.
    Raises :class:`ConfigError`."""
    if topology.insecure and bind is not None and not is_loopback(bind):
        raise ConfigError(
            "bind",
            f"{bind!r} is not a loopback address, and topology {topology.name!r} is insecure "
            "(plain HTTP, no tokens): it may listen on loopback only",
        )
