//! Per-tenant usage: the sampling SQL and the pure arithmetic over samples
//! (README, "Performance isolation"; the leader's loop is
//! `src/controller/usage.rs`, the `top` subcommand `src/top.rs`).
//!
//! [`sample`] reads, in ONE query for all tenants (never one per tenant):
//! - sessions, active and idle (any other state: idle, idle in a
//!   transaction, ...), attributed as the watchdog does
//!   ([`super::watchdog`]): the tenant's app login, or the gateway login in
//!   a tenant transaction (`application_name = 'tenant:<name>'`);
//! - schema bytes: `pg_total_relation_size` (heap, indexes, toast, all
//!   forks) of every table and materialized view of the tenant's schema, in
//!   one pass over `pg_class` hash-joined to the tenants' namespaces
//!   (`pg_class` has no index on `relnamespace` alone: one sequential scan
//!   for all tenants beats 10,000 index-less lookups);
//! - rows written: `n_tup_ins + n_tup_upd + n_tup_del` of those relations
//!   (the functions behind `pg_stat_user_tables`, in the same pass),
//!   cumulative: [`figures`] turns two samples into a rate;
//! - statement time: from `pg_stat_statements` (by `userid` = the tenant's
//!   app role, which is also the role of gateway statements after their
//!   `SET ROLE`) when the extension is installed and readable, cumulative;
//!   otherwise the running statements' elapsed time in `pg_stat_activity`,
//!   each capped at the sample window (a lower bound: statements that start
//!   and end between samples are not seen);
//! - temp bytes: `temp_blks_written` of `pg_stat_statements` (cumulative),
//!   None without it (Postgres keeps no per-role temp figure elsewhere).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row as _};

use super::{query_err, quote_ident, PgError};

/// What the sampler is told.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The gateway login (None: no gateway).
    pub gateway: Option<String>,
    /// Running statements count at most this much each (the time between
    /// samples), in the fallback without `pg_stat_statements`.
    pub window: Duration,
}

/// One tenant's raw figures in one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub uid: String,
    pub sessions_active: i64,
    pub sessions_idle: i64,
    pub bytes: i64,
    /// What `bytes` was measured with ([`USAGE_SQL`], "the size key"): a
    /// later sample whose key is the same keeps `bytes` without reading
    /// the schema's files again.
    pub size_key: i64,
    /// Whether this sample read the schema's files for `bytes` (false: kept
    /// from the sizes it was given).
    pub measured: bool,
    /// When `bytes` was read from the files: this sample's time, or that of
    /// the row it was kept from.
    pub measured_at: Instant,
    /// Cumulative since the statistics were reset.
    pub rows_written: i64,
    /// Running statements' elapsed time, each capped at the window (ms).
    pub running_ms: f64,
    /// Cumulative statement time (ms) from `pg_stat_statements`.
    pub statement_ms: Option<f64>,
    /// Cumulative temp bytes written, from `pg_stat_statements`.
    pub temp_bytes: Option<i64>,
}

/// One sample of every tenant.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub sampled_at: chrono::DateTime<chrono::Utc>,
    pub window: Duration,
    /// Whether statement time and temp bytes came from `pg_stat_statements`.
    pub statements: bool,
    pub rows: Vec<Row>,
}

/// The part of [`USAGE_SQL`] that reads `pg_stat_statements` (`{pgss}`: its
/// qualified name).
const STATEMENTS_SQL: &str =
    "SELECT r.rolname::text AS rolname, pg_catalog.sum(p.total_exec_time)::float8 AS statement_ms,
         (pg_catalog.sum(p.temp_blks_written) * pg_catalog.current_setting('block_size')::int8)::int8 AS temp_bytes
    FROM {pgss} p JOIN pg_catalog.pg_roles r ON r.oid = p.userid
   WHERE p.dbid = (SELECT oid FROM db) AND r.rolname LIKE 'tenant\\_%\\_app'
   GROUP BY r.rolname";

/// Without `pg_stat_statements`.
const NO_STATEMENTS_SQL: &str =
    "SELECT NULL::text AS rolname, NULL::float8 AS statement_ms, NULL::int8 AS temp_bytes WHERE false";

