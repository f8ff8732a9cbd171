//! End to end: scheduled backups and TenantRestore through kubectl, the
//! operator and its `backup`/`restore` CLI. The API test server stores
//! CronJobs and Jobs but runs nothing, so the test runs the commands the
//! Jobs would run itself and sets the Job's status with kubectl.

mod support;

use std::time::Duration;

use support::e2e::{tenant_yaml, wait_for, Env, BACKUP_ENV_SECRET, BACKUP_IMAGE, NAMESPACE};
use support::unique;

const LIMIT: Duration = Duration::from_secs(60);

fn with_backup(name: &str, state: &str, backup: &str) -> String {
    tenant_yaml(name, &format!("  state: {state}\n{backup}"))
}

fn cli_ok(env: &Env, args: &[&str]) -> String {
    let store = env.backup_store();
    let mut all = args.to_vec();
    all.extend(["--backup-store", &store]);
    let out = env.operator_cli(&all);
    assert!(out.status.success(), "tenant-operator {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn items(env: &Env, tenant: &str) -> Vec<(i32, String)> {
    let mut su = env.db.superuser().await;
    let schema = format!("tenant_{}", tenant.replace('-', "_"));
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, label FROM \"{schema}\".items ORDER BY id"))).fetch_all(&mut su).await.unwrap()
}

async fn sql(env: &Env, stmt: String) {
    let mut su = env.db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(stmt)).execute(&mut su).await.unwrap();
}

fn restore_yaml(name: &str, tenant: &str, backup: &str) -> String {
    format!("apiVersion: tenancy.dev/v1alpha1\nkind: TenantRestore\nmetadata:\n  name: {name}\nspec:\n  tenant: {tenant}\n  backup: \"{backup}\"\n")
}

