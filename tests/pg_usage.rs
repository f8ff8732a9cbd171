//! The usage sampler against a real server, with the non-superuser admin
//! (CREATEROLE + pg_signal_backend, which grants itself pg_read_all_stats):
//! three tenants with known data and sessions; the one query's figures
//! (bytes within 10% of an independent sum, sessions exact, rows written
//! exact); an idle set sampled twice decides no status write the second
//! time; `tenant-operator top --interval 1` sorts by cpu, sessions and bytes.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::PgConnection;
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenancy_client::Gateway;
use tenant_operator::api::TenantUsage;
use tenant_operator::controller::usage::decide;
use tenant_operator::pg;
use tenant_operator::pg::gateway::GatewayName;
use tenant_operator::pg::usage::{self as us, Row};

struct Env {
    db: TestDb,
    gw: GatewayName,
    gw_password: String,
    tenants: Vec<Tenant>,
}

/// Three tenants `big`, `mid`, `small` (in that order): a table `items`
/// with an index and a toasted column, `rows[i]` rows inserted and a tenth of
/// them updated; vacuumed, so that no fork appears later.
async fn setup(label: &str, rows: [i64; 3]) -> Env {
    let (db, gw, gw_password) = support::gateway_db(label).await;
    pg::watchdog::ensure_visibility(&db.admin)
        .await
        .expect("the non-superuser admin can see tenants' sessions");
    let mut tenants = Vec::new();
    for (base, n) in ["big", "mid", "small"].iter().zip(rows) {
        let mut t = Tenant::new(&unique(&format!("us-{base}")));
        t.gateway = Some(gw.to_string());
        t.converge(&db).await.expect("provision");
        let mut su = db.superuser().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET ROLE {o};
             CREATE TABLE {s}.items (id serial PRIMARY KEY, v text, blob text);
             CREATE INDEX ON {s}.items (v);
             INSERT INTO {s}.items (v, blob) SELECT md5(i::text), CASE WHEN i % 100 = 0 THEN repeat(md5(i::text), 200) END FROM generate_series(1, {n}) i;
             UPDATE {s}.items SET v = v || 'x' WHERE id % 10 = 0;
             RESET ROLE;",
            o = t.name.owner_role(),
            s = t.name.schema()
        )))
        .execute(&mut su)
        .await
        .expect("seed");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "VACUUM (ANALYZE) {}.items",
            t.name.schema()
        )))
        .execute(&mut su)
        .await
        .expect("vacuum");
        // Closing the session flushes its statistics.
        drop(su);
        tenants.push(t);
    }
    Env {
        db,
        gw,
        gw_password,
        tenants,
    }
}