/// The one query for all tenants. $1: the gateway login ('' for none),
/// $2: the window (ms); $3, $4, $5: the tenants whose sizes are known, with
/// the size key and the bytes they were measured with (empty arrays: measure
/// every tenant); `{statements}`: [`STATEMENTS_SQL`] or
/// [`NO_STATEMENTS_SQL`].
pub const USAGE_SQL: &str = r#"
WITH db AS (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()),
t AS (SELECT name, uid, schema_name FROM tenancy.tenants),
r AS (
  -- One pass over pg_class, hash-joined to the tenants' namespaces: each
  -- table, materialized view and index of a tenant schema, with what its
  -- files' size follows (the statistics functions are look-ups in the
  -- server's statistics, not file reads).
  SELECT t.name, c.oid, c.relkind,
         c.oid::text || ':' || c.relfilenode || ':' || c.relpages
           || CASE WHEN c.relkind = 'i' THEN '' ELSE
                ':' || pg_catalog.pg_stat_get_tuples_inserted(c.oid) || ':' || pg_catalog.pg_stat_get_tuples_updated(c.oid)
                || ':' || pg_catalog.pg_stat_get_tuples_deleted(c.oid)
                || ':' || pg_catalog.pg_stat_get_vacuum_count(c.oid) || ':' || pg_catalog.pg_stat_get_autovacuum_count(c.oid)
                || ':' || pg_catalog.pg_stat_get_vacuum_count(c.reltoastrelid) || ':' || pg_catalog.pg_stat_get_autovacuum_count(c.reltoastrelid)
              END AS part,
         CASE WHEN c.relkind <> 'i' THEN pg_catalog.pg_stat_get_tuples_inserted(c.oid) + pg_catalog.pg_stat_get_tuples_updated(c.oid)
                                     + pg_catalog.pg_stat_get_tuples_deleted(c.oid) END AS written
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN t ON t.schema_name = n.nspname
   WHERE c.relkind IN ('r', 'm', 'i')
),
keyed AS (
  -- The size key: a hash of every relation's identity, file node, page
  -- count, rows written and vacuums. What changes a schema's files changes
  -- it: writes, a vacuum, a TRUNCATE, VACUUM FULL, CLUSTER or REINDEX (a new
  -- file node), a table or index made or dropped.
  SELECT name,
         pg_catalog.hashtextextended(pg_catalog.string_agg(part, ',' ORDER BY oid), 0) AS size_key,
         pg_catalog.sum(written)::int8 AS rows_written,
         pg_catalog.array_agg(oid) FILTER (WHERE relkind <> 'i') AS tables
    FROM r GROUP BY name
),
known AS (
  SELECT k.name, k.size_key, k.bytes
    FROM ROWS FROM (pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::int8[]), pg_catalog.unnest($5::int8[])) AS k(name, size_key, bytes)
),
rel AS (
  -- A schema whose key is the one its known size was measured with keeps
  -- that size; the others are measured: `pg_total_relation_size` (heap,
  -- indexes, toast, every fork: an open and a `stat` per file) of each
  -- table, the one costly part of the sample.
  SELECT s.name, s.size_key, s.rows_written,
         (k.size_key IS NULL OR k.size_key <> s.size_key) AS measured,
         CASE WHEN k.size_key = s.size_key THEN k.bytes
              ELSE (SELECT pg_catalog.sum(pg_catalog.pg_total_relation_size(x))::int8 FROM pg_catalog.unnest(s.tables) AS x)
         END AS bytes
    FROM keyed s
    LEFT JOIN known k ON k.name = s.name
),
act AS (
  SELECT a.usename::text AS usename, a.application_name, a.state,
         CASE WHEN a.state = 'active'
              THEN LEAST(EXTRACT(epoch FROM pg_catalog.now() - a.query_start)::float8 * 1000, $2::float8) END AS running_ms
    FROM pg_catalog.pg_stat_activity a
   WHERE a.datid = (SELECT oid FROM db)
     AND a.backend_type = 'client backend'
     AND a.pid <> pg_catalog.pg_backend_pid()
     AND a.usename <> current_user
     AND (a.usename LIKE 'tenant\_%\_app' OR (a.usename = $1 AND a.application_name LIKE 'tenant:%'))
),
owned AS (
  SELECT t.name, a.state, a.running_ms FROM act a JOIN t ON t.schema_name = pg_catalog.left(a.usename, -4) WHERE a.usename <> $1
  UNION ALL
  SELECT t.name, a.state, a.running_ms FROM act a JOIN t ON t.name = pg_catalog.substr(a.application_name, 8) WHERE a.usename = $1
),
sess AS (
  SELECT name,
         pg_catalog.count(*) FILTER (WHERE state = 'active') AS active,
         pg_catalog.count(*) FILTER (WHERE state IS DISTINCT FROM 'active') AS idle,
         pg_catalog.sum(running_ms) AS running_ms
    FROM owned GROUP BY name
),
stmts AS ({statements})
SELECT t.name, t.uid,
       COALESCE(s.active, 0)::int8 AS sessions_active,
       COALESCE(s.idle, 0)::int8 AS sessions_idle,
       COALESCE(r.bytes, 0)::int8 AS bytes,
       COALESCE(r.rows_written, 0)::int8 AS rows_written,
       COALESCE(r.size_key, 0)::int8 AS size_key,
       COALESCE(r.measured, true) AS measured,
       COALESCE(s.running_ms, 0)::float8 AS running_ms,
       st.statement_ms, st.temp_bytes
  FROM t
  LEFT JOIN rel r ON r.name = t.name
  LEFT JOIN sess s ON s.name = t.name
  LEFT JOIN stmts st ON st.rolname = t.schema_name || '_app'
 ORDER BY t.name
