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
//! - one UPDATE of BENCH_ROWS / 10 rows (row-level trigger: one chained
//!   append per row);
//! - BENCH_TX (default 2,000) transactions of one single-row INSERT each,
//!   committed one by one (a server-side loop with COMMIT): what each
//!   commit pays, the commit-time head update and anchor call included.
//!
//! Then verifies the tenant's chain. Drops its database and roles at the
//! end. Not part of `cargo test`.

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
    let (schema, owner) = (name.schema(), name.owner_role());
    let mut admin = PgConnection::connect(&with_db(&admin_url, &dbname))
        .await
        .expect("admin connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA bench_plain; CREATE TABLE bench_plain.items {TABLE};
         BEGIN; SET LOCAL ROLE {owner}; CREATE TABLE {schema}.items {TABLE}; COMMIT;"
    )))
    .execute(&mut admin)
    .await
    .expect("create the tables");
    support::audit_new_tables(&pool, &name, &uid, &desired, &password).await;
    sqlx::raw_sql("SET tenancy.actor = 'bench'; SET tenancy.request_id = 'bench-run'")
        .execute(&mut admin)
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
        // A warm-up of each, then alternate so both see the same cache and
        // autovacuum weather.
        timed(&mut admin, &make(&plain)).await;
        timed(&mut admin, &make(&audited)).await;
        for _ in 0..rounds {
            base.push(timed(&mut admin, &make(&plain)).await);
            with.push(timed(&mut admin, &make(&audited)).await);
        }
        let (b, w) = (median(base), median(with));
        results.push((label, b, w));
    }
    let audit_rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}._tenancy_audit"
    )))
    .fetch_one(&mut admin)
    .await
    .expect("count");
    let verify_start = Instant::now();
    let report = pg::audit::verify(&pool, &bench_ring(), &name).await.expect("verify");
    let verify_time = verify_start.elapsed();

    println!("audit triggers vs the same writes without triggers, median of {rounds} rounds each (PostgreSQL, same server, same run):");
    for (label, b, w) in &results {
        println!(
            "  {label:<48} without: {:>9.1} ms   with audit: {:>9.1} ms   ratio {:.2}x",
            b.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            w.as_secs_f64() / b.as_secs_f64()
        );
    }
    println!(
        "  verify: {} chained rows walked in {:.1} ms ({}), {audit_rows} audit rows in the table",
        report.rows,
        verify_time.as_secs_f64() * 1e3,
        if report.first_break.is_none() {
            "intact"
        } else {
            "BROKEN"
        }
    );
    let target = results[0].2.as_secs_f64() / results[0].1.as_secs_f64();
    println!(
        "  target (bulk insert below 2x): {}",
        if target < 2.0 { "met" } else { "NOT met" }
    );

    drop(admin);
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {dbname} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .expect("drop database");
    for r in [name.app_role(), name.owner_role()] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE \"{r}\"")))
            .execute(&mut su)
            .await
            .expect("drop role");
    }
}
