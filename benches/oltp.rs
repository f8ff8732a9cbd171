//! What the audit log costs an application (issue 20, docs/audit.md): a
//! pgbench transaction (read a row, update a row, insert a row, commit)
//! over TCP as the tenant's own app role, against the tenant's audited
//! tables and against the same tables in a plain schema without triggers,
//! same role, same server, same run. Prints transactions per second and
//! p50/p99 latency for each, and the ratio audited/plain:
//! - 1, 4 and 16 clients on one tenant;
//! - 16 clients spread over 16 tenants (one pgbench per tenant, at once);
//! - 1 and 16 clients on one tenant, and 16 over 16 tenants, with a seal
//!   delay (`tenancy.audit_seal_delay_ms`, BENCH_SEAL_DELAY_MS, default
//!   100): one seal per delay on a busy tenant instead of one per commit;
//! - 16 clients on one tenant through the gateway role (`SET LOCAL ROLE`
//!   to the tenant's app role and its `search_path` in each transaction,
//!   as `tenancy-client` begins one);
//! - 1 and 16 clients on one tenant while a snapshot is held elsewhere
//!   on the server for the whole case (as a backup's pg_dump holds one):
//!   no dead row is removed meanwhile, on either side;
//! - the floor, at 1 and 16 clients: the same tables with the least an
//!   audit trigger can do, one INSERT of the keys into a log table
//!   (SECURITY DEFINER, no chain, no head, nothing at commit), from a
//!   statement trigger (`floor_0`) and from a row trigger (`floor_1`),
//!   against plain: what any PL/pgSQL trigger design costs here.
//!
//! `PG_EXTRA_OPTS="-c fsync=on -c synchronous_commit=on -c full_page_writes=on" bash scripts/with-postgres.sh cargo bench --bench oltp`
//! (fsync on, as in production; pgbench from the server's bin directory or
//! PATH). BENCH_SECONDS (default 15) per run, BENCH_ROUNDS (default 1;
//! medians over rounds, plain and audited alternating), BENCH_ACCOUNTS
//! (default 10,000 rows per tenant). Then `audit verify` of the busiest
//! tenant, in entries per second. Creates a database of its own and drops
//! it at the end (BENCH_KEEP=1 keeps it, and prints how to reach it). Not
//! part of `cargo test`.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sqlx::{Connection, PgConnection};
use support::bench_ring;
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::{converge_db, plan};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

