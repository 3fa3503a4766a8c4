"""The guard's tests run against the live session server of tests/api."""

from tests.api.conftest import accounts, live, live_factory

__all__ = ["accounts", "live", "live_factory"]
