"""Folds of the demo's bank accounts (see :mod:`esworkbench.demo`), ready for replay.

Examples:
    >>> import tempfile, esworkbench as esw
    >>> from esworkbench.demo import write_demo
    >>> store = esw.open_store(tempfile.mkdtemp())
    >>> _ = write_demo(store, 3000, seed=1)
    >>> esw.replay(store, ACCOUNT, "acc-00000001")["status"]
    'open'
    >>> by_sql = esw.as_of(store, ACCOUNT_SUMMARY)
    >>> len(by_sql) == len(esw.as_of(store, ACCOUNT))
    True
"""

from __future__ import annotations

from typing import Any, Final

from esworkbench.aggregates import Aggregate, count, first_at, last, last_at, status, total
from esworkbench.engine import Event

__all__ = ["ACCOUNT", "ACCOUNT_SUMMARY"]


def _opened(state: dict[str, Any], event: Event) -> dict[str, Any]:
    data = event.data
    opening = data.get("openingBalance", 0)
    return {
        **state,
        "owner": data["owner"],
        "currency": data["currency"],
        "balance": opening,
        "status": "open",
    }


def _deposited(state: dict[str, Any], event: Event) -> dict[str, Any]:
    data = event.data  # schema_version 1 says "amt", 2 says "amount"
    amount = data["amount"] if "amount" in data else data["amt"]
    return {**state, "balance": state["balance"] + amount, "moves": state["moves"] + 1}


def _withdrawn(state: dict[str, Any], event: Event) -> dict[str, Any]:
    return {
        **state,
        "balance": state["balance"] - event.data["amount"],
        "moves": state["moves"] + 1,
    }


ACCOUNT: Final = Aggregate(
    "Account",
    initial={"owner": None, "currency": None, "balance": 0, "status": None, "moves": 0},
    on={
        "AccountOpened": _opened,
        "MoneyDeposited": _deposited,
        "MoneyWithdrawn": _withdrawn,
        "AccountFrozen": lambda state, _: {**state, "status": "frozen"},
        "AccountUnfrozen": lambda state, _: {**state, "status": "open"},
        "AccountClosed": lambda state, _: {**state, "status": "closed"},
    },
    decimals=True,
)
"""The demo's bank account as a Python fold: exact balances from every deposit and withdrawal."""

ACCOUNT_SUMMARY: Final = Aggregate(
    "Account",
    fields={
        "owner": last("owner"),
        "currency": last("currency"),
        "balance": last("balanceAfter"),
        "deposits": count(types="MoneyDeposited"),
        "withdrawn": total("amount", types="MoneyWithdrawn"),
        "status": status(
            {
                "AccountOpened": "open",
                "AccountFrozen": "frozen",
                "AccountUnfrozen": "open",
                "AccountClosed": "closed",
            }
        ),
        "opened_at": first_at(),
        "last_activity": last_at(),
    },
    decimals=True,
)
"""The demo's bank account as a declared fold: every piece compiles to SQL.

``balance`` is the last ``balanceAfter`` an event carried (schema_version 1 deposits carry none).
"""
