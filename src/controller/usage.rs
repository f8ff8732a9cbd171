//! The usage sampler (README, "Performance isolation"): while this instance
//! leads, every `--usage-interval-seconds` one sample
//! ([`crate::pg::usage::sample`], one query for all tenants) gives each
//! tenant's figures; they go to the Prometheus gauges (top 20 per measure by
//! name, the rest as `other`, plus totals) and to `status.usage`, written
//! only when [`should_write`] says so, so that an idle fleet costs the API
//! server nothing.
//!
//! Takes the context (admin pool, settings, metrics, the Tenant cache); side
//! effects: merge patches on Tenants' status subresource, the
//! `tenant_operator_usage*` gauges. Never returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;

use super::Context;
use crate::api::{Tenant, TenantUsage};
use crate::pg::usage::{self as us, Figures};

/// A status whose figures moved less than [`MOVED`] is still rewritten
/// once it is this old, if any figure changed at all.
pub const REFRESH: Duration = Duration::from_secs(300);
/// A figure moved when it changed by more than this fraction of its old
/// value (or from or to zero).
pub const MOVED: f64 = 0.10;
/// Status writes per sample at most; the rest are decided again at the
/// next one (their status still differs), so a first sample of 10,000
/// tenants is spread over several.
pub const WRITES_PER_SAMPLE: usize = 500;
/// The sampler's share of the time at most: a sample that took `t` is
/// followed by the next no sooner than `PACE * t` after it began, whatever
/// the interval. A sample that reads many schemas' files
/// (`pg_total_relation_size`: an open and a `stat` per file) is the costly
/// one: the first, or one after a burst changed most schemas, 2 to 17 s at
/// 10,000 tenants (by load); one that reads a fortieth of them, 0.5 to
/// 0.7 s (docs/scale.md, stop 48).
pub const PACE: u32 = 10;

/// When the next sample may start: `every` after this one began, or
/// [`PACE`] times what it took when that is later. Pure.
pub fn next_sample(every: Duration, took: Duration) -> Duration {
    every.max(took.saturating_mul(PACE))
}

/// How often `pg_stat_statements` is looked for again.
const STATEMENTS_RECHECK: Duration = Duration::from_secs(600);

fn moved(old: f64, new: f64) -> bool {
    if old == new {
        return false;
    }
    if old == 0.0 || new == 0.0 {
        return true;
    }
    // (A hair of slack: 2.0 -> 2.2 is 10% exactly, not 10.0000001%.)
    (new - old).abs() > MOVED * old.abs() * (1.0 + 1e-9)
}

fn values(u: &TenantUsage) -> [f64; 7] {
    [
        u.sessions_active as f64,
        u.sessions_idle as f64,
        u.bytes as f64,
        u.rows_written_per_second,
        u.statement_seconds_per_minute,
        u.temp_bytes.map(|b| b as f64).unwrap_or(-1.0),
        u.cancellations as f64,
    ]
}

/// Whether to write `new` over `old` at `now`: no status yet; a figure
/// moved by more than 10% (or from or to zero; temp bytes appearing or
/// going); or some figure changed at all and `old` is [`REFRESH`] old. The
/// same figures are never rewritten (an idle tenant costs no write). Pure.
pub fn should_write(old: Option<&TenantUsage>, new: &TenantUsage, now: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(old) = old else { return true };
    let (a, b) = (values(old), values(new));
    if a.iter()
        .zip(&b)
        .any(|(x, y)| moved(*x, *y) || ((*x < 0.0) != (*y < 0.0)))
    {
        return true;
    }
    if a == b {
        return false;
    }
    match chrono::DateTime::parse_from_rfc3339(&old.sampled_at) {
        Ok(at) => now.signed_duration_since(at).to_std().is_ok_and(|age| age >= REFRESH),
        Err(_) => true,
    }
}

/// The status figures of `f`.
pub fn usage_of(f: &Figures, cancellations: u64, sampled_at: chrono::DateTime<chrono::Utc>) -> TenantUsage {
    TenantUsage {
        sessions_active: f.sessions_active,
        sessions_idle: f.sessions_idle,
        sessions: f.sessions(),
        bytes: f.bytes,
        rows_written_per_second: f.rows_written_per_second,
        statement_seconds_per_minute: f.statement_seconds_per_minute,
        temp_bytes: f.temp_bytes,
        cancellations: cancellations.min(i64::MAX as u64) as i64,
        sampled_at: sampled_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into(),
    }
}

