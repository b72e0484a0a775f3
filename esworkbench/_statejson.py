"""How a snapshot stores a state: JSON text that gives back exactly the value that went in.

Plain JSON where JSON is exact (dicts with string keys, lists, strings, ints, bools, null), so the
``snapshots`` table stays readable from SQL (``json_extract(state, '$.balance')``). Numbers with
a fraction are plain JSON numbers of the fold's kind: ``Decimal`` for a fold with
``decimals=True`` (an integral one is written ``15E0``, which reads back as ``Decimal("15")``,
not as an int), ``float`` otherwise; the other kind is tagged. Everything else JSON cannot hold
exactly is tagged as ``{"$esw": <tag>, "v": <value>}``: tuples, sets, frozensets, datetimes (with
their zone), dates, times, timedeltas, UUIDs, bytes, dicts with non-string keys (or a ``"$esw"``
key of their own), and the numbers above. Any other type is refused with a clear error.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from json.encoder import encode_basestring as _quote_text
from typing import Any, Final
from zoneinfo import ZoneInfo

import pyarrow as pa

from esworkbench.errors import EsWorkbenchError
from esworkbench.events import TIMESTAMP

__all__ = ["SNAPSHOT_SCHEMA", "StateError", "dumps_state", "loads_state"]

SNAPSHOT_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("aggregate_type", pa.string(), nullable=False),
        pa.field("aggregate_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("taken_at", TIMESTAMP, nullable=False),
        pa.field("fold_key", pa.string(), nullable=False),
        pa.field("accumulators", pa.string()),
    ]
)
"""The snapshots table: a state at a version of a stream, keyed by the fold that made it.

``accumulators`` holds the running values of a fold's declared fields (an exact sum, the exact
value a min or max compares), which the state alone may not show exactly; null without them.
"""

TAG: Final = "$esw"


class StateError(EsWorkbenchError):
    """A state cannot be stored as a snapshot exactly, or a stored one cannot be read.

    Examples:
        >>> StateError("the state holds a Money at .wallet", hint="use dicts").hint
        'use dicts'
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message}. Hint: {hint}")
        self.what = message
        self.hint = hint


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: \\u escapes keep it, UTF-8 cannot
        return json.dumps(value)
    return _quote_text(value)


def _tag(name: str, payload: str) -> str:
    return f'{{"{TAG}":"{name}","v":{payload}}}'


