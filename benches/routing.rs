//! The scale of routing (docs/data-path.md): many tenants through one shared
//! pool against a pool per tenant, and what one server connection holds
//! after serving every tenant.
//!
//! `PGBOUNCER_POOL_SIZE=20 bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh cargo bench --bench routing`
//!
//! Creates a database of its own with BENCH_TENANTS (default 1,000) tenants
//! provisioned through the operator's code (`converge_db`), each with
//! BENCH_TABLES (default 10) tables of 100 rows made by its owner, and a
//! gateway. Then, alternating BENCH_ROUNDS (default 3) times, for
//! BENCH_SECONDS (default 10) each, with BENCH_CLIENTS (default 40)
//! concurrent clients sending requests to the tenants round-robin, a request
//! being one transaction that reads a row by key:
//! - **shared**: `tenancy_client::Gateway` through PgBouncer in transaction
//!   mode, whose pool for the database holds PGBOUNCER_POOL_SIZE server
//!   connections (the bench checks it);
//! - **per tenant**: each tenant's own login (as its `tenant-<name>-db`
//!   Secret gives it), a pool per tenant, all of them together capped at the
//!   same number of Postgres connections: a tenant whose pool has no
//!   connection open gets one, closing the least recently used one of
//!   another tenant when the cap is reached (what per-tenant pools must do
//!   when tenants outnumber `max_connections`).
//!
//! Prints requests per second of each, their ratio (target >= 3), and then
//! the catalog memory: one direct gateway connection serves one request per
//! tenant that reads each of its tables; its memory (Postgres' own
//! accounting, `pg_log_backend_memory_contexts`, and the process's private
//! RSS) before, after every 100 tenants, and at the end, per tenant.
//! Not part of `cargo test`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tenancy_client::Gateway;
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::{converge_db, plan, ConvergeError};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `PGBOUNCER_POOL_SIZE=20 bash scripts/with-postgres.sh bash scripts/with-pgbouncer.sh cargo bench --bench routing`");
        std::process::exit(2)
    })
}

fn num(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

fn ring() -> tenant_operator::crypto::Keyring {
    tenant_operator::crypto::Keyring::new(
        std::collections::BTreeMap::from([("v1".to_string(), vec![0x5a; 32])]),
        "v1",
    )
    .expect("keyring")
}

/// Provisions one tenant with a gateway membership; gives its app password.
async fn provision(admin: &sqlx::PgPool, name: &TenantName, gateway: &str) -> String {
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
    let mut desired = plan::desired_db(name, &spec).unwrap();
    desired.gateway = Some(gateway.to_string());
    for attempt in 1.. {
        let catalog = pg::tenant::observe(admin, name).await.expect("observe");
        match converge_db(
            admin,
            &ring(),
            name,
            &format!("uid-{name}"),
            &desired,
            &catalog,
            None,
            "bench",
        )
        .await
        {
            Ok(out) => return out.plan.password.clone(),
            Err(ConvergeError::Db(e)) if e.is_transient() && attempt < 20 => {
                tokio::time::sleep(Duration::from_millis(10 * attempt)).await
            }
            Err(e) => panic!("provisioning {name}: {e}"),
        }
    }
    unreachable!()
}

/// Connections per tenant, at most `cap` open in all: a request takes its
/// tenant's connection when one is open, else opens one (closing the least
/// recently used connection of any tenant when `cap` are open).
struct PerTenantPools {
    cap: usize,
    /// (tenant index, connection), least recently used first.
    idle: Mutex<VecDeque<(usize, PgConnection)>>,
    open: Mutex<usize>,
    connects: AtomicU64,
}

impl PerTenantPools {
    async fn take(&self, tenant: usize, opts: &PgConnectOptions) -> PgConnection {
        loop {
            match self.pick(tenant) {
                Pick::Own(c) => return c,
                Pick::Wait => tokio::time::sleep(Duration::from_micros(200)).await,
                Pick::Open(victim) => {
                    if let Some(c) = victim {
                        // Its slot passes to the new connection.
                        let _ = c.close().await;
                    }
                    self.connects.fetch_add(1, Ordering::Relaxed);
                    return PgConnection::connect_with(opts).await.expect("tenant login");
                }
            }
        }
    }

    fn pick(&self, tenant: usize) -> Pick {
        let mut idle = self.idle.lock().unwrap();
        if let Some(i) = idle.iter().position(|(t, _)| *t == tenant) {
            return Pick::Own(idle.remove(i).unwrap().1);
        }
        let mut open = self.open.lock().unwrap();
        if *open < self.cap {
            *open += 1;
            Pick::Open(None)
        } else if let Some((_, c)) = idle.pop_front() {
            Pick::Open(Some(c))
        } else {
            Pick::Wait
        }
    }

    fn give_back(&self, tenant: usize, c: PgConnection) {
        self.idle.lock().unwrap().push_back((tenant, c));
    }
}

enum Pick {
    Own(PgConnection),
    /// Open a connection, closing this one first.
    Open(Option<PgConnection>),
    Wait,
}

/// Runs `clients` loops of `request` for `secs`, the tenants taken
/// round-robin from one shared counter; gives requests per second.
async fn drive<F, Fut>(clients: usize, secs: u64, tenants: usize, request: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, done, stop, request) = (next.clone(), done.clone(), stop.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = next.fetch_add(1, Ordering::Relaxed) as usize % tenants;
                request(t).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// (Postgres' grand total of the backend's memory contexts, the process's
/// private anonymous RSS), in KiB. The grand total comes from the server
/// log, where `pg_log_backend_memory_contexts` writes it.
async fn backend_memory(su: &mut PgConnection, pid: i32, log: &str) -> (Option<u64>, Option<u64>) {
    let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let _: bool = sqlx::query_scalar("SELECT pg_log_backend_memory_contexts($1)")
        .bind(pid)
        .fetch_one(&mut *su)
        .await
        .expect("log memory");
    let mut total = None;
    // The backend logs at its next interrupt check: when its client sends
    // something. The caller makes it do so; wait for the line.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = std::fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(&text[before.min(text.len() as u64) as usize..]).to_string();
        if let Some(line) = tail
            .lines()
            .rev()
            .find(|l| l.contains(&format!("[{pid}]")) && l.contains("Grand total:"))
        {
            total = line
                .split("Grand total:")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .map(|b| b / 1024);
            break;
        }
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        });
    (total, rss)
}