impl Env {
    /// `VACUUM` of every table of tenant `i`'s schema (its audit tables
    /// too), one at a time (it cannot run in a transaction).
    /// Turns autovacuum off for tenant `i`'s tables (and their TOAST
    /// tables), then vacuums them: nothing changes their files after this
    /// but what a test does. Autovacuum would run at a moment of its own,
    /// after the statistics of a write reach the server (a closed session's
    /// may arrive after a VACUUM that follows it), and a vacuum or analyze
    /// is a change of files the sampler rightly reads again.
    async fn quiesce(&self, i: usize) {
        let mut su = self.db.superuser().await;
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = $1")
                .bind(self.tenants[i].name.schema())
                .fetch_all(&mut su)
                .await
                .expect("the schema's tables");
        assert!(!tables.is_empty(), "no tables in tenant {i}'s schema");
        for t in tables {
            for sql in [
                format!("ALTER TABLE {t} SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)"),
                format!("VACUUM (ANALYZE) {t}"),
            ] {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut su)
                    .await
                    .expect("autovacuum off, vacuum");
            }
        }
    }

    fn config(&self, window: Duration) -> us::Config {
        us::Config {
            gateway: Some(self.gw.to_string()),
            window,
        }
    }

    async fn sample(&self) -> us::Sample {
        us::sample(&self.db.admin, &self.config(Duration::from_secs(15)), None, &[])
            .await
            .expect("sample")
    }

    /// A sample given `known`, the one before.
    async fn sample_after(&self, known: &us::Sample) -> us::Sample {
        let known: Vec<&Row> = known.rows.iter().collect();
        us::sample(&self.db.admin, &self.config(Duration::from_secs(15)), None, &known)
            .await
            .expect("sample")
    }

    fn row<'a>(&self, s: &'a us::Sample, i: usize) -> &'a Row {
        s.rows
            .iter()
            .find(|r| r.name == self.tenants[i].name.as_str())
            .expect("every tenant has a row")
    }

    /// The schema's bytes summed another way: table (heap + toast) plus
    /// indexes size of each table in pg_tables.
    async fn bytes(&self, i: usize) -> i64 {
        sqlx::query_scalar(
            "SELECT COALESCE(sum(pg_table_size(format('%I.%I', schemaname, tablename)) + pg_indexes_size(format('%I.%I', schemaname, tablename))), 0)::int8
               FROM pg_tables WHERE schemaname = $1",
        )
        .bind(self.tenants[i].name.schema())
        .fetch_one(&self.db.su)
        .await
        .unwrap()
    }

    /// Samples until `ok` holds (statistics and session states settle within
    /// a second or so), at most 10 s.
    async fn sample_until(&self, ok: impl Fn(&us::Sample) -> bool) -> us::Sample {
        let t0 = Instant::now();
        loop {
            let s = self.sample().await;
            if ok(&s) || t0.elapsed() > Duration::from_secs(10) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs `SELECT pg_sleep(secs)` on `c` in the background.
fn sleep_on(mut c: PgConnection, secs: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SELECT pg_sleep({secs})")))
            .execute(&mut c)
            .await;
    })
}

#[allow(clippy::needless_range_loop)] // i indexes tenants, rows and sessions alike
#[tokio::test]
async fn the_sampled_figures_match_what_the_tenants_wrote_and_hold() {
    let rows = [20_000, 4_000, 50];
    let env = setup("us_figures", rows).await;
    let gateway = Gateway::connect_direct(
        env.db.url_as(env.gw.as_str(), &env.gw_password).parse().unwrap(),
        PgPoolOptions::new().max_connections(2),
    )
    .await
    .expect("library pool");

    // big: 1 running statement + 2 idle app sessions; mid: 1 idle; small:
    // one gateway transaction, idle in it.
    let [big, mid, small] = [0, 1, 2].map(|i| &env.tenants[i]);
    let sleeper = sleep_on(big.app(&env.db).await.unwrap(), 30);
    let _idle_big = [big.app(&env.db).await.unwrap(), big.app(&env.db).await.unwrap()];
    let _idle_mid = mid.app(&env.db).await.unwrap();
    let mut tx = gateway.begin(small.name.as_str(), "usage", "r-1").await.unwrap();
    sqlx::raw_sql("SELECT 1").execute(&mut *tx).await.unwrap();

    let s = env
        .sample_until(|s| {
            env.row(s, 0).sessions_active == 1 && (0..3).all(|i| env.row(s, i).rows_written >= rows[i] + rows[i] / 10)
        })
        .await;
    let sessions: Vec<(i64, i64)> = (0..3)
        .map(|i| (env.row(&s, i).sessions_active, env.row(&s, i).sessions_idle))
        .collect();
    assert_eq!(
        sessions,
        [(1, 2), (0, 1), (0, 1)],
        "sessions (active, idle) of big, mid, small: {:?}",
        s.rows
    );
    for i in 0..3 {
        let r = env.row(&s, i);
        // What the test wrote, plus the few rows provisioning wrote in the
        // schema (its bookkeeping), as pg_stat_user_tables counts them.
        let counted: i64 = sqlx::query_scalar("SELECT COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::int8 FROM pg_stat_user_tables WHERE schemaname = $1")
            .bind(env.tenants[i].name.schema())
            .fetch_one(&env.db.admin)
            .await
            .unwrap();
        assert_eq!(
            r.rows_written, counted,
            "{}: rows written, as pg_stat_user_tables sums them",
            r.name
        );
        assert!(
            (rows[i] + rows[i] / 10..=rows[i] + rows[i] / 10 + 5).contains(&r.rows_written),
            "{}: {} rows written, the test wrote {}",
            r.name,
            r.rows_written,
            rows[i] + rows[i] / 10
        );
        let want = env.bytes(i).await;
        assert!(
            want > 0 && (r.bytes - want).abs() as f64 <= 0.10 * want as f64,
            "{}: sampled {} bytes, pg_table_size + pg_indexes_size say {want}",
            r.name,
            r.bytes
        );
        assert_eq!(
            (r.statement_ms, r.temp_bytes),
            (None, None),
            "no pg_stat_statements here"
        );
        assert_eq!(r.uid, env.tenants[i].uid);
    }
    assert!(env.row(&s, 0).bytes > env.row(&s, 1).bytes && env.row(&s, 1).bytes > env.row(&s, 2).bytes);
    // The running statement's time (fallback without pg_stat_statements).
    let f = us::figures(None, &s);
    assert!(env.row(&s, 0).running_ms > 0.0);
    assert!(
        f.iter()
            .any(|x| x.name == big.name.as_str() && x.statement_seconds_per_minute > 0.0),
        "{f:?}"
    );
    assert!(f
        .iter()
        .filter(|x| x.name != big.name.as_str())
        .all(|x| x.statement_seconds_per_minute == 0.0));

    // Writes show up as a rate between two samples.
    let mut w = big.app(&env.db).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.items (v) SELECT 'n' FROM generate_series(1, 500)",
        big.name.schema()
    )))
    .execute(&mut w)
    .await
    .unwrap();
    drop(w);
    let before = s;
    let after = env
        .sample_until(|s| env.row(s, 0).rows_written >= rows[0] + rows[0] / 10 + 500)
        .await;
    let f = us::figures(Some(&before), &after);
    let fb = f.iter().find(|x| x.name == big.name.as_str()).unwrap();
    assert!(fb.rows_written_per_second > 0.0, "{fb:?}");
    tx.rollback().await.unwrap();
    sleeper.abort();
}

