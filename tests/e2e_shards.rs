//! Shards end to end: a second PostgreSQL server (`TEST_PG2_*`, started by
//! `make test`) registered as a Shard; tenants placed by name, by selector
//! and by count; capacity and state respected; everything of a tenant on
//! its shard (schema, roles, Secret, migrations, delete); a Shard with
//! tenants cannot be deleted.

mod support;

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use support::e2e::{tenant_yaml, wait_for, Env, NAMESPACE};
use support::{env, unique};

/// A database of its own on the second server, owned by an admin role of
/// its own (CREATEROLE + pg_signal_backend, not superuser): (admin URL, a
/// superuser pool on it for the checks).
async fn second_server_db(label: &str) -> (String, PgPool) {
    let su_url = env("TEST_PG2_SUPERUSER_URL");
    let port = env("TEST_PG2_PORT");
    let db = format!("s_{label}_{:08x}", rand::random::<u32>());
    let role = format!("sadm_{:08x}", rand::random::<u32>());
    let pw = format!("pw{:016x}", rand::random::<u64>());
    let mut su = PgConnection::connect(&su_url)
        .await
        .expect("superuser on the second server");
    for stmt in [
        format!("CREATE ROLE {role} LOGIN CREATEROLE PASSWORD '{pw}'"),
        format!("GRANT pg_signal_backend TO {role}"),
        format!("CREATE DATABASE {db} OWNER {role}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&mut su)
            .await
            .expect("second server database");
    }
    let (base, _) = su_url.rsplit_once('/').unwrap();
    let pool = PgPool::connect(&format!("{base}/{db}")).await.expect("superuser pool");
    (format!("postgresql://{role}:{pw}@127.0.0.1:{port}/{db}"), pool)
}

async fn schema_on(pool: &PgPool, tenant: &str) -> bool {
    let schema = format!("tenant_{}", tenant.replace('-', "_"));
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn roles_on(pool: &PgPool, tenant: &str) -> i64 {
    let prefix = format!("tenant_{}_%", tenant.replace('-', "_"));
    sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(prefix)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn secret_field(env: &Env, tenant: &str, key: &str) -> String {
    env.secret_value(&format!("tenant-{tenant}-db"), key)
}

fn ready_reason(env: &Env, tenant: &str) -> String {
    env.jsonpath(&["tenant", tenant], "{.status.conditions[?(@.type==\"Ready\")].reason}")
}

fn apply(env: &Env, yaml: &str) {
    let out = env.kubectl_stdin(&["apply"], yaml);
    assert!(out.status.success(), "{}\n{yaml}", String::from_utf8_lossy(&out.stderr));
}

/// The Secret `<shard>-admin` holding `url`.
fn admin_secret(env: &Env, shard: &str, url: &str) {
    let out = env.kubectl(&[
        "create",
        "secret",
        "generic",
        "-n",
        NAMESPACE,
        &format!("{shard}-admin"),
        &format!("--from-literal=url={url}"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn shard_yaml(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: tenancy.dev/v1alpha1\nkind: Shard\nmetadata:\n  name: {name}\n  labels:\n{labels}\nspec:\n  adminSecretRef: {{name: {name}-admin, key: url}}\n{spec}"
    )
}

fn wait_reason(env: &Env, tenant: &str, reason: &str) {
    wait_for(
        Duration::from_secs(60),
        &format!("tenant {tenant} Ready reason {reason}"),
        || ready_reason(env, tenant) == reason,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_are_placed_on_shards_and_live_there_entirely() {
    let env = Env::start("e2e_shards").await;
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/shards.tenancy.dev",
        "--timeout=30s",
    ]);
    let (url2, pool2) = second_server_db("place").await;
    let port2 = support::env("TEST_PG2_PORT");
    let shard = unique("eu");

    // A Shard whose Secret is missing says so; the Secret arriving opens it.
    apply(&env, &shard_yaml(&shard, "    region: eu", "  maxTenants: 2\n"));
    wait_for(Duration::from_secs(30), "the Shard reports its missing Secret", || {
        env.jsonpath(&["shard", &shard], "{.status.conditions[?(@.type==\"Ready\")].reason}") == "SecretNotFound"
    });
    admin_secret(&env, &shard, &url2);
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("shard/{shard}"),
        "--timeout=60s",
    ]);
    assert_eq!(env.jsonpath(&["shard", &shard], "{.status.reachable}"), "true");
    assert!(env
        .jsonpath(&["shard", &shard], "{.status.postgresVersion}")
        .starts_with("15"));

    // By name: everything of the tenant is on the second server.
    let a = unique("sha");
    apply(&env, &tenant_yaml(&a, &format!("  placement:\n    shard: {shard}\n")));
    env.wait_ready(&a);
    assert_eq!(env.jsonpath(&["tenant", &a], "{.status.shard}"), shard);
    assert!(schema_on(&pool2, &a).await, "schema on the shard");
    assert!(!schema_on(&env.db.admin, &a).await, "nothing on the default shard");
    assert!(roles_on(&pool2, &a).await >= 2, "roles on the shard");
    assert_eq!(secret_field(&env, &a, "port"), port2, "the Secret points at the shard");
    let mut app = PgConnection::connect(&secret_field(&env, &a, "uri"))
        .await
        .expect("app login on the shard");
    let (db, path): (String, String) =
        sqlx::query_as("SELECT current_database()::text, current_setting('search_path')")
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert!(url2.ends_with(&format!("/{db}")), "connected to the shard's database");
    assert!(path.contains(&format!("tenant_{}", a.replace('-', "_"))), "{path}");
    app.close().await.unwrap();

    // By selector; one no shard matches waits, Pending, with the reason.
    let b = unique("shb");
    apply(
        &env,
        &tenant_yaml(
            &b,
            "  placement:\n    shardSelector:\n      matchLabels: {region: eu}\n",
        ),
    );
    env.wait_ready(&b);
    assert_eq!(env.jsonpath(&["tenant", &b], "{.status.shard}"), shard);
    let c = unique("shc");
    apply(
        &env,
        &tenant_yaml(
            &c,
            "  placement:\n    shardSelector:\n      matchLabels: {region: ap}\n",
        ),
    );
    wait_reason(&env, &c, "NoShardAvailable");
    assert_eq!(env.jsonpath(&["tenant", &c], "{.status.phase}"), "Pending");

    // Full (maxTenants: 2): waits; room made by raising the limit places it.
    let d = unique("shd");
    apply(&env, &tenant_yaml(&d, &format!("  placement:\n    shard: {shard}\n")));
    wait_reason(&env, &d, "ShardFull");
    apply(&env, &shard_yaml(&shard, "    region: eu", "  maxTenants: 3\n"));
    env.wait_ready(&d);
    let got = env.jsonpath(&["tenant", &d], "{.status.shard}");
    if got != shard {
        eprintln!(
            "{}",
            env.kubectl_ok(&["get", "tenant", &d, "-o", "yaml", "--show-managed-fields"])
        );
        eprintln!("{}", support::e2e::tail(&env.operator_log(), 60));
    }
    assert_eq!(got, shard);
    wait_for(Duration::from_secs(30), "the Shard counts its tenants", || {
        env.jsonpath(&["shard", &shard], "{.status.tenants}") == "3"
    });

    // By count: the default shard has fewer tenants.
    let e = unique("she");
    apply(&env, &tenant_yaml(&e, ""));
    env.wait_ready(&e);
    assert_eq!(env.jsonpath(&["tenant", &e], "{.status.shard}"), "default");
    assert!(schema_on(&env.db.admin, &e).await);

    // Closed: keeps its tenants, takes no new one.
    apply(
        &env,
        &shard_yaml(&shard, "    region: eu", "  maxTenants: 10\n  state: Closed\n"),
    );
    let f = unique("shf");
    apply(&env, &tenant_yaml(&f, &format!("  placement:\n    shard: {shard}\n")));
    wait_reason(&env, &f, "ShardNotOpen");
    assert_eq!(ready_reason(&env, &a), "Provisioned", "tenants on a Closed shard stay");

    // A third shard (another database on the second server), with a tenant.
    let (third, pool3, _) = ready_shard(&env, "th").await;
    let g = unique("shg");
    apply(&env, &tenant_yaml(&g, &format!("  placement:\n    shard: {third}\n")));
    env.wait_ready(&g);
    assert!(schema_on(&pool3, &g).await);

    // Tenants never placed have nothing to drop: their delete is at once.
    for t in [&c, &f] {
        env.kubectl_ok(&["delete", "tenant", t, "--timeout=60s"]);
    }

    // A migration set rolls out on both shards, with progress per shard.
    apply(
        &env,
        "apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: default\nspec:\n  migrations:\n    - version: 1\n      name: v1\n      sql: \"CREATE TABLE docs (id bigserial PRIMARY KEY)\"\n",
    );
    env.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Complete",
        "migrationset/default",
        "--timeout=90s",
    ]);
    let progress = env.jsonpath(&["migrationset", "default"], "{.status.shards}");
    assert!(
        progress.contains(&format!("\"shard\":\"{shard}\"")) && progress.contains("\"progress\":\"3/3\""),
        "{progress}"
    );
    assert!(progress.contains("\"shard\":\"default\""), "{progress}");
    assert!(progress.contains(&format!("\"shard\":\"{third}\"")), "{progress}");
    for (pool, t) in [(&pool2, &a), (&env.db.admin, &e), (&pool3, &g)] {
        let table = format!("tenant_{}.docs", t.replace('-', "_"));
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relname = 'docs')",
        )
        .bind(format!("tenant_{}", t.replace('-', "_")))
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(exists, "{table} migrated on its shard");
    }

    // A Shard with tenants on it is not deleted.
    env.kubectl_ok(&["delete", "shard", &shard, "--wait=false"]);
    wait_for(Duration::from_secs(30), "the Shard's delete is held", || {
        env.jsonpath(&["shard", &shard], "{.status.conditions[?(@.type==\"Ready\")].reason}") == "DeletionBlocked"
    });

    // Deleting the tenants drops everything of them on the shard; then the
    // Shard goes.
    for t in [&a, &b, &d, &e, &g] {
        env.kubectl_ok(&["delete", "tenant", t, "--wait=false"]);
    }
    for t in [&a, &b, &d, &e, &g] {
        env.kubectl_ok(&["wait", "--for=delete", &format!("tenant/{t}"), "--timeout=60s"]);
    }
    for t in [&a, &b, &d] {
        assert!(!schema_on(&pool2, t).await, "schema of {t} dropped on the shard");
        assert_eq!(roles_on(&pool2, t).await, 0, "roles of {t} dropped on the shard");
    }
    let registry: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.tenants")
        .fetch_one(&pool2)
        .await
        .unwrap();
    assert_eq!(registry, 0, "no registry row left on the shard");
    env.kubectl_ok(&["wait", "--for=delete", &format!("shard/{shard}"), "--timeout=60s"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_whose_admin_lacks_createrole_is_refused_with_the_reason() {
    let env = Env::start("e2e_shard_rights").await;
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/shards.tenancy.dev",
        "--timeout=30s",
    ]);
    let (url2, pool2) = second_server_db("rights").await;
    // The same database, through a login without CREATEROLE.
    let weak = format!("weak_{:08x}", rand::random::<u32>());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {weak} LOGIN PASSWORD 'weakpw'"
    )))
    .execute(&pool2)
    .await
    .unwrap();
    let (_, rest) = url2.split_once('@').unwrap();
    let weak_url = format!("postgresql://{weak}:weakpw@{rest}");
    let shard = unique("weak");
    admin_secret(&env, &shard, &weak_url);
    apply(&env, &shard_yaml(&shard, "    tier: x", ""));
    wait_for(Duration::from_secs(30), "the Shard reports the missing right", || {
        env.jsonpath(&["shard", &shard], "{.status.conditions[?(@.type==\"Ready\")].reason}") == "AdminRightsMissing"
    });
    let msg = env.jsonpath(&["shard", &shard], "{.status.conditions[?(@.type==\"Ready\")].message}");
    assert!(msg.contains("CREATEROLE"), "{msg}");
    // A tenant asking for it waits; nothing was created anywhere.
    let t = unique("shw");
    apply(&env, &tenant_yaml(&t, &format!("  placement:\n    shard: {shard}\n")));
    wait_reason(&env, &t, "ShardNotFound");
    assert!(!schema_on(&pool2, &t).await);
    assert!(!schema_on(&env.db.admin, &t).await);
    // The CRD refuses placement by name and by selector at once, and a
    // Shard without its Secret.
    let out = env.kubectl_stdin(
        &["apply"],
        &tenant_yaml(
            &unique("shx"),
            &format!("  placement:\n    shard: {shard}\n    shardSelector: {{}}\n"),
        ),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    let out = env.kubectl_stdin(
        &["apply"],
        "apiVersion: tenancy.dev/v1alpha1\nkind: Shard\nmetadata:\n  name: nosecret\nspec: {}\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adminSecretRef"));
    env.kubectl_ok(&["delete", "tenant", &t]);
    env.kubectl_ok(&["delete", "shard", &shard]);
}

