"""A party's identity: its private keys (in its own party directory) and its public card.

docs/design.md, "Keys and identities"; README, "Security model". Each aggregator holds:

=====================  ==========================================================  ======
file                   what                                                        public
=====================  ==========================================================  ======
``party-link.key``     ECDSA P-256 key of its party-link certificate                no
``party-link.crt``     self-signed certificate peers pin for its index              yes
``https.key``          ECDSA P-256 key of its HTTPS certificate                     no
``https.crt``          self-signed certificate (SAN: its host) clients pin          yes
``signing.key``        Ed25519 key that signs its result statements                 no
``token.key``          32-byte HMAC key: client ``c``'s token is HMAC(key, c)       no
``collector.token``    the token the collector presents to this aggregator         no
``card.yaml``          its public card: address and the three public keys           yes
=====================  ==========================================================  ======

Private files are created mode 0600 and refused when group or others can read them. No
key here can stand in for another party's: each is generated on the party's own machine
(the local launcher generates all of a local topology's, which is fine for development).
A topology's ``aggregators[i]`` entry holds exactly party ``i``'s card.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpc_agg.config.load import read_small_document
from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.errors import ConfigError
from mpc_agg.storage.durable import create_private, read_private
from mpc_agg.transport.auth import KEY_BYTES, Credentials
from mpc_agg.transport.tls import cert_digest

PARTY_LINK_KEY = "party-link.key"
PARTY_LINK_CERT = "party-link.crt"
HTTPS_KEY = "https.key"
HTTPS_CERT = "https.crt"
SIGNING_KEY = "signing.key"
TOKEN_KEY = "token.key"
COLLECTOR_TOKEN = "collector.token"
CARD = "card.yaml"
CARD_FORMAT = "mpc_agg/party-card/v1"
PRIVATE_FILES = (PARTY_LINK_KEY, HTTPS_KEY, SIGNING_KEY, TOKEN_KEY, COLLECTOR_TOKEN)
CERT_DAYS = 3650
_YAML_PATH = "party directory"
_MAX_CARD_BYTES = 1 << 16


def self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str, host: str | None
) -> str:
    """A self-signed certificate (PEM) for ``key``: CN ``common_name``, SAN ``host`` if
    given, client and server authentication, valid for :data:`CERT_DAYS` days."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if host is not None:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _pkcs8(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class PartyCard:
    """A party's public card: what the topology's ``aggregators[index]`` entry holds."""

    index: int
    host: str
    mpc_port: int
    http_port: int
    party_cert: str
    http_cert: str
    signing_key: str

    def entry(self) -> dict[str, Any]:
        """The topology entry (YAML mapping) of this card."""
        return {
            "host": self.host,
            "mpc_port": self.mpc_port,
            "http_port": self.http_port,
            "party_cert": self.party_cert,
            "http_cert": self.http_cert,
            "signing_key": self.signing_key,
        }

    def to_yaml(self) -> str:
        """The card file's text (``card.yaml``): what a party sends to the assembler."""
        import yaml

        doc = {"format": CARD_FORMAT, "index": self.index, "card": self.entry()}
        return f"# mpc_agg party card of aggregator {self.index}: public, share it.\n" + (
            yaml.safe_dump(doc, sort_keys=False)
        )

    def differences(self, address: AggregatorAddress) -> list[str]:
        """The keys in which topology entry ``address`` differs from this card (empty if it
        holds the card unchanged); addresses compare case-insensitively, keys by digest."""
        out = []
        if address.index != self.index:
            out.append("index")
        if address.host.lower() != self.host.lower():
            out.append("host")
        out += [k for k in ("mpc_port", "http_port") if getattr(address, k) != getattr(self, k)]
        for key in ("party_cert", "http_cert"):
            theirs = getattr(address, key)
            if theirs is None or cert_digest(theirs) != cert_digest(getattr(self, key)):
                out.append(key)
        if address.signing_key != self.signing_key:
            out.append("signing_key")
        return out