#[tokio::test]
async fn an_idle_set_sampled_twice_decides_no_status_write_the_second_time() {
    let env = setup("us_idle", [3_000, 300, 30]).await;
    // Statistics of the seeding sessions settle first.
    let want: Vec<i64> = [3_000i64, 300, 30].iter().map(|n| n + n / 10).collect();
    let first = env
        .sample_until(|s| (0..3).all(|i| env.row(s, i).rows_written >= want[i]))
        .await;
    let mut status: HashMap<String, Option<TenantUsage>> = env
        .tenants
        .iter()
        .map(|t| (t.name.as_str().to_string(), None))
        .collect();
    let none = HashMap::new();
    let writes = decide(
        &us::figures(None, &first),
        |n, _| status.get(n).cloned(),
        &none,
        first.sampled_at,
    );
    assert_eq!(writes.len(), 3, "the first sample writes every tenant's status");
    for (n, u) in writes {
        assert!(u.bytes > 0 && u.sessions == 0 && u.temp_bytes.is_none(), "{u:?}");
        status.insert(n, Some(u));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = env.sample().await;
    let writes = decide(
        &us::figures(Some(&first), &second),
        |n, _| status.get(n).cloned(),
        &none,
        second.sampled_at,
    );
    assert!(writes.is_empty(), "an idle set was written again: {writes:?}");
}

async fn top(env: &Env, sort: &str) -> Vec<String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(["top", "--interval", "1", "--sort", sort])
        .env("DATABASE_URL", &env.db.admin_url)
        .env("GATEWAY_ROLE", env.gw.as_str())
        .output()
        .await
        .expect("runs the binary");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "top failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let head = lines.next().unwrap_or_default();
    assert!(
        head.split_whitespace()
            .eq(["NAME", "STMT-TIME", "SESSIONS", "BYTES", "WRITES/S"]),
        "{stdout}"
    );
    let names: Vec<String> = lines
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    println!("top --sort {sort}:\n{stdout}");
    names
}

