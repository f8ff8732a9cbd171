#!/usr/bin/env bash
# What a standing admin membership in every tenant's roles costs on
# PostgreSQL 15 (docs/scale.md, "The admin's memberships, lent per
# transaction"): plain psql, one session as a CREATEROLE admin, provisions
# tenants in chunks of 1,000 and prints each chunk's time, with the
# membership kept (MODE=standing) or lent for each tenant's transaction
# (MODE=lent, what the operator does). Private Postgres, fsync on.
#   bash scripts/bench-memberships.sh                    # lent, 5 chunks
#   MODE=standing CHUNKS=4 bash scripts/bench-memberships.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${TEST_PG_ADMIN_URL:-}" ]]; then
  bash scripts/setup.sh >/dev/null
  export PG_EXTRA_OPTS="-c fsync=on -c synchronous_commit=on ${PG_EXTRA_OPTS:-}"
  exec bash scripts/with-postgres.sh bash "$0" "$@"
fi
MODE=${MODE:-lent} CHUNKS=${CHUNKS:-5}
psql "$TEST_PG_SUPERUSER_URL" -qc "CREATE DATABASE bench_members OWNER tenancy_admin"
URL="${TEST_PG_ADMIN_URL%/*}/bench_members"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "mode $MODE: seconds per 1,000 tenants"
for ((k = 0; k < CHUNKS; k++)); do
  python3 - "$MODE" $((k * 1000)) $((k * 1000 + 1000)) > "$WORK/chunk.sql" <<'PY'
import sys
mode, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(start, end):
    s = f"m_{i}"; o, a, p = s + "_owner", s + "_app", s + "_ops"
    keep_app = f" GRANT {a} TO CURRENT_USER;" if mode == "standing" else ""
    give_back = f"RESET ROLE; REVOKE {o} FROM CURRENT_USER;" if mode == "lent" else "RESET ROLE;"
    print(f"""BEGIN;
CREATE ROLE {o} NOLOGIN NOINHERIT; GRANT {o} TO CURRENT_USER;
CREATE ROLE {a} LOGIN NOINHERIT CONNECTION LIMIT 20;{keep_app}
CREATE ROLE {p} LOGIN NOINHERIT CONNECTION LIMIT 4; GRANT {o} TO {p};
CREATE SCHEMA {s} AUTHORIZATION {o};
GRANT USAGE ON SCHEMA {s} TO {a};
ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {a};
GRANT CONNECT ON DATABASE bench_members TO {a}, {p};
ALTER ROLE {a} SET search_path TO {s};
SET LOCAL ROLE {o}; SET LOCAL search_path TO {s};
CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
{give_back}
COMMIT;""")
PY
  start=$(date +%s.%N)
  psql "$URL" -q -v ON_ERROR_STOP=1 -f "$WORK/chunk.sql" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'tenants {$k * 1000:>6} to {($k + 1) * 1000:>6}: {$end - $start:.1f} s')"
done
