//! The data path's per-request overhead (docs/data-path.md): a one-row
//! SELECT (by primary key, from a table of 10,000 rows) in a library tenant
//! transaction (`tenancy_client::Gateway::begin`) against the same SELECT
//! of a table of the same shape in a plain transaction on the same pool,
//! measured alternating in one run; prints both p50s and their ratio
//! (target <= 1.10), and the server CPU each kind cost (the backend's
//! utime + stime from /proc, when the server runs on this machine).
//!
//! `bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh cargo bench --bench data_path`
//! (through PgBouncer when TEST_PGBOUNCER_PORT is set, else direct).
//! BENCH_REQUESTS (default 3,000) requests of each kind. Creates a database
//! of its own with one tenant and a gateway; drops the database at the end
//! (the roles stay: they are named after the database). Not part of
//! `cargo test`.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use tenancy_client::Gateway;
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::{converge_db, plan};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh cargo bench --bench data_path`");
        std::process::exit(2)
    })
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// utime + stime of a server process in clock ticks (0 when it is not on
/// this machine). Through PgBouncer with one server connection the pid is
/// the same for every transaction.
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let requests: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let db = format!("bench_dp_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db} OWNER tenancy_admin")))
        .execute(&mut su)
        .await
        .expect("create db");
    let (admin, _) = pg::connect(&with_db(&admin_url, &db), 4).await.expect("admin");
    pg::migrate_control_schema(&admin).await.expect("control schema");
    let facts = pg::admin_facts(&admin).await.expect("facts");
    pg::harden_database(&admin, &facts).await.expect("harden");
    let gw = pg::gateway::GatewayName::parse(&format!("gw_{db}")).unwrap();
    let password = pg::scram::generate_password();
    pg::gateway::converge(&admin, &gw, &password, true)
        .await
        .expect("gateway");
    let name = TenantName::parse(&format!("bench-{:06x}", rand::random::<u32>() & 0xffffff)).unwrap();
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
    let mut desired = plan::desired_db(&name, &spec).unwrap();
    desired.gateway = Some(gw.to_string());
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    let ring = tenant_operator::crypto::Keyring::new(
        std::collections::BTreeMap::from([("v1".to_string(), vec![0x5a; 32])]),
        "v1",
    )
    .expect("keyring");
    converge_db(&admin, &ring, &name, "uid-bench", &desired, &catalog, None, "bench")
        .await
        .expect("tenant");

    // The same table in the tenant's schema (made by its owner, so the app
    // role has its default privileges) and in a plain schema the gateway
    // may read.
    let table = "(id int PRIMARY KEY, v text NOT NULL); INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 10000) g; ANALYZE items";
    let mut su_db = PgConnection::connect(&with_db(&su_url, &db))
        .await
        .expect("superuser on the bench database");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE \"{owner}\"; SET search_path = \"{schema}\"; CREATE TABLE items {table}; RESET ROLE;
         CREATE SCHEMA bench_plain; SET search_path = bench_plain; CREATE TABLE items {table};
         GRANT USAGE ON SCHEMA bench_plain TO \"{gw}\"; GRANT SELECT ON bench_plain.items TO \"{gw}\"",
        owner = name.owner_role(),
        schema = name.schema(),
    )))
    .execute(&mut su_db)
    .await
    .expect("bench tables");

    let port = std::env::var("TEST_PGBOUNCER_PORT").ok();
    let (gateway, via) = match &port {
        Some(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "GRANT CONNECT ON DATABASE {db} TO pgbouncer_auth"
            )))
            .execute(&admin)
            .await
            .expect("auth login");
            let url = format!("postgresql://{gw}:{password}@127.0.0.1:{p}/{db}");
            (
                Gateway::connect_with(url.parse().unwrap(), PgPoolOptions::new().max_connections(1))
                    .await
                    .expect("pool"),
                "PgBouncer (transaction pooling)",
            )
        }
        None => {
            let url = with_db(&admin_url, &db);
            let (base, rest) = url.split_once("://").unwrap();
            let host = rest.split_once('@').unwrap().1;
            let url = format!("{base}://{gw}:{password}@{host}");
            (
                Gateway::connect_direct(url.parse().unwrap(), PgPoolOptions::new().max_connections(1))
                    .await
                    .expect("pool"),
                "direct",
            )
        }
    };
    let (mut lib, mut plain) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    let (mut lib_cpu, mut plain_cpu) = (0u64, 0u64);
    // In a transaction: through PgBouncer, a statement outside one may be
    // parsed on one server connection and run on another.
    let mut tx = gateway.pool().begin().await.unwrap();
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Warm-up, then alternate so both see the same server state.
    for i in 0..(requests + 200) {
        let id = (i % 10_000) as i32 + 1;
        let c0 = cpu_ticks(backend);
        let t = Instant::now();
        let mut tx = gateway.begin(name.as_str(), "bench", "r").await.expect("begin");
        let _: String = sqlx::query_scalar("SELECT v FROM items WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let l = t.elapsed();
        let c1 = cpu_ticks(backend);
        let t = Instant::now();
        let mut tx = gateway.pool().begin().await.unwrap();
        let _: String = sqlx::query_scalar("SELECT v FROM bench_plain.items WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let p = t.elapsed();
        let c2 = cpu_ticks(backend);
        if i >= 200 {
            lib.push(l);
            plain.push(p);
            lib_cpu += c1.saturating_sub(c0);
            plain_cpu += c2.saturating_sub(c1);
        }
    }
    let (l, p) = (p50(lib), p50(plain));
    println!("data path via {via}, {requests} requests each, one-row SELECT by key per transaction:");
    println!("  plain transaction p50   {:>8.1} us", p.as_secs_f64() * 1e6);
    println!("  tenant transaction p50  {:>8.1} us", l.as_secs_f64() * 1e6);
    println!("  ratio (target <= 1.10)  {:>8.3}", l.as_secs_f64() / p.as_secs_f64());
    if plain_cpu > 0 {
        // Ticks are 10 ms: only the sums over all requests mean anything.
        let per = |t: u64| t as f64 * 10_000.0 / requests as f64;
        println!(
            "  server CPU per request  {:>8.1} us tenant, {:.1} us plain (backend {backend}, ratio {:.3})",
            per(lib_cpu),
            per(plain_cpu),
            lib_cpu as f64 / plain_cpu as f64
        );
    }

    gateway.pool().close().await;
    admin.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut su)
        .await;
}
