//! End to end: scheduled backups and TenantRestore through kubectl, the
//! operator and its `backup`/`restore` CLI. The API test server stores
//! CronJobs and Jobs but runs nothing, so the test runs the commands the
//! Jobs would run itself, with nothing but the Job's environment (the
//! tenant's Secret and the store: no admin DSN, no root keys, no
//! kubeconfig), and sets the Job's status with kubectl.

mod support;

use std::time::Duration;

use support::e2e::{tenant_yaml, wait_for, Env, BACKUP_ENV_SECRET, BACKUP_IMAGE, NAMESPACE};
use support::unique;

const LIMIT: Duration = Duration::from_secs(60);

fn with_backup(name: &str, state: &str, backup: &str) -> String {
    tenant_yaml(name, &format!("  state: {state}\n{backup}"))
}

/// Runs `tenant-operator <args>` as the Job would: its environment is the
/// data of Secret `secret` (the tenant's ops login and backup key) and the
/// store, and nothing else: no DATABASE_URL, no root keys, no way to reach
/// the Kubernetes API.
fn as_job(env: &Env, secret: &str, args: &[&str]) -> std::process::Output {
    let json: serde_json::Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "secret", "-n", NAMESPACE, secret, "-o", "json"])).unwrap();
    let home = env.dir.path().join("job-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("TMPDIR", &home)
        .env("KUBECONFIG", home.join("none"));
    for (k, v) in json["data"].as_object().expect("the Job's Secret has data") {
        use base64::Engine;
        let v = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        cmd.env(k, String::from_utf8(v).unwrap());
    }
    let store = env.backup_store();
    cmd.args(args).args(["--backup-store", &store]);
    cmd.output().expect("run the Job's command")
}

