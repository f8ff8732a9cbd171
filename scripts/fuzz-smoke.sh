#!/usr/bin/env bash
# Coverage-guided fuzzing of the crypto formats: the cargo-fuzz targets in
# fuzz/ (envelope_open, stream_open), each run for N seconds.
#
#   bash scripts/fuzz-smoke.sh [SECONDS]     # default 20 (or $FUZZ_SECONDS)
#   make fuzz                                # the same
#
# Installs cargo-fuzz (from crates.io, into cargo's bin) if missing. The
# toolchain is stable: cargo fuzz needs nightly-only flags (-Zsanitizer,
# sancov), so this sets RUSTC_BOOTSTRAP=1 for its builds only. Builds into
# the shared target dir (under its x86_64-unknown-linux-gnu/ subfolder, apart
# from normal builds). Corpora are kept in $CARGO_TARGET_DIR/fuzz-corpus/;
# a crash is saved under fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-${FUZZ_SECONDS:-20}}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
TARGETS=(envelope_open stream_open)
start=$(date +%s)
cargo fuzz build >&2
built=$(date +%s)
echo "fuzz-smoke: build took $((built - start))s" >&2

for t in "${TARGETS[@]}"; do
  corpus="$CARGO_TARGET_DIR/fuzz-corpus/$t"
  log="$CARGO_TARGET_DIR/fuzz-corpus/$t.log"
  mkdir -p "$corpus"
  echo "fuzz-smoke: $t for ${SECS}s" >&2
  set +e
  cargo fuzz run "$t" "$corpus" -- -max_total_time="$SECS" -max_len=4096 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  grep -E 'DONE|^Done|stat::number_of_executed_units|stat::peak_rss_mb' "$log" >&2 || true
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$log" >&2
    echo "fuzz-smoke: $t FAILED (log: $log); reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/artifacts/$t/<file>" >&2
    exit 1
  fi
done
echo "fuzz-smoke: all targets ran ${SECS}s each without a failure (total $(( $(date +%s) - start ))s)" >&2
