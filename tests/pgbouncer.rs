//! The data path through a real PgBouncer in transaction pooling mode
//! (scripts/with-pgbouncer.sh, started by the test command), with the
//! non-superuser admin: many tenants over few server connections, each
//! transaction confined to its tenant, nothing carried from one transaction
//! to the next on a reused server connection, audit values recorded, and a
//! suspend taking effect under load without disturbing other tenants.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::postgres::PgPoolOptions;
use support::tenant::Tenant;
use support::{env, unique, TestDb};
use tenancy_client::{Error, Gateway};
use tenant_operator::api::TenantState;
use tenant_operator::pg;
use tenant_operator::pg::gateway::GatewayName;

struct Env {
    db: TestDb,
    gw: GatewayName,
    password: String,
}

async fn setup(label: &str) -> Env {
    let (db, gw, password) = support::gateway_db(label).await;
    // PgBouncer looks the gateway's verifier up through its auth login,
    // which (like everyone) needs CONNECT on the hardened database.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT CONNECT ON DATABASE {} TO pgbouncer_auth",
        db.name
    )))
    .execute(&db.admin)
    .await
    .expect("grant auth login");
    Env { db, gw, password }
}

impl Env {
    fn pooler_url(&self) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}",
            self.gw,
            self.password,
            env("TEST_PGBOUNCER_PORT"),
            self.db.name
        )
    }

    async fn gateway(&self, clients: u32) -> Gateway {
        Gateway::connect_with(
            self.pooler_url().parse().unwrap(),
            PgPoolOptions::new().max_connections(clients),
        )
        .await
        .expect("library pool through PgBouncer")
    }

    /// Tenants with a table `items` holding one row: their own name.
    async fn tenants(&self, n: usize) -> Vec<Tenant> {
        let names: Vec<String> = (0..n).map(|i| unique(&format!("pb{i}"))).collect();
        let mut tenants: Vec<Tenant> = futures::stream::iter(names)
            .map(|n| async move {
                let mut t = Tenant::new(&n);
                t.gateway = Some(self.gw.to_string());
                for attempt in 1.. {
                    match t.converge(&self.db).await {
                        Ok(_) => break,
                        Err(_) if attempt < 10 => tokio::time::sleep(Duration::from_millis(20 * attempt)).await,
                        Err(e) => panic!("provisioning {}: {e}", t.name),
                    }
                }
                t
            })
            .buffer_unordered(4)
            .collect()
            .await;
        let mut sql = String::new();
        for t in &tenants {
            sql.push_str(&format!(
                "SET ROLE {o}; CREATE TABLE {s}.items (id serial PRIMARY KEY, v text); INSERT INTO {s}.items (v) VALUES ('{n}'); RESET ROLE;\n",
                o = t.name.owner_role(),
                s = t.name.schema(),
                n = t.name
            ));
        }
        let mut su = self.db.superuser().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut su)
            .await
            .expect("seed");
        // The audit triggers on the new tables.
        for t in &mut tenants {
            t.converge(&self.db).await.expect("converge after seeding");
        }
        tenants
    }

    async fn server_connections(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()")
            .bind(self.gw.as_str())
            .fetch_one(&self.db.admin)
            .await
            .unwrap()
    }
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

