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
        let spec: TenantSpec =
            serde_json::from_value(serde_json::json!({})).expect("an empty spec takes every default");
        Tenant {
            name: TenantName::parse(name).expect("valid name"),
            uid: format!("uid-{name}"),
            spec,
            password: None,
        }
    }

    async fn converge(&mut self, db: &TestDb) {
        let desired = plan::desired_db(&self.name, &self.spec).expect("valid spec");
        let catalog = pg::tenant::observe(&db.admin, &self.name).await.expect("observe");
        let out = converge_db(
            &db.admin,
            &support::test_ring(),
            &self.name,
            &self.uid,
            &desired,
            &catalog,
            self.password.as_deref(),
            "test",
        )
        .await
        .expect("converge");
        self.password = Some(out.plan.password.clone());
    }

    fn url(&self, db: &TestDb) -> String {
        let e = Endpoint {
            host: "127.0.0.1".into(),
            port: db.port(),
            database: db.name.clone(),
        };
        plan::secret_data(&self.name, &e, self.password.as_deref().expect("converged"))["uri"].clone()
    }
}

/// Whether `n` backends of `role` are running a statement (seen by the
/// superuser) within a second: between a cancelled query and the next one a
/// backend is briefly idle, so one look can miss it.
async fn all_busy(su: &mut PgConnection, role: &str, n: i64) -> bool {
    for _ in 0..50 {
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'")
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
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// p50 and p99 of `n` point reads of B's own table, 2ms apart (so a run
/// spans several of A's 200ms query cycles, cancellations included).
async fn latencies(conn: &mut PgConnection, n: usize) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        let _: String = sqlx::query_scalar("SELECT body FROM docs WHERE id = $1")
            .bind((i % 100 + 1) as i32)
            .fetch_one(&mut *conn)
            .await
            .expect("B's query");
        v.push(start.elapsed());
    }
    v.sort();
    (v[n / 2], v[(n * 99).div_ceil(100) - 1])
}

/// The tests of this file measure latencies: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_noisy_tenant_is_held_to_its_caps_and_its_neighbour_keeps_its_latency() {
    let _serial = SERIAL.lock().await;
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
        conns.push(
            PgConnection::connect(&a.url(&db))
                .await
                .expect("A's connections up to its limit"),
        );
    }
    let err = PgConnection::connect(&a.url(&db))
        .await
        .expect_err("A opened a 4th connection past CONNECTION LIMIT 3");
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
                match sqlx::query_scalar::<_, i64>("SELECT count(i) FROM (SELECT generate_series(1, 50000000) AS i) s")
                    .fetch_one(&mut c)
                    .await
                {
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
    assert!(
        all_busy(&mut su, &a.name.app_role(), 3).await,
        "A is not busy on all its connections before B's run"
    );
    let busy_start = Instant::now();
    let (busy_p50, busy_p99) = latencies(&mut quiet, 200).await;
    let busy_for = busy_start.elapsed();
    assert!(
        all_busy(&mut su, &a.name.app_role(), 3).await,
        "A was not busy on all its connections through B's run"
    );
    stop.store(true, Ordering::Relaxed);
    let mut total_cancelled = 0;
    for t in tasks {
        let (cancelled, completed, other) = t.await.expect("A's loop");
        assert!(
            other.is_empty(),
            "A's queries failed otherwise than by statement_timeout: {other:?}"
        );
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
    assert!(
        busy_p50 <= median_bound,
        "B's p50 went from {idle_p50:?} to {busy_p50:?} (bound {median_bound:?}) while A was busy"
    );
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
    assert!(
        busy_p99 <= bound,
        "B's p99 went from {idle_p99:?} to {busy_p99:?} (bound {bound:?}) while A was busy"
    );
}

/// p50 and p99 of B's point reads, 2ms apart, for `span`.
async fn latencies_for(conn: &mut PgConnection, span: Duration) -> (Duration, Duration, usize) {
    let mut v = Vec::new();
    let end = Instant::now() + span;
    let mut i = 0usize;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        let _: String = sqlx::query_scalar("SELECT body FROM docs WHERE id = $1")
            .bind((i % 100 + 1) as i32)
            .fetch_one(&mut *conn)
            .await
            .expect("B's query");
        v.push(start.elapsed());
        i += 1;
    }
    v.sort();
    let n = v.len();
    (v[n / 2], v[(n * 99).div_ceil(100) - 1], n)
}

/// One of A's heavy statements: when it started, how long until it ended,
/// and how (Ok: completed; Err: the SQLSTATE or error).
struct Run {
    started: Instant,
    took: Duration,
    outcome: Result<(), String>,
}

