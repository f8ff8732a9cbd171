//! A tenant's full backup (pg_dump, seal, upload to the filesystem store)
//! against plain `pg_dump -Fc` of the same schema to a file, in one run.
//!
//! `bash scripts/with-postgres.sh cargo bench --bench backup` (reads
//! TEST_PG_SUPERUSER_URL and TEST_PG_ADMIN_URL). Creates a database of its
//! own with one tenant whose schema holds about BENCH_BACKUP_MB (default
//! 1024) MiB of rows (INSERT ... SELECT generate_series), then times, in
//! alternation, BENCH_ROUNDS (default 2) rounds of:
//! - the baseline: `pg_dump -Fc -n <schema> -f <file>`;
//! - the operator: `backup::backup` (the same pg_dump, run as the tenant's
//!   ops login with `--role=<owner>`, streamed through the
//!   tenant's backup key into a multipart upload to a `file://` store, plus
//!   the manifest, the backups table row and pruning).
//!
//! Prints the best time of each, the sizes, and the ratio (target: at most
//! 1.15). Drops its database and roles at the end. Not part of `cargo test`.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use support::bench_ring;
use tenant_operator::api::TenantSpec;
use tenant_operator::backup::{self, Retention, Store, StoreConfig, Tools};
use tenant_operator::controller::tenant::{converge_db, plan};

use tenant_operator::crypto::{self, Keyring};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/with-postgres.sh cargo bench --bench backup`");
        std::process::exit(2)
    })
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

fn plain_pg_dump(url: &str, schema: &str, out: &std::path::Path) -> Duration {
    let mut u = url::Url::parse(url).unwrap();
    let pw = u.password().unwrap_or_default().to_owned();
    u.set_password(None).unwrap();
    let started = Instant::now();
    let st = std::process::Command::new("pg_dump")
        .env("PGPASSWORD", pw)
        .arg("--format=custom")
        .arg(format!("--schema=\"{schema}\""))
        .arg("--file")
        .arg(out)
        .arg("--dbname")
        .arg(u.as_str())
        .status()
        .expect("run pg_dump");
    assert!(st.success(), "pg_dump failed");
    started.elapsed()
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mb: u64 = std::env::var("BENCH_BACKUP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let db = format!("bench_backup_{:08x}", rand::random::<u32>());
    let mut su = PgConnection::connect(&su_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db} OWNER tenancy_admin")))
        .execute(&mut su)
        .await
        .unwrap();
    let admin_url = with_db(&env("TEST_PG_ADMIN_URL"), &db);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&admin_url)
        .await
        .unwrap();
    pg::migrate_control_schema(&pool).await.unwrap();

    let name = TenantName::parse(&format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff)).unwrap();
    let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
    let desired = plan::desired_db(&name, &spec).unwrap();
    let catalog = pg::tenant::observe(&pool, &name).await.unwrap();
    converge_db(
        &pool,
        &bench_ring(),
        &name,
        &format!("uid-{name}"),
        &desired,
        &catalog,
        None,
        "bench",
    )
    .await
    .unwrap();
    let (schema, owner) = (name.schema(), name.owner_role());

    // About `mb` MiB: rows of ~200 bytes on disk, half of it hex (which
    // compresses about 2:1), the rest numbers, a repeated word and a time.
    let rows = mb * 1024 * 1024 / 200;
    eprintln!("backup bench: filling {schema} with {rows} rows (~{mb} MiB)...");
    let fill = Instant::now();
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE \"{owner}\";
         CREATE TABLE \"{schema}\".events (id bigint PRIMARY KEY, ref bigint NOT NULL, kind text NOT NULL, payload text NOT NULL, created_at timestamptz NOT NULL);
         RESET ROLE;"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let batch = 500_000u64;
    let mut from = 1u64;
    while from <= rows {
        let to = (from + batch - 1).min(rows);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET ROLE \"{owner}\";
             INSERT INTO \"{schema}\".events
             SELECT g, g * 7919 % 1000003, (ARRAY['order','invoice','refund','login'])[1 + g % 4],
                    md5(g::text) || md5((g * 31)::text) || ' customer ' || (g % 5000) || ' item ' || (g % 977) || repeat(' ok', 10),
                    timestamptz '2026-01-01' + g * interval '1 second'
               FROM generate_series({from}::bigint, {to}::bigint) g;
             RESET ROLE;"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        from = to + 1;
    }
    let size: i64 = sqlx::query_scalar("SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'")
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("CHECKPOINT").execute(&mut su).await.ok();
    eprintln!("backup bench: {} MiB in {:.1?}", size / (1024 * 1024), fill.elapsed());

    let mut keys = std::collections::BTreeMap::new();
    keys.insert("v1".to_string(), crypto::generate_root_key().to_vec());
    let ring = Arc::new(Keyring::new(keys, "v1").unwrap());
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
            .unwrap();
    let store = Store::open(&StoreConfig {
        url: format!("file://{}/store", dir.path().display()),
        ..Default::default()
    })
    .unwrap();
    let tools = Tools::default();
    let target = tenant_operator::pg::Target::from_url(&admin_url).unwrap();
    let plain_file = dir.path().join("plain.dump");

    let (mut best_plain, mut best_full) = (Duration::MAX, Duration::MAX);
    let (mut plain_bytes, mut full_bytes) = (0u64, 0u64);
    for round in 1..=rounds {
        let t = plain_pg_dump(&admin_url, &schema, &plain_file);
        plain_bytes = std::fs::metadata(&plain_file).unwrap().len();
        std::fs::remove_file(&plain_file).ok();
        let started = Instant::now();
        // As the backup command by hand runs it: the ops login and backup
        // key derived, pg_dump as the ops login, the outcome recorded.
        let access = backup::TenantAccess::derive(&pool, &target, &name, &ring)
            .await
            .unwrap();
        let out = backup::backup(
            &access,
            &tools,
            &store,
            Retention {
                count: Some(1),
                max_age: None,
            },
        )
        .await
        .unwrap();
        backup::record(&pool, &out).await.unwrap();
        let f = started.elapsed();
        full_bytes = out.manifest.bytes;
        eprintln!("round {round}: plain pg_dump {t:.2?}, full backup {f:.2?}");
        best_plain = best_plain.min(t);
        best_full = best_full.min(f);
    }
    let ratio = best_full.as_secs_f64() / best_plain.as_secs_f64();
    println!(
        "backup of a {} MiB tenant schema: plain pg_dump -Fc to a file {:.2?} ({} MiB), full backup (dump + AES-256-GCM + upload to file:// store) {:.2?} ({} MiB); ratio {:.3} (target <= 1.15)",
        size / (1024 * 1024),
        best_plain,
        plain_bytes / (1024 * 1024),
        best_full,
        full_bytes / (1024 * 1024),
        ratio
    );

    pool.close().await;
    drop(admin);
    let roles = [name.ops_role(), name.app_role(), name.owner_role()];
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .unwrap();
    for r in roles {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS \"{r}\"")))
            .execute(&mut su)
            .await
            .ok();
    }
}
