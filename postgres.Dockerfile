# The PostgreSQL of docker-compose.yml's `cluster` profile: one queue shared by two relay
# nodes (docs/deploy.md#several-nodes). Debian's PostgreSQL 15 on the resolver's Debian,
# a database `relay` owned by the role `relay`, whose password the operator sets in
# DANE_RELAY_DB_PASSWORD (deploy/postgres/entrypoint.sh refuses to start without it).
FROM debian:bookworm-20241111-slim

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8

# The user first, with a fixed uid (a bind mount instead of the named volume is chowned
# to 10026); no cluster from the package: the entrypoint makes one on the volume.
RUN groupadd --system --gid 10026 postgres \
 && useradd --system --uid 10026 --gid postgres --home-dir /var/lib/postgresql \
      --shell /bin/sh postgres \
 && mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' \
      > /etc/postgresql-common/createcluster.d/dane-relay.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15=15.* \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p "$PGDATA" /run/postgresql \
 && chown postgres:postgres "$PGDATA" /run/postgresql \
 && chmod 0700 "$PGDATA"

COPY deploy/postgres/postgresql.conf deploy/postgres/pg_hba.conf /etc/postgresql/dane-relay/
COPY deploy/postgres/entrypoint.sh /usr/local/bin/dane-relay-postgres

# The data folder belongs to uid 10026; a new named volume mounted here inherits that.
USER 10026:10026
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432

# Healthy once the server takes connections on its socket (the set-up server of the
# entrypoint listens elsewhere, so a server still being set up is not healthy). As the
# user postgres (peer): a probe as `relay` over the socket would log a refusal each time.
# A short interval: the second relay node waits for this before it starts.
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 \
  CMD ["pg_isready", "--quiet", "--host=/run/postgresql", "--username=postgres", "--dbname=relay"]

# SIGINT is PostgreSQL's fast shutdown (clients disconnected, a clean checkpoint);
# SIGTERM would wait for every client (the relay nodes) to leave first.
STOPSIGNAL SIGINT
ENTRYPOINT ["dane-relay-postgres"]