fn as_job_ok(env: &Env, secret: &str, args: &[&str]) -> String {
    let out = as_job(env, secret, args);
    assert!(
        out.status.success(),
        "the Job's tenant-operator {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret_keys(env: &Env, secret: &str) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "secret", "-n", NAMESPACE, secret, "-o", "json"])).unwrap();
    json["data"].as_object().unwrap().keys().cloned().collect()
}

async fn schemas(env: &Env, tenant: &str) -> Vec<String> {
    let mut su = env.db.superuser().await;
    sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1 ORDER BY 1")
        .bind(format!("tenant_{}%", tenant.replace('-', "_")))
        .fetch_all(&mut su)
        .await
        .unwrap()
}

async fn items(env: &Env, tenant: &str) -> Vec<(i32, String)> {
    let mut su = env.db.superuser().await;
    let schema = format!("tenant_{}", tenant.replace('-', "_"));
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, label FROM \"{schema}\".items ORDER BY id"
    )))
    .fetch_all(&mut su)
    .await
    .unwrap()
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
    env.kubectl_ok(&[
        "patch",
        "job",
        "-n",
        NAMESPACE,
        job,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cronjob_backup_and_tenant_restore() {
    let env = Env::start("e2e_backup").await;
    let t = unique("bk");
    let spec = "  backup:\n    schedule: \"0 3 * * *\"\n    retention: {count: 2}\n";
    assert!(env
        .kubectl_stdin(&["apply"], &with_backup(&t, "Active", spec))
        .status
        .success());
    env.wait_ready(&t);
    let uid = env.jsonpath(&["tenant", &t], "{.metadata.uid}");

    // The CronJob, as the spec and the operator's flags say.
    let cj = format!("tenant-{t}-backup");
    wait_for(LIMIT, "the backup CronJob", || {
        env.kubectl(&["get", "cronjob", "-n", NAMESPACE, &cj]).status.success()
    });
    let json: serde_json::Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "cronjob", "-n", NAMESPACE, &cj, "-o", "json"])).unwrap();
    assert_eq!(json["spec"]["schedule"], "0 3 * * *");
    assert_eq!(json["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(json["spec"]["suspend"], false);
    assert_eq!(
        json["metadata"]["ownerReferences"][0]["uid"],
        uid.as_str(),
        "the CronJob is not owned by the Tenant"
    );
    let pod = &json["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], BACKUP_IMAGE);
    assert_eq!(
        c["args"],
        serde_json::json!(["backup", "--job", "--tenant", t, "--keep-count", "2"])
    );
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], BACKUP_ENV_SECRET);
    let job_secret = format!("tenant-{t}-job");
    assert_eq!(c["envFrom"][1]["secretRef"]["name"], job_secret.as_str());
    assert!(
        !json.to_string().contains("ROOT_KEYS") && !json.to_string().contains("postgresql://"),
        "the CronJob gets the admin DSN or the root keys: {json}"
    );
    assert_eq!(
        c["env"],
        serde_json::json!([{"name": "TMPDIR", "value": "/tmp"}, {"name": "DATABASE_URL", "value": ""}]),
        "an env Secret's DATABASE_URL must not reach the pod"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(
        c["resources"]["requests"]["cpu"].is_string(),
        "no resource requests: {c}"
    );
    let cond = env.jsonpath(
        &["tenant", &t],
        "{.status.conditions[?(@.type==\"BackupScheduled\")].status}",
    );
    assert_eq!(cond, "True");
    // The Jobs' Secret: the tenant's ops login and its one backup key.
    let mut keys = secret_keys(&env, &job_secret);
    keys.sort();
    assert_eq!(
        keys,
        [
            "PGDATABASE",
            "PGHOST",
            "PGPASSWORD",
            "PGPORT",
            "PGSSLMODE",
            "PGUSER",
            "TENANT_BACKUP_KEY_V1",
            "TENANT_UID"
        ]
    );
    assert_eq!(
        env.jsonpath(
            &["secret", "-n", NAMESPACE, &job_secret],
            "{.metadata.ownerReferences[0].uid}"
        ),
        uid
    );

    // Steady state: no rewrite.
    let rv = env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.metadata.resourceVersion}");
    let srv = env.jsonpath(&["secret", "-n", NAMESPACE, &job_secret], "{.metadata.resourceVersion}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.metadata.resourceVersion}"),
        rv,
        "the CronJob was rewritten in a steady state"
    );
    assert_eq!(
        env.jsonpath(&["secret", "-n", NAMESPACE, &job_secret], "{.metadata.resourceVersion}"),
        srv,
        "the Jobs' Secret was rewritten in a steady state"
    );

    // A backup, as the CronJob's Job takes it: with its Secret alone.
    let (schema, owner) = (
        format!("tenant_{}", t.replace('-', "_")),
        format!("tenant_{}_owner", t.replace('-', "_")),
    );
    sql(&env, format!("SET ROLE \"{owner}\"; CREATE TABLE \"{schema}\".items (id int PRIMARY KEY, label text); INSERT INTO \"{schema}\".items SELECT g, 'v1' FROM generate_series(1, 10) g; RESET ROLE;")).await;
    let before = items(&env, &t).await;
    let out: serde_json::Value = serde_json::from_str(&as_job_ok(
        &env,
        &job_secret,
        &["backup", "--job", "--tenant", &t, "--keep-count", "2"],
    ))
    .unwrap();
    let id = out["manifest"]["id"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&format!(
        "{}/backups/tenants/{uid}/{id}.dump.enc",
        env.dir.path().display()
    ))
    .exists());
    // The operator finds it in the store, records it and reports it.
    wait_for(LIMIT, "status.lastBackup", || {
        env.jsonpath(&["tenant", &t], "{.status.lastBackup.id}") == id
    });
    let events = || {
        env.kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.name={t}"),
            "-o",
            "jsonpath={.items[*].reason}",
        ])
    };
    wait_for(LIMIT, "a BackupSucceeded event", || {
        events().contains("BackupSucceeded")
    });
    // Another tenant's Secret does not back this one up.
    let other = unique("bko");
    assert!(env
        .kubectl_stdin(&["apply"], &with_backup(&other, "Active", spec))
        .status
        .success());
    env.wait_ready(&other);
    wait_for(LIMIT, "the other tenant's Job Secret", || {
        env.kubectl(&["get", "secret", "-n", NAMESPACE, &format!("tenant-{other}-job")])
            .status
            .success()
    });
    let cross = as_job(
        &env,
        &format!("tenant-{other}-job"),
        &["backup", "--job", "--tenant", &t],
    );
    assert!(
        !cross.status.success(),
        "tenant {other}'s Job Secret backed up tenant {t}"
    );
    sql(&env, format!("UPDATE \"{schema}\".items SET label = 'v2'")).await;

    // TenantRestore: the operator resolves the backup, prepares the schema,
    // writes the Job's Secret and creates the Job.
    let r = format!("r-{}", &t[t.len() - 6..]);
    assert!(env
        .kubectl_stdin(&["apply"], &restore_yaml(&r, &t, "latest"))
        .status
        .success());
    let job = format!("tenant-restore-{r}");
    wait_for(LIMIT, "the restore Job", || {
        env.kubectl(&["get", "job", "-n", NAMESPACE, &job]).status.success()
    });
    let jj: serde_json::Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "job", "-n", NAMESPACE, &job, "-o", "json"])).unwrap();
    let jc = &jj["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        jc["args"],
        serde_json::json!(["restore", "--job", "--tenant", t, "--backup", id])
    );
    assert_eq!(jc["envFrom"][1]["secretRef"]["name"], job.as_str());
    assert_eq!(jj["metadata"]["ownerReferences"][0]["kind"], "TenantRestore");
    assert_eq!(jj["spec"]["template"]["spec"]["automountServiceAccountToken"], false);
    assert!(
        !jj.to_string().contains("ROOT_KEYS") && !jj.to_string().contains("postgresql://"),
        "the restore Job gets the admin DSN or the root keys: {jj}"
    );
    let mut keys = secret_keys(&env, &job);
    keys.sort();
    assert_eq!(
        keys,
        [
            "PGDATABASE",
            "PGHOST",
            "PGPASSWORD",
            "PGPORT",
            "PGSSLMODE",
            "PGUSER",
            "TENANT_BACKUP_KEY_V1",
            "TENANT_UID"
        ]
    );
    assert_eq!(
        schemas(&env, &t).await,
        vec![schema.clone(), format!("{schema}$aside")],
        "the schema was not prepared before the Job"
    );
    wait_for(LIMIT, "phase Pending", || {
        env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Pending"
    });
    assert_eq!(env.jsonpath(&["tenantrestore", &r], "{.status.backupId}"), id);
    set_job_status(
        &env,
        &job,
        serde_json::json!({ "active": 1, "startTime": "2026-11-26T03:00:00Z" }),
    );
    wait_for(LIMIT, "phase Running", || {
        env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Running"
    });
    // While it runs, the Tenant's reconcile leaves the prepared schema alone.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        schemas(&env, &t).await.len(),
        2,
        "the Tenant's reconcile undid a running restore"
    );
    // What the Job runs, with its Secret alone:
    as_job_ok(&env, &job, &["restore", "--job", "--tenant", &t, "--backup", &id]);
    set_job_status(
        &env,
        &job,
        serde_json::json!({ "active": 0, "succeeded": 1, "startTime": "2026-11-26T03:00:00Z", "completionTime": "2026-11-26T03:01:00Z",
            "conditions": [{ "type": "Complete", "status": "True", "lastTransitionTime": "2026-11-26T03:01:00Z" }] }),
    );
    wait_for(LIMIT, "phase Succeeded", || {
        env.jsonpath(&["tenantrestore", &r], "{.status.phase}") == "Succeeded"
    });
    assert_eq!(
        items(&env, &t).await,
        before,
        "the restore did not bring the backed-up rows back"
    );
    assert_eq!(
        schemas(&env, &t).await,
        vec![schema.clone()],
        "the original schema was not dropped"
    );
    assert_eq!(env.jsonpath(&["tenantrestore", &r], "{.status.backupId}"), id);
    assert!(
        env.jsonpath(&["tenantrestore", &r], "{.status.bytes}")
            .parse::<i64>()
            .unwrap()
            > 0
    );
    assert!(!env.jsonpath(&["tenantrestore", &r], "{.status.finish}").is_empty());
    wait_for(LIMIT, "the restore's Secret deleted", || {
        !env.kubectl(&["get", "secret", "-n", NAMESPACE, &job]).status.success()
    });
    wait_for(LIMIT, "a Restored event on the Tenant", || {
        events().contains("Restored")
    });
    {
        let mut su = env.db.superuser().await;
        let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE tenant_uid = $1 AND action = 'Restored' AND detail->>'backupId' = $2")
            .bind(&uid)
            .bind(&id)
            .fetch_one(&mut su)
            .await
            .unwrap();
        assert_eq!(logged, 1, "the restore is not in the operator's audit log");
    }

    // A backup that does not exist: Failed at once, nothing prepared.
    let r2 = format!("{r}-2");
    assert!(env
        .kubectl_stdin(&["apply"], &restore_yaml(&r2, &t, "20000101T000000.000Z"))
        .status
        .success());
    wait_for(LIMIT, "phase Failed", || {
        env.jsonpath(&["tenantrestore", &r2], "{.status.phase}") == "Failed"
    });
    assert!(
        env.jsonpath(&["tenantrestore", &r2], "{.status.error}")
            .contains("no backup"),
        "{}",
        env.jsonpath(&["tenantrestore", &r2], "{.status.error}")
    );
    assert!(
        !env.kubectl(&["get", "job", "-n", NAMESPACE, &format!("tenant-restore-{r2}")])
            .status
            .success(),
        "a Job for a backup that does not exist"
    );

    // A failed Job: the original is put back, reported as Failed with its reason.
    sql(&env, format!("UPDATE \"{schema}\".items SET label = 'v3'")).await;
    let live = items(&env, &t).await;
    let r3 = format!("{r}-3");
    assert!(env
        .kubectl_stdin(&["apply"], &restore_yaml(&r3, &t, "latest"))
        .status
        .success());
    let job3 = format!("tenant-restore-{r3}");
    wait_for(LIMIT, "the third restore Job", || {
        env.kubectl(&["get", "job", "-n", NAMESPACE, &job3]).status.success()
    });
    set_job_status(
        &env,
        &job3,
        serde_json::json!({ "failed": 1, "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": "2026-11-26T03:01:00Z" }] }),
    );
    wait_for(LIMIT, "phase Failed", || {
        env.jsonpath(&["tenantrestore", &r3], "{.status.phase}") == "Failed"
    });
    assert!(env
        .jsonpath(&["tenantrestore", &r3], "{.status.error}")
        .contains("backoff limit"));
    assert_eq!(
        items(&env, &t).await,
        live,
        "a failed restore did not put the original back"
    );
    assert_eq!(schemas(&env, &t).await, vec![schema.clone()]);

    // Suspending the tenant suspends the CronJob; removing spec.backup deletes it.
    assert!(env
        .kubectl_stdin(&["apply"], &with_backup(&t, "Suspended", spec))
        .status
        .success());
    wait_for(LIMIT, "a suspended CronJob", || {
        env.jsonpath(&["cronjob", "-n", NAMESPACE, &cj], "{.spec.suspend}") == "true"
    });
    assert!(env
        .kubectl_stdin(&["apply"], &with_backup(&t, "Active", ""))
        .status
        .success());
    wait_for(LIMIT, "the CronJob's deletion", || {
        !env.kubectl(&["get", "cronjob", "-n", NAMESPACE, &cj]).status.success()
    });

    // Deleting the Tenant deletes its backups from the store.
    env.kubectl_ok(&["delete", "tenant", &t, "--timeout=60s"]);
    let dir = format!("{}/backups/tenants/{uid}", env.dir.path().display());
    let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the deleted tenant's backups are still in the store ({dir})");
}

