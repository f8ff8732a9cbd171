//! The caps watchdog's SQL and its pure planning (README, "Performance
//! isolation"; the loop is `src/controller/watchdog.rs`).
//!
//! A tenant's `statement_timeout` and `idle_in_transaction_session_timeout`
//! are role settings (and copied `SET LOCAL` by the gateway library), which a
//! session may change for itself. The watchdog enforces them from outside:
//! [`observe`] reads, in ONE query for all tenants, every client session of
//! this database that is a tenant's at the moment and has been running a
//! statement, or idle in a transaction, for longer than the grace, with its
//! tenant's role settings; [`plan`] (pure) picks those past their tenant's
//! cap plus the grace; [`signal`] cancels the statements
//! (`pg_cancel_backend`) and ends the idle transactions' sessions
//! (`pg_terminate_backend`), each only if the session is still in the very
//! statement or idle period that was observed.
//!
//! Whose session is it:
//! - a tenant's app login (`usename = tenant_<x>_app`): that tenant;
//! - the gateway login (`--gateway-role`) in a tenant transaction: the
//!   library's begin message sets `application_name = 'tenant:<name>'`
//!   LOCAL ([`APPLICATION_NAME_PREFIX`]); one whose application changed that
//!   is attributed by the locks it holds on relations of a tenant's schema.
//!
//! Never: the admin's own sessions (any session of `current_user`), ops
//! logins (`tenant_<x>_ops`: migrations, backups and restores have their own
//! timeouts), any other role, other databases, non-client backends.
//!
//! Needs: `pg_signal_backend` (signals non-superuser backends) and the
//! privileges of `pg_read_all_stats`, without which `pg_stat_activity` hides
//! other roles' state and timings ([`ensure_visibility`]).

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::{PgPool, Row as _};

use super::{query_err, quote_ident, PgError};

/// `application_name` of a gateway session in a tenant transaction is this
/// followed by the tenant's name (set LOCAL by the begin message).
pub const APPLICATION_NAME_PREFIX: &str = "tenant:";

/// What the watchdog is told.
#[derive(Clone, Debug)]
pub struct Config {
    /// Added to each cap before a session is signalled.
    pub grace: Duration,
    /// The gateway login of this database (None: no gateway).
    pub gateway: Option<String>,
}

/// Why a session is signalled; also the Event reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A statement ran past `statementTimeout` + grace: cancelled.
    StatementCancelled,
    /// Idle in a transaction past `idleInTransactionTimeout` + grace: the
    /// session was terminated (as Postgres' own timeout does).
    IdleSessionEnded,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::StatementCancelled => "StatementCancelled",
            Reason::IdleSessionEnded => "IdleSessionEnded",
        }
    }

    /// The role setting that caps it.
    pub fn setting(self) -> &'static str {
        match self {
            Reason::StatementCancelled => "statement_timeout",
            Reason::IdleSessionEnded => "idle_in_transaction_session_timeout",
        }
    }
}

/// How a session was found to be the tenant's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The tenant's own app login.
    Login,
    /// A gateway session whose `application_name` names the tenant.
    ApplicationName,
    /// A gateway session holding locks on relations of the tenant's schema.
    Locks,
}

impl Via {
    fn parse(s: &str) -> Option<Via> {
        match s {
            "login" => Some(Via::Login),
            "application_name" => Some(Via::ApplicationName),
            "locks" => Some(Via::Locks),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Via::Login => "app login",
            Via::ApplicationName => "gateway",
            Via::Locks => "gateway (by its locks)",
        }
    }
}

/// One observed session (one row per tenant it is attributed to).
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub pid: i32,
    /// The tenant's name (the Tenant's `metadata.name`) and uid, from the registry.
    pub tenant: String,
    pub uid: String,
    pub via: Via,
    /// `active`, `idle in transaction` or `idle in transaction (aborted)`.
    pub state: String,
    /// When the current statement (active) or idle period began, exactly
    /// as Postgres reports it: [`signal`] acts only if it is unchanged.
    pub since: chrono::DateTime<chrono::Utc>,
    pub elapsed_ms: i64,
    /// The tenant's app role settings (`name=value`, `pg_db_role_setting`).
    pub settings: Vec<String>,
}