#[tokio::test]
async fn top_sorts_by_cpu_sessions_and_bytes() {
    let env = setup("us_top", [20_000, 2_000, 20]).await;
    let [big, mid, small] = [0, 1, 2].map(|i| &env.tenants[i]);
    // cpu: mid (2 running statements) > big (1) > small (none);
    // sessions: small (3) > mid (2) > big (1); bytes: big > mid > small.
    let sleepers = vec![
        sleep_on(big.app(&env.db).await.unwrap(), 30),
        sleep_on(mid.app(&env.db).await.unwrap(), 30),
        sleep_on(mid.app(&env.db).await.unwrap(), 30),
    ];
    let _idle = [
        small.app(&env.db).await.unwrap(),
        small.app(&env.db).await.unwrap(),
        small.app(&env.db).await.unwrap(),
    ];
    let s = env
        .sample_until(|s| {
            env.row(s, 0).sessions_active == 1 && env.row(s, 1).sessions_active == 2 && env.row(s, 2).sessions_idle == 3
        })
        .await;
    assert_eq!(env.row(&s, 1).sessions_active, 2, "the statements run");
    let names = |v: [&Tenant; 3]| v.map(|t| t.name.as_str().to_string()).to_vec();
    assert_eq!(top(&env, "cpu").await, names([mid, big, small]));
    assert_eq!(top(&env, "sessions").await, names([small, mid, big]));
    assert_eq!(top(&env, "bytes").await, names([big, mid, small]));
    for s in sleepers {
        s.abort();
    }
}

#[tokio::test]
async fn with_pg_stat_statements_statement_time_and_temp_bytes_come_from_it_by_role() {
    let env = setup("us_pgss", [10, 10, 10]).await;
    let mut su = env.db.superuser().await;
    let loaded: String = sqlx::query_scalar("SHOW shared_preload_libraries")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert!(
        loaded.contains("pg_stat_statements"),
        "scripts/with-postgres.sh preloads pg_stat_statements: {loaded}"
    );
    // Not a trusted extension: created by a superuser (on managed Postgres,
    // the provider's set-up), read by the admin through pg_read_all_stats.
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut su)
        .await
        .expect("create extension");
    let src = us::statements_source(&env.db.admin)
        .await
        .expect("look for pg_stat_statements")
        .expect("found and readable by the admin");
    let cfg = env.config(Duration::from_secs(15));
    let before = us::sample(&env.db.admin, &cfg, Some(&src), &[]).await.expect("sample");
    assert!(
        before.statements,
        "the sample says its statement time comes from pg_stat_statements"
    );
    // big: 0.9 s of statements and a sort spilled to disk; the others nothing.
    let mut app = env.tenants[0].app(&env.db).await.unwrap();
    sqlx::raw_sql("SELECT pg_sleep(0.3); SELECT pg_sleep(0.3); SELECT pg_sleep(0.3)")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::raw_sql(
        "SET work_mem = '64kB'; SELECT count(*) FROM (SELECT g FROM generate_series(1, 200000) g ORDER BY g DESC) s",
    )
    .execute(&mut app)
    .await
    .unwrap();
    drop(app);
    let after = us::sample(&env.db.admin, &cfg, Some(&src), &[]).await.expect("sample");
    let delta = |i: usize, f: fn(&Row) -> Option<f64>| {
        f(env.row(&after, i)).unwrap_or(0.0) - f(env.row(&before, i)).unwrap_or(0.0)
    };
    let stmt = delta(0, |r| r.statement_ms);
    assert!(
        stmt >= 900.0,
        "big's statement time grew by {stmt} ms, expected >= 900: {:?}",
        after.rows
    );
    let temp = delta(0, |r| r.temp_bytes.map(|b| b as f64));
    assert!(temp > 0.0, "big's temp bytes did not grow: {:?}", after.rows);
    for i in [1, 2] {
        let other = delta(i, |r| r.statement_ms);
        assert!(other < 100.0, "tenant {i} was charged {other} ms it did not run");
    }
}