const TENANTS: usize = 16;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/with-postgres.sh cargo bench --bench oltp`");
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

/// pgbench of the server's version when it is there, else PATH's.
fn pgbench() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin/pgbench")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .find(|p| p.exists())
        .unwrap_or_else(|| "pgbench".into())
}

/// The tables of one schema: accounts to read and update, history to
/// insert into (as pgbench's TPC-B-like transaction, one account).
fn tables_sql(schema: &str, accounts: u64) -> String {
    format!(
        "CREATE TABLE {schema}.accounts (id integer PRIMARY KEY, balance bigint NOT NULL, name text NOT NULL);
         CREATE TABLE {schema}.history (id bigserial PRIMARY KEY, account_id integer NOT NULL, delta integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO {schema}.accounts SELECT g, 0, 'account ' || g FROM generate_series(1, {accounts}) g;"
    )
}

fn script(schema: &str, accounts: u64, prelude: &str) -> String {
    format!(
        "\\set aid random(1, {accounts})
\\set delta random(-5000, 5000)
BEGIN;
{prelude}SELECT balance FROM {schema}.accounts WHERE id = :aid;
UPDATE {schema}.accounts SET balance = balance + :delta WHERE id = :aid;
INSERT INTO {schema}.history (account_id, delta) VALUES (:aid, :delta);
END;
"
    )
}

/// One pgbench process: its transactions and their latencies (µs).
struct Run {
    child: std::process::Child,
    logs: PathBuf,
}

/// Starts pgbench with `clients` connections for `seconds`, logging every
/// transaction's latency into a fresh directory.
fn start(url: &str, script: &Path, clients: u64, seconds: u64, work: &Path, tag: &str) -> Run {
    let logs = work.join(tag);
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).expect("log dir");
    let child = Command::new(pgbench())
        .current_dir(&logs)
        .args(["-n", "-M", "prepared", "-l", "--log-prefix", "tx"])
        .arg(format!("-c{clients}"))
        .arg(format!("-j{}", clients.min(2)))
        .arg(format!("-T{seconds}"))
        .arg("-f")
        .arg(script)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench runs (install the PostgreSQL server package)");
    Run { child, logs }
}

/// Waits for the runs and returns (transactions per second, latencies in µs).
fn finish(runs: Vec<Run>, seconds: u64) -> (f64, Vec<u64>) {
    let mut lat = Vec::new();
    for run in runs {
        let out = run.child.wait_with_output().expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "pgbench saw failures:\n{stdout}"
        );
        for f in std::fs::read_dir(&run.logs).expect("logs").flatten() {
            // client_id transaction_no time script_no time_epoch time_us
            for line in std::fs::read_to_string(f.path()).expect("log").lines() {
                if let Some(us) = line.split_whitespace().nth(2).and_then(|t| t.parse().ok()) {
                    lat.push(us);
                }
            }
        }
    }
    lat.sort_unstable();
    (lat.len() as f64 / seconds as f64, lat)
}

fn pct(lat: &[u64], p: f64) -> f64 {
    if lat.is_empty() {
        return f64::NAN;
    }
    let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
    lat[i] as f64 / 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let seconds = env_or("BENCH_SECONDS", 15).max(1);
    let rounds = env_or("BENCH_ROUNDS", 1).max(1);
    let accounts = env_or("BENCH_ACCOUNTS", 10_000).max(1);
    let keep = std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1");
    let dbname = format!("bench_oltp_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.expect("superuser connects");
    let fsync: String =
        sqlx::query_scalar("SELECT current_setting('fsync') || '/' || current_setting('synchronous_commit')")
            .fetch_one(&mut su)
            .await
            .expect("settings");
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
    let facts = pg::admin_facts(&pool).await.expect("facts");
    pg::harden_database(&pool, &facts).await.expect("harden");
    // The gateway: a login member of the tenants' app roles.
    let gw = pg::gateway::GatewayName::parse(&format!("gw_{dbname}")).expect("gateway name");
    let gw_password = pg::scram::generate_password();
    pg::gateway::converge(&pool, &gw, &gw_password, true)
        .await
        .expect("gateway");
    let mut admin = PgConnection::connect(&with_db(&admin_url, &dbname))
        .await
        .expect("admin connects");

    // Tenants: provisioned by the operator's code, tables created as the
    // owner and audited by a second reconcile; the plain twin of each
    // tenant's tables in a schema without triggers, writable by the same
    // app role.
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).expect("default spec");
    let tag = format!("{:05x}", rand::random::<u32>() & 0xf_ffff);
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        let name = TenantName::parse(&format!("oltp-{tag}-{i}")).expect("name");
        let uid = format!("uid-{name}");
        let mut desired = plan::desired_db(&name, &spec).expect("desired");
        desired.gateway = Some(gw.to_string());
        let catalog = pg::tenant::observe(&pool, &name).await.expect("observe");
        let out = converge_db(&pool, &bench_ring(), &name, &uid, &desired, &catalog, None, "bench")
            .await
            .expect("provision");
        let password = out.plan.password.clone();
        let (schema, owner, app) = (name.schema(), name.owner_role(), name.app_role());
        let plain = format!("plain_{i}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA {plain}; {plain_tables}
             GRANT USAGE ON SCHEMA {plain} TO {app};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {plain} TO {app};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA {plain} TO {app};
             BEGIN; GRANT {owner} TO CURRENT_USER; SET LOCAL ROLE {owner}; {tenant_tables} RESET ROLE; REVOKE {owner} FROM CURRENT_USER; COMMIT;
             ANALYZE {plain}.accounts;",
            plain_tables = tables_sql(&plain, accounts),
            tenant_tables = tables_sql(&schema, accounts),
        )))
        .execute(&mut admin)
        .await
        .expect("create the tables");
        support::audit_new_tables(&pool, &name, &uid, &desired, &password).await;
        tenants.push((name, password, plain));
    }
    // The floor, beside tenant 0: the same tables with the least an audit
    // trigger can do (SECURITY DEFINER with a fixed search_path, one INSERT
    // of the statement's keys into a log table; no chain, no head, nothing
    // at commit), writable by tenant 0's app role.
    {
        let app = tenants[0].0.app_role();
        let trigger = |table: &str, op: &str, refs: &str| {
            format!(
                "CREATE TRIGGER f_{op} AFTER {op} ON floor_0.{table} REFERENCING {refs} FOR EACH STATEMENT EXECUTE FUNCTION floor_0.one();
                 CREATE TRIGGER f_{op} AFTER {op} ON floor_1.{table} FOR EACH ROW EXECUTE FUNCTION floor_0.row_one();"
            )
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA floor_0; {tables}
             {floor}
             CREATE SCHEMA floor_1; {tables1}
             {upd} {ins}
             GRANT USAGE ON SCHEMA floor_0, floor_1 TO {app};
             GRANT SELECT, INSERT, UPDATE ON floor_0.accounts, floor_0.history, floor_1.accounts, floor_1.history TO {app};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA floor_0 TO {app};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA floor_1 TO {app};
             ANALYZE floor_0.accounts; ANALYZE floor_1.accounts;",
            tables = tables_sql("floor_0", accounts),
            tables1 = tables_sql("floor_1", accounts),
            upd = trigger("accounts", "UPDATE", "OLD TABLE AS tenancy_old NEW TABLE AS tenancy_new"),
            ins = trigger("history", "INSERT", "NEW TABLE AS tenancy_new"),
            floor = support::floor_sql("floor_0", |row| format!("to_jsonb({row}) -> 'id'")),
        )))
        .execute(&mut admin)
        .await
        .expect("create the floor tables");
    }
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut admin)
        .await
        .expect("analyze");

    let work = std::env::temp_dir().join(&dbname);
    std::fs::create_dir_all(&work).expect("work dir");
    let (base, _) = admin_url.rsplit_once('/').expect("URL");
    let (_, host) = base.rsplit_once('@').expect("URL has a host");
    let url_of = |user: &str, password: &str| format!("postgresql://{user}:{password}@{host}/{dbname}");
    let write_script = |file: &str, body: String| {
        let p = work.join(file);
        std::fs::write(&p, body).expect("script");
        p
    };
    // (label, [(url, script, clients)] for plain, the same for audited)
    type Side = Vec<(String, PathBuf, u64)>;
    // (label, plain side, audited side, a snapshot held elsewhere meanwhile)
    let mut cases: Vec<(String, Side, Side, bool)> = Vec::new();
    let (name0, pw0, plain0) = &tenants[0];
    let app0 = url_of(&name0.app_role(), pw0);
    // Tenant 0's app role on the plain tables against `schema`'s.
    let one_tenant = |label: String, schema: &str, clients: u64| {
        (
            label,
            vec![(
                app0.clone(),
                write_script("plain0.sql", script(plain0, accounts, "")),
                clients,
            )],
            vec![(
                app0.clone(),
                write_script(&format!("{schema}.sql"), script(schema, accounts, "")),
                clients,
            )],
            false,
        )
    };
    for clients in [1u64, 4, 16] {
        cases.push(one_tenant(
            format!("{clients} client(s) on one tenant"),
            &name0.schema(),
            clients,
        ));
    }
    // The same with a seal delay: a transaction starting within it of the
    // tenant's last seal leaves its entries to a later one (the session's
    // setting, through libpq's `options`).
    let delay = env_or("BENCH_SEAL_DELAY_MS", 100);
    let delayed = |url: &str| format!("{url}?options=-c%20tenancy.audit_seal_delay_ms%3D{delay}");
    for clients in [1u64, 16] {
        let (label, plain, mut audited, _) = one_tenant(
            format!("{clients} client(s) on one tenant, seal delay {delay} ms"),
            &name0.schema(),
            clients,
        );
        audited[0].0 = delayed(&audited[0].0);
        cases.push((label, plain, audited, false));
    }
    for clients in [1u64, 16] {
        for (floor, what) in [
            ("floor_1", "one INSERT per row"),
            ("floor_0", "one INSERT per statement"),
        ] {
            cases.push(one_tenant(
                format!("{clients} client(s), floor: {what}"),
                floor,
                clients,
            ));
        }
    }
    let (mut plain_all, mut audited_all) = (Vec::new(), Vec::new());
    for (i, (name, pw, plain)) in tenants.iter().enumerate() {
        let url = url_of(&name.app_role(), pw);
        plain_all.push((
            url.clone(),
            write_script(&format!("plain{i}.sql"), script(plain, accounts, "")),
            1,
        ));
        audited_all.push((
            url,
            write_script(&format!("tenant{i}.sql"), script(&name.schema(), accounts, "")),
            1,
        ));
    }
    let audited_delayed = audited_all
        .iter()
        .map(|(u, p, c)| (delayed(u), p.clone(), *c))
        .collect();
    cases.push((
        "16 clients over 16 tenants".into(),
        plain_all.clone(),
        audited_all,
        false,
    ));
    cases.push((
        format!("16 clients over 16 tenants, seal delay {delay} ms"),
        plain_all,
        audited_delayed,
        false,
    ));
    let gw_url = url_of(gw.as_str(), &gw_password);
    let role = format!("SET LOCAL ROLE {};\n", name0.app_role());
    cases.push((
        "16 clients on one tenant, gateway role".into(),
        vec![(
            gw_url.clone(),
            write_script(
                "gw-plain0.sql",
                script(plain0, accounts, &format!("{role}SET LOCAL search_path = {plain0};\n")),
            ),
            16,
        )],
        vec![(
            gw_url,
            write_script(
                "gw-tenant0.sql",
                script(
                    &name0.schema(),
                    accounts,
                    &format!("{role}SET LOCAL search_path = {};\n", name0.schema()),
                ),
            ),
            16,
        )],
        false,
    ));
    // While a snapshot is held elsewhere on the server for the whole case
    // (as a backup's pg_dump holds one): vacuum removes no dead row of
    // either side meanwhile, the pending table's included.
    for clients in [1u64, 16] {
        let (label, plain, audited, _) = one_tenant(
            format!("{clients} client(s) on one tenant, a snapshot held elsewhere"),
            &name0.schema(),
            clients,
        );
        cases.push((label, plain, audited, true));
    }

    let run_side = |side: &Side, tag: &str, seconds: u64| {
        let runs: Vec<Run> = side
            .iter()
            .enumerate()
            .map(|(i, (url, script, clients))| start(url, script, *clients, seconds, &work, &format!("{tag}-{i}")))
            .collect();
        finish(runs, seconds)
    };
    println!(
        "OLTP transaction (SELECT, UPDATE, INSERT of one row each, commit) as the app role over TCP, {seconds} s per run, \
         {rounds} round(s), fsync/synchronous_commit {fsync}, {accounts} accounts per tenant:"
    );
    let mut ratios = Vec::new();
    for (label, plain, audited, hold) in &cases {
        // The held snapshot, on a connection of its own (a backup's
        // transaction has no id: it holds back the horizon only).
        let mut holder = if *hold {
            let mut c = PgConnection::connect(&with_db(&su_url, &dbname))
                .await
                .expect("superuser connects");
            sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_catalog.pg_class")
                .execute(&mut c)
                .await
                .expect("hold a snapshot");
            Some(c)
        } else {
            None
        };
        // A short warm-up of each side (caches, the first chain appends).
        run_side(plain, "warm-p", 2);
        run_side(audited, "warm-a", 2);
        let (mut tp, mut ta, mut lp, mut la) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (t, l) = run_side(plain, &format!("p{r}"), seconds);
            tp.push(t);
            lp.push(l);
            let (t, l) = run_side(audited, &format!("a{r}"), seconds);
            ta.push(t);
            la.push(l);
        }
        let (tps_p, tps_a) = (median(tp), median(ta));
        // Latency percentiles over every transaction of every round.
        let mut lp: Vec<u64> = lp.concat();
        let mut la: Vec<u64> = la.concat();
        // (each run's list is sorted; the concatenation is sorted again)
        lp.sort_unstable();
        la.sort_unstable();
        println!(
            "  {label:<40} plain: {tps_p:>7.0} tps  p50 {:>6.2} ms  p99 {:>6.2} ms   audited: {tps_a:>7.0} tps  p50 {:>6.2} ms  p99 {:>6.2} ms   throughput ratio {:.2}x",
            pct(&lp, 0.50),
            pct(&lp, 0.99),
            pct(&la, 0.50),
            pct(&la, 0.99),
            tps_a / tps_p
        );
        ratios.push((label.clone(), tps_a / tps_p));
        if let Some(mut c) = holder.take() {
            sqlx::raw_sql("COMMIT")
                .execute(&mut c)
                .await
                .expect("release the snapshot");
            sqlx::raw_sql("VACUUM").execute(&mut c).await.expect("vacuum");
        }
    }

    // audit verify of the busiest tenant.
    let start_v = Instant::now();
    let report = pg::audit::verify(&pool, &bench_ring(), name0).await.expect("verify");
    let took = start_v.elapsed();
    println!(
        "  audit verify: {} entries in {:.0} ms: {:.0} entries/s; intact: {}",
        report.rows,
        took.as_secs_f64() * 1e3,
        report.rows as f64 / took.as_secs_f64(),
        report.first_break.is_none()
    );
    assert!(
        report.first_break.is_none(),
        "the chain is broken: {:?}",
        report.first_break
    );
    for (label, r) in &ratios {
        println!("RESULT oltp {label}: {r:.2}x");
    }

    pool.close().await;
    drop(admin);
    if keep {
        println!(
            "kept: database {dbname}, app role {} (password {pw0}), gateway {gw}",
            name0.app_role()
        );
        return;
    }
    let _ = std::fs::remove_dir_all(&work);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {dbname} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .expect("drop database");
}
