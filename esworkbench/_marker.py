"""The store's marker file, store.json: creating a store and refusing what is not one."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Final

import pyarrow as pa
from deltalake import Schema
from deltalake.transaction import create_table_with_add_actions

from esworkbench import _layout
from esworkbench.errors import CorruptStoreError, StoreError

FORMAT: Final = "esworkbench-store"
FORMAT_VERSION: Final = 1
MARKER: Final = "store.json"
DEFAULT_SETTINGS: Final = {"row_group_size": 8192, "compact_file_rows": 1_000_000}


def create(root: Path, schema: pa.Schema) -> None:
    """Creates an empty store in a new or empty directory (safe against a racing creator)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".lock").exists():
        _refuse_strangers(root)  # before the lock file, so a refused directory stays untouched
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if (root / MARKER).exists():
            return
        _refuse_strangers(root)
        create_table_with_add_actions(
            str(root / "events"),
            Schema.from_arrow(schema),
            [],
            mode="error",
            partition_by=[_layout.PARTITION_COLUMN],
            name="events",
            # A checkpoint every 10 commits keeps the log a reader replays short: single appends
            # commit often, and replaying a long tail of JSON commits costs each one 10+ ms.
            configuration={"delta.checkpointInterval": "10"},
        )
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": DEFAULT_SETTINGS}
        temporary = root / f".{MARKER}.tmp"
        temporary.write_text(json.dumps(body, indent=2) + "\n")
        temporary.replace(root / MARKER)


def _refuse_strangers(root: Path) -> None:
    strangers = sorted(p.name for p in root.iterdir() if p.name != ".lock")
    if strangers:
        raise StoreError(
            f"{root} exists and holds {', '.join(strangers[:3])}, but it is not an "
            "esworkbench store (no store.json). Hint: choose an empty or new directory"
        )


def read(marker: Path) -> dict[str, int]:
    """Reads store.json, refusing a foreign file or a newer format version."""
    try:
        body = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(
            f"{marker} cannot be read as JSON: {exc}. Hint: restore it from a backup"
        ) from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise StoreError(f"{marker} does not describe an esworkbench store")
    version = body.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"store {marker.parent} has format version {version!r}; this esworkbench reads up "
            f"to {FORMAT_VERSION}. Hint: upgrade esworkbench to open it"
        )
    settings = dict(DEFAULT_SETTINGS)
    settings.update(body.get("settings") or {})
    return settings
