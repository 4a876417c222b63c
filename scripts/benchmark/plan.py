"""What the benchmark runs: sections, dimensions and client counts, and which grid cells fit.

README, "Cost model and performance". Pure: cell estimates from the cells already run, and
memory and disk budgets, so that a cell that cannot finish or fit is skipped with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .report import MB, fmt_bytes, fmt_dim

ROOT = Path(__file__).resolve().parents[2]
"""The checkout the benchmark runs from."""


SECTIONS = (
    "client",
    "ingest",
    "reveal",
    "uploads",
    "sequential",
    "grid",
    "rss",
    "flower",
    "large",
    "cost1e9",
)

DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "large")
"""What runs without ``--only``: ``large`` needs about 10 GB of memory and 5 GB of disk."""

LARGE_SECTIONS = ("large", "cost1e9")
"""Sections that take dimensions above :data:`FULL_DIMS` (up to :data:`MAX_LARGE_DIM`):
the others run only at the given dimensions up to max(FULL_DIMS)."""

MAX_LARGE_DIM = 10**9

FULL_DIMS = (10**4, 10**5, 10**6, 10**7)

FULL_CLIENTS = (10, 100, 1000)

QUICK_DIMS = (10**4, 10**5)

QUICK_CLIENTS = (10,)

MUST_RUN = ((10, 10**7), (1000, 10**5))
"""Grid cells that must complete on this machine (README, "Cost model and performance"):
never skipped for time."""

SEQUENTIAL_CELL = (20, 10**6)
"""Clients x d of the sequential section, unless ``--clients``/``--dims`` say otherwise."""

RSS_CELL = (100, 10**6)
"""Clients x d of the rss section, unless ``--clients``/``--dims`` say otherwise."""

LARGE_CELL = (3, 10**8)
"""Clients x d of the large section, unless ``--clients``/``--dims`` say otherwise."""

QUICK_CELLS = {"sequential": (5, 10**5), "rss": (10, 10**5), "large": (3, 10**5)}
"""The same with ``--quick``."""

SECTION_REPEATS = {"uploads": 3, "sequential": 3, "grid": 1}
"""Interleaved repeats of each section, unless ``--repeats`` says otherwise."""

FLOWER_CLIENTS = (10, 100)

FLOWER_DIMS = (10**4, 10**5, 10**6)

REVEAL_CLIENTS = 2

INGEST_CASES = ((True, 1), (False, 1), (True, 4))
"""(fsync, uploads in flight) of the ingest section, each for full and seed shares."""

DEFAULT_CONFIG = ROOT / "configs" / "local-3.yaml"

FLOWER_SCRIPT = ROOT / "scripts" / "flower_secaggplus.py"

RSS_TARGET_WORDS = 4
"""Target: an aggregator's peak RSS <= RSS_TARGET_WORDS x d x 8 bytes + RSS_TARGET_BASE."""

RSS_TARGET_BASE = 200 * MB

LARGE_RSS_TARGET_WORDS = 2
"""Target of the large section: peak RSS <= LARGE_RSS_TARGET_WORDS x d x 8 B + RSS_TARGET_BASE."""

MEMORY_HEADROOM = 0.8
"""Fraction of the available memory (or free disk) a grid cell may plan to use."""

CLIENT_COPIES = 10
"""Vector-sized buffers a client holds while preparing an upload (vector, encoding
temporaries, shares, bodies): an upper bound used to plan memory."""


def parse_sections(text: str) -> tuple[str, ...]:
    """``"grid,client"`` -> the named sections in run order; raises ValueError on a bad name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise ValueError(
            f"unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}"
        )
    return tuple(s for s in SECTIONS if s in names)


def rss_target_bytes(dim: int) -> int:
    """The aggregator peak-RSS target for vectors of length ``dim``: 4 x d x 8 B + 200 MB."""
    return RSS_TARGET_WORDS * dim * 8 + RSS_TARGET_BASE


def large_rss_target_bytes(dim: int) -> int:
    """The aggregator peak-RSS target of the large section: 2 x d x 8 B + 200 MB."""
    return LARGE_RSS_TARGET_WORDS * dim * 8 + RSS_TARGET_BASE


def section_cells(
    section: str,
    clients: Sequence[int] | None,
    dims: Sequence[int] | None,
    quick: bool = False,
) -> list[tuple[int, int]]:
    """The (clients, d) cells of a fixed-shape section (sequential, rss, large): its
    default cell (:data:`QUICK_CELLS` with ``quick``), or every combination of the given
    client counts and dimensions, each replacing the default's, in run order."""
    default = {"sequential": SEQUENTIAL_CELL, "rss": RSS_CELL, "large": LARGE_CELL}[section]
    if quick:
        default = QUICK_CELLS[section]
    cs = sorted(set(clients)) if clients else [default[0]]
    ds = sorted(set(dims)) if dims else [default[1]]
    return [(c, d) for d in ds for c in cs]