/// Inserts into `items` through the tenant's Secret until `stop`, reading
/// the Secret again after each failure (a move changes its host and port):
/// the values whose INSERT was acknowledged.
async fn writer(
    kubeconfig: std::path::PathBuf,
    tenant: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    let secret_uri = || {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "get",
                "secret",
                "-n",
                NAMESPACE,
                &format!("tenant-{tenant}-db"),
                "-o",
                "jsonpath={.data.uri}",
            ])
            .output()
            .expect("kubectl");
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(String::from_utf8_lossy(&out.stdout).trim())
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    };
    let mut acked = Vec::new();
    let mut n = 0u64;
    let mut conn: Option<PgConnection> = None;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            conn = PgConnection::connect(&secret_uri()).await.ok();
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        n += 1;
        let v = format!("row-{n}");
        let r = sqlx::query("INSERT INTO items (v) VALUES ($1)")
            .bind(&v)
            .execute(conn.as_mut().unwrap())
            .await;
        match r {
            Ok(_) => acked.push(v),
            Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    acked
}

const ITEMS_SET: &str = "apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: default\nspec:\n  migrations:\n    - version: 1\n      name: items\n      sql: \"CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL UNIQUE)\"\n";

/// A Shard on the second server, Ready: (its name, a superuser pool on its
/// database).
async fn ready_shard(env: &Env, label: &str) -> (String, PgPool, String) {
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/shards.tenancy.dev",
        "--timeout=30s",
    ]);
    let (url2, pool2) = second_server_db(label).await;
    let shard = unique(label);
    admin_secret(env, &shard, &url2);
    apply(env, &shard_yaml(&shard, "    region: eu", ""));
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("shard/{shard}"),
        "--timeout=60s",
    ]);
    (shard, pool2, url2)
}

