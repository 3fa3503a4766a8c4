"""The ledger's errors: every failure of the event store surfaces as one of these."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error raised by the ledger."""


class ConcurrencyConflict(LedgerError):
    """Raised when a stream's version differs from the version the writer expected."""

    def __init__(self, stream_id: str, expected: int, actual: int, why: str | None = None) -> None:
        super().__init__(
            why
            or f"stream {stream_id!r} is at version {actual}, but version {expected} was expected"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class SerializationError(LedgerError):
    """Raised when an event or its metadata cannot be turned into canonical JSON, or back."""


class UnknownEventType(SerializationError):
    """Raised when an event type name has no registered class."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"unknown event type {type_name!r}")
        self.type_name = type_name


class InvalidImport(LedgerError):
    """Raised when a bulk import or its file is refused; nothing of it is written."""


class InvalidExport(LedgerError):
    """Raised when an export is asked for with filters that cannot be met (an unknown type)."""


class DatabaseUnavailable(LedgerError):
    """Raised when PostgreSQL cannot be reached or the connection was lost."""


class NoDatabase(LedgerError):
    """The embedded data directory holds no database, and this command does not create one."""


class StorageError(LedgerError):
    """Raised when PostgreSQL rejects a statement for any other reason."""