class _Encoder:
    def __init__(self, decimals: bool) -> None:
        self.decimals = decimals

    def encode(self, value: Any, path: str) -> str:
        kind = type(value)
        if value is None or kind is bool:
            return "null" if value is None else "true" if value else "false"
        if kind is int:
            return str(value)
        if kind is str:
            return _text(value)
        if kind is float:
            if math.isfinite(value) and not self.decimals:
                return repr(value)
            return _tag("float", f'"{value!r}"')
        if kind is Decimal:
            text = str(value)
            if not value.is_finite() or not self.decimals:
                return _tag("decimal", f'"{text}"')
            # A number without fraction or exponent reads back as an int: E0 keeps it a Decimal.
            return text if "." in text or "E" in text else f"{text}E0"
        if kind is dict:
            if all(type(k) is str for k in value) and TAG not in value:
                members = (f"{_text(k)}:{self.encode(v, f'{path}.{k}')}" for k, v in value.items())
                return "{" + ",".join(members) + "}"
            pairs = (
                f"[{self.encode(k, f'{path}[{k!r}]')},{self.encode(v, f'{path}[{k!r}]')}]"
                for k, v in value.items()
            )
            return _tag("dict", "[" + ",".join(pairs) + "]")
        if kind in (list, tuple, set, frozenset):
            items = (
                "[" + ",".join(self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
            )
            return items if kind is list else _tag(kind.__name__, items)
        if kind is datetime:
            return self._datetime(value, path)
        if kind is date:
            return _tag("date", f'"{value.isoformat()}"')
        if kind is time:
            if value.tzinfo is not None and type(value.tzinfo) is not timezone:
                raise _refuse(value, path, "a time with a zone other than a fixed offset")
            fold = f',"fold":{value.fold}' if value.fold else ""
            return f'{{"{TAG}":"time","v":"{value.isoformat()}"{fold}}}'
        if kind is timedelta:
            return _tag("timedelta", f"[{value.days},{value.seconds},{value.microseconds}]")
        if kind is uuid.UUID:
            return _tag("uuid", f'"{value}"')
        if kind is bytes:
            return _tag("bytes", f'"{base64.b64encode(value).decode()}"')
        raise _refuse(value, path, f"a {kind.__name__}")

    def _datetime(self, value: datetime, path: str) -> str:
        zone = value.tzinfo
        extra = f',"fold":{value.fold}' if value.fold else ""
        if isinstance(zone, ZoneInfo):
            extra += f',"tz":{_text(zone.key)}'
            value = value.replace(tzinfo=None)
        elif zone is not None and type(zone) is not timezone:
            raise _refuse(value, path, f"a datetime with a {type(zone).__name__} zone")
        return f'{{"{TAG}":"datetime","v":"{value.isoformat()}"{extra}}}'


def _refuse(value: object, path: str, what: str) -> StateError:
    return StateError(
        f"the state holds {what} at {path or 'the top'} ({value!r:.60}), which a snapshot "
        "cannot store exactly",
        hint="keep states to dicts, lists, tuples, sets, str, int, float, Decimal, bool, None, "
        "datetime, date, time, timedelta, UUID and bytes (a time or datetime zone: a fixed "
        "offset or a ZoneInfo); or replay without snapshots",
    )


def dumps_state(value: Any, *, decimals: bool) -> str:
    """Encodes a state as JSON text that :func:`loads_state` turns back into the same value.

    Raises:
        StateError: when the state holds a value that cannot round-trip (names where).

    Examples:
        >>> from decimal import Decimal
        >>> dumps_state({"balance": Decimal("10.10"), "tags": ("a",)}, decimals=True)
        '{"balance":10.10,"tags":{"$esw":"tuple","v":["a"]}}'
    """
    return _Encoder(decimals).encode(value, "")


def _decoded(item: dict[str, Any]) -> Any:
    if TAG not in item:
        return item
    name = item[TAG]
    value: Any = item.get("v")
    if name == "float":
        return float(value)
    if name == "decimal":
        return Decimal(value)
    if name == "dict":
        return dict(value)
    if name in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[name](value)
    if name == "datetime":
        moment = datetime.fromisoformat(value)
        if "tz" in item:
            moment = moment.replace(tzinfo=ZoneInfo(item["tz"]))
        return moment.replace(fold=item.get("fold", 0))
    if name == "date":
        return date.fromisoformat(value)
    if name == "time":
        return time.fromisoformat(value).replace(fold=item.get("fold", 0))
    if name == "timedelta":
        return timedelta(days=value[0], seconds=value[1], microseconds=value[2])
    if name == "uuid":
        return uuid.UUID(value)
    if name == "bytes":
        return base64.b64decode(value)
    raise StateError(
        f"a snapshot state holds an unknown tag {name!r}",
        hint="the snapshots table was written by something else; take the snapshots again",
    )


def _constant(name: str) -> Any:
    raise StateError(
        f"a snapshot state holds {name}, which JSON cannot hold",
        hint="the snapshots table was written by something else; take the snapshots again",
    )


def loads_state(text: str, *, decimals: bool) -> Any:
    """Decodes a state written by :func:`dumps_state` (or any JSON text).

    Raises:
        StateError: when the text is not a state.

    Examples:
        >>> loads_state('{"at":{"$esw":"date","v":"2024-03-01"},"n":1.5}', decimals=False)
        {'at': datetime.date(2024, 3, 1), 'n': 1.5}
    """
    try:
        return json.loads(
            text,
            parse_float=Decimal if decimals else float,
            parse_constant=_constant,
            object_hook=_decoded,
        )
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(
            f"a snapshot state cannot be read: {exc}",
            hint="the snapshots table is damaged or was written by something else; delete "
            "the snapshots directory and take them again",
        ) from exc
