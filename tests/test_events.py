"""The event record: accepted input shapes and one clear error per kind of bad input."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest

import esworkbench as esw
from esworkbench.events import EVENT_SCHEMA, dumps_json, to_records

ACC = {"aggregate_id": "acc-1", "aggregate_type": "Account"}


def one(event: object, **kwargs: object) -> dict[str, object]:
    return to_records([event], **{**ACC, **kwargs})[0]  # type: ignore[arg-type]


def test_common_camel_case_shape_is_accepted() -> None:
    event_id = str(uuid.uuid4())
    record = one(
        {
            "eventId": event_id,
            "eventType": "MoneyDeposited",
            "aggregateId": "acc-1",
            "aggregateType": "Account",
            "version": 2,
            "timestamp": "2024-05-01T12:00:00Z",
            "data": {"amount": 10},
            "metadata": {"correlationId": "c-1", "causationId": "e-0", "userId": "u-7"},
        }
    )
    assert record["event_id"] == event_id
    assert record["version"] == 2
    assert record["recorded_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert record["occurred_at"] == record["recorded_at"]
    assert (record["correlation_id"], record["causation_id"], record["user_id"]) == (
        "c-1",
        "e-0",
        "u-7",
    )
    assert json.loads(str(record["metadata"]))["userId"] == "u-7"


def test_snake_case_shape_and_new_event_agree() -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    snake = one(
        {
            "event_type": "AccountOpened",
            "data": {"owner": "Ann"},
            "recorded_at": at,
            "correlation_id": "c",
        }
    )
    value = one(esw.NewEvent("AccountOpened", {"owner": "Ann"}, recorded_at=at, correlation_id="c"))
    for name in ("event_type", "data", "recorded_at", "occurred_at", "correlation_id"):
        assert snake[name] == value[name]


def test_instants_are_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    record = one(
        {"event_type": "X", "data": {}, "occurred_at": datetime(2024, 1, 1, 2, tzinfo=plus_two)}
    )
    assert record["occurred_at"] == datetime(2024, 1, 1, 0, tzinfo=UTC)


def test_naive_datetime_is_accepted_when_the_zone_is_named() -> None:
    record = one(
        {"event_type": "X", "data": {}, "timestamp": datetime(2024, 7, 1, 12)}, tz="Europe/Berlin"
    )
    assert record["recorded_at"] == datetime(2024, 7, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event", "field", "words"),
    [
        ({"data": {}}, "event_type", "missing"),
        ({"event_type": "X"}, "data", "missing"),
        ({"event_type": 7, "data": {}}, "event_type", "must be a string"),
        (
            {"event_type": "X", "data": {}, "timestamp": datetime(2024, 1, 1)},
            "recorded_at",
            "naive",
        ),
        ({"event_type": "X", "data": {}, "version": 1.5}, "version", "integer"),
        ({"event_type": "X", "data": {}, "version": 2.0}, "version", "integer"),
        ({"event_type": "X", "data": {}, "version": "3"}, "version", "integer"),
        ({"event_type": "X", "data": {}, "version": True}, "version", "integer"),
        ({"event_type": "X", "data": {}, "version": 0}, "version", ">= 1"),
        ({"event_type": "X", "data": [1, 2]}, "data", "JSON object"),
        ({"event_type": "X", "data": "plain words"}, "data", "not JSON"),
        ({"event_type": "X", "data": {"amount": float("nan")}}, "data.amount", "JSON cannot"),
        ({"event_type": "X", "data": {"tags": {1, 2}}}, "data.tags", "JSON cannot"),
        (
            {"event_type": "X", "data": {"at": datetime(2024, 1, 1, tzinfo=UTC)}},
            "data.at",
            "JSON cannot",
        ),
        ({"event_type": "X", "data": {1: "a"}}, "data[1]", "non-string key"),
        ({"event_type": "X", "data": {}, "event_id": "not-a-uuid"}, "event_id", "not a UUID"),
        ({"event_type": "X", "data": {}, "surprise": 1}, "surprise", "not a field"),
        ({"event_type": "X", "data": {}, "timestamp": "yesterday"}, "recorded_at", "ISO 8601"),
    ],
)
def test_each_bad_input_has_its_own_clear_error(
    event: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(esw.InvalidEventError) as caught:
        to_records([{"event_type": "Ok", "data": {}}, event], **ACC)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert caught.value.index == 1
    message = str(caught.value)
    assert "event 1" in message
    assert repr(field) in message
    assert words in message
    assert "Hint:" in message


def test_error_names_the_event_by_its_id() -> None:
    event_id = str(uuid.uuid4())
    with pytest.raises(esw.InvalidEventError, match=event_id):
        to_records([{"eventId": event_id, "eventType": "X", "data": 5}], **ACC)


def test_decimals_stay_exact() -> None:
    assert dumps_json({"a": Decimal("0.10"), "b": [Decimal("1e-30")]}) == '{"a":0.10,"b":[1E-30]}'
    record = one({"event_type": "X", "data": {"amount": Decimal("12345678901234567890.01")}})
    assert record["data"] == '{"amount":12345678901234567890.01}'


def test_unicode_payload_round_trips_as_text() -> None:
    record = one({"event_type": "X", "data": {"name": "Zoë 🚀", "\u00e9": "\u2028"}})
    assert json.loads(str(record["data"])) == {"name": "Zoë 🚀", "\u00e9": "\u2028"}


def test_schema_is_the_canonical_record() -> None:
    assert EVENT_SCHEMA.names[:6] == [
        "position",
        "event_id",
        "event_type",
        "aggregate_type",
        "aggregate_id",
        "version",
    ]
    assert EVENT_SCHEMA.field("recorded_at").type == pa.timestamp("us", tz="UTC")
    assert EVENT_SCHEMA.field("schema_version").type == pa.int32()


def test_json_text_payloads_keep_exact_numbers() -> None:
    record = one({"event_type": "X", "data": '{"amount": 10.10, "big": 12345678901234567890.5}'})
    assert record["data"] == '{"amount":10.10,"big":12345678901234567890.5}'
    with pytest.raises(esw.InvalidEventError, match="not JSON"):
        one({"event_type": "X", "data": '{"amount": NaN}'})