def read_card(path: str | Path) -> PartyCard:
    """The card in ``path``: a ``card.yaml`` file or a party directory holding one.
    Raises :class:`ConfigError` naming the file and the key on anything malformed."""

    path = Path(path)
    if path.is_dir():
        path = path / CARD
    source = str(path)
    doc = read_small_document(path, "a party card", _MAX_CARD_BYTES)
    if not isinstance(doc, dict) or doc.get("format", CARD_FORMAT) != CARD_FORMAT:
        raise ConfigError("format", f"not a party card (expected format: {CARD_FORMAT})", source)
    entry, index = doc.get("card"), doc.get("index")
    if not isinstance(entry, dict):
        raise ConfigError("card", "expected the card's mapping", source)
    try:
        address = AggregatorAddress(index=index, **entry)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError("card", f"unexpected keys: {exc}", source) from None
    except ConfigError as exc:
        key = exc.path.replace(f"aggregators[{index}]", "card")
        raise ConfigError(key, exc.detail, source) from None
    if not address.has_keys:
        raise ConfigError("card", "a card names party_cert, http_cert and signing_key", source)
    assert address.party_cert and address.http_cert and address.signing_key
    return PartyCard(
        index=address.index,
        host=address.host,
        mpc_port=address.mpc_port,
        http_port=address.http_port,
        party_cert=address.party_cert,
        http_cert=address.http_cert,
        signing_key=address.signing_key,
    )


def generate_party_dir(
    directory: Path, index: int, host: str, mpc_port: int, http_port: int
) -> PartyCard:
    """Create party ``index``'s keys in ``directory`` (made mode 0700) and return its card
    (also written to ``card.yaml``). Refuses to overwrite an existing key."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_own_directory(directory)
    public = (PARTY_LINK_CERT, HTTPS_CERT, CARD)
    existing = [n for n in (*PRIVATE_FILES, *public) if os.path.lexists(directory / n)]
    if existing:
        raise ConfigError(
            _YAML_PATH,
            f"{str(directory)!r} already holds {', '.join(existing)}; keys are never overwritten",
        )
    link_key = ec.generate_private_key(ec.SECP256R1())
    http_key = ec.generate_private_key(ec.SECP256R1())
    signing = Ed25519PrivateKey.generate()
    card = PartyCard(
        index=index,
        host=host,
        mpc_port=mpc_port,
        http_port=http_port,
        party_cert=self_signed_certificate(link_key, f"mpc_agg party {index}", None),
        http_cert=self_signed_certificate(http_key, f"mpc_agg https {index}", host),
        signing_key=signing.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex(),
    )
    create_private(directory / PARTY_LINK_KEY, _pkcs8(link_key))
    create_private(directory / HTTPS_KEY, _pkcs8(http_key))
    create_private(directory / SIGNING_KEY, _pkcs8(signing))
    create_private(directory / TOKEN_KEY, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode())
    create_private(
        directory / COLLECTOR_TOKEN, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode()
    )
    _write_public(directory / PARTY_LINK_CERT, card.party_cert)
    _write_public(directory / HTTPS_CERT, card.http_cert)
    _write_public(directory / CARD, card.to_yaml())
    return card


def _check_own_directory(directory: Path) -> None:
    """Refuse a party directory someone else could change: not a directory, owned by
    another user, or writable by group or others (they could swap a key, or plant a
    link where a file is about to be written)."""
    if os.name != "posix":
        return
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(_YAML_PATH, f"cannot use {str(directory)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(_YAML_PATH, f"{str(directory)!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            _YAML_PATH,
            f"{str(directory)!r} belongs to another user (uid {st.st_uid}); keys go into a "
            "directory of the user that runs the party",
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            _YAML_PATH,
            f"{str(directory)!r} is writable by group or others (mode "
            f"{st.st_mode & 0o777:04o}); run `chmod 700 {directory}` or give a new directory",
        )


def _write_public(path: Path, text: str) -> None:
    """Create ``path`` exclusively (never through a link, never over a file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o644), "w") as f:
        f.write(text)