/// [`wait_for`], printing the Tenant and the operator's log on a timeout.
fn wait_tenant(env: &Env, tenant: &str, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            eprintln!(
                "{}",
                env.kubectl_ok(&["get", "tenant", tenant, "-o", "yaml", "--show-managed-fields"])
            );
            for l in env.operator_log().lines().filter(|l| !l.contains("\"reconciled\"")) {
                eprintln!("{l}");
            }
            // The move's state in the message itself: a CI log that keeps
            // only the head and the tail of the output still says why.
            let state = env.jsonpath(
                &["tenant", tenant],
                "moving={.status.moving} lastMove={.status.lastMove} conditions={.status.conditions[?(@.type==\"Placed\")]}",
            );
            panic!("timed out after {limit:?} waiting for {what}: {state}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tenant on the default shard following the MigrationSet `default`
/// (its `items` table), Ready: its name.
fn tenant_with_items(env: &Env, prefix: &str) -> String {
    tenant_with_items_on(env, prefix, "default")
}

/// [`tenant_with_items`] on `shard`.
fn tenant_with_items_on(env: &Env, prefix: &str, shard: &str) -> String {
    apply(env, ITEMS_SET);
    let t = unique(prefix);
    apply(env, &tenant_yaml(&t, &format!("  placement:\n    shard: {shard}\n")));
    env.wait_ready(&t);
    env.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Complete",
        "migrationset/default",
        "--timeout=60s",
    ]);
    t
}

/// Asks for `tenant` to move to `shard`.
fn ask_move(env: &Env, tenant: &str, shard: &str) {
    let patch = format!("{{\"spec\":{{\"placement\":{{\"shard\":\"{shard}\"}}}}}}");
    env.kubectl_ok(&["patch", "tenant", tenant, "--type=merge", "-p", &patch]);
}

fn last_move(env: &Env, tenant: &str, field: &str) -> String {
    env.jsonpath(&["tenant", tenant], &format!("{{.status.lastMove.{field}}}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moves_to_another_shard_under_write_load_and_loses_nothing() {
    let env = Env::start("e2e_move").await;
    let (shard, pool2, url2) = ready_shard(&env, "mv").await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let t = tenant_with_items(&env, "mov");
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), "default");

    // An application on both shards' gateways (one pool each), routed by
    // tenant.
    let gw_password = env.secret_value("tenant-gateway-db", "password");
    let gw_user = format!("gw_{}", env.db.name);
    let gw_on = |port: String, db: &str| format!("postgresql://{gw_user}:{gw_password}@127.0.0.1:{port}/{db}");
    let direct = |url: String| async move {
        tenancy_client::Gateway::connect_direct(
            url.parse().unwrap(),
            sqlx::postgres::PgPoolOptions::new().max_connections(2),
        )
        .await
        .unwrap()
    };
    let db2 = url2.rsplit('/').next().unwrap().to_string();
    let sharded = tenancy_client::ShardedGateway::new(vec![
        (
            "default".into(),
            direct(gw_on(support::env("TEST_PG_PORT"), &env.db.name)).await,
        ),
        (shard.clone(), direct(gw_on(support::env("TEST_PG2_PORT"), &db2)).await),
    ]);
    let mut tx = sharded.begin(&t, "app", "req-before").await.unwrap();
    sqlx::query("INSERT INTO items (v) VALUES ('gateway-before')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(sharded.shard_of(&t), Some("default"));

    // A writer throughout the move.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(env.kubeconfig.clone(), t.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    ask_move(&env, &t, &shard);
    wait_tenant(&env, &t, Duration::from_secs(90), "the move to succeed", || {
        last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), shard);
    env.wait_ready(&t);
    // Writes go on at the target.
    let count_on_target = || async {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM tenant_{}.items",
            t.replace('-', "_")
        )))
        .fetch_one(&pool2)
        .await
        .unwrap_or(0)
    };
    let before = count_on_target().await;
    let mut grew = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if count_on_target().await > before + 5 {
            grew = true;
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = w.await.unwrap();
    assert!(grew, "the writer goes on writing at the target");
    assert!(acked.len() > 20, "the writer wrote: {}", acked.len());
    // Every acknowledged row is on the target exactly once; ids did not
    // collide (the sequence went on).
    let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, v FROM tenant_{}.items",
        t.replace('-', "_")
    )))
    .fetch_all(&pool2)
    .await
    .unwrap();
    assert_each_once(&rows, &acked);
    let ids: std::collections::HashSet<i64> = rows.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), rows.len());
    // Nothing of it on the source.
    assert!(!schema_on(&pool1, &t).await, "schema dropped on the source");
    assert_eq!(roles_on(&pool1, &t).await, 0, "roles dropped on the source");
    let registry: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.tenants WHERE name = $1")
        .bind(&t)
        .fetch_one(&pool1)
        .await
        .unwrap();
    assert_eq!(registry, 0, "registry row only on the target");
    let registry: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.tenants WHERE name = $1")
        .bind(&t)
        .fetch_one(&pool2)
        .await
        .unwrap();
    assert_eq!(registry, 1);
    // The Secret points at the target; its password works there.
    let port2 = support::env("TEST_PG2_PORT");
    assert_eq!(secret_field(&env, &t, "port"), port2);
    let window = last_move(&env, &t, "writeUnavailableMs");
    println!(
        "move: write-unavailable window {window} ms, {} rows acknowledged",
        acked.len()
    );
    assert!(!window.is_empty());
    // Plain CREATEROLE admins: the copy strategy, saying why.
    assert_eq!(last_move(&env, &t, "strategy"), "Copy");
    let why = last_move(&env, &t, "message");
    assert!(why.contains("superusers only"), "{why}");
    // The same ShardedGateway follows the move, no restart.
    let mut routed = false;
    for _ in 0..50 {
        if let Ok(mut tx) = sharded.begin(&t, "app", "req-after").await {
            sqlx::query("INSERT INTO items (v) VALUES ('gateway-after')")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(routed, "the sharded gateway reaches the tenant after its move");
    assert_eq!(sharded.shard_of(&t), Some(shard.as_str()));
    let both: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM tenant_{}.items WHERE v IN ('gateway-before', 'gateway-after')",
        t.replace('-', "_")
    )))
    .fetch_one(&pool2)
    .await
    .unwrap();
    assert_eq!(
        both, 2,
        "the row written through the gateway before the move moved, the one after landed there"
    );
    // The audit chain moved with it and verifies at the target, with the
    // keys derived from the moved salt.
    assert_audit_verifies(&env, &t, &url2);
}

