//! Metrics and health: what the operator tells Prometheus and the kubelet.
//!
//! Takes the admin pool, the [`Metrics`] and the [`Health`] the controllers
//! share (the metrics hold the Tenant watch cache once it runs); gives [`Metrics`] (recorded by the controllers), [`Health`]
//! (task liveness, Postgres reachability, start-up) and [`serve`], an HTTP
//! server for `/metrics` (OpenMetrics text), `/healthz` and `/readyz`.
//! Side effects: binds a TCP port; pings Postgres every 10 seconds.
//!
//! Label values come from fixed sets only (controller names, error
//! `label()`s, tenant phases), never from an error's text, and an object's
//! name only where its count is bounded (the watchdog names at most
//! [`WATCHDOG_NAMED_TENANTS`] tenants, the rest are `other`), so the series
//! count stays bounded whatever the number of tenants.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::{Tenant, TenantPhase};

/// How long Postgres may be unreachable before `/readyz` fails.
pub const DB_UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);
/// How often the health task pings Postgres.
const DB_PING_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantReasonLabels {
    tenant: String,
    reason: &'static str,
}

/// How many tenants the watchdog's per-tenant counter names: the first
/// ones signalled since start keep their own series (counters must only
/// grow, so a series never moves to another tenant); later ones count as
/// `tenant="other"`. The per-reason total counts all.
pub const WATCHDOG_NAMED_TENANTS: usize = 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeasureTenantLabels {
    measure: &'static str,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeasureLabel {
    measure: &'static str,
}

/// How many tenants each usage gauge names (the largest by that measure at
/// the latest sample); the rest are summed as `tenant="other"`.
pub const USAGE_NAMED_TENANTS: usize = 20;