/// The status writes one sample decides: for each tenant `current` knows
/// (by name and uid: Some(its status.usage)), its new usage when
/// [`should_write`]. The longest-waiting first: no status yet, then the
/// oldest `sampledAt` (an unreadable one counts as none), then by name; a
/// sample writes only the first [`WRITES_PER_SAMPLE`], so in name order a
/// few hundred busy tenants early in the alphabet, due again at every
/// sample, would keep the rest from ever being written. Pure.
pub fn decide(
    figs: &[Figures],
    current: impl Fn(&str, &str) -> Option<Option<TenantUsage>>,
    cancellations: &HashMap<String, u64>,
    sampled_at: chrono::DateTime<chrono::Utc>,
) -> Vec<(String, TenantUsage)> {
    let mut due: Vec<_> = figs
        .iter()
        .filter_map(|f| {
            let old = current(&f.name, &f.uid)?;
            let new = usage_of(f, cancellations.get(&f.name).copied().unwrap_or(0), sampled_at);
            should_write(old.as_ref(), &new, sampled_at).then(|| {
                let written = old.and_then(|o| chrono::DateTime::parse_from_rfc3339(&o.sampled_at).ok());
                (written, f.name.clone(), new)
            })
        })
        .collect();
    // Stable: figures come in name order.
    due.sort_by_key(|(written, _, _)| *written);
    due.into_iter().map(|(_, name, new)| (name, new)).collect()
}

/// Samples every open shard, each with a loop of its own; the metrics show
/// the latest sample of every shard together.
pub async fn run(ctx: Arc<Context>) {
    let Some(every) = ctx.settings.usage_interval else {
        tracing::info!("the usage sampler is off (--usage-interval-seconds=0)");
        return futures::future::pending().await;
    };
    let board: Board = Default::default();
    super::shards::each_shard(ctx, move |ctx, shard| run_on(ctx, shard, every, board.clone())).await
}

/// The latest figures of each shard, for the metrics.
type Board = Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<us::Figures>>>>;

