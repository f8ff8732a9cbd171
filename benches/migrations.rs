//! Rollout fan-out against a serial psql baseline, measured in one run.
//!
//! `bash scripts/with-postgres.sh cargo bench --bench migrations` (reads
//! TEST_PG_SUPERUSER_URL and TEST_PG_ADMIN_URL). Creates a database of its
//! own with BENCH_TENANTS (default 1000) real tenant schemas, provisioned
//! through the operator's code (`converge_db`, 8 at a time), brings them to
//! version 1 (a trivial migration, so every version table exists), then
//! runs BENCH_ROUNDS (default 3) rounds, each timing:
//! - the operator: MigrationSet passes (observe, plan, bounded fan-out with
//!   `maxConcurrent` = BENCH_MAX_CONCURRENT, default 8) until every schema
//!   is at the round's new version, a migration of 5 DDL statements;
//! - the baseline: ONE psql session running, serially, one transaction per
//!   schema with the same 5 statements (on tables of another name, so both
//!   do the same work), under `SET LOCAL ROLE <owner>` and `search_path`.
//!
//! The order alternates between rounds (this machine's speed drifts).
//!
//! Prints each round, the sums and their ratio, and the peak connection
//! count to the bench database during the fan-outs (pg_stat_activity
//! sampled every 5ms). BENCH_KEEP_DB keeps the database for inspection.
//! Drops its database and roles at the end. Not part of `cargo test`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use tenant_operator::api::{Migration, MigrationSetSpec, OnFailure, RolloutSpec, TenantSpec};
use tenant_operator::controller::migration_set::apply::Outcome;
use tenant_operator::controller::migration_set::pass;
use tenant_operator::pg::migrations::TenantOutcome;
use tenant_operator::controller::tenant::{converge_db, plan, ConvergeError};
use tenant_operator::names::TenantName;
use tenant_operator::pg;
use tenant_operator::pg::migrations::Timeouts;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/with-postgres.sh cargo bench --bench migrations`");
        std::process::exit(2)
    })
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

/// The 5 DDL statements of the measured migration, on tables named `<t>`.
fn ddl(t: &str) -> String {
    format!(
        "CREATE TABLE {t} (id bigserial PRIMARY KEY, ref bigint NOT NULL, kind text NOT NULL, payload jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX {t}_kind ON {t} (kind, created_at);
ALTER TABLE {t} ADD COLUMN source text;
CREATE TABLE {t}_tags (event_id bigint NOT NULL REFERENCES {t} (id) ON DELETE CASCADE, tag text NOT NULL, PRIMARY KEY (event_id, tag));
COMMENT ON TABLE {t} IS 'bench';"
    )
}

async fn provision(pool: &PgPool, name: TenantName) {
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).expect("default spec");
    let desired = plan::desired_db(&name, &spec).expect("desired");
    for attempt in 1.. {
        let catalog = pg::tenant::observe(pool, &name).await.expect("observe");
        match converge_db(pool, &name, &format!("uid-{name}"), &desired, &catalog, None, "bench").await {
            Ok(_) => return,
            // Concurrent GRANT CONNECT ON DATABASE: "tuple concurrently updated".
            Err(ConvergeError::Db(e)) if e.is_transient() && attempt < 20 => tokio::time::sleep(Duration::from_millis(10 * attempt)).await,
            Err(e) => panic!("provisioning {name}: {e}"),
        }
    }
}

fn set_spec(max_concurrent: u32, versions: &[(i64, String)]) -> MigrationSetSpec {
    MigrationSetSpec {
        migrations: versions.iter().map(|(v, sql)| Migration { version: *v, name: format!("v{v}"), sql: sql.clone(), transactional: true }).collect(),
        rollout: RolloutSpec { max_concurrent, canary: 1, on_failure: OnFailure::Pause },
    }
}

/// Passes until the plan is empty, as the controller's requeues would.
async fn roll_out(pool: &PgPool, generation: i64, spec: &MigrationSetSpec, names: &[TenantName]) -> usize {
    for passes in 1..10_000 {
        let p = pass(pool, "bench", generation, spec, names, &Timeouts::default()).await.expect("pass");
        if let Some(b) = &p.plan.blocked {
            panic!("the rollout is blocked: {}", b.message());
        }
        // Not started (the pass's time budget) or busy is fine: the next pass
        // takes them. A failure is not.
        let failed: Vec<_> = p
            .report
            .results
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Error(_) | Outcome::Done(TenantOutcome::Failed { .. } | TenantOutcome::ChecksumMismatch { .. })))
            .collect();
        assert!(failed.is_empty(), "tenants failed: {failed:?}");
        if p.plan.is_empty() && !p.more() {
            return passes;
        }
    }
    unreachable!()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count: usize = std::env::var("BENCH_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let max_concurrent: u32 = std::env::var("BENCH_MAX_CONCURRENT").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let dbname = format!("bench_migrations_{tag}");
    let mut su = PgConnection::connect(&su_url).await.expect("superuser connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {dbname} OWNER tenancy_admin"))).execute(&mut su).await.expect("create database");
    let admin_url = with_db(&admin_url, &dbname);
    let su_db_url = with_db(&su_url, &dbname);

    let (admin, _) = pg::connect(&admin_url, 8).await.expect("admin connects");
    pg::migrate_control_schema(&admin).await.expect("control schema");
    let facts = pg::admin_facts(&admin).await.expect("facts");
    pg::harden_database(&admin, &facts).await.expect("harden");

    let names: Vec<TenantName> = (0..count).map(|i| TenantName::parse(&format!("b{tag}-{i:05}")).expect("name")).collect();
    let start = Instant::now();
    futures::stream::iter(names.iter().cloned()).for_each_concurrent(8, |n| provision(&admin, n)).await;
    println!("provisioned {count} tenant schemas through converge_db in {:.1?}", start.elapsed());

    // Version 1 everywhere first, so both measured runs find a version table.
    let v1 = (1, "SELECT 1".to_string());
    roll_out(&admin, 1, &set_spec(64, std::slice::from_ref(&v1)), &names).await;
    admin.close().await;

    // The operator's fan-out, on an admin pool of 2 (what the Tenant
    // controller would hold meanwhile) plus the rollout's own pool.
    let (op_pool, _) = pg::connect(&admin_url, 2).await.expect("admin connects");
    let peak = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, url) = (peak.clone(), stop.clone(), su_db_url.clone());
        tokio::spawn(async move {
            let mut c = PgConnection::connect(&url).await.expect("sampler connects");
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                )
                .fetch_one(&mut c)
                .await
                .expect("sample");
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Rounds: each adds one migration (version 2, 3, ...) of the same 5
    // statements on tables of its own, and runs the same statements through
    // psql on tables of another name. The order alternates, so a slow spell
    // of a shared machine or a catalog that grows as the run goes on weighs
    // on both sides alike; the ratio is of the sums.
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let psql = std::env::var("PSQL").unwrap_or_else(|_| "psql".into());
    let mut versions = vec![v1];
    let (mut op_total, mut psql_total) = (Duration::ZERO, Duration::ZERO);
    println!("migrations bench: {count} tenant schemas, per round one migration of 5 DDL statements (CREATE TABLE, CREATE INDEX, ALTER TABLE, CREATE TABLE with FK, COMMENT)");
    for round in 1..=rounds {
        let version = round as i64 + 1;
        versions.push((version, ddl(&format!("events_{round}"))));
        let spec = set_spec(max_concurrent, &versions);
        let operator_run = || async {
            let start = Instant::now();
            let passes = roll_out(&op_pool, version, &spec, &names).await;
            let took = start.elapsed();
            let at = pg::migrations::observe_many(&op_pool, &names).await.expect("observe").values().filter(|v| v.current() == version).count();
            assert_eq!(at, count, "not every schema reached version {version}");
            (took, passes)
        };
        let psql_run = || {
            let table = format!("events_psql_{round}");
            let mut script = String::from("\\set ON_ERROR_STOP on\n");
            for n in &names {
                script.push_str(&format!(
                    "BEGIN;\nSET LOCAL ROLE \"{}\";\nSET LOCAL search_path TO \"{}\";\n{}\nCOMMIT;\n",
                    n.owner_role(),
                    n.schema(),
                    ddl(&table)
                ));
            }
            let path = std::env::temp_dir().join(format!("bench-migrations-{tag}-{round}.sql"));
            std::fs::write(&path, script).expect("write the psql script");
            let start = Instant::now();
            let out = std::process::Command::new(&psql).args(["-X", "-q", "-d", &admin_url, "-f"]).arg(&path).output().expect("run psql");
            let took = start.elapsed();
            let _ = std::fs::remove_file(&path);
            assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
            (took, table)
        };
        let ((op, passes), (base, table)) = if round % 2 == 1 {
            let o = operator_run().await;
            (o, psql_run())
        } else {
            let b = psql_run();
            (operator_run().await, b)
        };
        let psql_tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = $1").bind(&table).fetch_one(&op_pool).await.expect("count");
        assert_eq!(psql_tables as usize, count, "the psql baseline did not reach every schema");
        println!(
            "  round {round} (version {version}, {}): operator fan-out {:.2?} ({passes} MigrationSet passes, each observe + plan + rollout), psql baseline {:.2?}, ratio {:.2}",
            if round % 2 == 1 { "operator first" } else { "psql first" },
            op,
            base,
            op.as_secs_f64() / base.as_secs_f64()
        );
        op_total += op;
        psql_total += base;
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    op_pool.close().await;

    println!("  operator fan-out, maxConcurrent {max_concurrent}, {rounds} round(s): {:.2?}", op_total);
    println!("  psql baseline, one psql session running the {count} transactions serially per round, {rounds} round(s): {:.2?}", psql_total);
    println!(
        "  ratio operator / baseline: {:.2} (target below 1.0: the operator faster than the serial loop)",
        op_total.as_secs_f64() / psql_total.as_secs_f64()
    );
    println!(
        "  peak client connections to the bench database during the fan-outs: {} (maxConcurrent {max_concurrent} + an admin pool of at most 2; sampler excluded)",
        peak.load(Ordering::Relaxed)
    );
    println!("  machine: {} CPU(s)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));

    if std::env::var_os("BENCH_KEEP_DB").is_some() {
        println!("  kept database {dbname} (BENCH_KEEP_DB)");
        return;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {dbname} WITH (FORCE)"))).execute(&mut su).await.expect("drop database");
    let roles: Vec<String> = sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("tenant_b{tag}_%"))
        .fetch_all(&mut su)
        .await
        .expect("list roles");
    for r in roles {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE \"{r}\""))).execute(&mut su).await.expect("drop role");
    }
}