/// A session to signal.
#[derive(Clone, Debug, PartialEq)]
pub struct Signal {
    pub pid: i32,
    pub tenant: String,
    pub uid: String,
    pub via: Via,
    pub reason: Reason,
    pub since: chrono::DateTime<chrono::Utc>,
    pub elapsed_ms: i64,
    pub cap_ms: i64,
}

/// Milliseconds of a time setting's value as Postgres stores it in
/// `pg_db_role_setting` (`30000ms`, `30s`, `1min`, `1.5s`, `0`; no unit:
/// milliseconds, the unit of both timeouts). None: not understood.
pub fn setting_ms(value: &str) -> Option<i64> {
    let v = value.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = (n * factor).round();
    (ms.is_finite() && ms >= 0.0 && ms <= i64::MAX as f64).then_some(ms as i64)
}

/// The cap `setting` among a role's settings, in ms; None when absent,
/// not understood, or 0 (no limit).
pub fn cap_ms(settings: &[String], setting: &str) -> Option<i64> {
    settings
        .iter()
        .rev()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == setting)
        .and_then(|(_, v)| setting_ms(v))
        .filter(|ms| *ms > 0)
}

/// What to signal: each session past its tenant's cap + `grace`, once per
/// pid (a gateway session attributed to several tenants by its locks gets
/// the strictest cap). Pure.
pub fn plan(sessions: &[Session], grace: Duration) -> Vec<Signal> {
    let grace_ms = grace.as_millis().min(i64::MAX as u128) as i64;
    let mut by_pid: BTreeMap<i32, Signal> = BTreeMap::new();
    for s in sessions {
        let reason = match s.state.as_str() {
            "active" => Reason::StatementCancelled,
            "idle in transaction" | "idle in transaction (aborted)" => Reason::IdleSessionEnded,
            _ => continue,
        };
        let Some(cap) = cap_ms(&s.settings, reason.setting()) else {
            continue;
        };
        if s.elapsed_ms <= cap.saturating_add(grace_ms) {
            continue;
        }
        let signal = Signal {
            pid: s.pid,
            tenant: s.tenant.clone(),
            uid: s.uid.clone(),
            via: s.via,
            reason,
            since: s.since,
            elapsed_ms: s.elapsed_ms,
            cap_ms: cap,
        };
        match by_pid.get(&s.pid) {
            Some(prev) if prev.cap_ms <= cap => {}
            _ => {
                by_pid.insert(s.pid, signal);
            }
        }
    }
    by_pid.into_values().collect()
}

