"""The topology fingerprint (mpc_agg.config.fingerprint): every setting that can change a
round's result changes it, and ``differing_sections`` names exactly the section changed;
local tuning does not; it is stable across reloads, key order and PEM whitespace."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpc_agg import Topology
from mpc_agg.config.fingerprint import (
    SECTIONS,
    TOPOLOGY_HEADER,
    differing_sections,
    fingerprint,
    fingerprint_of,
    section_digests,
)
from mpc_agg.identity import PartyCard, generate_party_dir

from .conftest import write_topology

M = 3
PORTS = [(31001, 32001), (31002, 32002), (31003, 32003)]
DP = {
    "mechanism": "discrete_gaussian",
    "epsilon": 1.0,
    "delta": 1e-5,
    "l2_clip": 1.0,
    "max_colluding": 1,
    "budget": {"epsilon": 8.0, "delta": 1e-4},
}

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> list[PartyCard]:
    """Four parties' cards: three for the topology, a fourth to swap keys in from."""
    root = tmp_path_factory.mktemp("cards")
    return [generate_party_dir(root / f"p{i}", i % M, "127.0.0.1", *PORTS[i % M]) for i in range(4)]


@pytest.fixture
def base(cards: list[PartyCard]) -> Doc:
    """A keyed topology document with a dp section."""
    return {
        "name": "fp",
        "threshold": 1,
        "aggregators": [c.entry() for c in cards[:M]],
        "rounds": {"min_clients": 2, "max_clients": 100, "max_dim": 1000},
        "encoding": {"frac_bits": 16, "coord_clip": None},
        "dp": copy.deepcopy(DP),
        "data_dir": "data/fp",
        "fsync": True,
    }


def load(doc: Doc) -> Topology:
    return Topology.from_dict(copy.deepcopy(doc))


def changed(doc: Doc, change: Callable[[Doc], None]) -> Doc:
    out = copy.deepcopy(doc)
    change(out)
    return out


def set_key(path: str, value: Any) -> Callable[[Doc], None]:
    """A change setting the dotted ``path`` (list indices as numbers) to ``value``."""

    def change(doc: Doc) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        target[last] = value

    return change


def swap_key(key: str, index: int = 1) -> Callable[[Doc], None]:
    """Aggregator ``index``'s ``key`` replaced by the fourth party's."""

    def change(doc: Doc) -> None:
        doc["aggregators"][index][key] = doc["_spare"][key]

    return change


RESULT_CHANGES: list[tuple[str, Callable[[Doc], None], str]] = [
    ("name", set_key("name", "fp2"), "format"),
    ("encoding.frac_bits", set_key("encoding.frac_bits", 17), "encoding"),
    ("encoding.coord_clip", set_key("encoding.coord_clip", 5.0), "encoding"),
    ("threshold", set_key("threshold", 0), "threshold"),
    ("rounds.min_clients", set_key("rounds.min_clients", 3), "rounds"),
    ("rounds.max_clients", set_key("rounds.max_clients", 99), "rounds"),
    ("rounds.max_dim", set_key("rounds.max_dim", 999), "rounds"),
    ("dp.epsilon", set_key("dp.epsilon", 2.0), "dp"),
    ("dp.delta", set_key("dp.delta", 1e-6), "dp"),
    ("dp.budget.epsilon", set_key("dp.budget.epsilon", 9.0), "dp"),
    ("dp.max_colluding", set_key("dp.max_colluding", 0), "dp"),
    ("dp.budget.delta", set_key("dp.budget.delta", 2e-4), "dp"),
    ("party_cert", swap_key("party_cert"), "aggregators"),
    ("http_cert", swap_key("http_cert", 2), "aggregators"),
    ("signing_key", swap_key("signing_key", 0), "aggregators"),
    ("host", set_key("aggregators.1.host", "localhost"), "aggregators"),
    ("mpc_port", set_key("aggregators.2.mpc_port", 31999), "aggregators"),
    ("http_port", set_key("aggregators.0.http_port", 32999), "aggregators"),
    ("insecure", set_key("insecure", True), "security"),
]

LOCAL_TUNING: list[tuple[str, Callable[[Doc], None]]] = [
    ("data_dir", set_key("data_dir", "/elsewhere/fp")),
    ("fsync", set_key("fsync", False)),
    ("deadlines.step_s", set_key("deadlines.step_s", 7.0)),
    ("deadlines.upload_s", set_key("deadlines.upload_s", 3.0)),
    ("deadlines.startup_s", set_key("deadlines.startup_s", 99.0)),
    ("rounds.upload_buffer_mb", set_key("rounds.upload_buffer_mb", 64)),
    ("rounds.keep_results", set_key("rounds.keep_results", 9)),
    ("rounds.max_concurrent_uploads", set_key("rounds.max_concurrent_uploads", 2)),
]


