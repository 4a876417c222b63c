"""Vector files for ``mpc-agg submit`` and ``mpc-agg collect``: read one vector, write a total.

README, "Command line". A vector file is one of:

* ``.npy`` (NumPy's format, recognised by its magic ``\\x93NUMPY`` whatever the file's
  name): a 1-D array of real numbers (bool, integer or float);
* ``.csv``: one row or one column of numbers (comma-separated fields, one number each);
* text (any other name, or standard input that is not ``.npy``): numbers separated by
  whitespace, commas or newlines, in any arrangement.

In text and CSV, ``#`` starts a comment and blank lines are skipped. ``-`` reads standard
input. Everything else is refused with a message naming the file, and the line for text:
no numbers, a value that is not a number, NaN or infinity, an array that is not 1-D,
complex or non-numeric arrays, a CSV table of several rows and columns, an empty field
between two commas. Refusals are :class:`~mpc_agg.errors.UsageError` (the file cannot be
read as a vector) or :class:`~mpc_agg.errors.EncodingError` (it holds something that is not
a finite 1-D vector); both leave ``mpc-agg`` with exit status 2.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np
import numpy.typing as npt

from mpc_agg.errors import EncodingError, UsageError

NPY_MAGIC = b"\x93NUMPY"
"""The first bytes of every ``.npy`` file."""

STDIN = "-"
"""The file name that stands for standard input (or, for a total, standard output)."""

TOTAL_SUFFIXES = (".npy", ".csv")
"""The suffixes :func:`write_vector` writes."""


def describe(path: str) -> str:
    """How messages name ``path``."""
    return "standard input" if path == STDIN else repr(path)


def read_vector(path: str, stdin: BinaryIO | None = None) -> npt.NDArray[np.float64]:
    """The 1-D float64 vector in ``path`` (``-``: ``stdin``, default the process's standard
    input, read in binary). Raises UsageError / EncodingError naming the file."""
    source = describe(path)
    if path == STDIN:
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read()
        suffix = ""
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read vector file {source}: {exc.strerror}") from None
        suffix = Path(path).suffix.lower()
    if data.startswith(NPY_MAGIC):
        return _from_npy(data, source)
    if suffix == ".npy":
        raise UsageError(
            f"{source} is named .npy but is not a .npy file (it does not start with the "
            "magic \\x93NUMPY)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{source} is neither a .npy file nor UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start})"
        ) from None
    return parse_text(text, source, csv=suffix == ".csv")


def _from_npy(data: bytes, source: str) -> npt.NDArray[np.float64]:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{source} is not a valid .npy file: {exc}") from None
    if not isinstance(array, np.ndarray):  # np.load of a .npz gives an NpzFile
        raise UsageError(f"{source} is not a .npy array")
    if array.dtype.kind == "c":
        raise EncodingError(f"{source} holds complex numbers ({array.dtype}); give real ones")
    if array.dtype.kind not in "biuf":
        raise EncodingError(f"{source} holds {array.dtype} values, not numbers")
    if array.ndim != 1:
        raise EncodingError(
            f"{source} holds an array of shape {array.shape}; a vector is 1-D (shape (d,)): "
            "flatten it first"
        )
    vector = array.astype(np.float64)
    if array.dtype.kind in "iu" and array.size:
        big = np.flatnonzero(np.abs(array.astype(np.float64)) > 2.0**53)
        if big.size:
            raise EncodingError(
                f"{source}: integer {array[big[0]]} at index {big[0]} is beyond 2**53 and "
                "cannot be represented exactly as float64"
            )
    _check_values(vector, source, lambda i: f"index {i}")
    return vector


def parse_text(text: str, source: str, *, csv: bool) -> npt.NDArray[np.float64]:
    """The numbers in ``text``: CSV (``csv``: one row or one column) or free text (numbers
    separated by whitespace, commas or newlines; one trailing comma per line allowed).
    ``#`` starts a comment. ``source`` names the file in messages."""
    lines: list[tuple[int, list[str]]] = []  # (line number, its tokens), lines with values
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        fields = body.split(",")
        if not csv and len(fields) > 1 and not fields[-1].strip():
            fields.pop()  # "1, 2, 3," : a trailing comma separates nothing
        tokens: list[str] = []
        for field in fields:
            parts = field.split()
            if not parts:
                raise EncodingError(f"{source}, line {lineno}: an empty value between commas")
            if csv and len(parts) > 1:
                raise EncodingError(
                    f"{source}, line {lineno}: {field.strip()!r} is not one number (CSV "
                    "fields are separated by commas)"
                )
            tokens.extend(parts)
        lines.append((lineno, tokens))
    if csv and len(lines) > 1:
        wide = next(((n, t) for n, t in lines if len(t) > 1), None)
        if wide is not None:
            raise EncodingError(
                f"{source} is a table ({len(lines)} lines, line {wide[0]} has {len(wide[1])} "
                "values); a CSV vector is one row or one column"
            )
    flat = [t for _, tokens in lines for t in tokens]
    if not flat:
        raise EncodingError(f"{source} holds no numbers (an empty vector)")
    try:
        vector = np.array(flat, dtype=np.float64)
    except ValueError:  # find the culprit, and its line, the slow way
        values: list[float] = []
        for lineno, tokens in lines:
            for token in tokens:
                try:
                    values.append(float(token))
                except ValueError:
                    raise EncodingError(
                        f"{source}, line {lineno}: {_clip_text(token)!r} is not a number"
                    ) from None
        vector = np.array(values, dtype=np.float64)  # numpy refused what float() takes
    ends = np.cumsum([len(tokens) for _, tokens in lines])

    def where(i: int) -> str:
        return f"line {lines[int(np.searchsorted(ends, i, side='right'))][0]}"

    _check_values(vector, source, where)
    return vector