#[tokio::main]
async fn main() {
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let log = env("TEST_PG_LOG");
    let bouncer = env("TEST_PGBOUNCER_PORT");
    let count = num("BENCH_TENANTS", 1000) as usize;
    let tables = num("BENCH_TABLES", 10) as usize;
    let rounds = num("BENCH_ROUNDS", 3);
    let secs = num("BENCH_SECONDS", 10);
    let clients = num("BENCH_CLIENTS", 40) as usize;
    let server_conns: usize = std::env::var("PGBOUNCER_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);

    let db = format!("bench_rt_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db} OWNER tenancy_admin")))
        .execute(&mut su)
        .await
        .expect("create db");
    let (admin, _) = pg::connect(&with_db(&admin_url, &db), 8).await.expect("admin");
    pg::migrate_control_schema(&admin).await.expect("control schema");
    let facts = pg::admin_facts(&admin).await.expect("facts");
    pg::harden_database(&admin, &facts).await.expect("harden");
    let gw = pg::gateway::GatewayName::parse(&format!("gw_{db}")).unwrap();
    let gw_password = pg::scram::generate_password();
    pg::gateway::converge(&admin, &gw, &gw_password, true)
        .await
        .expect("gateway");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT CONNECT ON DATABASE {db} TO pgbouncer_auth"
    )))
    .execute(&admin)
    .await
    .expect("auth login");

    let tag = format!("{:04x}", rand::random::<u16>());
    let names: Vec<TenantName> = (0..count)
        .map(|i| TenantName::parse(&format!("r{tag}-{i:05}")).unwrap())
        .collect();
    let start = Instant::now();
    let passwords: Vec<String> = futures::stream::iter(names.iter())
        .map(|n| provision(&admin, n, gw.as_str()))
        .buffered(8)
        .collect()
        .await;
    println!(
        "provisioned {count} tenants through converge_db in {:.1?}",
        start.elapsed()
    );

    // The tables, made by each tenant's owner (default privileges give its
    // app role access), 100 tenants per statement batch.
    let start = Instant::now();
    let mut su_db = PgConnection::connect(&with_db(&su_url, &db))
        .await
        .expect("superuser on the bench database");
    for chunk in names.chunks(100) {
        let mut sql = String::new();
        for n in chunk {
            sql.push_str(&format!(
                "SET ROLE \"{}\"; SET search_path = \"{}\";",
                n.owner_role(),
                n.schema()
            ));
            for t in 0..tables {
                sql.push_str(&format!(" CREATE TABLE t{t} (id int PRIMARY KEY, v text NOT NULL); INSERT INTO t{t} SELECT g, 'row ' || g FROM generate_series(1, 100) g;"));
            }
            sql.push_str(" RESET ROLE;");
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("BEGIN; {sql} COMMIT")))
            .execute(&mut su_db)
            .await
            .expect("tables");
    }
    println!("created {} tables in {:.1?}", count * tables, start.elapsed());
    let _ = sqlx::raw_sql("ANALYZE").execute(&mut su_db).await;

    let port: u16 = bouncer.parse().expect("TEST_PGBOUNCER_PORT");
    let shared_opts = PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(port)
        .database(&db)
        .username(gw.as_str())
        .password(&gw_password);
    let gateway = Gateway::connect_with(shared_opts, PgPoolOptions::new().max_connections(clients as u32))
        .await
        .expect("gateway pool through PgBouncer");
    let direct: PgConnectOptions = with_db(&admin_url, &db).parse().expect("admin URL");
    let tenant_opts: Arc<Vec<PgConnectOptions>> = Arc::new(
        names
            .iter()
            .zip(&passwords)
            .map(|(n, pw)| {
                direct
                    .clone()
                    .username(&n.app_role())
                    .password(pw)
                    .statement_cache_capacity(0)
            })
            .collect(),
    );
    let names = Arc::new(names);

    let shared = |gateway: Gateway, names: Arc<Vec<TenantName>>| {
        move |t: usize| {
            let (gateway, names) = (gateway.clone(), names.clone());
            async move {
                let mut tx = gateway.begin(names[t].as_str(), "bench", "r").await.expect("begin");
                let _: String = sqlx::query_scalar("SELECT v FROM t0 WHERE id = $1")
                    .bind((t % 100) as i32 + 1)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    let per_tenant = |pools: Arc<PerTenantPools>, opts: Arc<Vec<PgConnectOptions>>| {
        move |t: usize| {
            let (pools, opts) = (pools.clone(), opts.clone());
            async move {
                let mut c = pools.take(t, &opts[t]).await;
                let mut tx = c.begin().await.unwrap();
                let _: String = sqlx::query_scalar("SELECT v FROM t0 WHERE id = $1")
                    .bind((t % 100) as i32 + 1)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                pools.give_back(t, c);
            }
        }
    };

    // Warm-up of both (and the gateway's caps cache).
    drive(clients, 2, count, shared(gateway.clone(), names.clone())).await;
    let server_side: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
        .bind(gw.as_str())
        .fetch_one(&mut su)
        .await
        .unwrap();
    println!("PgBouncer holds {server_side} server connections for the gateway (PGBOUNCER_POOL_SIZE={server_conns}); {clients} clients");
    assert!(
        server_side as usize <= server_conns,
        "PgBouncer opened more server connections than its pool size"
    );

    let (mut shared_sum, mut per_sum) = (0.0, 0.0);
    for round in 1..=rounds {
        let s = drive(clients, secs, count, shared(gateway.clone(), names.clone())).await;
        let pools = Arc::new(PerTenantPools {
            cap: server_conns,
            idle: Mutex::new(VecDeque::new()),
            open: Mutex::new(0),
            connects: AtomicU64::new(0),
        });
        let p = drive(clients, secs, count, per_tenant(pools.clone(), tenant_opts.clone())).await;
        let idle: Vec<(usize, PgConnection)> = pools.idle.lock().unwrap().drain(..).collect();
        for (_, c) in idle {
            let _ = c.close().await;
        }
        println!(
            "round {round}: shared pool {s:>8.0} req/s   per-tenant pools {p:>8.0} req/s ({} connections opened)   ratio {:.2}",
            pools.connects.load(Ordering::Relaxed),
            s / p
        );
        shared_sum += s;
        per_sum += p;
    }
    println!(
        "routing {count} tenants round-robin, {clients} clients, {server_conns} Postgres connections either way: shared {:.0} req/s vs per-tenant {:.0} req/s, ratio {:.2} (target >= 3)",
        shared_sum / rounds as f64,
        per_sum / rounds as f64,
        shared_sum / per_sum
    );
    gateway.pool().close().await;

    // Catalog memory: one direct gateway connection serves every tenant,
    // reading each of its tables once.
    let one = Gateway::connect_direct(
        PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(direct.get_port())
            .database(&db)
            .username(gw.as_str())
            .password(&gw_password),
        PgPoolOptions::new().max_connections(1).min_connections(1),
    )
    .await
    .expect("direct gateway");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(one.pool())
        .await
        .unwrap();
    let union = (0..tables)
        .map(|t| format!("SELECT v FROM t{t} WHERE id = 1"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let (t0, r0) = measure(&mut su, pid, &log, &one).await;
    println!("catalog memory of one server connection (Postgres memory contexts / private RSS, KiB):");
    println!("  fresh connection            {:>9} / {:>9}", fmt(t0), fmt(r0));
    let mut last = (t0, r0);
    for (i, n) in names.iter().enumerate() {
        let mut tx = one.begin(n.as_str(), "bench", "mem").await.expect("begin");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(union.clone()))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(rows.len(), tables);
        tx.commit().await.unwrap();
        if (i + 1) % (count / 5).max(1) == 0 || i + 1 == count {
            last = measure(&mut su, pid, &log, &one).await;
            println!(
                "  after {:>5} tenants        {:>9} / {:>9}",
                i + 1,
                fmt(last.0),
                fmt(last.1)
            );
        }
    }
    if let (Some(a), Some(b)) = (t0, last.0) {
        println!(
            "  per tenant ({tables} tables)     {:>9.1} KiB (memory contexts); a connection that has served 10,000 such tenants holds about {:.0} MiB",
            (b.saturating_sub(a)) as f64 / count as f64,
            (b.saturating_sub(a)) as f64 / count as f64 * 10_000.0 / 1024.0
        );
    }
    one.pool().close().await;
    admin.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut su)
        .await;
}

/// [`backend_memory`] of the connection of `one`, which it makes act on
/// the request (a backend logs its memory at its next interrupt check).
async fn measure(su: &mut PgConnection, pid: i32, log: &str, one: &Gateway) -> (Option<u64>, Option<u64>) {
    let poke = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _: i32 = sqlx::query_scalar("SELECT 1").fetch_one(one.pool()).await.unwrap();
    };
    let (m, _) = tokio::join!(backend_memory(su, pid, log), poke);
    m
}

fn fmt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