"#;

/// The query text, reading `pg_stat_statements` at `pgss` (qualified) or not.
pub fn usage_sql(pgss: Option<&str>) -> String {
    let statements = match pgss {
        Some(rel) => STATEMENTS_SQL.replace("{pgss}", rel),
        None => NO_STATEMENTS_SQL.to_string(),
    };
    USAGE_SQL.replace("{statements}", &statements)
}

/// Where `pg_stat_statements` is readable (its qualified view name), or
/// None: not installed in this database, or not loaded
/// (`shared_preload_libraries`), or older than Postgres 13's columns.
pub async fn statements_source(pool: &PgPool) -> Result<Option<String>, PgError> {
    let schema: Option<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_stat_statements'",
    )
    .fetch_optional(pool)
    .await
    .map_err(query_err("looking for pg_stat_statements"))?;
    let Some(schema) = schema else { return Ok(None) };
    let rel = format!("{}.pg_stat_statements", quote_ident(&schema)?);
    let probe = format!("SELECT p.total_exec_time, p.temp_blks_written FROM {rel} p LIMIT 1");
    match sqlx::query(sqlx::AssertSqlSafe(probe)).fetch_optional(pool).await {
        Ok(_) => Ok(Some(rel)),
        Err(e) => {
            tracing::info!(error = %e, "pg_stat_statements is installed but not readable: statement time is sampled from pg_stat_activity, temp bytes are not reported");
            Ok(None)
        }
    }
}

/// One sample of every tenant ([`USAGE_SQL`]); `pgss` from [`statements_source`].
/// A tenant with a row in `known` (from an earlier sample, see
/// [`known_sizes`]) whose size key is unchanged keeps its bytes from it,
/// without its files being read; the others' files are read.
pub async fn sample(pool: &PgPool, cfg: &Config, pgss: Option<&str>, known: &[&Row]) -> Result<Sample, PgError> {
    let window_ms = cfg.window.as_secs_f64() * 1000.0;
    let sql = usage_sql(pgss);
    let at = Instant::now();
    let sampled_at = chrono::Utc::now();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(cfg.gateway.as_deref().unwrap_or(""))
        .bind(window_ms)
        .bind(known.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
        .bind(known.iter().map(|r| r.size_key).collect::<Vec<_>>())
        .bind(known.iter().map(|r| r.bytes).collect::<Vec<_>>())
        .fetch_all(pool)
        .await
        .map_err(query_err("sampling tenants' usage"))?;
    let e = || query_err("reading a usage row");
    let read_at: BTreeMap<&str, Instant> = known.iter().map(|r| (r.name.as_str(), r.measured_at)).collect();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.try_get("name").map_err(e())?;
        let measured: bool = r.try_get("measured").map_err(e())?;
        let measured_at = match read_at.get(name.as_str()) {
            Some(t) if !measured => *t,
            _ => at,
        };
        out.push(Row {
            name,
            uid: r.try_get("uid").map_err(e())?,
            sessions_active: r.try_get("sessions_active").map_err(e())?,
            sessions_idle: r.try_get("sessions_idle").map_err(e())?,
            bytes: r.try_get("bytes").map_err(e())?,
            size_key: r.try_get("size_key").map_err(e())?,
            measured,
            measured_at,
            rows_written: r.try_get("rows_written").map_err(e())?,
            running_ms: r.try_get("running_ms").map_err(e())?,
            statement_ms: r.try_get("statement_ms").map_err(e())?,
            temp_bytes: r.try_get("temp_bytes").map_err(e())?,
        });
    }
    Ok(Sample {
        at,
        sampled_at,
        window: cfg.window,
        statements: pgss.is_some(),
        rows: out,
    })
}

