"""One error hierarchy for mpc_agg.

Two branches, as in h11's local/remote split:

* :class:`LocalError`: the local caller did something wrong (bad configuration, misuse of
  the API, a vector that cannot be encoded). Raised before anything is sent.
* :class:`PeerError`: a remote peer sent something wrong (a malformed upload, a conflicting
  share, a request for an unknown round). Each carries a stable ``code`` that travels in the
  JSON error body; the HTTP status for each class lives in one table,
  :data:`mpc_agg.transport.http_server.HTTP_STATUS`.

Client-side outcomes of remote refusals (:class:`UploadRefused`, :class:`RoundFailed`, ...)
derive from :class:`RemoteRefusal`.

Messages name the parameter and its value; they never contain share, seed or token bytes.
"""

from __future__ import annotations


class MpcAggError(Exception):
    """Base class of every error raised by mpc_agg."""


# --------------------------------------------------------------------------- local errors


class LocalError(MpcAggError):
    """The local caller did something wrong."""


class ConfigError(LocalError, ValueError):
    """A topology is invalid; ``path`` is the YAML path of the offending value."""

    def __init__(self, path: str, detail: str, source: str | None = None) -> None:
        self.path = path
        self.detail = detail
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {detail}")


class StateError(LocalError):
    """An aggregator's durable state is inconsistent (e.g. its privacy ledger lacks a round
    its round index says was revealed with DP): it refuses to start rather than run with a
    budget that forgot spending."""


class StartupError(LocalError):
    """A party cannot start: an address it must listen on cannot be bound (in use, or not
    an address of this machine); the message names the address."""


class EncodingError(LocalError, ValueError):
    """A vector cannot be encoded (wrong shape, NaN/inf, ...)."""


class VectorChanged(EncodingError):
    """The vector changed while its full share was being made for sending (code
    ``vector_changed``): nothing of the changed block was made, so nothing more was sent,
    and the seed shares are not sent either. Final, never retried; submit a copy of the
    vector (``x.copy()``) that nothing else writes to."""

    code = "vector_changed"

    def __init__(self, start: int) -> None:
        self.start = start
        super().__init__(
            f"the vector changed while it was being submitted (in the block from coordinate "
            f"{start}); nothing more was sent; submit a copy of it"
        )


class UsageError(LocalError):
    """The API was used in a way it does not support."""


# --------------------------------------------------------------------------- peer errors


class PeerError(MpcAggError):
    """A remote peer (client, collector or aggregator) sent something wrong.

    ``code`` is the stable machine-readable name sent in the JSON error body.
    """

    code = "bad_request"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)

    def body(self) -> dict[str, str]:
        """The JSON error body: ``{"error": code, "detail": text}`` (subclasses may add)."""
        return {"error": self.code, "detail": self.detail}


class MalformedUpload(PeerError):
    """An upload body does not decode: bad header, wrong length, value >= p."""

    code = "malformed"


class DimensionMismatch(MalformedUpload):
    """An upload's dimension differs from the round's."""

    code = "wrong_dimension"


class RingMismatch(MalformedUpload):
    """An upload (or a result) is in another ring than the topology's ``encoding.ring``."""

    code = "wrong_ring"


class PayloadTooLarge(PeerError):
    """A request body exceeds the configured limit."""

    code = "too_large"


class LengthRequired(PeerError):
    """An upload did not announce its length (``Content-Length``), so its memory cannot be
    reserved before it is read (HTTP 411)."""

    code = "length_required"


class RequestTimeout(PeerError):
    """A request body did not arrive in time."""

    code = "timeout"


class Unauthenticated(PeerError):
    """A request carries no token, or a malformed ``Authorization`` header (HTTP 401)."""

    code = "unauthenticated"


class Forbidden(PeerError):
    """A request's token is not the right one for this client or collector (HTTP 403)."""

    code = "forbidden"


