#!/bin/sh
# The official postgres image's start contract, for deploy/docker/postgres.Dockerfile: on an empty data
# directory, initdb with POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256 over the network) and create
# POSTGRES_DB; then run the server as the postgres user with the given arguments.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
if [ "${1:-postgres}" = postgres ]; then
  shift || true
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi
shift
run_as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown -R postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "error: POSTGRES_PASSWORD is not set" >&2; exit 1; }
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  chmod 600 "$pwfile"
  run_as_pg initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  if [ "$db" != postgres ]; then
    # the init-time server is invisible: no TCP, its socket in a private directory
    sockdir=$(mktemp -d)
    chown postgres "$sockdir"
    run_as_pg pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=$sockdir" -w start >/dev/null
    run_as_pg psql -h "$sockdir" -v ON_ERROR_STOP=1 -U "$user" -d postgres -q -c "CREATE DATABASE \"$db\" OWNER \"$user\"" >/dev/null
    run_as_pg pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    rmdir "$sockdir"
  fi
  echo "postgres: initialised $PGDATA (user $user, database $db)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