/// A sample reads the files of the schemas whose size key changed
/// ([`USAGE_SQL`]) and, whatever the keys say, of this share of the
/// tenants, those read longest ago ([`known_sizes_for_next`]): every
/// schema's files are read at least every 40 samples (10 minutes at the
/// sampler's default interval), a fortieth of them at a time.
pub const SIZES_REREAD_SAMPLES: usize = 40;

/// The sizes the sample after `prev` keeps ([`known_sizes`]): all but
/// the [`SIZES_REREAD_SAMPLES`]th part of them read longest ago.
pub fn known_sizes_for_next(prev: &Sample) -> Vec<&Row> {
    known_sizes(prev, prev.rows.len().div_ceil(SIZES_REREAD_SAMPLES))
}

/// The sizes the next sample may keep: every row of `prev` but the
/// `reread` whose bytes were read from the files longest ago (the first in
/// `prev`'s order among equals), whose files the next sample reads again
/// whatever their size key says. With `reread` a fixed share of the
/// tenants, every tenant's files are read again within as many samples as
/// that share divides them into, a few at a time. Pure.
pub fn known_sizes(prev: &Sample, reread: usize) -> Vec<&Row> {
    let mut order: Vec<usize> = (0..prev.rows.len()).collect();
    order.sort_by_key(|&i| (prev.rows[i].measured_at, i));
    let mut keep = vec![true; prev.rows.len()];
    for &i in order.iter().take(reread) {
        keep[i] = false;
    }
    prev.rows.iter().zip(keep).filter(|(_, k)| *k).map(|(r, _)| r).collect()
}

/// One tenant's figures, from two samples (or one).
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub name: String,
    pub uid: String,
    pub sessions_active: i64,
    pub sessions_idle: i64,
    pub bytes: i64,
    pub rows_written_per_second: f64,
    pub statement_seconds_per_minute: f64,
    pub temp_bytes: Option<i64>,
}

impl Figures {
    pub fn sessions(&self) -> i64 {
        self.sessions_active + self.sessions_idle
    }
}

fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// Each tenant's figures in `cur`, with rates against `prev` (a tenant not
/// in `prev`, or the first sample: rows written 0/s; with
/// `pg_stat_statements`, statement time 0; a counter that went back, as
/// after a statistics reset: 0). Without `pg_stat_statements` the
/// statement time is the running statements' time in `cur`, per minute of
/// its window. Pure.
pub fn figures(prev: Option<&Sample>, cur: &Sample) -> Vec<Figures> {
    let before: BTreeMap<&str, &Row> = prev
        .map(|p| p.rows.iter().map(|r| (r.name.as_str(), r)).collect())
        .unwrap_or_default();
    let secs = prev
        .map(|p| cur.at.saturating_duration_since(p.at))
        .unwrap_or(cur.window)
        .as_secs_f64();
    let window = cur.window.as_secs_f64();
    cur.rows
        .iter()
        .map(|r| {
            let old = before.get(r.name.as_str()).filter(|o| o.uid == r.uid);
            let rows_written_per_second = match old {
                Some(o) if secs > 0.0 && r.rows_written >= o.rows_written => {
                    (r.rows_written - o.rows_written) as f64 / secs
                }
                _ => 0.0,
            };
            let statement_seconds_per_minute = if cur.statements {
                match (old.and_then(|o| o.statement_ms), r.statement_ms) {
                    (Some(a), Some(b)) if secs > 0.0 && b >= a => (b - a) / 1000.0 / secs * 60.0,
                    _ => 0.0,
                }
            } else if window > 0.0 {
                r.running_ms / 1000.0 / window * 60.0
            } else {
                0.0
            };
            Figures {
                name: r.name.clone(),
                uid: r.uid.clone(),
                sessions_active: r.sessions_active,
                sessions_idle: r.sessions_idle,
                bytes: r.bytes,
                rows_written_per_second: round2(rows_written_per_second),
                statement_seconds_per_minute: round2(statement_seconds_per_minute),
                temp_bytes: if cur.statements { r.temp_bytes.or(Some(0)) } else { None },
            }
        })
        .collect()
}