/// `spec.backup.schedule` takes what a Kubernetes CronJob takes: the CRD
/// admits a macro such as `@daily` (and the CronJob gets it as written);
/// a time zone in the schedule, which Kubernetes refuses, is reported on
/// the Tenant (`BackupScheduled=False`, `InvalidSchedule`) and the CronJob
/// keeps its last good schedule.
#[tokio::test(flavor = "multi_thread")]
async fn backup_schedules_are_the_ones_a_cronjob_takes() {
    let env = Env::start("e2e_bksched").await;
    let t = unique("bks");
    let spec = "  backup:\n    schedule: \"@daily\"\n";
    let out = env.kubectl_stdin(&["apply"], &with_backup(&t, "Active", spec));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_ready(&t);
    let cj = ["cronjob", "-n", NAMESPACE, &format!("tenant-{t}-backup")];
    wait_for(LIMIT, "the backup CronJob", || {
        env.jsonpath(&cj, "{.spec.schedule}") == "@daily"
    });
    let cond = |field: &str| {
        env.jsonpath(
            &["tenant", &t],
            &format!("{{.status.conditions[?(@.type==\"BackupScheduled\")].{field}}}"),
        )
    };
    wait_for(LIMIT, "BackupScheduled=True", || cond("status") == "True");

    for (bad, says) in [
        ("CRON_TZ=Europe/Berlin 0 3 * * *", "TZ"),
        ("0 3 * * 7", "day of week"),
        ("@every 1h", "macro"),
    ] {
        let patch = format!(r#"{{"spec":{{"backup":{{"schedule":"{bad}"}}}}}}"#);
        env.kubectl_ok(&["patch", "tenant", &t, "--type=merge", "-p", &patch]);
        wait_for(LIMIT, &format!("InvalidSchedule for {bad:?}"), || {
            cond("reason") == "InvalidSchedule" && cond("message").contains(bad)
        });
        assert_eq!(cond("status"), "False");
        assert!(cond("message").contains(says), "{}", cond("message"));
        assert_eq!(env.jsonpath(&cj, "{.spec.schedule}"), "@daily");
    }
}
