#!/bin/sh
# Entrypoint of the PostgreSQL image of the `cluster` profile (postgres.Dockerfile,
# docs/deploy.md#several-nodes). Runs as the user postgres (uid 10026).
#
# 1. Refuses to start without DANE_RELAY_DB_PASSWORD (the password of the role `relay`),
#    saying exactly what to set.
# 2. An empty data folder (PGDATA, the named volume) gets a new cluster: initdb, UTF-8,
#    data checksums, SCRAM for every connection over the network.
# 3. On every start, on a private socket no relay can reach: the role `relay` (LOGIN,
#    nothing more) with the password of DANE_RELAY_DB_PASSWORD, and its database `relay`.
#    Changing the password in .env and running `up -d` again changes it here too.
# 4. PostgreSQL itself, as PID 1 (STOPSIGNAL SIGINT: a fast shutdown), with
#    /etc/postgresql/dane-relay/postgresql.conf (listen on the compose network,
#    synchronous_commit = on) and pg_hba.conf (`relay` from the compose network, SCRAM).
#    Extra arguments (the compose file's `command`) go to postgres, e.g. -c work_mem=8MB.
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
CONF=${DANE_RELAY_PG_CONF:-/etc/postgresql/dane-relay/postgresql.conf}
MIN_LENGTH=12

say() { printf 'dane-relay-postgres: %s\n' "$*" >&2; }
refuse() { say "$*"; exit 1; }

password=${DANE_RELAY_DB_PASSWORD:-}
if [ -z "$password" ]; then
    refuse "DANE_RELAY_DB_PASSWORD is not set: it is the password the relay nodes" \
        "log in with (role relay, database relay). Put a line" \
        "DANE_RELAY_DB_PASSWORD=<at least $MIN_LENGTH characters, e.g. the output of" \
        "openssl rand -hex 24> into the file .env beside docker-compose.yml, then run" \
        "docker-compose --profile cluster up -d again (docs/deploy.md#several-nodes)."
fi
if [ "${#password}" -lt "$MIN_LENGTH" ]; then
    refuse "DANE_RELAY_DB_PASSWORD is ${#password} characters long: give it at least" \
        "$MIN_LENGTH (e.g. the output of openssl rand -hex 24) in the file .env beside" \
        "docker-compose.yml, then run docker-compose --profile cluster up -d again."
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -e "$PGDATA" ] && [ ! -w "$PGDATA" ]; then
        refuse "$PGDATA is not writable by uid $(id -u): use the compose file's named" \
            "volume, or chown -R $(id -u):$(id -g) the folder mounted there."
    fi
    if [ -n "$(ls -A "$PGDATA" 2>/dev/null)" ]; then
        refuse "$PGDATA is not empty but holds no PostgreSQL data (no PG_VERSION):" \
            "mount an empty volume there, or the data folder of a PostgreSQL 15."
    fi
    say "initializing a new PostgreSQL data folder in $PGDATA"
    initdb --pgdata="$PGDATA" --username=postgres --auth-local=peer \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 --data-checksums \
        >/dev/null
fi

# The set-up server listens on a socket in a folder of its own: the health check
# (pg_isready on /run/postgresql) fails and no relay node connects until it is done.
setup=$(mktemp -d)
trap 'pg_ctl --pgdata="$PGDATA" --mode=immediate --silent stop 2>/dev/null; rm -rf "$setup"' EXIT
pg_ctl --pgdata="$PGDATA" --wait --timeout=300 --silent \
    --options="-c config_file=$CONF -c listen_addresses='' -c unix_socket_directories=$setup" \
    start
# The password reaches the server inside the SQL text over the socket (never on a
# command line); password_encryption = scram-sha-256 stores only its SCRAM verifier.
psql --no-psqlrc --quiet --host="$setup" --username=postgres --dbname=postgres \
    --set=ON_ERROR_STOP=1 <<'SQL'
\getenv password DANE_RELAY_DB_PASSWORD
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'relay') AS new_role \gset
\if :new_role
CREATE ROLE relay;
\endif
ALTER ROLE relay WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = 'relay') AS new_db \gset
\if :new_db
CREATE DATABASE relay OWNER relay;
\endif
SQL
pg_ctl --pgdata="$PGDATA" --mode=fast --wait --timeout=300 --silent stop
trap - EXIT
rmdir "$setup"
say "role relay and database relay are ready; starting PostgreSQL"

unset password DANE_RELAY_DB_PASSWORD
exec postgres -D "$PGDATA" -c config_file="$CONF" "$@"