def check_dims(sections: Sequence[str], dims: Sequence[int]) -> None:
    """ValueError unless the dimensions suit the selected sections: none above
    MAX_LARGE_DIM, and at least one up to max(FULL_DIMS) when a section other than the
    large ones is selected (those sections use only such d, see :func:`small_dims`)."""
    if max(dims) > MAX_LARGE_DIM:
        raise ValueError(f"--dims above {fmt_dim(MAX_LARGE_DIM)} are not supported")
    others = [s for s in sections if s not in LARGE_SECTIONS]
    if others and not small_dims(dims):
        raise ValueError(
            f"--dims above {fmt_dim(max(FULL_DIMS))} are for the sections "
            f"{', '.join(LARGE_SECTIONS)} only; give one up to {fmt_dim(max(FULL_DIMS))} "
            f"too for {', '.join(others)}"
        )


def small_dims(dims: Sequence[int]) -> list[int]:
    """The dimensions every section takes (up to max(FULL_DIMS)): the large section alone
    takes the others."""
    return [d for d in dims if d <= max(FULL_DIMS)]


def cell_memory_bytes(dim: int, m: int, concurrency: int) -> int:
    """Memory a grid cell may need at once (bytes): ``concurrency`` clients preparing uploads,
    ``m`` aggregators at 1.5 x their RSS target, the plaintext server and numpy baselines."""
    clients = concurrency * CLIENT_COPIES * 8 * dim
    aggregators = m * rss_target_bytes(dim) * 3 // 2
    baselines = (concurrency + 4) * 8 * dim
    return clients + aggregators + baselines


def cell_disk_bytes(clients: int, dim: int) -> int:
    """Journal bytes of a round (bytes): one full share of 8 d bytes per client, in total."""
    return clients * (8 * dim + 64)


def estimate_round_seconds(
    measured: Sequence[tuple[int, int, float]], clients: int, dim: int
) -> float | None:
    """Estimated wall time (s) of a round of ``clients`` x ``dim`` from rounds already run,
    given as ``(clients, dim, seconds)``; None when nothing comparable was measured.

    Per-client time is taken from the measured round of the same ``dim`` with the most
    clients; otherwise from the largest smaller ``dim``, scaled linearly in d (an upper bound,
    since per-client overheads do not grow with d).
    """
    same = [(c, s) for c, d, s in measured if d == dim and c > 0]
    if same:
        c, s = max(same)
        return clients * s / c
    smaller = [(d, c, s) for c, d, s in measured if d < dim and c > 0]
    if not smaller:
        return None
    d, c, s = max(smaller)
    return clients * (s / c) * (dim / d)


@dataclass(frozen=True)
class CellPlan:
    """Whether to run a grid cell, and why not. ``estimate_s``: expected round time (s)."""

    clients: int
    dim: int
    run: bool
    reason: str | None
    estimate_s: float | None
    must_run: bool


def plan_cell(
    clients: int,
    dim: int,
    *,
    estimate_s: float | None,
    budget_s: float,
    memory_bytes: int,
    available_memory_bytes: int | None,
    disk_bytes: int,
    free_disk_bytes: int | None,
    must_run: bool,
) -> CellPlan:
    """Decide on one grid cell. A cell that cannot fit (memory, disk) is always skipped;
    one estimated over ``budget_s`` is skipped unless it is a must-run cell."""
    reasons = []
    if available_memory_bytes is not None and memory_bytes > available_memory_bytes:
        reasons.append(
            f"needs about {fmt_bytes(memory_bytes)} of memory, "
            f"{fmt_bytes(available_memory_bytes)} usable"
        )
    if free_disk_bytes is not None and disk_bytes > free_disk_bytes:
        reasons.append(
            f"journals need {fmt_bytes(disk_bytes)} of disk, {fmt_bytes(free_disk_bytes)} usable"
        )
    if not must_run and estimate_s is not None and estimate_s > budget_s:
        reasons.append(
            f"estimated {estimate_s:.0f} s > cell budget {budget_s:.0f} s "
            "(from the per-client time of smaller cells)"
        )
    return CellPlan(
        clients,
        dim,
        run=not reasons,
        reason="; ".join(reasons) or None,
        estimate_s=estimate_s,
        must_run=must_run,
    )


def grid_cells(clients: Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Grid cells in run order: by d, then by number of clients (so each cell's time can be
    estimated from the cells before it)."""
    return [(c, d) for d in sorted(dims) for c in sorted(clients)]


def flower_cells(clients: Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Flower cells in run order: those of the grid with 10 or 100 clients and d in 1e4..1e6."""
    cs = [c for c in clients if c in FLOWER_CLIENTS]
    ds = [d for d in dims if d in FLOWER_DIMS]
    return [(c, d) for c in sorted(cs) for d in sorted(ds)]