/// The usage measures, as the gauges' `measure` label names them.
pub const USAGE_MEASURES: [&str; 7] = [
    "sessions_active",
    "sessions_idle",
    "bytes",
    "rows_written_per_second",
    "statement_seconds_per_minute",
    "temp_bytes",
    "cancellations",
];

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The `n` largest of `values` by value (then name), the sum of the rest
/// and the total. Pure.
pub fn top_n(values: &[(&str, f64)], n: usize) -> (Vec<(String, f64)>, f64, f64) {
    let mut v: Vec<(&str, f64)> = values.to_vec();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let total = v.iter().map(|x| x.1).sum();
    let other = v.iter().skip(n).map(|x| x.1).sum();
    (
        v.into_iter().take(n).map(|(k, x)| (k.to_string(), x)).collect(),
        other,
        total,
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    state: &'static str,
}

fn duration_histogram() -> Histogram {
    // 5ms .. about 40s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// The operator's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    tenants: Family<PhaseLabel, Gauge>,
    pool: Family<PoolLabel, Gauge>,
    leader: Gauge,
    watchdog: Family<ReasonLabel, Counter>,
    watchdog_tenants: Family<TenantReasonLabels, Counter>,
    watchdog_named: Mutex<std::collections::HashSet<String>>,
    watchdog_errors: Counter,
    /// Light Tenant reconciles, per kind (`rolling_out`: no Postgres;
    /// `settled`: the versions read; `rate_limits`: no Postgres).
    light_reconciles: Family<KindLabel, Counter>,
    /// Sessions signalled per tenant since start (status.usage.cancellations).
    watchdog_per_tenant: Mutex<std::collections::HashMap<String, u64>>,
    usage: Family<MeasureTenantLabels, FloatGauge>,
    usage_totals: Family<MeasureLabel, FloatGauge>,
    /// Usage samples taken, per shard.
    usage_samples: Family<ShardLabel, Counter>,
    /// Tenants whose `status.usage` the latest sample of a shard found to
    /// differ (written at most [`crate::controller::usage::WRITES_PER_SAMPLE`]
    /// a sample; 0: the shard's figures are what the Tenants show).
    usage_due: Family<ShardLabel, Gauge>,
    /// The shards the two above have series for.
    usage_shards: Mutex<std::collections::BTreeSet<String>>,
    /// The Tenant controller's watch cache, for the per-phase gauge (set
    /// when that controller starts).
    pub tenant_store: OnceLock<Store<Tenant>>,
    /// The Tenant controller's front queue, for the queue gauge (set when
    /// that controller starts).
    pub tenant_gate: OnceLock<std::sync::Arc<crate::controller::tenant::gate::Gate>>,
    tenant_queue: Family<PoolLabel, Gauge>,
}

/// The samples of the reconcile counters on `/metrics`, as readers (the
/// scale benchmark) look for them; the unit test below checks these names.
pub const RECONCILES_TOTAL: &str = "tenant_operator_reconciles_total";
pub const RECONCILE_ERRORS_TOTAL: &str = "tenant_operator_reconcile_errors_total";
/// The usage sampler's samples, and the status writes its latest sample
/// found due, per shard (the scale benchmark waits for a sample with none
/// due before its idle window).
pub const USAGE_SAMPLES_TOTAL: &str = "tenant_operator_usage_samples_total";
pub const USAGE_WRITES_DUE: &str = "tenant_operator_usage_status_writes_due";

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tenant_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let tenants = Family::<PhaseLabel, Gauge>::default();
        let pool = Family::<PoolLabel, Gauge>::default();
        let leader = Gauge::default();
        let watchdog = Family::<ReasonLabel, Counter>::default();
        let watchdog_tenants = Family::<TenantReasonLabels, Counter>::default();
        let watchdog_errors = Counter::default();
        registry.register("reconciles", "Reconciles run, per controller", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, per controller and reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take, per controller",
            duration.clone(),
        );
        registry.register(
            "tenants",
            "Tenants per status phase (Unknown: no status yet)",
            tenants.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Admin connections to Postgres, in use and idle",
            pool.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controllers",
            leader.clone(),
        );
        registry.register(
            "watchdog_signals",
            "Tenant sessions the caps watchdog signalled, per reason (StatementCancelled, IdleSessionEnded)",
            watchdog.clone(),
        );
        registry.register(
            "watchdog_tenant_signals",
            "Tenant sessions the caps watchdog signalled, per tenant (the first 20 signalled since start; the rest: other) and reason",
            watchdog_tenants.clone(),
        );
        registry.register(
            "watchdog_pass_errors",
            "Caps watchdog passes that failed",
            watchdog_errors.clone(),
        );
        let light_reconciles = Family::<KindLabel, Counter>::default();
        registry.register(
            "tenant_light_reconciles",
            "Tenant reconciles that only rewrote a MigrationSet follower's MigrationsApplied: kind rolling_out (the set rolls a new version out; from the watch caches, without Postgres) or settled (the set is Complete; from the tenant's recorded versions); also counted in reconciles",
            light_reconciles.clone(),
        );
        let usage = Family::<MeasureTenantLabels, FloatGauge>::default();
        let usage_totals = Family::<MeasureLabel, FloatGauge>::default();
        registry.register(
            "usage",
            "Tenants' usage at the latest sample, per measure: the 20 largest tenants by that measure by name, the rest summed as other",
            usage.clone(),
        );
        registry.register(
            "usage_all_tenants",
            "Tenants' usage at the latest sample, per measure, summed over all tenants",
            usage_totals.clone(),
        );
        let usage_samples = Family::<ShardLabel, Counter>::default();
        let usage_due = Family::<ShardLabel, Gauge>::default();
        registry.register("usage_samples", "Usage samples taken, per shard", usage_samples.clone());
        registry.register(
            "usage_status_writes_due",
            "Tenants whose status.usage the latest usage sample of the shard found to differ (at most 500 written a sample; 0: every Tenant shows its figures)",
            usage_due.clone(),
        );
        let tenant_queue = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "tenant_queue",
            "Tenants waiting for a reconcile: waiting in the operator's front queue, and handed to the controller's own queue (at most --queue-bound) and not yet reconciled",
            tenant_queue.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            tenants,
            pool,
            leader,
            watchdog,
            watchdog_tenants,
            watchdog_named: Mutex::new(Default::default()),
            watchdog_errors,
            light_reconciles,
            watchdog_per_tenant: Mutex::new(Default::default()),
            usage,
            usage_totals,
            usage_samples,
            usage_due,
            usage_shards: Mutex::new(Default::default()),
            tenant_store: OnceLock::new(),
            tenant_gate: OnceLock::new(),
            tenant_queue,
        }
    }
}