fn set_job_status(env: &Env, job: &str, status: serde_json::Value) {
    let patch = serde_json::json!({ "status": status }).to_string();
    env.kubectl_ok(&["patch", "job", "-n", NAMESPACE, job, "--subresource=status", "--type=merge", "-p", &patch]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cronjob_backup_and_tenant_restore() {
    let env = Env::start("e2e_backup").await;
    let t = unique("bk");
    let spec = "  backup:\n    schedule: \"0 3 * * *\"\n    retention: {count: 2}\n";
    assert!(env.kubectl_stdin(&["apply"], &with_backup(&t, "Active", spec)).status.success());
    env.wait_ready(&t);
    let uid = env.jsonpath(&["tenant", &t], "{.metadata.uid}");

    // The CronJob, as the spec and the operator's flags say.
    let cj = format!("tenant-{t}-backup");
    wait_for(LIMIT, "the backup CronJob", || env.kubectl(&["get", "cronjob", "-n", NAMESPACE, &cj]).status.success());
    let json: serde_json::Value = serde_json::from_str(&env.kubectl_ok(&["get", "cronjob", "-n", NAMESPACE, &cj, "-o", "json"])).unwrap();
    assert_eq!(json["spec"]["schedule"], "0 3 * * *");
    assert_eq!(json["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(json["spec"]["suspend"], false);
    assert_eq!(json["metadata"]["ownerReferences"][0]["uid"], uid.as_str(), "the CronJob is not owned by the Tenant");
    let c = &json["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], BACKUP_IMAGE);
    assert_eq!(c["args"], serde_json::json!(["backup", "--tenant", t]));
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], BACKUP_ENV_SECRET);
    assert!(c["resources"]["requests"]["cpu"].is_string(), "no resource requests: {c}");
    let cond = env.jsonpath(&["tenant", &t], "{.status.conditions[?(@.type==\"BackupScheduled\")].status}");
    assert_eq!(cond, "True");

    // Steady state: no rewrite.
    let rv = env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.metadata.resourceVersion}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.metadata.resourceVersion}"), rv, "the CronJob was rewritten in a steady state");

    // A backup, as the CronJob's Job would take it.
    let (schema, owner) = (format!("tenant_{}", t.replace('-', "_")), format!("tenant_{}_owner", t.replace('-', "_")));
    sql(&env, format!("SET ROLE \"{owner}\"; CREATE TABLE \"{schema}\".items (id int PRIMARY KEY, label text); INSERT INTO \"{schema}\".items SELECT g, 'v1' FROM generate_series(1, 10) g; RESET ROLE;")).await;
    let before = items(&env, &t).await;
    let out: serde_json::Value = serde_json::from_str(&cli_ok(&env, &["backup", "--tenant", &t])).unwrap();
    let id = out["manifest"]["id"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&format!("{}/backups/tenants/{uid}/{id}.dump.enc", env.dir.path().display())).exists());
    wait_for(LIMIT, "status.lastBackup", || env.jsonpath(&["tenant", &t], "{.status.lastBackup.id}") == id);
    let events = env.kubectl_ok(&["get", "events", "-A", "--field-selector", &format!("involvedObject.name={t}"), "-o", "jsonpath={.items[*].reason}"]);
    assert!(events.contains("BackupSucceeded"), "no BackupSucceeded event: {events}");
    sql(&env, format!("UPDATE \"{schema}\".items SET label = 'v2'")).await;

    // TenantRestore: a Job, then its status followed.
    let r = format!("r-{}", &t[t.len() - 6..]);
    assert!(env.kubectl_stdin(&["apply"], &restore_yaml(&r, &t, "latest")).status.success());
    let job = format!("tenant-restore-{r}");
    wait_for(LIMIT, "the restore Job", || env.kubectl(&["get", "job", "-n", NAMESPACE, &job]).status.success());
    let jj: serde_json::Value = serde_json::from_str(&env.kubectl_ok(&["get", "job", "-n", NAMESPACE, &job, "-o", "json"])).unwrap();
    let jc = &jj["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(jc["args"], serde_json::json!(["restore", "--tenant", t, "--backup", "latest"]));
    assert_eq!(jj["metadata"]["ownerReferences"][0]["kind"], "TenantRestore");
    wait_for(LIMIT, "phase Pending", || env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Pending");
    set_job_status(&env, &job, serde_json::json!({ "active": 1, "startTime": "2026-11-26T03:00:00Z" }));
    wait_for(LIMIT, "phase Running", || env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Running");
    // What the Job runs:
    cli_ok(&env, &["restore", "--tenant", &t, "--backup", "latest"]);
    assert_eq!(items(&env, &t).await, before, "the restore did not bring the backed-up rows back");
    set_job_status(
        &env,
        &job,
        serde_json::json!({ "active": 0, "succeeded": 1, "startTime": "2026-11-26T03:00:00Z", "completionTime": "2026-11-26T03:01:00Z",
            "conditions": [{ "type": "Complete", "status": "True", "lastTransitionTime": "2026-11-26T03:01:00Z" }] }),
    );
    wait_for(LIMIT, "phase Succeeded", || env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Succeeded");
    assert_eq!(env.jsonpath(&["tenantrestore", &r], "{.status.backupId}"), id);
    assert!(env.jsonpath(&["tenantrestore", &r], "{.status.bytes}").parse::<i64>().unwrap() > 0);
    assert!(!env.jsonpath(&["tenantrestore", &r], "{.status.finish}").is_empty());

    // A failed Job is reported as Failed with its reason.
    let r2 = format!("{r}-2");
    assert!(env.kubectl_stdin(&["apply"], &restore_yaml(&r2, &t, "20000101T000000.000Z")).status.success());
    let job2 = format!("tenant-restore-{r2}");
    wait_for(LIMIT, "the second restore Job", || env.kubectl(&["get", "job", "-n", NAMESPACE, &job2]).status.success());
    set_job_status(&env, &job2, serde_json::json!({ "failed": 1, "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": "2026-11-26T03:01:00Z" }] }));
    wait_for(LIMIT, "phase Failed", || env.jsonpath(&["tenantrestore", &r2], "{.status.phase}") == "Failed");
    assert!(env.jsonpath(&["tenantrestore", &r2], "{.status.error}").contains("backoff limit"));

    // Suspending the tenant suspends the CronJob; removing spec.backup deletes it.
    assert!(env.kubectl_stdin(&["apply"], &with_backup(&t, "Suspended", spec)).status.success());
    wait_for(LIMIT, "a suspended CronJob", || env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.spec.suspend}") == "true");
    assert!(env.kubectl_stdin(&["apply"], &with_backup(&t, "Active", "")).status.success());
    wait_for(LIMIT, "the CronJob's deletion", || !env.kubectl(&["get", "cronjob", "-n", NAMESPACE, &cj]).status.success());

    // Deleting the Tenant deletes its backups from the store.
    env.kubectl_ok(&["delete", "tenant", &t, "--timeout=60s"]);
    let dir = format!("{}/backups/tenants/{uid}", env.dir.path().display());
    let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the deleted tenant's backups are still in the store ({dir})");
}