/// `tenant-operator audit verify` of `tenant` on the database of `url`
/// succeeds.
fn assert_audit_verifies(env: &Env, tenant: &str, url: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(["audit", "verify", "--tenant", tenant])
        .env("KUBECONFIG", &env.kubeconfig)
        .env("DATABASE_URL", url)
        .env("OPERATOR_NAMESPACE", NAMESPACE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify at the target: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every acknowledged value is among `rows` exactly once.
fn assert_each_once(rows: &[(i64, String)], acked: &[String]) {
    let on_target: std::collections::HashMap<&str, usize> = rows.iter().fold(Default::default(), |mut m, (_, v)| {
        *m.entry(v.as_str()).or_insert(0) += 1;
        m
    });
    for v in acked {
        assert_eq!(on_target.get(v.as_str()), Some(&1), "{v} on the target exactly once");
    }
}

/// The admin role of the second server's test database (from its URL).
fn admin_of(url: &str) -> String {
    url.trim_start_matches("postgresql://")
        .split(':')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_to_a_shard_that_is_down_rolls_back_and_the_tenant_keeps_serving() {
    let env = Env::start("e2e_move_down").await;
    let (shard, pool2, url2) = ready_shard(&env, "dn").await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let t = tenant_with_items(&env, "mvd");
    // The target goes down for the operator: its admin cannot log in, its
    // sessions are ended.
    let admin = admin_of(&url2);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {admin} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{admin}'"
    )))
    .execute(&pool2)
    .await
    .unwrap();
    ask_move(&env, &t, &shard);
    wait_tenant(&env, &t, Duration::from_secs(60), "the move to fail", || {
        last_move(&env, &t, "result") == "Failed"
    });
    // Still on the source, serving.
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), "default");
    env.wait_ready(&t);
    let mut wrote = false;
    for _ in 0..60 {
        if let Ok(mut c) = PgConnection::connect(&secret_field(&env, &t, "uri")).await {
            if sqlx::query("INSERT INTO items (v) VALUES ('after-failed-move')")
                .execute(&mut c)
                .await
                .is_ok()
            {
                wrote = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(wrote, "the app writes at the source after the failed move");
    let placed = env.jsonpath(&["tenant", &t], "{.status.conditions[?(@.type==\"Placed\")].reason}");
    assert_eq!(placed, "MoveFailed");
    // The target back: the failed move's copy there is dropped.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {admin} LOGIN")))
        .execute(&pool2)
        .await
        .unwrap();
    wait_tenant(&env, &t, Duration::from_secs(60), "the rollback to finish", || {
        env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert!(!schema_on(&pool2, &t).await, "nothing of the tenant on the target");
    let registry: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.tenants WHERE name = $1")
        .bind(&t)
        .fetch_one(&pool2)
        .await
        .unwrap_or(0);
    assert_eq!(registry, 0);
    assert!(schema_on(&pool1, &t).await, "the tenant is whole on the source");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_during_the_copy_rolls_back_then_moves_again() {
    let mut env = Env::start("e2e_move_kill").await;
    let (shard, pool2, _) = ready_shard(&env, "kl").await;
    let t = tenant_with_items(&env, "mvk");
    // Enough rows that the copy takes a moment.
    let su = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let pool1 = su.clone();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO tenant_{}.items (v) SELECT 'bulk-' || g FROM generate_series(1, 1000000) g",
        t.replace('-', "_")
    )))
    .execute(&su)
    .await
    .unwrap();
    ask_move(&env, &t, &shard);
    wait_tenant(&env, &t, Duration::from_secs(60), "the copy to start", || {
        env.jsonpath(&["tenant", &t], "{.status.moving.phase}") == "Copying"
    });
    env.stop_operator();
    env.start_operator();
    wait_tenant(
        &env,
        &t,
        Duration::from_secs(120),
        "the move to finish after the restart",
        || last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty(),
    );
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), shard);
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM tenant_{}.items",
        t.replace('-', "_")
    )))
    .fetch_one(&pool2)
    .await
    .unwrap();
    assert_eq!(n, 1_000_000, "every row on the target, once");
    assert!(!schema_on(&pool1, &t).await, "nothing left on the source");
    assert_eq!(roles_on(&pool1, &t).await, 0);
    env.wait_ready(&t);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_shard_moves_its_tenants_away_one_at_a_time() {
    let env = Env::start("e2e_drain").await;
    let (shard, pool2, _) = ready_shard(&env, "dr").await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    apply(&env, ITEMS_SET);
    let (a, b, pinned) = (unique("dra"), unique("drb"), unique("drp"));
    for t in [&a, &b, &pinned] {
        apply(&env, &tenant_yaml(t, &format!("  placement:\n    shard: {shard}\n")));
    }
    for t in [&a, &b, &pinned] {
        env.wait_ready(t);
        assert_eq!(env.jsonpath(&["tenant", t], "{.status.shard}"), shard);
    }
    // a and b no longer pinned: placed tenants stay where they are.
    for t in [&a, &b] {
        env.kubectl_ok(&[
            "patch",
            "tenant",
            t,
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/placement"}]"#,
        ]);
    }
    apply(
        &env,
        &shard_yaml(&shard, "    region: eu", "  state: Draining\n  maxConcurrentMoves: 1\n"),
    );
    for t in [&a, &b] {
        wait_tenant(
            &env,
            t,
            Duration::from_secs(120),
            "the drain to move the tenant",
            || {
                env.jsonpath(&["tenant", t], "{.status.shard}") == "default"
                    && last_move(&env, t, "result") == "Succeeded"
                    && env.jsonpath(&["tenant", t], "{.status.moving}").is_empty()
            },
        );
        assert!(schema_on(&pool1, t).await, "{t} on the default shard");
        assert!(!schema_on(&pool2, t).await, "{t} gone from the draining shard");
    }
    // The one pinned by spec stays, and says why.
    wait_for(Duration::from_secs(30), "the pinned tenant to report the drain", || {
        env.jsonpath(
            &["tenant", &pinned],
            "{.status.conditions[?(@.type==\"Placed\")].reason}",
        ) == "ShardDraining"
    });
    assert_eq!(env.jsonpath(&["tenant", &pinned], "{.status.shard}"), shard);
    // One at a time: the two moves did not overlap.
    let window = |t: &str| {
        let start = last_move(&env, t, "startedAt");
        let end = last_move(&env, t, "finishedAt");
        (
            chrono::DateTime::parse_from_rfc3339(&start).unwrap(),
            chrono::DateTime::parse_from_rfc3339(&end).unwrap(),
        )
    };
    let ((s1, e1), (s2, e2)) = (window(&a), window(&b));
    assert!(e1 <= s2 || e2 <= s1, "moves overlapped: {s1}..{e1} and {s2}..{e2}");
    // Once empty, the Shard can go.
    env.kubectl_ok(&["delete", "tenant", &pinned, "--timeout=60s"]);
    env.kubectl_ok(&["delete", "shard", &shard, "--timeout=60s"]);
}

