#!/usr/bin/env bash
# The demo proper; run by scripts/demo.sh inside scripts/with-postgres.sh.
set -euo pipefail
TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d /tmp/tenant-demo.XXXXXX)
export KUBECONFIG=$WORK/kubeconfig
pids=()
finish() {
  echo "==> shutting down"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap finish EXIT
step() { printf '\n==> %s\n' "$*"; }
psql_su() { psql "${TEST_PG_SUPERUSER_URL%/*}/saas" -X -q "$@"; }

step "starting the Kubernetes API test server"
"$TARGET/debug/kube-test-server" --listen 127.0.0.1:0 --kubeconfig "$KUBECONFIG" >"$WORK/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -s $KUBECONFIG ]] && break; sleep 0.1; done
kubectl version 2>/dev/null | sed 's/^/    /'

step "installing the CRDs and the operator namespace"
kubectl apply -f crds/crds.yaml
kubectl wait --for=condition=Established crd/tenants.tenancy.dev --timeout=30s >/dev/null
kubectl create namespace tenant-system
"$TARGET/debug/tenant-operator" keys new-secret --namespace tenant-system | kubectl apply -f -

step "creating database 'saas', owned by a NON-superuser admin role (CREATEROLE + pg_signal_backend)"
psql "$TEST_PG_SUPERUSER_URL" -X -q -c "CREATE DATABASE saas OWNER tenancy_admin"
ADMIN_URL="${TEST_PG_ADMIN_URL%/*}/saas"

step "starting tenant-operator (log: operator.log)"
DATABASE_URL=$ADMIN_URL OPERATOR_NAMESPACE=tenant-system RESYNC_SECONDS=10 METRICS_ADDR=127.0.0.1:0 \
  BACKUP_STORE="file://$WORK/backups" \
  "$TARGET/debug/tenant-operator" run >"$WORK/operator.log" 2>&1 &
pids+=($!)

step "kubectl apply -f examples/tenants/"
kubectl apply -f examples/tenants/
step "waiting for every tenant to be Ready"
kubectl wait --for=condition=Ready tenant --all --timeout=60s
kubectl get tenants

step "what each tenant got in Postgres"
psql_su -c "SELECT nspname AS schema, pg_get_userbyid(nspowner) AS owner FROM pg_namespace WHERE nspname LIKE 'tenant\_%' ORDER BY 1"
psql_su -c "SELECT r.rolname AS role, r.rolcanlogin AS login, r.rolconnlimit AS conn_limit, array_to_string(s.setconfig, ', ') AS settings
            FROM pg_roles r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
            WHERE r.rolname LIKE 'tenant\_%' ORDER BY 1"
kubectl get secrets -n tenant-system

uri() { kubectl get secret -n tenant-system "tenant-$1-db" -o jsonpath='{.data.uri}' | base64 -d; }
step "acme's app role, with the credentials from its Secret"
psql "$(uri acme)" -X -q -c "CREATE TABLE t (x int)" 2>&1 | sed 's/^/    acme: /' || true
psql "$(uri acme)" -X -q -c "SELECT current_user, current_setting('search_path') AS search_path, current_setting('statement_timeout') AS statement_timeout"
psql "$(uri acme)" -X -q -c "SELECT * FROM tenant_globex.anything" 2>&1 | sed 's/^/    acme reading globex: /' || true

step "suspending globex: its app role loses login"
kubectl patch tenant globex --type=merge -p '{"spec":{"state":"Suspended"}}'
for _ in $(seq 100); do [[ $(kubectl get tenant globex -o jsonpath='{.status.phase}') == Suspended ]] && break; sleep 0.2; done
kubectl get tenants
psql "$(uri globex)" -X -q -c "SELECT 1" 2>&1 | sed 's/^/    globex login: /' || true

step "deleting initech: kubectl waits for the finalizer, which drops schema, roles and Secret"
kubectl delete tenant initech --timeout=60s
kubectl get tenants
psql_su -c "SELECT count(*) AS initech_objects_left FROM pg_namespace WHERE nspname = 'tenant_initech'" \
        -c "SELECT count(*) AS initech_roles_left FROM pg_roles WHERE rolname LIKE 'tenant\_initech%'"
step "the Events the operator published"
kubectl get events -A --field-selector involvedObject.kind=Tenant \
  -o custom-columns='TENANT:.involvedObject.name,TYPE:.type,REASON:.reason,MESSAGE:.message' 2>/dev/null || true
step "requests through PgBouncer with one pool on the gateway login (tenancy-client), one per tenant"
psql "$TEST_PG_SUPERUSER_URL" -X -q -c "GRANT CONNECT ON DATABASE saas TO pgbouncer_auth"
GW_PW=$(kubectl get secret -n tenant-system tenant-gateway-db -o jsonpath='{.data.password}' | base64 -d)
"$TARGET/debug/tenancy-request" "postgresql://tenancy_gateway:$GW_PW@127.0.0.1:$TEST_PGBOUNCER_PORT/saas" acme globex initech | sed 's/^/    /'

step "a second Postgres server as Shard eu-2 (database 'saas' there, the same kind of non-superuser admin)"
psql "$TEST_PG2_SUPERUSER_URL" -X -q -c "CREATE DATABASE saas OWNER tenancy_admin"
kubectl create secret generic eu-2-admin -n tenant-system --from-literal=url="${TEST_PG2_ADMIN_URL%/*}/saas"
kubectl wait --for=condition=Established crd/shards.tenancy.dev --timeout=30s >/dev/null
kubectl apply -f examples/shards/eu-2.yaml
kubectl wait --for=condition=Ready shard/eu-2 --timeout=60s
kubectl get shards

step "a new tenant placed by label selector (region: eu) lands on eu-2"
kubectl apply -f examples/shards/hooli.yaml
kubectl wait --for=condition=Ready tenant/hooli --timeout=60s
kubectl get tenants -o wide
psql "$(uri hooli)" -X -q -c "SELECT current_user, inet_server_port() AS port, current_database()"

step "moving acme to eu-2 (strategy Copy: these admins are not superusers, so no logical replication; writes stop, a backup of acme is restored there, the Secret follows, the old copy is dropped)"
kubectl patch tenant acme --type=merge -p '{"spec":{"placement":{"shard":"eu-2"}}}'
for _ in $(seq 300); do [[ $(kubectl get tenant acme -o jsonpath='{.status.lastMove.result}') == Succeeded ]] && break; sleep 0.2; done
kubectl get tenant acme -o jsonpath='{"    shard: "}{.status.shard}{"\n    lastMove: "}{.status.lastMove}{"\n"}'
kubectl wait --for=condition=Ready tenant/acme --timeout=60s >/dev/null
psql "$(uri acme)" -X -q -c "SELECT current_user, inet_server_port() AS port, current_database()"
psql_su -c "SELECT count(*) AS acme_objects_left_on_the_first_server FROM pg_namespace WHERE nspname = 'tenant_acme'"

echo
echo "Done. Tenants are in Postgres schemas on two servers; kubectl drove everything; the operator ran as a non-superuser."
