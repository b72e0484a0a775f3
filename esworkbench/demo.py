"""A deterministic generator of a realistic event-sourced history, for demos and benchmarks.

Two domains share one global time order. Amounts are JSON numbers with exactly two decimals
(``json.loads(text, parse_float=Decimal)`` reads them exactly).

Bank, aggregate_type ``Account`` (``acc-00000001``):

- ``AccountOpened {"owner","currency"[,"openingBalance"]}``, ``AccountFrozen {"reason"}``,
  ``AccountUnfrozen {}``, ``AccountClosed {}`` (at balance 0 only; nothing follows it).
- ``MoneyWithdrawn {"amount","balanceAfter"}``, never overdrawing; nothing moves while frozen.
- ``MoneyDeposited``: schema_version 1 ``{"amt"}`` in the first third of the history, then
  schema_version 2 ``{"amount","balanceAfter"}``. balanceAfter is the exact running sum of
  openingBalance, deposits and withdrawals. About 1% of deposits are back-dated (occurred_at
  hours to days before recorded_at); every other event has occurred_at == recorded_at.
- Skewed streams: most accounts get a handful of events; accounts 1-50 are picked Zipf-like and
  the hottest collect thousands.

Order fulfilment saga over ``Order`` (``ord-*``), ``Inventory`` (``inv-<city>-<section>``),
``Payment`` (``pay-*``):
``OrderPlaced {"customerId","items":[{"sku","qty","unitPrice"}],"amount","currency"}``
-> ``StockReserved {"orderId","items"}`` -> ``PaymentAuthorized {"orderId","amount","currency"}``
-> ``OrderConfirmed {}`` -> ``OrderShipped {"carrier","trackingNumber"}``. Compensations:
``StockReservationFailed`` -> ``OrderCancelled {"reason"}``; ``PaymentFailed`` ->
``StockReleased`` -> ``OrderCancelled``; a customer cancelling a confirmed order ->
``StockReleased`` -> ``PaymentRefunded``. About 4% of sagas stop midway forever.

A root event (every bank event, every ``OrderPlaced``) has correlation_id == its own event_id and
a null causation_id; later saga events share the saga's correlation_id and name the saga's
previous event as causation_id. user_id is ``user-<n>`` for customers' actions and ``system``
for saga steps and freezes. The metadata JSON repeats the three as ``correlationId``,
``causationId`` (absent when null) and ``userId``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from heapq import heappop, heappush
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError
from esworkbench.events import EVENT_SCHEMA

__all__ = ["SupportsAppendBatch", "generate", "write_demo"]

_CHUNK: Final = 16_384  # draws happen per chunk of this size, so batch_size never changes them
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DEFAULT_START: Final = datetime(2024, 1, 1, tzinfo=UTC)
_MEAN_GAP_US: Final = 2_000_000.0  # about 2 s between events: 1M events span about 23 days

_EVENT_TYPES: Final = (
    ("AccountOpened", "Account"), ("MoneyDeposited", "Account"), ("MoneyWithdrawn", "Account"),
    ("AccountFrozen", "Account"), ("AccountUnfrozen", "Account"), ("AccountClosed", "Account"),
    ("OrderPlaced", "Order"), ("OrderConfirmed", "Order"), ("OrderShipped", "Order"),
    ("OrderCancelled", "Order"), ("StockReserved", "Inventory"),
    ("StockReservationFailed", "Inventory"), ("StockReleased", "Inventory"),
    ("PaymentAuthorized", "Payment"), ("PaymentFailed", "Payment"), ("PaymentRefunded", "Payment"),
)  # fmt: skip
(OPENED, DEPOSITED, WITHDRAWN, FROZEN_EV, UNFROZEN, CLOSED_EV, PLACED, CONFIRMED, SHIPPED,
 CANCELLED, RESERVED, NO_STOCK, RELEASED, AUTHORIZED, PAY_FAILED, REFUNDED) = range(16)  # fmt: skip
_AGGREGATE_TYPES: Final = ("Account", "Order", "Inventory", "Payment")
_AGGREGATE_OF: Final = np.array([_AGGREGATE_TYPES.index(a) for _, a in _EVENT_TYPES], np.int8)
_TYPE_NAMES: Final = pa.array([name for name, _ in _EVENT_TYPES], pa.string())
_AGGREGATE_NAMES: Final = pa.array(_AGGREGATE_TYPES, pa.string())

OPEN, FROZEN, CLOSING, CLOSED = range(4)  # account status
RESERVE, PAY, CONFIRM, SHIP, CUSTOMER_CANCEL, RELEASE, CANCEL, REFUND = range(8)  # saga steps
K_ORDER, K_OPEN, K_HOT, K_RECENT = range(4)  # what a fresh slot does

P_ORDER: Final = 0.15  # fresh slots placing an order (a saga adds about 4 more events later)
P_OPEN, P_HOT = 0.08, 0.04  # of account slots: open an account, pick a hot one (else a recent one)
HOT: Final = 50  # accounts 1..50 are the hot streams, picked Zipf-like; they are never closed
MEAN_RECENT: Final = 50  # other picks fall geometrically on the most recently opened accounts
P_FREEZE, P_CLOSE, P_DEPOSIT = 0.01, 0.025, 0.55  # cumulative thresholds of the account action
P_BACKDATE: Final = 0.01
P_STUCK, P_NO_STOCK, P_PAY_FAIL, P_CUSTOMER_CANCEL = 0.01, 0.03, 0.08, 0.05
SHIP_DELAY_FACTOR: Final = 50  # shipping waits ~50x longer than the other saga steps
_HOT_WEIGHTS: Final = 1 / np.arange(1, HOT + 1) ** 1.1
_HOT_CDF: Final = np.cumsum(_HOT_WEIGHTS) / _HOT_WEIGHTS.sum()

_FIRST = ("Ann", "Ben", "Chloé", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Karin", "Liam", "Mei", "Noah", "Olga", "Pavel")  # fmt: skip
_LAST = ("Smith", "Müller", "García", "Rossi", "Kowalski", "Dubois", "Tanaka", "Silva",
         "Jensen", "Novak", "Byrne", "Larsen", "Costa", "Weber", "Khan", "Ivanova")  # fmt: skip
_CURRENCY = ("EUR",) * 12 + ("USD",) * 5 + ("GBP",) * 2 + ("CHF",)
_FREEZE_REASONS = ("suspected fraud", "KYC review", "court order", "customer request")
_PAY_FAIL_REASONS = ("card declined", "insufficient funds", "fraud suspected", "card expired")
_CARRIERS = ("DHL", "UPS", "GLS", "FedEx")
_WAREHOUSES = ("inv-berlin", "inv-paris", "inv-madrid", "inv-milan", "inv-warsaw", "inv-dublin")
_WAREHOUSE_PICK = (0,) * 6 + (1,) * 4 + (2,) * 3 + (3, 4, 5)
_SECTIONS: Final = 32  # each warehouse keeps its stock in sections, one stream each
_N_SKU: Final = 1024
_HEX: Final = np.frombuffer("".join(f"{b:02x}" for b in range(256)).encode(), np.uint16)
# Bytes 0..31 are the hex digits of a UUID (two per uint16 above), byte 32 is "-".
_UUID_LAYOUT: Final = np.r_[0:8, 32, 8:12, 32, 12:16, 32, 16:20, 32, 20:32]


class SupportsAppendBatch(Protocol):
    """Anything that commits an Arrow table of events, such as the store."""

    def append_batch(self, table: pa.Table, /) -> object:
        """Commits ``table`` (rows in :data:`~esworkbench.events.EVENT_SCHEMA`) as one batch."""


_Row = tuple[int, str, int, str, str]  # event type code, aggregate_id, version, data, user_id


@dataclass(slots=True)
class _Saga:
    """One order on its way through fulfilment; forgotten when it ends or gets stuck."""

    order_id: str
    user: str
    corr: int  # global index of the OrderPlaced event
    last: int  # global index of the saga's latest event
    warehouse: int  # the stock section: warehouse * _SECTIONS + section
    amount: str  # '"amount":12.30,"currency":"EUR"'
    stock: str  # the items as JSON, without prices
    order_version: int = 1
    paid: bool = False
    reason: str = ""


def _splitmix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uuid_bytes(key: npt.NDArray[np.uint64], index: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Version-4 UUID text, 36 bytes a row, for each global event index.

    splitmix64 is a bijection, so distinct indexes get distinct ids, and any event's id can be
    computed again later (a causation_id names an event of an earlier chunk).
    """
    n, idx = len(index), index.astype(np.uint64)
    raw = np.empty((n, 2), ">u8")
    raw[:, 0], raw[:, 1] = _splitmix(idx ^ key[0]), _splitmix(idx ^ key[1])
    b = raw.view(np.uint8).reshape(n, 16)
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40  # version 4
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    pairs = np.empty((n, 17), np.uint16)
    pairs[:, :16], pairs[:, 16] = _HEX[b], ord("-")
    text: npt.NDArray[np.uint8] = np.take(pairs.view(np.uint8), _UUID_LAYOUT, axis=1)
    return text  # np.take keeps rows contiguous; pairs[:, layout] would not


