//! End to end at scale, as a user sees it: the release binaries (operator,
//! Kubernetes API test server), kubectl and Postgres, beside plain psql
//! doing the same DDL on the same server in the same run.
//!
//! `bash scripts/bench-scale.sh` (builds the release binaries, starts a
//! private Postgres with fsync on, runs this). BENCH_TENANTS (default 1000;
//! 10000 for the large run) tenants. Prints:
//! - provisioning: `kubectl apply -f` of N Tenants (following a one-table
//!   MigrationSet) until every Tenant is Ready, beside ONE psql session
//!   creating the same roles, schema, grants, settings and table for N
//!   tenants, one transaction each;
//! - migration: `kubectl apply` of a new MigrationSet version (5 DDL
//!   statements) until its status is Complete, beside ONE psql session
//!   running the same 5 statements per schema, one transaction each;
//! - both again against psql running the operator's own statements for
//!   each tenant (rendered by the operator's code: the audit log's objects
//!   and triggers, the version table and rows included), so the ratio
//!   splits into what the product's DDL costs and what the operator's
//!   machinery (observations, logins, the API server) adds;
//! - per phase, the WAL written, the WAL syncs (each a wait for the disk
//!   with fsync on) and the transactions committed, per tenant, for the
//!   operator and for both psql baselines;
//! - the ratios, the operator's peak RSS, the CPU time of the API test
//!   server against the whole machine's, the failed reconciles (the
//!   operator's `reconcile_errors` metric), the migration runs that failed
//!   (its log's warnings), the usage sampler's writes after the migration
//!   (until one of its samples finds none due), then an idle resync's writes
//!   (Tenant resourceVersions that moved, DDL statements in the server log).
//!
//! Not part of `cargo test`.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use sqlx::{Connection, PgConnection};
use tenant_operator::api::{MigrationSet, MigrationSetPhase, Tenant};

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run `bash scripts/bench-scale.sh`");
        std::process::exit(2)
    })
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

fn release_bin(name: &str) -> PathBuf {
    built_bin("release", name, "cargo build --release --workspace --bins")
}

/// The operator as the image ships it (`[profile.dist]` in Cargo.toml: built
/// for size).
fn dist_bin(name: &str) -> PathBuf {
    built_bin("dist", name, "cargo build --profile dist --bin tenant-operator")
}

