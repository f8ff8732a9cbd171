//! Noisy neighbour, against a real Postgres as the non-superuser admin: a
//! tenant that floods the server with heavy queries and connections is held
//! to its caps (statement_timeout cancels its queries, CONNECTION LIMIT
//! refuses its extra connections), and another tenant's simple queries keep
//! their latency.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use support::{unique, TestDb};
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::converge_db;
use tenant_operator::controller::tenant::plan::{self, Endpoint};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

struct Tenant {
    name: TenantName,
    uid: String,
    spec: TenantSpec,
    password: Option<String>,
}

impl Tenant {
    fn new(name: &str) -> Self {
        // Every default (as `spec: {}`), so new spec fields do not break the suite.
        let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).expect("an empty spec takes every default");
        Tenant { name: TenantName::parse(name).expect("valid name"), uid: format!("uid-{name}"), spec, password: None }
    }

    async fn converge(&mut self, db: &TestDb) {
        let desired = plan::desired_db(&self.name, &self.spec).expect("valid spec");
        let catalog = pg::tenant::observe(&db.admin, &self.name).await.expect("observe");
        let out = converge_db(&db.admin, &support::test_ring(), &self.name, &self.uid, &desired, &catalog, self.password.as_deref(), "test").await.expect("converge");
        self.password = Some(out.plan.password.clone());
    }

    fn url(&self, db: &TestDb) -> String {
        let e = Endpoint { host: "127.0.0.1".into(), port: db.port(), database: db.name.clone() };
        plan::secret_data(&self.name, &e, self.password.as_deref().expect("converged"))["uri"].clone()
    }
}

/// Whether `n` backends of `role` are running a statement (seen by the
/// superuser) within a second: between a cancelled query and the next one a
/// backend is briefly idle, so one look can miss it.
async fn all_busy(su: &mut PgConnection, role: &str, n: i64) -> bool {
    for _ in 0..50 {
        let active: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'")
            .bind(role)
            .fetch_one(&mut *su)
            .await
            .unwrap();
        if active == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string()).unwrap_or_else(|| format!("not a database error: {e}"))
}

/// p50 and p99 of `n` point reads of B's own table, 2ms apart (so a run
/// spans several of A's 200ms query cycles, cancellations included).
async fn latencies(conn: &mut PgConnection, n: usize) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        let _: String = sqlx::query_scalar("SELECT body FROM docs WHERE id = $1").bind((i % 100 + 1) as i32).fetch_one(&mut *conn).await.expect("B's query");
        v.push(start.elapsed());
    }
    v.sort();
    (v[n / 2], v[(n * 99).div_ceil(100) - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_noisy_tenant_is_held_to_its_caps_and_its_neighbour_keeps_its_latency() {
    let db = TestDb::new("noisy").await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let mut a = Tenant::new(&unique("noisy"));
    a.spec.database.connection_limit = 3;
    a.spec.database.statement_timeout = "200ms".into();
    let mut b = Tenant::new(&unique("quiet"));
    a.converge(&db).await;
    b.converge(&db).await;

    // B's small table, made by its owner role as a migration would.
    let mut su = db.superuser().await;
    let (schema, owner) = (b.name.schema(), b.name.owner_role());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner}; CREATE TABLE {schema}.docs (id int PRIMARY KEY, body text NOT NULL); \
         INSERT INTO {schema}.docs SELECT i, 'doc ' || i FROM generate_series(1, 100) i; ANALYZE {schema}.docs; RESET ROLE;"
    )))
    .execute(&mut su)
    .await
    .expect("seed B's table");

    let mut quiet = PgConnection::connect(&b.url(&db)).await.expect("B logs in");
    latencies(&mut quiet, 50).await; // warm the plan and the caches
    let (idle_p50, idle_p99) = latencies(&mut quiet, 200).await;

    // A takes every connection its limit allows; one more is refused.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(PgConnection::connect(&a.url(&db)).await.expect("A's connections up to its limit"));
    }
    let err = PgConnection::connect(&a.url(&db)).await.expect_err("A opened a 4th connection past CONNECTION LIMIT 3");
    assert_eq!(sqlstate(&err), "53300", "{err}");

    // A's heavy loop on all three. The set-returning function in the select
    // list streams (ProjectSet), so the load is CPU, not temp files. Each
    // loop is bounded in iterations and time.
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for mut c in conns {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut cancelled, mut other, mut completed) = (0u32, Vec::new(), 0u32);
            for _ in 0..500 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match sqlx::query_scalar::<_, i64>("SELECT count(i) FROM (SELECT generate_series(1, 50000000) AS i) s").fetch_one(&mut c).await {
                    Ok(_) => completed += 1,
                    Err(e) if sqlstate(&e) == "57014" => cancelled += 1,
                    Err(e) => other.push(e.to_string()),
                }
            }
            (cancelled, completed, other)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for _ in 0..5 {
        match PgConnection::connect(&a.url(&db)).await {
            Ok(_) => panic!("A opened an extra connection while busy"),
            Err(e) => {
                assert_eq!(sqlstate(&e), "53300", "{e}");
                refused += 1;
            }
        }
    }
    assert!(all_busy(&mut su, &a.name.app_role(), 3).await, "A is not busy on all its connections before B's run");
    let busy_start = Instant::now();
    let (busy_p50, busy_p99) = latencies(&mut quiet, 200).await;
    let busy_for = busy_start.elapsed();
    assert!(all_busy(&mut su, &a.name.app_role(), 3).await, "A was not busy on all its connections through B's run");
    stop.store(true, Ordering::Relaxed);
    let mut total_cancelled = 0;
    for t in tasks {
        let (cancelled, completed, other) = t.await.expect("A's loop");
        assert!(other.is_empty(), "A's queries failed otherwise than by statement_timeout: {other:?}");
        assert_eq!(completed, 0, "a heavy query of A outlived its 200ms statement_timeout");
        assert!(cancelled >= 1, "A's loop ran no heavy query");
        total_cancelled += cancelled;
    }
    println!(
        "noisy neighbour: B point reads idle p50 {idle_p50:?} p99 {idle_p99:?}; with A busy p50 {busy_p50:?} p99 {busy_p99:?} (over {busy_for:?}); \
         A: {total_cancelled} queries cancelled (57014), {} connections refused (53300)",
        refused + 1
    );
    // The median must not move: B never waits on A (no lock, no pool, no
    // 200ms query of A in its way).
    let median_bound = idle_p50 * 2 + Duration::from_millis(1);
    assert!(busy_p50 <= median_bound, "B's p50 went from {idle_p50:?} to {busy_p50:?} (bound {median_bound:?}) while A was busy");
    // The tail: ratio plus an absolute slack, because the idle p99 is a
    // fraction of a millisecond and scheduler time slices alone make a pure
    // ratio flaky. Postgres caps connections and statement time, not CPU:
    // when A's connection limit reaches the core count (3 on a 2-core test
    // machine), A's CPU-bound backends occupy every core and B's backend
    // (and this test's client) wait for a time slice at a wake-up. Measured
    // on 2 cores: busy p99 4-9ms, idle p99 0.2ms. The slack then allows a
    // few slices (20ms), still an order of magnitude below A's 200ms
    // queries, which is what B would see if it ever waited on A.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let saturates = a.spec.database.connection_limit as usize >= cores;
    let slack = Duration::from_millis(if saturates { 20 } else { 5 });
    let bound = idle_p99 * 2 + slack;
    assert!(busy_p99 <= bound, "B's p99 went from {idle_p99:?} to {busy_p99:?} (bound {bound:?}) while A was busy");
}
