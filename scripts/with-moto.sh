#!/usr/bin/env bash
# Runs a command with a private KMS test server: moto's server (PyPI
# `moto[server]`, installed once into .tools/moto-venv) on a free loopback
# port, stopped when the command ends.
#
# Exports: TEST_KMS_ENDPOINT (http://127.0.0.1:PORT), AWS_ACCESS_KEY_ID=test,
#          AWS_SECRET_ACCESS_KEY=test, AWS_REGION=us-east-1.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.tools/moto-venv"
MOTO_VERSION="5.2.5"

if [[ ! -x "$VENV/bin/moto_server" ]]; then
  echo "with-moto: installing moto[server]==$MOTO_VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" || { echo "with-moto: python3 -m venv failed; run scripts/setup.sh (Debian: python3-venv)" >&2; exit 1; }
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp /tmp/tenant-moto.XXXXXX.log)

"$VENV/bin/moto_server" -p "$PORT" -H 127.0.0.1 >"$LOG" 2>&1 &
MOTO_PID=$!

cleanup() {
  kill "$MOTO_PID" 2>/dev/null || true
  wait "$MOTO_PID" 2>/dev/null || true
  [[ -n "${KEEP_MOTO_LOG:-}" ]] || rm -f "$LOG"
}
trap cleanup EXIT

# Wait until it answers HTTP (moto serves a dashboard at /moto-api/).
for _ in $(seq 1 150); do
  if ! kill -0 "$MOTO_PID" 2>/dev/null; then
    echo "with-moto: moto_server exited early:" >&2; cat "$LOG" >&2; exit 1
  fi
  if python3 - "$PORT" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1).read()
PY
  then break; fi
  sleep 0.2
done
kill -0 "$MOTO_PID" 2>/dev/null || { echo "with-moto: moto_server did not start" >&2; cat "$LOG" >&2; exit 1; }

export TEST_KMS_ENDPOINT="http://127.0.0.1:$PORT"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE
echo "with-moto: moto $MOTO_VERSION (KMS) on 127.0.0.1:$PORT" >&2
set +e
"$@"
rc=$?
exit $rc