fn built_bin(profile: &str, name: &str, build: &str) -> PathBuf {
    // The bench runs from target/release/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir");
    let bin = target.join(profile).join(name);
    if !bin.exists() {
        eprintln!(
            "{} is missing: `{build}` first (scripts/bench-scale.sh does)",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

/// glibc's malloc settings that the operator's image sets (Dockerfile, ENV
/// GLIBC_TUNABLES): two arenas, a fixed mmap threshold of 256 KiB and a
/// trim threshold of 512 KiB (docs/scale.md, "The operator's memory").
const IMAGE_GLIBC_TUNABLES: &str =
    "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=524288";

/// The one table of the first version.
const V1: &str =
    "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())";

/// The 5 DDL statements of the measured migration.
fn v2() -> String {
    "CREATE TABLE events (id bigserial PRIMARY KEY, ref bigint NOT NULL, kind text NOT NULL, payload jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX events_kind ON events (kind, created_at);
ALTER TABLE events ADD COLUMN source text;
CREATE TABLE event_tags (event_id bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE, tag text NOT NULL, PRIMARY KEY (event_id, tag));
COMMENT ON TABLE events IS 'bench'"
        .into()
}

/// What plain psql does to provision tenant `i` of the baseline: the
/// operator's statements for a new tenant, written by hand (roles, schema,
/// grants, default privileges, connect, role settings, the version-1 table
/// created as the owner), one transaction per tenant. Like the operator,
/// the admin is a member of the owner inside that transaction only
/// (`tenant_operator::pg::membership`): a standing membership in every tenant's roles
/// makes each such statement walk all of them (about 0.4 s per tenant at
/// 4,000 tenants on PostgreSQL 15, docs/scale.md). No `GRANT ... ON ALL
/// TABLES IN SCHEMA`: the schema is new and empty, so it grants nothing,
/// and it reads the whole of `pg_class` (until 2026-12-03 both sides ran it;
/// the operator now finds a schema's objects through `pg_depend`).
fn baseline_tenant(i: usize, db: &str) -> String {
    let s = format!("psqlb_{i}");
    let (owner, app, ops) = (format!("{s}_owner"), format!("{s}_app"), format!("{s}_ops"));
    // A SCRAM verifier of a random password, as the operator sends it for
    // a password it drew (16 iterations: Postgres checks every verifier a
    // CREATE ROLE gets against the empty password, at the verifier's
    // iteration count, about 5 ms at 4,096).
    let verifier =
        tenant_operator::pg::scram::verifier_for_random_secret(&tenant_operator::pg::scram::generate_password());
    format!(
        "BEGIN;
CREATE ROLE {owner} NOLOGIN NOINHERIT; COMMENT ON ROLE {owner} IS 'bench'; GRANT {owner} TO CURRENT_USER;
CREATE ROLE {app} LOGIN NOINHERIT CONNECTION LIMIT 20 PASSWORD '{verifier}'; COMMENT ON ROLE {app} IS 'bench';
CREATE ROLE {ops} LOGIN NOINHERIT CONNECTION LIMIT 4; COMMENT ON ROLE {ops} IS 'bench'; GRANT {owner} TO {ops};
CREATE SCHEMA {s} AUTHORIZATION {owner}; COMMENT ON SCHEMA {s} IS 'bench';
GRANT USAGE ON SCHEMA {s} TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {s} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {app};
GRANT CONNECT ON DATABASE {db} TO {app}, {ops};
ALTER ROLE {app} SET search_path TO {s}; ALTER ROLE {app} SET statement_timeout TO '30s';
ALTER ROLE {app} SET idle_in_transaction_session_timeout TO '60s'; ALTER ROLE {app} SET work_mem TO '16MB';
SET LOCAL ROLE {owner}; SET LOCAL search_path TO {s};
{V1};
RESET ROLE; REVOKE {owner} FROM CURRENT_USER;
COMMIT;
"
    )
}

/// What the operator itself runs to provision tenant `i`, in one psql
/// transaction: its plan for a new tenant rendered by the operator's own
/// code (`plan_db` on an empty catalog, `pg::tenant::render`: roles,
/// schema, grants, default privileges, role settings, the owner
/// membership borrowed and given back), the database's CONNECT grant, the
/// first migration as its runner does it (the version table, the table,
/// its version row) and the audit log's objects (`pg::audit::plan` on a
/// fresh schema with that table: the tables, the functions, the guard, the
/// table's triggers). Left out: what lives in the control schema (the
/// registry, the anchor function, the recorded versions) and the reads a
/// reconcile makes; so this baseline asks psql for the statements whose
/// cost is the product's, and the ratio against it is what the operator's
/// own machinery costs on top.
fn baseline_tenant_full(i: usize, db: &str) -> String {
    use tenant_operator::controller::tenant::plan::{desired_db, plan_db};
    use tenant_operator::pg::audit::{plan as audit_plan, render as audit_render, AuditState};
    use tenant_operator::pg::tenant::{render, CatalogState, DbAction};
    let name = tenant_operator::names::TenantName::parse(&format!("f{i:05}")).expect("a valid name");
    let uid = format!("00000000-0000-4000-8000-{i:012}");
    let spec: tenant_operator::api::TenantSpec = serde_json::from_str("{}").expect("an empty spec");
    let desired = desired_db(&name, &spec).expect("the default spec plans");
    let plan = plan_db(&name, &uid, &desired, &CatalogState::default(), None).expect("a new tenant plans");
    let (schema, owner) = (name.schema(), name.owner_role());
    let mut sql = vec!["BEGIN".to_string()];
    let mut give_back = Vec::new();
    for a in &plan.actions {
        let stmts = render(a, &name, &uid).expect("render");
        match a {
            DbAction::RevokeOwnerFromAdmin => give_back = stmts,
            DbAction::GrantConnect => sql.push(format!(
                "GRANT CONNECT ON DATABASE {db} TO {}, {}",
                name.app_role(),
                name.ops_role()
            )),
            _ => sql.extend(stmts),
        }
    }
    sql.push(format!("SET LOCAL ROLE {owner}"));
    sql.push(format!("SET LOCAL search_path TO {schema}"));
    sql.push(tenant_operator::pg::migrations::create_version_table_sql(&name).expect("version table"));
    sql.push(V1.into());
    sql.push(format!(
        "INSERT INTO {schema}.{} (version, name, checksum, duration_ms) VALUES (1, 'items', '{}', 0)",
        tenant_operator::pg::migrations::VERSION_TABLE,
        tenant_operator::pg::migrations::checksum(V1)
    ));
    let fresh = AuditState {
        schema_exists: true,
        untriggered: vec!["items".into()],
        ..AuditState::default()
    };
    for a in audit_plan(&fresh, None) {
        sql.extend(audit_render(&a, &name).expect("render"));
    }
    sql.push("RESET ROLE".into());
    sql.extend(give_back);
    sql.push("COMMIT".into());
    sql.join(";\n") + ";\n"
}

/// The migration as the operator runs it on tenant `i` of
/// [`baseline_tenant_full`]: the 5 statements, the version row and the
/// audit triggers of the two new tables (`pg::audit::plan` with every
/// other audit object in place), as the owner in one transaction.
fn baseline_migration_full(i: usize) -> String {
    use tenant_operator::pg::audit::{plan as audit_plan, render as audit_render, AuditState};
    let name = tenant_operator::names::TenantName::parse(&format!("f{i:05}")).expect("a valid name");
    let (schema, owner) = (name.schema(), name.owner_role());
    let mut sql = vec![
        "BEGIN".to_string(),
        format!("GRANT {owner} TO CURRENT_USER"),
        format!("SET LOCAL ROLE {owner}"),
        format!("SET LOCAL search_path TO {schema}"),
        v2(),
        format!(
            "INSERT INTO {schema}.{} (version, name, checksum, duration_ms) VALUES (2, 'events', '{}', 0)",
            tenant_operator::pg::migrations::VERSION_TABLE,
            tenant_operator::pg::migrations::checksum(&v2())
        ),
    ];
    let converged = AuditState::objects_present(vec!["event_tags".into(), "events".into()]);
    for a in audit_plan(&converged, None) {
        sql.extend(audit_render(&a, &name).expect("render"));
    }
    sql.extend([
        "RESET ROLE".to_string(),
        format!("REVOKE {owner} FROM CURRENT_USER"),
        "COMMIT".into(),
    ]);
    sql.join(";\n") + ";\n"
}

/// The migration as plain psql runs it: as the owner, a member of it for the
/// tenant's transaction only.
fn baseline_migration(i: usize) -> String {
    let s = format!("psqlb_{i}");
    format!(
        "BEGIN; GRANT {s}_owner TO CURRENT_USER; SET LOCAL ROLE {s}_owner; SET LOCAL search_path TO {s};\n{};\nRESET ROLE; REVOKE {s}_owner FROM CURRENT_USER;\nCOMMIT;\n",
        v2()
    )
}

/// Runs a SQL file through ONE psql session as the admin; its wall time.
fn psql_file(url: &str, sql: &str, dir: &Path, label: &str) -> Duration {
    let path = dir.join(format!("{label}.sql"));
    std::fs::write(&path, sql).expect("write sql");
    let start = Instant::now();
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&path)
        .arg(url)
        .output()
        .expect("run psql");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "psql {label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// What a phase wrote and how often it waited for the disk: the server's
/// WAL insert position (exact), its WAL syncs (`pg_stat_wal`) and the
/// transactions committed in database `db` (`pg_stat_database`). The two
/// counters come from the statistics each backend flushes at a
/// transaction's end at most once a second while busy, within ten seconds
/// once idle, and at exit: a mark taken right after a phase may miss its
/// last second (the operator's marks are taken after a pause).
#[derive(Clone, Copy, Default)]
struct WalMark {
    bytes: i64,
    syncs: i64,
    commits: i64,
}

async fn wal_mark(su: &mut PgConnection, db: &str) -> WalMark {
    let (bytes, syncs, commits): (i64, i64, i64) = sqlx::query_as(
        "SELECT (pg_current_wal_lsn() - '0/0')::int8, (SELECT wal_sync FROM pg_stat_wal), \
                coalesce((SELECT xact_commit FROM pg_stat_database WHERE datname = $1), 0)",
    )
    .bind(db)
    .fetch_one(su)
    .await
    .expect("the WAL position and counters");
    WalMark { bytes, syncs, commits }
}

/// `to - from` per tenant, as one line: WAL written, WAL syncs, commits.
fn wal_line(label: &str, from: WalMark, to: WalMark, n: usize) -> String {
    let n = n.max(1) as f64;
    format!(
        "{label}: {:.1} MB of WAL in {} syncs, {} commits (per tenant {:.1} kB, {:.2} syncs, {:.2} commits)",
        (to.bytes - from.bytes) as f64 / 1e6,
        to.syncs - from.syncs,
        to.commits - from.commits,
        (to.bytes - from.bytes) as f64 / 1e3 / n,
        (to.syncs - from.syncs) as f64 / n,
        (to.commits - from.commits) as f64 / n,
    )
}

/// One phase's [`wal_line`]s: the operator's (its marks taken 11 s after
/// the phase), psql's running the operator's statements, plain psql's;
/// printed as they come.
fn wal_lines(
    phase: &str,
    op: (WalMark, WalMark),
    full: (WalMark, WalMark),
    plain: (WalMark, WalMark),
    n: usize,
) -> [String; 3] {
    let lines = [
        wal_line(&format!("{phase}, operator (and 11 s after)"), op.0, op.1, n),
        wal_line(
            &format!("{phase}, psql running the operator's statements"),
            full.0,
            full.1,
            n,
        ),
        wal_line(&format!("{phase}, plain psql"), plain.0, plain.1, n),
    ];
    for l in &lines {
        eprintln!("{l}");
    }
    lines
}

/// [`psql_file`] between two [`wal_mark`]s of database `db`.
async fn psql_file_wal(
    su: &mut PgConnection,
    db: &str,
    url: &str,
    sql: &str,
    dir: &Path,
    label: &str,
) -> (Duration, WalMark, WalMark) {
    let from = wal_mark(su, db).await;
    let took = psql_file(url, sql, dir, label);
    // psql's backend flushes its statistics as it exits, just after psql
    // returns.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (took, from, wal_mark(su, db).await)
}

/// Busy jiffies of the whole machine (all CPUs), from /proc/stat.
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    cpu.iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum()
}

/// utime + stime of a process, in jiffies.
fn proc_cpu(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("kubectl");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn migration_set(versions: &[(i64, &str, String)]) -> String {
    let migrations: Vec<serde_json::Value> = versions
        .iter()
        .map(|(v, n, sql)| serde_json::json!({"version": v, "name": n, "sql": sql}))
        .collect();
    serde_json::json!({
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "MigrationSet", "metadata": {"name": "default"},
        "spec": {"migrations": migrations}
    })
    .to_string()
}

fn ready(t: &Tenant) -> bool {
    t.status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until `done` holds for every one of `n` watched objects; the time
/// at which it first did.
async fn wait_all<K, F>(api: Api<K>, n: usize, deadline: Duration, done: F) -> Instant
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(&K) -> bool,
{
    let mut state: HashMap<String, bool> = HashMap::new();
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    let limit = Instant::now() + deadline;
    loop {
        let ev = tokio::time::timeout_at(limit.into(), stream.next())
            .await
            .expect("timed out waiting");
        match ev {
            Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => {
                state.insert(o.name_any(), done(&o));
            }
            Some(Ok(watcher::Event::Delete(o))) => {
                state.remove(&o.name_any());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => eprintln!("watch: {e}"),
            None => panic!("watch ended"),
        }
        if state.len() >= n && state.values().filter(|v| **v).count() >= n {
            return Instant::now();
        }
    }
}

/// The operator's `/metrics` page (empty when it cannot be read).
fn metrics_page(port: u16) -> String {
    use std::io::Read as _;
    let mut text = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let _ = s.read_to_string(&mut text);
    }
    text
}

/// The sum of the samples on the lines starting with `prefix`; None when
/// there is none.
fn sum_lines(text: &str, prefix: &str) -> Option<u64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
}

/// The usage sampler's samples so far and the status writes its latest
/// sample found due, summed over the shards (the operator's `/metrics`);
/// None before its first sample.
fn scrape_usage(port: u16) -> Option<(u64, u64)> {
    use tenant_operator::telemetry::{USAGE_SAMPLES_TOTAL, USAGE_WRITES_DUE};
    let text = metrics_page(port);
    Some((
        sum_lines(&text, &format!("{USAGE_SAMPLES_TOTAL}{{"))?,
        sum_lines(&text, &format!("{USAGE_WRITES_DUE}{{"))?,
    ))
}

/// Waits for a usage sample that began after this call and found no
/// Tenant's usage to write (two samples ended since the call: the second
/// began after it). The time it took, and whether it came before
/// `deadline`.
async fn wait_usage_steady(port: u16, deadline: Duration) -> (Duration, bool) {
    let start = Instant::now();
    let first = scrape_usage(port).map_or(0, |(n, _)| n);
    while start.elapsed() < deadline {
        if let Some((n, due)) = scrape_usage(port) {
            if n >= first + 2 && due == 0 {
                return (start.elapsed(), true);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (start.elapsed(), false)
}

/// The operator's reconcile counters at one moment (its `/metrics`).
#[derive(Clone, Copy, Default)]
struct Counters {
    /// Reconciles run by the Tenant controller, and by the MigrationSet
    /// controller (each one a rollout pass).
    tenant: u64,
    sets: u64,
    /// Reconciles that failed, every controller and reason.
    errors: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            tenant: self.tenant - o.tenant,
            sets: self.sets - o.sets,
            errors: self.errors - o.errors,
        }
    }
}

/// Reads the counters, by the names the operator's telemetry exports them
/// under. Panics when the page shows no reconcile counter (unreachable, or
/// renamed): a failed-reconcile count of zero must come from a page that
/// was read. (An error counter has no line before the first error.) (Until 2026-12-04 this matched
/// the names without their `tenant_operator_` prefix and so always read 0.)
async fn scrape(port: u16) -> Counters {
    let text = metrics_page(port);
    let sum = |prefix: &str| sum_lines(&text, prefix);
    use tenant_operator::telemetry::{RECONCILES_TOTAL, RECONCILE_ERRORS_TOTAL};
    // Other controllers (the rate-limit writer, the sets) have run by the
    // time the first Tenant is applied.
    assert!(
        text.lines().any(|l| l.starts_with(RECONCILES_TOTAL)),
        "the operator's /metrics (port {port}) shows no {RECONCILES_TOTAL}:\n{text}"
    );
    Counters {
        // A family has no line for a controller that has not run yet.
        tenant: sum(&format!("{RECONCILES_TOTAL}{{controller=\"tenant\"}}")).unwrap_or(0),
        sets: sum(&format!("{RECONCILES_TOTAL}{{controller=\"migrationset\"}}")).unwrap_or(0),
        errors: sum(&format!("{RECONCILE_ERRORS_TOTAL}{{")).unwrap_or(0),
    }
}

/// The operator's "migration failed" warnings in its log so far: a run of
/// the bench's migrations (which cannot fail on their own) that failed
/// (recorded in `tenancy.migration_failures`, shown on the tenant and the
/// set), which no failed-reconcile count shows.
fn logged_migration_failures(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&data)
        .lines()
        .filter(|l| l.contains("\"message\":\"migration failed\""))
        .count()
}

fn pg_log_ddl(path: &str, from: u64) -> usize {
    let data = std::fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(data.get(from as usize..).unwrap_or(&[]));
    tail.lines()
        .filter(|l| l.contains("statement: ") && !l.contains("psqlb_"))
        .count()
}

/// The server processes started on database `db` since byte `from` of the
/// server log (`log_connections`, set by scripts/bench-scale.sh), by the
/// kind of login: a tenant's confined ops login, a tenant's app login, the
/// operator's admin, anything else. Each is a new Postgres backend, with
/// its cold catalog caches (docs/scale.md).
fn pg_log_logins(path: &str, from: u64, db: &str) -> Logins {
    let data = std::fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(data.get(from as usize..).unwrap_or(&[]));
    let mut n = Logins::default();
    let needle = format!(" database={db}");
    for l in tail.lines().filter(|l| l.contains("connection authorized: user=")) {
        let Some(rest) = l.split("connection authorized: user=").nth(1) else {
            continue;
        };
        if !rest.contains(&needle) {
            continue;
        }
        let user = rest.split_whitespace().next().unwrap_or("");
        match user {
            u if u.starts_with("tenant_") && u.ends_with("_ops") => n.ops += 1,
            u if u.starts_with("tenant_") && u.ends_with("_app") => n.app += 1,
            "tenancy_admin" => n.admin += 1,
            _ => n.other += 1,
        }
    }
    n
}

#[derive(Default, Debug)]
struct Logins {
    ops: usize,
    app: usize,
    admin: usize,
    other: usize,
}

impl std::fmt::Display for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} new server processes (tenant ops logins {}, tenant app logins {}, admin {}, other {})",
            self.ops + self.app + self.admin + self.other,
            self.ops,
            self.app,
            self.admin,
            self.other
        )
    }
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// With `BENCH_PROFILE=1`: the operator database's statements of one phase
/// from pg_stat_statements (preloaded by scripts/with-postgres.sh), the
/// heaviest first: where Postgres' time goes.
async fn profile_reset(su: &mut PgConnection) {
    if std::env::var_os("BENCH_PROFILE").is_none() {
        return;
    }
    // Planning time too: a statement planned at each call (a custom plan
    // of a prepared statement, an unprepared one) costs its planning on
    // top of its execution.
    // (ALTER SYSTEM alone: a message of several statements is one
    // transaction, where it may not run.)
    for sql in [
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        "ALTER SYSTEM SET pg_stat_statements.track_planning = on",
        "SELECT pg_reload_conf()",
        "SELECT pg_stat_statements_reset()",
    ] {
        sqlx::raw_sql(sql)
            .execute(&mut *su)
            .await
            .expect("pg_stat_statements (BENCH_PROFILE)");
    }
}

