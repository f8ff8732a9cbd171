//! Rollout fan-out against a serial psql baseline, measured in one run.
//!
//! `bash scripts/with-postgres.sh cargo bench --bench migrations` (reads
//! TEST_PG_SUPERUSER_URL and TEST_PG_ADMIN_URL). Creates a database of its
//! own with BENCH_TENANTS (default 1000) real tenant schemas, provisioned
//! through the operator's code (`converge_db`, 8 at a time), brings them to
//! version 1 (a trivial migration, so every version table exists), then
//! runs BENCH_ROUNDS (default 4) rounds, each timing:
//! - the operator: MigrationSet passes (observe, plan, bounded fan-out with
//!   `maxConcurrent` = BENCH_MAX_CONCURRENT, default 4 as in the CRD) until
//!   the status they give is `Complete` (as the controller runs them), a
//!   migration of 5 DDL statements;
//! - the baseline: ONE psql session running, serially, one transaction per
//!   schema with the same 5 statements (on tables of another name, so both
//!   do the same work), under `SET LOCAL ROLE <owner>` and `search_path`.
//!
//! The order alternates between rounds (this machine's speed drifts). After
//! each psql run the baseline's tables get their audit triggers, untimed,
//! as the Tenant controller's next reconcile would: the operator's next run
//! must not pay for them.
//!
//! Prints each round (with the whole machine's busy CPU time during each
//! run, from /proc/stat), the sums and their ratio, and the peak connection
//! count to the bench database during the fan-outs (pg_stat_activity
//! sampled every 20 ms). Before each timed run the bench waits (at most 60 s)
//! for autovacuum workers to finish, so neither side pays for the catalog
//! clean-up of the other's DDL. BENCH_KEEP_DB keeps the database for
//! inspection; BENCH_PSS (with pg_stat_statements loaded) prints where the
//! server time went; BENCH_PERF=<dir> records `perf` profiles.
//! Drops its database and roles at the end. Not part of `cargo test`.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use support::bench_ring;
use tenant_operator::api::{Migration, MigrationSetPhase, MigrationSetSpec, OnFailure, RolloutSpec, TenantSpec};
use tenant_operator::controller::migration_set::apply::Outcome;
use tenant_operator::controller::migration_set::{pass, status};
use tenant_operator::controller::tenant::{converge_db, plan, ConvergeError};
use tenant_operator::pg::migrations::TenantOutcome;

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
        match converge_db(
            pool,
            &bench_ring(),
            &name,
            &format!("uid-{name}"),
            &desired,
            &catalog,
            None,
            "bench",
        )
        .await
        {
            Ok(_) => return,
            // Concurrent GRANT CONNECT ON DATABASE: "tuple concurrently updated".
            Err(ConvergeError::Db(e)) if e.is_transient() && attempt < 20 => {
                tokio::time::sleep(Duration::from_millis(10 * attempt)).await
            }
            Err(e) => panic!("provisioning {name}: {e}"),
        }
    }
}

fn set_spec(max_concurrent: u32, versions: &[(i64, String)]) -> MigrationSetSpec {
    MigrationSetSpec {
        migrations: versions
            .iter()
            .map(|(v, sql)| Migration {
                version: *v,
                name: format!("v{v}"),
                sql: sql.clone(),
                transactional: true,
            })
            .collect(),
        rollout: RolloutSpec {
            max_concurrent,
            canary: 1,
            on_failure: OnFailure::Pause,
        },
    }
}

/// Passes until the set is rolled out, as the controller runs them: a pass
/// whose state afterwards makes the status `Complete` is the last one (the
/// controller then waits for the next change or resync).
async fn roll_out(pool: &PgPool, generation: i64, spec: &MigrationSetSpec, names: &[TenantName]) -> usize {
    for passes in 1..10_000 {
        let p = pass(
            pool,
            &bench_ring(),
            "bench",
            generation,
            spec,
            names,
            &Timeouts::default(),
        )
        .await
        .expect("pass");
        if let Some(b) = &p.plan.blocked {
            panic!("the rollout is blocked: {}", b.message());
        }
        // Not started (the pass's time budget) or busy is fine: the next pass
        // takes them. A failure is not.
        let failed: Vec<_> = p
            .report
            .results
            .iter()
            .filter(|(_, o)| {
                matches!(
                    o,
                    Outcome::Error(_)
                        | Outcome::Done(TenantOutcome::Failed { .. } | TenantOutcome::ChecksumMismatch { .. })
                )
            })
            .collect();
        assert!(failed.is_empty(), "tenants failed: {failed:?}");
        let status = status::compute(None, Some(generation), spec, &p.plan, &p.after, p.more(), "now");
        if status.phase == Some(MigrationSetPhase::Complete) {
            return passes;
        }
    }
    unreachable!()
}