/// A sample given the one before keeps the bytes of every schema whose
/// files did not change (no file read), and reads again those of a schema
/// that was written, rewritten by `VACUUM FULL` (no row written: a new file
/// node) or given an index.
#[tokio::test]
async fn a_sample_reads_again_only_the_schemas_whose_files_changed() {
    let env = setup("us_sizes", [3_000, 300, 30]).await;
    // Autovacuum would vacuum or analyze the tables just written at a
    // moment of its own: a change of files the sampler rightly reads again,
    // between any two samples below (twice a flake, the second time after
    // a VACUUM here: the write's statistics arrived after it).
    for i in 0..3 {
        env.quiesce(i).await;
    }
    let want: Vec<i64> = [3_000i64, 300, 30].iter().map(|n| n + n / 10).collect();
    let first = env
        .sample_until(|s| (0..3).all(|i| env.row(s, i).rows_written >= want[i]))
        .await;
    assert!(
        (0..3).all(|i| env.row(&first, i).measured),
        "no sizes given: every schema read"
    );
    let second = env.sample_after(&first).await;
    for i in 0..3 {
        let (a, b) = (env.row(&first, i), env.row(&second, i));
        assert!(!b.measured, "{}: read again with nothing changed", b.name);
        assert_eq!((a.bytes, a.size_key), (b.bytes, b.size_key), "{}", b.name);
    }
    // Checks that tenant `i` was read again and its bytes are its files'
    // now, and that the others kept theirs.
    let check = |before: &us::Sample, after: &us::Sample, i: usize, what: &str| {
        for j in 0..3 {
            let (a, b) = (env.row(before, j), env.row(after, j));
            if j == i {
                assert!(
                    b.measured && b.size_key != a.size_key,
                    "{what}: {} not read again",
                    b.name
                );
            } else {
                assert!(!b.measured && b.bytes == a.bytes, "{what}: {} read again", b.name);
            }
        }
    };
    let within = |sampled: i64, want: i64| want > 0 && (sampled - want).abs() as f64 <= 0.10 * want as f64;

    // small: 2,000 rows written by its application.
    let small = &env.tenants[2];
    let mut app = small.app(&env.db).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.items (v, blob) SELECT md5(i::text), repeat(md5(i::text), 100) FROM generate_series(1, 2000) i",
        small.name.schema()
    )))
    .execute(&mut app)
    .await
    .unwrap();
    drop(app);
    env.quiesce(2).await;
    let mut third = env.sample_after(&second).await;
    let t0 = Instant::now();
    while env.row(&third, 2).rows_written < want[2] + 2_000 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        third = env.sample_after(&third).await;
    }
    check(&second, &third, 2, "rows written");
    assert!(env.row(&third, 2).bytes > env.row(&second, 2).bytes);
    assert!(
        within(env.row(&third, 2).bytes, env.bytes(2).await),
        "{:?}",
        env.row(&third, 2)
    );

    // big: VACUUM FULL writes no row, and rewrites the table into new files.
    let big = &env.tenants[0];
    let mut su = env.db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM FULL {}.items", big.name.schema())))
        .execute(&mut su)
        .await
        .expect("vacuum full");
    let fourth = env.sample_after(&third).await;
    check(&third, &fourth, 0, "VACUUM FULL");
    assert!(
        within(env.row(&fourth, 0).bytes, env.bytes(0).await),
        "{:?}",
        env.row(&fourth, 0)
    );

    // mid: a new index, made by its owner.
    let mid = &env.tenants[1];
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {o}; CREATE INDEX ON {s}.items (blob, v); RESET ROLE",
        o = mid.name.owner_role(),
        s = mid.name.schema()
    )))
    .execute(&mut su)
    .await
    .expect("create index");
    let fifth = env.sample_after(&fourth).await;
    check(&fourth, &fifth, 1, "a new index");
    assert!(env.row(&fifth, 1).bytes > env.row(&fourth, 1).bytes);
    assert!(
        within(env.row(&fifth, 1).bytes, env.bytes(1).await),
        "{:?}",
        env.row(&fifth, 1)
    );
}