/// `tenant-operator top --sort cpu --interval 1` against the test database:
/// the tenants' names, first row first.
async fn top_by_cpu(db: &TestDb) -> (Vec<String>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(["top", "--sort", "cpu", "--interval", "1"])
        .env("DATABASE_URL", &db.admin_url)
        .env("GATEWAY_ROLE", "")
        .output()
        .await
        .expect("runs the binary");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "top failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    (names, stdout)
}

/// Issue 17 item 4: A switches its own timeout off (`SET statement_timeout
/// = 0` on every session), takes every connection its limit allows and
/// runs CPU-bound statements that would run for hours; B runs point reads
/// on its own login. B's p50/p99 are printed idle, under A's load without
/// the caps watchdog, and with the watchdog's pass running every second as
/// the operator's leader loop does. Asserted: A is first in `top --sort
/// cpu` while loading; with the watchdog every statement of A is cancelled
/// (57014) within its statementTimeout + 2 s (the operator's default grace
/// 0.5 s and interval 1 s leave 0.5 s for the pass's own latency). B's latencies are printed, not asserted beyond a loose bound
/// (a shared 2-core machine; see the README's figures): no watchdog can
/// give back the CPU that A's connection limit allows it to take, the
/// watchdog only bounds how long one statement holds it.
/// `NOISY_LIMITS=1,2,20` picks A's connection limits (default: 2 and 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_that_switches_its_timeout_off_is_cancelled_by_the_watchdog_and_named_by_top() {
    let _serial = SERIAL.lock().await;
    let limits: Vec<i32> = match std::env::var("NOISY_LIMITS") {
        Ok(v) => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("NOISY_LIMITS: comma-separated connection limits")
            })
            .collect(),
        Err(_) => vec![2, 20],
    };
    let db = TestDb::new("noisy_wd").await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    pg::watchdog::ensure_visibility(&db.admin)
        .await
        .expect("the non-superuser admin can see tenants' sessions");
    let mut su = db.superuser().await;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut report = Vec::new();
    for limit in limits {
        let mut a = Tenant::new(&unique("hog"));
        a.spec.database.connection_limit = limit;
        a.spec.database.statement_timeout = "2s".into();
        let mut b = Tenant::new(&unique("calm"));
        a.converge(&db).await;
        b.converge(&db).await;
        let (schema, owner) = (b.name.schema(), b.name.owner_role());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET ROLE {owner}; CREATE TABLE {schema}.docs (id int PRIMARY KEY, body text NOT NULL); \
             INSERT INTO {schema}.docs SELECT i, 'doc ' || i FROM generate_series(1, 100) i; ANALYZE {schema}.docs; RESET ROLE;"
        )))
        .execute(&mut su)
        .await
        .expect("seed B's table");

        // (a) idle.
        let mut quiet = PgConnection::connect(&b.url(&db)).await.expect("B logs in");
        latencies(&mut quiet, 50).await;
        let idle = latencies_for(&mut quiet, Duration::from_secs(2)).await;

        // A: every connection its limit allows, timeout off on each.
        let mut conns = Vec::new();
        for _ in 0..limit {
            let mut c = PgConnection::connect(&a.url(&db))
                .await
                .expect("A's connections up to its limit");
            sqlx::raw_sql("SET statement_timeout = 0")
                .execute(&mut c)
                .await
                .expect("A switches its timeout off");
            conns.push(c);
        }
        let err = PgConnection::connect(&a.url(&db))
            .await
            .expect_err("A opened a connection past its limit");
        assert_eq!(sqlstate(&err), "53300", "{err}");
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for mut c in conns {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut runs = Vec::new();
                while !stop.load(Ordering::Relaxed) && runs.len() < 100 {
                    let started = Instant::now();
                    // Hours of CPU (the select-list SRF streams: no temp files).
                    let r = sqlx::query_scalar::<_, i64>(
                        "SELECT count(i) FROM (SELECT generate_series(1::int8, 1000000000000) AS i) s",
                    )
                    .fetch_one(&mut c)
                    .await;
                    runs.push(Run {
                        started,
                        took: started.elapsed(),
                        outcome: r.map(|_| ()).map_err(|e| sqlstate(&e)),
                    });
                }
                runs
            }));
        }
        let app = a.name.app_role();
        assert!(
            all_busy(&mut su, &app, limit as i64).await,
            "A is not busy on all its connections"
        );

        // (b) A's load, no watchdog: its statements run on.
        let loaded = latencies_for(&mut quiet, Duration::from_secs(3)).await;
        let (names, table) = top_by_cpu(&db).await;
        println!("top --sort cpu (A loading, connectionLimit {limit}):\n{table}");
        assert_eq!(
            names.first().map(String::as_str),
            Some(a.name.as_str()),
            "top does not name A first by statement time:\n{table}"
        );
        assert!(
            names.iter().any(|n| n == b.name.as_str()),
            "top does not list B:\n{table}"
        );
        assert!(
            all_busy(&mut su, &app, limit as i64).await,
            "A was not busy through (b)"
        );

        // (c) the watchdog's pass every second, as the leader loop runs it.
        let watch_from = Instant::now();
        let (pool, cfg) = (
            db.admin.clone(),
            pg::watchdog::Config {
                grace: Duration::from_millis(500),
                gateway: None,
            },
        );
        let signals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = signals.clone();
        let dog = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let o = pg::watchdog::pass(&pool, &cfg).await.expect("watchdog pass");
                out.lock().unwrap().extend(o.signalled);
            }
        });
        let watched = latencies_for(&mut quiet, Duration::from_secs(6)).await;
        // Every connection: a statement started under the watchdog has ended.
        let fresh_ended = |n: usize| signals.lock().unwrap().len() >= n;
        let until = Instant::now() + Duration::from_secs(8);
        while !fresh_ended(2 * limit as usize) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        // Tidy up A's statements still running (the watchdog would, within 4 s).
        let tidy_at = Instant::now();
        sqlx::query("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = $1")
            .bind(&app)
            .execute(&mut su)
            .await
            .unwrap();
        let mut runs = Vec::new();
        for t in tasks {
            let r = t.await.expect("A's loop");
            runs.push(r);
        }
        assert!(!dog.is_finished(), "the watchdog's pass failed (see its panic above)");
        dog.abort();
        let signals = signals.lock().unwrap().clone();
        assert!(
            signals
                .iter()
                .all(|s| s.tenant == a.name.as_str() && s.reason == pg::watchdog::Reason::StatementCancelled),
            "the watchdog signalled another tenant or reason: {signals:?}"
        );

        // statementTimeout 2 s + grace 0.5 s + one interval 1 s is the
        // design's worst case (3.5 s); the pass's own latency (its query and
        // the cancel, slower on a loaded machine) has the 0.5 s left of the
        // issue's bound, timeout + 2 s.
        let cap = Duration::from_secs(2) + Duration::from_secs(2);
        let mut under_watch = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            assert!(
                r.iter().all(|x| x.outcome.is_err()),
                "a statement of A completed: {:?}",
                r.iter().map(|x| &x.outcome).collect::<Vec<_>>()
            );
            assert!(
                r.iter()
                    .all(|x| x.outcome.as_ref().err().map(String::as_str) == Some("57014")),
                "A's statements failed otherwise than cancelled: {:?}",
                r.iter().map(|x| &x.outcome).collect::<Vec<_>>()
            );
            // Started under the watchdog, and ended before the tidy-up.
            let fresh: Vec<Duration> = r
                .iter()
                .filter(|x| x.started >= watch_from && x.started + x.took < tidy_at)
                .map(|x| x.took)
                .collect();
            let cancelled_by_dog: Vec<Duration> =
                fresh.iter().copied().filter(|d| *d >= Duration::from_secs(2)).collect();
            assert!(
                !cancelled_by_dog.is_empty(),
                "connection {i} of A: no statement started under the watchdog was cancelled by it ({fresh:?})"
            );
            for d in &cancelled_by_dog {
                assert!(
                    *d <= cap,
                    "connection {i} of A: a statement ran {d:?}, past statementTimeout 2s + 2s"
                );
            }
            under_watch.extend(cancelled_by_dog);
        }
        under_watch.sort();
        let worst = under_watch.last().copied().unwrap_or_default();
        let line = format!(
            "connectionLimit {limit} on {cores} cores: B p50/p99 idle {:?}/{:?} (n={}), A loading without watchdog {:?}/{:?} (n={}), with watchdog {:?}/{:?} (n={}); \
             A under the watchdog: {} statements cancelled after {:?}..{:?} (cap 2s + 0.5s grace, passes 1s apart; asserted <= 4s)",
            idle.0, idle.1, idle.2, loaded.0, loaded.1, loaded.2, watched.0, watched.1, watched.2, under_watch.len(), under_watch.first().copied().unwrap_or_default(), worst
        );
        println!("noisy neighbour: {line}");
        report.push(line);
        // Loose: the watchdog does not make B's tail worse than A's
        // unbounded load did, beyond scheduler noise.
        let bound = loaded.1 * 3 + Duration::from_millis(50);
        assert!(
            watched.1 <= bound,
            "with the watchdog B's p99 {:?} exceeds 3x its p99 without it ({:?}) + 50ms",
            watched.1,
            loaded.1
        );
        drop(quiet);
    }
    println!("noisy neighbour summary:\n{}", report.join("\n"));
}
