"""One source row checked in Python: the authority on what is wrong with a row, and why.

Readers check whole columns first (see :mod:`esworkbench.sources._stage`); only the rows those
checks cannot vouch for come here, so this code is about being right, not fast. Every field is
read on its own: a bad row keeps the fields that could be read, and its ``error`` names each
field that could not, with the reason.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa

from esworkbench.errors import InvalidEventError
from esworkbench.events import _ALIASES, EVENT_SCHEMA, dumps_json, loads_exact

__all__ = ["SOURCE_SCHEMA", "bad_row", "check_row", "compact_json", "zone_of"]

SOURCE_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("source_position", pa.int64()),
        *(f.with_nullable(True) for f in EVENT_SCHEMA if f.name != "position"),
        pa.field("error", pa.string()),
    ]
)
"""What every reader yields: the event's columns, its place in the source, and its error."""

FIELDS: Final = tuple(SOURCE_SCHEMA.names[1:-1])
_REQUIRED_TEXT: Final = ("event_type", "aggregate_type", "aggregate_id")
_OPTIONAL_TEXT: Final = ("correlation_id", "causation_id", "user_id")
_METADATA_KEYS: Final = {
    "correlation_id": ("correlationId", "correlation_id"),
    "causation_id": ("causationId", "causation_id"),
    "user_id": ("userId", "user_id"),
}
_INT32_MAX: Final = 2**31 - 1
_INT64_MAX: Final = 2**63 - 1
_DIGITS: Final = re.compile(r"[0-9]+")
# A JSON string, or a run of whitespace outside strings (which compact text does without).
_SPACE: Final = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\n\r]+')


class _FieldError(Exception):
    """A field that cannot be read: becomes one part of the row's error."""


def zone_of(tz: str | None) -> ZoneInfo | None:
    """The zone named ``tz`` (for naive timestamps), or None.

    Raises:
        InvalidEventError: the name is not an IANA zone.

    Examples:
        >>> zone_of("Europe/Berlin").key, zone_of(None)
        ('Europe/Berlin', None)
    """
    if tz is None:
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidEventError(
            f"unknown time zone {tz!r}. Hint: use an IANA name such as 'Europe/Berlin'"
        ) from None


def compact_json(text: str) -> str:
    """Drops the whitespace outside strings; numbers and strings keep their exact text.

    Examples:
        >>> compact_json('{ "amount": 10.10, "note": "a b" }')
        '{"amount":10.10,"note":"a b"}'
    """
    return _SPACE.sub(r"\1", text)


def bad_row(position: int, message: str) -> dict[str, Any]:
    """A row of which nothing could be read: every column null but the error.

    Examples:
        >>> bad_row(3, "line 3 is not JSON")["error"]
        'line 3 is not JSON'
    """
    row: dict[str, Any] = dict.fromkeys(SOURCE_SCHEMA.names)
    row["source_position"] = position
    row["error"] = message
    return row


def check_row(
    position: int,
    source: Mapping[str, object],
    *,
    zone: ZoneInfo | None,
    text_integers: bool = False,
) -> dict[str, Any]:
    """Reads one source event field by field into a row of :data:`SOURCE_SCHEMA`.

    Args:
        position: the row's place in the source (1-based).
        source: field name (camelCase or snake_case) -> value, as parsed from the source.
            ``data`` and ``metadata`` may be JSON text (kept exactly, made compact) or mappings.
        zone: the zone of naive timestamps; without it they are an error.
        text_integers: whether version and schema_version may be given as digit text (CSV).

    Examples:
        >>> row = check_row(7, {"eventType": "A", "aggregateId": "a-1", "aggregateType": "T",
        ...                     "version": "3a", "data": '{"x": 1.50}'}, zone=None)
        >>> row["source_position"], row["data"], row["error"]
        (7, '{"x":1.50}', "field 'version': must be an integer, got '3a'")
    """
    row = bad_row(position, "")
    errors: list[str] = []
    fields: dict[str, object] = {}
    for key, value in source.items():
        name = _ALIASES.get(key, key)
        if name == "position":
            continue  # a source's own positions are only its order; the store assigns new ones
        if name not in FIELDS:
            errors.append(f"field {key!r}: is not a field of an event (put it in metadata)")
        elif name in fields and fields[name] != value:
            errors.append(f"field {name!r}: is given twice with different values")
        else:
            fields[name] = value
    metadata: object = None
    for name in FIELDS:
        value = fields.get(name)
        try:
            if name == "metadata":
                row[name], metadata = _json_object(value, required=False)
            elif name in _OPTIONAL_TEXT:
                row[name] = _text(_promoted(name, value, metadata), required=False)
            else:
                row[name] = _read(name, value, zone, text_integers)
        except _FieldError as exc:
            errors.append(f"field {name!r}: {exc}")
    if fields.get("occurred_at") is None:
        row["occurred_at"] = row["recorded_at"]
    row["error"] = "; ".join(errors) or None
    return row


