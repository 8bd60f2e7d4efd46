"""The PostgreSQL backend of the queue (several nodes, one queue): relay.store.pg.backend."""
