//! The audit triggers' overhead against the same writes without triggers,
//! measured in one run (docs/audit.md).
//!
//! `bash scripts/with-postgres.sh cargo bench --bench audit` (reads
//! TEST_PG_SUPERUSER_URL and TEST_PG_ADMIN_URL). Creates a database of its
//! own with one tenant provisioned through the operator's code
//! (`converge_db`), a table `items` in the tenant schema (created as its
//! owner, then audited by a reconcile) and the same table in a plain schema
//! without triggers. Times, alternating, BENCH_ROUNDS (default 5) times
//! each, and prints the medians and their ratio:
//! - one `INSERT ... SELECT` of BENCH_ROWS (default 100,000) rows;
//! - BENCH_SINGLE (default 10,000) single-row INSERT statements in one
//!   transaction (a server-side loop, so no network round trips);
//! - one UPDATE of BENCH_ROWS / 10 rows (one statement: one chained
//!   append);
//! - BENCH_TX (default 2,000) transactions of one single-row INSERT each,
//!   committed one by one (a server-side loop with COMMIT): what each
//!   commit pays, the commit-time head update and anchor call included.
//!
//! Beside each, the floor: the same writes on a table with an empty
//! PL/pgSQL statement trigger, on one whose trigger does the least an
//! audit trigger can (one INSERT of the statement's keys into a log
//! table, SECURITY DEFINER, no chain), and on one with the same INSERT in a
//! row trigger (cheaper for one row, dearer for many).
//!
//! Then verifies the tenant's chain, BENCH_VERIFY_ROUNDS (default 5) times
//! as it runs (two sessions for a chain of the default run's length, one
//! below `pg::audit::SPLIT_WALK_ROWS`) and as many with the
//! ops role allowed one connection (one session), alternating; prints the
//! medians and entries per second. Drops its database and roles at the
//! end (kept with BENCH_KEEP=1, to look into). Not part of `cargo test`.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use support::bench_ring;
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::{converge_db, plan};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/with-postgres.sh cargo bench --bench audit`");
        std::process::exit(2)
    })
}

fn env_or(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn timed(conn: &mut PgConnection, sql: &str) -> Duration {
    let start = Instant::now();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    start.elapsed()
}

/// Waits until no session of `role` is left (a closed connection's server
/// process ends a moment after the client leaves).
async fn gone(conn: &mut PgConnection, role: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(role)
            .fetch_one(&mut *conn)
            .await
            .expect("sessions");
        if n == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const TABLE: &str = "(id bigserial PRIMARY KEY, name text NOT NULL, qty integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now())";

#[tokio::main]
async fn main() {
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let rows = env_or("BENCH_ROWS", 100_000);
    let single = env_or("BENCH_SINGLE", 10_000);
    let rounds = env_or("BENCH_ROUNDS", 5).max(1);
    let dbname = format!("bench_audit_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {dbname} OWNER tenancy_admin"
    )))
    .execute(&mut su)
    .await
    .expect("create database");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&with_db(&admin_url, &dbname))
        .await
        .expect("admin connects");
    pg::migrate_control_schema(&pool).await.expect("control schema");

    let name = TenantName::parse(&format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff)).expect("name");
    let uid = format!("uid-{name}");
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).expect("default spec");
    let desired = plan::desired_db(&name, &spec).expect("desired");
    let catalog = pg::tenant::observe(&pool, &name).await.expect("observe");
    let out = converge_db(&pool, &bench_ring(), &name, &uid, &desired, &catalog, None, "bench")
        .await
        .expect("provision");
    let password = out.plan.password.clone();
    // The audit step's confined session, kept for a first migration: none
    // here (it would hold one of the ops role's connections).
    if let Some(session) = out.session {
        session.close().await;
    }
    let (schema, owner) = (name.schema(), name.owner_role());
    let mut admin = PgConnection::connect(&with_db(&admin_url, &dbname))
        .await
        .expect("admin connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA bench_plain; CREATE TABLE bench_plain.items {TABLE};
         BEGIN; GRANT {owner} TO CURRENT_USER; SET LOCAL ROLE {owner}; CREATE TABLE {schema}.items {TABLE}; RESET ROLE; REVOKE {owner} FROM CURRENT_USER; COMMIT;"
    )))
    .execute(&mut admin)
    .await
    .expect("create the tables");
    support::audit_new_tables(&pool, &name, &uid, &desired, &password).await;
    // The floor: what any PL/pgSQL statement trigger costs on this server,
    // measured beside the audit log. `empty` does nothing; `one` and
    // `row_one` do the least an audit trigger can (`support::floor_sql`).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA bench_floor;
         CREATE TABLE bench_floor.empty_items {TABLE};
         CREATE TABLE bench_floor.one_items {TABLE};
         {floor}
         CREATE FUNCTION bench_floor.empty() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NULL; END $f$;
         CREATE TABLE bench_floor.row_items {TABLE};
         CREATE TRIGGER f_row AFTER INSERT OR UPDATE ON bench_floor.row_items FOR EACH ROW EXECUTE FUNCTION bench_floor.row_one();
         CREATE TRIGGER f_ins AFTER INSERT ON bench_floor.empty_items REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.empty();
         CREATE TRIGGER f_upd AFTER UPDATE ON bench_floor.empty_items REFERENCING OLD TABLE AS tenancy_old NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.empty();
         CREATE TRIGGER f_ins AFTER INSERT ON bench_floor.one_items REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.one();
         CREATE TRIGGER f_upd AFTER UPDATE ON bench_floor.one_items REFERENCING OLD TABLE AS tenancy_old NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.one();",
        floor = support::floor_sql("bench_floor", |row| format!("jsonb_build_object('id', {row}.id)")),
    )))
    .execute(&mut admin)
    .await
    .expect("create the floor tables");
    // Every side is written by the tenant's app role, as an application
    // would (the admin holds no rights in the tenant schema): the plain and
    // floor tables are granted to it.
    let app_role = name.app_role();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT USAGE ON SCHEMA bench_plain, bench_floor TO {app_role};
         GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA bench_plain, bench_floor TO {app_role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA bench_plain, bench_floor TO {app_role};"
    )))
    .execute(&mut admin)
    .await
    .expect("grant the plain and floor tables to the app role");
    let (_, host) = admin_url.rsplit_once('@').expect("URL has a host");
    let (host, _) = host.rsplit_once('/').expect("URL has a database part");
    let mut writer = PgConnection::connect(&format!("postgresql://{app_role}:{password}@{host}/{dbname}"))
        .await
        .expect("the app role connects");
    sqlx::raw_sql("SET tenancy.actor = 'bench'; SET tenancy.request_id = 'bench-run'")
        .execute(&mut writer)
        .await
        .expect("set the actor");

    let bulk =
        |t: &str| format!("INSERT INTO {t} (name, qty) SELECT 'item ' || g, g FROM generate_series(1, {rows}) g");
    let loop_ = |t: &str| {
        format!("DO $b$ BEGIN FOR i IN 1..{single} LOOP INSERT INTO {t} (name, qty) VALUES ('single ' || i, i); END LOOP; END $b$")
    };
    let update = |t: &str| {
        format!(
            "UPDATE {t} SET qty = qty + 1 WHERE id IN (SELECT id FROM {t} ORDER BY id DESC LIMIT {})",
            rows / 10
        )
    };
    let txs = env_or("BENCH_TX", 2_000);
    let commits = |t: &str| {
        format!("DO $b$ BEGIN FOR i IN 1..{txs} LOOP INSERT INTO {t} (name, qty) VALUES ('tx ' || i, i); COMMIT; END LOOP; END $b$")
    };
    let plain = "bench_plain.items".to_string();
    let audited = format!("{schema}.items");
    let floors = [
        "bench_floor.empty_items",
        "bench_floor.one_items",
        "bench_floor.row_items",
    ];

    let mut results = Vec::new();
    for (label, make) in [
        (
            format!("bulk INSERT ... SELECT of {rows} rows"),
            &bulk as &dyn Fn(&str) -> String,
        ),
        (format!("{single} single-row INSERTs in one transaction"), &loop_),
        (format!("UPDATE of {} rows", rows / 10), &update),
        (format!("{txs} one-row INSERT transactions"), &commits),
    ] {
        let (mut base, mut with) = (Vec::new(), Vec::new());
        let mut floor = [Vec::new(), Vec::new(), Vec::new()];
        // A warm-up of each, then alternate so all see the same cache and
        // autovacuum weather.
        for t in [plain.as_str(), audited.as_str(), floors[0], floors[1], floors[2]] {
            timed(&mut writer, &make(t)).await;
        }
        for _ in 0..rounds {
            base.push(timed(&mut writer, &make(&plain)).await);
            with.push(timed(&mut writer, &make(&audited)).await);
            for (i, t) in floors.iter().enumerate() {
                floor[i].push(timed(&mut writer, &make(t)).await);
            }
        }
        let [empty, one, row] = floor;
        results.push((
            label,
            median(base),
            median(with),
            median(empty),
            median(one),
            median(row),
        ));
    }
    let audit_rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}._tenancy_audit"
    )))
    .fetch_one(&mut writer)
    .await
    .expect("count");
    // `audit verify`, BENCH_VERIFY_ROUNDS (default 5) times each way,
    // alternating: as it runs (a chain this long is read over two
    // sessions), and with the ops role allowed one connection, which makes
    // the walk read on one (the fallback, as the code before the split
    // read every chain).
    let verify_rounds = env_or("BENCH_VERIFY_ROUNDS", 5).max(1);
    let ops_limit = |n: u32| format!("ALTER ROLE {} CONNECTION LIMIT {n}", name.ops_role());
    let (mut split_times, mut one_times) = (Vec::new(), Vec::new());
    let mut report = None;
    let mut sessions = 0;
    for _ in 0..verify_rounds {
        for one in [false, true] {
            if one {
                // The last walk's server processes may still be ending.
                gone(&mut su, &name.ops_role()).await;
                timed(&mut su, &ops_limit(1)).await;
            }
            // A server process of the last walk may still hold its slot
            // under the limit a moment after it left pg_stat_activity.
            let mut tries = 0;
            let (r, took) = loop {
                let start = Instant::now();
                match pg::audit::verify(&pool, &bench_ring(), &name).await {
                    Ok(r) => break (r, start.elapsed()),
                    Err(e) if one && tries < 500 && e.to_string().contains("too many connections") => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("verify: {e}"),
                }
            };
            if one {
                timed(&mut su, &ops_limit(4)).await;
            }
            if one {
                assert_eq!(r.sessions, 1, "the walk's sessions with one ops connection");
                one_times.push(took);
            } else {
                // Two from pg::audit::SPLIT_WALK_ROWS rows on (the default
                // run's chain is longer), one below.
                sessions = r.sessions;
                split_times.push(took);
            }
            report = Some(r);
        }
    }
    let report = report.expect("verified");
    let (verify_time, verify_one) = (median(split_times), median(one_times));

    println!("audit triggers vs the same writes without triggers, median of {rounds} rounds each (PostgreSQL, same server, same run):");
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let ratio = |d: &Duration, b: &Duration| d.as_secs_f64() / b.as_secs_f64();
    for (label, b, w, empty, one, row) in &results {
        println!(
            "  {label:<48} without: {:>9.1} ms   with audit: {:>9.1} ms   ratio {:.2}x",
            ms(b),
            ms(w),
            ratio(w, b)
        );
        println!(
            "  {:<48} floor: an empty PL/pgSQL statement trigger {:.1} ms ({:.2}x); one INSERT of the keys per statement, no chain {:.1} ms ({:.2}x); one INSERT per row {:.1} ms ({:.2}x)",
            "",
            ms(empty),
            ratio(empty, b),
            ms(one),
            ratio(one, b),
            ms(row),
            ratio(row, b)
        );
    }
    for (label, b, w, empty, one, row) in &results {
        println!(
            "RESULT audit {label}: {:.2}x (floor: empty trigger {:.2}x, one INSERT per statement {:.2}x, per row {:.2}x)",
            ratio(w, b),
            ratio(empty, b),
            ratio(one, b),
            ratio(row, b)
        );
    }
    let per_second = |d: Duration| report.rows as f64 / d.as_secs_f64();
    println!(
        "  verify: {} chained rows walked in {:.1} ms as it runs ({sessions} session(s)), {:.0} entries/s; {:.1} ms on one session, {:.0} entries/s (medians of {verify_rounds}; {}), {audit_rows} audit rows in the table",
        report.rows,
        verify_time.as_secs_f64() * 1e3,
        per_second(verify_time),
        verify_one.as_secs_f64() * 1e3,
        per_second(verify_one),
        if report.first_break.is_none() {
            "intact"
        } else {
            "BROKEN"
        }
    );
    println!(
        "RESULT audit verify: {:.0} entries/s ({sessions} session(s); {:.2}x the walk on one session; target at least 500000: {})",
        per_second(verify_time),
        verify_one.as_secs_f64() / verify_time.as_secs_f64(),
        if per_second(verify_time) >= 500_000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let target = ratio(&results[0].2, &results[0].1);
    println!(
        "  target (bulk insert at most 1.5x): {}",
        if target <= 1.5 { "met" } else { "NOT met" }
    );

    drop(writer);
    drop(admin);
    pool.close().await;
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("  BENCH_KEEP: database {dbname} and the roles of tenant {name} kept");
        return;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {dbname} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .expect("drop database");
    for r in [name.ops_role(), name.app_role(), name.owner_role()] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE \"{r}\"")))
            .execute(&mut su)
            .await
            .expect("drop role");
    }
}
