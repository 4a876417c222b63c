"""Reading a topology document: the YAML file, its parse errors (line and column), and typed
access to its mappings by YAML path.

docs/design.md, "Layout" (``config/``: topology schema and YAML loading); README, "Topology
files". This module is generic: it knows YAML paths and dataclass fields, not the topology.
:mod:`mpc_agg.config.schema` builds its objects with it and those objects check their own
values; this module imports nothing from the schema, so there is no import cycle.

The keys a mapping may hold are the fields of the dataclass it becomes
(:func:`yaml_keys`): a field's ``metadata["yaml"]`` renames it (``"budget.epsilon"``: key
``epsilon`` of the nested mapping ``budget``) or, when ``None``, keeps it out of YAML.
Errors are :class:`~mpc_agg.errors.ConfigError` naming the YAML path
(``aggregators[1].http_port``); ``Topology.from_dict`` adds the source file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mpc_agg.errors import ConfigError

T = TypeVar("T")

YAML = "yaml"
"""The field-metadata key naming a field's YAML key (dotted for a nested mapping), or
``None`` for a field that YAML does not set."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""No default: the key is required."""


def read_document(path: str | Path) -> object:
    """The parsed YAML document at ``path``; errors name ``<file>`` or ``<yaml>`` (with the
    line and column) and carry ``str(path)`` as their source."""
    source = str(Path(path))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read topology: {exc.strerror}", source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "<file>", f"not UTF-8 text (byte {exc.start}): is this a topology file?", source
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("<yaml>", f"not valid YAML{where}: {problem}", source) from None


def read_small_document(path: str | Path, what: str, max_bytes: int) -> object:
    """The parsed YAML of a small file (a card, a grant): at most ``max_bytes``, UTF-8.
    Errors name ``<file>`` or ``<yaml>`` and ``what`` it should be, with ``str(path)`` as
    their source (no echo of the contents: a grant holds a token)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {what}: {exc.strerror}", source) from None
    if len(raw) > max_bytes:
        raise ConfigError("<file>", f"too large for {what}", source)
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("<file>", "not UTF-8 text", source) from None
    except yaml.YAMLError:
        raise ConfigError("<yaml>", "not valid YAML", source) from None


def expect(value: object, typ: type[T], path: str) -> T:
    """``value`` if it is a ``typ``, else a ConfigError at ``path``. ``bool`` is an ``int`` in
    Python; it is refused where an ``int`` is wanted (and an ``int`` where a ``bool`` is)."""
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(path, f"expected {typ.__name__}, got {type(value).__name__} {value!r}")


def yaml_key(f: dataclasses.Field[Any]) -> str | None:
    """The YAML key of field ``f`` (dotted when nested), or None if YAML does not set it."""
    key: str | None = f.metadata.get(YAML, f.name)
    return key


def yaml_keys(cls: type[Any], under: str | None = None) -> list[str]:
    """The keys allowed in the mapping read into dataclass ``cls`` (or in its nested mapping
    ``under``), derived from its fields."""
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        key = yaml_key(f)
        if key is None:
            continue
        head, _, rest = key.partition(".")
        if under is None:
            keys.add(head)
        elif head == under and rest:
            keys.add(rest)
    return sorted(keys)


def _nullable(hint: object) -> bool:
    """True if the type ``hint`` admits None (``float | None``)."""
    origin = typing.get_origin(hint)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(
        hint
    )


class Section:
    """One mapping of the document at YAML path ``path`` (``""`` for the root); a key
    outside ``allowed`` is refused at once."""

    def __init__(self, raw: dict[Any, Any], path: str, allowed: Collection[str]) -> None:
        self.raw = raw
        self.path = path
        for key in raw:
            if key not in allowed:
                raise ConfigError(
                    self.key_path(key),
                    f"unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}",
                )

    def key_path(self, key: object) -> str:
        """The YAML path of ``key`` in this mapping."""
        return f"{self.path}.{key}" if self.path else str(key)

    def has(self, key: str) -> bool:
        """True if the key is present (even as null)."""
        return key in self.raw

    def get(self, key: str, typ: type[T], default: T = MISSING) -> T:
        """The value of ``key``, which must be a ``typ``; absent or null, ``default`` (a
        ConfigError ``missing required key`` without one)."""
        value = self.raw.get(key, MISSING)
        if value is MISSING or (value is None and default is not MISSING):
            if default is MISSING:
                raise ConfigError(self.key_path(key), "missing required key")
            return default
        return expect(value, typ, self.key_path(key))

    def section(
        self, key: str, allowed: Collection[str], default: dict[Any, Any] | None = None
    ) -> Section:
        """The nested mapping ``key`` (absent or null: ``default``, required without one)."""
        raw = self.get(key, dict, MISSING if default is None else default)
        return Section(raw, self.key_path(key), allowed)

    def fields(
        self, cls: type[Any], *, null_is_default: bool = True, **defaults: Any
    ) -> dict[str, Any]:
        """Keyword arguments for dataclass ``cls`` from this mapping, by its fields.

        A key that is absent takes the default (``defaults`` override the dataclass's own),
        and so does a null for a field that has a default and whose type does not admit None
        (unless ``null_is_default`` is false); a field without one is a ``missing required
        key``. Values are passed as they are: ``cls`` checks them itself.
        """
        hints = typing.get_type_hints(cls)
        nested: dict[str, Section] = {}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = yaml_key(f)
            if key is None:
                continue
            where = self
            head, _, rest = key.partition(".")
            if rest:
                if head not in nested:
                    optional = all(_has_default(g, defaults) for g in _group(cls, head))
                    nested[head] = self.section(
                        head, yaml_keys(cls, head), {} if optional else None
                    )
                where, key = nested[head], rest
            has_default = _has_default(f, defaults)
            value = where.raw.get(key, MISSING)
            null_default = null_is_default and not _nullable(hints[f.name])
            if value is MISSING or (value is None and has_default and null_default):
                if not has_default:
                    raise ConfigError(where.key_path(key), "missing required key")
                if f.name in defaults:
                    out[f.name] = defaults[f.name]
                continue
            out[f.name] = value
        return out


def _has_default(f: dataclasses.Field[Any], defaults: dict[str, Any]) -> bool:
    return (
        f.name in defaults
        or f.default is not dataclasses.MISSING
        or f.default_factory is not dataclasses.MISSING
    )


def _group(cls: type[Any], head: str) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if (k := yaml_key(f)) and k.startswith(head + ".")]
