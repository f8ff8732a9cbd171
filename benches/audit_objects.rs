//! What the audit log's functions cost to create, per tenant: the
//! operator's `ReplaceFunctions` statements (the five PL/pgSQL functions of
//! a tenant schema, `pg::audit::render`) as it sends them, whose bodies are
//! not compiled at creation (`check_function_bodies` off around them), and
//! the same statements with the bodies compiled (the setting forced on, as
//! before 2026-12-05), in one run (docs/scale.md).
//!
//! `bash scripts/with-postgres.sh cargo bench --bench audit_objects` (reads
//! TEST_PG_SUPERUSER_URL). Makes a database of its own, BENCH_TENANTS
//! (default 300) empty schemas per side and round, one transaction per
//! tenant as the superuser, alternating the sides for BENCH_ROUNDS (default
//! 4) rounds; prints each round's milliseconds per tenant, the medians and
//! their ratio. Drops the database at the end. Not part of `cargo test`.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tenant_operator::names::TenantName;
use tenant_operator::pg::audit::{render, AuditAction};

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn exec(conn: &mut PgConnection, sql: String) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::main]
async fn main() {
    let url = std::env::var("TEST_PG_SUPERUSER_URL").unwrap_or_else(|_| {
        eprintln!(
            "TEST_PG_SUPERUSER_URL is not set: run `bash scripts/with-postgres.sh cargo bench --bench audit_objects`"
        );
        std::process::exit(2)
    });
    let (n, rounds) = (env_or("BENCH_TENANTS", 300), env_or("BENCH_ROUNDS", 4).max(1));
    let db = format!("bench_audit_objects_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&url).await.expect("superuser");
    exec(&mut su, format!("CREATE DATABASE {db}")).await;
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    let mut conn = PgConnection::connect(&format!("{base}/{db}"))
        .await
        .expect("bench database");
    let (mut checked, mut sent) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (side, out) in [("checked", &mut checked), ("sent", &mut sent)] {
            let mut total = Duration::ZERO;
            for i in 0..n {
                let name = TenantName::parse(&format!("b{round}{}{i:05}", &side[..1])).expect("a valid name");
                exec(&mut conn, format!("CREATE SCHEMA {}", name.schema())).await;
                let stmts = render(&AuditAction::ReplaceFunctions, &name)
                    .expect("render")
                    .join(";\n");
                // The checked side: the same statements with the setting
                // forced back on right after the operator's own turns it off.
                let stmts = if side == "checked" {
                    assert!(
                        stmts.contains("'check_function_bodies', 'off'"),
                        "the operator's statements changed"
                    );
                    stmts.replacen(
                        "pg_catalog.set_config('check_function_bodies', 'off', true)",
                        "pg_catalog.set_config('check_function_bodies', 'on', true)",
                        1,
                    )
                } else {
                    stmts
                };
                let sql = format!("BEGIN; {stmts}; COMMIT");
                let start = Instant::now();
                exec(&mut conn, sql).await;
                total += start.elapsed();
            }
            let ms = total.as_secs_f64() * 1000.0 / n as f64;
            println!("round {round}: {side:<7} {ms:.3} ms per tenant");
            out.push(ms);
        }
    }
    let (c, s) = (median(checked), median(sent));
    println!("the audit functions of {n} tenants, medians of {rounds} rounds:");
    println!("  bodies compiled at creation (check_function_bodies on): {c:.3} ms per tenant");
    println!("  as the operator sends them (bodies not compiled):       {s:.3} ms per tenant");
    println!("  ratio sent/compiled: {:.2}x", s / c);
    drop(conn);
    exec(&mut su, format!("DROP DATABASE {db} WITH (FORCE)")).await;
}
