"""Upcasters: old payload shapes brought up to date on read, one schema_version at a time.

An upcaster is registered for ``(event_type, schema_version)`` and returns the new data, or a pair
``(new_event_type, new_data)``. Reading an event of schema_version 1 with steps for 1 and 2 runs
the step for 1 (the event is then at 2), then the step for 2, and so on while a step exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from esworkbench.errors import EsWorkbenchError

__all__ = ["UpcastError", "Upcasters"]

Step = Callable[[Any], Any]


class UpcastError(EsWorkbenchError):
    """An upcaster raised or returned something it should not (names the event and step)."""


class Upcasters:
    """A registry of upcasting steps, keyed by (event_type, from schema_version).

    Examples:
        >>> up = Upcasters()
        >>> up.add("MoneyDeposited", 1, lambda data: {"amount": data["amt"]})
        >>> up.upcast("MoneyDeposited", 1, {"amt": 5})
        ('MoneyDeposited', 2, {'amount': 5})
    """

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Step] = {}

    def __bool__(self) -> bool:
        return bool(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, event_type: str, from_version: int, step: Step) -> None:
        """Registers the step that takes ``event_type`` from ``from_version`` to the next."""
        if not isinstance(event_type, str) or not event_type:
            raise EsWorkbenchError(f"event_type must be a non-empty string, got {event_type!r}")
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise EsWorkbenchError(f"from_version must be an integer >= 1, got {from_version!r}")
        if not callable(step):
            raise EsWorkbenchError(f"the upcaster for {event_type} v{from_version} is not callable")
        key = (event_type, from_version)
        if key in self._steps:
            raise EsWorkbenchError(
                f"an upcaster for {event_type} schema_version {from_version} is already "
                "registered. Hint: one step per (event_type, schema_version)"
            )
        self._steps[key] = step

    def register(self, event_type: str, from_version: int) -> Callable[[Step], Step]:
        """A decorator form of :meth:`add`.

        Examples:
            >>> up = Upcasters()
            >>> @up.register("MoneyDeposited", 1)
            ... def amount(data):
            ...     return {"amount": data["amt"]}
            >>> len(up)
            1
        """

        def decorate(step: Step) -> Step:
            self.add(event_type, from_version, step)
            return step

        return decorate

    def touches(self, event_type: str, schema_version: int) -> bool:
        """Whether an event of this type and schema_version has a step to run."""
        return (event_type, schema_version) in self._steps

    def upcast(
        self, event_type: str, schema_version: int, data: Any, *, where: object = None
    ) -> tuple[str, int, Any]:
        """Runs the steps one at a time; returns (event_type, schema_version, data)."""
        while (step := self._steps.get((event_type, schema_version))) is not None:
            try:
                result = step(data)
            except Exception as exc:
                raise UpcastError(
                    f"the upcaster for {event_type} schema_version {schema_version} raised "
                    f"{type(exc).__name__}: {exc}"
                    + (f" on {where!r}" if where else "")
                    + ". Hint: Upcasters.dry_run shows every event it fails on"
                ) from exc
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
                event_type, data = result
            else:
                data = result
            schema_version += 1
        return event_type, schema_version, data

    @property
    def identity(self) -> str:
        """A digest of the registered steps' code: keys snapshots together with the fold's."""
        from esworkbench.aggregates import _code_identity

        parts = sorted((k, _code_identity(v)) for k, v in self._steps.items())
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
