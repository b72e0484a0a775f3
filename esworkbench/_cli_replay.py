"""``esw replay`` and ``esw asof``: state from the command line, on a store or straight on events.

STORE may be a store, a foreign lake (attached read-only), a JSON / JSON Lines file or a
``postgresql://`` URL of the common schema; files and URLs are imported on the fly into a temporary
store that is removed afterwards. Without ``--fold`` the generic fold (data merged onto the state)
runs. These commands only parse and print: the work is :func:`esworkbench.replay`,
:func:`esworkbench.as_of`, :func:`esworkbench.diff` and :func:`esworkbench.steps`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import msgspec
import pyarrow as pa

from esworkbench._output import FORMATS, Format, write
from esworkbench.aggregates import Aggregate, aggregate, generic
from esworkbench.attach import AttachedLake, attach
from esworkbench.errors import EsWorkbenchError
from esworkbench.store import Store, open_store
from esworkbench.temporal import as_of, instant, read_events, replay

__all__ = ["asof_command", "load_fold", "replay_command"]

_ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


def load_fold(spec: str) -> Aggregate:
    """The fold named by ``module:name`` or ``path/to/file.py:name``.

    The attribute may be an :class:`~esworkbench.Aggregate`, or a class in the class form (see
    :func:`~esworkbench.aggregate`).

    Examples:
        >>> load_fold("esworkbench.demo_folds:ACCOUNT").name
        'Account'
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise EsWorkbenchError(
            f"--fold {spec!r} does not name a fold. Hint: --fold mymodule:account or "
            "--fold folds.py:account"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None or not path.exists():
                raise EsWorkbenchError(f"--fold: no Python file at {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module in the working directory, as python -m would
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EsWorkbenchError(f"--fold {spec!r}: cannot import {module_name}: {exc}") from exc
    found = getattr(module, attribute, None)
    if isinstance(found, type):
        found = aggregate(found)
    if not isinstance(found, Aggregate):
        raise EsWorkbenchError(
            f"--fold {spec!r} is {type(found).__name__}, not an esw.Aggregate. "
            "Hint: point at an esw.Aggregate(...) or a class in the class form"
        )
    return found


@contextmanager
def readable(target: str, table: str | None = None) -> Iterator[Store | AttachedLake]:
    """A store to read: the store itself, an attached lake, or events imported on the fly."""
    path = Path(target)
    if target.startswith(("postgresql://", "postgres://", "sqlite://")) or path.is_file():
        from esworkbench.sources import import_events

        with tempfile.TemporaryDirectory(prefix="esw-replay-") as scratch:
            store = open_store(Path(scratch) / "store")
            try:
                import_events(store, target, table=table)
                yield store
            finally:
                store.close()
        return
    if (path / "store.json").exists() or not path.exists():
        store = open_store(path, create=False)
    else:
        store = attach(path)  # type: ignore[assignment]
    try:
        yield store
    finally:
        store.close()


def _fold_for(source: Store | AttachedLake, fold: str | None, aggregate_id: str) -> Aggregate:
    if fold is not None:
        return load_fold(fold)
    first = source.read_stream(aggregate_id, to_version=1)
    if first.num_rows == 0:
        raise EsWorkbenchError(
            f"stream {aggregate_id!r} has no events. Hint: esw sql STORE "
            '"select aggregate_id from streams" lists the streams'
        )
    return generic(str(first["aggregate_type"][0].as_py()), decimals=True)


def _json(value: Any) -> str:
    return _ENCODER.encode(value).decode()


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal | int | float) or value is None:
        return str(value)
    return _json(value)


def _print_state(aggregate_id: str, kind: str, version: int, state: Any) -> None:
    click.echo(f"{aggregate_id} ({kind}) at version {version}")
    if isinstance(state, dict):
        width = max((len(str(k)) for k in state), default=0)
        for key, value in state.items():
            click.echo(f"  {key!s:<{width}}  {_show(value)}")
    else:
        click.echo(f"  {_show(state)}")


@click.command("replay")
@click.argument("store_path", metavar="STORE")
@click.option("--aggregate", "aggregate_id", required=True, help="the stream (aggregate_id)")
@click.option("--version", "version", type=click.IntRange(min=0), help="fold up to this version")
@click.option("--at", "at", help="fold the events recorded by this instant (ISO, with a zone)")
@click.option(
    "--compare",
    metavar="T2",
    help="print what changed from the state at the end (or --version/--at) to instant T2",
)
@click.option("--fold", help="module:name or file.py:name of an esw.Aggregate (default: generic)")
@click.option("--steps", "show_steps", is_flag=True, help="print every event's step")
@click.option("--pause", is_flag=True, help="with --steps: wait for Enter between steps")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--table", help="with a postgresql:// STORE: the events table (default: events)")
def replay_command(
    store_path: str,
    aggregate_id: str,
    version: int | None,
    at: str | None,
    compare: str | None,
    fold: str | None,
    show_steps: bool,
    pause: bool,
    as_json: bool,
    table: str | None,
) -> None:
    """Fold one stream of STORE and print its state (at its end, --version N or --at T).

    STORE may be a store, a foreign lake, a JSON / JSON Lines file or a postgresql:// URL
    (imported on the fly into a temporary store).

    \f
    Examples:
        >>> import json, pathlib, tempfile
        >>> from click.testing import CliRunner
        >>> from esworkbench.cli import main
        >>> events = tempfile.mkdtemp() + "/events.jsonl"
        >>> _ = pathlib.Path(events).write_text(
        ...     '{"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "Opened",'
        ...     ' "version": 1, "data": {"owner": "Ann"}, "timestamp": "2024-03-01T12:00:00Z"}\\n')
        >>> result = CliRunner().invoke(main, ["replay", events, "--aggregate", "acc-1", "--json"])
        >>> json.loads(result.stdout)["state"]
        {'owner': 'Ann'}
    """
    if version is not None and at is not None:
        raise click.UsageError("--version and --at are two ways to say where to stop: pick one")
    if pause and not show_steps:
        raise click.UsageError("--pause goes with --steps")
    with readable(store_path, table) as source:
        fold_ = _fold_for(source, fold, aggregate_id)
        if show_steps:
            _print_steps(source, fold_, aggregate_id, version, at, pause=pause, as_json=as_json)
            return
        folded = read_events(source, fold_, aggregate_id, version=version, at=at)
        reached = int(folded["version"][-1].as_py()) if folded.num_rows else 0
        if compare is not None:
            from esworkbench.diffs import diff

            # The point compared is the one the state would be printed at: by default the end.
            before: int | str = (
                at if at is not None else (version if version is not None else reached)
            )
            change = diff(source, fold_, aggregate_id, before=before, after=compare)
            if as_json:
                click.echo(
                    _json({k: {"before": o, "after": n} for k, (o, n) in change.changes.items()})
                )
            else:
                click.echo(str(change))
            return
        state = replay(source, fold_, aggregate_id, version=version, at=at)
        if as_json:
            click.echo(
                _json(
                    {
                        "aggregate_id": aggregate_id,
                        "aggregate_type": fold_.name,
                        "version": reached,
                        "state": state,
                    }
                )
            )
        else:
            _print_state(aggregate_id, fold_.name, reached, state)


def _print_steps(
    source: Store | AttachedLake,
    fold: Aggregate,
    aggregate_id: str,
    version: int | None,
    at: str | None,
    *,
    pause: bool,
    as_json: bool,
) -> None:
    from esworkbench.steps import steps

    trace = steps(source, fold, aggregate_id, version=version, at=at)
    interactive = pause and sys.stdin.isatty()
    for step in trace:
        if as_json:
            click.echo(
                _json(
                    {
                        "version": step.event.version,
                        "event_type": step.event.event_type,
                        "changed": {
                            k: {"before": o, "after": n} for k, (o, n) in step.changes.items()
                        },
                        "seconds": step.seconds,
                        "error": step.error,
                    }
                )
            )
            continue
        click.echo(
            f"v{step.event.version} {step.event.event_type}  ({_duration(step.seconds)})"
            + (f"  ERROR {step.error}" if step.error else "")
        )
        for name, (old, new) in step.changes.items():
            click.echo(f"    {name}: {_show(old)} → {_show(new)}")
        if interactive:
            click.prompt("", default="", show_default=False, prompt_suffix="(Enter) ")


def _duration(seconds: float) -> str:
    """A step's time, short: microseconds below a millisecond, then milliseconds, then seconds.

    Examples:
        >>> _duration(0.0000123), _duration(0.0042), _duration(2.5)
        ('12 µs', '4.2 ms', '2.50 s')
    """
    if seconds < 999.5e-6:  # below what rounds to 1000 µs
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 0.99995:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


@click.command("asof")
@click.argument("store_path", metavar="STORE")
@click.option("--type", "aggregate_type", help="the aggregate_type (default: the fold's name)")
@click.option("--at", "at", help="the instant (ISO, with a zone); default: now")
@click.option("--fold", help="module:name or file.py:name of an esw.Aggregate (default: generic)")
@click.option(
    "--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE.")
@click.option("--table", help="with a postgresql:// STORE: the events table (default: events)")
def asof_command(
    store_path: str,
    aggregate_type: str | None,
    at: str | None,
    fold: str | None,
    output_format: Format,
    output: Path | None,
    table: str | None,
) -> None:
    """Every stream of one aggregate type of STORE as of an instant, one row each.

    \f
    Examples:
        >>> import pathlib, tempfile
        >>> from click.testing import CliRunner
        >>> from esworkbench.cli import main
        >>> events = tempfile.mkdtemp() + "/events.jsonl"
        >>> _ = pathlib.Path(events).write_text(
        ...     '{"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "Opened",'
        ...     ' "version": 1, "data": {"owner": "Ann"}, "timestamp": "2024-03-01T12:00:00Z"}\\n')
        >>> print(CliRunner().invoke(main, ["asof", events, "--type", "Account",
        ...                                 "--format", "csv"]).stdout.strip())
        aggregate_id,version,last_event_at,owner
        acc-1,1,2024-03-01T12:00:00+00:00,Ann
    """
    if output_format == "parquet" and output is None:
        raise click.UsageError("--format parquet writes a file: add --output FILE")
    if fold is None and aggregate_type is None:
        raise click.UsageError("name the aggregate type with --type, or a fold with --fold")
    instant(at, "--at")
    with readable(store_path, table) as source:
        fold_ = load_fold(fold) if fold is not None else generic(str(aggregate_type), decimals=True)
        if aggregate_type is not None and aggregate_type != fold_.name:
            raise EsWorkbenchError(
                f"--type {aggregate_type} but the fold is for {fold_.name}. "
                "Hint: leave out --type, or pick the fold of that type"
            )
        frame = as_of(source, fold_, at=at)
        rows = _arrow(frame)
        if output_format == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(rows, str(output))
        else:
            with click.open_file(str(output or "-"), "w", encoding="utf-8") as out:
                write(
                    pa.RecordBatchReader.from_batches(rows.schema, rows.to_batches()),
                    output_format,
                    out,
                )
    if output is not None:
        click.echo(f"Wrote {output_format} to {output}", err=True)


def _arrow(frame: Any) -> pa.Table:
    """A frame as Arrow; a column Arrow cannot type (mixed values) becomes JSON text."""
    columns = {}
    for name in frame.columns:
        values = frame[name]
        try:
            columns[name] = pa.Array.from_pandas(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array(
                [None if v is None else _json(v) for v in values.tolist()], pa.string()
            )
    return pa.table(columns)
