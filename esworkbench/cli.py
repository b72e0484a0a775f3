"""The ``esw`` command line: it parses arguments, calls the library and prints.

A library error (:class:`~esworkbench.EsWorkbenchError`) becomes one red line on stderr,
``Error: <message>``, and exit code 1; bad usage exits with 2, as click does.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing, suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final, Literal

import click
import duckdb
import pyarrow as pa

from esworkbench import __version__
from esworkbench._cli_replay import asof_command, replay_command
from esworkbench._output import FORMATS, Format, write
from esworkbench.attach import AttachedLake, attach
from esworkbench.errors import EsWorkbenchError, InvalidEventError
from esworkbench.query import translate
from esworkbench.stats import store_info
from esworkbench.store import Store, open_store

__all__ = ["main"]

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


def _open(path: Path, *, create: bool = False) -> Store:
    """Opens an existing store (a typo in the path is an error, not a new store), or with
    ``create`` a new one."""
    store = open_store(path, create=create)
    store.sql("SET enable_progress_bar = false")  # DuckDB would draw it on stdout
    return store


def _open_or_create(path: Path) -> Store:
    """Opens a store, creating it when ``path`` does not exist yet or is an empty directory (an
    import fills a new store); a directory holding anything else is an error."""
    new = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    store = _open(path, create=new)
    if new:
        click.echo(f"Initialised store at {store.path}", err=True)
    return store


def _open_readable(path: Path) -> Store | AttachedLake:
    """A store, or else a foreign lake attached read-only (a Delta table or Parquet files)."""
    if (path / "store.json").exists() or not (path.exists() or glob.has_magic(str(path))):
        return _open(path)
    lake = attach(path)
    lake.sql("SET enable_progress_bar = false")
    return lake


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

    STORE may also be a foreign lake, attached read-only: a Delta table, a directory of
    hive-partitioned Parquet or a glob of Parquet files, with columns named as in a store.

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
    with closing(_open_readable(store_path)) as store:
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
                    write(reader, output_format, out)
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


@main.command("import")
@_STORE
@click.argument("source")
@click.option(
    "--format",
    "source_format",
    type=click.Choice(["common", "eventsourcing", "marten"]),
    default="common",
    show_default=True,
)
@click.option(
    "--on-error", type=click.Choice(["fail", "quarantine"]), default="fail", show_default=True
)
@click.option(
    "--table",
    help="events table (common), application (eventsourcing), schema (marten); "
    "schema.name for a schema",
)
@click.option("--tz", help="IANA zone for naive timestamps in the source")
@click.option("--default-aggregate-type", help="marten: the type of streams stored without one")
def import_(
    store_path: Path,
    source: str,
    source_format: Literal["common", "eventsourcing", "marten"],
    on_error: Literal["fail", "quarantine"],
    table: str | None,
    tz: str | None,
    default_aggregate_type: str | None,
) -> None:
    """Import SOURCE (a file, postgresql:// or sqlite:/// URL) into STORE, past its checkpoint.

    STORE is created when it does not exist yet (or is an empty directory).

    \f
    Examples:
        >>> import json, tempfile, pathlib
        >>> from click.testing import CliRunner
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "e.jsonl").write_text(json.dumps({"eventType": "Opened",
        ...     "aggregateId": "a", "aggregateType": "Account", "data": {}}) + "\\n")
        >>> args = ["import", str(folder / "s"), str(folder / "e.jsonl")]
        >>> print(CliRunner().invoke(main, args).stdout, end="")
        Imported 1 event (source positions up to 1)
    """
    from esworkbench.sources import import_events

    with closing(_open_or_create(store_path)) as store:
        result = import_events(
            store,
            source,
            format=source_format,
            on_error=on_error,
            table=table,
            tz=tz,
            default_aggregate_type=default_aggregate_type,
        )
    text = f"Imported {_plural(result.imported, 'event')}"
    if result.last_position is not None:
        text += f" (source positions up to {result.last_position})"
    click.echo(text)
    if result.quarantined:
        click.echo(
            f"Quarantined {_plural(result.quarantined, 'bad row')} in {result.quarantine_path}",
            err=True,
        )
    if result.unsettled_after is not None:
        click.echo(
            f"Left the rows past source position {result.unsettled_after} for the next run: a "
            "transaction that may still write before them is in progress",
            err=True,
        )


@main.command()
@_STORE
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--where", help="a SQL condition on the events, e.g. \"aggregate_type = 'Order'\"")
@click.option("--param", "params", multiple=True, help="a value for a ? in --where (repeatable)")
@click.option("--type", "aggregate_types", multiple=True, help="only this aggregate_type")
def export(
    store_path: Path,
    dest: Path,
    where: str | None,
    params: tuple[str, ...],
    aggregate_types: tuple[str, ...],
) -> None:
    """Export STORE's events to DEST (.jsonl[.gz|.zst], .parquet or .csv), in position order.

    \f
    Examples:
        >>> import tempfile, pathlib
        >>> from click.testing import CliRunner
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = CliRunner().invoke(main, ["demo", str(folder / "s"), "--events", "100"])
        >>> args = ["export", str(folder / "s"), str(folder / "out.jsonl"), "--type", "Order"]
        >>> CliRunner().invoke(main, args).output.startswith("Exported ")
        True
    """
    from esworkbench.sources import export_csv, export_jsonl, export_parquet

    suffixes = [x.lower() for x in dest.suffixes]
    writer: Callable[..., int] = export_jsonl
    if ".parquet" in suffixes:
        writer = export_parquet
    elif ".csv" in suffixes:
        writer = export_csv
    with closing(_open(store_path)) as store:
        written = writer(
            store,
            dest,
            where=where,
            params=list(params) or None,
            aggregate_types=list(aggregate_types) or None,
        )
    click.echo(f"Exported {_plural(written, 'event')} to {dest}")


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


main.add_command(replay_command)
main.add_command(asof_command)

# click turns the commands into objects that doctest does not search; their examples still run.
__test__ = {name: command.callback for name, command in {"esw": main, **main.commands}.items()}
