"""Checks on party directories shared by the tests: no party directory holds another
party's secrets, in any encoding."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc_agg.identity import PRIVATE_FILES


def public_key_of(data: bytes) -> bytes | None:
    """The public key (DER) of the PEM private key in ``data``, or None if it holds none."""
    if b"PRIVATE KEY-----" not in data:
        return None
    key = serialization.load_pem_private_key(data, None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw_secret(data: bytes) -> bytes:
    """The raw secret of a private file: a key's private scalar or seed, a token's bytes."""
    if public_key_of(data) is None:
        return bytes.fromhex(data.decode().strip())
    key = serialization.load_pem_private_key(data, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.private_numbers().private_value.to_bytes(32, "big")
    assert isinstance(key, Ed25519PrivateKey)
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def foreign_secrets(party_dirs: list[Path]) -> list[str]:
    """Every file under one party directory that holds a secret of another party: a private
    file's text, its raw secret (bytes or hex), or a private key, in any PEM encoding, whose
    public key is another party's."""
    needles, publics = [], []
    for d in party_dirs:
        files = [(d / name).read_bytes() for name in PRIVATE_FILES]
        raws = [_raw_secret(f) for f in files]
        needles.append([f.strip() for f in files] + raws + [r.hex().encode() for r in raws])
        publics.append({public_key_of(f) for f in files} - {None})
    found = []
    for j, directory in enumerate(party_dirs):
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            data = path.read_bytes()
            public = public_key_of(data)
            found += [
                f"{path} holds a secret of party {i}"
                for i in range(len(party_dirs))
                if i != j and (public in publics[i] or any(n in data for n in needles[i]))
            ]
    return found
