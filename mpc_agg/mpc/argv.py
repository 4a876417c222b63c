"""Translate a topology into MPyC's own command-line options (MPyC reads ``sys.argv``)."""

from __future__ import annotations

from mpc_agg.config.schema import Topology


def mpyc_argv(topology: Topology, index: int, *, log_level: str = "warning") -> list[str]:
    """MPyC options for aggregator ``index``: ``-P host:port`` per party, ``-I``, ``-T``.

    An IPv6 host goes in without brackets (``-P ::1:11365``): MPyC 0.11 splits ``-P`` at
    its last colon and keeps the host as it is, and :class:`~mpc_agg.mpc.runtime.
    MpycNetwork` dials that host itself. ``log_level`` is MPyC's ``--log-level`` (debug,
    info, warning, ...).
    """
    if not 0 <= index < topology.m:
        raise ValueError(f"index must be in 0..{topology.m - 1}, got {index}")
    argv: list[str] = []
    for a in topology.aggregators:
        argv += ["-P", f"{a.host}:{a.mpc_port}"]
    argv += ["-I", str(index), "-T", str(topology.threshold), "--log-level", log_level]
    return argv  # no --ssl: MpycNetwork opens the links itself, with pinned certificates
