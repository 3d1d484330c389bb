"""The small store interface the tuner talks to, and its in-memory implementation.

The SQL tuning cache (`autoquant.cache_db`) implements the same protocol; the tuner never knows
which one it holds. Stores keep raw measurements, never winners (DESIGN.md section 1).

>>> from autoquant.keys import OpShape, Timed, BenchKey, Measurement
>>> s = MemoryStore()
>>> k = BenchKey("env", "float", "{}", 1, OpShape(1, 8, 8, False, "float32"), Timed.FULL)
>>> s.put_many(None, {k: Measurement(1e-6, 1e-6, 1e-6, 5)})
>>> s.get_many([k])[k].median_s
1e-06
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Iterable, Mapping, Protocol, runtime_checkable

from .keys import BenchKey, Measurement

if TYPE_CHECKING:
    from .hardware import Environment

__all__ = ["MemoryStore", "SafeStore", "Store"]

log = logging.getLogger("autoquant.tune")  # where the tuner's other cache warnings go


@runtime_checkable
class Store(Protocol):
    """What the tuner needs from a cache."""

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        """The stored measurements among `keys` (missing keys are simply absent), in one query."""
        ...

    def put_many(
        self, env: "Environment | None", items: Mapping[BenchKey, Measurement]
    ) -> None:
        """Upsert `items` in one transaction. `env` describes the environment every key names
        (a SQL store writes its fingerprint row); None is allowed for stores that keep no
        environment table."""
        ...

    def describe(self) -> str:
        """Where the data lives, for logs and the report ('memory', a file path, a URL)."""
        ...

    def measured_ms(self, env_hash: str, k: int, n: int, bias: bool, dtype: str) -> set[int]:
        """Every M with a measurement of the layer shape (K, N, bias, dtype) in `env_hash`, any
        candidate (for ``on_miss="nearest"``)."""
        ...


class MemoryStore:
    """A process-local store: a dict behind a lock. Nothing is written anywhere."""

    def __init__(self) -> None:
        self._rows: dict[BenchKey, Measurement] = {}
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        with self._lock:
            return {k: self._rows[k] for k in keys if k in self._rows}

    def put_many(self, env: "Environment | None", items: Mapping[BenchKey, Measurement]) -> None:
        with self._lock:
            self._rows.update(items)

    def describe(self) -> str:
        return "memory"

    def measured_ms(self, env_hash: str, k: int, n: int, bias: bool, dtype: str) -> set[int]:
        with self._lock:
            return {key.op.m for key in self._rows if key.env_hash == env_hash and
                    (key.op.k, key.op.n, key.op.bias, key.op.dtype) == (k, n, bias, dtype)}

    def __len__(self) -> int:
        return len(self._rows)


class SafeStore:
    """Wraps a store so that a fault in it (locked for long, disk full, server gone) never stops
    tuning: the failure is logged once, and from then on measurements live in memory."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.memory = MemoryStore()
        self.failure: str | None = None

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = f"tuning cache {self.inner.describe()} failed during {what} ({type(exc).__name__}: {exc}); continuing in memory"
            log.warning("%s", self.failure)

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        keys = list(keys)
        found = self.memory.get_many(keys)
        if self.failure is None:
            try:
                found.update(self.inner.get_many([k for k in keys if k not in found]))
            except Exception as exc:  # any store fault: degrade, never abort tuning
                self._fail("lookup", exc)
        return found

    def put_many(self, env: Environment | None, items: Mapping[BenchKey, Measurement]) -> None:
        self.memory.put_many(env, items)
        if self.failure is None:
            try:
                self.inner.put_many(env, items)
            except Exception as exc:  # any store fault: degrade, never abort tuning
                self._fail("write", exc)

    def measured_ms(self, env_hash: str, k: int, n: int, bias: bool, dtype: str) -> set[int]:
        found = self.memory.measured_ms(env_hash, k, n, bias, dtype)
        if self.failure is None:
            try:
                found |= self.inner.measured_ms(env_hash, k, n, bias, dtype)
            except Exception as exc:  # any store fault: degrade, never abort tuning
                self._fail("lookup", exc)
        return found

    def describe(self) -> str:
        return self.inner.describe() + (" (failed; in memory)" if self.failure else "")
