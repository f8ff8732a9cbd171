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

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::plan::RolloutPlan;
use crate::api::OnFailure;
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::confined::OpsLogin;
use crate::pg::migrations::{migrate_tenant, ops_logins, TenantOutcome, Timeouts};

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

/// The tenants of one shard in a rollout: the shard's admin pool and its
/// planned tenants, sorted.
pub struct Shard<'a> {
    pub pool: &'a PgPool,
    pub tenants: Vec<TenantName>,
}

/// How many tenants' ops logins are read and derived at once, as a pass
/// reaches them: a pass that stops at its budget derives none for the
/// tenants it skips, and holds the logins of about this many tenants (and
/// those in flight), not of every planned one (at 10,000 followers the
/// logins alone were 3.0 MiB, `cargo bench --bench tenant_memory`, besides
/// the registry rows they were read from, while those were read).
pub const LOGIN_CHUNK: usize = 128;

/// Runs one pass of `plan`, each tenant with its ops login on its shard
/// (read from the registry and derived from `ring` [`LOGIN_CHUNK`] tenants
/// at a time, as the pass reaches them; a tenant not registered is
/// `NoSchema`), at most `maxConcurrent` tenants at once over all shards;
/// the canaries (on any shard) before the rest. Never fails as a whole:
/// each tenant's outcome is in the report.
pub async fn rollout(shards: &[Shard<'_>], ring: &Keyring, plan: &RolloutPlan, timeouts: &Timeouts) -> RolloutReport {
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
    let on = Logins {
        shards,
        pools: &pools,
        ring,
    };
    let peak = std::sync::atomic::AtomicU32::new(0);
    let latest = plan.latest();
    let deadline = start + PASS_BUDGET;

    let canaries = stage(&on, plan, &plan.canaries, true, timeouts, &peak, deadline).await;
    let canaries_ok = canaries.iter().all(|(_, o)| o.at_latest(latest));
    report.results.extend(canaries);
    if canaries_ok {
        report
            .results
            .extend(stage(&on, plan, &plan.rest, false, timeouts, &peak, deadline).await);
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

/// Where a pass's tenants log in: each shard's planned tenants, the
/// rollout's pool on it, and the keys the ops passwords derive from.
struct Logins<'a> {
    shards: &'a [Shard<'a>],
    pools: &'a [PgPool],
    ring: &'a Keyring,
}

/// A tenant's shard (an index into the pass's shards and pools) and ops
/// login, or why it has none: `Ok(None)` when it is not registered, `Err`
/// when the registry could not be read.
type LoginOf = Result<Option<(usize, OpsLogin)>, String>;

impl Logins<'_> {
    /// The logins of `chunk`: one registry query per shard that holds some
    /// of its tenants.
    async fn of(&self, chunk: &[TenantName]) -> Vec<(TenantName, LoginOf)> {
        let mut out: Vec<(TenantName, LoginOf)> = Vec::with_capacity(chunk.len());
        let mut placed = vec![false; chunk.len()];
        for (at, shard) in self.shards.iter().enumerate() {
            let here: Vec<usize> = (0..chunk.len())
                .filter(|&i| !placed[i] && shard.tenants.binary_search(&chunk[i]).is_ok())
                .collect();
            if here.is_empty() {
                continue;
            }
            let names: Vec<TenantName> = here.iter().map(|&i| chunk[i].clone()).collect();
            match ops_logins(shard.pool, self.ring, &names).await {
                Ok(mut logins) => {
                    for n in names {
                        let login = logins.remove(&n).map(|l| (at, l));
                        out.push((n, Ok(login)));
                    }
                }
                Err(e) => out.extend(names.into_iter().map(|n| (n, Err(e.to_string())))),
            }
            for i in here {
                placed[i] = true;
            }
        }
        // On no shard of the pass: not registered anywhere it could run.
        for (i, n) in chunk.iter().enumerate() {
            if !placed[i] {
                out.push((n.clone(), Ok(None)));
            }
        }
        out
    }
}

/// Whether a stage starts no further tenant: a failure stopped it, or (for
/// all but the canaries, which always run: the rest waits on them) the
/// pass is past its budget.
fn start_no_more(stop: &AtomicBool, canary: bool, deadline: Instant) -> bool {
    stop.load(Ordering::SeqCst) || (!canary && Instant::now() > deadline)
}

/// Runs `tenants` (in order, at most `maxConcurrent` at once), reading
/// their logins [`LOGIN_CHUNK`] at a time as the stage reaches them. While
/// a chunk's logins are read (one registry query per shard) the tenants in
/// flight are not polled: their sessions wait a query's time.
#[allow(clippy::too_many_arguments)]
async fn stage(
    on: &Logins<'_>,
    plan: &RolloutPlan,
    tenants: &[TenantName],
    canary: bool,
    timeouts: &Timeouts,
    peak: &std::sync::atomic::AtomicU32,
    deadline: Instant,
) -> Vec<(TenantName, Outcome)> {
    let stop = AtomicBool::new(false);
    let stop_on_failure = canary || plan.on_failure == OnFailure::Pause;
    let most = plan.max_concurrent.max(1);
    let mut results = Vec::with_capacity(tenants.len());
    let mut in_flight = FuturesUnordered::new();
    for (at, chunk) in tenants.chunks(LOGIN_CHUNK).enumerate() {
        if start_no_more(&stop, canary, deadline) {
            results.extend(
                tenants[at * LOGIN_CHUNK..]
                    .iter()
                    .map(|n| (n.clone(), Outcome::Skipped)),
            );
            break;
        }
        for (name, login) in on.of(chunk).await {
            while in_flight.len() >= most {
                if let Some(done) = in_flight.next().await {
                    results.push(done);
                }
            }
            if start_no_more(&stop, canary, deadline) {
                results.push((name, Outcome::Skipped));
                continue;
            }
            in_flight.push(run_one(
                on,
                plan,
                name,
                login,
                canary,
                stop_on_failure,
                timeouts,
                peak,
                &stop,
            ));
        }
    }
    while let Some(done) = in_flight.next().await {
        results.push(done);
    }
    results
}

/// One tenant of a stage: its migration on its login, the outcome logged
/// when it failed, and the stage stopped when the policy says so.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    on: &Logins<'_>,
    plan: &RolloutPlan,
    name: TenantName,
    login: LoginOf,
    canary: bool,
    stop_on_failure: bool,
    timeouts: &Timeouts,
    peak: &std::sync::atomic::AtomicU32,
    stop: &AtomicBool,
) -> (TenantName, Outcome) {
    let outcome = match login {
        Ok(Some((at, login))) => {
            let pool = &on.pools[at];
            let r = migrate_tenant(pool, &login, &plan.set, &plan.migrations, timeouts).await;
            peak.fetch_max(pool.size(), Ordering::Relaxed);
            match r {
                Ok(o) => Outcome::Done(o),
                Err(e) => Outcome::Error(e.to_string()),
            }
        }
        Ok(None) => Outcome::Done(TenantOutcome::NoSchema),
        Err(e) => Outcome::Error(format!("reading the tenant's ops login: {e}")),
    };
    match &outcome {
        Outcome::Done(TenantOutcome::Failed { version, error, .. }) => {
            tracing::warn!(set = %plan.set.name, tenant = %name, version, %error, canary, "migration failed")
        }
        Outcome::Error(e) => {
            tracing::warn!(set = %plan.set.name, tenant = %name, error = %e, "migrating a tenant was interrupted; retrying later")
        }
        _ => {}
    }
    if stop_on_failure && outcome.stops_pause() {
        stop.store(true, Ordering::SeqCst);
    }
    (name, outcome)
}
