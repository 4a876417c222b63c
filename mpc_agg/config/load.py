"""YAML topology -> validated :class:`~mpc_agg.config.schema.Topology`.

Unknown keys, missing fields, wrong types and unsafe combinations are refused with a
:class:`~mpc_agg.errors.ConfigError` naming the YAML path (``aggregators[1].http_port``) and
the value. Example document (``configs/local-3.yaml``)::

    name: local-3
    threshold: 1
    aggregators:
      - {host: 127.0.0.1, mpc_port: 11365, http_port: 8701}
      - ...
    rounds: {min_clients: 2, max_clients: 10000, max_dim: 10000000}
    encoding: {frac_bits: 24, coord_clip: 1000.0, l2_clip: null}
    data_dir: .mpc_agg-data/local-3
    fsync: true
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mpc_agg.config.schema import (
    AggregatorAddress,
    AuthSettings,
    Deadlines,
    DPSettings,
    RoundPolicy,
    TlsSettings,
    Topology,
)
from mpc_agg.core.codec import MAX_DIM
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.errors import ConfigError

MAX_AGGREGATORS = 16
_LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "localhost.localdomain", "::1", "ip6-localhost"}

_TOP_KEYS = {
    "name",
    "threshold",
    "aggregators",
    "rounds",
    "encoding",
    "data_dir",
    "fsync",
    "deadlines",
    "tls",
    "auth",
    "dp",
}
_DEADLINE_KEYS = {"step_s", "upload_s", "startup_s"}
_AGG_KEYS = {"host", "mpc_port", "http_port"}
_ROUND_KEYS = {
    "min_clients",
    "max_clients",
    "max_dim",
    "max_concurrent_uploads",
    "upload_buffer_mb",
    "keep_results",
}
_ENC_KEYS = {"frac_bits", "coord_clip", "l2_clip"}
_LATER: dict[str, str] = {}
_DP_KEYS = {"mechanism", "epsilon", "delta", "l2_clip", "max_colluding", "budget"}


def load_topology(path: str | Path) -> Topology:
    """Read, parse and validate the YAML file at ``path``."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read topology: {exc.strerror}", source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("<yaml>", f"not valid YAML{where}: {problem}", source) from None
    return build_topology(data, source=source)


