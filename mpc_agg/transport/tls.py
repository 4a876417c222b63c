"""TLS contexts for an aggregator's HTTPS API and the files MPyC's ``--ssl`` reads.

README, "Security model": client uploads travel over TLS, and the MPyC party links are
mutually authenticated so only the configured aggregators can send anything (MPyC unpickles
what arrives on a party link). ``scripts/make_certs.py CONFIG`` writes one directory per
topology, for ``m`` aggregators::

    tls_dir/
      ca.crt  ca.key                  the topology's own CA (ca.key: mode 0600, keep offline)
      http_{i}.crt  http_{i}.key      aggregator i's HTTPS server certificate (SAN = its host)
      .config/party_{i}.crt           MPyC party i: CN "MPyC party {i}", no DNS SAN,
      .config/party_{i}.key             clientAuth + serverAuth
      .config/mpyc_ca.crt             a copy of ca.crt, the name MPyC looks for

MPyC reads ``.config/...`` relative to its working directory (see :func:`mpyc_dir`) and checks
the literal host name ``"MPyC party {j}"`` when it connects to party ``j``; with no DNS
SubjectAltName in the certificate, OpenSSL matches that name against the CN.

Everything here builds paths and :class:`ssl.SSLContext` objects; nothing listens or connects.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from mpc_agg.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
MPYC_CONFIG = ".config"
MPYC_CA_CERT = "mpyc_ca.crt"
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
YAML_PATH = "tls.dir"
MAKE_CERTS_HINT = "run `python scripts/make_certs.py CONFIG` to create them"


def party_hostname(index: int) -> str:
    """The name MPyC checks in party ``index``'s certificate (its CN)."""
    return f"MPyC party {index}"


def ca_cert_path(tls_dir: Path) -> Path:
    """The CA certificate every client and aggregator trusts."""
    return Path(tls_dir) / CA_CERT


def ca_key_path(tls_dir: Path) -> Path:
    """The CA's private key; only ``make_certs`` needs it."""
    return Path(tls_dir) / CA_KEY


def http_cert_paths(tls_dir: Path, index: int) -> tuple[Path, Path]:
    """``(certificate, key)`` of aggregator ``index``'s HTTPS server."""
    tls_dir = Path(tls_dir)
    return tls_dir / f"http_{index}.crt", tls_dir / f"http_{index}.key"


def mpyc_dir(tls_dir: Path) -> Path:
    """The directory holding MPyC's ``.config/``: MPyC's working directory under ``--ssl``.

    MPyC opens ``.config/party_{i}.crt``, ``.config/party_{i}.key`` and
    ``.config/mpyc_ca.crt`` relative to the process's current directory, each time it opens
    a party link, so the party must run MPyC's ``start()`` from here.
    """
    return Path(tls_dir)


def party_cert_paths(tls_dir: Path, index: int) -> tuple[Path, Path]:
    """``(certificate, key)`` MPyC party ``index`` presents on its party links."""
    config = mpyc_dir(tls_dir) / MPYC_CONFIG
    return config / f"party_{index}.crt", config / f"party_{index}.key"


def mpyc_ca_path(tls_dir: Path) -> Path:
    """The CA certificate MPyC verifies party certificates against (a copy of ``ca.crt``)."""
    return mpyc_dir(tls_dir) / MPYC_CONFIG / MPYC_CA_CERT


def required_files(tls_dir: Path, m: int, index: int | None = None) -> list[Path]:
    """The files a party needs: for aggregator ``index``, or for all ``m`` when ``None``.

    The CA key is not among them: no party needs it at run time.
    """
    indices = range(m) if index is None else [index]
    files = [ca_cert_path(tls_dir), mpyc_ca_path(tls_dir)]
    for i in indices:
        files += [*http_cert_paths(tls_dir, i), *party_cert_paths(tls_dir, i)]
    return files


def private_key_files(tls_dir: Path, m: int) -> list[Path]:
    """Every private key ``make_certs`` writes for ``m`` aggregators (the CA key first)."""
    keys = [ca_key_path(tls_dir)]
    for i in range(m):
        keys += [http_cert_paths(tls_dir, i)[1], party_cert_paths(tls_dir, i)[1]]
    return keys


def check_tls_dir(tls_dir: Path, m: int, *, index: int | None = None) -> None:
    """Raise :class:`ConfigError` (``tls.dir``) naming every missing file in ``tls_dir``.

    Checks the files of all ``m`` aggregators, or of aggregator ``index`` only (a party on its
    own machine holds only its own keys). Private keys readable by group or others are
    refused too, with the ``chmod`` that fixes them.
    """
    tls_dir = Path(tls_dir)
    if index is not None and not 0 <= index < m:
        raise ValueError(f"index must be in 0..{m - 1}, got {index}")
    files = required_files(tls_dir, m, index)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            YAML_PATH,
            f"TLS directory {str(tls_dir)!r} lacks {len(missing)} file(s): "
            f"{', '.join(missing)}; {MAKE_CERTS_HINT}",
        )
    loose = [str(f) for f in files if f.suffix == ".key" and _group_or_other_access(f)]
    if loose:
        raise ConfigError(
            YAML_PATH,
            f"private key(s) accessible to group or others: {', '.join(loose)}; "
            f"run `chmod 600` on them",
        )


def server_context(tls_dir: Path, index: int) -> ssl.SSLContext:
    """TLS server context for aggregator ``index``'s HTTPS API (TLS >= 1.2, no client cert).

    Clients authenticate with bearer tokens, not certificates (README, "Security model").
    """
    crt, key = http_cert_paths(tls_dir, index)
    _require([crt, key], tls_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MIN_TLS_VERSION
    _load_chain(context, crt, key)
    return context


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """TLS client context that trusts only the topology's CA, with host name checks.

    System CAs are not loaded: an aggregator certificate must chain to ``ca.crt``.
    """
    ca = ca_cert_path(tls_dir)
    _require([ca], tls_dir)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(
            YAML_PATH, f"{str(ca)!r} is not a PEM CA certificate ({exc.reason}); {MAKE_CERTS_HINT}"
        ) from None
    context.minimum_version = MIN_TLS_VERSION
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _require(files: list[Path], tls_dir: Path) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            YAML_PATH,
            f"TLS directory {str(tls_dir)!r} lacks {', '.join(missing)}; {MAKE_CERTS_HINT}",
        )


def _load_chain(context: ssl.SSLContext, crt: Path, key: Path) -> None:
    try:
        context.load_cert_chain(str(crt), keyfile=str(key))
    except ssl.SSLError as exc:
        # The reason is OpenSSL's short code (e.g. KEY_VALUES_MISMATCH), never key material.
        raise ConfigError(
            YAML_PATH,
            f"cannot load certificate {str(crt)!r} with key {str(key)!r} ({exc.reason}); "
            f"{MAKE_CERTS_HINT} (with --force to replace them)",
        ) from None


def _group_or_other_access(path: Path) -> bool:
    if os.name != "posix":
        return False
    return bool(path.stat().st_mode & 0o077)
