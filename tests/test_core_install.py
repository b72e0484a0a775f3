"""The core install (no postgres extra): the quickstart's path runs, the eventsourcing library's
SQLite files import, and a PostgreSQL source is refused with the install hint."""

from __future__ import annotations

import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

SCRIPT = """
import sys
sys.modules["psycopg"] = None  # as if the postgres extra were not installed
sys.modules["adbc_driver_postgresql"] = None
from click.testing import CliRunner
import esworkbench as esw
from esworkbench.cli import main

work, recorded = sys.argv[1], sys.argv[2]
store = work + "/store"
for args in (
    ["demo", store, "--events", "3000", "--seed", "7"],
    ["sql", store, "select count(*) from events"],
    ["replay", store, "--aggregate", "acc-00000001", "--fold", "esworkbench.demo_folds:ACCOUNT"],
):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
imported = esw.open_store(work + "/imported")
print(esw.import_events(imported, "sqlite:///" + recorded, format="eventsourcing").imported)
try:
    esw.import_events(imported, "postgresql://postgres@127.0.0.1:5432/test")
except esw.EsWorkbenchError as exc:
    print(exc)
"""


class Wallet(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner

    @event("Paid")
    def pay(self, amount: Decimal) -> None:
        pass


def test_the_core_install_runs_without_the_postgres_extra(tmp_path: Path) -> None:
    recorded = tmp_path / "recorded.db"
    app = Application[uuid.UUID](
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(recorded)}
    )
    wallet = Wallet("Ann")
    wallet.pay(Decimal("1.10"))
    app.save(wallet)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(recorded)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    count, refusal = done.stdout.strip().splitlines()
    assert count == "2"
    assert "needs the postgres extra" in refusal
    assert "pip install 'esworkbench[postgres]'" in refusal
