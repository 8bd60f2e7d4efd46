"""Operations: Prometheus metrics fed by the log's events (.metrics), the serve-time
components that watch the resolver and publish gauges (.components), the checks behind
`relay health` (.health), and the start-up checks of a deployment: a writable queue
folder, an allowed default gateway (.preflight).

May import: the base, relay.dns, relay.store.
"""