/// The phases the per-phase gauge always reports (0 when none).
const PHASES: [&str; 7] = [
    "Pending",
    "Provisioning",
    "Active",
    "Suspended",
    "Deleting",
    "Failed",
    "Unknown",
];

fn phase_label(p: Option<TenantPhase>) -> &'static str {
    match p {
        Some(TenantPhase::Pending) => "Pending",
        Some(TenantPhase::Provisioning) => "Provisioning",
        Some(TenantPhase::Active) => "Active",
        Some(TenantPhase::Suspended) => "Suspended",
        Some(TenantPhase::Deleting) => "Deleting",
        Some(TenantPhase::Failed) => "Failed",
        None => "Unknown",
    }
}

impl Metrics {
    /// Records a light Tenant reconcile (`controller::tenant::triggers`) of
    /// `kind` (`rolling_out`, `settled` or `rate_limits`).
    pub fn light_reconcile(&self, kind: &'static str) {
        self.light_reconciles.get_or_create(&KindLabel { kind }).inc();
    }

    /// Records one finished reconcile of `controller` that took `elapsed`;
    /// `error` is the failure's fixed label.
    pub fn reconciled(&self, controller: &'static str, elapsed: Duration, error: Option<&'static str>) {
        self.reconciles.get_or_create(&ControllerLabel { controller }).inc();
        self.duration
            .get_or_create(&ControllerLabel { controller })
            .observe(elapsed.as_secs_f64());
        if let Some(reason) = error {
            self.errors.get_or_create(&ErrorLabels { controller, reason }).inc();
        }
    }

    /// The watchdog signalled one session of `tenant` for `reason`.
    pub fn watchdog_signalled(&self, tenant: &str, reason: &'static str) {
        self.watchdog.get_or_create(&ReasonLabel { reason }).inc();
        let label = {
            let mut named = self.watchdog_named.lock().unwrap_or_else(|p| p.into_inner());
            if named.contains(tenant) || (named.len() < WATCHDOG_NAMED_TENANTS && named.insert(tenant.to_string())) {
                tenant.to_string()
            } else {
                "other".to_string()
            }
        };
        self.watchdog_tenants
            .get_or_create(&TenantReasonLabels { tenant: label, reason })
            .inc();
        *self
            .watchdog_per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert(0) += 1;
    }