async fn profile_print(su: &mut PgConnection, db: &str, phase: &str) {
    if std::env::var_os("BENCH_PROFILE").is_none() {
        return;
    }
    // Statements that differ only in quoted identifiers (one per tenant)
    // are counted together.
    // The longest single call beside the total: a few long waits and many
    // slow calls give the same total.
    let rows: Vec<(String, i64, f64, f64, f64)> = sqlx::query_as(
        "SELECT left(regexp_replace(regexp_replace(query, '\"[^\"]*\"', '?', 'g'), '\\s+', ' ', 'g'), 160) AS q, \
                sum(calls)::int8, sum(total_exec_time), max(max_exec_time), sum(total_plan_time) \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = $1 GROUP BY q ORDER BY sum(total_exec_time) + sum(total_plan_time) DESC LIMIT 25",
    )
    .bind(db)
    .fetch_all(su)
    .await
    .expect("pg_stat_statements");
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let planning: f64 = rows.iter().map(|r| r.4).sum();
    println!(
        "profile of {phase} (top 25 statements by execution and planning, {total:.0} ms executing and {planning:.0} ms planning in all of them):"
    );
    for (q, calls, ms, longest, plan) in rows {
        println!("  {ms:>10.0} ms {calls:>8} calls (longest {longest:>7.1} ms, planning {plan:>7.0} ms)  {q}");
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // The operator's default resync (RESYNC_SECONDS, 300 s): what a user
    // runs. A shorter one adds a full observation of every tenant every
    // interval to the burst (at 10,000 tenants and 30 s, 333 a second).
    let resync: u64 = std::env::var("BENCH_RESYNC_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    assert!(
        include_str!("../Dockerfile").contains(&format!("GLIBC_TUNABLES={IMAGE_GLIBC_TUNABLES}")),
        "the Dockerfile's GLIBC_TUNABLES differ from IMAGE_GLIBC_TUNABLES: keep them the same"
    );
    let su_url = env("TEST_PG_SUPERUSER_URL");
    let admin_url = env("TEST_PG_ADMIN_URL");
    let pg_log = env("TEST_PG_LOG");
    let dir = tempfile::tempdir().expect("tempdir");
    let (op_db, base_db, full_db) = ("scale_op", "scale_psql", "scale_psql_full");
    let mut su = PgConnection::connect(&su_url).await.expect("superuser connects");
    // psql's baseline runs as an admin role of its own, made like the
    // operator's (CREATEROLE, pg_signal_backend): roles are the cluster's,
    // not a database's, and an admin that is a member of both sides' tenant
    // roles would make each side pay for the other's. Postgres 15 computes a
    // role's memberships in time quadratic in their number, dropping them at
    // every role change (docs/scale.md), so the side that runs second (the
    // operator) would pay for twice its own memberships.
    let psql_admin = "tenancy_admin_psql";
    let psql_password: String = sqlx::query_scalar("SELECT md5(random()::text)")
        .fetch_one(&mut su)
        .await
        .expect("a password");
    // The old baseline database goes first: it holds the old role's objects,
    // and DROP DATABASE may not share a message with other statements.
    for db in [base_db, full_db] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&mut su)
        .await
        .expect("drop the baseline's database");
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {psql_admin}; \
         CREATE ROLE {psql_admin} LOGIN CREATEROLE PASSWORD '{psql_password}'; GRANT pg_signal_backend TO {psql_admin}"
    )))
    .execute(&mut su)
    .await
    .expect("the baseline's admin role");
    for (db, owner) in [(op_db, "tenancy_admin"), (base_db, psql_admin), (full_db, psql_admin)] {
        // One statement per message: neither may run in a transaction block.
        for stmt in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db} OWNER {owner}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
                .execute(&mut su)
                .await
                .expect("create database");
        }
    }
    let psql_url = |db: &str| {
        let mut u = url::Url::parse(&with_db(&admin_url, db)).expect("admin URL");
        u.set_username(psql_admin).expect("user");
        u.set_password(Some(&psql_password)).expect("password");
        u.to_string()
    };
    let (base_url, full_url) = (psql_url(base_db), psql_url(full_db));
    let op_url = with_db(&admin_url, op_db);
    // The operator's start-up hardening, on all three.
    for url in [&op_url, &base_url, &full_url] {
        let db = url.rsplit_once('/').map(|(_, d)| d).unwrap_or_default();
        let mut c = PgConnection::connect(url).await.expect("admin connects");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC; REVOKE ALL ON SCHEMA public FROM PUBLIC"
        )))
        .execute(&mut c)
        .await
        .expect("harden");
    }
    println!(
        "scale bench: N = {n} tenants, Postgres {}, 2 CPUs",
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&mut su)
            .await
            .unwrap()
    );

    // --- the API test server, CRDs, namespace, keys, MigrationSet v1
    let kubeconfig = dir.path().join("kubeconfig");
    let server_log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let server = Command::new(release_bin("kube-test-server"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::null())
        .stderr(server_log)
        .spawn()
        .expect("kube-test-server");
    let server_pid = server.id();
    let mut procs = Procs(vec![server]);
    for _ in 0..200 {
        if kubeconfig.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kubectl(
        &kubeconfig,
        &["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")],
        None,
    );
    kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "crd/tenants.tenancy.dev",
            "--timeout=30s",
        ],
        None,
    );
    kubectl(&kubeconfig, &["create", "namespace", "tenant-system"], None);
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&tenant_operator::keys::new_secret_yaml(
            "tenant-system",
            "tenant-operator-root-keys",
        )),
    );
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&migration_set(&[(1, "items", V1.into())])),
    );
    let metrics_port = free_port();
    // BENCH_OPERATOR_LOG keeps the operator's log at that path (with
    // BENCH_RUST_LOG as its filter), to see why it reconciled.
    let op_log_path = std::env::var_os("BENCH_OPERATOR_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("operator.log"));
    let op_log = std::fs::File::create(&op_log_path).unwrap();
    // BENCH_OPERATOR_WRAPPER runs the operator under a profiler, e.g.
    // `heaptrack -o /tmp/op` (words split on spaces); the peak RSS printed
    // is then the wrapper's process's.
    let wrapper: Vec<String> = std::env::var("BENCH_OPERATOR_WRAPPER")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut operator = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(dist_bin("tenant-operator"));
            c
        }
        None => Command::new(dist_bin("tenant-operator")),
    };
    // The image's malloc settings (Dockerfile), so the RSS measured is the
    // RSS shipped; BENCH_GLIBC_TUNABLES overrides them ("" = glibc's
    // defaults).
    let tunables = std::env::var("BENCH_GLIBC_TUNABLES").unwrap_or_else(|_| IMAGE_GLIBC_TUNABLES.into());
    if !tunables.is_empty() {
        operator.env("GLIBC_TUNABLES", &tunables);
    }
    eprintln!(
        "operator's GLIBC_TUNABLES: {}",
        if tunables.is_empty() { "(none)" } else { &tunables }
    );
    let operator = operator
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env("DATABASE_URL", &op_url)
        .env("OPERATOR_NAMESPACE", "tenant-system")
        .env("RESYNC_SECONDS", resync.to_string())
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(op_log.try_clone().unwrap())
        .stderr(op_log)
        .spawn()
        .expect("operator");
    let op_pid = operator.id();
    procs.0.push(operator);
    // Peak RSS, sampled (VmHWM too, at the end).
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(proc_status_kib(op_pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .expect("kube client");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // --- provisioning
    // First psql running the operator's own statements, then its database
    // and roles dropped (roles are the cluster's: left, they would make
    // the two measurements after it work on a larger pg_authid).
    let full_prov: String = (0..n).map(|i| baseline_tenant_full(i, full_db)).collect();
    let (psql_full_prov, wal_full_prov0, wal_full_prov1) = psql_file_wal(
        &mut su,
        full_db,
        &full_url,
        &full_prov,
        dir.path(),
        "baseline-provision-full",
    )
    .await;
    let full_mig: String = (0..n).map(baseline_migration_full).collect();
    let (psql_full_mig, wal_full_mig0, wal_full_mig1) = psql_file_wal(
        &mut su,
        full_db,
        &full_url,
        &full_mig,
        dir.path(),
        "baseline-migration-full",
    )
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {full_db} WITH (FORCE)")))
        .execute(&mut su)
        .await
        .expect("drop the full baseline's database");
    let drops: String = (0..n)
        .flat_map(|i| {
            let t = tenant_operator::names::TenantName::parse(&format!("f{i:05}")).expect("a valid name");
            [t.app_role(), t.ops_role(), t.owner_role()]
        })
        .map(|r| format!("DROP ROLE {r};\n"))
        .collect();
    psql_file(&base_url, &drops, dir.path(), "baseline-full-drop-roles");
    let base_prov: String = (0..n).map(|i| baseline_tenant(i, base_db)).collect();
    let (psql_prov, wal_prov0, wal_prov1) = psql_file_wal(
        &mut su,
        base_db,
        &base_url,
        &base_prov,
        dir.path(),
        "baseline-provision",
    )
    .await;
    let manifests: String = (0..n)
        .map(|i| {
            format!("---\napiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata:\n  name: t{i:05}\nspec: {{}}\n")
        })
        .collect();
    std::fs::write(dir.path().join("tenants.yaml"), &manifests).unwrap();
    profile_reset(&mut su).await;
    let wal_op_prov0 = wal_mark(&mut su, op_db).await;
    let (busy0, srv0, op0) = (machine_busy(), proc_cpu(server_pid), proc_cpu(op_pid));
    let counted0 = scrape(metrics_port).await;
    let log_prov = file_len(&pg_log);
    let start = Instant::now();
    let apply_path = dir.path().join("tenants.yaml");
    let apply = tokio::task::spawn_blocking({
        let kc = kubeconfig.clone();
        move || {
            let s = Instant::now();
            kubectl(&kc, &["apply", "-f", apply_path.to_str().unwrap()], None);
            s.elapsed()
        }
    });
    let all_ready = wait_all(Api::<Tenant>::all(client.clone()), n, Duration::from_secs(3600), ready).await;
    let kubectl_apply = apply.await.unwrap();
    let op_prov = all_ready - start;
    let (busy1, srv1, op1) = (machine_busy(), proc_cpu(server_pid), proc_cpu(op_pid));
    let counted_prov = scrape(metrics_port).await;
    let prov = counted_prov - counted0;
    let errors_prov = prov.errors;
    let failed_runs_prov = logged_migration_failures(&op_log_path);
    // The RSS peak so far and the RSS now, at each phase's end: when the
    // peak happens, and what stays.
    let rss_at = |phase: &str| {
        let (p, now) = (peak.load(Ordering::Relaxed), proc_status_kib(op_pid, "VmRSS:"));
        let mib = |k: u64| k as f64 / 1024.0;
        // What the RSS is made of: the binary's and libraries' pages
        // (file-backed) against the heap, stacks and buffers (anonymous).
        let (anon, file) = (proc_status_kib(op_pid, "RssAnon:"), proc_status_kib(op_pid, "RssFile:"));
        format!(
            "{phase}: RSS {:.1} MiB (anonymous {:.1}, file-backed {:.1}), peak so far {:.1} MiB",
            mib(now),
            mib(anon),
            mib(file),
            mib(p.max(now))
        )
    };
    let rss_prov = rss_at("every Tenant Ready");
    let secs = |d: Duration| d.as_secs_f64();
    // As it goes (a run of 10,000 takes long): the summary below repeats it.
    eprintln!(
        "provisioning: psql {:.2} s, operator {:.2} s ({:.2}x), {errors_prov} failed reconciles; psql running the operator's statements {:.2} s ({:.2}x)",
        secs(psql_prov),
        secs(op_prov),
        secs(op_prov) / secs(psql_prov),
        secs(psql_full_prov),
        secs(op_prov) / secs(psql_full_prov)
    );
    let logins_prov = pg_log_logins(&pg_log, log_prov, op_db);
    eprintln!("provisioning: {logins_prov}");
    // The operator's idle backends flush their statistics within ten
    // seconds (wal_mark).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let wal_op_prov1 = wal_mark(&mut su, op_db).await;
    let wal_prov_lines = wal_lines(
        "provisioning",
        (wal_op_prov0, wal_op_prov1),
        (wal_full_prov0, wal_full_prov1),
        (wal_prov0, wal_prov1),
        n,
    );
    profile_print(&mut su, op_db, "provisioning").await;

    // --- migration
    let base_mig: String = (0..n).map(baseline_migration).collect();
    let (psql_mig, wal_mig0, wal_mig1) =
        psql_file_wal(&mut su, base_db, &base_url, &base_mig, dir.path(), "baseline-migration").await;
    let sets: Api<MigrationSet> = Api::all(client.clone());
    profile_reset(&mut su).await;
    let wal_op_mig0 = wal_mark(&mut su, op_db).await;
    let log_mig = file_len(&pg_log);
    let start = Instant::now();
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&migration_set(&[(1, "items", V1.into()), (2, "events", v2())])),
    );
    let complete = wait_all(sets, 1, Duration::from_secs(3600), |s: &MigrationSet| {
        let gen = s.metadata.generation;
        s.status.as_ref().is_some_and(|st| {
            st.phase == Some(MigrationSetPhase::Complete)
                && st.observed_generation == gen
                && st.latest_version == Some(2)
        })
    })
    .await;
    // Every Tenant shows the new version (the set's Complete comes from the
    // rollout; each Tenant's status.schemaVersion from its own reconcile),
    // watched from here on: the measures below take seconds.
    let tenants: Api<Tenant> = Api::all(client.clone());
    let shown = tokio::spawn(wait_all(tenants.clone(), n, Duration::from_secs(3600), |t: &Tenant| {
        t.status.as_ref().is_some_and(|st| st.schema_version == Some(2))
    }));
    let op_mig = complete - start;
    let mig = scrape(metrics_port).await - counted_prov;
    let errors_mig = mig.errors;
    let failed_runs_mig = logged_migration_failures(&op_log_path) - failed_runs_prov;
    let rss_mig = rss_at("the set Complete");
    eprintln!(
        "migration: psql {:.2} s, operator {:.2} s ({:.2}x), {errors_mig} failed reconciles; psql running the operator's statements {:.2} s ({:.2}x)",
        secs(psql_mig),
        secs(op_mig),
        secs(op_mig) / secs(psql_mig),
        secs(psql_full_mig),
        secs(op_mig) / secs(psql_full_mig)
    );
    let logins_mig = pg_log_logins(&pg_log, log_mig, op_db);
    eprintln!("migration: {logins_mig}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let wal_op_mig1 = wal_mark(&mut su, op_db).await;
    let wal_mig_lines = wal_lines(
        "migration",
        (wal_op_mig0, wal_op_mig1),
        (wal_full_mig0, wal_full_mig1),
        (wal_mig0, wal_mig1),
        n,
    );
    profile_print(&mut su, op_db, "the migration").await;

    let shown = shown.await.expect("the followers' watch");
    let followers_lag = shown.saturating_duration_since(complete);

    // --- an idle resync: nothing may be written
    let by_name = |list: Vec<Tenant>| list.into_iter().map(|t| (t.name_any(), t)).collect::<HashMap<_, _>>();
    // The usage sampler writes what the migration changed first: every
    // schema's size grew (two tables), and the rates its writes left fall
    // back to zero. At most 500 Tenants a sample (15 s apart by default,
    // more when a sample that reads many schemas' files is paced by its
    // cost), longest-waiting first: minutes of writes at 10,000 tenants.
    // The idle window starts at the first sample, begun after this point,
    // that found no Tenant's usage to write (the operator's metrics), so
    // that it measures a resync with nothing to do; the drain is printed
    // beside it.
    let drain_from = by_name(tenants.list(&Default::default()).await.expect("list").items);
    let (drain_time, drained) = wait_usage_steady(metrics_port, Duration::from_secs(1800)).await;
    let before = by_name(tenants.list(&Default::default()).await.expect("list").items);
    let drain_writes = before
        .iter()
        .filter(|(k, v)| drain_from.get(*k).map(|a| a.resource_version()) != Some(v.resource_version()))
        .count();
    profile_reset(&mut su).await;
    // After the profile's own statements (ALTER SYSTEM is logged as DDL).
    let log_from = file_len(&pg_log);
    tokio::time::sleep(Duration::from_secs(resync + 10)).await;
    // What a resync of every tenant costs the server when nothing changed.
    profile_print(&mut su, op_db, "the idle resync").await;
    let after = by_name(tenants.list(&Default::default()).await.expect("list").items);
    let moved: Vec<&String> = before
        .iter()
        .filter(|(k, v)| after.get(*k).map(|a| a.resource_version()) != Some(v.resource_version()))
        .map(|(k, _)| k)
        .collect();
    // The usage sampler writes a tenant's status.usage once when its
    // figures moved (the migration grew every schema), at most 500 Tenants
    // a sample and a sample at most every tenth of the time: at 10,000
    // tenants it is still writing those sizes during the window. Such a
    // write changes status.usage only; anything else is the resync's.
    let without_usage = |t: &Tenant| {
        let mut st = t.status.clone();
        if let Some(s) = st.as_mut() {
            s.usage = None;
        }
        (
            serde_json::to_value(&t.spec).ok(),
            serde_json::to_value(st).ok(),
            t.metadata.labels.clone(),
            t.metadata.annotations.clone(),
            t.metadata.finalizers.clone(),
        )
    };
    let (usage_only, other): (Vec<&String>, Vec<&String>) = moved
        .iter()
        .copied()
        .partition(|k| without_usage(&before[*k]) == without_usage(&after[*k]));
    for (what, list) in [("a usage write", &usage_only), ("another write", &other)] {
        if let Some(name) = list.first() {
            // What an idle write changed, for the first one of each kind.
            let show = |t: &Tenant| serde_json::to_string(&t.status).unwrap_or_default();
            println!(
                "first Tenant written while idle ({what}), {name}:\n  before {}\n  after  {}",
                show(&before[*name]),
                show(&after[*name])
            );
        }
    }
    let (moved, usage_only, other) = (moved.len(), usage_only.len(), other.len());
    let idle_ddl = pg_log_ddl(&pg_log, log_from);
    let rss_idle = rss_at("after the idle resync");
    stop.store(true, Ordering::Relaxed);
    let hwm = proc_status_kib(op_pid, "VmHWM:");
    let peak_rss = peak.load(Ordering::Relaxed).max(hwm);

    let busy = (busy1 - busy0).max(1) as f64;
    println!();
    println!("| N = {n} | plain psql, serial | operator, end to end | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| provisioning until every Tenant is Ready | {:.2} s | {:.2} s | {:.2}x |",
        secs(psql_prov),
        secs(op_prov),
        secs(op_prov) / secs(psql_prov)
    );
    println!(
        "| provisioning, psql running the operator's own statements (audit objects included) | {:.2} s | {:.2} s | {:.2}x |",
        secs(psql_full_prov),
        secs(op_prov),
        secs(op_prov) / secs(psql_full_prov)
    );
    println!(
        "| 5-DDL migration, apply to Complete | {:.2} s | {:.2} s | {:.2}x |",
        secs(psql_mig),
        secs(op_mig),
        secs(op_mig) / secs(psql_mig)
    );
    println!(
        "| migration, psql running the operator's own statements (audit triggers, version row) | {:.2} s | {:.2} s | {:.2}x |",
        secs(psql_full_mig),
        secs(op_mig),
        secs(op_mig) / secs(psql_full_mig)
    );
    println!();
    println!("kubectl apply of {n} Tenants alone: {:.2} s", secs(kubectl_apply));
    println!(
        "every Tenant showing the new version: {:.2} s after the set's Complete",
        secs(followers_lag)
    );
    println!(
        "CPU during provisioning (machine busy {:.1} s): API test server {:.1} s ({:.0}%), operator {:.1} s ({:.0}%), the rest (Postgres, kubectl) {:.0}%",
        busy / 100.0,
        (srv1 - srv0) as f64 / 100.0,
        100.0 * (srv1 - srv0) as f64 / busy,
        (op1 - op0) as f64 / 100.0,
        100.0 * (op1 - op0) as f64 / busy,
        100.0 * (busy - (srv1 - srv0) as f64 - (op1 - op0) as f64) / busy
    );
    println!("operator peak RSS: {:.1} MiB", peak_rss as f64 / 1024.0);
    println!("operator RSS by phase: {rss_prov}; {rss_mig}; {rss_idle}");
    println!("failed reconciles: {errors_prov} during provisioning, {errors_mig} during the migration");
    println!("operator's database, provisioning: {logins_prov}; the migration: {logins_mig}");
    for l in wal_prov_lines.iter().chain(&wal_mig_lines) {
        println!("{l}");
    }
    println!(
        "reconciles run: provisioning {} Tenant, {} MigrationSet (rollout passes); migration {} Tenant, {} MigrationSet",
        prov.tenant, prov.sets, mig.tenant, mig.sets
    );
    println!(
        "migration runs that failed (the operator's \"migration failed\" warnings; none of the bench's migrations can fail): {failed_runs_prov} during provisioning, {failed_runs_mig} during the migration"
    );
    println!(
        "after the followers showed the new version: {drain_writes} Tenants written (the usage sampler's sizes and rates) until a usage sample found none to write, {:.1} s{}",
        secs(drain_time),
        if drained { "" } else { " (still some due after 30 minutes: the window below started anyway)" }
    );
    println!("idle resync ({resync} s + 10 s): {moved} Tenant resourceVersions moved ({usage_only} by the usage sampler writing status.usage only, {other} by anything else), {idle_ddl} DDL statements logged by Postgres");
    drop(procs);
}
