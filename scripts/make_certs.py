#!/usr/bin/env python
"""Create the TLS certificates of a topology: a CA, HTTPS server and MPyC party certificates.

    python scripts/make_certs.py CONFIG [--out DIR] [--force] [--days N]

Writes, for a topology of m aggregators (layout in mpc_agg/transport/tls.py):

    DIR/ca.crt, DIR/ca.key                        the topology's own CA (EC P-256)
    DIR/http_{i}.crt, DIR/http_{i}.key            aggregator i's HTTPS API (SAN = its host)
    DIR/.config/party_{i}.crt, party_{i}.key      MPyC party i (CN "MPyC party i", mutual TLS)
    DIR/.config/mpyc_ca.crt                       a copy of ca.crt, for MPyC's --ssl

Private keys are written with mode 0600. Existing files are never overwritten without --force.
DIR defaults to the topology's tls.dir if it has one, else tls/<topology name> under the
current directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpc_agg import Topology
from mpc_agg.errors import ConfigError
from mpc_agg.transport import tls

DEFAULT_DAYS = 825
"""Validity of every certificate: the CA/Browser Forum's old ceiling for server certificates."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from a little before ``now``, for peers whose clocks lag."""
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class Issued:
    """One certificate and its private key, ready to write."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"Issued({self.cert.subject.rfc4514_string()}, key=<EC P-256 private key>)"


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def issue_ca(name: str, now: dt.datetime, days: int = DEFAULT_DAYS) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mpc_agg"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"mpc_agg CA {name}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(subject, subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def http_subject_alt_names(host: str) -> list[x509.GeneralName]:
    """SubjectAltNames for an aggregator at ``host``: the host itself (an IP address if it
    parses as one, else a DNS name), plus ``localhost`` and ``127.0.0.1`` for a loopback host."""
    names: list[x509.GeneralName] = []
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        names.append(x509.DNSName(host))
        loopback = host.lower() in _LOOPBACK_NAMES
    else:
        names.append(x509.IPAddress(ip))
        loopback = ip.is_loopback
    if loopback:
        for extra in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
            if extra not in names:
                names.append(extra)
    return names


def issue_http_cert(
    ca: Issued, index: int, host: str, now: dt.datetime, days: int = DEFAULT_DAYS
) -> Issued:
    """Aggregator ``index``'s HTTPS server certificate for ``host`` (serverAuth)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mpc_agg aggregator {index}")])
    builder, key = _leaf_builder(ca, subject, now, days, [ExtendedKeyUsageOID.SERVER_AUTH])
    builder = builder.add_extension(
        x509.SubjectAlternativeName(http_subject_alt_names(host)), critical=False
    )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_party_cert(ca: Issued, index: int, now: dt.datetime, days: int = DEFAULT_DAYS) -> Issued:
    """MPyC party ``index``'s certificate: CN ``MPyC party {index}`` and no SubjectAltName, so
    OpenSSL's host check (MPyC passes that literal name) falls back to the CN; clientAuth and
    serverAuth, since each party link is mutual TLS."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, tls.party_hostname(index))])
    builder, key = _leaf_builder(
        ca,
        subject,
        now,
        days,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def planned_files(tls_dir: Path, m: int) -> list[Path]:
    """Every file :func:`write_tls_dir` writes for ``m`` aggregators, in writing order."""
    files = [tls.ca_cert_path(tls_dir), tls.ca_key_path(tls_dir), tls.mpyc_ca_path(tls_dir)]
    for i in range(m):
        files += [*tls.http_cert_paths(tls_dir, i), *tls.party_cert_paths(tls_dir, i)]
    return files


def write_tls_dir(
    topology: Topology,
    tls_dir: Path,
    *,
    now: dt.datetime,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Issue and write every certificate of ``topology`` into ``tls_dir``; return the paths.

    Raises :class:`FileExistsError` naming the files already there, unless ``force``.
    """
    tls_dir = Path(tls_dir)
    files = planned_files(tls_dir, topology.m)
    existing = [f for f in files if f.exists()]
    if existing and not force:
        raise FileExistsError(", ".join(str(f) for f in existing))
    ca = issue_ca(topology.name, now, days)
    issued: list[tuple[Path, Path, Issued]] = []
    for a in topology.aggregators:
        issued.append(
            (
                *tls.http_cert_paths(tls_dir, a.index),
                issue_http_cert(ca, a.index, a.host, now, days),
            )
        )
        issued.append(
            (*tls.party_cert_paths(tls_dir, a.index), issue_party_cert(ca, a.index, now, days))
        )

    # The directory holds private keys (the CA's among them): owner-only when we create it.
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tls_dir / tls.MPYC_CONFIG).mkdir(exist_ok=True, mode=0o700)
    written = []
    for crt, key, item in [(tls.ca_cert_path(tls_dir), tls.ca_key_path(tls_dir), ca), *issued]:
        _write(key, _key_pem(item.key), 0o600)
        _write(crt, item.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [crt, key]
    _write(tls.mpyc_ca_path(tls_dir), ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    written.append(tls.mpyc_ca_path(tls_dir))
    return written


def default_out(topology: Topology) -> Path:
    """The topology's ``tls.dir`` when it has one, else ``tls/<name>`` (relative to the cwd)."""
    configured = getattr(getattr(topology, "tls", None), "dir", None)
    return Path(configured) if configured else Path("tls") / topology.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_certs.py",
        description=(
            "Create the TLS files of an mpc_agg topology: a CA of its own, an HTTPS server "
            "certificate per aggregator (for client uploads) and an MPyC party certificate per "
            "aggregator (for the mutually authenticated party links, MPyC's --ssl). Private "
            "keys are EC P-256, written with mode 0600."
        ),
        epilog=(
            "Deploying on several machines: aggregator i needs ca.crt, http_i.crt, http_i.key "
            "and .config/{party_i.crt,party_i.key,mpyc_ca.crt}; clients and the collector need "
            "only ca.crt. Keep ca.key off the aggregators (it can mint any party's identity)."
        ),
    )
    parser.add_argument("config", help="topology YAML, e.g. configs/local-3.yaml")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="directory to write (default: the topology's tls.dir, else tls/<topology name>)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing certificates and keys"
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity of every certificate in days (default {DEFAULT_DAYS})",
    )
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error(f"--days must be at least 1, got {args.days}")
    try:
        topology = Topology.load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else default_out(topology)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        written = write_tls_dir(topology, out, now=now, days=args.days, force=args.force)
    except FileExistsError as exc:
        print(
            f"error: refusing to overwrite existing files (use --force to replace them): {exc}",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(f"wrote {path}")
    until = (now + dt.timedelta(days=args.days)).date().isoformat()
    print(
        f"{topology.name}: CA and certificates for {topology.m} aggregators in {out} "
        f"(valid until {until}); keep {tls.ca_key_path(out)} offline in production"
    )
    return 0


# --------------------------------------------------------------------------- internals


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _leaf_builder(
    ca: Issued,
    subject: x509.Name,
    now: dt.datetime,
    days: int,
    usages: list[x509.ObjectIdentifier],
) -> tuple[x509.CertificateBuilder, ec.EllipticCurvePrivateKey]:
    key = new_key()
    builder = (
        _builder(subject, ca.cert.subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    return builder, key


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from the first byte (a key is never
    readable by others, even briefly, and a crash leaves the old file or the new one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
