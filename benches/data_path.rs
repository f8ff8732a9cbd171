//! The data path's per-request overhead (docs/data-path.md): a one-row
//! SELECT in a library tenant transaction (`tenancy_client::Gateway::begin`)
//! against the same SELECT in a plain transaction on the same pool, measured
//! alternating in one run; prints both p50s and their ratio (target <= 1.10).
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

#[tokio::main]
async fn main() {
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let requests: usize = std::env::var("BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let db = format!("bench_dp_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db} OWNER tenancy_admin"))).execute(&mut su).await.expect("create db");
    let (admin, _) = pg::connect(&with_db(&admin_url, &db), 4).await.expect("admin");
    pg::migrate_control_schema(&admin).await.expect("control schema");
    let facts = pg::admin_facts(&admin).await.expect("facts");
    pg::harden_database(&admin, &facts).await.expect("harden");
    let gw = pg::gateway::GatewayName::parse(&format!("gw_{db}")).unwrap();
    let password = pg::scram::generate_password();
    pg::gateway::converge(&admin, &gw, &password, true).await.expect("gateway");
    let name = TenantName::parse(&format!("bench-{:06x}", rand::random::<u32>() & 0xffffff)).unwrap();
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
    let mut desired = plan::desired_db(&name, &spec).unwrap();
    desired.gateway = Some(gw.to_string());
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    let ring = tenant_operator::crypto::Keyring::new(std::collections::BTreeMap::from([("v1".to_string(), vec![0x5a; 32])]), "v1").expect("keyring");
    converge_db(&admin, &ring, &name, "uid-bench", &desired, &catalog, None, "bench").await.expect("tenant");

    let port = std::env::var("TEST_PGBOUNCER_PORT").ok();
    let (gateway, via) = match &port {
        Some(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("GRANT CONNECT ON DATABASE {db} TO pgbouncer_auth"))).execute(&admin).await.expect("auth login");
            let url = format!("postgresql://{gw}:{password}@127.0.0.1:{p}/{db}");
            (Gateway::connect_with(url.parse().unwrap(), PgPoolOptions::new().max_connections(1)).await.expect("pool"), "PgBouncer (transaction pooling)")
        }
        None => {
            let url = with_db(&admin_url, &db);
            let (base, rest) = url.split_once("://").unwrap();
            let host = rest.split_once('@').unwrap().1;
            let url = format!("{base}://{gw}:{password}@{host}");
            (Gateway::connect_direct(url.parse().unwrap(), PgPoolOptions::new().max_connections(1)).await.expect("pool"), "direct")
        }
    };
    let (mut lib, mut plain) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    // Warm-up, then alternate so both see the same server state.
    for i in 0..(requests + 200) {
        let t = Instant::now();
        let mut tx = gateway.begin(name.as_str(), "bench", "r").await.expect("begin");
        let _: i32 = sqlx::query_scalar("SELECT 1::int").fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let l = t.elapsed();
        let t = Instant::now();
        let mut tx = gateway.pool().begin().await.unwrap();
        let _: i32 = sqlx::query_scalar("SELECT 1::int").fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let p = t.elapsed();
        if i >= 200 {
            lib.push(l);
            plain.push(p);
        }
    }
    let (l, p) = (p50(lib), p50(plain));
    println!("data path via {via}, {requests} requests each, one-row SELECT per transaction:");
    println!("  plain transaction p50   {:>8.1} us", p.as_secs_f64() * 1e6);
    println!("  tenant transaction p50  {:>8.1} us", l.as_secs_f64() * 1e6);
    println!("  ratio (target <= 1.10)  {:>8.3}", l.as_secs_f64() / p.as_secs_f64());

    gateway.pool().close().await;
    admin.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)"))).execute(&mut su).await;
}