def build_topology(data: Any, source: str = "<dict>") -> Topology:
    """Validate a parsed document; every check runs here, before any socket opens."""

    def fail(path: str, detail: str) -> ConfigError:
        return ConfigError(path, detail, source)

    if not isinstance(data, dict):
        raise fail("<root>", f"a topology is a mapping of keys, got {type(data).__name__}")
    _reject_unknown(data, _TOP_KEYS, "", fail)

    name = _get(data, "name", str, "", fail)
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise fail("name", f"use letters, digits, '.', '_' or '-', got {name!r}")

    aggs_raw = _get(data, "aggregators", list, "", fail)
    if not 2 <= len(aggs_raw) <= MAX_AGGREGATORS:
        raise fail(
            "aggregators",
            f"need 2..{MAX_AGGREGATORS} aggregators, got {len(aggs_raw)}: with one aggregator "
            "there is nobody to split a secret with",
        )
    aggregators = []
    for i, raw in enumerate(aggs_raw):
        p = f"aggregators[{i}]"
        if not isinstance(raw, dict):
            raise fail(p, f"expected a mapping with {sorted(_AGG_KEYS)}, got {raw!r}")
        _reject_unknown(raw, _AGG_KEYS, p + ".", fail)
        host = _get(raw, "host", str, p + ".", fail)
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise fail(p + ".host", f"not a host name or IPv4 address: {host!r}")
        ports = [_port(raw, k, p, fail) for k in ("mpc_port", "http_port")]
        aggregators.append(AggregatorAddress(i, host, ports[0], ports[1]))
    seen: dict[tuple[str, int], str] = {}
    for a in aggregators:
        host = _LOOPBACK if a.host.lower() in _LOOPBACK_NAMES else a.host.lower()
        for key, port in (("mpc_port", a.mpc_port), ("http_port", a.http_port)):
            here = f"aggregators[{a.index}].{key}"
            if (host, port) in seen:
                raise fail(here, f"port {port} on {a.host} is already used by {seen[(host, port)]}")
            seen[(host, port)] = here

    m = len(aggregators)
    threshold = _get(data, "threshold", int, "", fail, default=(m - 1) // 2)
    if threshold < 0 or 2 * threshold >= m:
        hint = (
            " With m = 2 set threshold: 0 (MPyC then runs without secrecy between the two "
            "parties, so only the additive path, a sum of client shares, is private)."
            if m == 2
            else f" The largest allowed threshold for {m} aggregators is {(m - 1) // 2}."
        )
        raise fail(
            "threshold",
            f"{threshold} with {m} aggregators: MPyC's Shamir secret sharing needs an honest "
            f"majority, 2t < m.{hint}",
        )

    rounds_raw = _get(data, "rounds", dict, "", fail, default={})
    _reject_unknown(rounds_raw, _ROUND_KEYS, "rounds.", fail)
    defaults = RoundPolicy()
    min_clients = _get(
        rounds_raw, "min_clients", int, "rounds.", fail, default=defaults.min_clients
    )
    max_clients = _get(
        rounds_raw, "max_clients", int, "rounds.", fail, default=defaults.max_clients
    )
    max_dim = _get(rounds_raw, "max_dim", int, "rounds.", fail, default=defaults.max_dim)
    if min_clients < 2:
        raise fail(
            "rounds.min_clients",
            f"must be >= 2, got {min_clients}: the total of one client is that client's vector",
        )
    if max_clients < min_clients:
        raise fail("rounds.max_clients", f"{max_clients} is below min_clients = {min_clients}")
    if not 1 <= max_dim <= MAX_DIM:
        raise fail("rounds.max_dim", f"must be in 1..{MAX_DIM}, got {max_dim}")
    max_uploads = _get(
        rounds_raw,
        "max_concurrent_uploads",
        int,
        "rounds.",
        fail,
        default=defaults.max_concurrent_uploads,
    )
    if max_uploads < 1:
        raise fail("rounds.max_concurrent_uploads", f"must be >= 1, got {max_uploads}")
    buffer_mb = _get(
        rounds_raw, "upload_buffer_mb", int, "rounds.", fail, default=defaults.upload_buffer_mb
    )
    largest_body = 12 + 8 * max_dim  # a FULL share of max_dim, header included
    if buffer_mb << 20 < largest_body:
        raise fail(
            "rounds.upload_buffer_mb",
            f"{buffer_mb} MiB cannot hold one full share of max_dim = {max_dim} "
            f"({largest_body / 2**20:.1f} MiB); raise it to at least "
            f"{-(-largest_body // 2**20)} or lower max_dim",
        )
    keep_results = _get(
        rounds_raw, "keep_results", int, "rounds.", fail, default=defaults.keep_results
    )
    if keep_results < 1:
        raise fail("rounds.keep_results", f"must be >= 1, got {keep_results}")
    policy = RoundPolicy(min_clients, max_clients, max_dim, max_uploads, buffer_mb, keep_results)

    dp = _dp_settings(data, len(aggregators), threshold, fail)

    enc_raw = _get(data, "encoding", dict, "", fail, default={})
    _reject_unknown(enc_raw, _ENC_KEYS, "encoding.", fail)
    enc_defaults = FixedPointEncoding()
    enc_args = {
        "frac_bits": _get(
            enc_raw, "frac_bits", int, "encoding.", fail, default=enc_defaults.frac_bits
        ),
        "coord_clip": _number(enc_raw, "coord_clip", fail, enc_defaults.coord_clip),
        "l2_clip": _number(enc_raw, "l2_clip", fail, enc_defaults.l2_clip),
    }
    if dp is not None:
        if enc_args["l2_clip"] is not None and enc_args["l2_clip"] != dp.l2_clip:
            raise fail(
                "encoding.l2_clip",
                f"{enc_args['l2_clip']} differs from dp.l2_clip = {dp.l2_clip}; set it once, "
                "under dp (the noise is calibrated to it)",
            )
        enc_args["l2_clip"] = dp.l2_clip
    try:
        encoding = FixedPointEncoding(**enc_args)
        encoding.check_headroom(max_clients)
        if dp is not None:
            _check_dp_round(dp, encoding, policy, len(aggregators))
    except ConfigError as exc:
        raise fail(exc.path, exc.detail) from None

    data_dir = Path(_get(data, "data_dir", str, "", fail, default=f".mpc_agg-data/{name}"))
    fsync = _get(data, "fsync", bool, "", fail, default=True)
    dl_raw = _get(data, "deadlines", dict, "", fail, default={})
    _reject_unknown(dl_raw, _DEADLINE_KEYS, "deadlines.", fail)
    dl_args = {}
    for key in sorted(_DEADLINE_KEYS):
        value = dl_raw.get(key, getattr(Deadlines(), key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
            raise fail(f"deadlines.{key}", f"expected seconds in (0, 86400], got {value!r}")
        dl_args[key] = float(value)
    tls = auth = None
    if "tls" in data:
        tls_raw = _get(data, "tls", dict, "", fail)
        _reject_unknown(tls_raw, {"dir"}, "tls.", fail)
        tls = TlsSettings(Path(_get(tls_raw, "dir", str, "tls.", fail)))
        aggregators = [replace(a, scheme="https") for a in aggregators]
    if "auth" in data:
        auth_raw = _get(data, "auth", dict, "", fail)
        _reject_unknown(auth_raw, {"secrets_dir"}, "auth.", fail)
        auth = AuthSettings(Path(_get(auth_raw, "secrets_dir", str, "auth.", fail)))
    return Topology(
        name=name,
        aggregators=tuple(aggregators),
        threshold=threshold,
        rounds=policy,
        encoding=encoding,
        data_dir=data_dir,
        fsync=fsync,
        deadlines=Deadlines(**dl_args),
        tls=tls,
        auth=auth,
        dp=dp,
        source=source,
    )


def _check_dp_round(
    dp: DPSettings, encoding: FixedPointEncoding, policy: RoundPolicy, m: int
) -> None:
    """Refuse a ``dp`` section under which not even a round of dimension 1 could run (noise
    beyond the exact sampler's range, or beyond the overflow headroom): the noise grows with
    the dimension, so such a topology could reveal nothing. Larger rounds are checked when
    they are opened."""
    from mpc_agg.dp.planning import plan_noise

    plan = plan_noise(dp, encoding, 1, m)
    encoding.check_headroom(policy.max_clients, noise_tail=plan.tail)


def _positive(raw: dict, key: str, path: str, fail: Any, upper: float = math.inf) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, f"expected a number, got {value!r}")
    if not (0 < value < upper and math.isfinite(value)):
        bound = f"in (0, {upper:g})" if math.isfinite(upper) else "positive and finite"
        raise fail(path, f"must be {bound}, got {value!r}")
    return float(value)


def _dp_settings(data: dict, m: int, threshold: int, fail: Any) -> DPSettings | None:
    """The ``dp`` section, or None without one (or with ``mechanism: none``)."""
    if "dp" not in data:
        return None
    raw = _get(data, "dp", dict, "", fail)
    _reject_unknown(raw, _DP_KEYS, "dp.", fail)
    mechanism = _get(raw, "mechanism", str, "dp.", fail)
    if mechanism == "none":
        return None
    if mechanism == "binomial":
        if m < 3:
            raise fail(
                "dp.mechanism",
                f"binomial noise is built inside MPyC from jointly generated secret random "
                f"bits, which needs m >= 3 aggregators: with m = {m}, MPyC's threshold is 0, "
                "so every 'secret' bit would be known to both aggregators; use discrete_gaussian",
            )
        if threshold < 1:
            raise fail(
                "dp.mechanism",
                "binomial noise is generated as secret-shared bits inside MPyC, which needs "
                "threshold >= 1 (with threshold 0 MPyC's shares are the plain values)",
            )
    if mechanism == "skellam":
        raise fail(
            "dp.mechanism",
            "skellam noise was drawn with numpy's floating-point Poisson sampler, which is "
            "not exact for large means (it leaks the parity of the noise); it is no longer "
            "offered: use discrete_gaussian (the same guarantee, drawn exactly)",
        )
    if mechanism not in ("discrete_gaussian", "binomial"):
        raise fail(
            "dp.mechanism", f"expected discrete_gaussian, binomial or none, got {mechanism!r}"
        )
    for key in ("epsilon", "delta", "l2_clip", "budget"):
        if key not in raw:
            raise fail(f"dp.{key}", "missing required key")
    epsilon = _positive(raw, "epsilon", "dp.epsilon", fail)
    delta = _positive(raw, "delta", "dp.delta", fail, upper=1.0)
    l2_clip = _positive(raw, "l2_clip", "dp.l2_clip", fail)
    max_colluding = _get(raw, "max_colluding", int, "dp.", fail, default=threshold)
    if not 0 <= max_colluding <= m - 1:
        raise fail(
            "dp.max_colluding",
            f"must be in 0..{m - 1} (at least one of the {m} aggregators must be honest for "
            f"its noise to protect the total), got {max_colluding}",
        )
    if mechanism == "binomial" and max_colluding > threshold:
        raise fail(
            "dp.max_colluding",
            f"{max_colluding} exceeds threshold = {threshold}: joint noise is secret only "
            f"against up to t = {threshold} colluding aggregators (MPyC's Shamir threshold)",
        )
    budget = _get(raw, "budget", dict, "dp.", fail)
    _reject_unknown(budget, {"epsilon", "delta"}, "dp.budget.", fail)
    for key in ("epsilon", "delta"):
        if key not in budget:
            raise fail(f"dp.budget.{key}", "missing required key")
    budget_epsilon = _positive(budget, "epsilon", "dp.budget.epsilon", fail)
    budget_delta = _positive(budget, "delta", "dp.budget.delta", fail, upper=1.0)
    if budget_epsilon < epsilon or budget_delta < delta:
        raise fail(
            "dp.budget",
            f"the budget (epsilon={budget_epsilon:g}, delta={budget_delta:g}) is smaller than "
            f"one round (epsilon={epsilon:g}, delta={delta:g}): no round could run",
        )
    return DPSettings(
        mechanism, epsilon, delta, l2_clip, max_colluding, budget_epsilon, budget_delta
    )


def _reject_unknown(raw: dict, allowed: set[str], prefix: str, fail: Any) -> None:
    for key in raw:
        if key not in allowed:
            later = _LATER.get(key) if not prefix else None
            why = f" ({later})" if later else f"; allowed keys: {', '.join(sorted(allowed))}"
            raise fail(f"{prefix}{key}", f"unknown key {key!r}{why}")


_MISSING = object()


def _get(raw: dict, key: str, typ: type, prefix: str, fail: Any, default: Any = _MISSING) -> Any:
    if key not in raw or raw[key] is None and default is not _MISSING:
        if default is _MISSING:
            raise fail(f"{prefix}{key}", "missing required key")
        return default
    value = raw[key]
    # bool is an int in Python; refuse it where a number is wanted, and vice versa.
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise fail(
            f"{prefix}{key}", f"expected {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _number(raw: dict, key: str, fail: Any, default: float | None) -> float | None:
    if key not in raw:
        return default
    value = raw[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"encoding.{key}", f"expected a finite number or null, got {value!r}")
    return float(value)


def _port(raw: dict, key: str, prefix: str, fail: Any) -> int:
    port = _get(raw, key, int, prefix + ".", fail)
    if not 1 <= port <= 65535:
        raise fail(f"{prefix}.{key}", f"port must be in 1..65535, got {port}")
    return port
