#!/usr/bin/env bash
# make demo: the operator doing its main job with no cluster: a private
# Postgres, the Kubernetes API test server, the operator, and kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> building (first time: a few minutes)"
cargo build --workspace --bins --quiet
echo "==> starting PostgreSQL and PgBouncer"
exec bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh bash scripts/demo-run.sh
