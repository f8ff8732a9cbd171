//! End to end: kubectl and the operator binary against a Kubernetes API (the
//! bundled test server, or the cluster `E2E_KUBECONFIG` names) and real
//! Postgres. Each test has its own database, admin role and operator.

mod support;

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use support::e2e::{tenant_yaml, wait_for, Env, NAMESPACE};
use support::unique;

fn secret_field(env: &Env, tenant: &str, key: &str) -> String {
    env.secret_value(&format!("tenant-{tenant}-db"), key)
}

async fn app_connect(env: &Env, tenant: &str) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&secret_field(env, tenant, "uri")).await
}

fn condition(env: &Env, tenant: &str, type_: &str, field: &str) -> String {
    env.jsonpath(
        &["tenant", tenant],
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].{field}}}"),
    )
}

async fn schema_exists(env: &Env, tenant: &str) -> bool {
    let schema = format!("tenant_{}", tenant.replace('-', "_"));
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&env.db.admin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_gives_an_isolated_schema_and_a_quiet_steady_state() {
    let env = Env::start("e2e_apply").await;
    let name = unique("acme");
    let out = env.kubectl_stdin(&["apply"], &tenant_yaml(&name, "  database:\n    connectionLimit: 5\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_ready(&name);

    let table = env.kubectl_ok(&["get", "tenants", &name]);
    let schema = format!("tenant_{}", name.replace('-', "_"));
    assert!(
        table.contains("PHASE") && table.contains("SCHEMA") && table.contains("READY"),
        "printer columns missing:\n{table}"
    );
    assert!(
        table.contains("Active") && table.contains(&schema) && table.contains("True"),
        "row wrong:\n{table}"
    );
    assert_eq!(
        env.jsonpath(&["tenant", &name], "{.metadata.finalizers[0]}"),
        "tenancy.dev/cleanup"
    );
    assert_eq!(condition(&env, &name, "DatabaseReady", "status"), "True");

    let mut conn = app_connect(&env, &name).await.expect("the Secret's uri logs in");
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, format!("{schema}_app"));
    drop(conn);

    // Steady state: once the rate-limit writer has reported (about a
    // second after Ready), several resyncs later, nothing was written
    // anywhere.
    wait_for(Duration::from_secs(30), "RateLimitsApplied to turn True", || {
        condition(&env, &name, "RateLimitsApplied", "status") == "True"
    });
    let rv = |what: &[&str]| env.jsonpath(what, "{.metadata.resourceVersion}");
    let secret = ["secret", "-n", NAMESPACE, &format!("tenant-{name}-db")];
    let (t0, s0) = (rv(&["tenant", &name]), rv(&secret));
    let events0 = env.kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "name",
    ]);
    let ddl0 = ddl_lines(&schema);
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(t0, rv(&["tenant", &name]), "the Tenant was written in a steady state");
    assert_eq!(s0, rv(&secret), "the Secret was written in a steady state");
    let events1 = env.kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "name",
    ]);
    assert_eq!(events0, events1, "events were published in a steady state");
    assert_eq!(ddl0, ddl_lines(&schema), "DDL ran in a steady state");
    let reconciles = env.operator_log().matches("reconciled").count();
    assert!(
        reconciles >= 2,
        "the operator did not resync ({reconciles} reconciles logged)"
    );
}