def _read(name: str, value: object, zone: ZoneInfo | None, text_integers: bool) -> object:
    if name == "event_id":
        return _event_id(value)
    if name in ("version", "schema_version"):
        return _integer(value, text_integers, default=None if name == "version" else 1)
    if name in ("recorded_at", "occurred_at"):
        return _instant(value, zone)
    if name == "data":
        return _json_object(value, required=True)[0]
    return _text(value, required=name in _REQUIRED_TEXT)


def _text(value: object, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise _FieldError("is missing")
        return None
    if not isinstance(value, str):
        raise _FieldError(f"must be a string, got {_shown(value)}")
    if required and not value:
        raise _FieldError("is empty")
    if "\x00" in value:
        raise _FieldError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _FieldError("holds a lone surrogate, which UTF-8 cannot store") from None
    return value


def _promoted(name: str, value: object, metadata: object) -> object:
    """The event's own id, else the metadata's (camelCase first); an integer id becomes text."""
    if value is not None or not isinstance(metadata, Mapping):
        return value
    found = next((metadata[k] for k in _METADATA_KEYS[name] if metadata.get(k) is not None), None)
    if found is None or isinstance(found, str):
        return found
    if isinstance(found, int) and not isinstance(found, bool):
        return str(found)
    raise _FieldError(f"must be a string, got {_shown(found)} in metadata")


def _event_id(value: object) -> str | None:
    if value is None:
        return None  # the store gives the event a new id
    if not isinstance(value, str):
        raise _FieldError(f"must be a UUID string, got {_shown(value)}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _FieldError(f"is not a UUID: {value!r}") from None


def _integer(value: object, text: bool, *, default: int | None) -> int | None:
    if value is None:
        return default
    if text and isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(f"must be an integer, got {_shown(value)}")
    if value < 1:
        raise _FieldError(f"must be >= 1, got {value}")
    if value > (_INT64_MAX if default is None else _INT32_MAX):
        raise _FieldError(f"is too large, got {value}")
    return value


def _instant(value: object, zone: ZoneInfo | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _FieldError(f"is not an ISO 8601 instant: {value!r}") from None
    if not isinstance(value, datetime):
        raise _FieldError(f"must be an ISO 8601 instant, got {_shown(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        if zone is None:
            raise _FieldError(f"is a naive timestamp ({value.isoformat()}); name its zone with tz=")
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def _json_object(value: object, *, required: bool) -> tuple[str | None, object]:
    """Returns (compact JSON text, parsed value) of an object given as text or a mapping."""
    if value is None:
        if required:
            raise _FieldError("is missing")
        return None, None
    if isinstance(value, Mapping):
        try:
            return dumps_json(value), value
        except InvalidEventError as exc:
            raise _FieldError(f"cannot be JSON: {exc}") from None
    if not isinstance(value, str):
        raise _FieldError(f"must be a JSON object, got {_shown(value)}")
    try:
        parsed = loads_exact(value)
    except ValueError:
        raise _FieldError(f"is text that is not JSON: {_shown(value)}") from None
    if not isinstance(parsed, dict):
        raise _FieldError(f"must be a JSON object, got {_shown(parsed)}")
    return compact_json(value), parsed


def _shown(value: object) -> str:
    """A value as an error message shows it: text quoted, JSON kinds named."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