#[tokio::test]
async fn fifty_tenants_over_five_server_connections_each_see_only_their_own_rows() {
    let env = setup("pb_matrix").await;
    let pool_size: i64 = std::env::var("TEST_PGBOUNCER_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let tenants = env.tenants(50).await;
    let gateway = env.gateway(25).await;
    let other = tenants[1].name.schema();
    // Every tenant, 4 requests each, 25 at once over PgBouncer's 5.
    let work: Vec<(usize, usize)> = (0..tenants.len()).flat_map(|i| (0..4).map(move |r| (i, r))).collect();
    let max_seen = Arc::new(AtomicU64::new(0));
    futures::stream::iter(work)
        .map(|(i, r)| {
            let (gateway, t, other, max_seen) = (&gateway, &tenants[i], other.clone(), max_seen.clone());
            let env = &env;
            async move {
                let mut tx = gateway
                    .begin(t.name.as_str(), "matrix", &format!("{i}-{r}"))
                    .await
                    .expect("begin");
                let rows: Vec<String> = sqlx::query_scalar("SELECT v FROM items")
                    .fetch_all(&mut *tx)
                    .await
                    .expect("own rows");
                assert_eq!(rows, vec![t.name.to_string()], "tenant {} saw {rows:?}", t.name);
                let seen = env.server_connections().await as u64;
                max_seen.fetch_max(seen, Ordering::Relaxed);
                if i != 1 && r == 0 {
                    // Another tenant's schema, named outright: refused.
                    let e = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT v FROM {other}.items")))
                        .fetch_all(&mut *tx)
                        .await
                        .unwrap_err();
                    assert_eq!(sqlstate(&e), "42501", "{e}");
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        })
        .buffer_unordered(25)
        .collect::<Vec<()>>()
        .await;
    let max_seen = max_seen.load(Ordering::Relaxed) as i64;
    assert!(
        max_seen >= 1 && max_seen <= pool_size,
        "PgBouncer used {max_seen} server connections (pool {pool_size})"
    );
    // A query without picking a tenant: the gateway reads nothing.
    // (Outside a transaction, through PgBouncer 1.18, only the simple query
    // protocol: an extended-protocol query may span two server connections.)
    let e = sqlx::raw_sql("SELECT v FROM items")
        .execute(gateway.pool())
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42P01", "{e}");
    let e = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SELECT v FROM {other}.items")))
        .execute(gateway.pool())
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
}

#[tokio::test]
async fn nothing_of_a_transaction_survives_on_a_reused_server_connection() {
    let env = setup("pb_reuse").await;
    let mut tenants = env.tenants(3).await;
    // Distinct caps per tenant, so a leftover would show.
    for (i, t) in tenants.iter_mut().enumerate() {
        t.spec.database.statement_timeout = format!("{}ms", 1001 + i).into();
        t.spec.database.work_mem = format!("{}kB", 1100 + 10 * i).into();
        t.converge(&env.db).await.unwrap();
    }
    // One client connection: every transaction goes through PgBouncer to
    // whichever server connection is free (mostly the same one).
    let gateway = env.gateway(1).await;
    // The application_name the client logged in with, as PgBouncer keeps
    // it for the client: what every non-tenant transaction must see.
    let initial: String = sqlx::raw_sql("SELECT current_setting('application_name')")
        .fetch_one(gateway.pool())
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert!(!initial.starts_with("tenant:"), "{initial:?}");
    let mut pids = Vec::new();
    for round in 0..60 {
        let (i, t) = (round % 3, &tenants[round % 3]);
        let mut tx = gateway
            .begin(t.name.as_str(), &format!("actor-{round}"), &format!("req-{round}"))
            .await
            .unwrap();
        let row: (i32, String, String, String, String, String, String) = sqlx::query_as(
            "SELECT pg_backend_pid(), current_user::text, current_setting('search_path'), current_setting('statement_timeout'),
                    current_setting('work_mem'), current_setting('tenancy.actor'), current_setting('tenancy.request_id')",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        pids.push(row.0);
        assert_eq!(row.1, t.name.app_role());
        assert_eq!(row.2, t.name.schema());
        assert_eq!(row.3, format!("{}ms", 1001 + i));
        assert_eq!(row.4, format!("{}kB", 1100 + 10 * i));
        assert_eq!(
            (row.5.as_str(), row.6.as_str()),
            (format!("actor-{round}").as_str(), format!("req-{round}").as_str())
        );
        // The begin message names the tenant, for the watchdog, and Postgres
        // shows it to other sessions while the transaction lasts.
        let app_name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(app_name, format!("tenant:{}", t.name));
        let shown: String = sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(row.0)
            .fetch_one(&env.db.admin)
            .await
            .unwrap();
        assert_eq!(shown, app_name);
        // Whatever the transaction sets LOCAL itself dies with it too.
        // And what code bypassing the library leaves at session level is
        // discarded by the pooler (server_reset_query = DISCARD ALL).
        sqlx::raw_sql("SET LOCAL work_mem = '77MB'; SELECT set_config('tenancy.actor', 'mallory', true); SET enable_seqscan = off; SET tenancy.request_id = 'leak'; SET LOCAL application_name = 'tenant:mallory'; SET LOCAL ROLE NONE")
            .execute(&mut *tx)
            .await
            .unwrap();
        if round % 2 == 0 {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        // The next transaction outside any tenant: the gateway, as it logged in.
        let mut tx = gateway.pool().begin().await.unwrap();
        let row: (String, String, String, String, String, String) = sqlx::query_as(
            "SELECT current_user::text, current_setting('search_path'), current_setting('statement_timeout'),
                    current_setting('work_mem') || current_setting('enable_seqscan'), coalesce(current_setting('tenancy.actor', true), '') || coalesce(current_setting('tenancy.request_id', true), ''),
                    current_setting('application_name')",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            row,
            (
                env.gw.to_string(),
                "\"\"".into(),
                "0".into(),
                "4MBon".into(),
                String::new(),
                initial.clone()
            ),
            "round {round}"
        );
    }
    let distinct: HashSet<i32> = pids.iter().copied().collect();
    assert!(
        distinct.len() < pids.len() / 2,
        "server connections were not reused: {} pids over {} transactions",
        distinct.len(),
        pids.len()
    );
}

#[tokio::test]
async fn audit_entries_written_through_the_pooler_carry_actor_and_request_id() {
    let env = setup("pb_audit").await;
    let tenants = env.tenants(2).await;
    let gateway = env.gateway(2).await;
    for (t, actor, req) in [(&tenants[0], "alice@a", "req-a-1"), (&tenants[1], "bob@b", "req-b-1")] {
        let mut tx = gateway.begin(t.name.as_str(), actor, req).await.unwrap();
        sqlx::query("INSERT INTO items (v) VALUES ('new')")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("UPDATE items SET v = 'changed' WHERE v = 'new'")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut su = env.db.superuser().await;
    for (t, actor, req) in [(&tenants[0], "alice@a", "req-a-1"), (&tenants[1], "bob@b", "req-b-1")] {
        let rows: Vec<(String, bool, Option<String>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT actor, actor_given, request_id, operation FROM {}._tenancy_audit WHERE table_name = 'items' ORDER BY id",
            t.name.schema()
        )))
        .fetch_all(&mut su)
        .await
        .unwrap();
        let ours: Vec<_> = rows.iter().filter(|r| r.2.as_deref() == Some(req)).collect();
        assert_eq!(ours.len(), 2, "{rows:?}");
        assert!(ours.iter().all(|r| r.0 == actor && r.1), "{rows:?}");
    }
}

#[tokio::test]
async fn a_suspend_under_load_refuses_the_tenant_within_a_second_and_spares_the_others() {
    let env = setup("pb_suspend").await;
    let mut tenants = env.tenants(4).await;
    let gateway = env.gateway(12).await;
    let stop = Arc::new(AtomicBool::new(false));
    let suspended_at: Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    let mut workers = Vec::new();
    for (i, t) in tenants.iter().enumerate() {
        for _ in 0..3 {
            let (gateway, stop, at, name) = (gateway.clone(), stop.clone(), suspended_at.clone(), t.name.to_string());
            workers.push(tokio::spawn(async move {
                let (mut ok, mut refused_late, mut other_errors, mut ok_late) = (0u64, 0u64, Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let r = async {
                        let mut tx = gateway.begin(&name, "load", "r").await?;
                        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
                            .fetch_one(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        Ok::<(), Error>(())
                    }
                    .await;
                    let late = at.lock().unwrap().is_some_and(|t| t.elapsed() > Duration::from_secs(1));
                    match r {
                        Ok(()) if late => ok_late += 1,
                        Ok(()) => ok += 1,
                        Err(Error::TenantNotActive(_)) => refused_late += late as u64,
                        Err(e) => other_errors.push(e.to_string()),
                    }
                }
                (i, ok, ok_late, refused_late, other_errors)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    tenants[0].spec.state = TenantState::Suspended;
    *suspended_at.lock().unwrap() = Some(Instant::now());
    tenants[0].converge(&env.db).await.expect("suspend");
    let took = suspended_at.lock().unwrap().unwrap().elapsed();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for w in workers {
        let (i, ok, ok_late, refused_late, errors) = w.await.unwrap();
        if i == 0 {
            assert_eq!(
                ok_late, 0,
                "tenant {i}: a transaction began more than 1s after the suspend"
            );
            refused += refused_late;
            // Its requests in flight at the suspend may end with their
            // session (terminated); nothing else.
            assert!(errors.len() <= 3, "tenant {i}: {errors:?}");
        } else {
            assert!(errors.is_empty(), "tenant {i} (not suspended) failed: {errors:?}");
            assert!(ok + ok_late > 0, "tenant {i} made no progress");
        }
    }
    assert!(refused > 0, "the suspended tenant was never refused");
    println!("suspend converged in {took:?}; the suspended tenant was refused {refused} times after 1s");
}

/// The venv with psycopg for the Python example (made once, like
/// scripts/with-moto.sh makes moto's).
fn psycopg_python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join(".tools/psycopg-venv");
    let python = venv.join("bin/python");
    let ok = |p: &std::path::Path| {
        std::process::Command::new(p)
            .args(["-c", "import psycopg"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok(&python) {
        let _ = std::fs::remove_dir_all(&venv);
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(
            st.success(),
            "python3 -m venv failed: run scripts/setup.sh (python3-venv)"
        );
        let st = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "psycopg[binary]==3.3.9",
            ])
            .status()
            .expect("pip");
        assert!(st.success(), "installing psycopg[binary] from PyPI failed");
    }
    python
}

#[tokio::test]
async fn the_python_example_routes_each_tenant_and_refuses_the_others() {
    let env = setup("pb_python").await;
    let mut tenants = env.tenants(2).await;
    tenants[1].spec.state = TenantState::Suspended;
    tenants[1].converge(&env.db).await.unwrap();
    let python = psycopg_python();
    let nobody = unique("nobody");
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python/tenant_request.py"
        ))
        .arg(env.pooler_url())
        .args([
            tenants[0].name.as_str(),
            tenants[1].name.as_str(),
            &nobody,
            tenants[0].name.as_str(),
        ])
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = &tenants[0].name;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            format!("{a} ok {a}"),
            format!("{} not-active", tenants[1].name),
            format!("{nobody} unknown"),
            format!("{a} ok {a}")
        ],
    );
    // Every transaction it opened was ended (refused ones left nothing).
    let mut su = env.db.superuser().await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'idle in transaction'",
    )
    .bind(env.gw.as_str())
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(n, 0, "the example left a transaction open");
}

#[tokio::test]
async fn the_caps_watchdog_cancels_a_statement_through_the_pooler_and_the_connection_serves_on() {
    let env = setup("pb_watchdog").await;
    let mut tenants = env.tenants(2).await;
    tenants[0].spec.database.statement_timeout = "2s".into();
    tenants[0].converge(&env.db).await.unwrap();
    pg::watchdog::ensure_visibility(&env.db.admin)
        .await
        .expect("the admin sees tenants' sessions");
    let cfg = pg::watchdog::Config {
        grace: Duration::from_secs(1),
        gateway: Some(env.gw.to_string()),
    };
    let (pool, signalled) = (env.db.admin.clone(), Arc::new(std::sync::Mutex::new(Vec::new())));
    let out = signalled.clone();
    let dog = tokio::spawn(async move {
        loop {
            let o = pg::watchdog::pass(&pool, &cfg).await.expect("watchdog pass");
            out.lock().unwrap().extend(o.signalled);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let gateway = env.gateway(1).await;
    let mut tx = gateway.begin(tenants[0].name.as_str(), "wd", "r-1").await.unwrap();
    sqlx::raw_sql("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await
        .unwrap();
    let t0 = Instant::now();
    let e = sqlx::raw_sql("SELECT pg_sleep(30)")
        .execute(&mut *tx)
        .await
        .expect_err("not cancelled");
    let took = t0.elapsed();
    assert_eq!(sqlstate(&e), "57014", "{e}");
    assert!(took < Duration::from_secs(4), "cancelled after {took:?}");
    tx.rollback().await.unwrap();
    // The same client connection serves the other tenant next, unharmed.
    let mut tx = gateway.begin(tenants[1].name.as_str(), "wd", "r-2").await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT v FROM items")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rows, vec![tenants[1].name.to_string()]);
    tx.commit().await.unwrap();
    assert!(!dog.is_finished(), "the watchdog's pass failed");
    dog.abort();
    let s = signalled.lock().unwrap().clone();
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        (s[0].tenant.as_str(), s[0].via),
        (tenants[0].name.as_str(), pg::watchdog::Via::ApplicationName)
    );
}