/// Lines of the Postgres statement log (log_statement = ddl) naming `needle`.
fn ddl_lines(needle: &str) -> usize {
    let path = std::env::var("TEST_PG_LOG").expect("TEST_PG_LOG");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("statement:") && l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_resume_and_delete_through_kubectl() {
    let env = Env::start("e2e_life").await;
    let name = unique("life");
    let a = unique("keep");
    for n in [&name, &a] {
        assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(n, "")).status.success());
    }
    env.wait_ready(&name);
    env.wait_ready(&a);
    let mut session = app_connect(&env, &name).await.unwrap();

    env.kubectl_ok(&[
        "patch",
        "tenant",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"state":"Suspended"}}"#,
    ]);
    wait_for(Duration::from_secs(30), "phase Suspended", || {
        env.jsonpath(&["tenant", &name], "{.status.phase}") == "Suspended"
    });
    let err = app_connect(&env, &name)
        .await
        .expect_err("a suspended tenant logged in");
    assert!(err.to_string().contains("not permitted to log in"), "{err}");
    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "the open session survived the suspend"
    );

    env.kubectl_ok(&[
        "patch",
        "tenant",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"state":"Active"}}"#,
    ]);
    wait_for(Duration::from_secs(30), "phase Active", || {
        env.jsonpath(&["tenant", &name], "{.status.phase}") == "Active"
    });
    app_connect(&env, &name).await.expect("resumed tenant logs in");

    // The audit log names who changed the spec (from managedFields, which
    // the operator's Tenant cache keeps only the spec manager's entry of).
    let actors: Vec<(String, String)> = sqlx::query_as("SELECT action, actor FROM tenancy.audit_log WHERE tenant_name = $1 AND action IN ('Provisioned', 'Suspended', 'Resumed') ORDER BY id")
        .bind(&name)
        .fetch_all(&mut env.db.superuser().await)
        .await
        .unwrap();
    let actors: Vec<(&str, &str)> = actors.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        actors,
        [
            ("Provisioned", "kubectl-client-side-apply"),
            ("Suspended", "kubectl-patch"),
            ("Resumed", "kubectl-patch")
        ]
    );

    // kubectl delete blocks until the finalizer is released.
    env.kubectl_ok(&["delete", "tenant", &name, "--timeout=60s"]);
    assert!(
        !env.kubectl(&["get", "tenant", &name]).status.success(),
        "the Tenant is still there"
    );
    assert!(!schema_exists(&env, &name).await, "the schema survived the delete");
    assert!(
        !env.kubectl(&["get", "secret", "-n", NAMESPACE, &format!("tenant-{name}-db")])
            .status
            .success(),
        "the Secret survived"
    );
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("tenant_{}%", name.replace('-', "_")))
        .fetch_one(&env.db.admin)
        .await
        .unwrap();
    assert_eq!(roles, 0, "roles survived the delete");
    // The other tenant is untouched.
    assert_eq!(env.jsonpath(&["tenant", &a], "{.status.phase}"), "Active");
    app_connect(&env, &a).await.expect("the other tenant still logs in");
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_protection_holds_a_delete_until_lifted() {
    let env = Env::start("e2e_prot").await;
    let name = unique("prot");
    env.apply_ready(&name, "  deletionProtection: true\n");
    env.kubectl_ok(&["delete", "tenant", &name, "--wait=false"]);
    wait_for(Duration::from_secs(30), "DeletionBlocked", || {
        condition(&env, &name, "DeletionBlocked", "status") == "True"
    });
    assert_eq!(env.jsonpath(&["tenant", &name], "{.status.phase}"), "Deleting");
    assert!(
        schema_exists(&env, &name).await,
        "a protected tenant's schema was dropped"
    );
    app_connect(&env, &name)
        .await
        .expect("a protected tenant keeps working while the delete waits");

    env.kubectl_ok(&[
        "patch",
        "tenant",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"deletionProtection":false}}"#,
    ]);
    wait_for(Duration::from_secs(30), "the Tenant to go", || {
        !env.kubectl(&["get", "tenant", &name]).status.success()
    });
    assert!(!schema_exists(&env, &name).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_by_the_crd_schema_with_the_field() {
    let env = Env::start("e2e_bad").await;
    let too_long = "a".repeat(41);
    let cases = [
        (tenant_yaml(&too_long, ""), "metadata.name"),
        (
            tenant_yaml("ok-name", "  database:\n    connectionLimit: 5000\n"),
            "spec.database.connectionLimit",
        ),
        (
            tenant_yaml("ok-name", "  database:\n    workMem: \"16MB'; DROP ROLE x; --\"\n"),
            "spec.database.workMem",
        ),
        (tenant_yaml("ok-name", "  state: Paused\n"), "spec.state"),
        (
            tenant_yaml("ok-name", "  database:\n    statementTimeout: 30 seconds\n"),
            "spec.database.statementTimeout",
        ),
        (
            tenant_yaml("ok-name", "  rateLimits:\n    api:\n      requestsPerUnit: 2000000\n"),
            "spec.rateLimits.api.requestsPerUnit",
        ),
        (
            tenant_yaml(
                "ok-name",
                "  rateLimits:\n    webhook:\n      requestsPerUnit: 5\n      unit: fortnight\n",
            ),
            "spec.rateLimits.webhook.unit",
        ),
    ];
    for (yaml, field) in cases {
        let out = env.kubectl_stdin(&["apply"], &yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{yaml}");
        assert!(stderr.contains(field), "the error does not name {field}: {stderr}");
    }
    let name_rule = env.kubectl_stdin(&["apply"], &tenant_yaml("Bad_Name", ""));
    assert!(!name_rule.status.success(), "an invalid name was accepted");
    assert!(
        env.kubectl_ok(&["get", "tenants", "-o", "name"]).trim().is_empty(),
        "a refused Tenant was stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_made_damage_is_repaired() {
    let env = Env::start("e2e_heal").await;
    let name = unique("heal");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&name, "")).status.success());
    env.wait_ready(&name);
    let secret = format!("tenant-{name}-db");
    let uid0 = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.uid}");

    // Labels and annotations another tool adds to an owned object survive
    // the operator's next write of it (Server-Side Apply, not replace);
    // the data is the operator's: a key taken away comes back, a key added
    // goes.
    env.kubectl_ok(&["label", "secret", "-n", NAMESPACE, &secret, "team=payments"]);
    env.kubectl_ok(&[
        "annotate",
        "secret",
        "-n",
        NAMESPACE,
        &secret,
        "backup.example.com/skip=true",
    ]);
    let rv0 = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.resourceVersion}");
    env.kubectl_ok(&[
        "patch",
        "secret",
        "-n",
        NAMESPACE,
        &secret,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/data/uri"},{"op":"add","path":"/data/extra","value":"eA=="}]"#,
    ]);
    wait_for(
        Duration::from_secs(30),
        "the operator to rewrite the Secret's data",
        || {
            let data = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.data}");
            data.contains("\"uri\"") && !data.contains("\"extra\"")
        },
    );
    assert_ne!(
        rv0,
        env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.resourceVersion}")
    );
    assert_eq!(
        env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.labels.team}"),
        "payments",
        "the operator's write removed another manager's label"
    );
    assert_eq!(
        env.jsonpath(
            &["secret", "-n", NAMESPACE, &secret],
            "{.metadata.annotations.backup\\.example\\.com/skip}"
        ),
        "true",
        "the operator's write removed another manager's annotation"
    );
    let managers = env.jsonpath(
        &["secret", "-n", NAMESPACE, &secret],
        "{.metadata.managedFields[*].manager}",
    );
    assert!(managers.contains("tenant-operator"), "{managers}");
    app_connect(&env, &name).await.expect("the rewritten uri logs in");

    // The Secret deleted by hand comes back (the watch on Secrets), with
    // credentials that work.
    env.kubectl_ok(&["delete", "secret", "-n", NAMESPACE, &secret]);
    wait_for(Duration::from_secs(30), "the Secret to come back", || {
        let uid = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.uid}");
        !uid.is_empty() && uid != uid0
    });
    app_connect(&env, &name)
        .await
        .expect("the rewritten Secret's password works");

    // The app role dropped by hand inside Postgres comes back on resync.
    let app = format!("tenant_{}_app", name.replace('-', "_"));
    let mut su = env.db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP OWNED BY {app}; DROP ROLE {app}")))
        .execute(&mut su)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if app_connect(&env, &name).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the dropped role did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_lost_mid_life_is_reported_and_recovered() {
    let env = Env::start("e2e_down").await;
    let name = unique("down");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&name, "")).status.success());
    env.wait_ready(&name);

    // Cut the operator off: its admin role can no longer log in, and its
    // open connections are ended.
    let mut su = env.db.superuser().await;
    let cut = format!(
        "ALTER ROLE {r} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{r}';",
        r = env.admin_role
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(cut)).execute(&mut su).await.unwrap();
    // A change arrives while Postgres is unreachable.
    env.kubectl_ok(&[
        "patch",
        "tenant",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"database":{"connectionLimit":7}}}"#,
    ]);
    wait_for(Duration::from_secs(30), "DatabaseUnavailable", || {
        condition(&env, &name, "Ready", "reason") == "DatabaseUnavailable"
    });
    assert_eq!(condition(&env, &name, "Ready", "status"), "False");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {} LOGIN", env.admin_role)))
        .execute(&mut su)
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "Ready again", || {
        condition(&env, &name, "Ready", "status") == "True"
    });
    let limit: i32 = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(format!("tenant_{}_app", name.replace('-', "_")))
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(limit, 7, "the change made during the outage was not applied");

    // A delete while Postgres is unreachable waits; nothing is half-dropped.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {r} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{r}';",
        r = env.admin_role
    )))
    .execute(&mut su)
    .await
    .unwrap();
    env.kubectl_ok(&["delete", "tenant", &name, "--wait=false"]);
    wait_for(Duration::from_secs(30), "the delete to wait on Postgres", || {
        condition(&env, &name, "Ready", "reason") == "DatabaseUnavailable"
    });
    assert!(
        env.kubectl(&["get", "tenant", &name]).status.success(),
        "the finalizer was released without a drop"
    );
    assert!(schema_exists(&env, &name).await);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {} LOGIN", env.admin_role)))
        .execute(&mut su)
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "the Tenant to go", || {
        !env.kubectl(&["get", "tenant", &name]).status.success()
    });
    assert!(
        !schema_exists(&env, &name).await,
        "the schema survived the delayed delete"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_without_a_database_url_or_with_an_unreachable_one_fails_clearly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .arg("run")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--database-url"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(["run", "--database-url", "postgresql://x:y@127.0.0.1:1/db"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to Postgres at 127.0.0.1:1/db"),
        "{stderr}"
    );
}

