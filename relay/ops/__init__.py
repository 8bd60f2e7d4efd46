"""Operations: Prometheus metrics fed by the log's events (.metrics), and the serve-time
components that watch the resolver and publish gauges (.components).

May import: the base, relay.dns, relay.store.
"""