/// Every session that may be past a cap, in one query for all tenants:
/// client backends of this database, tenants' (see the module doc), in a
/// statement or idle in a transaction for longer than the grace, with their
/// tenant's app role settings. $1: the grace (ms), $2: the gateway login
/// ('' for none).
pub const OBSERVE_SQL: &str = r#"
WITH db AS (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()),
busy AS (
  SELECT a.pid, a.usename::text AS usename, a.application_name, a.state,
         CASE WHEN a.state = 'active' THEN a.query_start ELSE a.state_change END AS since
    FROM pg_catalog.pg_stat_activity a
   WHERE a.datid = (SELECT oid FROM db)
     AND a.backend_type = 'client backend'
     AND a.pid <> pg_catalog.pg_backend_pid()
     AND a.usename <> current_user
     AND (a.usename LIKE 'tenant\_%\_app' OR a.usename = $2)
     AND CASE WHEN a.state = 'active' THEN a.query_start
              WHEN a.state IN ('idle in transaction', 'idle in transaction (aborted)') THEN a.state_change
         END < pg_catalog.now() - pg_catalog.make_interval(secs => $1 / 1000.0)
),
owned AS (
  -- The app login names its tenant.
  SELECT b.*, t.name, t.uid, t.schema_name, 'login' AS via
    FROM busy b JOIN tenancy.tenants t ON t.schema_name = pg_catalog.left(b.usename, -4)
   WHERE b.usename <> $2
  UNION ALL
  -- A gateway session in a tenant transaction: application_name (SET LOCAL
  -- by the begin message).
  SELECT b.*, t.name, t.uid, t.schema_name, 'application_name'
    FROM busy b JOIN tenancy.tenants t ON b.application_name LIKE 'tenant:%' AND t.name = pg_catalog.substr(b.application_name, 8)
   WHERE b.usename = $2
  UNION ALL
  -- ... or, when its application changed that, the locks it holds on a
  -- tenant schema's relations.
  SELECT b.*, t.name, t.uid, t.schema_name, 'locks'
    FROM busy b
    JOIN (SELECT DISTINCT l.pid, n.nspname
            FROM pg_catalog.pg_locks l
            JOIN pg_catalog.pg_class c ON c.oid = l.relation
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           WHERE l.database = (SELECT oid FROM db) AND n.nspname LIKE 'tenant\_%'
             AND l.pid IN (SELECT pid FROM busy WHERE usename = $2)) lk ON lk.pid = b.pid
    JOIN tenancy.tenants t ON t.schema_name = lk.nspname
   WHERE b.usename = $2
     AND NOT EXISTS (SELECT 1 FROM tenancy.tenants t2 WHERE b.application_name LIKE 'tenant:%' AND t2.name = pg_catalog.substr(b.application_name, 8))
)
SELECT o.pid, o.name, o.uid, o.via, o.state, o.since,
       (EXTRACT(epoch FROM pg_catalog.now() - o.since) * 1000)::int8 AS elapsed_ms,
       COALESCE(s.setconfig, '{}'::text[]) AS settings
  FROM owned o
  LEFT JOIN LATERAL (
    SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
     WHERE s.setdatabase = 0 AND s.setrole = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = o.schema_name || '_app')
  ) s ON true
 ORDER BY o.pid
"#;

