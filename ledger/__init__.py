"""The event store: event types, serialization, append, ordered reads and the hash chain."""
