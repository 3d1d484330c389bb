"""Errors the tuning cache raises. Both carry a message a user can act on."""

from __future__ import annotations

__all__ = ["CacheImportError", "CacheUnavailableError"]


class CacheUnavailableError(RuntimeError):
    """The cache cannot be used as it is: corrupt, unreadable, read-only, written by a newer
    autoquant, or a server that does not answer. The message names the file (or the URL, password
    masked) and what to do. The file itself is never deleted or overwritten by the code that raises
    this; the tuner carries on with an in-memory store (see ``open_store_or_memory``)."""

    def __init__(self, location: str, problem: str, remedy: str) -> None:
        self.location = location
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"tuning cache {location}: {problem}. {remedy}")


class CacheImportError(ValueError):
    """A JSON-lines record failed validation; nothing from that import was written.

    `line` is 1-based (0 where the problem is not tied to one line, e.g. a missing environment)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        where = f"line {line}: " if line else ""
        super().__init__(f"cannot import tuning cache records: {where}{problem}")
