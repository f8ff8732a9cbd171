#!/usr/bin/env bash
# Measures the usage sampler's one query (src/pg/usage.rs, USAGE_SQL) on
# N synthetic tenants (default 10,000), each a schema with two tables (a
# primary key, a secondary index, a toastable column: 8 relations with
# the sequence and toast), no sessions: EXPLAIN (ANALYZE, BUFFERS), 3 runs
# with no sizes known, 3 with the sizes of the sample before known but a
# fortieth's (as the sampler runs it).
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
# The query with no sizes known (every schema's files read), and with the
# sizes of a sample taken just before (nothing was written in between, so
# only the fortieth left out of the known sizes is read again).
query() {
  python3 - "$1" <<'PY'
import re, sys
src = open("src/pg/usage.rs").read()
q = re.search(r'pub const USAGE_SQL: &str = r#"(.*?)"#;', src, re.S).group(1)
none = re.search(r'const NO_STATEMENTS_SQL: &str =\s*"(.*?)";', src, re.S).group(1)
q = q.replace("{statements}", none).replace("$1", "''").replace("$2", "15000")
if sys.argv[1] == "known":
    for n, col in (("$3", "name"), ("$4", "size_key"), ("$5", "bytes")):
        q = q.replace(n, "(SELECT array_agg(%s) FROM usage_known)" % col)
else:
    q = q.replace("$3", "'{}'").replace("$4", "'{}'").replace("$5", "'{}'")
print(q)
PY
}
COLD=$(query none)
KNOWN=$(query known)
"${P[@]}" -c "VACUUM ANALYZE" >/dev/null
"${P[@]}" -c "SELECT count(*) AS relations FROM pg_class WHERE relnamespace IN (SELECT oid FROM pg_namespace WHERE nspname LIKE 'tenant\_%')"
for run in 1 2 3; do
  echo "no sizes known, run $run:"
  "${P[@]}" -c "EXPLAIN (ANALYZE, BUFFERS) $COLD" | grep -E "Execution Time|Planning Time|Seq Scan on pg_class"
done
# As the sampler does (pg::usage::SIZES_REREAD_SAMPLES): every
# size known but those of a fortieth of the tenants, read again.
"${P[@]}" -c "CREATE TABLE usage_known AS SELECT name, size_key, bytes FROM ($COLD) q ORDER BY name OFFSET ($N + 39) / 40"
for run in 1 2 3; do
  echo "every size known from the sample before but a fortieth's, run $run:"
  "${P[@]}" -c "EXPLAIN (ANALYZE, BUFFERS) $KNOWN" | grep -E "Execution Time|Planning Time|Seq Scan on pg_class"
done
"${P[@]}" -c "SELECT count(*) FILTER (WHERE measured) AS read_again, count(*) AS tenants, count(*) FILTER (WHERE q.bytes = k.bytes) AS same_bytes FROM ($KNOWN) q LEFT JOIN usage_known k USING (name)"
