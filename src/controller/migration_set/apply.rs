//! Apply: run a [`RolloutPlan`] against Postgres with bounded parallelism.
//!
//! Each tenant is migrated on a confined session of its own (its ops login,
//! closed after the run; never the admin's) while an admin connection holds
//! its migration lock. The rollout opens its own pool of at most
//! `maxConcurrent` admin connections for those locks (so a long migration
//! never starves the Tenant controller's pool; a run logs in before it
//! takes its admin connection, so an ops password reset borrows the one it
//! will use), runs the canaries, and only when each of them reached the
//! latest version, the rest. With `Pause` the first failure stops tenants not yet started; the
//! ones in flight finish (DDL is never cancelled mid-way).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::plan::RolloutPlan;
use crate::api::OnFailure;
use crate::names::TenantName;
use crate::pg::confined::OpsLogin;
use crate::pg::migrations::{migrate_tenant, TenantOutcome, Timeouts};

/// After this long a pass starts no further tenant (those in flight
/// finish): the status is written and the next pass picks up the rest.
pub const PASS_BUDGET: Duration = Duration::from_secs(10);

/// What happened to one tenant in a pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done(TenantOutcome),
    /// Lost connection or another transient error: retried next pass.
    Error(String),
    /// Not started: the pass stopped first.
    Skipped,
}

impl Outcome {
    /// Reached `latest` (now or before).
    pub fn at_latest(&self, latest: i64) -> bool {
        matches!(self, Outcome::Done(TenantOutcome::Migrated { to, .. }) if *to >= latest)
    }

    fn stops_pause(&self) -> bool {
        matches!(
            self,
            Outcome::Done(TenantOutcome::Failed { .. } | TenantOutcome::ChecksumMismatch { .. }) | Outcome::Error(_)
        )
    }
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct RolloutReport {
    pub results: Vec<(TenantName, Outcome)>,
    /// A canary did not reach the latest version, so the rest did not start.
    pub canary_stopped: bool,
    /// The most admin connections the rollout's pool held at once.
    pub peak_connections: u32,
    pub elapsed: Duration,
}

impl RolloutReport {
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|(_, o)| f(o)).count()
    }

    /// Worth another pass soon: a tenant was busy, hit a transient error,
    /// or was not started.
    pub fn retry_soon(&self) -> bool {
        self.results.iter().any(|(_, o)| {
            matches!(
                o,
                Outcome::Error(_) | Outcome::Skipped | Outcome::Done(TenantOutcome::Busy)
            )
        })
    }
}

/// The tenants of one shard in a rollout: the shard's admin pool and the
/// ops logins of its planned tenants.
pub struct Shard<'a> {
    pub pool: &'a PgPool,
    pub logins: BTreeMap<TenantName, OpsLogin>,
}

/// Runs one pass of `plan`, each tenant with its ops login from its shard's
/// `logins` (a tenant without one is not registered: `NoSchema`), at most
/// `maxConcurrent` tenants at once over all shards; the canaries (on any
/// shard) before the rest. Never fails as a whole: each tenant's outcome is
/// in the report.
pub async fn rollout(shards: &[Shard<'_>], plan: &RolloutPlan, timeouts: &Timeouts) -> RolloutReport {
    let start = Instant::now();
    let mut report = RolloutReport::default();
    if plan.is_empty() || plan.blocked.is_some() {
        return report;
    }
    // A connection waits for a free slot as long as a migration may run.
    let wait = timeouts.statement.max(Duration::from_secs(60)) + timeouts.lock;
    let pools: Vec<PgPool> = shards
        .iter()
        .map(|s| {
            PgPoolOptions::new()
                .max_connections(plan.max_concurrent as u32)
                .min_connections(0)
                .acquire_timeout(wait)
                .idle_timeout(Duration::from_secs(30))
                // No ping per tenant: a session that died idle fails its next
                // tenant as a lost connection (retried next pass) and is closed.
                .test_before_acquire(false)
                .connect_lazy_with(s.pool.connect_options().as_ref().clone())
        })
        .collect();
    let mut logins: BTreeMap<TenantName, (&PgPool, &OpsLogin)> = BTreeMap::new();
    for (s, pool) in shards.iter().zip(&pools) {
        logins.extend(s.logins.iter().map(|(n, l)| (n.clone(), (pool, l))));
    }
    let peak = std::sync::atomic::AtomicU32::new(0);
    let latest = plan.latest();
    let deadline = start + PASS_BUDGET;

    let canaries = stage(&logins, plan, &plan.canaries, true, timeouts, &peak, deadline).await;
    let canaries_ok = canaries.iter().all(|(_, o)| o.at_latest(latest));
    report.results.extend(canaries);
    if canaries_ok {
        report
            .results
            .extend(stage(&logins, plan, &plan.rest, false, timeouts, &peak, deadline).await);
    } else {
        report.canary_stopped = true;
        report
            .results
            .extend(plan.rest.iter().map(|n| (n.clone(), Outcome::Skipped)));
    }
    for pool in pools {
        pool.close().await;
    }
    report.peak_connections = peak.load(Ordering::Relaxed);
    report.elapsed = start.elapsed();
    report
}

#[allow(clippy::too_many_arguments)]
async fn stage(
    logins: &BTreeMap<TenantName, (&PgPool, &OpsLogin)>,
    plan: &RolloutPlan,
    tenants: &[TenantName],
    canary: bool,
    timeouts: &Timeouts,
    peak: &std::sync::atomic::AtomicU32,
    deadline: Instant,
) -> Vec<(TenantName, Outcome)> {
    let stop = AtomicBool::new(false);
    let stop_on_failure = canary || plan.on_failure == OnFailure::Pause;
    stream::iter(tenants.iter().cloned())
        .map(|name| {
            let stop = &stop;
            async move {
                // Canaries always run: the rest waits on them.
                if stop.load(Ordering::SeqCst) || (!canary && Instant::now() > deadline) {
                    return (name, Outcome::Skipped);
                }
                let result = match logins.get(&name) {
                    Some((pool, login)) => {
                        let r = migrate_tenant(pool, login, &plan.set, &plan.migrations, timeouts).await;
                        peak.fetch_max(pool.size(), Ordering::Relaxed);
                        r
                    }
                    None => Ok(TenantOutcome::NoSchema),
                };
                let outcome = match result {
                    Ok(o) => Outcome::Done(o),
                    Err(e) => Outcome::Error(e.to_string()),
                };
                match &outcome {
                    Outcome::Done(TenantOutcome::Failed { version, error, .. }) => {
                        tracing::warn!(set = %plan.set.name, tenant = %name, version, %error, canary, "migration failed")
                    }
                    Outcome::Error(e) => tracing::warn!(set = %plan.set.name, tenant = %name, error = %e, "migrating a tenant was interrupted; retrying later"),
                    _ => {}
                }
                if stop_on_failure && outcome.stops_pause() {
                    stop.store(true, Ordering::SeqCst);
                }
                (name, outcome)
            }
        })
        .buffer_unordered(plan.max_concurrent.max(1))
        .collect()
        .await
}