def _strings(text: npt.NDArray[np.uint8], valid: npt.NDArray[np.bool_] | None = None) -> Any:
    """An Arrow string array over rows of fixed-width text, without copying."""
    n, width = text.shape
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    bitmap = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(text)]
    return pa.Array.from_buffers(pa.string(), n, buffers)


class _History:
    """The simulation: per-stream state only, advanced one chunk of events at a time."""

    def __init__(self, events: int, seed: int, start: datetime) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
        self.key = np.random.SeedSequence([seed, 1]).generate_state(2, np.uint64).astype(np.uint64)
        prices = np.random.default_rng([seed, 2]).lognormal(2.5, 1.0, _N_SKU) * 100 + 99
        # an order line is (sku, qty 1..4), numbered sku * 4 + qty - 1; its texts are made once
        lines = [(f"SKU-{k:04d}", q, int(p)) for k, p in enumerate(prices) for q in range(1, 5)]
        self.line_total = [q * p for _, q, p in lines]
        self.line_stock = [f'{{"sku":"{sku}","qty":{q}}}' for sku, q, _ in lines]
        self.line_item = [
            f'{{"sku":"{k}","qty":{q},"unitPrice":{p / 100:.2f}}}' for k, q, p in lines
        ]
        self.cutover = events // 3  # deposits before this index use schema_version 1
        self.clock = (start - _EPOCH) // timedelta(microseconds=1)
        self.accounts: list[str] = []
        self.owners: list[str] = []  # user_id of each account's owner
        self.versions: list[int] = []
        self.balances: list[int] = []  # in cents
        self.status: list[int] = []
        self.stock_versions = [0] * (len(_WAREHOUSES) * _SECTIONS)
        self.orders = 0
        self.heap: list[tuple[int, int, int, _Saga]] = []  # (due index, tiebreak, step, saga)

    def _draws(self) -> tuple[Any, ...]:
        """One chunk of random draws, mostly as small ints that cost nothing to list."""
        rng, size = self.rng, _CHUNK
        gaps = rng.exponential(_MEAN_GAP_US, size).astype(np.int64)
        u_kind, u_target, u_action, u_extra = rng.random((4, size))
        # u_target falls in one of three bands (open, hot, recent); where it falls inside its
        # band is the uniform draw that picks the account (Zipf for hot, geometric for recent).
        account_kind = np.searchsorted([P_OPEN, P_OPEN + P_HOT], u_target, side="right") + K_OPEN
        kind = np.where(u_kind < P_ORDER, K_ORDER, account_kind)
        hot = np.searchsorted(_HOT_CDF, (u_target - P_OPEN) / P_HOT).clip(0, HOT - 1)
        v = ((u_target - P_OPEN - P_HOT) / (1 - P_OPEN - P_HOT)).clip(0, 1 - 1e-9)
        recent = np.log1p(-v) / np.log1p(-1 / MEAN_RECENT)
        target = np.where(kind == K_HOT, hot, recent.astype(np.int64))
        amount = (np.minimum(rng.lognormal(3.5, 1.2, size), 50_000) * 100 + 1).astype(np.int64)
        backdate = rng.integers(3_600_000_000, 3 * 86_400_000_000, size)
        delay = np.where(u_extra < P_STUCK, 0, rng.geometric(1 / 30, size))  # 0: saga gets stuck
        bits = rng.integers(0, 1 << 62, size, dtype=np.int64)
        backdated = u_extra < P_BACKDATE  # deposits only, so u_extra never decides both
        lists = (kind, target, u_action, amount, delay, bits)
        return gaps, backdate, backdated, *(x.tolist() for x in lists)

    def chunk(self, first: int, n: int) -> pa.Table:
        """Generates the events with global indexes first .. first + n - 1."""
        gaps, backdate, backdated, kind, target, action, amount, delay, bits = self._draws()
        # Column lists, not a list of row tuples: millions of live tuples would wake the GC.
        codes: list[int] = []
        ids: list[str] = []
        vers: list[int] = []
        datas: list[str] = []
        users: list[str] = []
        rows: list[int] = []  # the rows of caused events, with their correlation and causation
        corrs: list[int] = []
        causes: list[int] = []
        status, heap, accounts = self.status, self.heap, self.accounts
        for j in range(n):
            i, nxt = first + j, -1
            if heap and heap[0][0] <= i:
                _, _, step, s = heappop(heap)
                rows.append(j)
                corrs.append(s.corr)
                causes.append(s.last)
                s.last = i
                et, agg, ver, data, user, nxt = self._saga_step(step, s, action[j], bits[j])
            elif (k := kind[j]) == K_ORDER:
                s, data = self._place_order(i, bits[j], len(accounts))
                et, agg, ver, user, nxt = PLACED, s.order_id, 1, s.user, RESERVE
            else:
                a = -1
                if k != K_OPEN and accounts:
                    na = len(accounts)
                    a = target[j] % na if k == K_HOT else na - 1 - target[j] % na
                    a = -1 if status[a] == CLOSED else a
                if a < 0:
                    et, agg, ver, data, user = self._open_account(bits[j], amount[j])
                else:
                    et, agg, ver, data, user = self._account(i, a, action[j], amount[j], bits[j])
            if nxt >= 0 and (d := delay[j]):
                heappush(heap, (i + (d * SHIP_DELAY_FACTOR if nxt == SHIP else d), i, nxt, s))
            codes.append(et)
            ids.append(agg)
            vers.append(ver)
            datas.append(data)
            users.append(user)
        columns, caused = (codes, ids, vers, datas, users), (rows, corrs, causes)
        return self._table(first, columns, caused, gaps[:n], np.where(backdated, backdate, 0)[:n])

    def _account(self, i: int, a: int, ra: float, amount: int, b: int) -> _Row:
        """The next event of account number ``a`` (0-based), which is not closed."""
        status, balances, bal = self.status, self.balances, self.balances[a]
        agg, user, ver = self.accounts[a], self.owners[a], self.versions[a] + 1
        self.versions[a] = ver
        if status[a] == FROZEN:  # nothing moves while frozen
            status[a] = OPEN
            return UNFROZEN, agg, ver, "{}", "system"
        if ra < P_FREEZE and status[a] == OPEN:
            status[a] = FROZEN
            return FROZEN_EV, agg, ver, f'{{"reason":"{_FREEZE_REASONS[b & 3]}"}}', "system"
        if status[a] == CLOSING or (ra < P_CLOSE and a >= HOT and not bal):
            status[a] = CLOSED
            return CLOSED_EV, agg, ver, "{}", user
        if ra < P_CLOSE and a >= HOT:  # paid out first, so that the account closes at 0
            status[a], balances[a] = CLOSING, 0
            return WITHDRAWN, agg, ver, f'{{"amount":{bal / 100:.2f},"balanceAfter":0.00}}', user
        if ra < P_DEPOSIT or not bal:
            et, balances[a] = DEPOSITED, bal + amount
            if i < self.cutover:
                return et, agg, ver, f'{{"amt":{amount / 100:.2f}}}', user  # schema_version 1
        else:
            amount = amount if amount <= bal else amount % bal + 1  # never overdraw
            et, balances[a] = WITHDRAWN, bal - amount
        # cents / 100 prints exactly with .2f: its error is far below 0.005
        data = f'{{"amount":{amount / 100:.2f},"balanceAfter":{balances[a] / 100:.2f}}}'
        return et, agg, ver, data, user

    def _open_account(self, b: int, amount: int) -> _Row:
        """Opens the next account; returns its AccountOpened."""
        a = len(self.accounts) + 1
        agg, user = f"acc-{a:08d}", f"user-{a}"
        name, currency = f"{_FIRST[b & 15]} {_LAST[(b >> 4) & 15]}", _CURRENCY[(b >> 8) % 20]
        opening = amount if (b >> 16) & 1 else 0
        extra = f',"openingBalance":{opening / 100:.2f}' if opening else ""
        self.accounts.append(agg)
        self.owners.append(user)
        self.versions.append(1)
        self.balances.append(opening)
        self.status.append(OPEN)
        return OPENED, agg, 1, f'{{"owner":"{name}","currency":"{currency}"{extra}}}', user

    def _place_order(self, i: int, b: int, customers: int) -> tuple[_Saga, str]:
        """A new saga and the data of its OrderPlaced."""
        self.orders += 1
        items, stock, total = [], [], 0
        for k in range(1 + b % 3):
            x = (b >> (4 + 12 * k)) & 0xFFF
            line = ((x * x) >> 14) * 4 + ((b >> (40 + 3 * k)) & 3)  # low SKUs sell best
            total += self.line_total[line]
            stock.append(self.line_stock[line])
            items.append(self.line_item[line])
        user, currency = f"user-{(b >> 50) % (customers + 100) + 1}", _CURRENCY[(b >> 56) % 20]
        amount = f'"amount":{total / 100:.2f},"currency":"{currency}"'
        oid = f"ord-{self.orders:08d}"
        section = _WAREHOUSE_PICK[(b >> 2) & 15] * _SECTIONS + (b >> 8) % _SECTIONS
        saga = _Saga(oid, user, i, i, section, amount, ",".join(stock))
        data = f'{{"customerId":"{user}","items":[{",".join(items)}],{amount}}}'
        return saga, data

    def _saga_step(
        self, step: int, s: _Saga, ra: float, b: int
    ) -> tuple[int, str, int, str, str, int]:
        """A saga's next event: (type, aggregate_id, version, data, user_id, step after it)."""
        order, user, nxt = f'"orderId":"{s.order_id}"', "system", -1
        if step in (RESERVE, RELEASE):
            agg = f"{_WAREHOUSES[s.warehouse // _SECTIONS]}-{s.warehouse % _SECTIONS:02d}"
            ver = self.stock_versions[s.warehouse] = self.stock_versions[s.warehouse] + 1
            if step == RELEASE:
                et, data = RELEASED, f'{{{order},"items":[{s.stock}]}}'
                nxt = REFUND if s.paid else CANCEL
            elif ra < P_NO_STOCK:
                et, data, nxt = NO_STOCK, f'{{{order},"reason":"insufficient stock"}}', CANCEL
                s.reason = "out of stock"
            else:
                et, data, nxt = RESERVED, f'{{{order},"items":[{s.stock}]}}', PAY
        elif step in (PAY, REFUND):
            agg, ver = "pay-" + s.order_id[4:], 1 if step == PAY else 2
            if step == REFUND:
                et, data = REFUNDED, f"{{{order},{s.amount}}}"
            elif ra < P_PAY_FAIL:
                et, nxt, s.reason = PAY_FAILED, RELEASE, "payment failed"
                data = f'{{{order},{s.amount},"reason":"{_PAY_FAIL_REASONS[b & 3]}"}}'
            else:
                et, data, nxt, s.paid = AUTHORIZED, f"{{{order},{s.amount}}}", CONFIRM, True
        else:
            agg = s.order_id
            ver = s.order_version = s.order_version + 1
            if step == CONFIRM:
                et, data = CONFIRMED, "{}"
                nxt = CUSTOMER_CANCEL if ra < P_CUSTOMER_CANCEL else SHIP
            elif step == SHIP:
                carrier = _CARRIERS[b & 3]
                et, data = SHIPPED, f'{{"carrier":"{carrier}","trackingNumber":"{b >> 20:013d}"}}'
            elif step == CUSTOMER_CANCEL:
                et, data, user, nxt = CANCELLED, '{"reason":"customer request"}', s.user, RELEASE
            else:
                et, data = CANCELLED, f'{{"reason":"{s.reason}"}}'
        return et, agg, ver, data, user, nxt

    def _table(
        self,
        first: int,
        columns: tuple[list[int], list[str], list[int], list[str], list[str]],
        caused: tuple[list[int], list[int], list[int]],
        gaps: npt.NDArray[np.int64],
        backdate: npt.NDArray[np.int64],
    ) -> pa.Table:
        """The columnar part: ids, instants and metadata, vectorised over the chunk."""
        codes, ids, vers, datas, users = columns
        n, code = len(codes), np.array(codes, np.int8)
        rows, corr, cause = (np.array(c, np.int64) for c in caused)
        index = np.arange(first, first + n, dtype=np.int64)
        own = _uuid_bytes(self.key, index)
        correlation, causation = own.copy(), own.copy()  # roots: correlation_id is the event_id
        correlation[rows] = _uuid_bytes(self.key, corr)
        causation[rows] = _uuid_bytes(self.key, cause)
        has_cause = np.zeros(n, np.bool_)
        has_cause[rows] = True
        correlation_id, causation_id = _strings(correlation), _strings(causation, has_cause)
        user_id = pa.array(users, pa.string())
        cause_part = pc.binary_join_element_wise('","causationId":"', causation_id, "")
        parts = ['{"correlationId":"', correlation_id, cause_part, '","userId":"', user_id, '"}']
        metadata = pc.binary_join_element_wise(*parts, "", null_handling="skip")  # roots skip
        recorded = self.clock + np.cumsum(gaps) - gaps  # the first event is at `start`
        self.clock += int(gaps.sum())
        occurred = recorded - np.where(code == DEPOSITED, backdate, 0)
        time_type = EVENT_SCHEMA.field("recorded_at").type
        deposit_v2 = (code == DEPOSITED) & (index >= self.cutover)
        arrays = [
            pa.array(np.zeros(n, np.int64)),
            _strings(own),
            _TYPE_NAMES.take(code),
            _AGGREGATE_NAMES.take(_AGGREGATE_OF[code]),
            pa.array(ids, pa.string()),
            pa.array(vers, pa.int64()),
            pa.array(recorded, time_type),
            pa.array(occurred, time_type),
            pa.array(np.where(deposit_v2, 2, 1).astype(np.int32)),
            pa.array(datas, pa.string()),
            metadata,
            correlation_id,
            causation_id,
            user_id,
        ]
        return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def generate(
    events: int, *, seed: int = 0, batch_size: int = 200_000, start: datetime | None = None
) -> Iterator[pa.Table]:
    """Generates a history of ``events`` events as Arrow tables in recorded_at order.

    The output depends only on ``(events, seed, start)``: ``batch_size`` only cuts it into
    tables. Rows have ``position`` 0; the store assigns positions at commit, in row order. Memory
    holds per-stream state and one batch, never the history.

    Args:
        events: how many events in total, >= 0.
        seed: seed of the random draws, >= 0.
        batch_size: the most rows in one table.
        start: recorded_at of the first event, tz-aware (default 2024-01-01T00:00:00Z).

    Returns:
        An iterator of tables in :data:`~esworkbench.events.EVENT_SCHEMA`.

    Raises:
        EsWorkbenchError: for a negative count or seed, a batch_size < 1 or a naive start.

    Examples:
        >>> sum(t.num_rows for t in generate(1000, seed=1))
        1000
        >>> row = next(generate(6, seed=1)).to_pylist()[3]
        >>> row["event_type"], row["aggregate_id"], row["version"], row["data"]
        ('MoneyDeposited', 'acc-00000001', 2, '{"amount":24.31,"balanceAfter":24.31}')
    """
    if events < 0 or seed < 0 or batch_size < 1:
        raise EsWorkbenchError(
            f"generate(events={events}, seed={seed}, batch_size={batch_size}) is out of range. "
            "Hint: events and seed must be >= 0 and batch_size >= 1"
        )
    start = _DEFAULT_START if start is None else start
    if start.tzinfo is None or start.utcoffset() is None:
        raise EsWorkbenchError(
            f"start {start.isoformat()} is a naive datetime. Hint: pass datetime(..., tzinfo=UTC)"
        )
    return _batches(_History(events, seed, start), events, batch_size)