/// The descriptors of one rendered rate-limit file, tenant to
/// (requests_per_unit, unit, shadow_mode), or None while the ConfigMap or
/// the file is missing or does not parse as envoyproxy/ratelimit config.
fn rate_limits(env: &Env, file: &str) -> Option<std::collections::BTreeMap<String, (u32, String, bool)>> {
    let path = format!("{{.data.{}}}", file.replace('.', "\\."));
    let yaml = env.jsonpath(&["configmap", "-n", NAMESPACE, "tenant-ratelimits"], &path);
    let root = tenant_operator::ratelimit_config::schema::parse(&yaml).ok()?;
    let domain = if file.starts_with("api") {
        "tenant-api"
    } else {
        "tenant-webhook"
    };
    assert_eq!(root.domain, domain, "{file} declares the wrong domain");
    Some(
        root.descriptors
            .into_iter()
            .map(|d| {
                assert_eq!(d.key, "tenant_id");
                let rl = d.rate_limit.expect("every descriptor has a rate_limit");
                (
                    d.value.expect("a tenant value"),
                    (rl.requests_per_unit, rl.unit.unwrap_or_default(), d.shadow_mode),
                )
            })
            .collect(),
    )
}

/// Watches `tenant`'s `RateLimitsApplied` (for 30 s, or until it is True
/// with `summary` and stays so for a second): whenever it is True with
/// `summary`, the rate-limit ConfigMap, read right after, holds `api` as the
/// tenant's API limit.
async fn never_true_before_the_configmap(env: &Env, tenant: &str, summary: &str, api: (u32, &str)) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let client = env.client().await;
    let tenants: kube::Api<tenant_operator::api::Tenant> = kube::Api::all(client.clone());
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(client, NAMESPACE);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut true_since: Option<std::time::Instant> = None;
    let mut seen_pending = false;
    while std::time::Instant::now() < deadline {
        let t = tenants.get(tenant).await.unwrap();
        let cond = t
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "RateLimitsApplied").cloned());
        let shown = cond
            .as_ref()
            .is_some_and(|c| c.status == "True" && c.message.contains(summary));
        seen_pending |= cond.as_ref().is_some_and(|c| c.reason == "Pending");
        if shown {
            let cm = cms.get("tenant-ratelimits").await.unwrap();
            let yaml = cm.data.unwrap_or_default().remove("api.yaml").unwrap_or_default();
            let root = tenant_operator::ratelimit_config::schema::parse(&yaml).unwrap();
            let held = root
                .descriptors
                .iter()
                .find(|d| d.value.as_deref() == Some(tenant))
                .and_then(|d| d.rate_limit.as_ref())
                .map(|rl| (rl.requests_per_unit, rl.unit.clone().unwrap_or_default()));
            assert_eq!(
                held,
                Some((api.0, api.1.to_string())),
                "RateLimitsApplied says {summary:?} ({cond:?}) while the ConfigMap holds another limit"
            );
            let since = *true_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                eprintln!("RateLimitsApplied became True after the ConfigMap (Pending seen: {seen_pending})");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("RateLimitsApplied never said {summary:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_are_rendered_into_one_configmap_and_follow_the_tenants() {
    let env = Env::start("e2e_rl").await;
    let (a, b) = (unique("rla"), unique("rlb"));
    let limits_a = "  rateLimits:\n    api:\n      requestsPerUnit: 50\n      unit: minute\n    webhook:\n      requestsPerUnit: 5\n      shadowMode: true\n";
    assert!(env
        .kubectl_stdin(&["apply"], &tenant_yaml(&a, limits_a))
        .status
        .success());
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&b, "")).status.success());
    env.wait_ready(&a);
    env.wait_ready(&b);

    wait_for(
        Duration::from_secs(30),
        "both tenants in the rate-limit ConfigMap",
        || rate_limits(&env, "api.yaml").is_some_and(|m| m.contains_key(&a) && m.contains_key(&b)),
    );
    let api = rate_limits(&env, "api.yaml").unwrap();
    let webhook = rate_limits(&env, "webhook.yaml").expect("webhook.yaml parses");
    assert_eq!(api[&a], (50, "minute".into(), false));
    assert_eq!(api[&b], (100, "second".into(), false), "the default API limit");
    assert_eq!(webhook[&a], (5, "second".into(), true));
    assert_eq!(webhook[&b], (20, "second".into(), false), "the default webhook limit");
    // The writer reports once it wrote them: the Tenant follows.
    wait_for(Duration::from_secs(30), "RateLimitsApplied to turn True", || {
        condition(&env, &a, "RateLimitsApplied", "status") == "True"
    });
    assert_eq!(condition(&env, &a, "RateLimitsApplied", "reason"), "Rendered");
    let msg = condition(&env, &a, "RateLimitsApplied", "message");
    assert!(
        msg.contains("tenant-ratelimits") && msg.contains("api 50/minute"),
        "{msg}"
    );

    // Steady state: several resyncs (RESYNC_SECONDS=2) rewrite nothing.
    let cm = ["configmap", "-n", NAMESPACE, "tenant-ratelimits"];
    let rv0 = env.jsonpath(&cm, "{.metadata.resourceVersion}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rv0,
        env.jsonpath(&cm, "{.metadata.resourceVersion}"),
        "the rate-limit ConfigMap was rewritten in a steady state"
    );

    // A change of limits: `RateLimitsApplied` says True for the new ones
    // only once the ConfigMap holds them (the writer debounces for a
    // second): every time the Tenant shows it, the ConfigMap read after
    // already has them.
    env.patch_tenant(&a, r#"{"spec":{"rateLimits":{"api":{"requestsPerUnit":70}}}}"#);
    never_true_before_the_configmap(&env, &a, "api 70/minute", (70, "minute")).await;

    // Suspended: zero on both surfaces, and an event says so.
    env.kubectl_ok(&[
        "patch",
        "tenant",
        &b,
        "--type=merge",
        "-p",
        r#"{"spec":{"state":"Suspended"}}"#,
    ]);
    wait_for(
        Duration::from_secs(30),
        "the suspended tenant's limits to become 0",
        || {
            let zero = |f| rate_limits(&env, f).and_then(|m| m.get(&b).map(|l| l.0)) == Some(0);
            zero("api.yaml") && zero("webhook.yaml")
        },
    );
    assert_eq!(
        rate_limits(&env, "api.yaml").unwrap()[&a],
        (70, "minute".into(), false),
        "the other tenant changed"
    );
    wait_for(Duration::from_secs(30), "a RateLimitsChanged event", || {
        env.jsonpath(
            &["events", "-A", "--field-selector", &format!("involvedObject.name={b}")],
            "{.items[*].reason}",
        )
        .contains("RateLimitsChanged")
    });

    // A hand edit is put back at the next resync.
    env.kubectl_ok(&[
        "patch",
        "configmap",
        "-n",
        NAMESPACE,
        "tenant-ratelimits",
        "--type=merge",
        "-p",
        r#"{"data":{"api.yaml":"domain: \"tenant-api\"\ndescriptors: []\n"}}"#,
    ]);
    wait_for(
        Duration::from_secs(30),
        "the hand-edited ConfigMap to be rewritten",
        || rate_limits(&env, "api.yaml").is_some_and(|m| m.contains_key(&a) && m.contains_key(&b)),
    );

    // Deleted: no entry at all.
    env.kubectl_ok(&["delete", "tenant", &a, "--timeout=60s"]);
    wait_for(Duration::from_secs(30), "the deleted tenant's entries to go", || {
        let gone = |f| rate_limits(&env, f).is_some_and(|m| !m.contains_key(&a) && m.contains_key(&b));
        gone("api.yaml") && gone("webhook.yaml")
    });
}