/// A tenant moved from the default shard to a new one, committed, whose
/// source (the operator's own database) then goes down for the operator
/// before it drops its copy there (the Env holds the move 4 s after its
/// commit): (tenant, target shard, superuser pools on source and target).
async fn committed_with_the_source_down(env: &Env, label: &str, prefix: &str) -> (String, String, PgPool, PgPool) {
    let (shard, pool2, _) = ready_shard(env, label).await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let t = tenant_with_items(env, prefix);
    ask_move(env, &t, &shard);
    wait_tenant(env, &t, Duration::from_secs(60), "the commit", || {
        env.jsonpath(&["tenant", &t], "{.status.moving.phase}") == "CleaningUp"
    });
    let admin = &env.admin_role;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {admin} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{admin}'"
    )))
    .execute(&pool1)
    .await
    .unwrap();
    wait_tenant(
        env,
        &t,
        Duration::from_secs(60),
        "the pending drop to be reported",
        || {
            env.jsonpath(&["tenant", &t], "{.status.conditions[?(@.type==\"Placed\")].reason}")
                == "SourceCleanupPending"
        },
    );
    (t, shard, pool1, pool2)
}

/// The operator's admin may log in to the default shard again.
async fn source_up(env: &Env, pool1: &PgPool) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {} LOGIN", env.admin_role)))
        .execute(pool1)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_down_after_the_commit_leaves_the_tenant_on_the_target_and_its_drop_waits() {
    let env = Env::start_with(
        "e2e_move_src",
        None,
        &[("TENANT_OPERATOR_TEST_MOVE_PAUSE_AFTER_COMMIT_MS", "4000")],
    )
    .await;
    let (t, shard, pool1, pool2) = committed_with_the_source_down(&env, "sc", "mvs").await;
    // It serves from the target meanwhile: one live copy.
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), shard);
    let mut c = PgConnection::connect(&secret_field(&env, &t, "uri"))
        .await
        .expect("app login at the target");
    sqlx::query("INSERT INTO items (v) VALUES ('while-the-source-is-down')")
        .execute(&mut c)
        .await
        .unwrap();
    let source_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(format!("tenant_{}_app", t.replace('-', "_")))
        .fetch_one(&pool1)
        .await
        .unwrap();
    assert!(!source_login, "the source's copy cannot be logged into");
    // The source back: its copy is dropped.
    source_up(&env, &pool1).await;
    wait_tenant(&env, &t, Duration::from_secs(60), "the source's drop", || {
        env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert!(!schema_on(&pool1, &t).await);
    assert_eq!(roles_on(&pool1, &t).await, 0);
    assert!(schema_on(&pool2, &t).await);
    assert_eq!(last_move(&env, &t, "result"), "Succeeded");
}

/// The write-unavailable window of a move of a large tenant, beside the
/// same schema copied by hand (`pg_dump -Fc` of the source piped into
/// `pg_restore` on the target, as a superuser) in the same run: a
/// benchmark, not run by `make test` (minutes per GiB). Run it with
/// `--ignored`; `MOVE_BENCH_MIB` sets the tenant's size (default 256).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: cargo test --test e2e_shards bench_the_move -- --ignored --nocapture"]
async fn bench_the_move_window_of_a_large_tenant() {
    let mib = std::env::var("MOVE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256);
    let env = Env::start("e2e_move_bench").await;
    // Superuser admins on both sides: the Logical strategy.
    let (sa, pool1, url1) = superuser_shard(&env, "ba", 1).await;
    let (sb, pool2, _) = superuser_shard(&env, "bb", 2).await;
    let t = tenant_with_items_on(&env, "mvb", &sa);
    let schema = format!("tenant_{}", t.replace('-', "_"));
    // Rows of ~1 KiB of incompressible text; with its unique index, TOAST
    // and the audit log a row takes ~3.6 KiB: about `mib` MiB in all.
    let rows = mib * 1024 * 10 / 36;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.items (v) SELECT g || '-' || (SELECT string_agg(md5(k::text || g::text || random()::text), '') FROM generate_series(1, 30) AS k) FROM generate_series(1, {rows}) AS g"
    )))
    .execute(&pool1)
    .await
    .unwrap();
    let bytes: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{schema}' AND c.relkind = 'r'"
    )))
    .fetch_one(&pool1)
    .await
    .unwrap();
    // Baseline: the schema copied by hand, dump piped into restore (what
    // writes stopped for a copy would at best cost).
    let scratch = format!("bench_copy_{:08x}", rand::random::<u32>());
    let su2 = support::env("TEST_PG2_SUPERUSER_URL");
    let (base2, _) = su2.rsplit_once('/').unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {scratch}")))
        .execute(&pool2)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let by_hand = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "pg_dump -Fc --schema={schema} '{url1}' | pg_restore --no-owner --no-acl -d '{base2}/{scratch}'"
        ))
        .status()
        .unwrap();
    let baseline = started.elapsed();
    assert!(by_hand.success());
    // A writer throughout, as an application would.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(env.kubeconfig.clone(), t.clone(), stop.clone()));
    let started = std::time::Instant::now();
    ask_move(&env, &t, &sb);
    wait_tenant(&env, &t, Duration::from_secs(3600), "the move", || {
        last_move(&env, &t, "result") == "Succeeded"
    });
    let whole = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = w.await.unwrap();
    assert_eq!(last_move(&env, &t, "strategy"), "Logical");
    let window: f64 = last_move(&env, &t, "writeUnavailableMs").parse().unwrap();
    println!(
        "logical move of {:.0} MiB ({} rows written during it): write-unavailable {:.2} s (target < 2 s), whole move {:.1} s; pg_dump | pg_restore by hand {:.2} s; window / by-hand ratio {:.3}",
        bytes as f64 / 1048576.0,
        acked.len(),
        window / 1000.0,
        whole.as_secs_f64(),
        baseline.as_secs_f64(),
        window / 1000.0 / baseline.as_secs_f64()
    );
}