def _batches(history: _History, events: int, batch_size: int) -> Iterator[pa.Table]:
    pending: list[pa.Table] = []
    held = 0
    for first in range(0, events, _CHUNK):
        table = history.chunk(first, min(_CHUNK, events - first))
        pending.append(table)
        held += table.num_rows
        while held >= batch_size or (held and first + _CHUNK >= events):
            joined = pa.concat_tables(pending)
            yield joined.slice(0, batch_size)
            rest = joined.slice(batch_size)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows


def write_demo(
    store: SupportsAppendBatch, events: int, *, seed: int = 0, batch_size: int = 200_000
) -> int:
    """Appends a generated history to ``store``, one commit per table of :func:`generate`.

    The history's stream ids start at 1 (``acc-00000001``, ...), so the store should be empty.

    Args:
        store: the store (anything with ``append_batch(table)``).
        events: how many events to write.
        seed: seed of the random draws.
        batch_size: events per commit; a commit costs about the same whatever its size.

    Returns:
        The number of events written.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> write_demo(store, 2500, batch_size=1000)
        2500
        >>> query = "select aggregate_type, count(*) from events group by 1 order by 1"
        >>> store.sql(query).fetchall()
        [('Account', 1430), ('Inventory', 261), ('Order', 579), ('Payment', 230)]
    """
    written = 0
    for table in generate(events, seed=seed, batch_size=batch_size):
        store.append_batch(table)
        written += table.num_rows
    return written