@dataclass(frozen=True, repr=False)
class PartySecrets:
    """What a running party loads from its own directory (never printed).

    ``party_link`` and ``https``: ``(certificate path, key path)`` pairs for
    :mod:`ssl`; ``signing_key``: its Ed25519 key; ``credentials``: what it checks client
    and collector tokens against.
    """

    directory: Path
    party_link: tuple[Path, Path]
    https: tuple[Path, Path]
    signing_key: Ed25519PrivateKey
    credentials: Credentials

    def __repr__(self) -> str:
        return f"PartySecrets({str(self.directory)!r}, <hidden>)"


def _read_private(path: Path) -> bytes:
    return read_private(path, _YAML_PATH, missing="; this is not a party directory")


def _read_hex_secret(path: Path) -> bytes:
    text = _read_private(path).strip()
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(_YAML_PATH, f"{str(path)!r} must hold {2 * KEY_BYTES} hex characters")
    return raw


def load_party_dir(directory: Path, address: AggregatorAddress) -> PartySecrets:
    """Party ``address.index``'s secrets from ``directory``, checked against the public keys
    the topology names for it (a directory of another party, or of another topology, is
    refused with the key that differs)."""
    directory = Path(directory).resolve()
    where = f"aggregators[{address.index}]"
    if not address.has_keys:
        raise ConfigError(
            where,
            "this topology names no keys for the aggregator (it is a template): start it with "
            "the local launcher, which provisions keys, or assemble it from the parties' cards",
        )
    for cert_file, key_name in ((PARTY_LINK_CERT, "party_cert"), (HTTPS_CERT, "http_cert")):
        on_disk = (directory / cert_file).read_text() if (directory / cert_file).exists() else ""
        if not on_disk or cert_digest(on_disk) != cert_digest(str(getattr(address, key_name))):
            raise ConfigError(
                f"{where}.{key_name}",
                f"the certificate in {str(directory / cert_file)!r} is not the one the topology "
                f"names for aggregator {address.index}: wrong party directory or topology",
            )
    signing = serialization.load_pem_private_key(_read_private(directory / SIGNING_KEY), None)
    if not isinstance(signing, Ed25519PrivateKey):
        raise ConfigError(_YAML_PATH, f"{str(directory / SIGNING_KEY)!r} is not an Ed25519 key")
    public = signing.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if public.hex() != address.signing_key:
        raise ConfigError(
            f"{where}.signing_key",
            f"the signing key in {str(directory)!r} does not match the topology's "
            f"signing_key for aggregator {address.index}",
        )
    if (directory / CARD).exists():
        differ = read_card(directory).differences(address)
        if differ:
            raise ConfigError(
                where,
                f"the topology's entry differs from this party's own card "
                f"({str(directory / CARD)!r}) in {', '.join(differ)}: it was changed after "
                "the card was sent, or this is another party's directory",
            )
    for name in (PARTY_LINK_KEY, HTTPS_KEY):
        _read_private(directory / name)  # existence and mode; ssl loads and matches them
    credentials = Credentials(
        _read_hex_secret(directory / TOKEN_KEY),
        _read_hex_secret(directory / COLLECTOR_TOKEN).hex(),
    )
    return PartySecrets(
        directory=directory,
        party_link=(directory / PARTY_LINK_CERT, directory / PARTY_LINK_KEY),
        https=(directory / HTTPS_CERT, directory / HTTPS_KEY),
        signing_key=signing,
        credentials=credentials,
    )


def collector_token(directory: Path) -> str:
    """The token the collector presents to the aggregator of party directory ``directory``."""
    return _read_hex_secret(Path(directory) / COLLECTOR_TOKEN).hex()


def token_key(directory: Path) -> bytes:
    """The HMAC key client tokens of this aggregator are made with."""
    return _read_hex_secret(Path(directory) / TOKEN_KEY)
