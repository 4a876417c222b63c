"""The topology fingerprint: one SHA-256 over everything that affects a round's result.

docs/design.md, "One agreed topology"; README, "Security model". Parties compare
fingerprints when their links come up and refuse to work with a party that holds another
topology; clients and the collector send theirs with every request and aggregators refuse a
request made under another one (409 ``topology_mismatch``). A result statement names it.

What is covered, section by section (each has its own digest, so a mismatch can be named):

``format``       the fingerprint's own version and the topology's ``name``
``aggregators``  each aggregator's host, ports and the SHA-256 of its public keys
``threshold``    MPyC's Shamir threshold
``encoding``     ``frac_bits``, ``coord_clip``, ``l2_clip``, and ``ring`` unless it is the
                 default ``gf_p61`` (so fingerprints from before the key existed stand)
``rounds``       ``min_clients``, ``max_clients``, ``max_dim``
``dp``           every field of the ``dp`` section (or none)
``security``     ``insecure``

Local tuning that cannot change a result (``data_dir``, ``fsync``, deadlines, upload
buffer, concurrency, results kept) is left out, so each organisation may set its own.
The encoding of a section is JSON with sorted keys and no spaces (floats in Python's
shortest round-trip form), prefixed by a label and the section name.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from typing import Any

from mpc_agg.config.schema import Topology
from mpc_agg.core.ring import GF_P61

FORMAT = "mpc_agg/topology-fingerprint/v1"
TOPOLOGY_HEADER = "X-Mpc-Agg-Topology"
"""The request header in which clients and the collector send their fingerprint."""
SECTIONS = ("format", "aggregators", "threshold", "encoding", "rounds", "dp", "security")


def _key_digest(material: str | None, pem: bool) -> str | None:
    """SHA-256 (hex) of a certificate's DER bytes, or of a hex public key; None if absent."""
    if material is None:
        return None
    raw = ssl.PEM_cert_to_DER_cert(material.strip() + "\n") if pem else bytes.fromhex(material)
    return hashlib.sha256(raw).hexdigest()


def section_values(topology: Topology) -> dict[str, Any]:
    """The JSON-ready value of each fingerprinted section of ``topology``."""
    enc = topology.encoding
    dp = topology.dp
    return {
        "format": {"version": FORMAT, "name": topology.name},
        "aggregators": [
            {
                "host": a.host.lower(),
                "mpc_port": a.mpc_port,
                "http_port": a.http_port,
                "party_cert": _key_digest(a.party_cert, pem=True),
                "http_cert": _key_digest(a.http_cert, pem=True),
                "signing_key": _key_digest(a.signing_key, pem=False),
            }
            for a in topology.aggregators
        ],
        "threshold": topology.threshold,
        "encoding": {
            "frac_bits": enc.frac_bits,
            "coord_clip": enc.coord_clip,
            "l2_clip": enc.l2_clip,
            # Only a non-default ring is named: every topology written before rings existed
            # (all GF(p)) keeps its fingerprint, and so its data directories and clients.
            **({} if enc.ring is GF_P61 else {"ring": enc.ring.name}),
        },
        "rounds": {
            "min_clients": topology.rounds.min_clients,
            "max_clients": topology.rounds.max_clients,
            "max_dim": topology.rounds.max_dim,
        },
        "dp": None
        if dp is None
        else {
            "mechanism": dp.mechanism.value,
            "epsilon": dp.epsilon,
            "delta": dp.delta,
            "l2_clip": dp.l2_clip,
            "max_colluding": dp.max_colluding,
            "budget_epsilon": dp.budget_epsilon,
            "budget_delta": dp.budget_delta,
        },
        "security": {"insecure": topology.insecure},
    }


def section_digests(topology: Topology) -> dict[str, str]:
    """SHA-256 (hex) of each section's canonical encoding, by section name."""
    out = {}
    for name, value in section_values(topology).items():
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        out[name] = hashlib.sha256(f"{FORMAT}\x00{name}\x00{text}".encode()).hexdigest()
    return out


def fingerprint_of(digests: dict[str, str]) -> str:
    """The fingerprint (64 hex characters) over the section digests."""
    joined = "".join(f"{name}={digests[name]};" for name in SECTIONS)
    return hashlib.sha256(f"{FORMAT}\x00{joined}".encode()).hexdigest()


def fingerprint(topology: Topology) -> str:
    """The topology's fingerprint: 64 lowercase hex characters."""
    return fingerprint_of(section_digests(topology))


def differing_sections(mine: dict[str, str], theirs: object) -> list[str]:
    """The sections whose digests differ (all of them if ``theirs`` is not a digest map)."""
    if not isinstance(theirs, dict):
        return list(SECTIONS)
    return [name for name in SECTIONS if mine.get(name) != theirs.get(name)]
