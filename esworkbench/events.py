"""The event record: its Arrow schema, the shapes accepted as input, and their checks.

One canonical record is used everywhere (Parquet, SQL, Python, CLI). Input may come as dicts in
the common camelCase JSON shape, as dicts in snake_case, or as :class:`NewEvent` values; each is
checked field by field and turned into a row of :data:`EVENT_SCHEMA`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa

from esworkbench.errors import InvalidEventError

__all__ = [
    "COLUMNS",
    "EVENT_SCHEMA",
    "NewEvent",
    "dumps_json",
    "has_event_id",
    "loads_exact",
    "to_records",
]

TIMESTAMP: Final = pa.timestamp("us", tz="UTC")

EVENT_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("aggregate_type", pa.string(), nullable=False),
        pa.field("aggregate_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("recorded_at", TIMESTAMP, nullable=False),
        pa.field("occurred_at", TIMESTAMP, nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("data", pa.string(), nullable=False),
        pa.field("metadata", pa.string()),
        pa.field("correlation_id", pa.string()),
        pa.field("causation_id", pa.string()),
        pa.field("user_id", pa.string()),
    ]
)
"""The Arrow schema of the canonical event record, in column order."""

COLUMNS: Final[tuple[str, ...]] = tuple(EVENT_SCHEMA.names)

# Input field name -> canonical name. Both the common camelCase shape and snake_case are accepted.
_ALIASES: Final[dict[str, str]] = {
    "eventId": "event_id",
    "eventType": "event_type",
    "aggregateType": "aggregate_type",
    "aggregateId": "aggregate_id",
    "timestamp": "recorded_at",
    "recordedAt": "recorded_at",
    "occurredAt": "occurred_at",
    "schemaVersion": "schema_version",
    "correlationId": "correlation_id",
    "causationId": "causation_id",
    "userId": "user_id",
}
_CANONICAL_INPUT: Final = frozenset(COLUMNS) - {"position"}
_PROMOTED: Final = ("correlation_id", "causation_id", "user_id")
_METADATA_KEYS: Final = {
    "correlation_id": ("correlationId", "correlation_id"),
    "causation_id": ("causationId", "causation_id"),
    "user_id": ("userId", "user_id"),
}


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append, before the store gives it a position and a version.

    Examples:
        >>> e = NewEvent("AccountOpened", {"owner": "Ann"})
        >>> (e.event_type, e.data["owner"], e.schema_version)
        ('AccountOpened', 'Ann', 1)
    """

    event_type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] | None = None
    event_id: str | uuid.UUID | None = None
    occurred_at: datetime | str | None = None
    recorded_at: datetime | str | None = None
    schema_version: int = 1
    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None


def _where(index: int, raw: Mapping[str, Any]) -> str:
    """Names an input event for an error message."""
    parts = [f"event {index}"]
    for key in ("event_id", "eventId", "event_type", "eventType", "aggregate_id", "aggregateId"):
        value = raw.get(key)
        if isinstance(value, str | uuid.UUID):
            parts.append(f"{key}={str(value)!r}")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


