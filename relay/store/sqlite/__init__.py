"""The SQLite backend of the queue (the embedded default): relay.store.sqlite.backend."""