/// The operator CLI as a person with the admin DSN `database_url` and the
/// root keys (from the cluster), with the suite's backup store.
fn cli_on(env: &Env, database_url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .env("DATABASE_URL", database_url)
        .env("OPERATOR_NAMESPACE", NAMESPACE)
        .env("BACKUP_STORE", env.backup_store())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tenant-operator {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_before_a_move_restores_on_the_target() {
    let env = Env::start("e2e_move_backup").await;
    let (shard, pool2, url2) = ready_shard(&env, "bk").await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let t = tenant_with_items(&env, "mvb");
    let items = format!("tenant_{}.items", t.replace('-', "_"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {items} (v) VALUES ('one'), ('two'), ('three')"
    )))
    .execute(&pool1)
    .await
    .unwrap();
    // A backup on the source shard, by hand.
    let out = cli_on(&env, &env.admin_url, &["backup", "--tenant", &t]);
    let id = serde_json::from_str::<serde_json::Value>(out.trim().lines().last().unwrap()).unwrap()["manifest"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ask_move(&env, &t, &shard);
    wait_tenant(&env, &t, Duration::from_secs(90), "the move", || {
        last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {items} (v) VALUES ('after-the-move')"
    )))
    .execute(&pool2)
    .await
    .unwrap();
    // The target lists it (its backup records came with the move) and
    // restores it.
    let listed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tenancy.backups b JOIN tenancy.tenants t ON t.uid = b.tenant_uid WHERE t.name = $1 AND b.id = $2",
    )
    .bind(&t)
    .bind(&id)
    .fetch_one(&pool2)
    .await
    .unwrap();
    assert_eq!(listed, 1, "the pre-move backup is listed on the target");
    cli_on(&env, &url2, &["restore", "--tenant", &t, "--backup", &id]);
    let mut values: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT v FROM {items}")))
        .fetch_all(&pool2)
        .await
        .unwrap();
    values.sort();
    assert_eq!(values, ["one", "three", "two"], "the target holds what the backup held");
}

/// A Shard on a database of its own on server `server` (1 or 2) whose
/// admin is the server's superuser (what logical replication needs in
/// PostgreSQL 15), Ready: (its name, a superuser pool on its database, its
/// admin URL).
async fn superuser_shard(env: &Env, label: &str, server: u8) -> (String, PgPool, String) {
    let prefix = if server == 1 { "TEST_PG" } else { "TEST_PG2" };
    let su_url = support::env(&format!("{prefix}_SUPERUSER_URL"));
    let db = format!("l_{label}_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut su)
        .await
        .expect("database");
    let (base, _) = su_url.rsplit_once('/').unwrap();
    let url = format!("{base}/{db}");
    let pool = PgPool::connect(&url).await.expect("superuser pool");
    let shard = unique(label);
    admin_secret(env, &shard, &url);
    apply(env, &shard_yaml(&shard, "    replication: logical", ""));
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        &format!("shard/{shard}"),
        "--timeout=60s",
    ]);
    (shard, pool, url)
}

async fn count(pool: &PgPool, sql: String) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// What of `tenant`'s move's replication objects (publication, slot,
/// subscription, login: all named `tenancy_move_<uid hex>`) a database's
/// server still holds.
async fn replication_leftovers(env: &Env, pool: &PgPool, tenant: &str) -> i64 {
    let name = format!(
        "tenancy_move_{}",
        env.jsonpath(&["tenant", tenant], "{.metadata.uid}").replace('-', "")
    );
    count(
        pool,
        format!(
            "SELECT (SELECT count(*) FROM pg_publication WHERE pubname = '{name}')
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}')
                  + (SELECT count(*) FROM pg_subscription WHERE subname = '{name}')
                  + (SELECT count(*) FROM pg_roles WHERE rolname = '{name}')"
        ),
    )
    .await
}

