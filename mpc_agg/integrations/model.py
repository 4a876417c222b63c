"""Model parameters <-> one float64 vector, and back.

A federated-learning model is a list or a mapping of arrays (numpy arrays, or the torch
tensors of a ``state_dict``); mpc_agg aggregates flat float vectors. :func:`flatten`
concatenates the entries, in container order, into one float64 vector and returns a
:class:`ModelLayout` that remembers each entry's name, shape and dtype;
:meth:`ModelLayout.unflatten` turns a vector of the same length (say, the aggregate) back into
the same kind of container with the same shapes and dtypes.

Exact round trip: float16/32/64 and integers of magnitude at most 2**53 are exactly
representable in float64, so ``layout.unflatten(flatten(p)[0])`` equals ``p`` bit for bit.
Larger 64-bit integers, complex, bool, object and string dtypes are refused with
:class:`~mpc_agg.errors.LayoutError`.

torch is optional and never imported here unless the caller already did: an entry is a
torch tensor only if ``torch`` is in ``sys.modules`` and the entry is a ``torch.Tensor``
(no object can be a tensor before torch is loaded). Unflattening a layout that came from
tensors gives tensors again (same dtype and device).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from mpc_agg.errors import LayoutError

EXACT_INT = 2**53
"""Largest integer magnitude that float64 holds exactly: the bound for integer entries."""

Container = Literal["array", "list", "tuple", "dict", "ordereddict"]
"""What :func:`flatten` received and :meth:`ModelLayout.unflatten` gives back: one array or
tensor, a list, a tuple, a dict (any other mapping comes back as a dict), an OrderedDict."""

_TORCH_FLOATS = ("float16", "bfloat16", "float32", "float64")
_TORCH_INTS = ("uint8", "int8", "int16", "int32", "int64")


@dataclass(frozen=True)
class EntrySpec:
    """One entry of a model: where it sits in the flat vector and how to rebuild it.

    ``name``: the mapping key, or the position (``"0"``, ``"1"``, ...) in a sequence.
    ``shape``: the entry's shape (``()`` for a 0-d array). ``dtype``: numpy dtype name
    (``"float32"``, ``"int64"``, ...). ``torch_dtype``/``device``: the tensor's dtype name
    (``"bfloat16"``, ...) and device, or None for numpy entries. ``offset``/``size``: the
    entry occupies ``vector[offset : offset + size]``, in C order.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    size: int
    torch_dtype: str | None = None
    device: str | None = None

    @property
    def is_tensor(self) -> bool:
        """True when the entry was a torch tensor."""
        return self.torch_dtype is not None


@dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and dtypes of a model's entries, in order; made by :func:`flatten`.

    ``size`` is the length of the flat vector (the dimension of an mpc_agg round that
    aggregates this model). Two layouts are equal when they describe the same container
    kind, names, shapes and dtypes.
    """

    container: Container
    entries: tuple[EntrySpec, ...]

    @property
    def size(self) -> int:
        """Length of the flat vector: the sum of the entries' sizes."""
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The entries' names, in vector order."""
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def flatten(self, params: Any, *, dtypes: bool = True) -> npt.NDArray[np.float64]:
        """Flatten ``params``, which must match this layout: container kind, names, shapes
        and (unless ``dtypes`` is False) dtypes and devices.

        Raises :class:`~mpc_agg.errors.LayoutError` naming the first difference.
        """
        vector, layout = flatten(params)
        problem = self.diff(layout, dtypes=dtypes)
        if problem:
            raise LayoutError(f"parameters do not match the model layout: {problem}")
        return vector

    def diff(self, other: ModelLayout, *, dtypes: bool = True) -> str:
        """The first difference between this layout and ``other``, in words ('' if none);
        dtypes and devices are compared only if ``dtypes``."""
        if self.container != other.container:
            return f"container {other.container!r} instead of {self.container!r}"
        if len(self) != len(other):
            return f"{len(other)} entries instead of {len(self)}"
        attrs = ("name", "shape", "dtype", "torch_dtype", "device") if dtypes else ("name", "shape")
        for mine, theirs in zip(self.entries, other.entries, strict=True):
            for attr in attrs:
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a != b:
                    return f"entry {mine.name!r}: {attr} {b!r} instead of {a!r}"
        return ""

    def unflatten(self, vector: npt.ArrayLike) -> Any:
        """The container described by this layout, filled from ``vector`` (length ``size``).

        Float entries are cast to their dtype (float64 -> float16 may round, or overflow to
        inf). Integer entries are rounded to the nearest integer and clipped to the dtype's
        range (an average or a noisy aggregate need not be integral); a non-finite value
        for an integer entry raises :class:`~mpc_agg.errors.LayoutError`.
        """
        flat = np.asarray(vector)
        if flat.ndim != 1:
            raise LayoutError(f"vector must be 1-dimensional, got shape {flat.shape}")
        if flat.shape[0] != self.size:
            raise LayoutError(
                f"vector has length {flat.shape[0]}, but the layout needs {self.size} "
                f"({len(self)} entries)"
            )
        if flat.dtype.kind not in "fiu":
            raise LayoutError(f"vector must be numeric, got dtype {flat.dtype}")
        flat = flat.astype(np.float64, copy=False)
        values = [_rebuild(e, flat[e.offset : e.offset + e.size]) for e in self.entries]
        if self.container == "array":
            return values[0]
        if self.container == "list":
            return values
        if self.container == "tuple":
            return tuple(values)
        pairs = zip(self.names, values, strict=True)
        return OrderedDict(pairs) if self.container == "ordereddict" else dict(pairs)