class Busy(PeerError):
    """Too many uploads are in flight at this aggregator, or at it from this client, or its
    upload buffer is full; retry later (HTTP 503). The answer carries ``Retry-After``:
    ``retry_after_s`` seconds (a whole number, at least 1)."""

    code = "busy"
    retry_after_s = 1

    def __init__(self, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        if retry_after_s is not None:
            self.retry_after_s = max(1, int(retry_after_s))


class UploadInProgress(Busy):
    """The same client's upload to the same round is still being processed (HTTP 503);
    a retry a moment later is answered as identical or conflicting."""

    code = "upload_in_progress"


class ClientDisconnected(PeerError):
    """The client closed its connection before its request body arrived whole (a 400-class
    event: nobody reads the answer; logged at INFO, never as an internal error)."""

    code = "client_disconnected"


class BadHttpRequest(PeerError):
    """The request is not valid HTTP/1.1 (refused by the HTTP parser before any handler
    runs: bad request line, invalid header, bad chunked encoding, ...) (HTTP 400)."""

    code = "bad_http_request"


class RequestLineTooLong(BadHttpRequest):
    """The request line (method, path, version) is longer than the server reads (HTTP 414)."""

    code = "request_line_too_long"


class HeadersTooLarge(BadHttpRequest):
    """A request header is longer than the server reads, or there are too many (HTTP 431)."""

    code = "headers_too_large"


class InvalidRequest(PeerError):
    """A request's parameters (ids, JSON fields) are invalid."""

    code = "invalid_request"


class UnknownRound(PeerError):
    """No round with this id exists at this aggregator."""

    code = "unknown_round"


class RoundConflict(PeerError):
    """A round with this id exists with different parameters."""

    code = "round_conflict"


class RoundIdUsed(RoundConflict):
    """The round id was used before at this aggregator (round ids are single-use, also
    across restarts): open the round under a new id."""

    code = "round_id_used"


class StorageFailure(PeerError):
    """The aggregator could not make a record durable (disk full, I/O error); nothing was
    changed. Retry later."""

    code = "storage_failure"


class ConflictingShare(PeerError):
    """A different share was already accepted for the same (round, client)."""

    code = "conflicting_share"


class RoundNotOpen(PeerError):
    """The round is closing or aggregating and accepts no more uploads."""

    code = "round_not_open"


class RoundEnded(RoundNotOpen):
    """The round is DONE or FAILED."""

    code = "round_ended"


class ResultNotReady(PeerError):
    """The round has no result yet."""

    code = "result_not_ready"


class RoundFull(PeerError):
    """The round already holds ``max_clients`` clients (the overflow bound)."""

    code = "round_full"


class ResultExpired(PeerError):
    """The round's total was dropped to bound memory (``rounds.keep_results``) (HTTP 410)."""

    code = "result_expired"


class RoundAborted(PeerError):
    """The round FAILED, so it has no result; the detail says why, ``failure`` (one of
    :data:`FAILURE_CODES`) what kind of failure, also in the JSON body."""

    code = "round_failed"

    def __init__(self, detail: str, failure: str = "aggregation_error") -> None:
        super().__init__(detail)
        self.failure = failure

    def body(self) -> dict[str, str]:
        return {**super().body(), "failure": self.failure}


class NotLeader(PeerError):
    """A leader-only request reached a follower aggregator."""

    code = "not_leader"


class TopologyMismatch(PeerError):
    """The request was made under another topology than the aggregator's (its fingerprint,
    sent in the ``X-Mpc-Agg-Topology`` header, differs): nothing was done."""

    code = "topology_mismatch"


class PartyNetworkDown(PeerError):
    """A close was requested while links between aggregators are down."""

    code = "party_network_down"


class TooManyRounds(PeerError):
    """This aggregator already holds ``rounds.max_open`` live rounds: a new one is refused
    until one of them ends (closed, aborted with ``DELETE /v1/rounds/{round}``, or past
    its deadline ``rounds.max_open_s``). HTTP 429: final, not retried blindly."""

    code = "too_many_rounds"


class IllegalTransition(MpcAggError):
    """A round state machine received an event that is illegal in its state.

    The round is left unchanged.
    """


class PartyLinkLost(MpcAggError):
    """The link to another aggregator is down; no MPC step can run until it is back."""


class BudgetExceeded(MpcAggError):
    """A round would exceed the configured privacy budget; it is refused before any noise
    is added or anything revealed."""


FAILURE_CODES: dict[str, str] = {
    "unknown_round": "an aggregator does not hold the round open",
    "round_mismatch": "an aggregator answered for another round",
    "dimension_mismatch": "the aggregators hold the round with different dimensions",
    "too_few_clients": "fewer than min_clients clients reached every aggregator",
    "budget_exceeded": "the round would exceed an aggregator's privacy budget",
    "ledger_error": "an aggregator's privacy ledger could not check the round",
    "no_noise_plan": "an aggregator has no noise plan for a round with DP",
    "plan_mismatch": "the aggregators disagree on the round's noise",
    "storage_failure": "an aggregator could not make a step of the round durable",
    "aborted": "an aggregator could not compute its share of the total",
    "bad_share": "an aggregator sent a malformed share of the total",
    "party_lost": "a party link was lost or a step missed its deadline",
    "ended_elsewhere": "the round had ended at another aggregator",
    "protocol_violation": "an aggregator sent a malformed party message",
    "aggregation_error": "an unexpected error at an aggregator (see its log)",
    "expired": "the round was not closed within rounds.max_open_s of its opening",
    "cancelled": "the collector aborted the round (DELETE /v1/rounds/{round})",
}
"""Every code a failed round can carry (``Round.failure_code``, the 410 body's ``failure``,
:attr:`RoundFailed.code`), with its meaning. Match codes, never messages."""


class AgreementFailed(MpcAggError):
    """The aggregators could not agree on what to reveal; nothing is revealed. ``code`` is
    one of :data:`FAILURE_CODES`."""

    def __init__(self, detail: str, *, code: str = "aggregation_error") -> None:
        if code not in FAILURE_CODES:
            raise ValueError(f"unknown failure code {code!r}")
        self.code = code
        super().__init__(detail)


class ProtocolViolation(AgreementFailed):
    """A party message does not have the exact shape of :mod:`mpc_agg.core.protocol`."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="protocol_violation")


# --------------------------------------------------------------------------- remote outcomes


class RemoteRefusal(MpcAggError):
    """An aggregator answered a request with an error.

    ``aggregator`` is its index, ``status`` the HTTP status, ``code`` and ``detail`` the
    JSON error body.
    """

    def __init__(
        self, aggregator: int, status: int, code: str, detail: str, *, failure: str | None = None
    ) -> None:
        self.aggregator = aggregator
        self.status = status
        self.code = code
        self.detail = detail
        self.failure = failure
        """For ``round_failed``: the round's failure code (:data:`FAILURE_CODES`)."""
        super().__init__(f"aggregator {aggregator} refused ({status} {code}): {detail}")


class TopologyMismatchError(RemoteRefusal):
    """An aggregator runs another topology than the caller's (409 ``topology_mismatch``):
    nothing was uploaded or collected; load the same topology file as the aggregators."""

    def __init__(self, aggregator: int, detail: str) -> None:
        super().__init__(aggregator, 409, "topology_mismatch", detail)


class UploadRefused(RemoteRefusal):
    """An upload was refused by at least one aggregator.

    ``accepted`` lists the aggregators that did accept (a partial upload is dropped
    everywhere at aggregation time, so it never skews the total).
    """

    def __init__(
        self, aggregator: int, status: int, code: str, detail: str, accepted: tuple[int, ...] = ()
    ) -> None:
        super().__init__(aggregator, status, code, detail)
        self.accepted = accepted


class RoundFailed(MpcAggError):
    """A round ended FAILED; ``reason`` says why and ``code`` (one of
    :data:`FAILURE_CODES`, or ``unknown`` from an older aggregator) what kind of failure it
    was. Nothing was revealed."""

    def __init__(self, round_id: str, reason: str, code: str = "unknown") -> None:
        self.round_id = round_id
        self.reason = reason
        self.code = code
        super().__init__(f"round {round_id!r} failed: {reason}")


class AggregatorUnavailable(MpcAggError):
    """An aggregator could not be reached after the configured retries."""

    def __init__(self, aggregator: int, url: str, cause: str) -> None:
        self.aggregator = aggregator
        self.url = url
        super().__init__(f"aggregator {aggregator} at {url} is unreachable: {cause}")


class AggregationTimeout(MpcAggError, TimeoutError):
    """A round did not reach DONE or FAILED within the caller's timeout."""


class LayoutError(EncodingError):
    """Model parameters cannot be flattened into one vector (non-numeric dtype, nested
    container, integer beyond 2**53), or a vector does not fit a model layout (length,
    names, shapes or dtypes differ)."""
