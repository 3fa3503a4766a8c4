"""Persisted projections: inline rows, the catch-up runner, rebuild and the catalogue (SQL)."""