def flatten(params: Any) -> tuple[npt.NDArray[np.float64], ModelLayout]:
    """Concatenate ``params`` into one float64 vector; return it with its layout.

    ``params``: one numpy array or torch tensor, a list or tuple of them, or a mapping
    (dict, OrderedDict, torch ``state_dict``) from string names to them; entries may also be
    numbers or anything ``numpy.asarray`` accepts. Mapping entries keep the mapping's order.
    Each entry contributes its values in C order. The vector is a new array.
    """
    container, named = _entries(params)
    specs: list[EntrySpec] = []
    parts: list[npt.NDArray[np.float64]] = []
    offset = 0
    for name, value in named:
        spec, part = _flatten_entry(name, value, offset)
        specs.append(spec)
        parts.append(part)
        offset += spec.size
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vector, ModelLayout(container, tuple(specs))


def unflatten(vector: npt.ArrayLike, layout: ModelLayout) -> Any:
    """``layout.unflatten(vector)``."""
    return layout.unflatten(vector)


# --------------------------------------------------------------------------- internals


def _torch_tensor_type() -> type | None:
    """``torch.Tensor`` if the caller has imported torch, else None (never imports it)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _is_leaf(value: Any) -> bool:
    tensor = _torch_tensor_type()
    return isinstance(value, np.ndarray) or (tensor is not None and isinstance(value, tensor))


def _entries(params: Any) -> tuple[Container, list[tuple[str, Any]]]:
    """The container kind and its (name, value) pairs, in order."""
    if _is_leaf(params) or isinstance(params, (np.generic, int, float)):
        return "array", [("0", params)]
    if isinstance(params, Mapping):
        names = list(params.keys())
        for k in names:
            if not isinstance(k, str):
                raise LayoutError(f"mapping keys must be strings, got {k!r} ({type(k).__name__})")
        kind: Container = "ordereddict" if isinstance(params, OrderedDict) else "dict"
        return kind, [(k, params[k]) for k in names]
    if isinstance(params, (list, tuple)):
        kind = "list" if isinstance(params, list) else "tuple"
        return kind, [(str(i), v) for i, v in enumerate(params)]
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise LayoutError(
            "model parameters must be an array, a list or tuple of arrays, or a mapping of "
            f"names to arrays; got {type(params).__name__}"
        )
    return "list", [(str(i), v) for i, v in enumerate(params)]


def _flatten_entry(name: str, value: Any, offset: int) -> tuple[EntrySpec, npt.NDArray[np.float64]]:
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(value, tensor):
        return _flatten_tensor(name, value, offset)
    if isinstance(value, (Mapping, str, bytes)) or (
        isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value)
    ):
        raise LayoutError(
            f"entry {name!r} is a {type(value).__name__}: entries must be arrays or "
            "numbers (nested containers are not supported)"
        )
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"entry {name!r} is not an array: {exc}") from None
    _check_dtype(name, arr.dtype)
    flat = arr.reshape(-1).astype(np.float64)
    spec = EntrySpec(name, tuple(arr.shape), arr.dtype.name, offset, int(arr.size))
    if arr.dtype.kind in "iu":
        _check_exact(name, arr)
    return spec, flat


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in "fiu":
        raise LayoutError(
            f"entry {name!r} has dtype {dtype}: only float and integer entries can be "
            "aggregated (not bool, complex, object, string or time values)"
        )
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise LayoutError(
            f"entry {name!r} has dtype {dtype}, wider than float64: it would lose precision"
        )


def _check_exact(name: str, arr: np.ndarray) -> None:
    """Integers beyond 2**53 would not survive the float64 vector: refuse them."""
    if arr.size and arr.dtype.itemsize >= 8:
        peak = max(abs(int(arr.min())), abs(int(arr.max())))
        if peak > EXACT_INT:
            raise LayoutError(
                f"entry {name!r} holds the integer {peak}, beyond 2**53: float64 cannot "
                "represent it exactly"
            )


def _flatten_tensor(
    name: str, value: Any, offset: int
) -> tuple[EntrySpec, npt.NDArray[np.float64]]:
    torch_dtype = str(value.dtype).removeprefix("torch.")
    if torch_dtype not in _TORCH_FLOATS + _TORCH_INTS:
        raise LayoutError(
            f"entry {name!r} has dtype torch.{torch_dtype}: only float and integer tensors "
            "can be aggregated"
        )
    t = value.detach().cpu()
    if torch_dtype == "bfloat16":  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    arr = np.asarray(t.numpy())
    if arr.dtype.kind in "iu":
        _check_exact(name, arr)
    spec = EntrySpec(
        name,
        tuple(int(s) for s in value.shape),
        arr.dtype.name,
        offset,
        int(arr.size),
        torch_dtype=torch_dtype,
        device=str(value.device),
    )
    return spec, arr.reshape(-1).astype(np.float64)


def _rebuild(spec: EntrySpec, part: npt.NDArray[np.float64]) -> Any:
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        if not np.all(np.isfinite(part)):
            raise LayoutError(f"entry {spec.name!r} is an integer entry but got a non-finite value")
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -EXACT_INT), min(info.max, EXACT_INT)
        values = np.clip(np.rint(part), lo, hi).astype(dtype)
    else:
        with np.errstate(over="ignore"):  # float64 -> float16 may overflow to inf, as a cast does
            values = part.astype(dtype)
    arr = values.reshape(spec.shape)
    if not spec.is_tensor:
        return arr
    import torch  # the entry was a tensor, so torch is installed and imported

    t = torch.from_numpy(np.ascontiguousarray(arr))
    target = getattr(torch, spec.torch_dtype or "")
    if t.dtype != target:
        t = t.to(target)
    if spec.device and spec.device != "cpu":
        t = t.to(spec.device)
    return t