def _clip_text(token: str, limit: int = 40) -> str:
    return token if len(token) <= limit else token[:limit] + "..."


def _check_values(
    vector: npt.NDArray[np.float64], source: str, where: Callable[[int], str]
) -> None:
    """Refuse an empty vector and NaN or infinite values, naming where (``where(i)``)."""
    if vector.size == 0:
        raise EncodingError(f"{source} holds no numbers (an empty vector)")
    finite = np.isfinite(vector)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise EncodingError(
            f"{source}, {where(i)}: {vector[i]} (value {i + 1} of {vector.size}) is not a "
            "finite number; NaN and infinity cannot be aggregated"
        )


def check_output(path: str | None, what: str, suffixes: tuple[str, ...], force: bool) -> None:
    """Refuse an output path before any work that cannot be undone (closing a round): a
    suffix not in ``suffixes``, a directory that does not exist, or an existing file
    without ``force``. ``-`` (standard output) passes when ``.csv`` is among ``suffixes``."""
    if path is None or (path == STDIN and ".csv" in suffixes):
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(
            f"{what} {path!r}: the file name must end in {' or '.join(suffixes)} (the format "
            "follows the suffix)"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path!r}: directory {str(parent)!r} does not exist")
    if p.exists() and not force:
        raise UsageError(f"{what} {path!r} already exists; pass --force to replace it")


def is_npy_output(path: str | None) -> bool:
    """True when ``path`` names a ``.npy`` file to write (not ``-``): ``collect`` then
    streams the total into it as a memory map (:meth:`mpc_agg.collector.Collector.aggregate`
    ``out=``) instead of :func:`write_vector`."""
    return path is not None and path != STDIN and Path(path).suffix.lower() == ".npy"


def write_vector(path: str, vector: npt.NDArray[np.float64], stdout: TextIO | None = None) -> None:
    """Write ``vector``: ``.npy`` (``np.save``), ``.csv`` (one value per line, 17 significant
    digits: float64 round-trips), or ``-`` (CSV to ``stdout``). Files are replaced
    atomically (a temporary file next to them, then a rename)."""
    if path == STDIN:
        out = stdout if stdout is not None else sys.stdout
        np.savetxt(out, vector, fmt="%.17g")
        out.flush()
        return
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if p.suffix.lower() == ".npy":
                np.save(f, vector)
            else:
                np.savetxt(f, vector, fmt="%.17g")
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