async fn run_on(ctx: Arc<Context>, shard: Arc<super::shards::ShardConn>, every: Duration, board: Board) {
    let pool = &shard.pool;
    let cfg = us::Config {
        gateway: ctx.settings.gateway.as_ref().map(|g| g.to_string()),
        window: every,
    };
    let mut passes = super::watchdog::Passes::every(every);
    let mut pgss: Option<(Instant, Option<String>)> = None;
    let mut prev: Option<us::Sample> = None;
    loop {
        if let Err(e) = passes.next(pool).await {
            tracing::error!(shard = %shard.name, error = %e, "the usage sampler cannot see tenants' sessions; no usage until it can");
            continue;
        }
        if pgss.as_ref().is_none_or(|(at, _)| at.elapsed() >= STATEMENTS_RECHECK) {
            match us::statements_source(pool).await {
                Ok(src) => pgss = Some((Instant::now(), src)),
                Err(e) => tracing::warn!(error = %e, "looking for pg_stat_statements failed"),
            }
        }
        let src = pgss.as_ref().and_then(|(_, s)| s.as_deref());
        let started = Instant::now();
        let known = prev.as_ref().map(us::known_sizes_for_next).unwrap_or_default();
        let sampled = us::sample(pool, &cfg, src, &known);
        let cur = match tokio::time::timeout(every.max(Duration::from_secs(30)), sampled).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "usage sample failed; retrying at the next one");
                pgss = None;
                continue;
            }
            Err(_) => {
                tracing::warn!("usage sample timed out; retrying at the next one");
                continue;
            }
        };
        let took = started.elapsed();
        let next = next_sample(every, took);
        // Two samples of different sources give no rate.
        let base = prev.as_ref().filter(|p| p.statements == cur.statements);
        let figs = us::figures(base, &cur);
        let cancellations = ctx.metrics.watchdog_per_tenant();
        let all: Vec<us::Figures> = {
            let mut b = board.lock().unwrap_or_else(|p| p.into_inner());
            b.insert(shard.name.clone(), figs.clone());
            b.retain(|name, _| ctx.shards.get(name).is_some());
            b.values().flatten().cloned().collect()
        };
        ctx.metrics.set_usage(&all, &cancellations);
        let store = ctx.metrics.tenant_store.get();
        let writes = match store {
            Some(store) => decide(
                &figs,
                |name, uid| {
                    let t: Arc<Tenant> = store.get(&ObjectRef::new(name))?;
                    (t.metadata.uid.as_deref() == Some(uid) && t.metadata.deletion_timestamp.is_none())
                        .then(|| t.status.as_ref().and_then(|s| s.usage.clone()))
                },
                &cancellations,
                cur.sampled_at,
            ),
            None => Vec::new(),
        };
        let due = writes.len();
        let live = ctx.shards.all();
        let live: Vec<&str> = live.iter().map(|c| c.name.as_str()).collect();
        ctx.metrics.usage_sampled(&shard.name, due, &live);
        let mut written = 0;
        for (name, usage) in writes.into_iter().take(WRITES_PER_SAMPLE) {
            // `decide` found it in the store; a Tenant deleted since is left.
            let Some(t) = store.and_then(|s| s.get(&ObjectRef::new(&name))) else {
                continue;
            };
            match super::tenant::apply::write_usage(&ctx, &t, &usage).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(tenant = %name, error = %e, "writing status.usage failed"),
            }
        }
        tracing::debug!(
            tenants = figs.len(),
            query_ms = took.as_millis() as u64,
            sizes_read = cur.rows.iter().filter(|r| r.measured).count(),
            due,
            written,
            next_in_ms = next.saturating_sub(started.elapsed()).as_millis() as u64,
            "usage sample"
        );
        prev = Some(cur);
        if next > every {
            // Paced by its own cost; the interval's tick, overdue by then,
            // fires at once.
            tokio::time::sleep_until((started + next).into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn usage(bytes: i64, sessions: i64, stmt: f64, secs: i64) -> TenantUsage {
        TenantUsage {
            sessions_active: 0,
            sessions_idle: sessions,
            sessions,
            bytes,
            rows_written_per_second: 0.0,
            statement_seconds_per_minute: stmt,
            temp_bytes: None,
            cancellations: 0,
            sampled_at: at(secs).to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into(),
        }
    }

    #[test]
    fn a_costly_sample_spaces_the_next_by_ten_times_its_cost() {
        let every = Duration::from_secs(15);
        assert_eq!(next_sample(every, Duration::from_millis(40)), every);
        assert_eq!(next_sample(every, Duration::from_millis(1500)), every);
        assert_eq!(next_sample(every, Duration::from_millis(5800)), Duration::from_secs(58));
        assert_eq!(next_sample(every, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn written_when_a_figure_moves_more_than_ten_percent_or_from_or_to_zero() {
        let old = usage(1_000_000, 10, 2.0, 0);
        assert!(should_write(None, &old, at(0)), "no status yet");
        assert!(
            !should_write(Some(&old), &usage(1_000_000, 10, 2.0, 15), at(15)),
            "same figures"
        );
        assert!(
            !should_write(Some(&old), &usage(1_100_000, 11, 2.2, 15), at(15)),
            "10% exactly is not more than 10%"
        );
        assert!(should_write(Some(&old), &usage(1_100_001, 10, 2.0, 15), at(15)));
        assert!(
            should_write(Some(&old), &usage(1_000_000, 8, 2.0, 15), at(15)),
            "down too"
        );
        assert!(
            should_write(Some(&old), &usage(1_000_000, 10, 0.0, 15), at(15)),
            "to zero"
        );
        assert!(
            should_write(Some(&usage(0, 0, 0.0, 0)), &usage(0, 0, 0.01, 15), at(15)),
            "from zero"
        );
        let mut temp = old.clone();
        temp.temp_bytes = Some(0);
        assert!(should_write(Some(&old), &temp, at(15)), "temp bytes appear");
    }

    #[test]
    fn small_drifts_wait_for_five_minutes_and_the_same_figures_never_rewrite() {
        let old = usage(1_000_000, 10, 2.0, 0);
        let drift = |secs| usage(1_050_000, 10, 2.0, secs);
        assert!(!should_write(Some(&old), &drift(299), at(299)));
        assert!(should_write(Some(&old), &drift(300), at(300)));
        assert!(
            !should_write(Some(&old), &usage(1_000_000, 10, 2.0, 3_600), at(3_600)),
            "unchanged: never, however old"
        );
        let mut bad = old.clone();
        bad.sampled_at = "yesterday".into();
        assert!(should_write(Some(&bad), &drift(1), at(1)));
    }

    fn figs(n: usize) -> Vec<Figures> {
        (0..n)
            .map(|i| Figures {
                name: format!("t{i:04}"),
                uid: format!("u{i}"),
                sessions_active: 0,
                sessions_idle: (i % 3) as i64,
                bytes: 8192 * (1 + i as i64 % 7),
                rows_written_per_second: 0.0,
                statement_seconds_per_minute: 0.0,
                temp_bytes: None,
            })
            .collect()
    }

    #[test]
    fn an_idle_fleet_of_a_thousand_tenants_is_written_once_then_never() {
        let fleet = figs(1_000);
        let mut status: HashMap<String, Option<TenantUsage>> = fleet.iter().map(|f| (f.name.clone(), None)).collect();
        let cancellations = HashMap::new();
        let first = decide(&fleet, |n, _| status.get(n).cloned(), &cancellations, at(0));
        assert_eq!(first.len(), 1_000);
        for (n, u) in first {
            status.insert(n, Some(u));
        }
        for k in 1..=40 {
            let again = decide(&fleet, |n, _| status.get(n).cloned(), &cancellations, at(15 * k));
            assert!(again.is_empty(), "sample {k} wrote {}", again.len());
        }
        // One tenant busy, one with a cancellation: those two only.
        let mut busy = fleet.clone();
        busy[7].sessions_active = 3;
        let c: HashMap<String, u64> = [("t0500".to_string(), 1)].into();
        let w = decide(&busy, |n, _| status.get(n).cloned(), &c, at(700));
        assert_eq!(
            w.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["t0007", "t0500"]
        );
        assert_eq!((w[0].1.sessions, w[1].1.cancellations), (3 + 1, 1));
        // Tenants the cache does not know are not written.
        assert!(decide(&busy, |_, _| None, &c, at(700)).is_empty());
    }

    #[test]
    fn busy_tenants_early_in_the_alphabet_do_not_keep_the_rest_from_being_written() {
        // 1,000 tenants written once; then the first 600 by name are busy
        // (their write rate goes to 5 rows/s, then back to 0) and the last
        // 400 grew. Sample 1: all 1,000 due, 500 written (the same age:
        // by name, busy ones). Sample 2: those 500 due again (back to 0)
        // and the 400 grown: in name order the budget would go to the busy
        // ones again and the grown ones would wait as long as that lasts.
        let mut fleet = figs(1_000);
        let mut status: HashMap<String, Option<TenantUsage>> = fleet.iter().map(|f| (f.name.clone(), None)).collect();
        let none = HashMap::new();
        for (n, u) in decide(&fleet, |n, _| status.get(n).cloned(), &none, at(0)) {
            status.insert(n, Some(u));
        }
        for f in &mut fleet[600..] {
            f.bytes *= 2;
        }
        let mut grown_written = 0;
        for (k, rate) in [(1, 5.0), (2, 0.0)] {
            for f in &mut fleet[..600] {
                f.rows_written_per_second = rate;
            }
            let w = decide(&fleet, |n, _| status.get(n).cloned(), &none, at(15 * k));
            let busy_due = w.iter().filter(|(n, _)| n.as_str() < "t0600").count();
            assert!(busy_due >= WRITES_PER_SAMPLE, "sample {k}: {busy_due} busy tenants due");
            for (n, u) in w.into_iter().take(WRITES_PER_SAMPLE) {
                grown_written += usize::from(n.as_str() >= "t0600");
                status.insert(n, Some(u));
            }
        }
        assert_eq!(grown_written, 400, "every grown tenant written by the second sample");
        // The order: no status yet, then the oldest status, then by name.
        status.insert("t0900".into(), None);
        let mut old = status["t0950"].clone().expect("written");
        old.sampled_at = at(-60).to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
        status.insert("t0950".into(), Some(old));
        for f in &mut fleet {
            f.bytes *= 3;
        }
        let w = decide(&fleet, |n, _| status.get(n).cloned(), &none, at(100));
        assert_eq!(
            w.iter().take(2).map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["t0900", "t0950"]
        );
    }
}
