//! The caps watchdog against a real server, with the non-superuser admin
//! (CREATEROLE + pg_signal_backend): a tenant's statement running past its
//! statementTimeout (+ 1 s grace) is cancelled whatever the session set for
//! itself, on its own login and through the gateway library (also after the
//! application changed `application_name`: its locks name the tenant); a
//! session idle in a transaction past its cap is ended; nothing else is
//! touched. The pass function is called directly, as the operator's loop
//! does every second (src/controller/watchdog.rs).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenancy_client::Gateway;
use tenant_operator::pg;
use tenant_operator::pg::gateway::GatewayName;
use tenant_operator::pg::watchdog::{self as wd, Reason, Signal, Via};

struct Env {
    db: TestDb,
    gw: GatewayName,
    gw_password: String,
}

async fn setup(label: &str) -> Env {
    let (db, gw, gw_password) = support::gateway_db(label).await;
    // What the operator's loop does first: see other roles' sessions.
    wd::ensure_visibility(&db.admin)
        .await
        .expect("the non-superuser admin can see tenants' sessions");
    Env { db, gw, gw_password }
}

impl Env {
    /// A tenant (gateway member) with these caps and a table `items`.
    async fn tenant(&self, base: &str, statement: &str, idle: &str) -> Tenant {
        let mut t = Tenant::new(&unique(base));
        t.gateway = Some(self.gw.to_string());
        t.spec.database.statement_timeout = statement.into();
        t.spec.database.idle_in_transaction_timeout = idle.into();
        t.converge(&self.db).await.expect("provision");
        let mut su = self.db.superuser().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET ROLE {o}; CREATE TABLE {s}.items (id serial PRIMARY KEY, v text); INSERT INTO {s}.items (v) VALUES ('x'); RESET ROLE;",
            o = t.name.owner_role(),
            s = t.name.schema()
        )))
        .execute(&mut su)
        .await
        .expect("seed");
        t
    }

    async fn gateway(&self) -> Gateway {
        Gateway::connect_direct(
            self.db.url_as(self.gw.as_str(), &self.gw_password).parse().unwrap(),
            PgPoolOptions::new().max_connections(4),
        )
        .await
        .expect("library pool")
    }

    fn config(&self) -> wd::Config {
        wd::Config {
            grace: Duration::from_secs(1),
            gateway: Some(self.gw.to_string()),
        }
    }

    /// Runs a pass every 200 ms until dropped; collects what it signalled.
    fn watchdog(&self) -> Watchdog {
        let (pool, cfg) = (self.db.admin.clone(), self.config());
        let signalled: Arc<Mutex<Vec<Signal>>> = Default::default();
        let out = signalled.clone();
        let task = tokio::spawn(async move {
            loop {
                let o = wd::pass(&pool, &cfg).await.expect("watchdog pass");
                out.lock().unwrap().extend(o.signalled);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Watchdog { signalled, task }
    }
}

struct Watchdog {
    signalled: Arc<Mutex<Vec<Signal>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchdog {
    fn signalled(&self) -> Vec<Signal> {
        assert!(
            !self.task.is_finished(),
            "the watchdog's pass failed (see its panic above)"
        );
        self.signalled.lock().unwrap().clone()
    }

    /// [`Watchdog::signalled`] once it holds every one of `pids`, or after
    /// 3 s: the session sees its statement cancelled while the pass that
    /// cancelled it has not yet returned its report.
    async fn signalled_for(&self, pids: &[i32]) -> Vec<Signal> {
        let until = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let got = self.signalled();
            if pids.iter().all(|p| got.iter().any(|s| s.pid == *p)) || std::time::Instant::now() > until {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

async fn pid(c: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(c)
        .await
        .unwrap()
}

/// Runs `sql` (a 30 s sleep) and returns how long until it failed and with what.
async fn cancelled_after(c: &mut PgConnection, sql: &'static str) -> (Duration, String) {
    let t0 = Instant::now();
    let e = sqlx::raw_sql(sql)
        .execute(c)
        .await
        .expect_err("the 30 s statement was not cancelled");
    (t0.elapsed(), sqlstate(&e))
}

#[tokio::test]
async fn a_statement_past_the_cap_is_cancelled_whatever_the_session_set() {
    let env = setup("wd_cancel").await;
    let t = env.tenant("wd-cancel", "2s", "60s").await;
    let gateway = env.gateway().await;
    let dog = env.watchdog();

    // Its own app login, timeout switched off.
    let direct = async {
        let mut app = t.app(&env.db).await.unwrap();
        sqlx::raw_sql("SET statement_timeout = 0")
            .execute(&mut app)
            .await
            .unwrap();
        let pid = pid(&mut app).await;
        let (took, code) = cancelled_after(&mut app, "SELECT pg_sleep(30)").await;
        sqlx::raw_sql("SELECT 1")
            .execute(&mut app)
            .await
            .expect("a cancelled statement leaves the session usable");
        (pid, took, code)
    };
    // Through the library: SET LOCAL inside the tenant transaction.
    let gateway_tx = async {
        let mut tx = gateway.begin(t.name.as_str(), "wd", "r-1").await.unwrap();
        sqlx::raw_sql("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .unwrap();
        let pid = pid(&mut tx).await;
        let (took, code) = cancelled_after(&mut tx, "SELECT pg_sleep(30)").await;
        tx.rollback().await.unwrap();
        (pid, took, code)
    };
    // The same, after the application renamed itself: found by its locks.
    let renamed = async {
        let mut tx = gateway.begin(t.name.as_str(), "wd", "r-2").await.unwrap();
        sqlx::raw_sql(
            "SELECT count(*) FROM items; SET LOCAL application_name = 'mine'; SET LOCAL statement_timeout = 0",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        let pid = pid(&mut tx).await;
        let (took, code) = cancelled_after(&mut tx, "SELECT pg_sleep(30)").await;
        tx.rollback().await.unwrap();
        (pid, took, code)
    };
    let (direct, via_gateway, renamed) = tokio::join!(direct, gateway_tx, renamed);
    for (what, (_, took, code)) in [
        ("app login", &direct),
        ("gateway", &via_gateway),
        ("gateway, renamed", &renamed),
    ] {
        assert_eq!(code, "57014", "{what}: not a cancel");
        assert!(
            *took >= Duration::from_secs(2) && *took < Duration::from_secs(4),
            "{what}: cancelled after {took:?} (cap 2 s, grace 1 s)"
        );
    }
    let signalled = dog.signalled_for(&[direct.0, via_gateway.0, renamed.0]).await;
    let of = |pid: i32| {
        signalled
            .iter()
            .find(|s| s.pid == pid)
            .unwrap_or_else(|| panic!("pid {pid} not in {signalled:?}"))
            .clone()
    };
    for ((pid, _, _), via) in [
        (direct, Via::Login),
        (via_gateway, Via::ApplicationName),
        (renamed, Via::Locks),
    ] {
        let s = of(pid);
        assert_eq!(
            (s.tenant.as_str(), s.uid.as_str(), s.reason, s.via, s.cap_ms),
            (t.name.as_str(), t.uid.as_str(), Reason::StatementCancelled, via, 2_000)
        );
    }
    assert_eq!(signalled.len(), 3, "each signalled once: {signalled:?}");
}

#[tokio::test]
async fn a_session_idle_in_a_transaction_past_its_cap_is_ended() {
    let env = setup("wd_idle").await;
    let t = env.tenant("wd-idle", "30s", "2s").await;
    let gateway = env.gateway().await;
    let dog = env.watchdog();

    let mut app = t.app(&env.db).await.unwrap();
    let app_pid = pid(&mut app).await;
    sqlx::raw_sql("SET idle_in_transaction_session_timeout = 0; BEGIN; SELECT count(*) FROM items")
        .execute(&mut app)
        .await
        .unwrap();
    let mut tx = gateway.begin(t.name.as_str(), "wd", "r-1").await.unwrap();
    sqlx::raw_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
        .execute(&mut *tx)
        .await
        .unwrap();
    let gw_pid = pid(&mut tx).await;
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let e = sqlx::raw_sql("SELECT 1")
        .execute(&mut app)
        .await
        .expect_err("the idle transaction's session survived");
    assert!(
        matches!(sqlstate(&e).as_str(), "57P01") || e.as_database_error().is_none(),
        "{e}"
    );
    assert!(
        sqlx::raw_sql("SELECT 1").execute(&mut *tx).await.is_err(),
        "the gateway's idle transaction survived"
    );
    let signalled = dog.signalled_for(&[app_pid, gw_pid]).await;
    let mut got: Vec<(i32, Reason, Via)> = signalled.iter().map(|s| (s.pid, s.reason, s.via)).collect();
    got.sort_by_key(|g| g.0);
    let mut want = vec![
        (app_pid, Reason::IdleSessionEnded, Via::Login),
        (gw_pid, Reason::IdleSessionEnded, Via::ApplicationName),
    ];
    want.sort_by_key(|g| g.0);
    assert_eq!(got, want);
    let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
        .bind(vec![app_pid, gw_pid])
        .fetch_one(&env.db.admin)
        .await
        .unwrap();
    assert_eq!(alive, 0);
}

#[tokio::test]
async fn it_never_touches_the_admin_ops_logins_other_roles_tenants_within_limits_or_without_a_cap() {
    let env = setup("wd_spare").await;
    let capped = env.tenant("wd-capped", "2s", "2s").await;
    let within = env.tenant("wd-within", "30s", "30s").await;
    let uncapped = env.tenant("wd-nocap", "0", "0").await;
    let gateway = env.gateway().await;
    // A role of no tenant, calling itself one of the capped tenant's.
    let plain = format!("plain_{:08x}", rand::random::<u32>());
    let mut su = env.db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {plain} LOGIN PASSWORD 'pw'; GRANT CONNECT ON DATABASE {} TO {plain}",
        env.db.name
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut plain_c = PgConnection::connect(&env.db.url_as(&plain, "pw")).await.unwrap();
    // The capped tenant's ops login (migrations, backups).
    let salt = pg::registry::existing_key_salt(&env.db.admin, &capped.uid)
        .await
        .unwrap()
        .expect("salt");
    let target = pg::Target::from_url(&env.db.admin_url).unwrap();
    let login =
        pg::confined::OpsLogin::derive(&target, &capped.name, &capped.uid, &support::test_ring(), &salt).unwrap();
    let mut ops = pg::confined::connect(&env.db.admin, &login).await.expect("ops login");
    let dog = env.watchdog();

    let sleep = "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SELECT pg_sleep(4.5)";
    let control = async {
        // Proof the watchdog was at work meanwhile.
        let mut app = capped.app(&env.db).await.unwrap();
        sqlx::raw_sql("SET statement_timeout = 0")
            .execute(&mut app)
            .await
            .unwrap();
        let pid = pid(&mut app).await;
        (pid, cancelled_after(&mut app, "SELECT pg_sleep(30)").await.1)
    };
    let within_app = async {
        let mut app = within.app(&env.db).await.unwrap();
        sqlx::raw_sql(sleep).execute(&mut app).await.map(|_| ())
    };
    let within_gateway = async {
        let mut tx = gateway.begin(within.name.as_str(), "wd", "r").await.unwrap();
        sqlx::raw_sql("SELECT pg_sleep(4.5)").execute(&mut *tx).await?;
        tx.commit().await
    };
    let uncapped_app = async {
        let mut app = uncapped.app(&env.db).await.unwrap();
        sqlx::raw_sql("SELECT pg_sleep(4.5)").execute(&mut app).await?;
        // Idle in a transaction for as long: no cap.
        sqlx::raw_sql("BEGIN; SELECT 1").execute(&mut app).await?;
        tokio::time::sleep(Duration::from_millis(4500)).await;
        sqlx::raw_sql("COMMIT").execute(&mut app).await.map(|_| ())
    };
    let uncapped_gateway = async {
        let mut tx = gateway.begin(uncapped.name.as_str(), "wd", "r").await.unwrap();
        sqlx::raw_sql("SELECT pg_sleep(4.5)").execute(&mut *tx).await?;
        tx.commit().await
    };
    let plain_sleep = async {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET application_name = 'tenant:{}'; {sleep}",
            capped.name
        )))
        .execute(&mut plain_c)
        .await
        .map(|_| ())
    };
    let admin_sleep = async {
        let mut c = env.db.admin.acquire().await.unwrap();
        let r = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; SET LOCAL application_name = 'tenant:{}'; SELECT pg_sleep(4.5); COMMIT",
            capped.name
        )))
        .execute(&mut *c)
        .await
        .map(|_| ());
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *c).await;
        r
    };
    let ops_sleep = async {
        sqlx::raw_sql("SET statement_timeout = 0; SELECT pg_sleep(4.5)")
            .execute(&mut *ops)
            .await
            .map(|_| ())
    };
    let (control, a, b, c, d, e, f, g) = tokio::join!(
        control,
        within_app,
        within_gateway,
        uncapped_app,
        uncapped_gateway,
        plain_sleep,
        admin_sleep,
        ops_sleep
    );
    assert_eq!(control.1, "57014", "the watchdog did not cancel the control statement");
    for (what, r) in [
        ("a tenant within its caps (own login)", a),
        ("a tenant within its caps (gateway)", b),
        ("a tenant with caps 0 (own login, statement and idle transaction)", c),
        ("a tenant with caps 0 (gateway)", d),
        ("a role of no tenant", e),
        ("the admin", f),
        ("the tenant's ops login", g),
    ] {
        r.unwrap_or_else(|err| panic!("{what} was touched: {err}"));
    }
    let signalled = dog.signalled();
    assert_eq!(
        signalled.iter().map(|s| s.pid).collect::<Vec<_>>(),
        vec![control.0],
        "only the control: {signalled:?}"
    );
}

#[tokio::test]
async fn the_begin_message_names_the_tenant_in_pg_stat_activity_for_the_transaction_only() {
    let env = setup("wd_appname").await;
    let t = env.tenant("wd-name", "30s", "60s").await;
    let gateway = env.gateway().await;
    let mut tx = gateway.begin(t.name.as_str(), "wd", "r").await.unwrap();
    let pid = pid(&mut tx).await;
    let seen = |pid: i32| {
        let admin = env.db.admin.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(&admin)
                .await
                .unwrap()
        }
    };
    assert_eq!(seen(pid).await, format!("tenant:{}", t.name));
    tx.commit().await.unwrap();
    let after = seen(pid).await;
    assert!(
        !after.starts_with("tenant:"),
        "application_name outlived the transaction: {after:?}"
    );
}