class _Checker:
    """Checks one input event; every failure names the event and the field."""

    def __init__(self, index: int, raw: Mapping[str, Any]) -> None:
        self.index = index
        self.where = _where(index, raw)

    def fail(self, field_name: str, reason: str, hint: str) -> InvalidEventError:
        return InvalidEventError(
            f"{self.where}: field {field_name!r} {reason}. Hint: {hint}",
            index=self.index,
            field=field_name,
        )

    def text(self, name: str, value: object, *, required: bool) -> str | None:
        if value is None:
            if required:
                raise self.fail(name, "is missing", f"every event needs a non-empty {name}")
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}", "pass text")
        if required and not value:
            raise self.fail(name, "is empty", f"give the event a non-empty {name}")
        if "\x00" in value:
            raise self.fail(name, "contains a NUL character", "remove the NUL byte")
        if not _is_utf8(value):
            raise self.fail(name, _SURROGATE, "fix the text's encoding")
        return value

    def integer(self, name: str, value: object, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float | Decimal) and value == int(value):
                raise self.fail(
                    name,
                    f"must be an integer, got {type(value).__name__} {value!r}",
                    f"pass {int(value)} as an int",
                )
            raise self.fail(
                name, f"must be an integer, got {type(value).__name__} {value!r}", "pass an int"
            )
        if value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}", f"{name}s start at 1")
        return value

    def instant(self, name: str, value: object, tz: ZoneInfo | None) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise self.fail(
                    name, f"is not an ISO 8601 instant: {value!r}", "write 2024-05-01T12:00:00Z"
                ) from None
        if not isinstance(value, datetime):
            raise self.fail(
                name, f"must be a datetime or ISO text, got {type(value).__name__}", "pass one"
            )
        if value.tzinfo is None or value.utcoffset() is None:
            if tz is None:
                raise self.fail(
                    name,
                    f"is a naive datetime ({value.isoformat()})",
                    "give it a zone (datetime(..., tzinfo=UTC)) or name the zone with tz=",
                )
            value = value.replace(tzinfo=tz)
        return value.astimezone(UTC)

    def event_id(self, value: object) -> str:
        if value is None:
            return str(uuid.uuid4())
        if isinstance(value, uuid.UUID):
            return str(value)
        if not isinstance(value, str):
            raise self.fail(
                "event_id", f"must be a UUID string, got {type(value).__name__}", "pass a UUID"
            )
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise self.fail(
                "event_id", f"is not a UUID: {value!r}", "use uuid.uuid4() or leave it out"
            ) from None

    def json_object(self, name: str, value: object, *, required: bool) -> str | None:
        if value is None:
            if required:
                raise self.fail(name, "is missing", "pass a dict, for example {}")
            return None
        if isinstance(value, str | bytes):
            try:
                value = loads_exact(value)
            except ValueError:
                raise self.fail(name, "is text that is not JSON", "pass a dict") from None
        if not isinstance(value, Mapping):
            raise self.fail(
                name,
                f"must be a JSON object, got {type(value).__name__}",
                "wrap the value in a dict",
            )
        try:
            text = _dumps(value)
        except _JsonValueError as exc:
            raise self.fail(f"{name}{exc.path}", exc.reason, exc.hint) from None
        if not _is_utf8(text):
            raise self.fail(name, _SURROGATE, "fix the text's encoding")
        return text


