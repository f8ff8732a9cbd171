#!/usr/bin/env bash
# The end-to-end scale benchmark (benches/scale.rs): the operator as the
# image builds it (`--profile dist`), the Kubernetes API test server
# (release), kubectl and a private Postgres with fsync on
# (as in production), beside plain psql on the same server in the same run.
#   bash scripts/bench-scale.sh                     # N = 1,000 tenants
#   BENCH_TENANTS=10000 bash scripts/bench-scale.sh # N = 10,000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --quiet
# The operator as the image ships it (Cargo.toml, `[profile.dist]`).
cargo build --profile dist --bin tenant-operator --quiet
# log_connections: the benchmark counts the server processes each phase starts.
export PG_EXTRA_OPTS="-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c log_connections=on ${PG_EXTRA_OPTS:-}"
exec bash scripts/with-postgres.sh cargo bench --bench scale
