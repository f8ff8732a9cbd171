#!/usr/bin/env bash
# make demo: the operator doing its main job with no cluster: a private
# Postgres, the Kubernetes API test server, the operator, and kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> building (first time: a few minutes)"
cargo build --workspace --bins --quiet
echo "==> starting two PostgreSQL servers (the second one is a shard) and PgBouncer"
exec env PG_ENV_PREFIX=TEST_PG2 bash scripts/with-postgres.sh bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh bash scripts/demo-run.sh
