//! The caps watchdog (README, "Performance isolation"): while this instance
//! leads, every `--watchdog-interval-ms` one pass
//! ([`crate::pg::watchdog::pass`], one query for all tenants) cancels
//! tenants' statements running past their `statementTimeout` + grace and
//! ends their sessions idle in a transaction past
//! `idleInTransactionTimeout` + grace, whatever the sessions set for
//! themselves.
//!
//! Takes the context (admin pool, settings, metrics, Event reporter); side
//! effects: signals to tenants' backends, the counters
//! `tenant_operator_watchdog_*`, and at most one Event per minute per tenant
//! and reason (`StatementCancelled`, `IdleSessionEnded`) on the Tenant.
//! Never returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kit::{self, events::tenant_ref};
use super::Context;
use crate::pg::watchdog::{self as wd, Reason, Signal};

/// The watchdog's settings (`--watchdog-interval-ms`, `--watchdog-grace-ms`).
#[derive(Clone, Debug)]
pub struct WatchdogSettings {
    /// Time between passes; None: the watchdog is off.
    pub interval: Option<Duration>,
    /// Added to each cap before a session is signalled.
    pub grace: Duration,
}

impl Default for WatchdogSettings {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(1)),
            grace: Duration::from_millis(500),
        }
    }
}

/// At most one Event per tenant and reason per this period.
pub const EVENT_PERIOD: Duration = Duration::from_secs(60);
/// Events published per pass at most; the others wait for a later pass.
const EVENTS_PER_PASS: usize = 10;
/// How often a missing `pg_read_all_stats` is tried and reported again.
const VISIBILITY_RETRY: Duration = Duration::from_secs(60);

/// Signals waiting for their tenant's next Event.
#[derive(Debug)]
struct Pending {
    uid: String,
    count: u32,
    last_note: String,
}

/// Which Events are due: one per tenant and reason per [`EVENT_PERIOD`],
/// carrying how many sessions were signalled since the previous one. Pure
/// (the time is passed in).
#[derive(Debug, Default)]
pub struct EventThrottle {
    last: HashMap<(String, Reason), Instant>,
    pending: HashMap<(String, Reason), Pending>,
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct DueEvent {
    pub tenant: String,
    pub uid: String,
    pub reason: Reason,
    pub note: String,
}

impl EventThrottle {
    pub fn record(&mut self, s: &Signal) {
        let p = self
            .pending
            .entry((s.tenant.clone(), s.reason))
            .or_insert_with(|| Pending {
                uid: s.uid.clone(),
                count: 0,
                last_note: String::new(),
            });
        p.count += 1;
        p.uid = s.uid.clone();
        p.last_note = note_of(s);
    }

    /// The Events due at `now`, at most `max`; they count as published.
    pub fn due(&mut self, now: Instant, max: usize) -> Vec<DueEvent> {
        let mut keys: Vec<(String, Reason)> = self
            .pending
            .keys()
            .filter(|k| self.last.get(*k).is_none_or(|t| now.duration_since(*t) >= EVENT_PERIOD))
            .cloned()
            .collect();
        keys.sort();
        keys.truncate(max);
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            // The keys were just read from `pending`.
            let Some(p) = self.pending.remove(&k) else { continue };
            let more = if p.count > 1 {
                format!(
                    " ({} sessions of this tenant in all since the last such Event)",
                    p.count
                )
            } else {
                String::new()
            };
            out.push(DueEvent {
                tenant: k.0.clone(),
                uid: p.uid,
                reason: k.1,
                note: format!("{}{more}", p.last_note),
            });
            self.last.insert(k, now);
        }
        // What was published long ago and has nothing pending is forgotten.
        self.last.retain(|_, t| now.duration_since(*t) < EVENT_PERIOD);
        out
    }
}

fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn note_of(s: &Signal) -> String {
    match s.reason {
        Reason::StatementCancelled => format!(
            "cancelled a statement of session {} ({}) after {}: past the tenant's statementTimeout {} plus the watchdog's grace",
            s.pid,
            s.via.as_str(),
            secs(s.elapsed_ms),
            secs(s.cap_ms)
        ),
        Reason::IdleSessionEnded => format!(
            "ended session {} ({}), idle in a transaction for {}: past the tenant's idleInTransactionTimeout {} plus the watchdog's grace",
            s.pid,
            s.via.as_str(),
            secs(s.elapsed_ms),
            secs(s.cap_ms)
        ),
    }
}

/// The passes of a loop that reads other roles' sessions (the watchdog and
/// the usage sampler): one every interval (missed ticks delayed), once the
/// admin can see those sessions (`pg_read_all_stats`,
/// [`wd::ensure_visibility`], checked until it can, at most once every
/// [`VISIBILITY_RETRY`]).
pub(crate) struct Passes {
    tick: tokio::time::Interval,
    checked: Option<Instant>,
    visible: bool,
}

