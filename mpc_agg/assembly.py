"""The shared topology, assembled from a template and the parties' public cards.

README, "Deploying across organisations"; docs/design.md, "Keys and identities". Each
organisation runs ``mpc-agg keygen`` on its own machine and sends only its card
(``card.yaml``: address, certificates, signing key). Whoever assembles (any of them, or
all of them independently: the result is the same bytes) runs ``mpc-agg assemble`` with
the template (name, threshold, rounds, encoding, dp, deadlines) and the cards. The output
holds public material only, and every party checks that it holds its own card unchanged
(:func:`card_differences`; a party also refuses to start otherwise) and compares the
fingerprint printed here with the others' before starting.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.load import read_document
from mpc_agg.config.schema import Topology
from mpc_agg.errors import ConfigError
from mpc_agg.identity import PartyCard

_ADDRESS_KEYS = ("host", "mpc_port", "http_port")


@dataclass(frozen=True)
class Assembled:
    """An assembled topology: its YAML text, the validated topology and its fingerprint."""

    text: str
    topology: Topology
    fingerprint: str


def assemble(template: str | Path, cards: Sequence[PartyCard]) -> Assembled:
    """The topology of ``template`` with ``aggregators`` made of ``cards`` (by index).

    The template's own ``aggregators`` list is optional; when present it must have one
    entry per card, each naming at most host and ports, and those must match the card
    (a mismatch is named, never silently replaced). Cards must cover indices 0..m-1 once.
    Raises :class:`ConfigError`.
    """
    source = str(template)
    doc = read_document(template)
    if not isinstance(doc, dict):
        raise ConfigError("<root>", "a topology template is a mapping of keys", source)
    by_index: dict[int, PartyCard] = {}
    for card in cards:
        if card.index in by_index:
            raise ConfigError(
                "aggregators", f"two cards for aggregator {card.index} were given", source
            )
        by_index[card.index] = card
    m = len(by_index)
    missing = [i for i in range(m) if i not in by_index]
    if missing:
        raise ConfigError(
            "aggregators",
            f"the cards must be numbered 0..{m - 1}; missing {', '.join(map(str, missing))} "
            f"(got {', '.join(map(str, sorted(by_index)))})",
            source,
        )
    planned = doc.get("aggregators")
    if planned is not None:
        if not isinstance(planned, list) or len(planned) != m:
            size = len(planned) if isinstance(planned, list) else planned
            raise ConfigError(
                "aggregators", f"the template plans {size} aggregators, but {m} cards were given"
            )
        for i, entry in enumerate(planned):
            _check_planned(i, entry, by_index[i], source)
    out = copy.deepcopy(doc)
    out["aggregators"] = [by_index[i].entry() for i in range(m)]
    topology = Topology.from_dict(out, source=source)
    digest = fingerprint(topology)
    text = (
        f"# mpc_agg topology {topology.name}, assembled from {m} party cards and {source}.\n"
        f"# Public material only. Fingerprint: {digest}\n"
        "# Every party checks it holds its own card (mpc-agg verify --card) and compares\n"
        "# this fingerprint with the others' before starting.\n"
        + yaml.safe_dump(out, sort_keys=False)
    )
    return Assembled(text=text, topology=topology, fingerprint=digest)


def _check_planned(index: int, entry: object, card: PartyCard, source: str) -> None:
    where = f"aggregators[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(where, f"expected a mapping of {', '.join(_ADDRESS_KEYS)}", source)
    extra = sorted(str(k) for k in entry if k not in _ADDRESS_KEYS)
    if extra:
        raise ConfigError(
            f"{where}.{extra[0]}",
            "a template plans addresses only; keys come from the party's card",
            source,
        )
    for key in _ADDRESS_KEYS:
        if key in entry and str(entry[key]).lower() != str(getattr(card, key)).lower():
            raise ConfigError(
                f"{where}.{key}",
                f"the template plans {entry[key]!r}, but aggregator {index}'s card says "
                f"{getattr(card, key)!r}",
                source,
            )


def card_differences(topology: Topology, card: PartyCard) -> list[str]:
    """The keys in which ``topology`` does not hold ``card`` unchanged (empty if it does)."""
    if card.index >= topology.m:
        return ["index"]
    return card.differences(topology.aggregators[card.index])