/// BENCH_PERF=<dir>: `perf record -a -g` of the whole machine around one
/// timed run, into <dir>/<label>.data (BENCH_PERF_EVENT, default
/// cpu-clock); [`perf_stop`] ends it.
fn perf_start(label: &str) -> Option<std::process::Child> {
    let dir = std::env::var("BENCH_PERF").ok()?;
    let event = std::env::var("BENCH_PERF_EVENT").unwrap_or_else(|_| "cpu-clock".into());
    let child = std::process::Command::new("perf")
        .args(["record", "-q", "-e", &event, "-a", "-g", "-o"])
        .arg(format!("{dir}/{label}.data"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some(child)
}

fn perf_stop(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
}

/// CPU time the whole machine spent busy (all but idle and iowait), from
/// /proc/stat: both sides' server and client work.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Duration::from_millis(total.saturating_sub(idle) * 10)
}

/// Waits (at most 60 s) until no autovacuum worker runs: a run must not
/// pay for the catalog clean-up after the other side's DDL.
async fn quiesce(url: &str) {
    let mut c = PgConnection::connect(url).await.expect("quiesce connects");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
                .fetch_one(&mut c)
                .await
                .expect("autovacuum workers");
        if n == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This process's user + system CPU time (Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// BENCH_PSS: with pg_stat_statements loaded, reset (None) or print the
/// statements' server time since the last reset, grouped by their first words.
async fn pss(url: &str, label: Option<&str>) {
    if std::env::var_os("BENCH_PSS").is_none() {
        return;
    }
    let mut c = PgConnection::connect(url).await.expect("pss connects");
    let Some(label) = label else {
        if let Err(e) =
            sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()")
                .execute(&mut c)
                .await
        {
            eprintln!("BENCH_PSS needs PG_EXTRA_OPTS='-c shared_preload_libraries=pg_stat_statements': {e}");
            std::process::exit(2);
        }
        return;
    };
    let rows: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT left(regexp_replace(query, '(\\s+|events_[a-z0-9_]+|tenant_[a-z0-9_]+)', ' ', 'g'), 90) q, sum(calls)::int8, sum(total_exec_time), sum(total_plan_time)
           FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_activity%' GROUP BY 1 ORDER BY sum(total_exec_time) + sum(total_plan_time) DESC",
    )
    .fetch_all(&mut c)
    .await
    .expect("pss read");
    let (e, p): (f64, f64) = rows.iter().fold((0.0, 0.0), |(e, p), r| (e + r.2, p + r.3));
    println!("  pg_stat_statements, {label}: exec {e:.0} ms, plan {p:.0} ms");
    for (q, calls, e, p) in rows.iter().take(25) {
        println!("    {calls:>6} {e:>8.1} {p:>8.1}  {q}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let max_concurrent: u32 = std::env::var("BENCH_MAX_CONCURRENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let dbname = format!("bench_migrations_{tag}");
    let mut su = PgConnection::connect(&su_url).await.expect("superuser connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {dbname} OWNER tenancy_admin"
    )))
    .execute(&mut su)
    .await
    .expect("create database");
    let admin_url = with_db(&admin_url, &dbname);
    let su_db_url = with_db(&su_url, &dbname);

    let (admin, _) = pg::connect(&admin_url, 8).await.expect("admin connects");
    pg::migrate_control_schema(&admin).await.expect("control schema");
    let facts = pg::admin_facts(&admin).await.expect("facts");
    pg::harden_database(&admin, &facts).await.expect("harden");

    let names: Vec<TenantName> = (0..count)
        .map(|i| TenantName::parse(&format!("b{tag}-{i:05}")).expect("name"))
        .collect();
    let start = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .for_each_concurrent(8, |n| provision(&admin, n))
        .await;
    println!(
        "provisioned {count} tenant schemas through converge_db in {:.1?}",
        start.elapsed()
    );

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
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Rounds: each adds one migration (version 2, 3, ...) of the same 5
    // statements on tables of its own, and runs the same statements through
    // psql on tables of another name. The order alternates, so a slow spell
    // of a shared machine or a catalog that grows as the run goes on weighs
    // on both sides alike; the ratio is of the sums.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let psql = std::env::var("PSQL").unwrap_or_else(|_| "psql".into());
    let mut versions = vec![v1];
    let (mut op_total, mut psql_total) = (Duration::ZERO, Duration::ZERO);
    println!("migrations bench: {count} tenant schemas, per round one migration of 5 DDL statements (CREATE TABLE, CREATE INDEX, ALTER TABLE, CREATE TABLE with FK, COMMENT)");
    for round in 1..=rounds {
        let version = round as i64 + 1;
        versions.push((version, ddl(&format!("events_{round}"))));
        let spec = set_spec(max_concurrent, &versions);
        let operator_run = || async {
            quiesce(&su_db_url).await;
            pss(&su_db_url, None).await;
            let perf = perf_start(&format!("operator-{round}"));
            let cpu0 = cpu_time();
            let busy0 = machine_busy();
            let start = Instant::now();
            let passes = roll_out(&op_pool, version, &spec, &names).await;
            let took = start.elapsed();
            pss(&su_db_url, Some("operator")).await;
            let cpu = (cpu_time() - cpu0, machine_busy() - busy0);
            perf_stop(perf);
            let at = pg::migrations::observe_many(&op_pool, &names)
                .await
                .expect("observe")
                .values()
                .filter(|v| v.current() == version)
                .count();
            assert_eq!(at, count, "not every schema reached version {version}");
            (took, passes, cpu)
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
            let perf = perf_start(&format!("psql-{round}"));
            let busy0 = machine_busy();
            let start = Instant::now();
            let out = std::process::Command::new(&psql)
                .args(["-X", "-q", "-d", &admin_url, "-f"])
                .arg(&path)
                .output()
                .expect("run psql");
            let took = start.elapsed();
            let busy = machine_busy() - busy0;
            perf_stop(perf);
            let _ = std::fs::remove_file(&path);
            assert!(
                out.status.success(),
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (took, table, busy)
        };
        // The baseline's tables have no audit triggers. Untimed, as the
        // Tenant controller's next reconcile would, they get them now:
        // otherwise the operator's next run, whose in-transaction audit
        // step triggers every untriggered table of the schema, would pay for
        // them (measured: 25-45% more CPU in rounds where psql ran first).
        let audit_baseline = || async {
            futures::stream::iter(names.iter())
                .for_each_concurrent(4, |n| {
                    let pool = op_pool.clone();
                    async move {
                        pg::audit::converge(&pool, &bench_ring(), n, &format!("uid-{n}"), None, &[])
                            .await
                            .expect("auditing the baseline's tables");
                    }
                })
                .await;
        };
        let ((op, passes, (op_cpu, op_busy)), (base, table, base_busy)) = if round % 2 == 1 {
            let o = operator_run().await;
            quiesce(&su_db_url).await;
            pss(&su_db_url, None).await;
            let b = psql_run();
            pss(&su_db_url, Some("psql")).await;
            audit_baseline().await;
            (o, b)
        } else {
            quiesce(&su_db_url).await;
            pss(&su_db_url, None).await;
            let b = psql_run();
            pss(&su_db_url, Some("psql")).await;
            audit_baseline().await;
            (operator_run().await, b)
        };
        let psql_tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = $1")
            .bind(&table)
            .fetch_one(&op_pool)
            .await
            .expect("count");
        assert_eq!(
            psql_tables as usize, count,
            "the psql baseline did not reach every schema"
        );
        println!(
            "  round {round} (version {version}, {}): operator fan-out {:.2?} ({passes} MigrationSet passes, each observe + plan + rollout), psql baseline {:.2?}, ratio {:.2}",
            if round % 2 == 1 { "operator first" } else { "psql first" },
            op,
            base,
            op.as_secs_f64() / base.as_secs_f64()
        );
        println!(
            "    CPU busy (whole machine): operator {op_busy:.2?} (of which this process {op_cpu:.2?}), psql {base_busy:.2?}"
        );
        op_total += op;
        psql_total += base;
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    op_pool.close().await;

    println!(
        "  operator fan-out, maxConcurrent {max_concurrent}, {rounds} round(s): {:.2?}",
        op_total
    );
    println!("  psql baseline, one psql session running the {count} transactions serially per round, {rounds} round(s): {:.2?}", psql_total);
    println!(
        "  ratio operator / baseline: {:.2} (target below 1.0: the operator faster than the serial loop)",
        op_total.as_secs_f64() / psql_total.as_secs_f64()
    );
    println!(
        "  peak client connections to the bench database during the fan-outs: {} (maxConcurrent {max_concurrent} + an admin pool of at most 2; sampler excluded)",
        peak.load(Ordering::Relaxed)
    );
    println!(
        "  machine: {} CPU(s)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    if std::env::var_os("BENCH_KEEP_DB").is_some() {
        println!("  kept database {dbname} (BENCH_KEEP_DB)");
        return;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {dbname} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .expect("drop database");
    let roles: Vec<String> = sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("tenant_b{tag}_%"))
        .fetch_all(&mut su)
        .await
        .expect("list roles");
    for r in roles {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE \"{r}\"")))
            .execute(&mut su)
            .await
            .expect("drop role");
    }
}
