#!/usr/bin/env bash
# Runs a command with a private PostgreSQL server: initdb into a temporary
# directory, start on a free loopback port as a non-root user, create the
# operator's admin role (CREATEROLE + pg_signal_backend, NOT superuser),
# export the URLs, run the command, stop and remove the server.
#
# PG_EXTRA_OPTS adds server options (e.g. "-c log_min_duration_statement=5").
#
# Exports: TEST_PG_SUPERUSER_URL, TEST_PG_ADMIN_URL, TEST_PG_PORT,
#          TEST_PG_DIR, TEST_PG_LOG; with PG_ENV_PREFIX=P, P_SUPERUSER_URL,
#          P_ADMIN_URL, ... instead (a second server beside the first, for
#          shards: PG_ENV_PREFIX=TEST_PG2).
set -euo pipefail

BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[[ -x "$BIN/postgres" ]] || { echo "with-postgres: no PostgreSQL server found; run scripts/setup.sh" >&2; exit 1; }

# PG_DATA_PARENT puts the cluster elsewhere (e.g. /dev/shm for benchmarks).
DIR=$(mktemp -d "${PG_DATA_PARENT:-/tmp}/tenant-pg.XXXXXX")
chmod 755 "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SUPERPW=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
ADMINPW=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

# Postgres refuses to run as root: run it as the postgres user (or as
# ourselves when not root).
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DIR" --shell /bin/bash postgres
  chown postgres "$DIR"
  RUNUSER=$(command -v runuser || echo /usr/sbin/runuser)
  as_pg() { "$RUNUSER" -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

echo "$SUPERPW" > "$DIR/pwfile"
[[ $(id -u) -eq 0 ]] && chown postgres "$DIR/pwfile"
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --pwfile="$DIR/pwfile" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
rm -f "$DIR/pwfile"

cleanup() {
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
  [[ -n "${KEEP_PG:-}" ]] || rm -rf "$DIR"
}
trap cleanup EXIT

# pgaudit (read auditing, docs/audit.md), when its library is installed.
# pg_stat_statements (the usage sampler's statement time, where a database
# has the extension; ships with the server package).
LIBS=
[[ -f "$(dirname "$BIN")/lib/pgaudit.so" ]] && LIBS=pgaudit
[[ -f "$(dirname "$BIN")/lib/pg_stat_statements.so" ]] && LIBS=${LIBS:+$LIBS,}pg_stat_statements
PRELOAD=${LIBS:+-c shared_preload_libraries=$LIBS}
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
  -o "$PRELOAD -p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=400 -c wal_level=logical -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c log_statement=ddl -c log_line_prefix='%m [%p] %u@%d ' ${PG_EXTRA_OPTS:-}" \
  start >/dev/null

as_pg "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q <<SQL
CREATE ROLE tenancy_admin LOGIN CREATEROLE PASSWORD '$ADMINPW';
GRANT pg_signal_backend TO tenancy_admin;
SQL

P=${PG_ENV_PREFIX:-TEST_PG}
export "${P}_PORT=$PORT" "${P}_DIR=$DIR" "${P}_LOG=$DIR/postgres.log"
export "${P}_SUPERUSER_URL=postgresql://postgres:$SUPERPW@127.0.0.1:$PORT/postgres"
export "${P}_ADMIN_URL=postgresql://tenancy_admin:$ADMINPW@127.0.0.1:$PORT/postgres"
unset PG_ENV_PREFIX
echo "with-postgres: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (data in $DIR)" >&2
set +e
"$@"
rc=$?
exit $rc
