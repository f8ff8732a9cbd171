#!/usr/bin/env bash
# The test command: every test of the workspace against a private
# PostgreSQL server (scripts/with-postgres.sh) with a PgBouncer in front
# (scripts/with-pgbouncer.sh), and a second server for the shard tests
# (TEST_PG2_*), after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PATH"
cargo build --workspace --bins --quiet
exec env PG_ENV_PREFIX=TEST_PG2 bash scripts/with-postgres.sh bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh bash scripts/with-moto.sh cargo test --workspace --no-fail-fast
