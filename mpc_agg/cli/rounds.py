"""``mpc-agg open``, ``submit``, ``collect``, ``status``, ``rounds`` and ``abort``: rounds.

README, "Command line". The collector opens a round on every aggregator (``open``), each
client uploads one vector file (``submit``), the collector waits for enough clients, closes
the round and writes the verified total and the signed result (``collect``; ``mpc-agg
verify`` re-checks that file later). ``status``, ``rounds`` and ``abort`` look at and cancel
rounds. Each command takes the topology (``-t``) and the caller's token grants
(``--tokens``: the collector's for every command but ``submit``, which takes a client's).

A client's seeds and rounding coins derive from its secret file (``--secret``, made on
first use), so running the same ``submit`` again after a crash sends the same bytes and the
aggregators answer "already held" instead of "conflicting share".
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpc_agg.cli import common, vectors
from mpc_agg.errors import (
    AggregationTimeout,
    InvalidRequest,
    RoundFailed,
    UploadRefused,
    UsageError,
)

if TYPE_CHECKING:
    from mpc_agg.collector import AggregateResult, Collector
    from mpc_agg.config.schema import Topology

SECRET_SUFFIX = ".secret"
POLL_S = 1.0
"""Seconds between status polls while ``collect --wait-clients`` waits."""

_ROUND_HELP = (
    "the round id: 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit; "
    "ids are single-use at every aggregator"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``open``, ``submit``, ``collect``, ``status``, ``rounds`` and ``abort``."""
    p = common.parser_for(
        sub,
        "open",
        "open a round on every aggregator (collector)",
        "Open round R for vectors of length D on every aggregator of the topology. "
        "Idempotent: opening an open round again with the same parameters succeeds. The "
        "round fails (nothing revealed) if it is not collected within the topology's "
        "rounds.max_open_s of its opening; the deadline is printed.",
        _open,
    )
    _collector_options(p)
    p.add_argument("--dim", required=True, type=int, metavar="D", help="vector length, >= 1")
    p.add_argument(
        "--min-clients",
        type=int,
        metavar="N",
        default=None,
        help="fewest complete uploads the round may reveal; with fewer it fails, nothing "
        "revealed (default: the topology's rounds.min_clients)",
    )
    p.add_argument(
        "--wait-ready",
        type=float,
        metavar="S",
        default=0.0,
        help="keep trying for up to S seconds while an aggregator is unreachable or its "
        "party links are not up yet, e.g. just after starting the parties (default 0)",
    )

    p = common.parser_for(
        sub,
        "submit",
        "encode, secret-share and upload one vector (client)",
        "Read VECTOR, clip and encode it (the topology's encoding), split it into one share "
        "per aggregator and upload them all. VECTOR is a .npy file (1-D), a .csv file (one "
        "row or one column of numbers), a text file (numbers separated by whitespace, commas "
        "or newlines; # starts a comment) or - for standard input (.npy or text). Seeds and "
        "rounding coins derive from the client's secret file, so running the same command "
        "again (say after a crash) is answered 'already held (retry)'; a different vector "
        "for the same client and round is refused (exit 4, conflicting_share).",
        _submit,
    )
    common.add_topology(p)
    common.add_grants(p, "client")
    p.add_argument("--round", "-r", required=True, type=_round_id, metavar="R", help=_ROUND_HELP)
    p.add_argument(
        "--client",
        metavar="ID",
        default=None,
        help="the client id (default: the client the --tokens grants were issued to; "
        "required without grants)",
    )
    p.add_argument(
        "--secret",
        metavar="FILE",
        default=None,
        help="the client's secret (hex, mode 0600; created if missing). Keep it private and "
        "keep it: it makes resubmission after a crash identical. Default: <directory of the "
        f"first grant file>/<client>{SECRET_SUFFIX}, or ./<client>{SECRET_SUFFIX} without "
        "grants",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds each HTTP request may take (default 60); busy answers are retried for "
        "the topology's deadlines.upload_s",
    )
    p.add_argument(
        "vector",
        metavar="VECTOR",
        help="vector file (.npy, .csv, text) or - (standard input)",
    )

    p = common.parser_for(
        sub,
        "collect",
        "wait for clients, close the round, write the verified total (collector)",
        "Optionally wait until N clients have uploaded (polling every aggregator every "
        f"{POLL_S:g} s), then close round R at the leader, wait for the reveal, check every "
        "aggregator's signed statement of the total, and write the total (--output) and "
        "the signed result (--result, which `mpc-agg verify -t T RESULT` re-checks). Output "
        "paths are checked before the round is closed. A .npy --output is written as the "
        "total streams in, memory-mapped (flat memory for any d), and appears only once "
        "every statement verified; nothing is left on any failure. A round that fails "
        "(e.g. fewer than min_clients complete uploads) reveals nothing: exit 1 with its "
        "failure code. "
        "Collecting a round already revealed fetches its result again while the aggregators "
        "keep it (rounds.keep_results).",
        _collect,
    )
    _collector_options(p)
    p.add_argument(
        "--wait-clients",
        type=int,
        metavar="N",
        default=None,
        help="first wait until N clients have uploaded to every aggregator (default: do not "
        "wait: aggregate the uploads there are)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        metavar="S",
        default=600.0,
        help="seconds to wait for --wait-clients (default 600); then exit 5, the round left open",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=120.0,
        help="seconds from the close to the verified result (default 120); then exit 5",
    )
    p.add_argument(
        "--output",
        "--out",
        "-o",
        metavar="FILE",
        default=None,
        help="write the total here: .npy (numpy; streamed into a memory-mapped file that "
        "appears only once verified, so any d fits in flat memory), .csv (one value per "
        "line) or - (standard output, one value per line; the report then goes to "
        "standard error)",
    )
    p.add_argument(
        "--result",
        metavar="FILE.npz",
        default=None,
        help="save the exact total with every aggregator's signed statement (.npz) for "
        "`mpc-agg verify`; with a .npy --output it is copied from disk a block at a time",
    )
    p.add_argument("--force", action="store_true", help="replace existing output files")

    p = common.parser_for(
        sub,
        "status",
        "show one round at every aggregator (collector)",
        "Ask every aggregator for round R: its state, the uploads it accepted, the "
        "dimension, min_clients, failure code and deadline, one line per aggregator.",
        _status,
    )
    _collector_options(p)
    p.add_argument("--json", action="store_true", help="print the aggregators' answers as JSON")

    p = common.parser_for(
        sub,
        "rounds",
        "list the rounds the aggregators know, live and recent (collector)",
        "List every live round (open, closing or aggregating) and the most recent ended ones, "
        "with each aggregator's state and accepted count, the dimension, the opening time "
        "and the deadline (local time).",
        _rounds,
    )
    common.add_topology(p)
    common.add_grants(p, "collector")
    p.add_argument("--json", action="store_true", help="print the aggregators' answers as JSON")

    p = common.parser_for(
        sub,
        "abort",
        "cancel an open round at every aggregator (collector)",
        "Abort round R: every aggregator fails it (failure code cancelled), nothing is "
        "revealed, the uploads are deleted and the id stays used. Idempotent; a round whose "
        "aggregation has started cannot be aborted (exit 4, round_not_open).",
        _abort,
    )
    _collector_options(p)
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=60.0,
        help="seconds to wait for the round to end everywhere (default 60); then exit 5",
    )


