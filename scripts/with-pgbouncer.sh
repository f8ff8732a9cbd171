#!/usr/bin/env bash
# Runs a command with a private PgBouncer in transaction pooling mode in
# front of the Postgres that scripts/with-postgres.sh started: a free
# loopback port, as a non-root user, stopped when the command ends.
#
# Authentication: SCRAM-SHA-256 against Postgres through auth_query. A
# login `pgbouncer_auth` may call one SECURITY DEFINER function,
# pgbouncer.get_auth(name), which returns the SCRAM verifier of a
# non-superuser LOGIN role (never a superuser's); it is created in
# template1 (PgBouncer 1.18 runs auth_query in the client's database, and
# the tests make a database each) and in the postgres database. PgBouncer
# then logs in to Postgres with the client's own SCRAM keys, so no
# plaintext password is stored anywhere.
#
# Any database name is routed (the `*` entry) with a pool of
# PGBOUNCER_POOL_SIZE (default 5) server connections per database and user.
#
# Needs: TEST_PG_SUPERUSER_URL, TEST_PG_PORT, TEST_PG_DIR (with-postgres.sh).
# Exports: TEST_PGBOUNCER_PORT, TEST_PGBOUNCER_POOL_SIZE, TEST_PGBOUNCER_LOG.
set -euo pipefail

: "${TEST_PG_SUPERUSER_URL:?run under scripts/with-postgres.sh}"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[[ -x "$PGBOUNCER" ]] || { echo "with-pgbouncer: pgbouncer not found; run scripts/setup.sh" >&2; exit 1; }
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)

POOL=${PGBOUNCER_POOL_SIZE:-5}
DIR=$(mktemp -d /tmp/tenant-pgbouncer.XXXXXX)
chmod 755 "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
AUTHPW=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

for db in template1 postgres; do
  "$BIN/psql" "${TEST_PG_SUPERUSER_URL%/*}/$db" -v ON_ERROR_STOP=1 -q <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbouncer_auth') THEN
    CREATE ROLE pgbouncer_auth LOGIN;
  END IF;
END \$\$;
ALTER ROLE pgbouncer_auth PASSWORD '$AUTHPW';
CREATE SCHEMA IF NOT EXISTS pgbouncer;
REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO pgbouncer_auth;
CREATE OR REPLACE FUNCTION pgbouncer.get_auth(p_usename text) RETURNS TABLE (usename name, passwd text)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
  \$f\$ SELECT s.usename, s.passwd FROM pg_shadow s WHERE s.usename = p_usename AND NOT s.usesuper \$f\$;
REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth;
SQL
done
# Databases made before this (none under the test command) lack the function.

cat >"$DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$TEST_PG_PORT pool_size=$POOL

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
logfile = $DIR/pgbouncer.log
pidfile = $DIR/pgbouncer.pid
auth_type = scram-sha-256
auth_file = $DIR/userlist.txt
auth_user = pgbouncer_auth
auth_query = SELECT usename, passwd FROM pgbouncer.get_auth(\$1)
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 900
max_db_connections = 0
; sqlx sends extra_float_digits; libpq clients may send options.
ignore_startup_parameters = extra_float_digits,options
; After every transaction (not only at session end): DISCARD ALL drops
; what application code may have left at session level (SET without LOCAL,
; SET ROLE, prepared statements, temp tables, advisory locks), so nothing
; reaches the next client even when code bypasses the library
; (docs/data-path.md). It also lets sqlx run with its statement cache off.
server_reset_query = DISCARD ALL
server_reset_query_always = 1
server_lifetime = 600
server_idle_timeout = 600
INI
echo "\"pgbouncer_auth\" \"$AUTHPW\"" >"$DIR/userlist.txt"
chmod 600 "$DIR/userlist.txt"

if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DIR" --shell /bin/bash postgres
  chown -R postgres "$DIR"
  RUNUSER=$(command -v runuser || echo /usr/sbin/runuser)
  as_pgb() { "$RUNUSER" -u postgres -- "$@"; }
else
  as_pgb() { "$@"; }
fi

as_pgb "$PGBOUNCER" -d "$DIR/pgbouncer.ini" >"$DIR/start.log" 2>&1 || { cat "$DIR/start.log" "$DIR/pgbouncer.log" >&2 2>/dev/null; exit 1; }

cleanup() {
  if [[ -f "$DIR/pgbouncer.pid" ]]; then kill "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || true; fi
  sleep 0.2
  [[ -n "${KEEP_PGBOUNCER:-}" ]] || rm -rf "$DIR"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  python3 - "$PORT" <<'PY' 2>/dev/null && break
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
PY
  sleep 0.1
done

export TEST_PGBOUNCER_PORT=$PORT TEST_PGBOUNCER_POOL_SIZE=$POOL TEST_PGBOUNCER_LOG=$DIR/pgbouncer.log
echo "with-pgbouncer: PgBouncer $("$PGBOUNCER" --version | head -n1 | awk '{print $2}') (transaction pooling, $POOL server connections per database and user) on 127.0.0.1:$PORT" >&2
set +e
"$@"
rc=$?
exit $rc