    /// Sessions the watchdog signalled per tenant since start.
    pub fn watchdog_per_tenant(&self) -> std::collections::HashMap<String, u64> {
        self.watchdog_per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One usage sample of `shard` taken, which found `due` Tenants'
    /// `status.usage` to differ; the series of shards that are not `live`
    /// any more (deleted) are dropped.
    pub fn usage_sampled(&self, shard: &str, due: usize, live: &[&str]) {
        let label = ShardLabel {
            shard: shard.to_string(),
        };
        self.usage_samples.get_or_create(&label).inc();
        self.usage_due.get_or_create(&label).set(due as i64);
        let mut known = self.usage_shards.lock().unwrap_or_else(|p| p.into_inner());
        known.insert(shard.to_string());
        known.retain(|name| {
            let keep = live.contains(&name.as_str());
            if !keep {
                let gone = ShardLabel { shard: name.clone() };
                self.usage_samples.remove(&gone);
                self.usage_due.remove(&gone);
            }
            keep
        });
    }

    /// Sets the usage gauges from one sample: per measure the
    /// [`USAGE_NAMED_TENANTS`] largest tenants by name, the rest as
    /// `other`, and the total; series of tenants no longer among the
    /// largest are dropped.
    pub fn set_usage(
        &self,
        figs: &[crate::pg::usage::Figures],
        cancellations: &std::collections::HashMap<String, u64>,
    ) {
        self.usage.clear();
        for measure in USAGE_MEASURES {
            let values: Vec<(&str, f64)> = figs
                .iter()
                .filter_map(|f| {
                    let v = match measure {
                        "sessions_active" => f.sessions_active as f64,
                        "sessions_idle" => f.sessions_idle as f64,
                        "bytes" => f.bytes as f64,
                        "rows_written_per_second" => f.rows_written_per_second,
                        "statement_seconds_per_minute" => f.statement_seconds_per_minute,
                        "temp_bytes" => f.temp_bytes? as f64,
                        _ => cancellations.get(&f.name).copied().unwrap_or(0) as f64,
                    };
                    Some((f.name.as_str(), v))
                })
                .collect();
            if measure == "temp_bytes" && values.is_empty() {
                // Without pg_stat_statements: no temp figure at all.
                self.usage_totals.remove(&MeasureLabel { measure });
                continue;
            }
            let (top, other, total) = top_n(&values, USAGE_NAMED_TENANTS);
            for (tenant, v) in top {
                self.usage
                    .get_or_create(&MeasureTenantLabels { measure, tenant })
                    .set(v);
            }
            self.usage
                .get_or_create(&MeasureTenantLabels {
                    measure,
                    tenant: "other".into(),
                })
                .set(other);
            self.usage_totals.get_or_create(&MeasureLabel { measure }).set(total);
        }
    }

    /// A watchdog pass failed.
    pub fn watchdog_failed(&self) {
        self.watchdog_errors.inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(leading as i64);
    }

    /// The OpenMetrics text, with the gauges read now.
    pub fn render(&self, pool: &sqlx::PgPool) -> String {
        let size = pool.size() as i64;
        let idle = pool.num_idle() as i64;
        self.pool.get_or_create(&PoolLabel { state: "idle" }).set(idle);
        self.pool
            .get_or_create(&PoolLabel { state: "in_use" })
            .set((size - idle).max(0));
        let mut counts: std::collections::HashMap<&'static str, i64> = PHASES.iter().map(|p| (*p, 0)).collect();
        if let Some(store) = self.tenant_store.get() {
            for t in store.state() {
                *counts
                    .entry(phase_label(t.status.as_ref().and_then(|s| s.phase)))
                    .or_default() += 1;
            }
        }
        for (phase, n) in counts {
            self.tenants.get_or_create(&PhaseLabel { phase }).set(n);
        }
        if let Some(gate) = self.tenant_gate.get() {
            let (waiting, handed) = gate.counts();
            for (state, n) in [("waiting", waiting), ("in_controller", handed)] {
                self.tenant_queue.get_or_create(&PoolLabel { state }).set(n as i64);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` and `/readyz` report.
pub struct Health {
    /// The controllers run (leader) or this replica stands by, after start-up
    /// checks passed.
    started: AtomicBool,
    /// Background tasks that ended although they never should.
    dead: Mutex<Vec<&'static str>>,
    /// The last successful Postgres round trip.
    db_last_ok: Mutex<Option<Instant>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: AtomicBool::new(false),
            dead: Mutex::new(Vec::new()),
            db_last_ok: Mutex::new(Some(Instant::now())),
        }
    }
}

impl Health {
    /// Start-up is over: the controllers run, or this replica stands by.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// A task that should run forever ended: liveness fails from now on.
    pub fn task_died(&self, task: &'static str) {
        tracing::error!(task, "a background task stopped; /healthz fails from now on");
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    pub fn db_ok(&self) {
        *self.db_last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Ok, or the names of the tasks that died.
    pub fn live(&self) -> Result<(), String> {
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        if dead.is_empty() {
            Ok(())
        } else {
            Err(format!("stopped: {}", dead.join(", ")))
        }
    }

    /// Ok, or why this replica is not ready.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.started.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        let last = *self.db_last_ok.lock().unwrap_or_else(|p| p.into_inner());
        match last {
            Some(t) if t.elapsed() <= DB_UNREACHABLE_LIMIT => Ok(()),
            Some(t) => Err(format!("Postgres unreachable for {}s", t.elapsed().as_secs())),
            None => Err("Postgres not reached yet".into()),
        }
    }
}

/// What the HTTP server serves from: the admin pool (its gauges and the
/// health ping), the metrics and the health.
#[derive(Clone)]
pub struct Served {
    pub pool: sqlx::PgPool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Pings Postgres every 10 seconds and records each success.
pub async fn watch_database(pool: sqlx::PgPool, health: Arc<Health>) {
    use sqlx::Connection;
    loop {
        let ping = async {
            let mut conn = pool.acquire().await?;
            conn.ping().await
        };
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(())) => health.db_ok(),
            Ok(Err(e)) => tracing::warn!(error = %e, "Postgres health ping failed"),
            Err(_) => tracing::warn!("Postgres health ping timed out"),
        }
        tokio::time::sleep(DB_PING_EVERY).await;
    }
}

async fn metrics(State(s): State<Served>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.pool),
    )
}

fn verdict(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn healthz(State(s): State<Served>) -> impl IntoResponse {
    verdict(s.health.live())
}

async fn readyz(State(s): State<Served>) -> impl IntoResponse {
    verdict(s.health.ready())
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` in a
/// background task; also starts the Postgres ping. Returns the bound
/// address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, served: Served) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(served.clone());
    let health = served.health.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
        health.task_died("metrics-server");
    });
    tokio::spawn(watch_database(served.pool, served.health));
    tracing::info!(addr = %local, "metrics and health server listening");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_errors_are_counted_per_controller_and_fixed_reason() {
        let m = Metrics::default();
        m.reconciled("tenant", Duration::from_millis(30), None);
        m.reconciled("tenant", Duration::from_millis(30), Some("DatabaseUnavailable"));
        m.reconciled("migrationset", Duration::from_secs(2), None);
        m.set_leader(true);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains(&format!("{RECONCILES_TOTAL}{{controller=\"tenant\"}} 2")),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_reconciles_total{controller=\"migrationset\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "{RECONCILE_ERRORS_TOTAL}{{controller=\"tenant\",reason=\"DatabaseUnavailable\"}} 1"
            )),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_reconcile_duration_seconds_count{controller=\"tenant\"} 2"),
            "{out}"
        );
        assert!(out.contains("tenant_operator_leader 1"), "{out}");
    }

    #[test]
    fn usage_samples_are_counted_and_the_latest_samples_due_writes_shown_per_shard() {
        let m = Metrics::default();
        let both = ["default", "eu-1"];
        m.usage_sampled("default", 500, &both);
        m.usage_sampled("default", 0, &both);
        m.usage_sampled("eu-1", 7, &both);
        let page = |m: &Metrics| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
            out
        };
        let out = page(&m);
        for line in [
            format!("{USAGE_SAMPLES_TOTAL}{{shard=\"default\"}} 2"),
            format!("{USAGE_SAMPLES_TOTAL}{{shard=\"eu-1\"}} 1"),
            format!("{USAGE_WRITES_DUE}{{shard=\"default\"}} 0"),
            format!("{USAGE_WRITES_DUE}{{shard=\"eu-1\"}} 7"),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in:\n{out}");
        }
        // Shard eu-1 deleted: its series go at the next sample of another.
        m.usage_sampled("default", 0, &["default"]);
        let out = page(&m);
        assert!(!out.contains("eu-1"), "{out}");
        let three = format!("{USAGE_SAMPLES_TOTAL}{{shard=\"default\"}} 3");
        assert!(out.lines().any(|l| l == three), "{out}");
    }

    #[test]
    fn usage_gauges_name_the_twenty_largest_per_measure_and_sum_the_rest() {
        let m = Metrics::default();
        let figs: Vec<crate::pg::usage::Figures> = (0..30)
            .map(|i| crate::pg::usage::Figures {
                name: format!("t{i:02}"),
                uid: format!("u{i}"),
                sessions_active: 1,
                sessions_idle: 0,
                bytes: 1000 * i,
                rows_written_per_second: 0.0,
                statement_seconds_per_minute: if i == 3 { 42.0 } else { 0.0 },
                temp_bytes: None,
            })
            .collect();
        m.set_usage(&figs, &[("t05".to_string(), 2)].into());
        let render = |m: &Metrics| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
            out
        };
        let out = render(&m);
        assert!(
            out.contains("tenant_operator_usage{measure=\"bytes\",tenant=\"t29\"} 29000.0"),
            "{out}"
        );
        assert!(
            !out.contains("tenant_operator_usage{measure=\"bytes\",tenant=\"t09\"}"),
            "{out}"
        );
        // t00..t09 are the rest: 0+1000+...+9000.
        assert!(
            out.contains("tenant_operator_usage{measure=\"bytes\",tenant=\"other\"} 45000.0"),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_usage_all_tenants{measure=\"bytes\"} 435000.0"),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_usage{measure=\"statement_seconds_per_minute\",tenant=\"t03\"} 42.0"),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_usage{measure=\"cancellations\",tenant=\"t05\"} 2.0"),
            "{out}"
        );
        assert!(
            !out.contains("measure=\"temp_bytes\""),
            "no temp figure without pg_stat_statements"
        );
        for measure in ["bytes", "sessions_active"] {
            let series = out
                .lines()
                .filter(|l| l.starts_with(&format!("tenant_operator_usage{{measure=\"{measure}\",")))
                .count();
            assert_eq!(series, USAGE_NAMED_TENANTS + 1, "{measure}");
        }
        // A later sample: the series of tenants no longer among the largest go.
        m.set_usage(&figs[..2], &Default::default());
        let out = render(&m);
        assert!(!out.contains("tenant=\"t29\""), "{out}");
    }