def _collector_options(p: argparse.ArgumentParser) -> None:
    common.add_topology(p)
    common.add_grants(p, "collector")
    p.add_argument("--round", "-r", required=True, type=_round_id, metavar="R", help=_ROUND_HELP)


def _round_id(text: str) -> str:
    """argparse type of ``--round``: a valid round id (else usage error, exit 2)."""
    from mpc_agg.core import codec

    try:
        return codec.check_id("round", text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _collector(args: argparse.Namespace) -> Collector:
    """The collector of ``--topology`` with the tokens of its ``--tokens`` grants."""
    from mpc_agg.collector import Collector

    topology = common.load_topology(args)
    tokens, _ = common.grant_tokens(topology, args.tokens, "collector")
    return Collector(topology, tokens)


# -- open -------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> int:
    collector = _collector(args)
    topology = collector.topology
    if not 1 <= args.dim <= topology.rounds.max_dim:
        raise UsageError(
            f"--dim {args.dim}: must be in 1..{topology.rounds.max_dim} (rounds.max_dim of "
            f"topology {topology.name})"
        )
    if args.min_clients is not None and args.min_clients < 1:
        raise UsageError(f"--min-clients {args.min_clients}: must be >= 1")
    _open_when_ready(collector, args)
    leader = collector.status(args.round)[0]
    print(
        f"round {args.round}: open at all {topology.m} aggregators of {topology.name}; "
        f"d = {leader.get('dim')}, min clients {leader.get('min_clients')}, "
        f"{leader.get('accepted')} uploads so far"
    )
    deadline = leader.get("deadline")
    if isinstance(deadline, (int, float)):
        print(
            f"deadline {_clock(deadline)} ({_until(deadline)}): not collected by then, it fails "
            "with nothing revealed"
        )
    return common.EXIT_OK


def _open_when_ready(collector: Collector, args: argparse.Namespace) -> None:
    """Open the round; with ``--wait-ready S``, keep trying for S seconds while an
    aggregator is unreachable or its party links are down (opening again is idempotent)."""
    from mpc_agg.errors import AggregatorUnavailable, RemoteRefusal

    give_up = time.monotonic() + max(args.wait_ready, 0.0)
    waiting = None
    while True:
        try:
            collector.open_round(args.round, args.dim, min_clients=args.min_clients)
        except (AggregatorUnavailable, RemoteRefusal) as exc:
            down = isinstance(exc, AggregatorUnavailable) or exc.code == "party_network_down"
            if not down or time.monotonic() >= give_up:
                raise
            if waiting is None:
                waiting = common.Progress("waiting for the aggregators", stream=sys.stderr)
            waiting.update(time.monotonic() - waiting.started, f"({exc})")
            time.sleep(POLL_S)
            continue
        if waiting is not None:
            waiting.done(time.monotonic() - waiting.started, "all aggregators answered")
        return


# -- submit -----------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    from mpc_agg.client import Client, load_client_secret
    from mpc_agg.transport.http_client import run_sync

    topology = common.load_topology(args)
    if args.client is not None:
        _client_id(args.client)
    tokens, client_id = common.grant_tokens(topology, args.tokens, "client", args.client)
    if client_id is None:
        raise UsageError("name the client with --client ID (there are no grants to take it from)")
    source = vectors.describe(args.vector)
    step = common.Progress("reading", stream=sys.stderr)
    vector = vectors.read_vector(args.vector)
    d = int(vector.shape[0])
    step.done(d, f"values from {source}")
    if d > topology.rounds.max_dim:
        raise UsageError(
            f"{source} holds {d} values, more than rounds.max_dim {topology.rounds.max_dim} "
            f"of topology {topology.name}"
        )
    _note_clipping(topology, vector)
    secret_path = _secret_path(args, client_id)
    created = not secret_path.exists()
    secret = load_client_secret(secret_path, create=True)
    if created:
        print(
            f"note: made a new client secret {str(secret_path)!r} (mode 0600): keep it, "
            "private, to resubmit identically after a crash",
            file=sys.stderr,
        )

    client = Client(topology, client_id, tokens, timeout_s=args.timeout, secret=secret)
    step = common.Progress("encoding+sharing", stream=sys.stderr)
    bodies = client.prepare(args.round, vector)
    step.done(d, f"values into {topology.m} shares")
    total_bytes = sum(len(b) for b in bodies)
    step = common.Progress("uploading", total=total_bytes, unit=" bytes", stream=sys.stderr)
    step.update(0, f"to {topology.m} aggregators")
    started = time.monotonic()
    try:
        receipt = run_sync(client.upload(args.round, bodies), "submit")
    except UploadRefused as exc:
        return _refused_upload(exc, args.round, client_id)
    elapsed = time.monotonic() - started
    step.done(receipt.upload_bytes, f"to {topology.m} aggregators")
    if len(receipt.retries) == topology.m:
        outcome = "already held (retry): every aggregator had these exact shares"
    elif receipt.retries:
        held = ", ".join(map(str, receipt.retries))
        outcome = f"accepted; already held (retry) at aggregator(s) {held}"
    else:
        outcome = "accepted"
    print(
        f"round {args.round}: client {client_id}, d = {d}: {outcome}; {topology.m} "
        f"aggregators, {receipt.upload_bytes} bytes in {elapsed:.2f} s, "
        f"retries {len(receipt.retries)}"
    )
    return common.EXIT_OK


def _client_id(text: str) -> str:
    from mpc_agg.core import codec

    try:
        return codec.check_id("client", text)
    except InvalidRequest as exc:
        raise UsageError(f"--client: {exc.detail}") from None


def _secret_path(args: argparse.Namespace, client_id: str) -> Path:
    """``--secret``, or ``<client>.secret`` next to the first grant (the current directory
    without grants)."""
    if args.secret is not None:
        return Path(args.secret)
    if not args.tokens:
        return Path(client_id + SECRET_SUFFIX)
    first = Path(args.tokens[0])
    return (first if first.is_dir() else first.parent) / (client_id + SECRET_SUFFIX)


def _note_clipping(topology: Topology, vector: Any) -> None:
    """Tell the user when the encoding will change the vector: scaled down to the L2 clip,
    or coordinates clipped (both silent in the encoding)."""
    import numpy as np

    enc = topology.encoding
    if enc.l2_clip is not None:
        norm = float(np.linalg.norm(vector))
        if norm > enc.l2_clip:
            print(
                f"note: L2 norm {norm:.6g} > encoding.l2_clip {enc.l2_clip:g}: the vector is "
                "scaled down to that norm",
                file=sys.stderr,
            )
            vector = vector * (enc.l2_clip / norm)
    bound = enc.max_abs_coordinate
    over = int(np.count_nonzero(np.abs(vector) > bound))
    if over:
        print(
            f"note: {over} value(s) beyond +-{bound:g} (the encoding's clip) are clipped to it",
            file=sys.stderr,
        )


def _refused_upload(exc: UploadRefused, round_id: str, client_id: str) -> int:
    hints = {
        "conflicting_share": f"client {client_id} already submitted a different vector to "
        f"round {round_id} (or with another secret file); a round takes one vector per client",
        "wrong_dimension": "the vector's length differs from the round's dimension "
        "(`mpc-agg status` shows it)",
        "unknown_round": "the round is not open there (`mpc-agg open` first)",
    }
    print(f"error: {exc}", file=sys.stderr)
    if exc.code in hints:
        print(f"  {hints[exc.code]}", file=sys.stderr)
    if exc.accepted:
        print(
            f"  aggregator(s) {', '.join(map(str, exc.accepted))} accepted their share; a "
            "partial upload is left out of the total",
            file=sys.stderr,
        )
    return common.exit_code(exc)


# -- collect ----------------------------------------------------------------------------


def _collect(args: argparse.Namespace) -> int:
    import numpy as np

    vectors.check_output(args.output, "--output", vectors.TOTAL_SUFFIXES, args.force)
    vectors.check_output(args.result, "--result", (".npz",), args.force)
    if args.wait_clients is not None and args.wait_clients < 1:
        raise UsageError(f"--wait-clients {args.wait_clients}: must be >= 1")
    collector = _collector(args)
    report = sys.stderr if args.output == vectors.STDIN else sys.stdout
    if args.wait_clients is not None:
        _wait_for_clients(collector, args.round, args.wait_clients, args.wait_timeout)
    started = time.monotonic()
    streamed = vectors.is_npy_output(args.output)
    try:
        result = collector.aggregate(
            args.round, timeout=args.timeout, out=args.output if streamed else None
        )
    except RoundFailed as exc:
        print(
            f"error: round {exc.round_id} failed ({exc.code}): {exc.reason}; nothing was revealed",
            file=sys.stderr,
        )
        return common.EXIT_FAILED
    elapsed = time.monotonic() - started
    if args.output is not None and not streamed:  # a .npy was written by the collector
        vectors.write_vector(args.output, result.total)
    if args.result is not None:
        result.save(args.result)
    _report(collector.topology, result, elapsed, args, report)
    if args.output is None and args.result is None:
        preview = np.array2string(result.total[:5], precision=6)
        more = " ..." if result.total.shape[0] > 5 else ""
        print(f"total[:5] {preview}{more} (no --output: not written)", file=report)
    return common.EXIT_OK


def _wait_for_clients(collector: Collector, round_id: str, want: int, timeout_s: float) -> None:
    """Poll every aggregator until ``want`` clients have uploaded to all of them (the least
    accepted count, an upper bound on complete uploads), the round has left ``open``
    somewhere, or ``timeout_s`` has passed (AggregationTimeout, the round left open)."""
    progress = common.Progress("clients", total=want, stream=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while True:
        answers = collector.status(round_id)
        have = min(int(a.get("accepted", 0)) for a in answers)
        states = {str(a.get("state")) for a in answers}
        if have >= want or states != {"open"}:
            progress.done(have, f"uploaded ({', '.join(sorted(states))})")
            return
        progress.update(have, "uploaded")
        if time.monotonic() + POLL_S > deadline:
            progress.done(have, "uploaded")
            raise AggregationTimeout(
                f"only {have} of {want} clients uploaded to round {round_id} within "
                f"{timeout_s:g} s; the round stays open: collect again later, or without "
                "--wait-clients to aggregate the uploads there are"
            )
        time.sleep(POLL_S)


def _report(
    topology: Topology, result: AggregateResult, elapsed: float, args: argparse.Namespace, out: Any
) -> None:
    d = int(result.total.shape[0])
    vouched = (
        f"verified: all {topology.m} aggregators signed it"
        if result.statements
        else "unverified: the topology names no signing keys"
    )
    print(f"round {result.round_id}: revealed, d = {d} ({vouched})", file=out)
    print(f"  clients counted     : {result.num_clients}", file=out)
    print(f"  dropped (partial)   : {result.dropped_clients}", file=out)
    if result.epsilon is not None:
        print(
            f"  privacy             : epsilon = {_num(result.epsilon)}, delta = "
            f"{_num(result.delta)} this round; noise std {_num(result.noise_stddev)} per "
            "coordinate (output units)",
            file=out,
        )
        if result.cumulative_epsilon is not None:
            budget = topology.dp.budget_epsilon if topology.dp is not None else None
            print(
                f"  budget spent        : epsilon = {_num(result.cumulative_epsilon)} of "
                f"{_num(budget)} at delta = {_num(result.cumulative_delta)} (all rounds so "
                "far, the leader's ledger)",
                file=out,
            )
    else:
        frac = topology.encoding.frac_bits
        print(
            f"  resolution          : 2^-{frac} = {2.0**-frac:.1e} per client (no DP noise)",
            file=out,
        )
    leader = ", ".join(f"{k} {v:.3f} s" for k, v in sorted(result.timings.items()))
    print(f"  time                : {elapsed:.3f} s close to result (leader: {leader})", file=out)
    if args.output is not None:
        where = "standard output" if args.output == vectors.STDIN else args.output
        print(f"  total               : {where}", file=out)
    if args.result is not None:
        print(f"  signed result       : {args.result} (mpc-agg verify -t TOPOLOGY FILE)", file=out)


# -- status, rounds, abort --------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    collector = _collector(args)
    answers = collector.status(args.round)
    if args.json:
        print(json.dumps(answers, indent=2, sort_keys=True))
        return common.EXIT_OK
    rows = [
        [
            str(a.get("aggregator", i)),
            str(a.get("state")),
            str(a.get("accepted")),
            str(a.get("dim")),
            str(a.get("min_clients", "")),
            str(a.get("failure_code") or "-"),
            _clock(a.get("deadline")),
        ]
        for i, a in enumerate(answers)
    ]
    print(f"round {args.round} at {collector.topology.m} aggregators of {collector.topology.name}")
    _table(["agg", "state", "accepted", "dim", "min", "failure", "deadline"], rows)
    failures = {a.get("failure") for a in answers if a.get("failure")}
    for failure in sorted(str(f) for f in failures):
        print(f"failure: {failure}")
    return common.EXIT_OK


def _rounds(args: argparse.Namespace) -> int:
    answers = _collector(args).rounds()
    if args.json:
        print(json.dumps(answers, indent=2, sort_keys=True))
        return common.EXIT_OK
    by_round: dict[str, list[dict[str, Any] | None]] = {}
    for i, answer in enumerate(answers):
        for r in answer.get("rounds", []):
            by_round.setdefault(str(r["round"]), [None] * len(answers))[i] = r
    for answer in answers:
        hidden = answer.get("ended_not_listed", 0)
        print(
            f"aggregator {answer.get('aggregator')}: {answer.get('live')} live of max_open "
            f"{answer.get('max_open')}"
            + (f"; {hidden} older ended rounds not listed" if hidden else "")
        )
    if not by_round:
        print("no rounds")
        return common.EXIT_OK
    rows = []
    for round_id, views in by_round.items():
        seen = [v for v in views if v is not None]
        first = seen[0]
        rows.append(
            [
                round_id,
                _per_aggregator(views, "state"),
                _per_aggregator(views, "accepted"),
                str(first.get("dim")),
                _per_aggregator(views, "failure_code"),
                _clock(first.get("opened")),
                _clock(first.get("deadline")),
            ]
        )
    _table(["round", "state", "accepted", "dim", "failure", "opened", "deadline"], rows)
    return common.EXIT_OK


def _per_aggregator(views: list[dict[str, Any] | None], key: str) -> str:
    """One value if every aggregator agrees, else each aggregator's (``?``: not listed)."""
    values = [
        "?" if v is None else str(v.get(key) if v.get(key) is not None else "-") for v in views
    ]
    return values[0] if len(set(values)) == 1 else "/".join(values)


def _abort(args: argparse.Namespace) -> int:
    collector = _collector(args)
    status = collector.abort(args.round, timeout=args.timeout)
    state, code = status.get("state"), status.get("failure_code")
    if state == "failed":
        why = "aborted" if code == "cancelled" else f"had already failed ({code})"
        print(f"round {args.round}: {why} at every aggregator; nothing revealed")
    else:
        print(f"round {args.round}: {state}; it had ended before the abort (nothing changed)")
    return common.EXIT_OK


# -- formatting -------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _clock(unix: object) -> str:
    """Unix seconds as local time, ``YYYY-mm-dd HH:MM:SS``; ``-`` when absent."""
    if not isinstance(unix, (int, float)) or isinstance(unix, bool):
        return "-"
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.6g}"


def _until(unix: float) -> str:
    left = unix - time.time()
    if left <= 0:
        return "passed"
    hours, rest = divmod(int(left), 3600)
    return f"in {hours} h {rest // 60:02d} min" if hours else f"in {rest // 60} min {rest % 60} s"