async fn bulk(pool: &PgPool, t: &str, rows: u32) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO tenant_{}.items (v) SELECT 'bulk-' || g FROM generate_series(1, {rows}) g",
        t.replace('-', "_")
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moves_online_with_logical_replication_and_loses_nothing() {
    let env = Env::start("e2e_move_logical").await;
    let (sa, pool_a, _) = superuser_shard(&env, "la", 1).await;
    let (sb, pool_b, url_b) = superuser_shard(&env, "lb", 2).await;
    let t = tenant_with_items_on(&env, "mvl", &sa);
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), sa);
    bulk(&pool_a, &t, 500_000).await;
    let table = format!("tenant_{}.items", t.replace('-', "_"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(env.kubeconfig.clone(), t.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ask_move(&env, &t, &sb);
    // The tenant serves from the source while its data is copied: its
    // table grows there during `Copying`.
    let mut served_while_copying = false;
    wait_tenant(&env, &t, Duration::from_secs(120), "the move to succeed", || {
        if !served_while_copying && env.jsonpath(&["tenant", &t], "{.status.moving.phase}") == "Copying" {
            let rt = tokio::runtime::Handle::current();
            let before =
                tokio::task::block_in_place(|| rt.block_on(count(&pool_a, format!("SELECT count(*) FROM {table}"))));
            std::thread::sleep(Duration::from_millis(300));
            let after =
                tokio::task::block_in_place(|| rt.block_on(count(&pool_a, format!("SELECT count(*) FROM {table}"))));
            let still = env.jsonpath(&["tenant", &t], "{.status.moving.phase}") == "Copying";
            served_while_copying = still && after > before;
        }
        last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert!(
        served_while_copying,
        "the tenant took writes on the source during the copy"
    );
    assert_eq!(last_move(&env, &t, "strategy"), "Logical");
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), sb);
    env.wait_ready(&t);
    // Writes go on at the target (the sequence was carried: no id
    // collides).
    let before = count(&pool_b, format!("SELECT count(*) FROM {table}")).await;
    let mut grew = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if count(&pool_b, format!("SELECT count(*) FROM {table}")).await > before + 5 {
            grew = true;
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = w.await.unwrap();
    assert!(grew, "the writer goes on writing at the target");
    let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, v FROM {table} WHERE v LIKE 'row-%'"
    )))
    .fetch_all(&pool_b)
    .await
    .unwrap();
    assert_each_once(&rows, &acked);
    assert_eq!(
        count(&pool_b, format!("SELECT count(*) FROM {table} WHERE v LIKE 'bulk-%'")).await,
        500_000
    );
    assert_eq!(
        count(&pool_b, format!("SELECT count(DISTINCT id) - count(*) FROM {table}")).await,
        0
    );
    // One copy: nothing of the tenant, nor of the replication, on the
    // source; no subscription left on the target.
    assert!(!schema_on(&pool_a, &t).await, "schema dropped on the source");
    assert_eq!(roles_on(&pool_a, &t).await, 0, "roles dropped on the source");
    assert_eq!(
        count(
            &pool_a,
            format!("SELECT count(*) FROM tenancy.tenants WHERE name = '{t}'")
        )
        .await,
        0
    );
    assert_eq!(
        replication_leftovers(&env, &pool_a, &t).await,
        0,
        "no publication, slot or login on the source"
    );
    assert_eq!(
        replication_leftovers(&env, &pool_b, &t).await,
        0,
        "no subscription on the target"
    );
    assert_eq!(secret_field(&env, &t, "port"), support::env("TEST_PG2_PORT"));
    let window: i64 = last_move(&env, &t, "writeUnavailableMs").parse().unwrap();
    println!(
        "logical move of ~{} MiB: write-unavailable window {window} ms (target < 2000), {} rows acknowledged",
        last_move(&env, &t, "bytes").parse::<i64>().unwrap_or(0) >> 20,
        acked.len()
    );
    assert!(
        window < 10_000,
        "the window is the cutover's, not the copy's: {window} ms"
    );
    // A tenant with a table logical replication could not follow (no
    // primary key: its UPDATEs would fail while published) moves by copy,
    // saying so.
    let u = tenant_with_items_on(&env, "mvn", &sa);
    let u_ = u.replace('-', "_");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE tenant_{u_}_owner; CREATE TABLE tenant_{u_}.nopk (v text); RESET ROLE"
    )))
    .execute(&pool_a)
    .await
    .unwrap();
    ask_move(&env, &u, &sb);
    wait_tenant(&env, &u, Duration::from_secs(90), "the copy move", || {
        last_move(&env, &u, "result") == "Succeeded"
    });
    assert_eq!(last_move(&env, &u, "strategy"), "Copy");
    let why = last_move(&env, &u, "message");
    assert!(why.contains("nopk has no primary key"), "{why}");
    // The audit chain came over with the tables and verifies at the
    // target.
    assert_audit_verifies(&env, &t, &url_b);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_during_a_logical_copy_and_during_its_cutover_rolls_back_and_moves_again() {
    let mut env = Env::start_with(
        "e2e_move_logical_kill",
        None,
        &[("TENANT_OPERATOR_TEST_MOVE_PAUSE_IN_CUTOVER_MS", "4000")],
    )
    .await;
    let (sa, pool_a, _) = superuser_shard(&env, "ka", 1).await;
    let (sb, pool_b, _) = superuser_shard(&env, "kb", 2).await;
    let t = tenant_with_items_on(&env, "mlk", &sa);
    bulk(&pool_a, &t, 1_000_000).await;
    let table = format!("tenant_{}.items", t.replace('-', "_"));
    ask_move(&env, &t, &sb);
    // Killed while the subscription copies.
    wait_tenant(&env, &t, Duration::from_secs(60), "the subscription", || {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| rt.block_on(replication_leftovers(&env, &pool_b, &t))) >= 1
    });
    env.stop_operator();
    assert!(
        replication_leftovers(&env, &pool_a, &t).await > 0,
        "the cut-off copy left its slot"
    );
    env.start_operator();
    // Killed again in the cutover, writes stopped on the source.
    wait_tenant(&env, &t, Duration::from_secs(120), "the cutover", || {
        env.jsonpath(&["tenant", &t], "{.status.moving.phase}") == "CuttingOver"
    });
    assert_eq!(
        last_move(&env, &t, "result"),
        "Interrupted",
        "the first attempt was rolled back"
    );
    env.stop_operator();
    env.start_operator();
    wait_tenant(&env, &t, Duration::from_secs(120), "the move to finish", || {
        last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), sb);
    assert_eq!(last_move(&env, &t, "strategy"), "Logical");
    assert_eq!(count(&pool_b, format!("SELECT count(*) FROM {table}")).await, 1_000_000);
    assert!(!schema_on(&pool_a, &t).await, "nothing left on the source");
    assert_eq!(roles_on(&pool_a, &t).await, 0);
    assert_eq!(replication_leftovers(&env, &pool_a, &t).await, 0);
    assert_eq!(replication_leftovers(&env, &pool_b, &t).await, 0);
    env.wait_ready(&t);
    let mut c = PgConnection::connect(&secret_field(&env, &t, "uri"))
        .await
        .expect("app login at the target");
    sqlx::query("INSERT INTO items (v) VALUES ('after')")
        .execute(&mut c)
        .await
        .expect("the sequence goes on at the target");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_during_a_logical_copy_is_not_lost() {
    let env = Env::start("e2e_move_logical_ddl").await;
    let (sa, pool_a, _) = superuser_shard(&env, "da", 1).await;
    let (sb, pool_b, _) = superuser_shard(&env, "db", 2).await;
    let t = tenant_with_items_on(&env, "mld", &sa);
    bulk(&pool_a, &t, 300_000).await;
    let t_ = t.replace('-', "_");
    ask_move(&env, &t, &sb);
    wait_tenant(&env, &t, Duration::from_secs(60), "the subscription", || {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| rt.block_on(replication_leftovers(&env, &pool_b, &t))) >= 1
    });
    // A migration while the data is copied: it runs on the source (the
    // tenant lives there until the commit); logical replication carries
    // no DDL.
    apply(
        &env,
        &format!(
            "{ITEMS_SET}    - version: 2\n      name: note\n      sql: \"ALTER TABLE items ADD COLUMN note text NOT NULL DEFAULT 'n'\"\n"
        ),
    );
    wait_tenant(
        &env,
        &t,
        Duration::from_secs(120),
        "the move's first attempt to end",
        || matches!(last_move(&env, &t, "result").as_str(), "Failed" | "Succeeded"),
    );
    // Either the migration ran on the source during the copy (the cutover
    // sees the schemas differ: rolled back, and the retried move copies the
    // migrated schema), or it waited for the move (its lock is held from the
    // cutover to the commit) and ran on the target: in both the migration
    // is there, with every row.
    let first = last_move(&env, &t, "result");
    let why = last_move(&env, &t, "message");
    println!("first attempt: {first}: {why}");
    if first == "Failed" {
        // Rolled back: the source serves, with the migration; the target
        // holds nothing; a spec change tries again.
        assert!(why.contains("schema changed") || why.contains("subscription"), "{why}");
        assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), sa);
        wait_tenant(&env, &t, Duration::from_secs(60), "the rollback", || {
            env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
        });
        assert!(!schema_on(&pool_b, &t).await);
        assert_eq!(replication_leftovers(&env, &pool_b, &t).await, 0);
        assert_eq!(replication_leftovers(&env, &pool_a, &t).await, 0);
        env.kubectl_ok(&[
            "patch",
            "tenant",
            &t,
            "--type=merge",
            "-p",
            "{\"spec\":{\"displayName\":\"retry\"}}",
        ]);
        wait_tenant(&env, &t, Duration::from_secs(120), "the retried move", || {
            last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
        });
    }
    assert_eq!(env.jsonpath(&["tenant", &t], "{.status.shard}"), sb);
    env.kubectl_ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Complete",
        "migrationset/default",
        "--timeout=120s",
    ]);
    // Wherever it ran, the migration is in the tenant's schema on the
    // shard it lives on, with every row.
    wait_tenant(&env, &t, Duration::from_secs(60), "the column on the target", || {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            rt.block_on(count(
                &pool_b,
                format!("SELECT count(*) FROM tenant_{t_}.items WHERE note = 'n'"),
            ))
        }) == 300_000
    });
    assert!(!schema_on(&pool_a, &t).await);
    assert_eq!(replication_leftovers(&env, &pool_a, &t).await, 0);
    assert_eq!(replication_leftovers(&env, &pool_b, &t).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_backup_store_a_copy_move_goes_through_a_private_folder_and_leaves_nothing() {
    let env = Env::start_with("e2e_move_nostore", None, &[("BACKUP_STORE", "")]).await;
    let (shard, pool2, _) = ready_shard(&env, "ns").await;
    let pool1 = PgPool::connect(&env.db.superuser_url).await.unwrap();
    let t = tenant_with_items(&env, "mvn");
    bulk(&pool1, &t, 20_000).await;
    ask_move(&env, &t, &shard);
    wait_tenant(&env, &t, Duration::from_secs(90), "the move", || {
        last_move(&env, &t, "result") == "Succeeded" && env.jsonpath(&["tenant", &t], "{.status.moving}").is_empty()
    });
    assert_eq!(last_move(&env, &t, "strategy"), "Copy");
    assert_eq!(
        count(
            &pool2,
            format!("SELECT count(*) FROM tenant_{}.items", t.replace('-', "_"))
        )
        .await,
        20_000
    );
    assert!(!schema_on(&pool1, &t).await);
    // The sealed dump went with its folder; no backup is recorded.
    let hex = env.jsonpath(&["tenant", &t], "{.metadata.uid}").replace('-', "");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(&hex))
        .collect();
    assert!(left.is_empty(), "the move's folder is gone: {left:?}");
    assert_eq!(
        count(
            &pool2,
            format!("SELECT count(*) FROM tenancy.backups b JOIN tenancy.tenants t ON t.uid = b.tenant_uid WHERE t.name = '{t}'")
        )
        .await,
        0
    );
    env.wait_ready(&t);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_deleted_while_its_source_copy_waits_is_dropped_on_both_shards() {
    let env = Env::start_with(
        "e2e_move_del",
        None,
        &[("TENANT_OPERATOR_TEST_MOVE_PAUSE_AFTER_COMMIT_MS", "4000")],
    )
    .await;
    let (t, _, pool1, pool2) = committed_with_the_source_down(&env, "dl", "mvx").await;
    env.kubectl_ok(&["delete", "tenant", &t, "--wait=false"]);
    // The delete waits for the source: the Tenant stays, its finalizer on.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(env.jsonpath(&["tenant", &t], "{.metadata.name}"), t, "the Tenant waits");
    assert!(schema_on(&pool1, &t).await, "the source's copy is still there");
    source_up(&env, &pool1).await;
    wait_for(Duration::from_secs(90), "the Tenant to go", || {
        !env.kubectl(&["get", "tenant", &t]).status.success()
    });
    for pool in [&pool1, &pool2] {
        assert!(!schema_on(pool, &t).await, "no schema left");
        assert_eq!(roles_on(pool, &t).await, 0, "no role left");
        assert_eq!(
            count(pool, format!("SELECT count(*) FROM tenancy.tenants WHERE name = '{t}'")).await,
            0,
            "no registry row left"
        );
    }
}
