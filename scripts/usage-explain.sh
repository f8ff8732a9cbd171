#!/usr/bin/env bash
# Measures the usage sampler's one query (src/pg/usage.rs, USAGE_SQL) on
# N synthetic tenants (default 10,000), each a schema with two tables (a
# primary key, a secondary index, a toastable column: 8 relations with
# the sequence and toast), no sessions: EXPLAIN (ANALYZE, BUFFERS), 3 runs.
# Run inside scripts/with-postgres.sh: bash scripts/with-postgres.sh bash scripts/usage-explain.sh [N]
set -euo pipefail
N=${1:-10000}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
PSQL=("$BIN/psql" "$TEST_PG_SUPERUSER_URL" -v ON_ERROR_STOP=1 -q)
"${PSQL[@]}" -c "CREATE DATABASE usage_explain"
URL="${TEST_PG_SUPERUSER_URL%/*}/usage_explain"
P=("$BIN/psql" "$URL" -v ON_ERROR_STOP=1 -q)
"${P[@]}" <<SQL
CREATE SCHEMA tenancy;
CREATE TABLE tenancy.tenants (uid text PRIMARY KEY, name text NOT NULL UNIQUE, schema_name text NOT NULL UNIQUE);
INSERT INTO tenancy.tenants SELECT 'u' || i, 't' || i, 'tenant_t' || i FROM generate_series(1, $N) i;
SQL
# Schemas and tables in batches of 500 (one transaction each).
for ((s = 1; s <= N; s += 500)); do
  e=$((s + 499 < N ? s + 499 : N))
  "${P[@]}" -c "DO \$\$ BEGIN FOR i IN $s..$e LOOP
    EXECUTE format('CREATE SCHEMA tenant_t%s; CREATE TABLE tenant_t%s.items (id serial PRIMARY KEY, v text); CREATE INDEX ON tenant_t%s.items (v);
                    CREATE TABLE tenant_t%s.events (id bigint PRIMARY KEY, at timestamptz); INSERT INTO tenant_t%s.items (v) VALUES (''x'')', i, i, i, i, i);
  END LOOP; END \$\$"
done
SQL_TEXT=$(python3 - <<'PY'
import re
src = open("src/pg/usage.rs").read()
q = re.search(r'pub const USAGE_SQL: &str = r#"(.*?)"#;', src, re.S).group(1)
none = re.search(r'const NO_STATEMENTS_SQL: &str = "(.*?)";', src, re.S).group(1)
print(q.replace("{statements}", none).replace("$1", "''").replace("$2", "15000"))
PY
)
"${P[@]}" -c "VACUUM ANALYZE" >/dev/null
"${P[@]}" -c "SELECT count(*) AS relations FROM pg_class WHERE relnamespace IN (SELECT oid FROM pg_namespace WHERE nspname LIKE 'tenant\_%')"
for run in 1 2 3; do
  "${P[@]}" -c "EXPLAIN (ANALYZE, BUFFERS) $SQL_TEXT" | grep -E "Execution Time|Planning Time|Seq Scan on pg_class"
done