@pytest.mark.parametrize(
    ("what", "change", "section"), RESULT_CHANGES, ids=[c[0] for c in RESULT_CHANGES]
)
def test_a_change_that_can_change_a_result_changes_the_fingerprint_and_names_its_section(
    base: Doc, cards: list[PartyCard], what: str, change: Callable[[Doc], None], section: str
) -> None:
    other = changed(dict(base, _spare=cards[M].entry()), change)
    del other["_spare"]
    before, after = load(base), load(other)
    assert fingerprint(after) != fingerprint(before), what
    assert differing_sections(section_digests(before), section_digests(after)) == [section]
    assert differing_sections(section_digests(after), section_digests(before)) == [section]


def test_adding_or_removing_dp_is_a_dp_change(base: Doc) -> None:
    without = changed(base, lambda d: d.pop("dp"))
    without["encoding"]["l2_clip"] = DP["l2_clip"]  # the encoding the dp section implies
    before, after = load(base), load(without)
    assert after.dp is None and after.encoding == before.encoding
    assert differing_sections(section_digests(before), section_digests(after)) == ["dp"]


@pytest.mark.parametrize(("what", "change"), LOCAL_TUNING, ids=[c[0] for c in LOCAL_TUNING])
def test_local_tuning_leaves_the_fingerprint_alone(
    base: Doc, what: str, change: Callable[[Doc], None]
) -> None:
    before, after = load(base), load(changed(base, change))
    assert after != before, what  # the change took effect
    assert section_digests(after) == section_digests(before), what
    assert fingerprint(after) == fingerprint(before), what


def test_stable_across_reloads_key_order_and_pem_whitespace(base: Doc, tmp_path: Path) -> None:
    expected = fingerprint(load(base))
    assert len(expected) == 64 and set(expected) <= set("0123456789abcdef")
    path = write_topology(tmp_path, base)
    assert fingerprint(Topology.load(path)) == expected
    assert fingerprint(Topology.load(path)) == expected  # and again
    assert fingerprint(Topology.load(path).with_absolute_paths()) == expected

    def reversed_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reversed_keys(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reversed_keys(v) for v in value]
        return value

    assert list(reversed_keys(base)) != list(base)
    assert fingerprint(load(reversed_keys(base))) == expected
    flow = tmp_path / "flow.yaml"  # the same document written in another YAML style
    flow.write_text(yaml.safe_dump(reversed_keys(base), default_flow_style=True, width=10_000))
    assert fingerprint(Topology.load(flow)) == expected

    def reformat_pems(doc: Doc) -> None:
        for entry in doc["aggregators"]:
            for key in ("party_cert", "http_cert"):
                entry[key] = "\n" + entry[key].strip() + "\n\n"

    assert fingerprint(load(changed(base, reformat_pems))) == expected
    upper = changed(base, set_key("aggregators.1.host", "LOCALHOST"))
    lower = changed(base, set_key("aggregators.1.host", "localhost"))
    assert fingerprint(load(upper)) == fingerprint(load(lower))


def test_section_digests_and_the_fingerprint_of_them(base: Doc) -> None:
    topology = load(base)
    digests = section_digests(topology)
    assert list(digests) == list(SECTIONS)
    assert len(set(digests.values())) == len(SECTIONS)  # labelled by section name
    assert fingerprint_of(digests) == fingerprint(topology)
    assert differing_sections(digests, dict(digests)) == []
    for theirs in (None, "abc", ["format"], 3):
        assert differing_sections(digests, theirs) == list(SECTIONS)
    assert differing_sections(digests, {}) == list(SECTIONS)
    partial = {k: v for k, v in digests.items() if k != "rounds"}
    assert differing_sections(digests, partial) == ["rounds"]
    assert TOPOLOGY_HEADER == "X-Mpc-Agg-Topology"


def test_a_template_and_its_keyed_topology_differ_in_the_aggregators_only(base: Doc) -> None:
    template = changed(
        base,
        lambda d: d.update(
            aggregators=[
                {k: a[k] for k in ("host", "mpc_port", "http_port")} for a in d["aggregators"]
            ]
        ),
    )
    assert not load(template).has_keys and load(base).has_keys
    assert differing_sections(section_digests(load(template)), section_digests(load(base))) == [
        "aggregators"
    ]