/// A MigrationSet manifest named `name` with `versions` (version, SQL).
fn migration_set_yaml(name: &str, versions: &[(i64, &str)]) -> String {
    let mut y = format!("apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: {name}\nspec:\n  rollout:\n    maxConcurrent: 2\n    canary: 1\n  migrations:\n");
    for (v, sql) in versions {
        y.push_str(&format!("    - version: {v}\n      name: v{v}\n      sql: \"{sql}\"\n"));
    }
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_set_brings_tenants_to_its_latest_version_and_rolls_out_new_ones() {
    let env = Env::start("e2e_ms").await;
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/migrationsets.tenancy.dev",
        "--timeout=30s",
    ]);
    let (a, b) = (unique("msa"), unique("msb"));
    let version = |t: &str| env.jsonpath(&["tenant", t], "{.status.schemaVersion}");

    // Before its set exists, a tenant is provisioned and waits.
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&a, "")).status.success());
    env.wait_ready(&a);
    wait_for(Duration::from_secs(30), "MigrationSetNotFound", || {
        condition(&env, &a, "MigrationsApplied", "reason") == "MigrationSetNotFound"
    });
    assert_eq!(condition(&env, &a, "MigrationsApplied", "status"), "False");

    let v2 = [
        (1, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text)"),
        (2, "ALTER TABLE docs ADD COLUMN tag text"),
    ];
    let out = env.kubectl_stdin(&["apply"], &migration_set_yaml("default", &v2));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&b, "")).status.success());
    for t in [&a, &b] {
        wait_for(Duration::from_secs(60), "schemaVersion 2", || version(t) == "2");
        wait_for(Duration::from_secs(30), "MigrationsApplied=True", || {
            condition(&env, t, "MigrationsApplied", "status") == "True"
        });
    }
    assert_eq!(condition(&env, &a, "MigrationsApplied", "reason"), "UpToDate");
    let mut app = app_connect(&env, &b).await.expect("the app logs in");
    sqlx::query("INSERT INTO docs (body, tag) VALUES ('x', 'y')")
        .execute(&mut app)
        .await
        .expect("the app writes a migrated table");
    drop(app);
    wait_for(Duration::from_secs(30), "the set Complete", || {
        env.jsonpath(&["migrationset", "default"], "{.status.phase}") == "Complete"
    });

    // A new version, applied with kubectl, rolls out to both.
    let v3 = [v2[0], v2[1], (3, "CREATE INDEX docs_tag ON docs (tag)")];
    let out = env.kubectl_stdin(&["apply"], &migration_set_yaml("default", &v3));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for t in [&a, &b] {
        wait_for(Duration::from_secs(60), "schemaVersion 3", || version(t) == "3");
    }
    wait_for(Duration::from_secs(30), "the set Complete at version 3", || {
        env.jsonpath(
            &["migrationset", "default"],
            "{.status.phase}/{.status.latestVersion}/{.status.progress}",
        ) == "Complete/3/2/2"
    });
    let table = env.kubectl_ok(&["get", "migrationsets"]);
    for col in ["PHASE", "LATEST", "PROGRESS", "AGE"] {
        assert!(table.contains(col), "column {col} missing:\n{table}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("default"))
        .unwrap_or_default()
        .to_string();
    assert!(
        row.contains("Complete") && row.contains(" 3 ") && row.contains("2/2"),
        "row wrong:\n{table}"
    );
    let tenants = env.kubectl_ok(&["get", "tenants", &a]);
    assert!(tenants.contains("VERSION"), "{tenants}");
    let mut su = env.db.superuser().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM tenant_{}._tenancy_migrations",
        a.replace('-', "_")
    )))
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(n, 3, "each version is recorded once");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_reaches_the_tenants_status_and_the_wide_columns() {
    // The sampler is off in the other tests (their steady-state checks
    // count writes); here it samples every second.
    let env = Env::start_with("usage", None, &[("USAGE_INTERVAL_SECONDS", "1")]).await;
    let name = unique("use");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&name, "")).status.success());
    env.wait_ready(&name);
    let sessions = || {
        env.jsonpath(&["tenant", &name], "{.status.usage.sessions}")
            .trim()
            .to_string()
    };
    let a = app_connect(&env, &name).await.expect("app login");
    let b = app_connect(&env, &name).await.expect("app login");
    // Samples are spaced by ten times what each took (`PACE`): on a loaded
    // machine the next may be tens of seconds away.
    wait_for(Duration::from_secs(90), "status.usage.sessions = 2", || {
        sessions() == "2"
    });
    let bytes: i64 = env
        .jsonpath(&["tenant", &name], "{.status.usage.bytes}")
        .trim()
        .parse()
        .expect("status.usage.bytes");
    assert!(bytes > 0, "the schema (audit log, version table) has a size");
    // `kubectl get -o wide` shows them (SIZE and CONNS are priority-1 columns).
    let wide = env.kubectl_ok(&["get", "tenant", &name, "-o", "wide"]);
    let header: Vec<&str> = wide.lines().next().unwrap_or_default().split_whitespace().collect();
    let row: Vec<&str> = wide.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    let col = |h: &str| {
        header
            .iter()
            .position(|c| *c == h)
            .unwrap_or_else(|| panic!("no {h} column in:\n{wide}"))
    };
    assert_eq!(row.get(col("CONNS")).copied(), Some("2"), "{wide}");
    assert!(
        row.get(col("SIZE"))
            .is_some_and(|s| s.parse::<i64>().is_ok_and(|n| n > 0)),
        "{wide}"
    );
    let plain = env.kubectl_ok(&["get", "tenant", &name]);
    assert!(
        !plain.contains("CONNS"),
        "the usage columns are for -o wide only:\n{plain}"
    );
    // Both sessions gone: a move to zero is always written.
    a.close().await.unwrap();
    b.close().await.unwrap();
    wait_for(Duration::from_secs(90), "status.usage.sessions back to 0", || {
        sessions() == "0"
    });
}
