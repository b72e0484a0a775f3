"""The ``esw`` command line: it parses arguments, calls the library and prints.

A library error (:class:`~esworkbench.EsWorkbenchError`) becomes one red line on stderr,
``Error: <message>``, and exit code 1; bad usage exits with 2, as click does.
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final, Literal

import click
import duckdb
import pyarrow as pa

from esworkbench import __version__
from esworkbench.errors import EsWorkbenchError, InvalidEventError
from esworkbench.events import dumps_json
from esworkbench.query import translate
from esworkbench.stats import store_info
from esworkbench.store import Store, open_store

__all__ = ["main"]

Format = Literal["table", "csv", "json", "jsonl", "parquet"]
FORMATS: Final[tuple[Format, ...]] = ("table", "csv", "json", "jsonl", "parquet")
_STORE: Final = click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))


class _Failure(click.ClickException):
    """An error for the user: one red line on stderr, exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        message = " ".join(line.strip() for line in self.format_message().splitlines())
        click.secho(f"Error: {message}", file=file, err=file is None, fg="red")


class _Commands(click.Group):
    """The ``esw`` group: turns library errors into :class:`_Failure` at the boundary."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EsWorkbenchError as exc:
            raise _Failure(str(exc)) from exc


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="esw")
def main() -> None:
    """esw: event stores as Delta Lake tables, queried with DuckDB.

    \f
    Examples:
        >>> from click.testing import CliRunner
        >>> CliRunner().invoke(main, ["--version"]).output.startswith("esw, version ")
        True
    """


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def init(directory: Path) -> None:
    """Create an empty store in DIRECTORY (new or empty).

    \f
    Examples:
        >>> import tempfile
        >>> from click.testing import CliRunner
        >>> result = CliRunner().invoke(main, ["init", tempfile.mkdtemp() + "/bank"])
        >>> result.output.startswith("Initialised store at "), result.exit_code
        (True, 0)
    """
    with suppress(EsWorkbenchError), closing(open_store(directory, create=False)) as store:
        click.echo(f"Store already initialised at {store.path}")
        return
    # Not a store yet: creating it says why when the directory cannot become one.
    with closing(open_store(directory)) as store:
        click.echo(f"Initialised store at {store.path}")


def _open(path: Path) -> Store:
    """Opens an existing store: a typo in the path is an error, not a new store."""
    store = open_store(path, create=False)
    store.sql("SET enable_progress_bar = false")  # DuckDB would draw it on stdout
    return store


def _read_events(lines: Iterable[bytes]) -> tuple[list[dict[str, Any]], list[int]]:
    """Parses JSON Lines; returns the events and the line number of each."""
    events: list[dict[str, Any]] = []
    numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line, parse_float=Decimal)  # amounts stay exact
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bad bytes
            where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise _Failure(
                f"line {number} of stdin is not JSON: {getattr(exc, 'msg', exc)}{where}. "
                "Hint: give one JSON object per line (JSON Lines)"
            ) from None
        if not isinstance(event, dict):
            raise _Failure(
                f"line {number} of stdin is a JSON {type(event).__name__}, not an object. "
                "Hint: give one event object per line"
            )
        events.append(event)
        numbers.append(number)
    return events, numbers


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@main.command()
@_STORE
def append(store_path: Path) -> None:
    """Append events read as JSON Lines from stdin to STORE, in one commit.

    Each line is one event in the common camelCase shape or in snake_case, naming its
    aggregateId and aggregateType; versions, when given, must continue each stream.

    \f
    Examples:
        >>> import tempfile
        >>> from click.testing import CliRunner
        >>> store = tempfile.mkdtemp() + "/bank"
        >>> _ = CliRunner().invoke(main, ["init", store])
        >>> line = '{"aggregateId": "a-1", "aggregateType": "Account", "eventType": "Opened"'
        >>> line += ', "data": {}}'
        >>> print(CliRunner().invoke(main, ["append", store], input=line).output, end="")
        Appended 1 event to 1 stream (position 1)
    """
    events, numbers = _read_events(click.open_file("-", "rb"))
    with closing(_open(store_path)) as store:
        try:
            result = store.append_batch(events)
        except InvalidEventError as exc:
            if exc.index is None or not 0 <= exc.index < len(numbers):
                raise
            raise _Failure(f"line {numbers[exc.index]} of stdin: {exc}") from exc
    if not result.events:
        click.echo("Appended 0 events")
        return
    first, last = result.first_position, result.last_position
    where = f"position {first}" if first == last else f"positions {first}-{last}"
    click.echo(
        f"Appended {_plural(result.events, 'event')} to "
        f"{_plural(result.streams, 'stream')} ({where})"
    )


def _plain(value: object) -> object:
    """A value of an Arrow row as a JSON value: instants as ISO 8601 text, bytes as base64."""
    if value is None or isinstance(value, str | int | Decimal):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | clock_time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)


def _column(column: pa.Array) -> list[Any]:
    """A column as JSON values; the common types skip the per-value dispatch of _plain."""
    kind, values = column.type, column.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return list(values)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        return [None if v is None else v.isoformat() for v in values]
    return [_plain(v) for v in values]


def _encoder(schema: pa.Schema) -> Callable[[object], str]:
    """JSON encoding; the slower exact one only where a Decimal may appear."""
    if any(pa.types.is_decimal(t) or pa.types.is_nested(t) for t in schema.types):
        return dumps_json
    return functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


def _cells(column: pa.Array, encode: Callable[[object], str], null: str) -> list[str]:
    """A column as text cells: text as it is, other values as JSON, nulls as ``null``."""
    return [null if v is None else v if isinstance(v, str) else encode(v) for v in _column(column)]


def _write_table(reader: pa.RecordBatchReader, out: IO[str]) -> None:
    table = reader.read_all()
    encode, names = _encoder(table.schema), table.column_names
    cells = [[c.replace("\n", "\\n") for c in _cells(col, encode, "NULL")] for col in table.columns]
    kinds, pat = table.schema.types, pa.types
    numeric = [pat.is_integer(k) or pat.is_floating(k) or pat.is_decimal(k) for k in kinds]
    widths = [
        max([len(name), *map(len, column)]) for name, column in zip(names, cells, strict=True)
    ]

    def line(row: Iterable[str]) -> str:
        padded = (
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(row, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip() + "\n"

    out.write(line(names))
    out.write(line("-" * w for w in widths))
    out.writelines(line(row) for row in zip(*cells, strict=True))
    out.write(f"({_plural(table.num_rows, 'row')})\n")


def _write(reader: pa.RecordBatchReader, output_format: Format, out: IO[str]) -> None:
    if output_format == "table":
        _write_table(reader, out)
        return
    names, encode = reader.schema.names, _encoder(reader.schema)
    if output_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for batch in reader:
            writer.writerows(zip(*(_cells(c, encode, "") for c in batch.columns), strict=True))
        return
    lines = (
        encode(dict(zip(names, row, strict=True)))
        for batch in reader
        for row in zip(*map(_column, batch.columns), strict=True)
    )
    if output_format == "jsonl":
        out.writelines(f"{line}\n" for line in lines)
    else:
        out.write("[")
        out.writelines(f"{',' if i else ''}\n{line}" for i, line in enumerate(lines))
        out.write("\n]\n")


@main.command()
@_STORE
@click.argument("query")
@click.option("--param", "params", multiple=True, metavar="VALUE", help="A value for a ? (repeat).")
@click.option(
    "--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE.")
def sql(
    store_path: Path,
    query: str,
    params: tuple[str, ...],
    output_format: Format,
    output: Path | None,
) -> None:
    """Run QUERY over the views events and streams of STORE and print the rows.

    Values travel as --param, bound to the ?s in order; DuckDB casts each to the type the
    query needs. --format parquet writes to --output; other formats print or write there.

    \f
    Examples:
        >>> import json, tempfile
        >>> from click.testing import CliRunner
        >>> store = tempfile.mkdtemp() + "/bank"
        >>> _ = CliRunner().invoke(main, ["init", store])
        >>> result = CliRunner().invoke(
        ...     main, ["sql", store, "select ?::int + 1 as n", "--param", "41", "--format", "json"]
        ... )
        >>> json.loads(result.stdout)
        [{'n': 42}]
    """
    if output_format == "parquet" and output is None:
        raise click.UsageError("--format parquet writes a file: add --output FILE")
    with closing(_open(store_path)) as store:
        relation = store.sql(query, list(params))
        try:
            reader = relation.to_arrow_reader()
            if output_format == "parquet":
                import pyarrow.parquet as pq

                with pq.ParquetWriter(str(output), reader.schema) as writer:
                    for batch in reader:
                        writer.write_batch(batch)
            else:
                with click.open_file(str(output or "-"), "w", encoding="utf-8") as out:
                    _write(reader, output_format, out)
        except duckdb.Error as exc:  # DuckDB runs a relation lazily: some errors come late
            raise translate(exc, query) from exc
        except OSError as exc:
            if output is None:
                raise  # stdout closed early (esw sql ... | head): click exits quietly
            raise _Failure(f"cannot write {output}: {exc}") from exc
    if output is not None:
        click.echo(f"Wrote {output_format} to {output}", err=True)


@main.command()
@_STORE
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
def info(store_path: Path, output_format: Literal["text", "json"]) -> None:
    """Show what STORE holds: events, streams, aggregate types, time range, files, size.

    \f
    Examples:
        >>> import json, tempfile
        >>> from click.testing import CliRunner
        >>> store = tempfile.mkdtemp() + "/bank"
        >>> _ = CliRunner().invoke(main, ["init", store])
        >>> result = CliRunner().invoke(main, ["info", store, "--format", "json"])
        >>> json.loads(result.stdout)["events"]
        0
    """
    with closing(_open(store_path)) as store:
        profile = store_info(store)
    click.echo(json.dumps(profile.to_dict(), indent=2) if output_format == "json" else profile)


@dataclass(frozen=True, slots=True)
class _Progress:
    """Passes each batch on to the store and moves a progress bar by its rows."""

    store: Store
    bar: Any  # a tqdm bar

    def append_batch(self, table: pa.Table) -> object:
        result = self.store.append_batch(table)
        self.bar.update(table.num_rows)
        return result


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--events", type=click.IntRange(min=0), default=10_000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def demo(directory: Path, events: int, seed: int) -> None:
    """Write a generated bank and order-fulfilment history into a new store, then compact it.

    \f
    Examples:
        >>> import tempfile
        >>> from click.testing import CliRunner
        >>> store = tempfile.mkdtemp() + "/demo"
        >>> result = CliRunner().invoke(main, ["demo", store, "--events", "500"])
        >>> result.stdout.startswith("Wrote 500 events to ")
        True
    """
    from tqdm.auto import tqdm

    from esworkbench.demo import write_demo

    started = time.perf_counter()
    with closing(open_store(directory)) as store:
        if held := store.head_position():
            raise _Failure(
                f"{store.path} already holds {_plural(held, 'event')}. "
                "Hint: write the demo into a new or empty directory"
            )
        with tqdm(total=events, unit="event", unit_scale=True, desc="demo", file=sys.stderr) as bar:
            written = write_demo(_Progress(store, bar), events, seed=seed)
        # One sorted file run per aggregate type: stream reads then touch one row group or two.
        store.compact()
    seconds = time.perf_counter() - started
    click.echo(f"Wrote {_plural(written, 'event')} to {store.path} in {seconds:.1f}s")


# click turns the commands into objects that doctest does not search; their examples still run.
__test__ = {name: command.callback for name, command in {"esw": main, **main.commands}.items()}