impl Passes {
    pub(crate) fn every(every: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            tick,
            checked: None,
            visible: false,
        }
    }

    /// Waits for the next pass that can see the sessions. Err: the check
    /// failed (report it; the next call waits for a later pass).
    pub(crate) async fn next(&mut self, pool: &sqlx::PgPool) -> Result<(), crate::pg::PgError> {
        loop {
            self.tick.tick().await;
            if self.visible {
                return Ok(());
            }
            if self.checked.is_some_and(|t| t.elapsed() < VISIBILITY_RETRY) {
                continue;
            }
            self.checked = Some(Instant::now());
            wd::ensure_visibility(pool).await?;
            self.visible = true;
            return Ok(());
        }
    }
}

/// Runs the watchdog on every open shard, each with a loop of its own.
pub async fn run(ctx: Arc<Context>) {
    let Some(every) = ctx.settings.watchdog.interval else {
        tracing::info!("the caps watchdog is off (--watchdog-interval-ms=0)");
        return futures::future::pending().await;
    };
    super::shards::each_shard(ctx, move |ctx, shard| run_on(ctx, shard, every)).await
}

async fn run_on(ctx: Arc<Context>, shard: Arc<super::shards::ShardConn>, every: Duration) {
    let pool = &shard.pool;
    let cfg = wd::Config {
        grace: ctx.settings.watchdog.grace,
        gateway: ctx.settings.gateway.as_ref().map(|g| g.to_string()),
    };
    let mut passes = Passes::every(every);
    let mut throttle = EventThrottle::default();
    loop {
        if let Err(e) = passes.next(pool).await {
            ctx.metrics.watchdog_failed();
            tracing::error!(shard = %shard.name, error = %e, "the caps watchdog cannot see tenants' sessions; caps are not enforced until it can");
            continue;
        }
        let outcome = match tokio::time::timeout(every.max(Duration::from_secs(10)), wd::pass(pool, &cfg)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                ctx.metrics.watchdog_failed();
                tracing::warn!(error = %e, "caps watchdog pass failed; retrying at the next one");
                continue;
            }
            Err(_) => {
                ctx.metrics.watchdog_failed();
                tracing::warn!("caps watchdog pass timed out; retrying at the next one");
                continue;
            }
        };
        for s in &outcome.signalled {
            ctx.metrics.watchdog_signalled(&s.tenant, s.reason.as_str());
            tracing::info!(tenant = %s.tenant, reason = s.reason.as_str(), pid = s.pid, via = s.via.as_str(), elapsed_ms = s.elapsed_ms, cap_ms = s.cap_ms, "caps watchdog signalled a session");
            throttle.record(s);
        }
        for ev in throttle.due(Instant::now(), EVENTS_PER_PASS) {
            kit::publish(
                &ctx,
                &tenant_ref(&ev.tenant, &ev.uid),
                true,
                ev.reason.as_str(),
                ev.note,
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::watchdog::Via;

    fn sig(tenant: &str, reason: Reason, pid: i32) -> Signal {
        Signal {
            pid,
            tenant: tenant.into(),
            uid: format!("uid-{tenant}"),
            via: Via::Login,
            reason,
            since: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            elapsed_ms: 3_200,
            cap_ms: 2_000,
        }
    }

    #[test]
    fn one_event_per_minute_per_tenant_and_reason_counting_the_rest() {
        let mut th = EventThrottle::default();
        let t0 = Instant::now();
        th.record(&sig("a", Reason::StatementCancelled, 1));
        th.record(&sig("a", Reason::IdleSessionEnded, 2));
        th.record(&sig("b", Reason::StatementCancelled, 3));
        let due = th.due(t0, 10);
        assert_eq!(due.len(), 3);
        assert!(
            due[0].note.starts_with(
                "cancelled a statement of session 1 (app login) after 3.2s: past the tenant's statementTimeout 2.0s"
            ),
            "{:?}",
            due[0]
        );
        assert_eq!(
            (due[0].uid.as_str(), due[1].reason),
            ("uid-a", Reason::IdleSessionEnded)
        );
        // Within the minute: held back and counted.
        th.record(&sig("a", Reason::StatementCancelled, 4));
        th.record(&sig("a", Reason::StatementCancelled, 5));
        assert!(th.due(t0 + Duration::from_secs(30), 10).is_empty());
        let due = th.due(t0 + Duration::from_secs(61), 10);
        assert_eq!(due.len(), 1);
        assert!(
            due[0].note.contains("session 5") && due[0].note.contains("(2 sessions"),
            "{:?}",
            due[0]
        );
        // Nothing pending: nothing due, and the old entries are forgotten.
        assert!(th.due(t0 + Duration::from_secs(200), 10).is_empty());
        assert!(th.last.is_empty() && th.pending.is_empty());
    }

    #[test]
    fn at_most_max_events_per_pass_and_the_rest_later() {
        let mut th = EventThrottle::default();
        for i in 0..15 {
            th.record(&sig(&format!("t{i:02}"), Reason::StatementCancelled, i));
        }
        let t0 = Instant::now();
        assert_eq!(th.due(t0, 10).len(), 10);
        assert_eq!(th.due(t0 + Duration::from_secs(1), 10).len(), 5);
    }
}