/// The `top` sort orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    /// Statement time per minute.
    Cpu,
    /// Sessions (all, then active).
    Sessions,
    /// Schema bytes.
    Bytes,
}

impl std::str::FromStr for SortBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(SortBy::Cpu),
            "sessions" => Ok(SortBy::Sessions),
            "bytes" => Ok(SortBy::Bytes),
            _ => Err(format!("unknown sort {s:?}: cpu, sessions or bytes")),
        }
    }
}

/// Sorts largest first by `by`, then by name. Pure.
pub fn sort(figs: &mut [Figures], by: SortBy) {
    figs.sort_by(|a, b| {
        let key = match by {
            SortBy::Cpu => b
                .statement_seconds_per_minute
                .total_cmp(&a.statement_seconds_per_minute)
                .then(b.sessions_active.cmp(&a.sessions_active)),
            SortBy::Sessions => b
                .sessions()
                .cmp(&a.sessions())
                .then(b.sessions_active.cmp(&a.sessions_active)),
            SortBy::Bytes => b.bytes.cmp(&a.bytes),
        };
        key.then_with(|| a.name.cmp(&b.name))
    });
}

/// Bytes as `kubectl top` shows memory: `512B`, `12.3KiB`, `4.0MiB`, ...
pub fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b.max(0) as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{}B", b.max(0))
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The `top` table: NAME, STMT-TIME (statement seconds per minute),
/// SESSIONS (active/all), BYTES, WRITES/S. Pure.
pub fn render_table(figs: &[Figures]) -> String {
    let rows: Vec<[String; 5]> = figs
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                format!("{:.1}s/min", f.statement_seconds_per_minute),
                format!("{}/{}", f.sessions_active, f.sessions()),
                human_bytes(f.bytes),
                format!("{:.1}", f.rows_written_per_second),
            ]
        })
        .collect();
    let head = ["NAME", "STMT-TIME", "SESSIONS", "BYTES", "WRITES/S"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = width[i]));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(head);
    for r in &rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, rows_written: i64, statement_ms: Option<f64>, running_ms: f64) -> Row {
        Row {
            name: name.into(),
            uid: format!("u-{name}"),
            sessions_active: 1,
            sessions_idle: 2,
            bytes: 8192,
            size_key: 1,
            measured: true,
            measured_at: Instant::now(),
            rows_written,
            running_ms,
            statement_ms,
            temp_bytes: statement_ms.map(|_| 4096),
        }
    }

    fn sample(at: Instant, statements: bool, rows: Vec<Row>) -> Sample {
        Sample {
            at,
            sampled_at: chrono::Utc::now(),
            window: Duration::from_secs(15),
            statements,
            rows,
        }
    }

    #[test]
    fn the_sizes_read_longest_ago_are_read_again_a_share_at_a_time() {
        // 100 tenants read at t0; each sample reads again the 3 read
        // longest ago (as the sampler does: a fortieth, rounded up).
        let t0 = Instant::now();
        let mut prev = sample(
            t0,
            false,
            (0..100).map(|i| row(&format!("t{i:03}"), 0, None, 0.0)).collect(),
        );
        for r in &mut prev.rows {
            r.measured_at = t0;
        }
        let reread = prev.rows.len().div_ceil(SIZES_REREAD_SAMPLES);
        assert_eq!(reread, 3);
        let mut read_again = std::collections::BTreeSet::new();
        for k in 1..=34u64 {
            let now = t0 + Duration::from_secs(15 * k);
            let known: Vec<String> = known_sizes_for_next(&prev).iter().map(|r| r.name.clone()).collect();
            assert_eq!(known.len(), 97, "sample {k}");
            // What `sample` makes of it: the rows not kept are read now.
            for r in &mut prev.rows {
                if !known.contains(&r.name) {
                    // None twice before every one was read again once.
                    assert!(
                        read_again.insert(r.name.clone()) || read_again.len() >= 99,
                        "sample {k}: {} read again twice",
                        r.name
                    );
                    r.measured_at = now;
                }
            }
        }
        assert_eq!(read_again.len(), 100, "every tenant read again within 34 samples");
        // The oldest go first, whatever their place.
        prev.rows[50].measured_at = t0;
        let known = known_sizes(&prev, 1);
        assert!(known.iter().all(|r| r.name != "t050") && known.len() == 99);
        assert_eq!(known_sizes(&prev, 0).len(), 100);
        assert!(known_sizes(&prev, 1000).is_empty());
    }

    #[test]
    fn rates_come_from_two_samples() {
        let t0 = Instant::now();
        let a = sample(
            t0,
            true,
            vec![row("a", 100, Some(1_000.0), 0.0), row("b", 50, Some(0.0), 0.0)],
        );
        let b = sample(
            t0 + Duration::from_secs(10),
            true,
            vec![
                row("a", 600, Some(6_000.0), 0.0),
                row("b", 10, Some(0.0), 0.0),
                row("c", 9, Some(9.0), 0.0),
            ],
        );
        let f = figures(Some(&a), &b);
        assert_eq!(
            (
                f[0].rows_written_per_second,
                f[0].statement_seconds_per_minute,
                f[0].temp_bytes
            ),
            (50.0, 30.0, Some(4096))
        );
        assert_eq!(
            f[1].rows_written_per_second, 0.0,
            "a counter that went back (stats reset) is no rate"
        );
        assert_eq!(
            (f[2].rows_written_per_second, f[2].statement_seconds_per_minute),
            (0.0, 0.0),
            "new tenant: no rate yet"
        );
        let first = figures(None, &a);
        assert_eq!(
            (first[0].rows_written_per_second, first[0].statement_seconds_per_minute),
            (0.0, 0.0)
        );
    }

    #[test]
    fn without_pg_stat_statements_running_time_per_window_minute_and_no_temp_bytes() {
        let s = sample(Instant::now(), false, vec![row("a", 0, None, 7_500.0)]);
        let f = figures(None, &s);
        assert_eq!((f[0].statement_seconds_per_minute, f[0].temp_bytes), (30.0, None));
    }

    #[test]
    fn sorting_and_the_table() {
        let t0 = Instant::now();
        let mut f = figures(
            None,
            &sample(
                t0,
                false,
                vec![
                    row("b", 0, None, 1_000.0),
                    row("a", 0, None, 1_000.0),
                    row("c", 0, None, 5_000.0),
                ],
            ),
        );
        f[0].bytes = 3 << 20;
        sort(&mut f, SortBy::Cpu);
        assert_eq!(
            f.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["c", "a", "b"],
            "ties by name"
        );
        sort(&mut f, SortBy::Bytes);
        assert_eq!(f[0].name, "b");
        let t = render_table(&f);
        assert!(
            t.starts_with(
                "NAME   STMT-TIME   SESSIONS   BYTES    WRITES/S\nb      4.0s/min    1/3        3.0MiB   0.0\n"
            ),
            "{t}"
        );
        assert_eq!(human_bytes(512), "512B");
        assert_eq!("cpu".parse::<SortBy>(), Ok(SortBy::Cpu));
        assert!("mem".parse::<SortBy>().is_err());
    }

    #[test]
    fn the_query_is_one_for_all_tenants_and_excludes_the_admin() {
        let sql = usage_sql(None);
        for must in [
            "FROM tenancy.tenants",
            "a.usename <> current_user",
            "a.backend_type = 'client backend'",
            "JOIN t ON t.schema_name = n.nspname",
            "WHERE false",
        ] {
            assert!(sql.contains(must), "{must}");
        }
        let with = usage_sql(Some("\"public\".pg_stat_statements"));
        assert!(
            with.contains("FROM \"public\".pg_stat_statements p") && with.contains("p.dbid = (SELECT oid FROM db)")
        );
        assert!(!with.contains("{"), "every placeholder is filled");
    }
}