_SURROGATE: Final = "holds a lone surrogate, which UTF-8 cannot store"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _JsonValueError(Exception):
    def __init__(self, path: str, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.path, self.reason, self.hint = path, reason, hint


def _check_json(value: object, path: str) -> bool:
    """Walks a value; raises on what JSON cannot hold; tells whether a Decimal is inside."""
    if value is None or isinstance(value, str | bool | int):
        return False
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise _JsonValueError(path, f"holds {value!r}, which JSON cannot hold", "use null")
        return isinstance(value, Decimal)
    if isinstance(value, Mapping):
        found = False
        for key, item in value.items():
            if not isinstance(key, str):
                raise _JsonValueError(
                    f"{path}[{key!r}]", "has a non-string key", "JSON object keys are strings"
                )
            found |= _check_json(item, f"{path}.{key}")
        return found
    if isinstance(value, list | tuple):
        found = False
        for i, item in enumerate(value):
            found |= _check_json(item, f"{path}[{i}]")
        return found
    raise _JsonValueError(
        path,
        f"holds a {type(value).__name__}, which JSON cannot hold",
        "convert it first (str(value) for ids, value.isoformat() for instants)",
    )


def _encode_exact(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        items = (
            f"{json.dumps(k, ensure_ascii=False)}:{_encode_exact(v)}" for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode_exact(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def dumps_json(value: object) -> str:
    """Encodes a value as compact JSON text, keeping Decimals exact.

    Raises:
        InvalidEventError: if the value holds something JSON cannot (NaN, a set, a datetime, ...).

    Examples:
        >>> from decimal import Decimal
        >>> dumps_json({"amount": Decimal("10.10"), "tags": ["a"]})
        '{"amount":10.10,"tags":["a"]}'
    """
    try:
        return _dumps(value)
    except _JsonValueError as exc:
        raise InvalidEventError(
            f"value{exc.path} {exc.reason}. Hint: {exc.hint}", field=exc.path
        ) from None


def _dumps(value: object) -> str:
    if _check_json(value, ""):
        return _encode_exact(value)
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def loads_exact(text: str | bytes) -> Any:
    """Parses JSON text keeping every number exact (Decimal for non-integers).

    Examples:
        >>> loads_exact('{"amount": 10.10}')
        {'amount': Decimal('10.10')}
    """
    return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)


def has_event_id(raw: object) -> bool:
    """Tells whether an input event carries its own event_id (rather than getting a new one).

    Examples:
        >>> has_event_id({"eventId": "6f2fe78d-6a8e-4854-84ca-f6a9c2b4f17c"}), has_event_id({})
        (True, False)
    """
    if isinstance(raw, NewEvent):
        return raw.event_id is not None
    if isinstance(raw, Mapping):
        return raw.get("event_id") is not None or raw.get("eventId") is not None
    return False


def _as_mapping(raw: object, index: int) -> Mapping[str, Any]:
    if isinstance(raw, NewEvent):
        return {name: getattr(raw, name) for name in NewEvent.__slots__}
    if isinstance(raw, Mapping):
        return raw
    raise InvalidEventError(
        f"event {index} is a {type(raw).__name__}. Hint: pass dicts (camelCase or snake_case) "
        "or esworkbench.NewEvent values",
        index=index,
    )


def _canonical_keys(raw: Mapping[str, Any], check: _Checker) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name == "position":
            continue  # positions are assigned at commit; a source's position is only its order
        if name not in _CANONICAL_INPUT:
            raise check.fail(
                str(key), "is not a field of an event", "put extra information in metadata"
            )
        if name in out and out[name] != value:
            raise check.fail(name, "is given twice with different values", "give it once")
        out[name] = value
    return out


def to_records(
    events: Iterable[object],
    *,
    aggregate_id: str | None = None,
    aggregate_type: str | None = None,
    tz: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Checks input events and returns them as canonical records (without position).

    ``aggregate_id`` and ``aggregate_type``, when given, fill in events that lack them and must
    agree with those that carry them. ``version`` stays ``None`` where the input has none.

    Args:
        events: dicts (camelCase or snake_case) or :class:`NewEvent` values.
        aggregate_id: the stream the events belong to, if known.
        aggregate_type: the stream's type, if known.
        tz: IANA zone name used for naive datetimes; without it naive datetimes are refused.
        now: the recorded_at for events that carry none (defaults to the current instant).

    Raises:
        InvalidEventError: naming the event and the field that is wrong.

    Examples:
        >>> [r] = to_records([{"eventType": "AccountOpened", "data": {"owner": "Ann"},
        ...                    "metadata": {"userId": "u-7"}}], aggregate_id="acc-1",
        ...                   aggregate_type="Account")
        >>> (r["event_type"], r["aggregate_id"], r["user_id"], r["data"])
        ('AccountOpened', 'acc-1', 'u-7', '{"owner":"Ann"}')
    """
    try:
        zone = ZoneInfo(tz) if tz is not None else None
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidEventError(
            f"unknown time zone {tz!r}. Hint: use an IANA name such as 'Europe/Berlin'"
        ) from None
    stamp = now or datetime.now(UTC)
    records: list[dict[str, Any]] = []
    for index, item in enumerate(events):
        raw = _as_mapping(item, index)
        check = _Checker(index, raw)
        fields = _canonical_keys(raw, check)
        records.append(_to_record(fields, check, aggregate_id, aggregate_type, zone, stamp))
    return records


def _to_record(
    fields: dict[str, Any],
    check: _Checker,
    aggregate_id: str | None,
    aggregate_type: str | None,
    zone: ZoneInfo | None,
    stamp: datetime,
) -> dict[str, Any]:
    for name, given in (("aggregate_id", aggregate_id), ("aggregate_type", aggregate_type)):
        value = fields.get(name)
        if value is None:
            fields[name] = given
        elif given is not None and value != given:
            raise check.fail(
                name, f"is {value!r} but the events are appended to {given!r}", "drop the field"
            )
    metadata = fields.get("metadata")
    if isinstance(metadata, str | bytes) and metadata:
        try:
            metadata = loads_exact(metadata)
        except ValueError:
            raise check.fail("metadata", "is text that is not JSON", "pass a dict") from None
    recorded = check.instant("recorded_at", fields.get("recorded_at"), zone) or stamp
    occurred = check.instant("occurred_at", fields.get("occurred_at"), zone) or recorded
    version = fields.get("version")
    record: dict[str, Any] = {
        "event_id": check.event_id(fields.get("event_id")),
        "event_type": check.text("event_type", fields.get("event_type"), required=True),
        "aggregate_type": check.text("aggregate_type", fields["aggregate_type"], required=True),
        "aggregate_id": check.text("aggregate_id", fields["aggregate_id"], required=True),
        "version": None if version is None else check.integer("version", version, minimum=1),
        "recorded_at": recorded,
        "occurred_at": occurred,
        "schema_version": check.integer(
            "schema_version", fields.get("schema_version", 1), minimum=1
        ),
        "data": check.json_object("data", fields.get("data"), required=True),
        "metadata": check.json_object("metadata", metadata, required=False),
    }
    for name in _PROMOTED:
        value = fields.get(name)
        if value is None and isinstance(metadata, Mapping):
            value = next((metadata[k] for k in _METADATA_KEYS[name] if k in metadata), None)
        if isinstance(value, uuid.UUID):
            value = str(value)
        record[name] = check.text(name, value, required=False)
    return record