    #[test]
    fn watchdog_counts_per_reason_and_names_at_most_twenty_tenants() {
        let m = Metrics::default();
        for i in 0..25 {
            m.watchdog_signalled(&format!("t{i}"), "StatementCancelled");
        }
        m.watchdog_signalled("t0", "StatementCancelled");
        m.watchdog_signalled("t24", "IdleSessionEnded");
        m.watchdog_failed();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains("tenant_operator_watchdog_signals_total{reason=\"StatementCancelled\"} 26"),
            "{out}"
        );
        assert!(
            out.contains("tenant_operator_watchdog_signals_total{reason=\"IdleSessionEnded\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "tenant_operator_watchdog_tenant_signals_total{tenant=\"t0\",reason=\"StatementCancelled\"} 2"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "tenant_operator_watchdog_tenant_signals_total{tenant=\"other\",reason=\"StatementCancelled\"} 5"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "tenant_operator_watchdog_tenant_signals_total{tenant=\"other\",reason=\"IdleSessionEnded\"} 1"
            ),
            "{out}"
        );
        assert!(!out.contains("tenant=\"t20\""), "{out}");
        assert!(out.contains("tenant_operator_watchdog_pass_errors_total 1"), "{out}");
        let series = out
            .lines()
            .filter(|l| l.starts_with("tenant_operator_watchdog_tenant_signals_total{"))
            .count();
        assert_eq!(series, 22, "{out}");
    }

    #[test]
    fn health_fails_on_a_dead_task_and_readiness_waits_for_start_and_postgres() {
        let h = Health::default();
        assert!(h.live().is_ok());
        assert_eq!(h.ready(), Err("starting".into()));
        h.set_started();
        assert!(h.ready().is_ok());
        *h.db_last_ok.lock().unwrap() = Some(Instant::now() - DB_UNREACHABLE_LIMIT - Duration::from_secs(1));
        assert!(h.ready().unwrap_err().contains("Postgres unreachable"));
        h.db_ok();
        assert!(h.ready().is_ok());
        h.task_died("ratelimits");
        assert_eq!(h.live(), Err("stopped: ratelimits".into()));
        assert!(h.ready().is_err());
    }
}