/// Reads the sessions that may be past a cap ([`OBSERVE_SQL`]).
pub async fn observe(pool: &PgPool, cfg: &Config) -> Result<Vec<Session>, PgError> {
    let grace_ms = cfg.grace.as_millis().min(i64::MAX as u128) as i64;
    let rows = sqlx::query(OBSERVE_SQL)
        .bind(grace_ms as f64)
        .bind(cfg.gateway.as_deref().unwrap_or(""))
        .fetch_all(pool)
        .await
        .map_err(query_err("reading tenants' sessions for the watchdog"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let via: String = r.try_get("via").map_err(query_err("reading a watchdog row"))?;
        let Some(via) = Via::parse(&via) else { continue };
        let since: Option<chrono::DateTime<chrono::Utc>> =
            r.try_get("since").map_err(query_err("reading a watchdog row"))?;
        let Some(since) = since else { continue };
        out.push(Session {
            pid: r.try_get("pid").map_err(query_err("reading a watchdog row"))?,
            tenant: r.try_get("name").map_err(query_err("reading a watchdog row"))?,
            uid: r.try_get("uid").map_err(query_err("reading a watchdog row"))?,
            via,
            state: r.try_get("state").map_err(query_err("reading a watchdog row"))?,
            since,
            elapsed_ms: r.try_get("elapsed_ms").map_err(query_err("reading a watchdog row"))?,
            settings: r.try_get("settings").map_err(query_err("reading a watchdog row"))?,
        });
    }
    Ok(out)
}

/// Signals `signals`, each only while its session is still in the observed
/// statement (cancel) or idle period (terminate); returns those signalled.
pub async fn signal(pool: &PgPool, signals: &[Signal]) -> Result<Vec<Signal>, PgError> {
    if signals.is_empty() {
        return Ok(Vec::new());
    }
    let pids: Vec<i32> = signals.iter().map(|s| s.pid).collect();
    let terminate: Vec<bool> = signals.iter().map(|s| s.reason == Reason::IdleSessionEnded).collect();
    let since: Vec<chrono::DateTime<chrono::Utc>> = signals.iter().map(|s| s.since).collect();
    let done: Vec<i32> = sqlx::query_scalar(
        "SELECT a.pid FROM ROWS FROM (pg_catalog.unnest($1::int4[]), pg_catalog.unnest($2::bool[]), pg_catalog.unnest($3::timestamptz[])) AS s(pid, terminate, since)
           JOIN pg_catalog.pg_stat_activity a ON a.pid = s.pid
          WHERE CASE WHEN s.terminate AND a.state IN ('idle in transaction', 'idle in transaction (aborted)') AND a.state_change = s.since
                     THEN pg_catalog.pg_terminate_backend(a.pid)
                     WHEN NOT s.terminate AND a.state = 'active' AND a.query_start = s.since
                     THEN pg_catalog.pg_cancel_backend(a.pid)
                     ELSE false
                END",
    )
    .bind(&pids)
    .bind(&terminate)
    .bind(&since)
    .fetch_all(pool)
    .await
    .map_err(query_err("signalling sessions past their tenant's caps"))?;
    Ok(signals.iter().filter(|s| done.contains(&s.pid)).cloned().collect())
}

/// What one pass saw and did.
#[derive(Debug, Default)]
pub struct PassOutcome {
    /// Sessions read (tenants' sessions busy for longer than the grace).
    pub observed: usize,
    pub signalled: Vec<Signal>,
}

/// One watchdog pass: [`observe`], [`plan`], [`signal`].
pub async fn pass(pool: &PgPool, cfg: &Config) -> Result<PassOutcome, PgError> {
    let sessions = observe(pool, cfg).await?;
    let planned = plan(&sessions, cfg.grace);
    let signalled = signal(pool, &planned).await?;
    Ok(PassOutcome {
        observed: sessions.len(),
        signalled,
    })
}

/// Whether the admin sees other roles' session state and timings in
/// `pg_stat_activity` (superuser, or the privileges of `pg_read_all_stats`).
pub async fn can_see_sessions(pool: &PgPool) -> Result<bool, PgError> {
    sqlx::query_scalar(
        "SELECT r.rolsuper OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .map_err(query_err("checking whether the admin may read pg_stat_activity"))
}

/// Makes sure the admin sees other sessions' state: if it does not, grants
/// itself `pg_read_all_stats` (a CREATEROLE role may up to Postgres 15; on
/// 16 and later that takes a role with ADMIN on it, e.g. a managed
/// service's master user). Err(MissingPrivilege) says what to grant.
pub async fn ensure_visibility(pool: &PgPool) -> Result<(), PgError> {
    if can_see_sessions(pool).await? {
        return Ok(());
    }
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the admin's name"))?;
    let grant = format!("GRANT pg_read_all_stats TO {}", quote_ident(&me)?);
    match sqlx::raw_sql(sqlx::AssertSqlSafe(grant)).execute(pool).await {
        Ok(_) if can_see_sessions(pool).await? => Ok(()),
        Ok(_) | Err(sqlx::Error::Database(_)) => Err(PgError::MissingPrivilege {
            role: me.clone(),
            what: format!("the privileges of pg_read_all_stats, without which the watchdog cannot see tenants' sessions (GRANT pg_read_all_stats TO {me})"),
        }),
        Err(e) => Err(PgError::Query { action: "granting the admin pg_read_all_stats", source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn session(pid: i32, tenant: &str, state: &str, elapsed_ms: i64, settings: &[&str]) -> Session {
        Session {
            pid,
            tenant: tenant.into(),
            uid: format!("uid-{tenant}"),
            via: Via::Login,
            state: state.into(),
            since: at(pid as i64),
            elapsed_ms,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        }
    }

    const CAPS: &[&str] = &[
        "search_path=tenant_a",
        "statement_timeout=2000ms",
        "idle_in_transaction_session_timeout=5s",
        "work_mem=16384kB",
    ];

    #[test]
    fn settings_read_as_postgres_stores_them() {
        assert_eq!(setting_ms("30000ms"), Some(30_000));
        assert_eq!(setting_ms("30s"), Some(30_000));
        assert_eq!(setting_ms("1.5s"), Some(1_500));
        assert_eq!(setting_ms("2min"), Some(120_000));
        assert_eq!(setting_ms("1h"), Some(3_600_000));
        assert_eq!(setting_ms("1d"), Some(86_400_000));
        assert_eq!(setting_ms("2500"), Some(2_500), "no unit: milliseconds");
        assert_eq!(setting_ms("0"), Some(0));
        for bad in ["", "s", "10 parsecs", "-1s", "1e400s"] {
            assert_eq!(setting_ms(bad), None, "{bad:?}");
        }
        assert_eq!(
            cap_ms(
                &CAPS.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "statement_timeout"
            ),
            Some(2_000)
        );
        assert_eq!(
            cap_ms(&["statement_timeout=0".to_string()], "statement_timeout"),
            None,
            "0: no limit"
        );
        assert_eq!(cap_ms(&[], "statement_timeout"), None);
    }

    #[test]
    fn a_statement_past_its_cap_and_grace_is_cancelled_and_one_within_is_not() {
        let grace = Duration::from_secs(1);
        let rows = vec![
            session(1, "a", "active", 3_001, CAPS),
            session(2, "a", "active", 3_000, CAPS),
            session(3, "a", "active", 2_500, CAPS),
        ];
        let p = plan(&rows, grace);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].pid, p[0].reason, p[0].cap_ms, p[0].since),
            (1, Reason::StatementCancelled, 2_000, at(1))
        );
    }

    #[test]
    fn idle_in_transaction_past_its_cap_ends_the_session() {
        let rows = vec![
            session(1, "a", "idle in transaction", 6_500, CAPS),
            session(2, "a", "idle in transaction (aborted)", 7_000, CAPS),
            session(3, "a", "idle in transaction", 5_900, CAPS),
            session(4, "a", "idle", 99_000, CAPS),
            session(5, "a", "fastpath function call", 99_000, CAPS),
        ];
        let p = plan(&rows, Duration::from_secs(1));
        assert_eq!(
            p.iter().map(|s| (s.pid, s.reason)).collect::<Vec<_>>(),
            [(1, Reason::IdleSessionEnded), (2, Reason::IdleSessionEnded)]
        );
    }

    #[test]
    fn a_cap_of_zero_or_none_never_signals() {
        let rows = vec![
            session(
                1,
                "z",
                "active",
                3_600_000,
                &["statement_timeout=0", "idle_in_transaction_session_timeout=0"],
            ),
            session(
                2,
                "z",
                "idle in transaction",
                3_600_000,
                &["statement_timeout=0", "idle_in_transaction_session_timeout=0"],
            ),
            session(3, "n", "active", 3_600_000, &[]),
            session(4, "x", "active", 3_600_000, &["statement_timeout=soon"]),
        ];
        assert!(plan(&rows, Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_session_attributed_to_several_tenants_is_signalled_once_with_the_strictest_cap() {
        let mut a = session(7, "a", "active", 10_000, &["statement_timeout=8s"]);
        a.via = Via::Locks;
        let mut b = session(7, "b", "active", 10_000, &["statement_timeout=2s"]);
        b.via = Via::Locks;
        let c = session(7, "c", "active", 10_000, &["statement_timeout=0"]);
        let p = plan(&[a, b, c], Duration::from_secs(1));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].tenant.as_str(), p[0].cap_ms, p[0].via), ("b", 2_000, Via::Locks));
    }

    #[test]
    fn the_observing_query_excludes_the_admin_ops_logins_and_other_databases() {
        for must in [
            "a.usename <> current_user",
            "a.pid <> pg_catalog.pg_backend_pid()",
            "a.backend_type = 'client backend'",
            "a.usename LIKE 'tenant\\_%\\_app' OR a.usename = $2",
            "a.datid = (SELECT oid FROM db)",
            "s.setdatabase = 0",
        ] {
            assert!(OBSERVE_SQL.contains(must), "{must}");
        }
        assert!(!OBSERVE_SQL.contains("_ops"), "ops logins are never candidates");
        assert_eq!(
            APPLICATION_NAME_PREFIX.len() + 1,
            8,
            "substr(application_name, 8) skips the prefix"
        );
    }
}
